"""The federated C-FIND fan-out with fake sites on a Clock: identities, streaming, timeouts, cancel."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.internet.task import Clock

from engine.federation.fanout import (
    Done,
    FederatedFind,
    Federation,
    FindEvent,
    MemberSite,
    Row,
)
from engine.federation.levels import Level, Model
from engine.federation.locations import LocationMemory
from engine.federation.request import read_find
from engine.federation.sitefind import SiteHandle, SitePlan
from engine.identity.resolver import TableResolver
from engine.identity.table import CrossReferenceTable
from engine.model import Demographics, PatientIdentifier

LOCAL = PatientIdentifier("L1", "LOCAL")
AT_A = PatientIdentifier("HA-1", "HOSP_A")
AT_B = PatientIdentifier("HB-1", "HOSP_B")


class FakeReactor(Clock):
    """A Clock that runs calls from threads at once, as the reactor thread would."""

    def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:
        function(*args)


class RecordingHandle(SiteHandle):
    def __init__(self) -> None:
        super().__init__()
        self.cancel_calls = 0
        self.abort_calls = 0

    def cancel(self) -> None:
        self.cancel_calls += 1
        super().cancel()

    def abort(self) -> None:
        self.abort_calls += 1
        super().abort()


@dataclasses.dataclass
class FakeSite:
    """A site whose answers and end the test controls."""

    plan: SitePlan | None = None
    handle: RecordingHandle | None = None
    emit: Callable[[Dataset], None] | None = None
    done: defer.Deferred[int] | None = None

    def answer(self, **values: str) -> None:
        ds = Dataset()
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        assert self.emit is not None
        self.emit(ds)

    def finish(self, count: int = 0) -> None:
        assert self.done is not None
        self.done.callback(count)


class Network:
    def __init__(self) -> None:
        self.sites: dict[str, FakeSite] = {}

    def run_site(
        self, site: str, plan: SitePlan, handle: SiteHandle, emit: Callable[[Dataset], None]
    ) -> defer.Deferred[int]:
        fake = self.sites.setdefault(site, FakeSite())
        fake.plan, fake.emit = plan, emit
        assert isinstance(handle, SiteHandle)
        fake.handle = handle  # type: ignore[assignment]
        fake.done = defer.Deferred()
        return fake.done


def member(name: str, issuer: str, **options: Any) -> MemberSite:
    values = {"timeout_seconds": 10.0, "queries_without_patient_id": False, "relational": False}
    values.update(options)
    return MemberSite(name=name, ae_title=name.upper(), issuer=issuer, **values)


@pytest.fixture
def setup() -> tuple[FakeReactor, Network, Federation]:
    reactor = FakeReactor()
    network = Network()
    table = CrossReferenceTable({LOCAL: {"HOSP_A": AT_A, "HOSP_B": AT_B}})
    federation = Federation(
        reactor=reactor,
        sites={
            "hospital_a": member("hospital_a", "HOSP_A"),
            "hospital_b": member("hospital_b", "HOSP_B", timeout_seconds=5.0),
            "local_pacs": member("local_pacs", "LOCAL", queries_without_patient_id=True),
        },
        identity=lambda: TableResolver(table, "LOCAL"),
        run_site=network.run_site,
        locations=LocationMemory(reactor.seconds, 3600),
        local_issuer="LOCAL",
        ae_title="FDQR",
        max_answers=100,
    )
    return reactor, network, federation


def start(federation: Federation, **keys: str) -> tuple[FederatedFind, list[FindEvent]]:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.StudyDescription = ""
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    events: list[FindEvent] = []
    request = read_find(Model.STUDY_ROOT, query, "LOCAL")
    find = FederatedFind(federation, request, "ISO_IR 192", events.append, "test#1")
    find.start()
    return find, events


def rows(events: list[FindEvent]) -> list[Dataset]:
    return [event.dataset for event in events if isinstance(event, Row)]


def test_fanout_asks_each_site_with_its_id(setup: tuple[FakeReactor, Network, Federation]) -> None:
    _, network, federation = setup
    start(federation, PatientID="L1")
    plans = {name: site.plan for name, site in network.sites.items()}
    assert {name: plan.keys.PatientID for name, plan in plans.items() if plan} == {
        "hospital_a": "HA-1",
        "hospital_b": "HB-1",
        "local_pacs": "L1",
    }
    assert all(plan is not None and plan.keys.IssuerOfPatientID == "" for plan in plans.values())


def test_fanout_streams_rows_before_others_finish(
    setup: tuple[FakeReactor, Network, Federation],
) -> None:
    _, network, federation = setup
    _, events = start(federation, PatientID="L1")
    network.sites["hospital_a"].answer(
        PatientID="HA-1", StudyInstanceUID="1.1", StudyDescription="CT"
    )
    assert [row.StudyInstanceUID for row in rows(events)] == ["1.1"]
    assert rows(events)[0].PatientID == "L1"
    assert not any(isinstance(event, Done) for event in events)


def test_fanout_merges_study_held_twice(setup: tuple[FakeReactor, Network, Federation]) -> None:
    _, network, federation = setup
    _, events = start(federation, PatientID="L1")
    network.sites["hospital_a"].answer(PatientID="HA-1", StudyInstanceUID="1.1")
    network.sites["hospital_b"].answer(PatientID="HB-1", StudyInstanceUID="1.1")
    for site in network.sites.values():
        site.finish()
    assert len(rows(events)) == 1
    done = events[-1]
    assert isinstance(done, Done)
    assert done.summary.duplicates == 1
    assert sorted(done.summary.answered) == ["hospital_a", "hospital_b", "local_pacs"]
    held_by = [location.site for location in federation.locations.locations("1.1")]
    assert held_by == ["hospital_a", "hospital_b"]


def test_fanout_ignores_other_patient_and_issuer(
    setup: tuple[FakeReactor, Network, Federation],
) -> None:
    _, network, federation = setup
    _, events = start(federation, PatientID="L1")
    site = network.sites["hospital_a"]
    site.answer(PatientID="HA-2", StudyInstanceUID="1.1")
    site.answer(PatientID="HA-1", IssuerOfPatientID="HOSP_B", StudyInstanceUID="1.2")
    site.answer(PatientID="HA-1", StudyInstanceUID="1.3", StudyDescription="CT")
    assert [row.StudyInstanceUID for row in rows(events)] == ["1.3"]


def test_fanout_answers_carry_local_record(
    setup: tuple[FakeReactor, Network, Federation],
) -> None:
    _, network, federation = setup
    record = Demographics("DOE-SMITH^JANE", "19650312", "F")
    looked_up: list[PatientIdentifier] = []

    def lookup(patient: PatientIdentifier) -> defer.Deferred[Demographics | None]:
        looked_up.append(patient)
        return defer.succeed(record)

    local_records = dataclasses.replace(federation, demographics=lookup)
    # The caller's name key is matched against the local name, not the site's.
    _, events = start(local_records, PatientID="L1", PatientName="DOE-SMITH*", PatientSex="")
    # identity.check (normalised) finds the same name, but the caller's key does not match it.
    network.sites["hospital_a"].answer(
        PatientID="HA-1", PatientName="Doe-Smith^Jane^M", PatientSex="F", StudyInstanceUID="1.1"
    )
    [row] = rows(events)
    assert looked_up == [LOCAL]
    assert row.PatientName == "DOE-SMITH^JANE"
    assert row.PatientSex == "F"


def test_fanout_drops_other_patients_match(
    setup: tuple[FakeReactor, Network, Federation], caplog: pytest.LogCaptureFixture
) -> None:
    # A site ID learned for the wrong local patient: the site's demographics give it away.
    _, network, federation = setup
    record = Demographics("ROE^RICHARD", "19580101", "M")
    checked = dataclasses.replace(federation, demographics=lambda patient: defer.succeed(record))
    checked.sites["hospital_a"] = member("hospital_a", "HOSP_A", queries_without_patient_id=True)
    for keys in ({"PatientID": "L1"}, {"AccessionNumber": "ACC1"}):
        _, events = start(checked, **keys)
        site = network.sites["hospital_a"]
        assert site.plan is not None
        assert site.plan.keys.PatientBirthDate == ""
        site.answer(
            PatientID="HA-1",
            PatientName="DOE^JANE",
            PatientBirthDate="19650312",
            PatientSex="F",
            StudyInstanceUID="1.1",
            AccessionNumber="ACC1",
        )
        site.answer(
            PatientID="HA-1",
            PatientName="ROE^RICHARD",
            PatientBirthDate="19580101",
            PatientSex="M",
            StudyInstanceUID="1.2",
            AccessionNumber="ACC1",
        )
        assert [row.StudyInstanceUID for row in rows(events)] == ["1.2"]
        assert [location.site for location in checked.locations.locations("1.1")] == []
    assert "dropped a match of HA-1^^^HOSP_A for local patient L1^^^LOCAL" in caplog.text
    assert "DOE" not in caplog.text


def test_fanout_without_record_keeps_site_name(
    setup: tuple[FakeReactor, Network, Federation],
) -> None:
    _, network, federation = setup
    _, events = start(federation, PatientID="L1", PatientName="")
    network.sites["hospital_a"].answer(
        PatientID="HA-1", PatientName="DOE^J", StudyInstanceUID="1.1"
    )
    [row] = rows(events)
    assert row.PatientName == "DOE^J"


def test_fanout_refilters_answers(setup: tuple[FakeReactor, Network, Federation]) -> None:
    _, network, federation = setup
    _, events = start(federation, PatientID="L1", StudyDescription="CT*")
    site = network.sites["hospital_a"]
    site.answer(PatientID="HA-1", StudyInstanceUID="1.1", StudyDescription="MR KNEE")
    site.answer(PatientID="HA-1", StudyInstanceUID="1.2", StudyDescription="CT HEAD")
    assert [row.StudyInstanceUID for row in rows(events)] == ["1.2"]


def test_fanout_skips_site_without_mapping(setup: tuple[FakeReactor, Network, Federation]) -> None:
    _, network, federation = setup
    table = CrossReferenceTable({LOCAL: {"HOSP_A": AT_A}})
    federation.identity = lambda: TableResolver(table, "LOCAL")
    _, events = start(federation, PatientID="L1")
    assert sorted(network.sites) == ["hospital_a", "local_pacs"]
    network.sites["hospital_a"].finish()
    network.sites["local_pacs"].finish()
    done = events[-1]
    assert isinstance(done, Done)
    assert "hospital_b" in done.summary.skipped
    assert done.summary.failed == {}


def test_fanout_timeout_reports_site_and_finishes(
    setup: tuple[FakeReactor, Network, Federation],
) -> None:
    reactor, network, federation = setup
    _, events = start(federation, PatientID="L1")
    network.sites["hospital_a"].finish()
    network.sites["local_pacs"].finish()
    assert not any(isinstance(event, Done) for event in events)

    reactor.advance(5.0)
    done = events[-1]
    assert isinstance(done, Done)
    assert done.summary.failed == {"hospital_b": "timed out after 5 s"}
    assert done.summary.failure_comment() == "no answer from hospital_b (timed out after 5 s)"
    handle = network.sites["hospital_b"].handle
    assert handle is not None
    assert handle.aborted

    # A late answer of the timed-out site is not sent.
    network.sites["hospital_b"].answer(PatientID="HB-1", StudyInstanceUID="9.9")
    assert rows(events) == []
    assert reactor.getDelayedCalls() == []


def test_fanout_failed_site_reported(setup: tuple[FakeReactor, Network, Federation]) -> None:
    _, network, federation = setup
    _, events = start(federation, PatientID="L1")
    done_b = network.sites["hospital_b"].done
    assert done_b is not None
    done_b.errback(ConnectionRefusedError("connection refused"))
    network.sites["hospital_a"].finish()
    network.sites["local_pacs"].finish()
    done = events[-1]
    assert isinstance(done, Done)
    assert list(done.summary.failed) == ["hospital_b"]


def test_fanout_cancel_reaches_every_running_site(
    setup: tuple[FakeReactor, Network, Federation],
) -> None:
    _, network, federation = setup
    find, events = start(federation, PatientID="L1")
    network.sites["local_pacs"].finish()
    find.cancel()
    assert network.sites["hospital_a"].handle is not None
    assert network.sites["hospital_a"].handle.cancelled
    assert network.sites["hospital_b"].handle is not None
    assert network.sites["hospital_b"].handle.cancelled
    network.sites["hospital_a"].answer(PatientID="HA-1", StudyInstanceUID="1.1")
    assert rows(events) == []


def test_fanout_without_patient_id_only_allowed_sites(
    setup: tuple[FakeReactor, Network, Federation],
) -> None:
    _, network, federation = setup
    _, events = start(federation, AccessionNumber="ACC1")
    assert sorted(network.sites) == ["local_pacs"]
    network.sites["local_pacs"].answer(
        PatientID="L1", StudyInstanceUID="1.5", AccessionNumber="ACC1"
    )
    network.sites["local_pacs"].answer(
        PatientID="L-UNKNOWN", StudyInstanceUID="1.6", AccessionNumber="ACC1"
    )
    network.sites["local_pacs"].finish()
    assert [row.StudyInstanceUID for row in rows(events)] == ["1.5", "1.6"]


def test_fanout_maps_remote_patient_to_local(
    setup: tuple[FakeReactor, Network, Federation],
) -> None:
    _, network, federation = setup
    federation.sites["hospital_a"] = member("hospital_a", "HOSP_A", queries_without_patient_id=True)
    _, events = start(federation, AccessionNumber="ACC1")
    site = network.sites["hospital_a"]
    assert site.plan is not None
    site.answer(PatientID="HA-1", StudyInstanceUID="1.7", AccessionNumber="ACC1")
    site.answer(PatientID="HA-404", StudyInstanceUID="1.8", AccessionNumber="ACC1")
    [row] = rows(events)
    assert (row.StudyInstanceUID, row.PatientID, row.IssuerOfPatientID) == ("1.7", "L1", "LOCAL")


def test_fanout_study_uid_query_uses_known_locations(
    setup: tuple[FakeReactor, Network, Federation],
) -> None:
    _, network, federation = setup
    _, _ = start(federation, PatientID="L1")
    network.sites["hospital_b"].answer(PatientID="HB-1", StudyInstanceUID="1.1")
    for site in network.sites.values():
        site.finish()

    network.sites.clear()
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = "1.1"
    query.SeriesInstanceUID = ""
    events: list[FindEvent] = []
    request = read_find(Model.STUDY_ROOT, query, "LOCAL")
    FederatedFind(federation, request, "", events.append, "test#2").start()
    assert sorted(network.sites) == ["hospital_b"]
    plan = network.sites["hospital_b"].plan
    assert plan is not None
    assert plan.level is Level.SERIES
    assert plan.keys.PatientID == "HB-1"
    network.sites["hospital_b"].answer(
        PatientID="HB-1", StudyInstanceUID="1.1", SeriesInstanceUID="1.1.1"
    )
    assert [row.SeriesInstanceUID for row in rows(events)] == ["1.1.1"]
    assert rows(events)[0].PatientID == "L1"


def test_fanout_unknown_patient_asks_nobody(
    setup: tuple[FakeReactor, Network, Federation],
) -> None:
    _, network, federation = setup
    _, events = start(federation, PatientID="NOPE", IssuerOfPatientID="HOSP_A")
    assert network.sites == {}
    done = events[-1]
    assert isinstance(done, Done)
    assert done.summary.asked == []


def test_fanout_patient_level_counts_sent_empty(
    setup: tuple[FakeReactor, Network, Federation],
) -> None:
    _, network, federation = setup
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientID = "L1"
    query.NumberOfPatientRelatedStudies = None
    query.NumberOfPatientRelatedInstances = None
    events: list[FindEvent] = []
    request = read_find(Model.PATIENT_ROOT, query, "LOCAL")
    FederatedFind(federation, request, "ISO_IR 192", events.append, "test#2").start()
    # The local PACS stores 4 of the patient's studies, and the other sites store more.
    network.sites["local_pacs"].answer(
        PatientID="L1", NumberOfPatientRelatedStudies="4", NumberOfPatientRelatedInstances="202"
    )
    network.sites["hospital_a"].answer(
        PatientID="HA-1", NumberOfPatientRelatedStudies="3", NumberOfPatientRelatedInstances="90"
    )
    for site in network.sites.values():
        site.finish()
    [row] = rows(events)
    assert row.PatientID == "L1"
    assert "NumberOfPatientRelatedStudies" in row
    assert row.NumberOfPatientRelatedStudies is None
    assert row.NumberOfPatientRelatedInstances is None


def test_fanout_patient_row_lists_every_site_id(
    setup: tuple[FakeReactor, Network, Federation],
) -> None:
    _, network, federation = setup
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientID = "L1"
    query.OtherPatientIDsSequence = []
    events: list[FindEvent] = []
    request = read_find(Model.PATIENT_ROOT, query, "LOCAL")
    FederatedFind(federation, request, "ISO_IR 192", events.append, "test#3").start()
    network.sites["hospital_b"].answer(PatientID="HB-1")
    network.sites["hospital_a"].answer(PatientID="HA-1")
    network.sites["local_pacs"].answer(PatientID="L1")
    # The row waits until every site responded, so it lists each site's identifier.
    assert rows(events) == []
    for site in network.sites.values():
        site.finish()

    [row] = rows(events)
    listed = [(item.PatientID, item.IssuerOfPatientID) for item in row.OtherPatientIDsSequence]
    assert listed == [("HB-1", "HOSP_B"), ("HA-1", "HOSP_A")]
    assert isinstance(events[-1], Done)
