"""Timing rules on an injected clock: lead time, quiet hours, cancels, suppression, deferral."""

from __future__ import annotations

import datetime as dt
import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from engine.hl7.events import IdentifierPolicy
from engine.hl7.intake import Intake
from engine.identity import records
from engine.jobs.planner import Planner
from engine.jobs.policy import RetrieveSlots, SourcePolicy
from engine.jobs.prefetch import Outcome
from engine.jobs.store import JobState, NewJob
from engine.jobs.worker import Worker
from engine.model import Demographics, OrderFacts, PatientIdentifier
from engine.rules.loader import load_rule_set
from engine.rules.model import RuleSet
from engine.rules.timing import (
    LocalZone,
    QuietWindow,
    fetch_time,
    parse_days,
    parse_hours,
    parse_timespan,
    quiet_decision,
)
from engine.testing.dicomgen import PatientSpec
from engine.testing.scenario import order_message
from tests.conftest import NOW
from tests.fakes import ImmediateStore
from tests.unit.test_jobs import ScriptedRunner

PATIENT = PatientSpec("L1", "LOCAL", "DOE^JANE", "19650312", "F")
POLICY = IdentifierPolicy(issuer="LOCAL", authorities=frozenset({"LOCAL"}))
UTC = LocalZone("UTC")
ROUTES = """
routes:
  - name: ris
    match: {sending_application: RIS}
    sources: [a]
    destination: local
    timing: {fetch: before_scheduled_time, lead_time: 2h}
  - name: now
    match: {sending_application: NOW}
    sources: [a]
    destination: local
"""
RULES = """
rules:
  - name: ct
    when: {ordered_modality: CT}
    select: {modalities: CT, lookback: 5y, max_studies: 2}
    suppression_window: 24h
  - name: mr
    when: {ordered_modality: MR}
    select: {modalities: MR, lookback: 5y, max_studies: 2}
  - name: appointment
    when: {message_type: SIU^S12}
    select: {modalities: CT, lookback: 5y, max_studies: 2}
"""


@pytest.fixture
def rule_set(tmp_path: Path) -> RuleSet:
    for name, text in (("routes", ROUTES), ("rules", RULES)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.yaml").write_text(textwrap.dedent(text))
    return load_rule_set(tmp_path / "routes", tmp_path / "rules")


@pytest.fixture
def clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(NOW.timestamp())
    return clock


def now_of(clock: task.Clock) -> dt.datetime:
    return dt.datetime.fromtimestamp(clock.seconds(), dt.UTC)


def make_intake(db: ImmediateStore, rule_set: RuleSet, clock: task.Clock) -> Intake:
    planner = Planner(lambda: rule_set, now=lambda: now_of(clock), zone=UTC)
    return Intake(db, planner, POLICY, now=lambda: now_of(clock))  # type: ignore[arg-type]


def start_worker(db: ImmediateStore, clock: task.Clock) -> tuple[ScriptedRunner, Worker]:
    """Start a worker whose job attempts the test answers through the runner."""
    runner = ScriptedRunner()
    worker = Worker(db, runner, clock, poll_seconds=5)  # type: ignore[arg-type]
    worker.start()
    return runner, worker


def send(intake: Intake, message: bytes) -> str:
    """Return the MSA segment of the one ACK sent for a message."""
    fired: list[Sequence[bytes]] = []
    intake.handle_message(message, "peer").addCallback(fired.append)
    assert fired, "the ACK has not fired"
    [ack] = fired[0]
    return ack.decode().split("\r")[1]


def order(
    control_id: str,
    accession: str,
    scheduled: dt.datetime | None = None,
    modality: str = "CT",
    order_control: str = "NW",
    application: str = "RIS",
) -> bytes:
    text = order_message(
        PATIENT,
        control_id,
        accession,
        NOW.replace(tzinfo=None),
        modality=modality,
        order_control=order_control,
        sending_application=application,
    )
    if scheduled is not None:
        text += f"TQ1|1||||||{scheduled:%Y%m%d%H%M%S%z}\r".encode()
    return text


# Spans and lead times


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("90min", 5400), ("24h", 86400), ("2d", 172800), ("1W", 604800)],
)
def test_parse_timespan(text: str, seconds: int) -> None:
    assert parse_timespan(text) == dt.timedelta(seconds=seconds)


