"""Worklist items, the poll window, and the poller's new, seen, removed and failed steps."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from twisted.internet import defer, task

from engine.config import WorklistSettings, WorklistSource
from engine.dimse.scu import DimseError
from engine.dimse.worklist import MalformedItem, read_item, worklist_query
from engine.hl7.events import IdentifierPolicy
from engine.jobs.planner import Planner
from engine.jobs.store import JobState
from engine.rules.loader import load_rule_set
from engine.testing.dicomgen import PatientSpec
from engine.testing.worklist import ScheduledStep, step_dataset
from engine.worklist import orders
from engine.worklist.poller import WorklistPoller
from tests.fakes import ImmediateStore

REPOSITORY = Path(__file__).resolve().parents[2]
POLICY = IdentifierPolicy("LOCAL", frozenset({"LOCAL"}))
PATIENT = PatientSpec("L12345", "LOCAL", "DOE^JANE", "19650312", "F")
NOW = dt.datetime(2026, 3, 14, 9, 0)


def step(
    step_id: str, hours_ahead: float, modality: str = "CT", station: str = "CT1"
) -> ScheduledStep:
    return ScheduledStep(
        step_id=step_id,
        accession=f"ACC-{step_id}",
        patient=PATIENT,
        start=NOW + dt.timedelta(hours=hours_ahead),
        modality=modality,
        station_ae_title=station,
        procedure_code="CTCHEST",
        procedure_meaning="CT Chest",
    )


def test_query_covers_window_days() -> None:
    query = worklist_query(NOW, NOW + dt.timedelta(hours=20), modality="CT", station="CT1")
    item = query.ScheduledProcedureStepSequence[0]
    assert item.ScheduledProcedureStepStartDate == "20260314-20260315"
    assert item.Modality == "CT"
    assert item.ScheduledStationAETitle == "CT1"
    assert query.PatientID == ""
    assert "AccessionNumber" in query


def test_read_item_fields() -> None:
    item = read_item(step_dataset(step("S1", 2)))
    assert item.key == "S1|ACC-S1"
    assert item.accession_number == "ACC-S1"
    assert item.start == NOW + dt.timedelta(hours=2)
    assert item.modality == "CT"
    assert item.procedure_code == "CTCHEST"
    assert item.procedure_text == "CT Chest"
    assert item.demographics.name == "DOE^JANE"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda ds: delattr(ds, "ScheduledProcedureStepSequence"), "no Scheduled Procedure Step"),
        (lambda ds: setattr(ds, "PatientID", ""), "no Patient ID"),
        (
            lambda ds: (
                setattr(ds, "AccessionNumber", ""),
                setattr(ds.ScheduledProcedureStepSequence[0], "ScheduledProcedureStepID", ""),
            ),
            "neither",
        ),
        (lambda ds: setattr(ds, "PatientID", ["L1", "L2"]), "Patient ID has more than one"),
        (lambda ds: setattr(ds, "PatientID", "L" * 65), "Patient ID is longer than 64"),
        (lambda ds: setattr(ds, "PatientID", "L1\x07"), "Patient ID contains a control"),
    ],
)
def test_read_item_malformed(change: Callable[[Dataset], Any], reason: str) -> None:
    ds = step_dataset(step("S1", 2))
    change(ds)
    with pytest.raises(MalformedItem, match=reason):
        read_item(ds)


def test_order_from_other_domain_refused() -> None:
    foreign = ScheduledStep(
        "S9", "A9", PatientSpec("X1", "HOSP_A", "X^Y", "", ""), NOW, "CT", "CT1", "C", "C"
    )
    with pytest.raises(MalformedItem, match="not the local domain"):
        orders.placed("ris_mwl", read_item(step_dataset(foreign)), POLICY)


def test_order_event_names_step_and_start() -> None:
    event = orders.placed("ris_mwl", read_item(step_dataset(step("S1", 2))), POLICY)
    assert event.origin.message_type == "MWL"
    assert event.origin.sending_application == "ris_mwl"
    assert event.origin.control_id == "S1|ACC-S1@202603141100/L12345"
    assert event.order.accession_number == "ACC-S1"
    assert event.order.ordered_modality == "CT"
    assert event.patient.issuer == "LOCAL"


class ScriptedPools:
    """Node pools whose worklist C-FIND returns the test's answers for the queried modality, or fails."""

    def __init__(self) -> None:
        self.answers: list[Dataset] = []
        self.failure: Exception | None = None
        self.queries: list[Dataset] = []

    def run(
        self, node: str, function: Any, client: Any, query: Dataset
    ) -> defer.Deferred[list[Dataset]]:
        self.queries.append(query)
        if self.failure is not None:
            return defer.fail(self.failure)
        modality = query.ScheduledProcedureStepSequence[0].Modality
        return defer.succeed(
            [
                answer
                for answer in self.answers
                if not modality or answer.ScheduledProcedureStepSequence[0].Modality == modality
            ]
        )


