"""The spool sweep: objects of jobs that ended done or cancelled are deleted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from engine.jobs.spool import Spool
from engine.jobs.store import JobState
from engine.jobs.sweep import SpoolSweep
from tests.conftest import NOW
from tests.fakes import ImmediateStore
from tests.unit.test_jobs import new_job


def at_once(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(function, *args)


def spool_objects(spool: Spool, job_id: int, count: int) -> Path:
    study = spool.study_dir(job_id, "1.2.3")
    study.mkdir(parents=True)
    for number in range(count):
        spool.reserve(10)
        (study / f"{number}.dcm").write_bytes(b"x" * 10)
    return study


def test_sweep_deletes_objects_of_ended_jobs(
    db: ImmediateStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=10_000)
    spool.open()
    jobs = {state: db.store.add_job(new_job(), NOW) for state in JobState}
    folders = {state: spool_objects(spool, job_id, 2) for state, job_id in jobs.items()}
    for state, job_id in jobs.items():
        db.store.finish_job(job_id, state, "", NOW)
    # A folder of a job missing from the store is kept, because that job may not have ended.
    unknown = spool_objects(spool, 999, 1)
    clock = task.Clock()
    sweep = SpoolSweep(spool, db, clock, every_seconds=60, in_thread=at_once)  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING):
        sweep.start()

    remaining = {state for state, folder in folders.items() if folder.exists()}
    assert remaining == set(JobState) - {JobState.DONE, JobState.CANCELLED}
    assert unknown.exists()
    assert spool.used_bytes == 10 * (2 * len(remaining) + 1)
    assert (
        f"spool: deleted 2 objects of job {jobs[JobState.CANCELLED]}, which is cancelled;"
        " they were not sent"
    ) in caplog.messages

    # A job cancelled later is swept on the next turn of the timer.
    db.store.finish_job(jobs[JobState.WAITING], JobState.CANCELLED, "", NOW)
    clock.advance(59)
    assert folders[JobState.WAITING].exists()
    clock.advance(1)
    assert not folders[JobState.WAITING].exists()
    sweep.stop()


def test_sweep_failure_logged_and_timer_kept(
    db: ImmediateStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=10_000)
    spool_objects(spool, db.store.add_job(new_job(), NOW), 1)
    clock = task.Clock()
    sweep = SpoolSweep(spool, db, clock, every_seconds=60, in_thread=at_once)  # type: ignore[arg-type]
    db.fail_next = RuntimeError("database is locked")

    with caplog.at_level(logging.ERROR):
        sweep.start()

    assert "sweeping the spool failed: database is locked" in caplog.messages
    clock.advance(60)
    assert sweep._loop.running
    sweep.stop()
