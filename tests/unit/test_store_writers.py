"""Durable commits and the write lock that several processes writing one store share."""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from engine.identity import records
from engine.jobs import store as store_module
from engine.jobs.store import AsyncStore, MessageWrite, Store, write_lock_file
from engine.model import MessageOrigin, PatientIdentifier
from tests.conftest import NOW
from tests.unit.test_jobs import new_job


def origin(control_id: str) -> MessageOrigin:
    return MessageOrigin("RIS", "RAD", "ORM^O01", control_id)


@dataclasses.dataclass
class Sync:
    path: str
    lock_free: bool
    stored_messages: int


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[Sync]]:
    """Record each fdatasync: its file, whether the write lock was free, what others saw."""
    seen: list[Sync] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        with open(write_lock_file(tmp_path / "fdqr.sqlite"), "ab") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                free = False
            else:
                free = True
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        with sqlite3.connect(tmp_path / "fdqr.sqlite") as other:
            count = int(other.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        seen.append(Sync(path, free, count))
        real(fd)

    monkeypatch.setattr(store_module.os, "fdatasync", fdatasync)
    yield seen


def test_stored_message_synced_after_unlock(store: Store, syncs: list[Sync]) -> None:
    store.record_message(origin("C1"), "peer", b"msg", b"ACK", "ok", [], NOW)

    assert syncs == [Sync(f"{store.path}-wal", True, 1)]


def test_job_bookkeeping_is_not_synced(store: Store, syncs: list[Sync]) -> None:
    store.add_event(store.add_job(new_job(), NOW), "bookkeeping", NOW)

    assert syncs == []


def test_without_wal_messages_commit_full(store: Store, syncs: list[Sync]) -> None:
    # As on a file system where SQLite keeps its rollback journal.
    store._wal = None
    seen: list[int] = []

    def read_synchronous(target: Store, now: dt.datetime) -> str:
        with target.transaction() as db:
            seen.append(int(db.execute("PRAGMA synchronous").fetchone()[0]))
        return "checked"

    store.record_message(origin("C1"), "peer", b"msg", b"ACK", "ok", [], NOW, [read_synchronous])
    with store.transaction() as db:
        afterwards = int(db.execute("PRAGMA synchronous").fetchone()[0])

    # SQLite's synchronous levels: 1 NORMAL, 2 FULL (fsync at every commit).
    assert (seen, afterwards, syncs) == ([2], 1, [])


def test_writer_waits_for_write_lock(store: Store) -> None:
    done = threading.Event()
    with open(write_lock_file(store.path), "ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        writer = threading.Thread(
            target=lambda: (
                store.record_message(origin("C1"), "peer", b"msg", b"ACK", "ok", [], NOW),
                done.set(),
            )
        )
        writer.start()
        assert not done.wait(0.3)
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)
    assert done.wait(5)
    writer.join()
    assert [message.origin.control_id for message in store.list_messages()] == ["C1"]


def test_reader_does_not_wait_for_write_lock(store: Store) -> None:
    patient = PatientIdentifier("L1", "LOCAL")
    records.learn(store, patient, PatientIdentifier("R1", "HOSP_A"), NOW, "ADT1")
    with open(write_lock_file(store.path), "ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        # Another process is writing; reads go on from the last commit.
        found: list[object] = []
        reader = threading.Thread(
            target=lambda: found.append(records.learned_remote(store, patient, "HOSP_A"))
        )
        reader.start()
        reader.join(5)
        assert found == [PatientIdentifier("R1", "HOSP_A")]
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)


def test_reading_sees_one_snapshot_and_joins_transaction(store: Store, tmp_path: Path) -> None:
    with store.reading() as db:
        before = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        writer = Store(tmp_path / "fdqr.sqlite")
        writer.record_message(origin("C1"), "peer", b"msg", b"ACK", "ok", [], NOW)
        writer.close()
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == before
    assert len(store.list_messages()) == before + 1
    with store.transaction() as db:
        db.execute("INSERT INTO worklist_steps VALUES ('n', 'k', NULL, '{}', 'a', 'a', NULL)")
        with store.reading() as joined:
            assert joined.execute("SELECT COUNT(*) FROM worklist_steps").fetchone()[0] == 1
    assert store._db.execute("SELECT COUNT(*) FROM worklist_steps").fetchone()[0] == 1


def test_write_inside_reading_raises(store: Store) -> None:
    # It would write without the write lock that other processes take.
    with store.reading(), pytest.raises(RuntimeError, match=r"inside Store\.reading"):
        store.add_event(1, "text", NOW)
    store.record_message(origin("C1"), "peer", b"msg", b"ACK", "ok", [], NOW)
    assert len(store.list_messages()) == 1


class RecordingStore(Store):
    """A Store that records the size of each batch of messages it writes."""

    batches: list[int]

    def record_messages(self, writes: Any) -> Any:
        def counted() -> Sequence[MessageWrite]:
            batch = writes() if callable(writes) else writes
            self.batches.append(len(batch))
            return batch

        return super().record_messages(counted)


class Reactor:
    def callFromThread(self, function: Any, *args: Any) -> None:
        function(*args)


def test_batch_gathers_messages_during_lock_wait(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "fdqr.sqlite")
    store.batches = []
    db = AsyncStore(Reactor(), store)  # type: ignore[arg-type]
    db.start()
    try:
        with open(write_lock_file(store.path), "ab") as other:
            fcntl.flock(other.fileno(), fcntl.LOCK_EX)
            results = [
                db.record_message(
                    MessageWrite(origin(f"C{number}"), "peer", b"msg", b"ACK", "ok", [], NOW)
                )
                for number in range(3)
            ]
            fcntl.flock(other.fileno(), fcntl.LOCK_UN)
        ended = threading.Event()
        for result in results:
            result.addBoth(lambda _: ended.set() if all(r.called for r in results) else None)
        assert ended.wait(5)
    finally:
        db.stop()
    assert store.batches == [3]


def test_write_lock_file_without_write_access(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As when another user (a CLI run as root) created the lock file first.
    real_open = open

    def no_write_access(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith(".write-lock") and "a" in mode:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    write_lock_file(tmp_path / "fdqr.sqlite").touch()
    monkeypatch.setattr("builtins.open", no_write_access)
    store = Store(tmp_path / "fdqr.sqlite")
    try:
        store.record_message(origin("C1"), "peer", b"msg", b"ACK", "ok", [], NOW)
        assert [message.origin.control_id for message in store.list_messages()] == ["C1"]
    finally:
        store.close()