@pytest.fixture
def clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(NOW.timestamp())
    return clock


@pytest.fixture
def poller(db: ImmediateStore, clock: task.Clock) -> tuple[WorklistPoller, ScriptedPools]:
    rule_set = load_rule_set(REPOSITORY / "routes", REPOSITORY / "rules")
    planner = Planner(
        lambda: rule_set, now=lambda: dt.datetime.fromtimestamp(clock.seconds(), dt.UTC)
    )
    pools = ScriptedPools()
    settings = WorklistSettings(
        sources=[WorklistSource(node="ris_mwl", modalities=["CT", "MR"])],
        poll_seconds=60,
        look_ahead_hours=24,
        grace_minutes=30,
    )
    poller = WorklistPoller(settings, {"ris_mwl": None}, pools, db, planner, POLICY, clock)  # type: ignore[arg-type,dict-item]
    return poller, pools


def poll(poller: WorklistPoller) -> Any:
    results: list[Any] = []
    poller.poll_all().addCallback(results.extend)
    assert len(results) == 1
    return results[0]


def test_poll_creates_jobs_for_steps_in_window(
    poller: tuple[WorklistPoller, ScriptedPools], db: ImmediateStore
) -> None:
    worklist, pools = poller
    pools.answers = [
        step_dataset(step("S1", 2)),
        step_dataset(step("S2", 30)),
        step_dataset(step("S3", 2, modality="US")),
        step_dataset(step("S4", -2)),
    ]
    broken = step_dataset(step("S5", 3))
    broken.PatientID = ""
    pools.answers.append(broken)

    result = poll(worklist)
    assert result.error == ""
    assert [item.key for item in result.items] == ["S1|ACC-S1"]
    assert result.outside_window == 2
    assert result.malformed == ["step S5|ACC-S5: no Patient ID"]
    [job] = db.store.list_jobs()
    assert job.route == "worklist-orders"
    assert job.rule == "ct-priors"
    assert job.order.accession_number == "ACC-S1"
    # One query per modality filter; the window covers today and tomorrow.
    assert [q.ScheduledProcedureStepSequence[0].Modality for q in pools.queries] == ["CT", "MR"]


def test_poll_again_creates_nothing(
    poller: tuple[WorklistPoller, ScriptedPools], db: ImmediateStore
) -> None:
    worklist, pools = poller
    pools.answers = [step_dataset(step("S1", 2))]
    poll(worklist)
    second = poll(worklist)
    assert [item.key for item in second.already_seen] == ["S1|ACC-S1"]
    assert second.new_orders == []
    assert len(db.store.list_jobs()) == 1


def test_removed_step_becomes_cancel(
    poller: tuple[WorklistPoller, ScriptedPools], db: ImmediateStore
) -> None:
    worklist, pools = poller
    pools.answers = [step_dataset(step("S1", 2)), step_dataset(step("S2", 4))]
    poll(worklist)
    pools.answers = [step_dataset(step("S2", 4))]
    result = poll(worklist)
    assert [item.key for item, _ in result.removed] == ["S1|ACC-S1"]
    cancel = db.store.list_messages()[0]
    assert cancel.origin.message_type == "MWL"
    assert cancel.origin.control_id.startswith("S1|ACC-S1@202603141100/L12345/removed@")
    assert "order cancel (ORC-1 CA)" in cancel.outcome
    # Removed once: the next poll does not cancel it again.
    assert poll(worklist).removed == []


