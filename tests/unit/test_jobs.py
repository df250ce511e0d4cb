"""The job store and the worker's scheduling, retry and restart, on an injected Clock."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from engine.jobs.prefetch import Outcome
from engine.jobs.store import (
    AsyncStore,
    JobRecord,
    JobState,
    NewJob,
    Store,
    StoreError,
    StudyState,
)
from engine.jobs.worker import Worker, retry_delay
from engine.model import (
    Decision,
    Demographics,
    MessageOrigin,
    OrderFacts,
    PatientIdentifier,
    StudyCandidate,
)
from tests.conftest import NOW
from tests.fakes import ImmediateStore

PATIENT = PatientIdentifier("L1", "LOCAL")


def new_job(not_before: dt.datetime = NOW, rule: str = "ct") -> NewJob:
    return NewJob(
        route="ris",
        rule=rule,
        destination="local",
        sources=("a", "b"),
        patient=PATIENT,
        demographics=Demographics("DOE^JANE", "19650312", "F"),
        order=OrderFacts(accession_number="ACC1", order_time=NOW),
        not_before=not_before,
    )


def test_store_round_trips_job(store: Store) -> None:
    job_id = store.add_job(new_job(), NOW)
    job = store.get_job(job_id)
    assert job is not None
    assert job.state == JobState.QUEUED
    assert job.sources == ("a", "b")
    assert job.patient == PATIENT
    assert job.demographics.name == "DOE^JANE"
    assert job.order.order_time == NOW
    assert store.events(job_id)[0][1] == "queued by route ris, rule ct"


def test_order_facts_round_trip() -> None:
    # to_dict names each field, so a field missing there fails the last check.
    order = OrderFacts(
        placer_order_number="P1",
        filler_order_number="F1",
        placer_namespace="RIS",
        filler_namespace="PACS",
        accession_number="ACC1",
        study_instance_uid="1.2.3",
        ordered_modality="CT",
        procedure_code="CTCHEST",
        procedure_coding_system="LOCAL",
        procedure_text="CT chest",
        order_time=NOW,
        scheduled_time=NOW + dt.timedelta(hours=2),
        body_parts=("CHEST", "ABDOMEN"),
    )
    demographics = Demographics("DOE^JANE", "19650312", "F")
    assert OrderFacts.from_dict(order.to_dict()) == order
    assert Demographics.from_dict(demographics.to_dict()) == demographics
    assert set(order.to_dict()) == {field.name for field in dataclasses.fields(OrderFacts)}


def order_job(placer: str, namespace: str, accession: str) -> NewJob:
    order = OrderFacts(
        placer_order_number=placer, placer_namespace=namespace, accession_number=accession
    )
    return dataclasses.replace(new_job(), order=order, skip_repeated_orders=True)


def test_order_numbers_differ_by_namespace(store: Store) -> None:
    # 1001^RIS and 1001^CARDIO are two orders, so neither suppresses or cancels the other.
    first = store.add_job(order_job("1001", "RIS", "ACC-1"), NOW)
    other = store.add_job(order_job("1001", "CARDIO", "ACC-2"), NOW)
    repeated = store.add_job(order_job("1001", "RIS", "ACC-3"), NOW)
    states = {job.id: job.state for job in store.list_jobs()}
    assert states[other] == JobState.QUEUED
    assert states[repeated] == JobState.SUPPRESSED

    cardio = OrderFacts(placer_order_number="1001", placer_namespace="CARDIO")
    assert store.cancel_order(PATIENT, cardio, "cancelled", NOW) == "cancelled job(s) " + str(other)
    assert store.get_job(first).state == JobState.QUEUED  # type: ignore[union-attr]
    # Without a namespace the number matches either order.
    bare = OrderFacts(placer_order_number="1001")
    assert store.cancel_order(PATIENT, bare, "cancelled", NOW).startswith("cancelled job(s)")
    assert store.get_job(first).state == JobState.CANCELLED  # type: ignore[union-attr]


def test_store_duplicate_message_keeps_first(store: Store) -> None:
    origin = MessageOrigin("RIS", "RAD", "ORM^O01", "C1")
    first = store.record_message(origin, "peer", b"msg", b"ACK1", "ok", [new_job()], NOW)
    second = store.record_message(origin, "peer", b"msg", b"ACK2", "ok", [new_job()], NOW)
    assert first[2] is False
    assert second == (first[0], b"ACK1", True)
    assert len(store.list_jobs()) == 1


def test_store_claims_only_due_jobs(store: Store) -> None:
    due = store.add_job(new_job(), NOW)
    store.add_job(new_job(NOW + dt.timedelta(hours=1)), NOW)
    claimed = store.claim_due(NOW, 10)
    assert [job.id for job in claimed] == [due]
    assert claimed[0].state == JobState.RUNNING
    assert claimed[0].attempts == 1
    assert store.claim_due(NOW, 10) == []
    assert store.next_due_time() == NOW + dt.timedelta(hours=1)


def test_store_requeues_interrupted(store: Store) -> None:
    job_id = store.add_job(new_job(), NOW)
    store.claim_due(NOW, 1)
    assert store.requeue_interrupted(NOW) == [job_id]
    job = store.get_job(job_id)
    assert job is not None
    assert job.state == JobState.QUEUED


def test_store_decisions_keep_counts_on_retry(store: Store) -> None:
    job_id = store.add_job(new_job(), NOW)
    study = StudyCandidate(
        "a", "1.2.3", PatientIdentifier("R1", "A"), NOW.date(), "", ("CT",), "", "", 10
    )
    store.record_decisions(job_id, [Decision(study, True, "rank 1")])
    store.update_study(job_id, "a", "1.2.3", StudyState.STORED, received=10, stored=10)
    store.record_decisions(job_id, [Decision(study, True, "rank 1")])
    [record] = store.studies(job_id)
    assert record.state == StudyState.STORED
    assert (record.found, record.received, record.stored) == (10, 10, 10)


def test_retry_event_gives_delay_not_time(store: Store) -> None:
    job_id = store.add_job(new_job(), NOW)
    store.retry_job(job_id, NOW + dt.timedelta(seconds=30), "association failed", NOW)
    store.retry_job(job_id, NOW, "engine is stopping", NOW)
    texts = [text for _, text in store.events(job_id)]
    assert texts[-2:] == [
        "retry in 30 s: association failed",
        "retry when the engine claims it again: engine is stopping",
    ]


def test_retry_delay_doubles_to_cap() -> None:
    assert [retry_delay(attempt, 30, 200) for attempt in range(1, 6)] == [30, 60, 120, 200, 200]


class ScriptedRunner:
    """A job runner whose attempts end when the test fires them."""

    def __init__(self) -> None:
        self.calls: list[JobRecord] = []
        self.pending: list[defer.Deferred[Outcome]] = []

    def __call__(self, job: JobRecord) -> defer.Deferred[Outcome]:
        self.calls.append(job)
        result: defer.Deferred[Outcome] = defer.Deferred()
        self.pending.append(result)
        return result


@pytest.fixture
def clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(NOW.timestamp())
    return clock


def make_worker(
    db: ImmediateStore, runner: ScriptedRunner, clock: task.Clock, **options: int
) -> Worker:
    settings = {
        "concurrency": 2,
        "max_attempts": 3,
        "retry_base_seconds": 30,
        "retry_max_seconds": 600,
    }
    settings.update(options)
    return Worker(db, runner, clock, poll_seconds=5, **settings)  # type: ignore[arg-type]


def one_running_job(db: ImmediateStore, clock: task.Clock) -> tuple[int, ScriptedRunner, Worker]:
    """Add one job and start a worker that has claimed it; its attempt waits in the runner."""
    job_id = db.store.add_job(new_job(), NOW)
    runner = ScriptedRunner()
    worker = make_worker(db, runner, clock)
    worker.start()
    clock.advance(0)
    return job_id, runner, worker


def stop(worker: Worker, clock: task.Clock) -> None:
    worker.stop()
    assert clock.getDelayedCalls() == []


def test_worker_runs_up_to_concurrency(db: ImmediateStore, clock: task.Clock) -> None:
    for _ in range(3):
        db.store.add_job(new_job(), NOW)
    runner = ScriptedRunner()
    worker = make_worker(db, runner, clock)
    worker.start()
    clock.advance(0)
    assert len(runner.calls) == 2
    runner.pending[0].callback(Outcome(JobState.DONE, "ok"))
    clock.advance(0)
    assert len(runner.calls) == 3
    assert db.store.get_job(runner.calls[0].id).state == JobState.DONE  # type: ignore[union-attr]
    for pending in runner.pending[1:]:
        pending.callback(Outcome(JobState.DONE, "ok"))
    stop(worker, clock)


def test_worker_retries_with_backoff_then_gives_up(db: ImmediateStore, clock: task.Clock) -> None:
    job_id, runner, worker = one_running_job(db, clock)
    runner.pending[0].callback(Outcome(JobState.FAILED, "source down", retry=True))
    job = db.store.get_job(job_id)
    assert job is not None
    assert job.state == JobState.WAITING
    assert job.not_before == NOW + dt.timedelta(seconds=30)

    clock.advance(25)
    assert len(runner.calls) == 1
    clock.advance(5)
    assert len(runner.calls) == 2
    runner.pending[1].callback(Outcome(JobState.FAILED, "source down", retry=True))
    clock.advance(60)
    assert len(runner.calls) == 3
    # The third attempt is the last one allowed.
    runner.pending[2].callback(Outcome(JobState.FAILED, "source down", retry=True))
    job = db.store.get_job(job_id)
    assert job is not None
    assert job.state == JobState.FAILED
    assert job.attempts == 3
    clock.advance(3600)
    assert len(runner.calls) == 3
    stop(worker, clock)


def test_worker_logs_failures_as_warnings(
    db: ImmediateStore, clock: task.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    done_id = db.store.add_job(new_job(), NOW)
    failed_id = db.store.add_job(new_job(rule="mr"), NOW)
    runner = ScriptedRunner()
    worker = make_worker(db, runner, clock, max_attempts=2)
    worker.start()
    clock.advance(0)
    with caplog.at_level(logging.INFO, logger="engine.jobs.worker"):
        runner.pending[0].callback(Outcome(JobState.DONE, "1 study stored"))
        runner.pending[1].callback(Outcome(JobState.FAILED, "source down", retry=True))
        clock.advance(30)
        runner.pending[2].callback(Outcome(JobState.FAILED, "source down", retry=True))
    levels = {record.getMessage(): record.levelno for record in caplog.records}
    assert levels[f"job {done_id}: done: 1 study stored"] == logging.INFO
    assert levels[f"job {failed_id}: source down; retry in 30 s"] == logging.WARNING
    assert levels[f"job {failed_id}: failed: source down"] == logging.WARNING
    stop(worker, clock)


def test_worker_unexpected_error_is_retried(db: ImmediateStore, clock: task.Clock) -> None:
    job_id, runner, worker = one_running_job(db, clock)
    runner.pending[0].errback(KeyError("bug"))
    job = db.store.get_job(job_id)
    assert job is not None
    assert job.state == JobState.WAITING
    assert "internal error: KeyError" in job.summary
    stop(worker, clock)


def test_worker_start_requeues_interrupted(
    db: ImmediateStore, clock: task.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    job_id = db.store.add_job(new_job(), NOW)
    db.store.claim_due(NOW, 1)
    runner = ScriptedRunner()
    worker = make_worker(db, runner, clock)
    worker.start()
    clock.advance(0)
    assert f"requeued 1 job(s) left unfinished by the last run: {job_id}" in caplog.text
    assert [job.id for job in runner.calls] == [job_id]
    assert runner.calls[0].attempts == 2
    runner.pending[0].callback(Outcome(JobState.DONE, "ok"))
    stop(worker, clock)


def test_worker_stop_leaves_running_job_for_restart(db: ImmediateStore, clock: task.Clock) -> None:
    job_id, runner, worker = one_running_job(db, clock)
    stopped = worker.stop()
    assert not stopped.called
    runner.pending[0].errback(ConnectionAbortedError("association aborted"))
    assert stopped.called
    job = db.store.get_job(job_id)
    assert job is not None
    assert job.state == JobState.RUNNING
    assert clock.getDelayedCalls() == []


class InlinePool:
    """A thread pool that runs each call at once on the calling thread."""

    def callInThreadWithCallback(self, on_result: Any, function: Any, *args: Any) -> None:
        try:
            result = function(*args)
        except Exception as error:
            on_result(False, Failure(error))
        else:
            on_result(True, result)


class InlineReactor(task.Clock):
    def callFromThread(self, function: Any, *args: Any) -> None:
        function(*args)


def test_async_store_notes_written_before_later_work(store: Store) -> None:
    reactor = InlineReactor()
    db = AsyncStore(reactor, store)  # type: ignore[arg-type]
    db._pool = InlinePool()  # type: ignore[assignment]
    job_id = store.add_job(new_job(), NOW)

    db.note(job_id, "first", NOW)
    db.note(job_id, "second", NOW)
    seen: list[list[str]] = []
    db.run(lambda target: seen.append([text for _, text in target.events(job_id)]))
    assert seen == [["queued by route ris, rule ct", "first", "second"]]

    db.note(job_id, "third", NOW)
    assert [text for _, text in store.events(job_id)][-1] == "second"
    reactor.advance(0)
    assert [text for _, text in store.events(job_id)][-1] == "third"
    assert reactor.getDelayedCalls() == []


def test_worker_records_outcome_after_store_recovers(
    db: ImmediateStore, clock: task.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    job_id, runner, worker = one_running_job(db, clock)
    db.fail_next = sqlite3.OperationalError("database or disk is full")
    runner.pending[0].callback(Outcome(JobState.DONE, "1 study stored"))
    assert db.store.get_job(job_id).state == JobState.RUNNING  # type: ignore[union-attr]
    assert worker.running == 1
    assert (
        f"job {job_id}: recording the outcome failed (database or disk is full);"
        " trying again every 5s"
    ) in caplog.text
    clock.advance(5)
    assert db.store.get_job(job_id).state == JobState.DONE  # type: ignore[union-attr]
    assert worker.running == 0
    assert f"job {job_id}: outcome recorded after 1 failures" in caplog.text
    stop(worker, clock)


def test_worker_claim_failures_logged_once_a_minute(
    db: ImmediateStore, clock: task.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    runner = ScriptedRunner()
    worker = make_worker(db, runner, clock)
    worker.start()
    clock.advance(0)
    for _ in range(13):
        db.fail_next = sqlite3.OperationalError("database or disk is full")
        clock.advance(5)
    failures = [r for r in caplog.records if r.message.startswith("claiming jobs failed")]
    assert [r.message for r in failures] == [
        "claiming jobs failed: database or disk is full",
        "claiming jobs failed: database or disk is full (13 failures so far)",
    ]
    clock.advance(5)
    assert "claiming jobs succeeded after 13 failures" in caplog.text
    stop(worker, clock)


def test_store_open_error_names_path(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    path = tmp_path / "afile" / "fdqr.sqlite"
    with pytest.raises(StoreError, match=f"cannot open the store {path}: "):
        Store(path)


def test_store_open_error_names_low_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "afile").write_text("not a folder")
    path = tmp_path / "afile" / "fdqr.sqlite"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        "engine.jobs.store.shutil.disk_usage", lambda folder: usage._replace(free=8192)
    )

    with pytest.raises(StoreError) as raised:
        Store(path)

    assert str(raised.value).endswith(
        " (the disk has 8 KB free: free space there, then start again)"
    )


def test_worker_stop_does_not_count_interrupted_attempt(
    db: ImmediateStore, clock: task.Clock
) -> None:
    job_id, runner, worker = one_running_job(db, clock)
    stopped = worker.stop()

    runner.pending[0].callback(Outcome(JobState.FAILED, "query failed at a", retry=True))

    assert stopped.called
    job = db.store.get_job(job_id)
    assert job is not None
    assert job.state == JobState.WAITING
    assert job.attempts == 0
    assert job.summary == "interrupted by the engine's shutdown: query failed at a"


def test_worker_logs_retry_once_when_store_recovers(
    db: ImmediateStore, clock: task.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    job_id, runner, worker = one_running_job(db, clock)
    db.fail_next = sqlite3.OperationalError("database or disk is full")

    runner.pending[0].callback(Outcome(JobState.FAILED, "query failed at a", retry=True))
    clock.advance(5)

    retries = [record for record in caplog.records if "retry in" in record.getMessage()]
    assert [record.getMessage() for record in retries] == [
        f"job {job_id}: query failed at a; retry in 30 s"
    ]
    stop(worker, clock)


def test_worker_store_error_logged_without_traceback(
    db: ImmediateStore, clock: task.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    job_id, runner, worker = one_running_job(db, clock)

    runner.pending[0].errback(sqlite3.OperationalError("database or disk is full"))

    [record] = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert record.getMessage() == (
        f"job {job_id}: attempt failed: store error: database or disk is full"
    )
    assert record.exc_info is None
    stop(worker, clock)
