"""An exclusive lock on the store and the spool for the lifetime of `fdqr run`.

Two engines on one store would both run the same jobs (each requeues the
other's running jobs at its start), and two on one spool would mix their
objects. The lock is an flock on a file next to the store file and next to the
spool folder, so the kernel releases it when the process ends, even on kill -9.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Collection
from pathlib import Path
from typing import IO


def lock_file_of(path: Path) -> Path:
    """Return the lock file of a store file or spool folder, e.g. fdqr.sqlite.lock."""
    return path.with_name(path.name + ".lock")


class LockedError(Exception):
    """Another process holds the lock."""


def holder_of(path: Path) -> str | None:
    """Return the process id in a lock file that another process holds, else None.

    A lock file that this process holds through another RunLock also counts
    as held; callers leave their own lock files out.
    """
    try:
        handle = open(path)  # noqa: SIM115 (closed below)
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown"
        except OSError:
            return None
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None


def other_engine_spool(spool: Path, own_locks: Collection[Path]) -> str | None:
    """Return why a spool folder overlaps the spool of another running engine, else None.

    A spool inside another one, or holding another one, lets one engine count
    and clean up the other's files. Another engine's spool is found by its
    held lock file: next to an enclosing folder, or inside this spool.
    """
    own = {path.resolve() for path in own_locks}
    for folder in spool.parents:
        if not folder.name:
            continue
        lock = folder.with_name(folder.name + ".lock")
        holder = holder_of(lock) if lock.resolve() not in own else None
        if holder is not None:
            return (
                f"the spool {spool} is inside the spool {folder} of another fdqr engine"
                f" (process {holder}, lock file {lock})"
            )
    if spool.is_dir():
        for lock in spool.rglob("*.lock"):
            holder = holder_of(lock) if lock.resolve() not in own else None
            if holder is not None:
                inner = lock.with_name(lock.name.removesuffix(".lock"))
                return (
                    f"the spool {spool} contains the spool {inner} of another fdqr engine"
                    f" (process {holder}, lock file {lock})"
                )
    return None


class RunLock:
    """An exclusive flock on one file, with the holder's process id written in it."""

    def __init__(self, path: Path, description: str) -> None:
        self.path = path
        self.description = description
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise LockedError naming the path and the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (closed in release)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise LockedError(
                f"{self.description} is in use by another fdqr engine (process {holder}, lock file"
                f" {self.path}); stop that engine, or give this one its own store.path and"
                " spool.path"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
