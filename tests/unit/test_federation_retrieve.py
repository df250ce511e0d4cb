"""Planning and pulling a federated retrieve, with fake sites on a Clock."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.python.failure import Failure

from engine.dimse.scu import DimseError, MoveOutcome
from engine.federation.fanout import Federation
from engine.federation.levels import Model
from engine.federation.locations import Location, LocationMemory
from engine.federation.request import read_retrieve
from engine.federation.retrieve import (
    NOT_FOUND,
    SEVERAL_PATIENTS,
    UNREACHABLE,
    FederatedRetrieve,
    Instance,
    Retrieval,
)
from engine.federation.sitefind import SiteHandle, SitePlan
from engine.identity.resolver import TableResolver
from engine.identity.table import CrossReferenceTable
from engine.jobs.receiving import ExpectationRegistry
from engine.jobs.spool import Spool
from engine.model import Demographics, PatientIdentifier
from tests.unit.test_federation_fanout import FakeReactor, member

LOCAL = PatientIdentifier("L1", "LOCAL")
AT_A = PatientIdentifier("HA-1", "HOSP_A")
AT_B = PatientIdentifier("HB-1", "HOSP_B")
AT_A_LOCATION = Location("hospital_a", AT_A, LOCAL)
AT_B_LOCATION = Location("hospital_b", AT_B, LOCAL)


class FakeClient:
    def __init__(self, ae_title: str) -> None:
        self.node = type("Node", (), {"ae_title": ae_title})()
        self._next = 0

    def next_message_id(self) -> int:
        self._next += 1
        return self._next


class Sites:
    """Fake site work: C-FIND matches by site, counting and C-MOVE results by site."""

    def __init__(self) -> None:
        self.matches: dict[str, list[dict[str, str]]] = {}
        self.find_fails: set[str] = set()
        self.count_fails: set[str] = set()
        self.move_fails: set[str] = set()
        self.moves: list[tuple[str, PatientIdentifier]] = []
        self.registry = ExpectationRegistry("FDQR")

    def run_site(
        self, site: str, plan: SitePlan, handle: SiteHandle, emit: Callable[[Dataset], None]
    ) -> defer.Deferred[int]:
        if site in self.find_fails:
            return defer.fail(DimseError(f"association with {site} failed"))
        for values in self.matches.get(site, []):
            match = Dataset()
            for keyword, value in values.items():
                setattr(match, keyword, value)
            emit(match)
        return defer.succeed(len(self.matches.get(site, [])))

    def count(
        self, site: str, location: Location, identifier: Dataset
    ) -> defer.Deferred[list[Instance]]:
        if site in self.count_fails:
            return defer.fail(DimseError(f"C-FIND at {site} failed"))
        return defer.succeed([Instance("1.1.1", "1.2.840.10008.5.1.4.1.1.2")])

    def move(
        self, site: str, identifier: Dataset, destination: str, message_id: int
    ) -> defer.Deferred[MoveOutcome]:
        [expectation] = [e for e in self.registry._active if e.message_id == message_id]
        self.moves.append((site, expectation.stamp.remote))
        if site in self.move_fails:
            return defer.fail(DimseError(f"association with {site} failed"))
        return defer.succeed(MoveOutcome(0, 1, 0, 0, ()))


@pytest.fixture
def sites() -> Sites:
    return Sites()


@pytest.fixture
def retrieval(sites: Sites, tmp_path: Path) -> Retrieval:
    reactor = FakeReactor()
    table = CrossReferenceTable({LOCAL: {"HOSP_A": AT_A, "HOSP_B": AT_B}})
    federation = Federation(
        reactor=reactor,
        sites={
            "hospital_a": member("hospital_a", "HOSP_A"),
            "hospital_b": member("hospital_b", "HOSP_B"),
        },
        identity=lambda: TableResolver(table, "LOCAL"),
        run_site=sites.run_site,
        locations=LocationMemory(reactor.seconds, 3600),
        local_issuer="LOCAL",
        ae_title="FDQR",
        max_answers=100,
    )
    return Retrieval(
        federation=federation,
        registry=sites.registry,
        clients={"hospital_a": FakeClient("HOSP_A"), "hospital_b": FakeClient("HOSP_B")},  # type: ignore[dict-item]
        count_instances=sites.count,
        move=sites.move,
        spool=Spool(tmp_path, max_bytes=1 << 40),
    )


def study_request(model: Model = Model.STUDY_ROOT, **extra: str) -> Any:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.1"
    for keyword, value in extra.items():
        setattr(identifier, keyword, value)
    return read_retrieve(model, identifier, "LOCAL")


def result_of(deferred: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


def test_retrieve_plan_uses_remembered_sites(retrieval: Retrieval) -> None:
    retrieval.federation.locations.remember("1.1", AT_A_LOCATION)
    retrieval.federation.locations.remember("1.1", AT_B_LOCATION)
    plan = result_of(FederatedRetrieve(retrieval, study_request(), "t#1").plan())
    [item] = plan.items
    assert item.location == AT_A_LOCATION
    assert item.alternatives == (AT_B_LOCATION,)
    assert item.identifier.QueryRetrieveLevel == "STUDY"
    assert plan.total == 1


def test_retrieve_plan_asks_sites_again(retrieval: Retrieval, sites: Sites) -> None:
    sites.matches["hospital_b"] = [{"PatientID": "HB-1", "StudyInstanceUID": "1.1"}]
    plan = result_of(FederatedRetrieve(retrieval, study_request(), "t#1").plan())
    [item] = plan.items
    assert item.location == AT_B_LOCATION


def test_retrieve_plan_counts_at_next_site(retrieval: Retrieval, sites: Sites) -> None:
    retrieval.federation.locations.remember("1.1", AT_A_LOCATION)
    retrieval.federation.locations.remember("1.1", AT_B_LOCATION)
    sites.count_fails.add("hospital_a")
    plan = result_of(FederatedRetrieve(retrieval, study_request(), "t#1").plan())
    assert [item.location for item in plan.items] == [AT_B_LOCATION]


def test_retrieve_plan_unknown_study(retrieval: Retrieval) -> None:
    plan = result_of(FederatedRetrieve(retrieval, study_request(), "t#1").plan())
    assert plan.items == []
    assert plan.unavailable == {"1.1": NOT_FOUND}


def test_retrieve_uid_of_two_patients_refused(retrieval: Retrieval) -> None:
    # Two sites hold one Study Instance UID for two different local patients.
    other = Location("hospital_b", AT_B, PatientIdentifier("L2", "LOCAL"))
    retrieval.federation.locations.remember("1.1", AT_A_LOCATION)
    retrieval.federation.locations.remember("1.1", other)
    plan = result_of(FederatedRetrieve(retrieval, study_request(), "t#1").plan())
    assert plan.items == []
    assert plan.unavailable == {"1.1": SEVERAL_PATIENTS}


def test_retrieve_plan_names_sites_not_reachable(retrieval: Retrieval, sites: Sites) -> None:
    # Nothing remembered, and the lookup by Study Instance UID reaches no site.
    sites.find_fails.update({"hospital_a", "hospital_b"})
    plan = result_of(FederatedRetrieve(retrieval, study_request(), "t#1").plan())
    assert plan.items == []
    assert plan.unavailable == {"1.1": f"{UNREACHABLE}: hospital_a, hospital_b"}


def test_retrieve_plan_other_patient_not_sent(retrieval: Retrieval) -> None:
    other = PatientIdentifier("L2", "LOCAL")
    retrieval.federation.locations.remember("1.1", Location("hospital_a", AT_A, other))
    request = study_request(Model.PATIENT_ROOT, PatientID="L1")
    plan = result_of(FederatedRetrieve(retrieval, request, "t#1").plan())
    assert plan.items == []


def test_retrieve_pull_tries_next_site(retrieval: Retrieval, sites: Sites) -> None:
    retrieval.federation.locations.remember("1.1", AT_A_LOCATION)
    retrieval.federation.locations.remember("1.1", AT_B_LOCATION)
    sites.move_fails.add("hospital_a")
    retrieve = FederatedRetrieve(retrieval, study_request(), "t#1")
    [item] = result_of(retrieve.plan()).items
    spool = result_of(retrieve.pull(item))
    assert sites.moves == [("hospital_a", AT_A), ("hospital_b", AT_B)]
    assert spool == retrieve.spool_dir / "1.1"
    assert sites.registry._active == []


def test_retrieve_clean_up_frees_spool(retrieval: Retrieval) -> None:
    retrieval.federation.locations.remember("1.1", AT_A_LOCATION)
    retrieve = FederatedRetrieve(retrieval, study_request(), "t#1")
    [item] = result_of(retrieve.plan()).items
    spool = result_of(retrieve.pull(item))
    # The Storage SCP reserves each received object's size in the spool.
    spool.mkdir(parents=True)
    retrieval.spool.reserve(10)
    (spool / "1.1.1.dcm").write_bytes(b"x" * 10)

    retrieve.clean_up()

    assert not retrieve.spool_dir.exists()
    assert retrieval.spool.used_bytes == 0


def test_retrieve_pull_checks_objects_against_local_record(
    retrieval: Retrieval, sites: Sites
) -> None:
    record = Demographics("DOE^JANE", "19650312", "F")
    retrieval.federation = dataclasses.replace(
        retrieval.federation, demographics=lambda patient: defer.succeed(record)
    )
    retrieval.federation.locations.remember("1.1", AT_A_LOCATION)
    checked: list[Demographics | None] = []
    move = sites.move

    def move_and_look(*args: Any) -> defer.Deferred[MoveOutcome]:
        [expectation] = sites.registry._active
        checked.append(expectation.demographics)
        return move(*args)

    retrieval.move = move_and_look
    retrieve = FederatedRetrieve(retrieval, study_request(), "t#1")
    [item] = result_of(retrieve.plan()).items
    result_of(retrieve.pull(item))
    assert checked == [record]


def test_retrieve_pull_fails_when_every_site_fails(retrieval: Retrieval, sites: Sites) -> None:
    retrieval.federation.locations.remember("1.1", AT_A_LOCATION)
    sites.move_fails.add("hospital_a")
    retrieve = FederatedRetrieve(retrieval, study_request(), "t#1")
    [item] = result_of(retrieve.plan()).items
    with pytest.raises(DimseError):
        result_of(retrieve.pull(item))
    assert sites.moves == [("hospital_a", AT_A)]
