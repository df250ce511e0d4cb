"""The retention period: which messages and jobs Store.prune deletes, and when the engine runs it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from twisted.internet import task

from engine import config
from engine.cli import main
from engine.identity import records
from engine.jobs.retention import BATCH_PAUSE_SECONDS, EVERY_SECONDS, Retention
from engine.jobs.store import JobState, MessageWrite, NewJob, Store
from engine.model import MessageOrigin, OrderFacts, PatientIdentifier
from tests.conftest import NOW, shipped_layout
from tests.fakes import ImmediateStore
from tests.unit.test_config import edit
from tests.unit.test_jobs import new_job

OLD = NOW - dt.timedelta(days=40)
CUTOFF = NOW - dt.timedelta(days=30)


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    return shipped_layout(tmp_path)


def receive(store: Store, control_id: str, when: dt.datetime, jobs: list[NewJob]) -> int:
    """Store a message with its jobs as intake does; return the message id."""
    write = MessageWrite(
        MessageOrigin("RIS", "RAD", "ORM^O01", control_id),
        "127.0.0.1:4000",
        b"MSH|" + control_id.encode(),
        b"ACK",
        "ok",
        jobs,
        when,
    )
    [recorded] = store.record_messages([write])
    assert not isinstance(recorded, Exception)
    return recorded[0]


def job_ids(store: Store) -> set[int]:
    return {job.id for job in store.list_jobs(1000)}


def message_ids(store: Store) -> set[int]:
    return {message.id for message in store.list_messages(1000)}


def test_old_finished_job_goes_with_its_message(store: Store) -> None:
    message = receive(store, "C1", OLD, [new_job()])
    [job] = store.message_jobs(message)
    store.finish_job(job.id, JobState.DONE, "done", OLD)
    records.accept_remote_patients(store, job.id, [PatientIdentifier("R1", "HOSP_A")], OLD)

    assert store.prune(CUTOFF) == (1, 1)

    assert job_ids(store) == set()
    assert message_ids(store) == set()
    for table in ("job_events", "job_orders", "identity_accepted"):
        assert store._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
    assert store._db.execute("PRAGMA foreign_key_check").fetchall() == []


@pytest.mark.parametrize(
    "state", [JobState.QUEUED, JobState.RUNNING, JobState.WAITING, JobState.QUARANTINED]
)
def test_unfinished_or_quarantined_job_stays(store: Store, state: JobState) -> None:
    message = receive(store, "C1", OLD, [new_job()])
    [job] = store.message_jobs(message)
    store._db.execute("UPDATE jobs SET state = ? WHERE id = ?", (state.value, job.id))

    assert store.prune(CUTOFF) == (0, 0)

    assert job_ids(store) == {job.id}
    assert message_ids(store) == {message}


def test_job_finished_recently_stays(store: Store) -> None:
    message = receive(store, "C1", OLD, [new_job()])
    [job] = store.message_jobs(message)
    store.finish_job(job.id, JobState.FAILED, "failed", NOW)

    assert store.prune(CUTOFF) == (0, 0)
    assert job_ids(store) == {job.id}


def test_recent_messages_stay_old_ones_without_jobs_go(store: Store) -> None:
    old = receive(store, "C1", OLD, [])
    recent = receive(store, "C2", NOW, [])
    store.record_replay(old, "replayed", [], OLD)

    assert store.prune(CUTOFF) == (0, 1)

    assert message_ids(store) == {recent}
    assert store.replays(old) == []


def test_suppressing_job_goes_suppressed_one_stays(store: Store) -> None:
    repeated = dataclasses.replace(
        new_job(), order=OrderFacts(accession_number="ACC9"), skip_repeated_orders=True
    )
    first = receive(store, "C1", OLD, [repeated])
    second = receive(store, "C2", OLD + dt.timedelta(days=5), [repeated])
    [covering] = store.message_jobs(first)
    [suppressed] = store.message_jobs(second)
    assert suppressed.state == JobState.SUPPRESSED
    store.finish_job(covering.id, JobState.DONE, "done", OLD)
    # Changed after the cutoff, so it stays.
    store._db.execute(
        "UPDATE jobs SET updated_at = ? WHERE id = ?", (NOW.isoformat(), suppressed.id)
    )

    assert store.prune(CUTOFF) == (1, 1)

    assert job_ids(store) == {suppressed.id}
    assert store._db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_prune_deletes_in_batches(store: Store) -> None:
    for number in range(5):
        message = receive(store, f"C{number}", OLD, [new_job()])
        [job] = store.message_jobs(message)
        store.finish_job(job.id, JobState.CANCELLED, "cancelled", OLD)

    assert store.prune(CUTOFF, limit=2) == (2, 2)
    assert store.prune(CUTOFF, limit=2) == (2, 2)
    assert store.prune(CUTOFF, limit=2) == (1, 1)
    assert store.prune(CUTOFF, limit=2) == (0, 0)
    assert job_ids(store) == set()


@pytest.fixture
def three_old(tmp_path: Path) -> Iterator[Store]:
    """A store with three messages received 40 days ago."""
    store = Store(tmp_path / "fdqr.sqlite")
    for number in range(3):
        receive(store, f"C{number}", OLD, [])
    yield store
    store.close()


def test_engine_prunes_at_start_and_every_hour(
    three_old: Store, caplog: pytest.LogCaptureFixture
) -> None:
    store = three_old
    clock = task.Clock()
    now = [NOW]
    retention = Retention(ImmediateStore(store), 30, clock, lambda: now[0], batch=2)

    with caplog.at_level(logging.INFO, logger="engine.jobs.retention"):
        retention.start()
        # The first batch was full, so a second one follows after a pause.
        assert len(message_ids(store)) == 1
        clock.advance(BATCH_PAUSE_SECONDS)
        assert message_ids(store) == set()

        receive(store, "LATER", NOW, [])
        now[0] = NOW + dt.timedelta(days=31)
        clock.advance(EVERY_SECONDS)
        assert message_ids(store) == set()
        retention.stop()

    assert [record.getMessage() for record in caplog.records] == [
        "retention: messages and finished jobs older than 30 days are deleted every 1h",
        "retention: deleted 0 finished jobs and 3 messages from before"
        f" {CUTOFF.isoformat(timespec='seconds')} (older than 30 days)",
        "retention: deleted 0 finished jobs and 1 messages from before"
        f" {(NOW + dt.timedelta(days=1)).isoformat(timespec='seconds')} (older than 30 days)",
    ]


def test_pass_stopped_with_engine_logs_what_it_deleted(
    three_old: Store, caplog: pytest.LogCaptureFixture
) -> None:
    store = three_old
    clock = task.Clock()
    retention = Retention(ImmediateStore(store), 1, clock, lambda: NOW, batch=2)

    with caplog.at_level(logging.INFO, logger="engine.jobs.retention"):
        retention.start()
        retention.stop()
        clock.advance(BATCH_PAUSE_SECONDS)

    assert len(message_ids(store)) == 1
    assert caplog.records[-1].getMessage() == (
        "retention: deleted 0 finished jobs and 2 messages from before"
        f" {(NOW - dt.timedelta(days=1)).isoformat(timespec='seconds')} (older than 1 day);"
        " stopped with the engine, the rest goes at the next start"
    )


def test_prune_past_future_dated_row(store: Store) -> None:
    # A clock set ahead for a while: a row in the middle carries a future time.
    for number in range(4):
        when = NOW + dt.timedelta(days=300) if number == 1 else OLD
        receive(store, f"C{number}", when, [])

    assert store.prune(CUTOFF) == (0, 3)
    assert [message.origin.control_id for message in store.list_messages()] == ["C1"]


def test_failed_pass_logs_error_and_next_one_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path / "fdqr.sqlite")
    receive(store, "C1", OLD, [])
    db = ImmediateStore(store)
    db.fail_next = OSError("disk I/O error")
    clock = task.Clock()
    retention = Retention(db, 30, clock, lambda: NOW)

    with caplog.at_level(logging.ERROR, logger="engine.jobs.retention"):
        retention.start()
    assert [record.getMessage() for record in caplog.records] == [
        "deleting messages and jobs older than 30 days failed: disk I/O error;"
        " the next pass runs in 3600 s"
    ]
    assert len(message_ids(store)) == 1
    clock.advance(EVERY_SECONDS)
    assert message_ids(store) == set()
    retention.stop()
    store.close()


def test_retention_days_default_keeps_everything(layout: Path) -> None:
    assert config.load(layout).settings.store.retention_days is None
    edit(layout, {"store.retention_days": 90})
    assert config.load(layout).settings.store.retention_days == 90


def test_jobs_show_says_job_was_deleted(layout: Path) -> None:
    loaded = config.load(layout)
    store = Store(loaded.store_path)
    first = receive(store, "C1", OLD, [new_job()])
    [old_job] = store.message_jobs(first)
    store.finish_job(old_job.id, JobState.DONE, "done", OLD)
    receive(store, "C2", NOW, [new_job()])
    store.prune(CUTOFF)
    store.close()

    result = CliRunner().invoke(main, ["jobs", "show", str(old_job.id), "--config", str(layout)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"job {old_job.id} not found (deleted: store.retention_days deletes old finished jobs)"
    )
    unknown = CliRunner().invoke(main, ["jobs", "show", "99", "--config", str(layout)])
    assert unknown.output.strip() == "job 99 not found"
