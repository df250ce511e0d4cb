"""Intake processes (mllp.processes) of a real `fdqr run`: spread, events, restart and stop.

tests/integration/test_hl7_intake.py runs its framing, ACK and limit tests
against such an engine as well.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine.audit import event_code
from engine.testing.adt import demographics_message
from engine.testing.intake import INTAKE_PATIENT, write_intake_config
from engine.testing.sites import EngineProcess
from tests.conftest import audit_file_messages
from tests.integration.test_hl7_intake import (
    END_BLOCK,
    START_BLOCK,
    RunningEngine,
    exchange,
    msa,
    order,
    start_engine,
    stop_engine,
)

pytestmark = pytest.mark.integration

PATIENT_RECORD = "110110"


def child_pids(parent: int) -> list[int]:
    """The process ids whose parent is the given one, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may contain spaces: fields follow the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == parent:
            found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def wait_until(condition: Callable[[], bool], description: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {description}")
        time.sleep(0.1)


def intake_children(engine: RunningEngine, count: int = 2) -> list[int]:
    pid = engine.process.pid
    assert pid is not None
    wait_until(lambda: len(child_pids(pid)) == count, f"{count} intake processes run")
    return child_pids(pid)


def started_lines(engine: RunningEngine) -> int:
    return sum("intake process" in line and "started (process id" in line for line in log(engine))


def log(engine: RunningEngine) -> list[str]:
    return engine.process.log_text().splitlines()


def web_port(engine: RunningEngine) -> int:
    settings = yaml.safe_load((engine.store.parent / "engine.yaml").read_text())
    return int(settings["web"]["listen"].split(":")[1])


def answered_aa(engine: RunningEngine) -> float:
    url = f"http://127.0.0.1:{web_port(engine)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fdqr_hl7_messages_total" and sample.labels == {"ack": "AA"}:
                return sample.value
    return 0.0


def send_orders(engine: RunningEngine, prefix: str, connections: int, each: int) -> list[str]:
    """Send orders over several connections at once, in turns; return the MSA segments."""
    sockets = [socket.create_connection(("127.0.0.1", engine.port)) for _ in range(connections)]
    answers = []
    try:
        for turn in range(each):
            for number, connection in enumerate(sockets):
                connection.sendall(START_BLOCK + order(f"{prefix}-{number}-{turn}") + END_BLOCK)
            for connection in sockets:
                answers.append(msa(exchange(connection, b"")))
    finally:
        for connection in sockets:
            connection.close()
    return answers


@pytest.fixture
def engine(tmp_path: Path) -> RunningEngine:
    return start_engine(tmp_path / "engine", {"processes": 2})


def test_connections_spread_over_processes(engine: RunningEngine) -> None:
    try:
        answers = send_orders(engine, "SPREAD", connections=6, each=3)

        assert answers == [f"MSA|AA|SPREAD-{n}-{t}" for t in range(3) for n in range(6)]
        assert engine.messages() == 18
        assert all(engine.jobs_of(f"SPREAD-{n}-{t}") == 1 for t in range(3) for n in range(6))
        stored = [line for line in log(engine) if "engine.hl7.intake: stored ORM^O01" in line]
        assert sum("[intake 1]" in line for line in stored) == 9
        assert sum("[intake 2]" in line for line in stored) == 9
        # The children's counts reach the engine's metrics.
        wait_until(lambda: answered_aa(engine) == 18, "the metrics count 18 AA")
    finally:
        stop_engine(engine)


def test_child_adt_audited_by_engine(engine: RunningEngine) -> None:
    try:
        message = demographics_message(INTAKE_PATIENT, "A08-PROC", dt.datetime.now(), "A08", [])
        with socket.create_connection(("127.0.0.1", engine.port)) as connection:
            assert msa(exchange(connection, START_BLOCK + message + END_BLOCK)) == "MSA|AA|A08-PROC"

        audit = engine.store.parent / "audit.log"

        def recorded() -> bool:
            return any(
                event_code(record) == PATIENT_RECORD
                and "A08-PROC"
                in [
                    base64.b64decode(detail.attrib["value"]).decode()
                    for detail in record.iter("ParticipantObjectDetail")
                ]
                for record in (audit_file_messages(audit) if audit.exists() else [])
            )

        wait_until(recorded, "the engine writes the patient record's audit record")
    finally:
        stop_engine(engine)


def test_killed_child_started_again(engine: RunningEngine) -> None:
    try:
        first, second = intake_children(engine)
        wait_until(lambda: started_lines(engine) == 2, "both intake processes started")
        # One open connection in each child (they take connections in turn).
        open_connections = [socket.create_connection(("127.0.0.1", engine.port)) for _ in range(2)]
        for number, connection in enumerate(open_connections):
            answer = exchange(connection, START_BLOCK + order(f"HELD-{number}") + END_BLOCK)
            assert msa(answer) == f"MSA|AA|HELD-{number}"

        # The children name their open connections in their responses to the pings (1 s).
        time.sleep(2.5)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: started_lines(engine) == 3, "the killed one started again")

        assert any(
            "ERROR engine.hl7.processes: intake process" in line
            and "ended (signal 9)" in line
            and "; its 1 open connection closed with it (from 127.0.0.1:" in line
            and " at its last ping response), and their senders send again" in line
            and "starting it again in 1 s" in line
            for line in log(engine)
        )
        for connection in open_connections:
            connection.close()
        children = intake_children(engine)
        assert second in children
        assert first not in children
        answers = send_orders(engine, "AGAIN", connections=4, each=2)
        assert answers == [f"MSA|AA|AGAIN-{n}-{t}" for t in range(2) for n in range(4)]
    finally:
        stop_engine(engine)