def test_parse_timespan_rejects_months() -> None:
    with pytest.raises(ValueError, match="write min for minutes"):
        parse_timespan("30m")
    with pytest.raises(ValueError, match="invalid time span '2 hours'"):
        parse_timespan("2 hours")


def test_fetch_time_rules() -> None:
    lead = dt.timedelta(hours=2)
    later = NOW + dt.timedelta(hours=5)
    assert fetch_time(NOW, later, None).not_before == NOW
    at_lead = fetch_time(NOW, later, lead)
    assert at_lead.not_before == NOW + dt.timedelta(hours=3)
    assert at_lead.reason == (
        "fetch at 2026-03-14T12:30:00+00:00: 2h before 2026-03-14T14:30:00+00:00"
    )
    # Never after the scheduled time: closer than the lead time, or past, is now.
    soon = fetch_time(NOW, NOW + dt.timedelta(minutes=30), lead)
    assert soon.not_before == NOW
    assert "less than 2h away" in soon.reason
    assert fetch_time(NOW, NOW - dt.timedelta(days=1), lead).not_before == NOW
    assert fetch_time(NOW, None, lead).reason == "fetch now: the order has no scheduled time"


# Quiet hours


def test_parse_days_and_hours() -> None:
    assert parse_days("mon-fri") == frozenset(range(5))
    assert parse_days("fri-mon") == frozenset({4, 5, 6, 0})
    assert parse_days(["sat", "sun"]) == parse_days("weekend")
    assert parse_days("daily") == frozenset(range(7))
    with pytest.raises(ValueError, match="invalid days"):
        parse_days("monday")
    assert parse_hours("22:00-06:00") == (dt.time(22), dt.time(6))
    with pytest.raises(ValueError, match="invalid hours '7-19'"):
        parse_hours("7-19")


def test_quiet_hours_block_until_end() -> None:
    window = QuietWindow(parse_days("mon-fri"), dt.time(7), dt.time(19))
    saturday = dt.datetime(2026, 3, 14, 9, 30, tzinfo=dt.UTC)
    monday = dt.datetime(2026, 3, 16, 9, 30, tzinfo=dt.UTC)
    assert quiet_decision([window], UTC, saturday, 10).allowed
    blocked = quiet_decision([window], UTC, monday, 10)
    assert not blocked.allowed
    assert blocked.until == dt.datetime(2026, 3, 16, 19, 0, tzinfo=dt.UTC)
    assert blocked.reason.startswith("quiet hours mon,tue,wed,thu,fri 07:00-19:00: no retrieves")
    evening = dt.datetime(2026, 3, 16, 19, 0, tzinfo=dt.UTC)
    assert quiet_decision([window], UTC, evening, 10).allowed


def test_quiet_hours_allow_small_studies() -> None:
    window = QuietWindow(parse_days("daily"), dt.time(7), dt.time(19), max_instances=50)
    assert quiet_decision([window], UTC, NOW, 50).allowed
    assert not quiet_decision([window], UTC, NOW, 51).allowed
    unknown = quiet_decision([window], UTC, NOW, None)
    assert not unknown.allowed
    assert "instance count is unknown" in unknown.reason


def test_quiet_hours_overnight_and_chained() -> None:
    night = QuietWindow(parse_days("fri"), dt.time(22), dt.time(6))
    morning = QuietWindow(parse_days("sat"), dt.time(6), dt.time(8))
    saturday_early = dt.datetime(2026, 3, 14, 3, 0, tzinfo=dt.UTC)
    decision = quiet_decision([night, morning], UTC, saturday_early, 1)
    assert decision.until == dt.datetime(2026, 3, 14, 8, 0, tzinfo=dt.UTC)


def test_quiet_hours_in_local_time() -> None:
    paris = LocalZone("Europe/Paris")
    window = QuietWindow(parse_days("daily"), dt.time(7), dt.time(19))
    # 06:30 UTC is 07:30 in Paris in March (UTC+1).
    decision = quiet_decision([window], paris, dt.datetime(2026, 3, 14, 6, 30, tzinfo=dt.UTC), 1)
    assert not decision.allowed
    assert decision.until == dt.datetime(2026, 3, 14, 18, 0, tzinfo=dt.UTC)


# Planner, store and worker on an injected clock


