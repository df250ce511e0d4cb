"""Run locks and spools of other engines: a spool inside or around another one is refused."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.runlock import LockedError, RunLock, holder_of, other_engine_spool


@pytest.fixture
def held(tmp_path: Path) -> Iterator[list[RunLock]]:
    """Locks taken in the test, as another engine would hold them; released at the end."""
    locks: list[RunLock] = []
    yield locks
    for lock in locks:
        lock.release()


def hold(locks: list[RunLock], path: Path) -> None:
    lock = RunLock(path, "test")
    lock.acquire()
    locks.append(lock)


def test_second_lock_on_same_file_refused(tmp_path: Path, held: list[RunLock]) -> None:
    hold(held, tmp_path / "spool.lock")
    with pytest.raises(
        LockedError, match=f"test is in use by another fdqr engine \\(process {os.getpid()}"
    ):
        RunLock(tmp_path / "spool.lock", "test").acquire()


def test_spool_inside_spool_of_another_engine(tmp_path: Path, held: list[RunLock]) -> None:
    hold(held, tmp_path / "spool.lock")
    inner = tmp_path / "spool" / "engine-b"
    assert other_engine_spool(inner, [tmp_path / "spool" / "engine-b.lock"]) == (
        f"the spool {inner} is inside the spool {tmp_path / 'spool'} of another fdqr engine"
        f" (process {os.getpid()}, lock file {tmp_path / 'spool.lock'})"
    )


def test_spool_around_spool_of_another_engine(tmp_path: Path, held: list[RunLock]) -> None:
    outer = tmp_path / "spool"
    (outer / "job-1").mkdir(parents=True)
    hold(held, outer / "engine-b.lock")
    reason = other_engine_spool(outer, [tmp_path / "spool.lock"])
    assert reason is not None
    assert reason.startswith(f"the spool {outer} contains the spool {outer / 'engine-b'}")


def test_stale_and_own_lock_files_ignored(tmp_path: Path, held: list[RunLock]) -> None:
    outer = tmp_path / "spool"
    outer.mkdir()
    # Left by an engine killed with -9: the file stays, the lock does not.
    (outer / "old.lock").write_text("12345\n")
    # The engine's own store lock, with the store file inside the spool folder.
    hold(held, outer / "fdqr.sqlite.lock")
    assert holder_of(outer / "old.lock") is None
    assert other_engine_spool(outer, [outer / "fdqr.sqlite.lock"]) is None
