"""The spool: received, stamped objects waiting on disk until the destination confirms them.

Objects of one study live in `<root>/job-<id>/<StudyInstanceUID>/<SOPInstanceUID>.dcm`.
A file leaves the spool only through `confirm`, which the pipeline calls after
the destination answered its C-STORE with success or warning. The spool is
bounded: `reserve` makes the Storage SCP wait while it is full.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

SPOOL_SUFFIX = ".dcm"
# The folder of the federated Q/R SCP's retrieves, under the spool's root.
FEDERATION_FOLDER = "federation"
PARTIAL_SUFFIX = ".partial"


class SpoolFull(Exception):
    """The spool stayed full for the whole wait."""


class Spool:
    """Size accounting and folder layout of the spool; safe to use from any thread."""

    def __init__(self, root: Path, max_bytes: int, full_wait_seconds: float = 20.0) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.full_wait_seconds = full_wait_seconds
        self._used = 0
        self._condition = threading.Condition()

    def open(self) -> None:
        """Create the root, remove what a crash left, and count what is spooled.

        A crash leaves partial files, and the folders of federated retrieves:
        their callers' associations ended with the process, so nothing would
        send those objects (and a later retrieve must not send them either).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        federation = self.root / FEDERATION_FOLDER
        if federation.is_dir():
            left = sum(1 for path in federation.rglob(f"*{SPOOL_SUFFIX}") if path.is_file())
            shutil.rmtree(federation, ignore_errors=True)
            if left:
                logger.info("spool: deleted %d objects of federated retrieves that ended", left)
        used = 0
        for path in self.root.rglob("*"):
            if not path.is_file():
                continue
            if path.name.endswith(PARTIAL_SUFFIX):
                path.unlink(missing_ok=True)
                continue
            used += path.stat().st_size
        with self._condition:
            self._used = used
        logger.info("spool %s holds %d bytes (limit %d)", self.root, used, self.max_bytes)

    @property
    def used_bytes(self) -> int:
        with self._condition:
            return self._used

    def job_dir(self, job_id: int) -> Path:
        return self.root / f"job-{job_id}"

    def study_dir(self, job_id: int, study_instance_uid: str) -> Path:
        return self.job_dir(job_id) / study_instance_uid

    def reserve(self, size: int, stopping: Callable[[], bool] = lambda: False) -> None:
        """Account `size` bytes for an object about to be written; wait while the spool is full.

        An object larger than the whole spool is let in when the spool is empty,
        so one big object never blocks forever. Raises SpoolFull after
        full_wait_seconds.
        """
        deadline = time.monotonic() + self.full_wait_seconds
        with self._condition:
            while self._used > 0 and self._used + size > self.max_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or stopping():
                    raise SpoolFull(f"spool full: {self._used} of {self.max_bytes} bytes in use")
                self._condition.wait(min(remaining, 0.5))
            self._used += size

    def release(self, size: int) -> None:
        """Return bytes reserved for an object that was not written or was removed."""
        with self._condition:
            self._used = max(0, self._used - size)
            self._condition.notify_all()

    def adjust(self, reserved: int, actual: int) -> None:
        """Correct a reservation once the written size of the object is known."""
        with self._condition:
            self._used = max(0, self._used + actual - reserved)
            if actual < reserved:
                self._condition.notify_all()

    def confirm(self, path: Path) -> None:
        """Remove an object the destination confirmed, and free its space."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        path.unlink(missing_ok=True)
        self.release(size)

    def pending(self, study_dir: Path) -> list[Path]:
        """Return the spooled objects of a study, in name order."""
        if not study_dir.is_dir():
            return []
        return sorted(
            path
            for path in study_dir.iterdir()
            if path.name.endswith(SPOOL_SUFFIX) and path.is_file()
        )

    def remove_if_empty(self, study_dir: Path) -> None:
        """Remove a study folder, and its job folder, once no object waits in them."""
        for folder in (study_dir, study_dir.parent):
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                return

    def job_ids(self) -> list[int]:
        """Return the ids of the jobs that have a folder in the spool."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in self.root.iterdir():
            prefix, _, number = folder.name.partition("-")
            if prefix == "job" and number.isdigit() and folder.is_dir():
                found.append(int(number))
        return sorted(found)

    def discard_job(self, job_id: int) -> int:
        """Delete a job's folder whatever it holds; return how many objects were in it."""
        return self.discard(self.job_dir(job_id))

    def discard(self, folder: Path) -> int:
        """Delete a folder of the spool and free its space; return how many objects were in it."""
        files = [path for path in folder.rglob("*") if path.is_file()]
        size = sum(file_size(path) for path in files)
        shutil.rmtree(folder, ignore_errors=True)
        self.release(size)
        return sum(1 for path in files if path.name.endswith(SPOOL_SUFFIX))

    def discard_study(self, study_dir: Path) -> None:
        """Delete a study folder whatever it holds (only for objects that must not be sent)."""
        size = sum(path.stat().st_size for path in study_dir.glob("*") if path.is_file())
        shutil.rmtree(study_dir, ignore_errors=True)
        self.release(size)
        self.remove_if_empty(study_dir)


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
