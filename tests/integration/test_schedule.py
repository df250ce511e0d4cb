"""Order timing on real peers: a cancel before the lead time fetches nothing; rules reload."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.jobs.store import JobState, Store
from engine.testing.ports import free_port
from engine.testing.scenario import order_message, prefetch_scenario
from engine.testing.sites import REPOSITORY, EngineProcess, Network
from tests.integration.conftest import read_jobs, read_studies, send, wait_for_job

pytestmark = pytest.mark.integration

LEAD_SECONDS = 20
# The scheduled time is this far ahead, so jobs are due about 15 s after the order.
SCHEDULED_IN_SECONDS = 35


def routes_with_lead_time(folder: Path) -> Path:
    """Copy the shipped routes with a lead time on the RIS route."""
    folder.mkdir(parents=True)
    data = yaml.safe_load((REPOSITORY / "routes" / "orders.yaml").read_text())
    data["routes"][0]["timing"] = {
        "fetch": "before_scheduled_time",
        "lead_time": f"{LEAD_SECONDS}s",
    }
    (folder / "orders.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def scheduled_order(control_id: str, accession: str, scheduled: dt.datetime, control: str) -> bytes:
    scenario = prefetch_scenario(dt.date.today())
    message = order_message(
        scenario.local_patient, control_id, accession, dt.datetime.now(), order_control=control
    )
    return message + f"TQ1|1||||||{scheduled:%Y%m%d%H%M%S}+0000\r".encode()


def test_cancel_before_lead_time_fetches_nothing(tmp_path: Path) -> None:
    scenario = prefetch_scenario(dt.date.today())
    network = Network(tmp_path)
    network.start()
    engine: EngineProcess | None = None
    try:
        network.load(scenario)
        local = network.sites["local_pacs"]
        before = local.study_uids()
        routes = routes_with_lead_time(tmp_path / "routes")
        config = network.write_engine_config(
            tmp_path / "engine" / "engine.yaml", overrides={"routes": str(routes)}
        )
        store = tmp_path / "engine" / "fdqr.sqlite"
        engine = EngineProcess(config, network.ports.mllp, tmp_path / "engine.log")
        engine.start()

        scheduled = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=SCHEDULED_IN_SECONDS)
        assert send(network.ports.mllp, scheduled_order("LT1", "ACC-LT-1", scheduled, "NW"))[1] == (
            "MSA|AA|LT1"
        )
        assert send(network.ports.mllp, scheduled_order("LT2", "ACC-LT-1", scheduled, "CA"))[1] == (
            "MSA|AA|LT2"
        )
        # A second order for the same patient, same lead time, not cancelled: it shows
        # that due jobs do run, so the cancelled one stays idle because it was cancelled.
        assert send(network.ports.mllp, scheduled_order("LT3", "ACC-LT-3", scheduled, "NW"))[1] == (
            "MSA|AA|LT3"
        )
        cancelled, control = read_jobs(store)
        assert cancelled.state == JobState.CANCELLED
        assert cancelled.not_before > dt.datetime.now(dt.UTC)
        assert control.state == JobState.QUEUED
        assert control.not_before == cancelled.not_before

        finished = wait_for_job(store, control.id, timeout=120)
        assert finished.state == JobState.DONE, finished.summary

        cancelled_now = {job.id: job for job in read_jobs(store)}[cancelled.id]
        assert cancelled_now.state == JobState.CANCELLED
        assert cancelled_now.attempts == 0
        assert read_studies(store, cancelled.id) == []
        # The control job started no earlier than its lead time allowed.
        reader = Store(store)
        try:
            cancelled_events = [text for _, text in reader.events(cancelled.id)]
            control_events = reader.events(control.id)
        finally:
            reader.close()
        assert len(cancelled_events) == 2
        assert cancelled_events[0].startswith(
            "queued by route ris-orders, rule ct-priors; fetch at"
        )
        assert cancelled_events[1] == "cancelled: order cancelled (ORC-1 CA) by message LT2"
        first_work = next(at for at, text in control_events if text.startswith("source "))
        assert first_work >= control.not_before

        expected = {
            scenario.study(key).uid for key in scenario.expected_moved + scenario.expected_present
        }
        assert before < expected
        assert local.study_uids() == expected

        # explain --live queries the same sources and selects the same studies.
        order_file = tmp_path / "order.hl7"
        order_file.write_bytes(scheduled_order("LT4", "ACC-LT-4", scheduled, "NW"))
        explained = subprocess.run(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "rules",
                "explain",
                str(order_file),
                "--live",
                "--json",
                "--config",
                str(config),
            ],
            capture_output=True,
            check=True,
            cwd=REPOSITORY,
            timeout=120,
        )
        data = json.loads(explained.stdout)
        [rule] = [rule for rule in data["rules"] if rule["applies"]]
        selected = {c["study_instance_uid"] for c in rule["candidates"] if c["selected"]}
        assert selected == expected
        assert data["candidates_from"] == "live queries"
    finally:
        if engine is not None:
            assert engine.stop() == 0, engine.log_text()[-3000:]
        network.stop()


def wait_for_log(engine: EngineProcess, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in engine.log_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"'{text}' not in the engine log within {timeout}s")


def test_sighup_reloads_rules_and_keeps_them_on_error(tmp_path: Path) -> None:
    network = Network(tmp_path)
    routes = routes_with_lead_time(tmp_path / "routes")
    config = network.write_engine_config(
        tmp_path / "engine" / "engine.yaml",
        overrides={"routes": str(routes), "rules_reload_seconds": 0},
    )
    engine = EngineProcess(config, network.ports.mllp, tmp_path / "engine.log")
    engine.start()
    try:
        file = routes / "orders.yaml"
        file.write_text(file.read_text().replace("lead_time: 20s", "lead_time: 30s"))
        engine.send_signal(signal.SIGHUP)
        wait_for_log(engine, "rules reloaded (SIGHUP): 2 routes, 5 rules")

        file.write_text(file.read_text().replace("destination: local_pacs", "destination: gone", 1))
        engine.send_signal(signal.SIGHUP)
        wait_for_log(engine, "rules reload (SIGHUP) rejected, 1 problem(s)")
        assert "routes[0].destination: unknown node 'gone'" in engine.log_text()
        assert engine.running
        # The running rules still take orders.
        scheduled = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        assert send(network.ports.mllp, scheduled_order("HUP1", "ACC-HUP", scheduled, "NW"))[1] == (
            "MSA|AA|HUP1"
        )
        [job] = read_jobs(tmp_path / "engine" / "fdqr.sqlite")
        assert job.not_before == scheduled.replace(microsecond=0) - dt.timedelta(seconds=30)
    finally:
        assert engine.stop() == 0, engine.log_text()[-3000:]


def test_explain_live_with_sources_down_fails(tmp_path: Path) -> None:
    for folder in ("conf", "routes", "rules"):
        shutil.copytree(REPOSITORY / folder, tmp_path / folder)
    config = tmp_path / "conf" / "engine.yaml"
    settings = yaml.safe_load(config.read_text())
    for node in settings["nodes"].values():
        # Nothing listens there.
        node["port"] = free_port()
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    (tmp_path / "var").mkdir()

    explained = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "rules",
            "explain",
            str(REPOSITORY / "rules" / "tests" / "orders" / "ct-chest.hl7"),
            "--live",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        timeout=120,
    )

    assert explained.returncode == 1, explained.stdout + explained.stderr
    assert "query at hospital_a failed" in explained.stderr
    assert "no candidate studies (live queries; failed at hospital_a, hospital_b)" in (
        explained.stdout
    )
