"""`fdqr run` with store.retention_days: old messages go at start, new ones stay."""

from __future__ import annotations

import datetime as dt
import socket
import time
from pathlib import Path

import yaml

from engine.jobs.store import MessageWrite, Store
from engine.model import MessageOrigin
from engine.testing.intake import INTAKE_PATIENT, write_intake_config
from engine.testing.scenario import order_message
from engine.testing.sites import EngineProcess
from tests.integration.test_hl7_intake import exchange, frame_of, msa


def test_engine_deletes_messages_past_retention(tmp_path: Path) -> None:
    store_path = tmp_path / "fdqr.sqlite"
    config, port = write_intake_config(tmp_path, str(store_path), {"processes": 2})
    settings = yaml.safe_load(config.read_text())
    settings["store"]["retention_days"] = 30
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    store = Store(store_path)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=31)
    write = MessageWrite(
        MessageOrigin("RIS", "RAD", "ORM^O01", "OLD-1"),
        "127.0.0.1:1",
        b"MSH|",
        b"ACK",
        "ok",
        [],
        old,
    )
    store.record_messages([write])
    store.close()

    engine = EngineProcess(config, port, tmp_path / "engine.log")
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while "retention: deleted 0 finished jobs and 1 messages" not in engine.log_text():
            assert time.monotonic() < deadline, engine.log_text()[-3000:]
            time.sleep(0.1)
        message = order_message(INTAKE_PATIENT, "NEW-1", "ACC-NEW-1", dt.datetime.now())
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            assert msa(exchange(connection, frame_of(message))) == "MSA|AA|NEW-1"
    finally:
        assert engine.stop() == 0, engine.log_text()[-3000:]

    store = Store(store_path)
    try:
        assert [m.origin.control_id for m in store.list_messages()] == ["NEW-1"]
    finally:
        store.close()