def test_engine_stop_stops_children(engine: RunningEngine) -> None:
    children = intake_children(engine)
    wait_until(lambda: started_lines(engine) == 2, "both intake processes started")

    stop_engine(engine)

    assert not any(alive(pid) for pid in children)
    assert sum("intake process" in line and "stopped" in line for line in log(engine)) == 2
    assert not any(" ERROR " in line for line in log(engine))


def test_children_end_with_killed_engine(engine: RunningEngine) -> None:
    children = intake_children(engine)
    wait_until(lambda: started_lines(engine) == 2, "both intake processes started")
    pid = engine.process.pid
    assert pid is not None

    os.kill(pid, signal.SIGKILL)

    wait_until(lambda: not any(alive(child) for child in children), "the children ended")
    assert engine.process.stop() == -signal.SIGKILL
    # The port, the store and the spool are free for the next start.
    engine.process.start()
    try:
        with socket.create_connection(("127.0.0.1", engine.port)) as connection:
            answer = exchange(connection, START_BLOCK + order("AFTER-KILL") + END_BLOCK)
        assert msa(answer) == "MSA|AA|AFTER-KILL"
    finally:
        stop_engine(engine)


def test_sighup_reloads_child_rules(engine: RunningEngine) -> None:
    try:
        wait_until(lambda: started_lines(engine) == 2, "both intake processes started")

        engine.process.send_signal(signal.SIGHUP)

        def reloaded(marker: str) -> list[str]:
            return [line for line in log(engine) if f"rules reloaded ({marker})" in line]

        wait_until(
            lambda: len(reloaded("the engine reloaded its rules")) == 2, "both children reload"
        )
        assert len(reloaded("SIGHUP")) == 1
        children = reloaded("the engine reloaded its rules")
        assert sum("[intake 1]" in line for line in children) == 1
        assert sum("[intake 2]" in line for line in children) == 1
    finally:
        stop_engine(engine)


