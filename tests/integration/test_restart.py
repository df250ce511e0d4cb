"""Stopping and restarting `fdqr run`: unfinished jobs resume and complete."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

from engine.jobs.store import JobState, StudyState
from engine.testing.scenario import order_message, prefetch_scenario
from engine.testing.sites import EngineProcess, Network
from tests.integration.conftest import read_jobs, read_studies, send, wait_for_job

pytestmark = pytest.mark.integration


def wait_for_state(store: Path, job_id: int, state: JobState, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {job.id: job for job in read_jobs(store)}
        if job_id in jobs and jobs[job_id].state == state:
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {state} within {timeout}s")


def wait_for_retrieve(store: Path, job_id: int, timeout: float = 30.0) -> None:
    """Wait until the job retrieves a study."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(study.state == StudyState.RETRIEVING for study in read_studies(store, job_id)):
            return
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} started no retrieve within {timeout}s")


def test_job_waits_for_destination_and_resumes_after_restart(tmp_path: Path) -> None:
    scenario = prefetch_scenario(dt.date.today())
    network = Network(tmp_path)
    network.start()
    engine: EngineProcess | None = None
    try:
        network.load(scenario)
        local = network.sites["local_pacs"]
        local.stop()
        config = network.write_engine_config(
            tmp_path / "engine" / "engine.yaml",
            overrides={
                "jobs": {"retry_delay_seconds": 1, "max_retry_delay_seconds": 2, "max_attempts": 50}
            },
        )
        store = tmp_path / "engine" / "fdqr.sqlite"
        engine = EngineProcess(config, network.ports.mllp, tmp_path / "engine.log")
        engine.start()

        message = order_message(scenario.local_patient, "RST1", "ACC-RST-1", dt.datetime.now())
        assert send(network.ports.mllp, message)[1] == "MSA|AA|RST1"
        [job] = read_jobs(store)
        wait_for_state(store, job.id, JobState.WAITING)
        assert "not complete" in read_jobs(store)[0].summary

        assert engine.stop() == 0
        local.start()
        engine = EngineProcess(config, network.ports.mllp, tmp_path / "engine-2.log")
        engine.start()

        finished = wait_for_job(store, job.id)
        assert finished.state == JobState.DONE, finished.summary
        assert finished.attempts >= 2
        expected = {
            scenario.study(key).uid for key in scenario.expected_moved + scenario.expected_present
        }
        assert local.study_uids() == expected
    finally:
        if engine is not None:
            engine.stop()
        network.stop()


def test_sigterm_during_retrieve_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    scenario = prefetch_scenario(dt.date.today())
    network = Network(tmp_path)
    network.start()
    engine: EngineProcess | None = None
    try:
        network.load(scenario)
        config = network.write_engine_config(tmp_path / "engine" / "engine.yaml")
        store = tmp_path / "engine" / "fdqr.sqlite"
        engine = EngineProcess(config, network.ports.mllp, tmp_path / "engine.log")
        engine.start()

        message = order_message(scenario.local_patient, "RST2", "ACC-RST-2", dt.datetime.now())
        assert send(network.ports.mllp, message)[1] == "MSA|AA|RST2"
        [job] = read_jobs(store)
        wait_for_retrieve(store, job.id)
        # Frozen sources leave the retrieve hanging mid-study, as a stuck PACS would.
        sources = [network.sites["hospital_a"], network.sites["hospital_b"]]
        for source in sources:
            source.pause()
        stopping = time.monotonic()
        assert engine.stop() == 0
        assert time.monotonic() - stopping < 20
        interrupted = read_jobs(store)[0]
        assert not interrupted.state.finished
        for source in sources:
            source.resume()

        engine = EngineProcess(config, network.ports.mllp, tmp_path / "engine-2.log")
        engine.start()
        finished = wait_for_job(store, job.id)
        assert finished.state == JobState.DONE, finished.summary
        expected = {
            scenario.study(key).uid for key in scenario.expected_moved + scenario.expected_present
        }
        assert network.sites["local_pacs"].study_uids() == expected
    finally:
        if engine is not None:
            engine.stop()
        network.stop()
