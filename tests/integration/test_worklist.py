"""Worklist-driven prefetch with DCMTK's wlmscpfs as the worklist and Orthanc sites."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.jobs.store import JobState
from engine.testing.scenario import order_message, prefetch_scenario
from engine.testing.sites import REPOSITORY, EngineProcess, Network
from engine.testing.worklist import ScheduledStep, WorklistServer
from tests.integration.conftest import read_jobs, send, wait_for_job

pytestmark = pytest.mark.integration

POLL_SECONDS = 5


def worklist_overrides(server: WorklistServer) -> dict[str, object]:
    return {
        "nodes": {
            "ris_mwl": {
                "ae_title": server.ae_title,
                "host": server.host,
                "port": server.port,
                "max_associations": 1,
                "timeout_seconds": 10,
            }
        },
        "worklist": {
            "poll_seconds": POLL_SECONDS,
            "look_ahead_hours": 24,
            "sources": [{"node": "ris_mwl", "modalities": ["CT", "MR"]}],
        },
    }


def scheduled(step_id: str, start: dt.datetime) -> ScheduledStep:
    scenario = prefetch_scenario(dt.date.today())
    return ScheduledStep(
        step_id=step_id,
        accession=f"ACC-{step_id}",
        patient=scenario.local_patient,
        start=start,
        modality="CT",
        station_ae_title="CT1",
        procedure_code="CTCHEST",
        procedure_meaning="CT Chest",
    )


def in_hours(hours: float) -> dt.datetime:
    return dt.datetime.now() + dt.timedelta(hours=hours)


def outside_window_on_queried_day() -> dt.datetime:
    """Return a start time the worklist returns (its date is queried) but the window excludes."""
    after_window = in_hours(24.5)
    if after_window.date() == in_hours(24).date():
        return after_window
    # Late in the evening: take a time earlier today, before the grace period.
    return in_hours(-2)


def wait_for_jobs(store: Path, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.exists() and len(read_jobs(store)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} jobs after {timeout}s")


def test_worklist_step_prefetches_and_window_is_respected(tmp_path: Path) -> None:
    scenario = prefetch_scenario(dt.date.today())
    network = Network(tmp_path)
    worklist = WorklistServer(tmp_path / "mwl")
    network.start()
    worklist.start()
    engine: EngineProcess | None = None
    try:
        network.load(scenario)
        in_window = scheduled("SPS-IN", in_hours(2))
        outside = scheduled("SPS-OUT", outside_window_on_queried_day())
        worklist.add(in_window)
        worklist.add(outside)
        config = network.write_engine_config(
            tmp_path / "engine" / "engine.yaml", overrides=worklist_overrides(worklist)
        )
        store = tmp_path / "engine" / "fdqr.sqlite"

        dry_run = subprocess.run(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "worklist",
                "poll",
                "--dry-run",
                "--config",
                str(config),
            ],
            capture_output=True,
            text=True,
            cwd=REPOSITORY,
            env=dict(os.environ),
            timeout=60,
            check=True,
        )
        assert "step SPS-IN accession ACC-SPS-IN CT" in dry_run.stdout
        assert (
            "would schedule: route worklist-orders: 1 job(s) for rules ct-priors" in dry_run.stdout
        )
        assert "1 outside it" in dry_run.stdout
        assert "SPS-OUT" not in dry_run.stdout
        assert not store.exists() or read_jobs(store) == []

        engine = EngineProcess(config, network.ports.mllp, tmp_path / "engine.log")
        engine.start()
        wait_for_jobs(store, 1)
        [job] = read_jobs(store)
        assert job.order.accession_number == "ACC-SPS-IN"
        assert job.route == "worklist-orders"
        finished = wait_for_job(store, job.id)
        assert finished.state == JobState.DONE, finished.summary
        expected = {
            scenario.study(key).uid for key in scenario.expected_moved + scenario.expected_present
        }
        assert network.sites["local_pacs"].study_uids() == expected

        # Later polls see the same step again and create nothing more.
        time.sleep(POLL_SECONDS * 2.5)
        assert len(read_jobs(store)) == 1
        assert "worklist ris_mwl: 1 step(s) in the window, 0 new" in engine.log_text()
    finally:
        if engine is not None:
            assert engine.stop() == 0
        worklist.stop()
        network.stop()


def test_worklist_down_then_back(tmp_path: Path) -> None:
    network = Network(tmp_path)
    worklist = WorklistServer(tmp_path / "mwl")
    network.start()
    engine: EngineProcess | None = None
    try:
        config = network.write_engine_config(
            tmp_path / "engine" / "engine.yaml", overrides=worklist_overrides(worklist)
        )
        store = tmp_path / "engine" / "fdqr.sqlite"
        engine = EngineProcess(config, network.ports.mllp, tmp_path / "engine.log")
        engine.start()

        deadline = time.monotonic() + 30
        while "worklist ris_mwl: poll failed" not in engine.log_text():
            assert time.monotonic() < deadline, "no failed poll was logged"
            time.sleep(0.2)
        assert engine.running

        worklist.start()
        worklist.add(scheduled("SPS-LATE", in_hours(3)))
        malformed = scheduled("SPS-BAD", in_hours(3))
        worklist.add(
            ScheduledStep(
                **{
                    **malformed.__dict__,
                    "patient": malformed.patient.__class__("", "", "X^Y", "", ""),
                }
            )
        )
        wait_for_jobs(store, 1, timeout=POLL_SECONDS * 4)
        [job] = read_jobs(store)
        assert job.order.accession_number == "ACC-SPS-LATE"
        assert (
            "skipped 1 malformed item(s): step SPS-BAD|ACC-SPS-BAD: no Patient ID"
            in engine.log_text()
        )
    finally:
        if engine is not None:
            assert engine.stop() == 0
        worklist.stop()
        network.stop()


def test_worklist_step_ordered_by_hl7_too_and_removed_step(tmp_path: Path) -> None:
    scenario = prefetch_scenario(dt.date.today())
    network = Network(tmp_path)
    worklist = WorklistServer(tmp_path / "mwl")
    network.start()
    worklist.start()
    engine: EngineProcess | None = None
    try:
        network.load(scenario)
        config = network.write_engine_config(
            tmp_path / "engine" / "engine.yaml", overrides=worklist_overrides(worklist)
        )
        store = tmp_path / "engine" / "fdqr.sqlite"
        engine = EngineProcess(config, network.ports.mllp, tmp_path / "engine.log")
        engine.start()

        ordered = scheduled("SPS-HL7", in_hours(1))
        message = order_message(
            scenario.local_patient, "ORD-WL-1", ordered.accession, dt.datetime.now()
        )
        assert send(network.ports.mllp, message)[1] == "MSA|AA|ORD-WL-1"
        [hl7_job] = read_jobs(store)
        assert wait_for_job(store, hl7_job.id).state == JobState.DONE
        instances_after_hl7 = network.sites["local_pacs"].instance_count()

        # The same procedure on the worklist, and a later one whose job waits for its lead time.
        later = scheduled("SPS-LATER", in_hours(5))
        worklist.add(ordered)
        worklist.add(later)
        wait_for_jobs(store, 3)
        jobs = {job.order.accession_number: job for job in read_jobs(store) if job.id != hl7_job.id}
        assert jobs[ordered.accession].state == JobState.SUPPRESSED
        assert jobs[later.accession].state == JobState.QUEUED
        assert jobs[later.accession].not_before > dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)

        worklist.remove(later)
        deadline = time.monotonic() + POLL_SECONDS * 6
        while {job.id: job for job in read_jobs(store)}[
            jobs[later.accession].id
        ].state != JobState.CANCELLED:
            assert time.monotonic() < deadline, "the removed step's job was not cancelled"
            time.sleep(0.2)
        assert network.sites["local_pacs"].instance_count() == instances_after_hl7
        assert len(read_jobs(store)) == 3
    finally:
        if engine is not None:
            assert engine.stop() == 0
        worklist.stop()
        network.stop()
