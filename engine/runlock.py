"""An exclusive lock on the store and the spool for the lifetime of `fdqr run`.

Two engines on one store would both run the same jobs (each requeues the
other's running jobs at its start), and two on one spool would mix their
objects. The lock is an flock on a file next to the store file and next to the
spool folder, so the kernel releases it when the process ends, even on kill -9.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class LockedError(Exception):
    """Another process holds the lock."""


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
