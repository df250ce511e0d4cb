"""Hot reload of the rule set on SIGHUP or when one of its files changes.

A new rule set is loaded and checked whole, then swapped in with one
assignment, so a message or job sees either the old set or the new one, never
a mix. A set with errors is rejected, every error is logged, and the running
set stays in place.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from engine.configfile import ConfigError
from engine.rules.model import RuleSet

logger = logging.getLogger(__name__)

FileState = tuple[tuple[str, int, int], ...]


def file_state(paths: Sequence[Path]) -> FileState:
    """Return the name, modification time and size of each file, to detect changes."""
    state = []
    for path in sorted(paths):
        try:
            info = path.stat()
        except OSError:
            state.append((str(path), -1, -1))
            continue
        state.append((str(path), info.st_mtime_ns, info.st_size))
    return tuple(state)


def content_digest(paths: Sequence[Path]) -> str:
    """Return a digest of the files' names and contents; a missing file counts as empty."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        try:
            content = path.read_bytes()
        except OSError:
            content = b""
        digest.update(f"{path}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


class RuleSetHolder:
    """The current rule set, replaced as a whole by reload().

    digest is content_digest of the files the current set was loaded from, read
    just after they were loaded. Intake processes compare it with their own, so
    that they never plan with other rules than the engine's. A file changed
    during a load makes the digest newer than the set; the next check of the
    files loads it again.
    """

    def __init__(
        self,
        rule_set: RuleSet,
        load: Callable[[], RuleSet],
        files: Callable[[], Sequence[Path]],
    ) -> None:
        self._current = rule_set
        self._load = load
        self._files = files
        self._state = file_state(files())
        self.digest = content_digest(files())
        self.reloads = 0
        self.rejected = 0
        # Called after each reload that swapped in a new set.
        self.listeners: list[Callable[[], None]] = []

    def current(self) -> RuleSet:
        return self._current

    def reload(self, reason: str) -> bool:
        """Load and check the rule set again; swap it in if valid. Return True if swapped."""
        self._state = file_state(self._files())
        try:
            new = self._load()
        except ConfigError as error:
            self.rejected += 1
            logger.error(
                "rules reload (%s) rejected, %d problem(s); the running rules stay in place",
                reason,
                len(error.problems),
            )
            for problem in error.problems:
                logger.error("  %s", problem)
            return False
        lost = [kind for kind in ("routes", "rules") if getattr(self._current, kind)]
        lost = [kind for kind in lost if not getattr(new, kind)]
        if lost:
            # An editor that truncates a file before writing it, or a file moved away,
            # would otherwise stop every prefetch without an error.
            self.rejected += 1
            logger.error(
                "rules reload (%s) rejected: the %s folder now defines none, so no order"
                " would create a job; the running rules stay in place (restart the engine"
                " to run without them)",
                reason,
                " and ".join(lost),
            )
            return False
        self._current = new
        self.digest = content_digest(self._files())
        self.reloads += 1
        logger.info(
            "rules reloaded (%s): %d routes, %d rules", reason, len(new.routes), len(new.rules)
        )
        for listener in self.listeners:
            listener()
        return True

    def check_files(self) -> bool:
        """Reload if a file was added, removed or changed since the last load."""
        state = file_state(self._files())
        if state == self._state:
            return False
        changed = {entry[0] for entry in set(state) ^ set(self._state)}
        names = ", ".join(sorted(Path(name).name for name in changed))
        return self.reload(f"changed: {names}")


class RuleFileWatcher:
    """Checks the rule files for changes every `interval` seconds on the reactor's clock."""

    def __init__(self, holder: RuleSetHolder, clock: IReactorTime, interval: float = 2.0) -> None:
        self.holder = holder
        self._loop = task.LoopingCall(self._check)
        self._loop.clock = clock
        self.interval = interval

    def start(self) -> None:
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _check(self) -> None:
        try:
            self.holder.check_files()
        except Exception:
            logger.exception("checking the rule files for changes failed")