def test_rescheduled_step_cancels_old_and_orders_new(
    poller: tuple[WorklistPoller, ScriptedPools], db: ImmediateStore
) -> None:
    worklist, pools = poller
    pools.answers = [step_dataset(step("S1", 2))]
    poll(worklist)
    pools.answers = [step_dataset(step("S1", 5))]
    result = poll(worklist)
    assert [item.key for item, _ in result.new_orders] == ["S1|ACC-S1"]
    control_ids = [message.origin.control_id for message in db.store.list_messages()]
    assert control_ids[0] == "S1|ACC-S1@202603141400/L12345"
    assert control_ids[1].startswith("S1|ACC-S1@202603141100/L12345/removed@")
    assert len(db.store.list_jobs()) == 2


def test_failed_poll_is_reported_and_next_poll_works(
    poller: tuple[WorklistPoller, ScriptedPools], db: ImmediateStore
) -> None:
    worklist, pools = poller
    pools.failure = DimseError("association with ris_mwl failed")
    failed = poll(worklist)
    assert failed.error == "association with ris_mwl failed"
    assert db.store.list_messages() == []
    pools.failure = None
    pools.answers = [step_dataset(step("S1", 2))]
    assert [item.key for item, _ in poll(worklist).new_orders] == ["S1|ACC-S1"]


def test_dry_run_stores_nothing(
    poller: tuple[WorklistPoller, ScriptedPools], db: ImmediateStore
) -> None:
    worklist, pools = poller
    pools.answers = [step_dataset(step("S1", 2))]
    results: list[Any] = []
    worklist.poll_all(dry_run=True).addCallback(results.extend)
    [result] = results
    [(item, outcome)] = result.new_orders
    assert item.key == "S1|ACC-S1"
    assert outcome == "route worklist-orders: 1 job(s) for rules ct-priors"
    assert db.store.list_messages() == []
    assert db.store.list_jobs() == []


def test_poller_timer_does_not_overlap_polls(
    poller: tuple[WorklistPoller, ScriptedPools], clock: task.Clock
) -> None:
    worklist, pools = poller
    slow: defer.Deferred[list[Dataset]] = defer.Deferred()
    calls: list[int] = []

    def run(node: str, function: Any, client: Any, query: Dataset) -> defer.Deferred[list[Dataset]]:
        calls.append(1)
        return slow

    pools.run = run  # type: ignore[method-assign]
    worklist.start()
    clock.advance(60)
    clock.advance(60)
    assert len(calls) == 1
    slow.callback([])
    clock.advance(60)
    assert len(calls) >= 2
    stopped = worklist.stop()
    assert stopped.called
    assert clock.getDelayedCalls() == []


OTHER = PatientSpec("L67890", "LOCAL", "ROE^RICHARD", "19700101", "M")


def test_shared_step_id_two_jobs(
    poller: tuple[WorklistPoller, ScriptedPools], db: ImmediateStore
) -> None:
    # An SPS ID is unique only within its requested procedure: both RIS orders use 1.
    worklist, pools = poller
    first = dataclasses.replace(step("1", 2), accession="ACC-A")
    second = dataclasses.replace(step("1", 2), accession="ACC-B", patient=OTHER)
    pools.answers = [step_dataset(first), step_dataset(second)]
    result = poll(worklist)
    assert sorted(item.key for item in result.items) == ["1|ACC-A", "1|ACC-B"]
    jobs = sorted((job.patient.value, job.order.accession_number) for job in db.store.list_jobs())
    assert jobs == [("L12345", "ACC-A"), ("L67890", "ACC-B")]
    assert poll(worklist).new_orders == []


def test_step_moved_to_another_patient_is_reordered(
    poller: tuple[WorklistPoller, ScriptedPools], db: ImmediateStore
) -> None:
    worklist, pools = poller
    pools.answers = [step_dataset(step("S1", 2))]
    poll(worklist)
    # The RIS corrected the patient; SPS ID, accession number and start are unchanged.
    pools.answers = [step_dataset(dataclasses.replace(step("S1", 2), patient=OTHER))]
    result = poll(worklist)
    assert [item.patient_id for item, _ in result.new_orders] == ["L67890"]
    states = {job.patient.value: job.state for job in db.store.list_jobs()}
    assert states == {"L12345": JobState.CANCELLED, "L67890": JobState.QUEUED}


