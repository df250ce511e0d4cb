"""Deleting spooled objects that no job will send any more.

A job can end done or cancelled while objects of it wait in the spool: the
destination was down and then its order was cancelled, or a later attempt no
longer selected the study. Nothing sends those objects, and they would fill
the bounded spool.
The sweep deletes them at start-up and then once a minute. Objects of
failed or partial jobs are kept, because `fdqr jobs requeue` sends them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from engine.jobs.spool import Spool
from engine.jobs.store import AsyncStore, JobState

logger = logging.getLogger(__name__)

# Jobs in these states send nothing more.
ENDED_STATES = frozenset({JobState.DONE, JobState.CANCELLED})


class SpoolSweep:
    def __init__(
        self,
        spool: Spool,
        db: AsyncStore,
        clock: IReactorTime,
        every_seconds: float = 60.0,
        in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
    ) -> None:
        self.spool = spool
        self.db = db
        # Runs the blocking deletion of files outside the reactor thread.
        self.in_thread = in_thread
        self.every_seconds = every_seconds
        self._loop = task.LoopingCall(self.sweep)
        self._loop.clock = clock
        self._running: defer.Deferred[int] | None = None

    def start(self) -> None:
        self._loop.start(self.every_seconds, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def sweep(self) -> defer.Deferred[int]:
        """Delete the spooled objects of ended jobs; return how many were deleted."""
        if self._running is not None:
            # A sweep is under way; it covers this request too.
            return defer.succeed(0)
        running = self._sweep()
        self._running = running

        def ended(result: int | Failure) -> int:
            self._running = None
            if isinstance(result, Failure):
                logger.error("sweeping the spool failed: %s", result.getErrorMessage())
                return 0
            return result

        return running.addBoth(ended)

    @defer.inlineCallbacks
    def _sweep(self) -> Generator[defer.Deferred[Any], Any, int]:
        job_ids = self.spool.job_ids()
        if not job_ids:
            return 0
        states: dict[int, JobState] = yield self.db.run(lambda store: store.job_states(job_ids))
        deleted = 0
        for job_id, state in sorted(states.items()):
            if state not in ENDED_STATES:
                continue
            count: int = yield self.in_thread(self.spool.discard_job, job_id)
            if count:
                logger.warning(
                    "spool: deleted %d objects of job %d, which is %s; they were not sent",
                    count,
                    job_id,
                    state.value,
                )
            deleted += count
        return deleted