def test_lead_time_sets_not_before(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    scheduled = NOW + dt.timedelta(hours=6)
    assert send(intake, order("M1", "A1", scheduled)) == "MSA|AA|M1"
    [job] = db.store.list_jobs()
    assert job.state == JobState.QUEUED
    assert job.not_before == NOW + dt.timedelta(hours=4)
    assert job.order.scheduled_time == scheduled
    assert db.store.events(job.id)[0][1].startswith(
        "queued by route ris, rule ct; fetch at 2026-03-14T13:30:00+00:00: 2h before"
    )


def test_appointment_start_sets_not_before(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    start = NOW + dt.timedelta(hours=6)
    message = (
        f"MSH|^~\\&|RIS|RAD|FDQR|LOCAL|{NOW:%Y%m%d%H%M%S}||SIU^S12|S1|P|2.5\r"
        f"SCH|APT-1|FAPT-1|||||||||^^30^{start:%Y%m%d%H%M%S%z}\r"
        "PID|1||L1^^^LOCAL^MR||DOE^JANE||19650312|F\r"
    ).encode()
    assert send(intake, message) == "MSA|AA|S1"
    [job] = db.store.list_jobs()
    assert job.rule == "appointment"
    assert job.order.scheduled_time == start
    assert job.not_before == NOW + dt.timedelta(hours=4)


def test_invalid_scheduled_time_fetches_now_and_says_why(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    message = order("M1", "A1") + b"TQ1|1||||||tomorrow\r"
    assert send(intake, message) == "MSA|AA|M1"
    [job] = db.store.list_jobs()
    assert job.not_before == NOW
    assert db.store.events(job.id)[0][1] == (
        "queued by route ris, rule ct; fetch now: the order has no scheduled time"
        " (TQ1-7 is not a valid timestamp)"
    )


def test_route_without_lead_time_fetches_now(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    send(intake, order("M1", "A1", NOW + dt.timedelta(hours=6), application="NOW"))
    [job] = db.store.list_jobs()
    assert job.not_before == NOW


def test_cancel_before_lead_time_never_runs(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    runner, worker = start_worker(db, clock)
    send(intake, order("M1", "A1", NOW + dt.timedelta(hours=3)))
    clock.advance(1800)
    assert send(intake, order("M2", "A1", order_control="CA")) == "MSA|AA|M2"
    [job] = db.store.list_jobs()
    assert job.state == JobState.CANCELLED
    assert job.summary == "order cancelled (ORC-1 CA) by message M2"
    assert db.store.list_messages()[0].outcome == "order cancel (ORC-1 CA); cancelled job(s) 1"
    clock.pump([5] * 2000)
    assert runner.calls == []
    worker.stop()


def test_cancel_without_job_is_noted(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    send(intake, order("M2", "NONE", order_control="DC"))
    assert db.store.list_messages()[0].outcome == "order cancel (ORC-1 DC); no job for this order"


def test_job_runs_at_lead_time(db: ImmediateStore, rule_set: RuleSet, clock: task.Clock) -> None:
    intake = make_intake(db, rule_set, clock)
    runner, worker = start_worker(db, clock)
    send(intake, order("M1", "A1", NOW + dt.timedelta(hours=3)))
    clock.pump([5] * 700)
    assert runner.calls == []
    clock.pump([5] * 30)
    assert len(runner.calls) == 1
    assert now_of(clock) >= NOW + dt.timedelta(hours=1)
    runner.pending[0].callback(Outcome(JobState.DONE, "ok"))
    worker.stop()


def test_cancel_of_running_job_ends_it_cancelled(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    runner, worker = start_worker(db, clock)
    send(intake, order("M1", "A1"))
    clock.advance(0)
    assert len(runner.calls) == 1
    send(intake, order("M2", "A1", order_control="CA"))
    job = db.store.get_job(runner.calls[0].id)
    assert job is not None
    assert job.state == JobState.RUNNING
    assert db.store.cancellation(job.id) == "order cancelled (ORC-1 CA) by message M2"
    # The attempt ends with a transient failure; the cancel stops the retry.
    runner.pending[0].callback(Outcome(JobState.FAILED, "source down", retry=True))
    job = db.store.get_job(job.id)
    assert job is not None
    assert job.state == JobState.CANCELLED
    assert job.summary == "order cancelled (ORC-1 CA) by message M2; source down"
    worker.stop()


def jobs_by_id(db: ImmediateStore) -> list[Any]:
    return sorted(db.store.list_jobs(), key=lambda job: job.id)


def test_changed_schedule_replaces_job(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    send(intake, order("M1", "A1", NOW + dt.timedelta(hours=3)))
    assert send(intake, order("M2", "A1", NOW + dt.timedelta(hours=8), order_control="XO")) == (
        "MSA|AA|M2"
    )
    old, new = jobs_by_id(db)
    assert old.state == JobState.CANCELLED
    assert old.summary == "order changed (ORC-1 XO) by message M2"
    assert new.state == JobState.QUEUED
    assert new.not_before == NOW + dt.timedelta(hours=6)
    assert db.store.list_messages()[0].outcome == (
        f"order change (ORC-1 XO): route ris: 1 job(s) for rules ct; cancelled job(s) {old.id}"
    )


def test_changed_procedure_gets_new_rule(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    send(intake, order("M1", "A1", NOW + dt.timedelta(hours=3)))
    send(intake, order("M2", "A1", NOW + dt.timedelta(hours=3), "MR", order_control="XO"))
    old, new = jobs_by_id(db)
    assert (old.rule, old.state) == ("ct", JobState.CANCELLED)
    assert (new.rule, new.state) == ("mr", JobState.QUEUED)


def test_change_without_rule_cancels(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    send(intake, order("M1", "A1", NOW + dt.timedelta(hours=3)))
    send(intake, order("M2", "A1", NOW + dt.timedelta(hours=3), "US", order_control="XO"))
    [job] = db.store.list_jobs()
    assert job.state == JobState.CANCELLED


def test_change_keeps_running_job(db: ImmediateStore, rule_set: RuleSet, clock: task.Clock) -> None:
    intake = make_intake(db, rule_set, clock)
    runner, worker = start_worker(db, clock)
    send(intake, order("M1", "A1"))
    clock.advance(0)
    [running] = runner.calls
    send(intake, order("M2", "A1", order_control="XO"))
    old, new = jobs_by_id(db)
    assert old.state == JobState.RUNNING
    assert db.store.cancellation(old.id) is None
    assert new.state == JobState.SUPPRESSED
    assert new.summary == f"repeated order: job {running.id} already covers this order"
    assert f"running job(s) {old.id} continue" in db.store.list_messages()[0].outcome
    runner.pending[0].callback(Outcome(JobState.DONE, "ok"))
    worker.stop()


def test_change_cancels_old_repeats(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    later = NOW + dt.timedelta(hours=3)
    send(intake, order("M1", "A1", later, "MR"))
    send(intake, order("M2", "A1", later, "MR"))
    send(intake, order("M3", "A1", later + dt.timedelta(hours=1), "MR", order_control="XO"))
    first, repeat, new = jobs_by_id(db)
    # The repeat carries the old order's facts, so it is cancelled, not requeued.
    assert (first.state, repeat.state) == (JobState.CANCELLED, JobState.CANCELLED)
    assert new.state == JobState.QUEUED
    assert new.not_before == later + dt.timedelta(hours=1) - dt.timedelta(hours=2)


def test_repeated_order_is_suppressed(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    intake = make_intake(db, rule_set, clock)
    send(intake, order("M1", "A1", modality="MR"))
    # Same accession, new control id: the RIS sent the order again.
    send(intake, order("M2", "A1", modality="MR"))
    first, second = sorted(db.store.list_jobs(), key=lambda job: job.id)
    assert first.state == JobState.QUEUED
    assert second.state == JobState.SUPPRESSED
    assert second.summary == f"repeated order: job {first.id} already covers this order"
    assert f"job {second.id} (rule {second.rule}) created as suppressed: repeated order" in (
        caplog.text
    )
    # A different order of the same rule without a suppression window gets a job.
    send(intake, order("M3", "A3", modality="MR"))
    assert db.store.list_jobs()[0].state == JobState.QUEUED


def test_suppression_window_per_patient_and_rule(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    send(intake, order("M1", "A1"))
    clock.advance(23 * 3600)
    send(intake, order("M2", "A2"))
    second = db.store.list_jobs()[0]
    assert second.state == JobState.SUPPRESSED
    assert "within the suppression window" in second.summary
    clock.advance(3600 + 1)
    send(intake, order("M3", "A3"))
    assert db.store.list_jobs()[0].state == JobState.QUEUED


def test_cancel_after_merge_finds_order(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    # An order under L1, then a merge of L1 into L9. A cancel under either ID finds the job.
    intake = make_intake(db, rule_set, clock)
    survivor = PatientIdentifier("L9", "LOCAL")
    for control, cancel_id in (("C1", "L9"), ("C2", "L1")):
        send(intake, order(f"N{control}", f"A{control}"))
        [job] = [job for job in db.store.list_jobs() if job.order.accession_number == f"A{control}"]
        if cancel_id == "L9":
            records.merge(db.store, survivor, PatientIdentifier("L1", "LOCAL"), NOW, "M1")
        cancel = order(control, f"A{control}", order_control="CA").replace(
            b"L1^^^LOCAL", f"{cancel_id}^^^LOCAL".encode()
        )
        assert send(intake, cancel) == f"MSA|AA|{control}"
        assert db.store.get_job(job.id).state == JobState.CANCELLED  # type: ignore[union-attr]


def test_cancelled_job_requeues_the_one_it_suppressed(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    send(intake, order("M1", "A1", NOW + dt.timedelta(hours=5)))
    send(intake, order("M2", "A2", NOW + dt.timedelta(hours=5)))
    send(intake, order("M3", "A3", NOW + dt.timedelta(hours=5)))
    first, second, third = sorted(db.store.list_jobs(), key=lambda job: job.id)
    assert (second.state, third.state) == (JobState.SUPPRESSED, JobState.SUPPRESSED)
    send(intake, order("M4", "A1", order_control="CA"))
    assert db.store.list_messages()[0].outcome == (
        f"order cancel (ORC-1 CA); cancelled job(s) {first.id}; requeued suppressed job(s) {second.id}"
    )
    states = {job.id: job.state for job in db.store.list_jobs()}
    assert states == {
        first.id: JobState.CANCELLED,
        second.id: JobState.QUEUED,
        third.id: JobState.SUPPRESSED,
    }
    # The third is now held by the second: cancelling the second requeues it.
    send(intake, order("M5", "A2", order_control="CA"))
    assert db.store.get_job(third.id).state == JobState.QUEUED  # type: ignore[union-attr]


def test_cancel_cancels_repeat_of_same_order(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    # The order sent twice: the second job is suppressed as a repeat. A cancel ends both.
    intake = make_intake(db, rule_set, clock)
    send(intake, order("M1", "A1", NOW + dt.timedelta(hours=5)))
    send(intake, order("M2", "A1", NOW + dt.timedelta(hours=5)))
    first, repeat = sorted(db.store.list_jobs(), key=lambda job: job.id)
    assert repeat.state == JobState.SUPPRESSED

    send(intake, order("M3", "A1", order_control="CA"))

    assert db.store.list_messages()[0].outcome == (
        f"order cancel (ORC-1 CA); cancelled job(s) {first.id}, {repeat.id}"
    )
    states = {job.id: job.state for job in db.store.list_jobs()}
    assert states == {first.id: JobState.CANCELLED, repeat.id: JobState.CANCELLED}


@pytest.mark.parametrize("running", [False, True])
def test_cancel_cancels_repeat_matched_by_accession(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock, running: bool
) -> None:
    # The repeat has placer and filler numbers of its own; the cancel names the first's only.
    intake = make_intake(db, rule_set, clock)
    send(intake, order("M1", "A1", NOW + dt.timedelta(hours=5)))
    send(intake, order("M2", "A1", NOW + dt.timedelta(hours=5)))
    first, repeat = sorted(db.store.list_jobs(), key=lambda job: job.id)
    assert repeat.state == JobState.SUPPRESSED
    if running:
        db.store.claim_due(NOW + dt.timedelta(hours=6), 1)
    cancel = order("M3", "", order_control="CA")
    cancel = cancel.replace(b"PLC-M3", b"PLC-M1").replace(b"FIL-M3", b"FIL-M1")

    send(intake, cancel)

    if running:
        expected = f"cancelled job(s) {repeat.id}; cancel requested for running job(s) {first.id}"
    else:
        expected = f"cancelled job(s) {first.id}, {repeat.id}"
    assert db.store.list_messages()[0].outcome == f"order cancel (ORC-1 CA); {expected}"
    assert db.store.get_job(repeat.id).state == JobState.CANCELLED  # type: ignore[union-attr]


def test_failed_job_does_not_suppress(db: ImmediateStore, clock: task.Clock) -> None:
    job = NewJob(
        "ris",
        "ct",
        "local",
        ("a",),
        PatientIdentifier("L1", "LOCAL"),
        Demographics(),
        OrderFacts(accession_number="A1"),
        NOW,
        True,
        dt.timedelta(hours=24),
    )
    first = db.store.add_job(job, NOW)
    db.store.claim_due(NOW, 1)
    db.store.finish_job(first, JobState.FAILED, "broken", NOW)
    second = db.store.add_job(job, NOW)
    assert db.store.get_job(second).state == JobState.QUEUED  # type: ignore[union-attr]


def test_deferred_job_keeps_its_attempts(db: ImmediateStore, clock: task.Clock) -> None:
    job_id = db.store.add_job(
        NewJob(
            "ris",
            "ct",
            "local",
            ("a",),
            PatientIdentifier("L1", "LOCAL"),
            Demographics(),
            OrderFacts(),
            NOW,
        ),
        NOW,
    )
    runner = ScriptedRunner()
    worker = Worker(db, runner, clock, poll_seconds=5, max_attempts=1)  # type: ignore[arg-type]
    worker.start()
    clock.advance(0)
    until = NOW + dt.timedelta(hours=2)
    runner.pending[0].callback(Outcome(JobState.DEFERRED, "quiet hours", defer_until=until))
    job = db.store.get_job(job_id)
    assert job is not None
    assert (job.state, job.attempts, job.not_before) == (JobState.DEFERRED, 0, until)
    clock.pump([5] * 1439)
    assert len(runner.calls) == 1
    clock.pump([5] * 2)
    assert len(runner.calls) == 2
    # The deferral used no attempt, so the one allowed attempt still runs to the end.
    runner.pending[1].callback(Outcome(JobState.DONE, "ok"))
    assert db.store.get_job(job_id).state == JobState.DONE  # type: ignore[union-attr]
    worker.stop()


def test_retrieve_slots_limit_per_source() -> None:
    slots = RetrieveSlots({"a": SourcePolicy(max_retrieves=1), "b": SourcePolicy()})
    started: list[str] = []
    pending: dict[str, defer.Deferred[None]] = {}

    def retrieve(name: str) -> defer.Deferred[None]:
        started.append(name)
        pending[name] = defer.Deferred()
        return pending[name]

    slots.run("a", retrieve, "a1")
    slots.run("a", retrieve, "a2")
    slots.run("b", retrieve, "b1")
    slots.run("b", retrieve, "b2")
    assert started == ["a1", "b1", "b2"]
    assert slots.waiting("a") == 1
    pending["a1"].callback(None)
    assert started == ["a1", "b1", "b2", "a2"]


def test_cancel_after_fetch_is_noted(
    db: ImmediateStore, rule_set: RuleSet, clock: task.Clock
) -> None:
    intake = make_intake(db, rule_set, clock)
    runner, worker = start_worker(db, clock)
    send(intake, order("M1", "A1", application="NOW"))
    clock.advance(0)
    send(intake, order("M2", "A1", order_control="CA", application="NOW"))
    runner.pending[0].callback(Outcome(JobState.DONE, "2 studies stored"))
    job = db.store.get_job(runner.calls[0].id)
    assert job is not None
    assert job.state == JobState.DONE
    assert job.summary == (
        "2 studies stored; order cancelled (ORC-1 CA) by message M2 after the studies were fetched"
    )
    worker.stop()


def test_shown_times_name_their_zone() -> None:
    paris = LocalZone("Europe/Paris")
    summer = dt.datetime(2026, 7, 1, 10, 0, 5, 123456, tzinfo=dt.UTC)
    assert paris.shown(summer) == "2026-07-01 12:00:05 CEST"
    assert paris.shown(summer, "milliseconds") == "2026-07-01 12:00:05.123 CEST"
    assert paris.shown(dt.datetime(2026, 1, 1, 9, 0, tzinfo=dt.UTC)) == "2026-01-01 10:00:00 CET"
    # A naive time (an HL7 time without an offset) is wall-clock time in the zone.
    assert paris.shown(dt.datetime(2026, 1, 1, 9, 0)) == "2026-01-01 09:00:00 CET"
    assert LocalZone("UTC").shown(summer) == "2026-07-01 10:00:05 UTC"