def test_step_recorded_by_earlier_version_is_known(
    poller: tuple[WorklistPoller, ScriptedPools], db: ImmediateStore
) -> None:
    worklist, pools = poller
    pools.answers = [step_dataset(step("S1", 2))]
    poll(worklist)
    # Earlier versions stored a step under its SPS ID alone.
    with db.store.transaction() as connection:
        connection.execute("UPDATE worklist_steps SET step_key = 'S1'")
    result = poll(worklist)
    assert [item.key for item in result.already_seen] == ["S1|ACC-S1"]
    assert result.new_orders == []
    assert result.removed == []
    with db.store.transaction() as connection:
        keys = [row[0] for row in connection.execute("SELECT step_key FROM worklist_steps")]
    assert keys == ["S1|ACC-S1"]


def test_step_turned_malformed_keeps_its_order(
    poller: tuple[WorklistPoller, ScriptedPools], db: ImmediateStore
) -> None:
    worklist, pools = poller
    pools.answers = [step_dataset(step("S1", 2))]
    poll(worklist)
    # The RIS blanked the patient ID while editing the step.
    edited = step_dataset(step("S1", 2))
    edited.PatientID = ""
    pools.answers = [edited]
    result = poll(worklist)
    assert result.malformed == ["step S1|ACC-S1: no Patient ID"]
    assert result.removed == []
    [job] = db.store.list_jobs()
    assert job.state == JobState.QUEUED
    # Once it is gone from the worklist, its order is cancelled.
    pools.answers = []
    assert [item.key for item, _ in poll(worklist).removed] == ["S1|ACC-S1"]


def test_removed_step_back_is_ordered_again(
    poller: tuple[WorklistPoller, ScriptedPools], db: ImmediateStore
) -> None:
    worklist, pools = poller
    pools.answers = [step_dataset(step("S1", 2))]
    poll(worklist)
    pools.answers = []
    poll(worklist)
    assert [job.state for job in db.store.list_jobs()] == [JobState.CANCELLED]

    pools.answers = [step_dataset(step("S1", 2))]
    result = poll(worklist)

    assert [item.key for item, _ in result.new_orders] == ["S1|ACC-S1"]
    states = sorted(job.state.value for job in db.store.list_jobs())
    assert states == ["cancelled", "queued"]
    newest = db.store.list_messages()[0]
    assert newest.origin.control_id == "S1|ACC-S1@202603141100/L12345/again@20260314090000"


def test_changed_modality_orders_step_again(
    poller: tuple[WorklistPoller, ScriptedPools], db: ImmediateStore
) -> None:
    worklist, pools = poller
    pools.answers = [step_dataset(step("S1", 2))]
    poll(worklist)
    pools.answers = [step_dataset(step("S1", 2, modality="MR"))]

    result = poll(worklist)

    assert [item.key for item, _ in result.new_orders] == ["S1|ACC-S1"]
    assert [job.order.ordered_modality for job in db.store.list_jobs()] == ["CT"]
    assert [job.state for job in db.store.list_jobs()] == [JobState.CANCELLED]


def test_malformed_reason_found_when_applied_is_logged(
    poller: tuple[WorklistPoller, ScriptedPools], caplog: pytest.LogCaptureFixture
) -> None:
    worklist, pools = poller
    foreign = step_dataset(step("S1", 2))
    foreign.IssuerOfPatientID = "HOSP_A"
    pools.answers = [foreign]
    with caplog.at_level(logging.WARNING, logger="engine.worklist.poller"):
        result = poll(worklist)
    assert result.malformed == [
        "step S1|ACC-S1: patient ID issuer 'HOSP_A' is not the local domain"
    ]
    assert (
        "worklist ris_mwl: skipped 1 malformed item(s): step S1|ACC-S1: patient ID issuer"
        " 'HOSP_A' is not the local domain"
    ) in caplog.messages
