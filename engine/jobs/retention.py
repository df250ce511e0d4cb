"""The retention period of the store: old messages and finished jobs are deleted.

With store.retention_days set, the engine deletes, once an hour, the
messages received and the finished jobs created and last changed more than
that many days ago (see Store.prune). It deletes in small batches,
each in a transaction of its own, so intake and jobs wait at most one batch
for the store.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from engine.jobs.store import PRUNE_BATCH, AsyncStore
from engine.rules.timing import format_timespan

logger = logging.getLogger(__name__)

EVERY_SECONDS = 3600.0
# Pause between two batches, so other store work runs in between.
BATCH_PAUSE_SECONDS = 0.2


class Retention:
    def __init__(
        self,
        db: AsyncStore,
        days: int,
        clock: IReactorTime,
        now: Callable[[], dt.datetime],
        every_seconds: float = EVERY_SECONDS,
        batch: int = PRUNE_BATCH,
    ) -> None:
        self.db = db
        self.days = days
        self.clock = clock
        self.now = now
        self._loop = task.LoopingCall(self.prune)
        self._loop.clock = clock
        self.every_seconds = every_seconds
        self.batch = batch
        self._running: defer.Deferred[tuple[int, int]] | None = None
        self._stopped = False

    def start(self) -> None:
        logger.info(
            "retention: messages and finished jobs older than %s are deleted every %s",
            _days(self.days),
            format_timespan(dt.timedelta(seconds=self.every_seconds)),
        )
        self._loop.start(self.every_seconds, now=True)

    def stop(self) -> None:
        # A batch under way ends; no further batch starts.
        self._stopped = True
        if self._loop.running:
            self._loop.stop()

    def prune(self) -> defer.Deferred[tuple[int, int]]:
        """Delete what the retention period has passed; return (jobs, messages) deleted."""
        if self._running is not None:
            # A pass is under way; it covers this request too.
            return defer.succeed((0, 0))
        cutoff = self.now() - dt.timedelta(days=self.days)
        running = self._prune(cutoff)
        self._running = running

        def ended(result: tuple[int, int] | Failure) -> tuple[int, int]:
            self._running = None
            if isinstance(result, Failure):
                logger.error(
                    "deleting messages and jobs older than %d days failed: %s;"
                    " the next pass runs in %d s",
                    self.days,
                    result.getErrorMessage(),
                    self.every_seconds,
                )
                return 0, 0
            return result

        return running.addBoth(ended)

    @defer.inlineCallbacks
    def _prune(self, cutoff: dt.datetime) -> Generator[defer.Deferred[Any], Any, tuple[int, int]]:
        deleted = [0, 0]
        try:
            while not self._stopped:
                batch: tuple[int, int] = yield self.db.run(
                    lambda store: store.prune(cutoff, self.batch)
                )
                deleted[0] += batch[0]
                deleted[1] += batch[1]
                if max(batch) < self.batch:
                    break
                yield task.deferLater(self.clock, BATCH_PAUSE_SECONDS, lambda: None)
        finally:
            # Also when a batch failed or the engine stops: what was deleted is logged.
            if any(deleted):
                logger.info(
                    "retention: deleted %d finished jobs and %d messages from before %s"
                    " (older than %s)%s",
                    deleted[0],
                    deleted[1],
                    cutoff.isoformat(timespec="seconds"),
                    _days(self.days),
                    "; stopped with the engine, the rest goes at the next start"
                    if self._stopped
                    else "",
                )
        return deleted[0], deleted[1]


def _days(days: int) -> str:
    return "1 day" if days == 1 else f"{days} days"