def test_child_refuses_rules_engine_has_not_loaded(tmp_path: Path) -> None:
    folder = tmp_path / "engine"
    config, port = write_intake_config(folder, str(folder / "fdqr.sqlite"), {"processes": 2})
    settings = yaml.safe_load(config.read_text())
    # Copies of the shipped routes and rules, which this test edits.
    for key in ("routes", "rules"):
        shutil.copytree(settings[key], tmp_path / key)
        settings[key] = str(tmp_path / key)
    settings["rules_reload_seconds"] = 0
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    engine = RunningEngine(
        EngineProcess(config, port, folder / "engine.log"), port, folder / "fdqr.sqlite"
    )
    engine.process.start()
    try:
        children = intake_children(engine)
        wait_until(lambda: started_lines(engine) == 2, "both intake processes started")
        orders = tmp_path / "routes" / "orders.yaml"
        orders.write_text(
            orders.read_text().replace("sending_application: RIS", "sending_application: RISX")
        )

        for pid in children:
            os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: (
                sum("differ from the rules the engine runs" in line for line in log(engine)) >= 2
            ),
            "both children refuse the files the engine has not loaded",
        )
        # The engine serves the order with the rules it runs, which still take RIS orders.
        assert send_orders(engine, "OLD-RULES", connections=1, each=1) == ["MSA|AA|OLD-RULES-0-0"]
        assert engine.jobs_of("OLD-RULES-0-0") == 1

        engine.process.send_signal(signal.SIGHUP)
        wait_until(lambda: started_lines(engine) == 4, "both children start with the new rules")
        answers = send_orders(engine, "NEW-RULES", connections=2, each=1)
        assert answers == ["MSA|AA|NEW-RULES-0-0", "MSA|AA|NEW-RULES-1-0"]
        assert engine.jobs_of("NEW-RULES-0-0") == 0
        assert engine.jobs_of("NEW-RULES-1-0") == 0
    finally:
        stop_engine(engine)


def test_changed_settings_refused_by_children(
    engine: RunningEngine,
) -> None:
    try:
        children = intake_children(engine)
        wait_until(lambda: started_lines(engine) == 2, "both intake processes started")
        config = engine.store.parent / "engine.yaml"
        settings = yaml.safe_load(config.read_text())
        settings["mllp"]["idle_timeout_seconds"] = 601
        config.write_text(yaml.safe_dump(settings, sort_keys=False))

        for pid in children:
            os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: sum("changed since the engine started" in line for line in log(engine)) >= 2,
            "both children refuse to start",
        )

        answers = send_orders(engine, "MEANWHILE", connections=2, each=2)
        assert answers == [f"MSA|AA|MEANWHILE-{n}-{t}" for t in range(2) for n in range(2)]
        assert any(
            "no intake process can take a connection; the engine process serves it" in line
            for line in log(engine)
        )
        assert engine.jobs_of("MEANWHILE-1-1") == 1
    finally:
        stop_engine(engine)


def started_pid(engine: RunningEngine, number: int) -> int:
    """The process id that intake process `number` logged at its last start."""
    marker = f"intake process {number} started (process id "
    [*_, line] = [line for line in log(engine) if marker in line]
    return int(line.split(marker)[1].rstrip(")"))


def test_stopped_child_gets_no_connections(engine: RunningEngine) -> None:
    intake_children(engine)
    wait_until(lambda: started_lines(engine) == 2, "both intake processes started")
    first, second = started_pid(engine, 1), started_pid(engine, 2)
    os.kill(first, signal.SIGSTOP)
    try:
        # Longer than the 3 s a ping may wait for its response.
        time.sleep(4.5)

        answers = send_orders(engine, "STOPPED", connections=4, each=1)

        assert answers == [f"MSA|AA|STOPPED-{n}-0" for n in range(4)]
        stored = [line for line in log(engine) if "stored ORM^O01 STOPPED-" in line]
        assert len(stored) == 4
        assert all("[intake 2]" in line for line in stored)
    finally:
        os.kill(first, signal.SIGCONT)
        stop_engine(engine)
    assert not alive(second)
