"""The job worker: claims due jobs from the store and runs them, with retry and backoff."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import sqlite3
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from engine.jobs.prefetch import Outcome
from engine.jobs.store import AsyncStore, JobRecord, JobState, Store

logger = logging.getLogger(__name__)
# Final states an operator should look at: logged as warnings.
UNSUCCESSFUL = frozenset({JobState.PARTIAL, JobState.FAILED, JobState.QUARANTINED})

JobRunner = Callable[[JobRecord], defer.Deferred[Outcome]]
CLAIM_ERROR_LOG_SECONDS = 60.0


def retry_delay(attempt: int, base_seconds: float, max_seconds: float) -> float:
    """Return the delay before the next attempt: doubling from base, capped at max."""
    return float(min(max_seconds, base_seconds * 2 ** max(0, attempt - 1)))


class Worker:
    """Runs up to `concurrency` jobs at once; wakes on new jobs and on a timer."""

    def __init__(
        self,
        db: AsyncStore,
        runner: JobRunner,
        clock: IReactorTime,
        *,
        concurrency: int = 2,
        max_attempts: int = 5,
        retry_base_seconds: float = 30,
        retry_max_seconds: float = 1800,
        poll_seconds: float = 5,
        on_finished: Callable[[JobState], None] = lambda state: None,
    ) -> None:
        self.db = db
        self.runner = runner
        self.clock = clock
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self.poll_seconds = poll_seconds
        # Called on the store thread with each final state a job reaches.
        self.on_finished = on_finished
        self._running: dict[int, defer.Deferred[None]] = {}
        self._claiming = False
        self._stopping = False
        self._poll: task.LoopingCall | None = None
        self._claim_failures = 0
        self._claim_failure_logged_at = -CLAIM_ERROR_LOG_SECONDS
        self._wake_call: IDelayedCall | None = None
        self._started = False

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock.seconds(), dt.UTC)

    @defer.inlineCallbacks
    def start(self) -> Generator[defer.Deferred[Any], Any, None]:
        now = self.now()
        requeued = yield self.db.run(lambda store: store.requeue_interrupted(now))
        if requeued:
            listed = ", ".join(str(job_id) for job_id in requeued[:20])
            more = f" and {len(requeued) - 20} more" if len(requeued) > 20 else ""
            logger.info(
                "requeued %d job(s) left unfinished by the last run: %s%s",
                len(requeued),
                listed,
                more,
            )
        self._started = True
        self._poll = task.LoopingCall(self.wake)
        self._poll.clock = self.clock
        self._poll.start(self.poll_seconds, now=True)

    def wake(self) -> None:
        """Claim due jobs soon; safe to call often and from any reactor callback.

        Before start() it does nothing: a job claimed then would be requeued by
        start() while it runs. start() claims at once anyway.
        """
        if not self._started:
            return
        if self._wake_call is None or not self._wake_call.active():
            self._wake_call = self.clock.callLater(0, self._claim)

    @property
    def running(self) -> int:
        return len(self._running)

    def _claim(self) -> None:
        free = self.concurrency - len(self._running)
        if self._stopping or self._claiming or free <= 0:
            return
        self._claiming = True
        now = self.now()
        claimed = self.db.run(lambda store: store.claim_due(now, free))
        claimed.addCallback(self._start_jobs)
        claimed.addErrback(self._claim_failed)

    def _claim_failed(self, failure: Failure) -> None:
        self._claiming = False
        self._claim_failures += 1
        # Claims run at each wake and poll, so a lasting store error is logged once a minute.
        now = self.clock.seconds()
        if now - self._claim_failure_logged_at >= CLAIM_ERROR_LOG_SECONDS:
            repeated = (
                f" ({self._claim_failures} failures so far)" if self._claim_failures > 1 else ""
            )
            logger.error("claiming jobs failed: %s%s", failure.getErrorMessage(), repeated)
            self._claim_failure_logged_at = now

    def _start_jobs(self, jobs: list[JobRecord]) -> None:
        self._claiming = False
        if self._claim_failures:
            logger.info("claiming jobs succeeded after %d failures", self._claim_failures)
            self._claim_failures = 0
            self._claim_failure_logged_at = -CLAIM_ERROR_LOG_SECONDS
        for job in jobs:
            logger.info("job %d: attempt %d started (rule %s)", job.id, job.attempts, job.rule)
            self._running[job.id] = self._run(job)

    @defer.inlineCallbacks
    def _run(self, job: JobRecord) -> Generator[defer.Deferred[Any], Any, None]:
        try:
            try:
                outcome = yield self.runner(job)
            except Exception as error:
                if self._stopping:
                    logger.info("job %d: interrupted by shutdown, resumes at next start", job.id)
                    return
                if isinstance(error, sqlite3.Error):
                    # E.g. a full disk: the store's error message names the cause, so no traceback.
                    logger.error("job %d: attempt failed: store error: %s", job.id, error)
                else:
                    logger.exception("job %d: attempt failed unexpectedly", job.id)
                outcome = Outcome(
                    JobState.FAILED, f"internal error: {type(error).__name__}: {error}", retry=True
                )
            yield self._record_until_written(job, outcome)
        except Exception:
            logger.exception("job %d: recording the outcome failed", job.id)
        finally:
            del self._running[job.id]
            if not self._stopping:
                self.wake()

    @defer.inlineCallbacks
    def _record_until_written(
        self, job: JobRecord, outcome: Outcome
    ) -> Generator[defer.Deferred[Any], Any, None]:
        """Record the outcome, trying again every poll_seconds while the store fails.

        Until it is written the job stays running in the store and keeps its slot here,
        so a full disk does not leave it running until the next start.
        """
        failures = 0
        while True:
            try:
                yield self._record(job, outcome)
            except Exception as error:
                failures += 1
                if self._stopping:
                    logger.error(
                        "job %d: recording the outcome failed (%s); it resumes at next start",
                        job.id,
                        error,
                    )
                    return
                if failures == 1:
                    logger.error(
                        "job %d: recording the outcome failed (%s); trying again every %ss",
                        job.id,
                        error,
                        self.poll_seconds,
                    )
                yield task.deferLater(self.clock, self.poll_seconds, lambda: None)
                continue
            if failures:
                logger.info("job %d: outcome recorded after %d failures", job.id, failures)
            return

    def _record(self, job: JobRecord, outcome: Outcome) -> defer.Deferred[None]:
        now = self.now()
        stopping = self._stopping

        def record(store: Store) -> None:
            # A cancel requested while the attempt ran stops any retry or deferral.
            cancel = store.cancellation(job.id)
            wants_more = outcome.retry or outcome.defer_until is not None
            if cancel and wants_more and outcome.state != JobState.CANCELLED:
                logger.info("job %d: cancelled while running", job.id)
                store.finish_job(job.id, JobState.CANCELLED, f"{cancel}; {outcome.summary}", now)
                self.on_finished(JobState.CANCELLED)
                return
            if cancel and not wants_more and outcome.state != JobState.CANCELLED:
                # The attempt finished its studies before it checked the cancel.
                late = dataclasses.replace(
                    outcome, summary=f"{outcome.summary}; {cancel} after the studies were fetched"
                )
                self._record_in_store(store, job, late, now, stopping)
                return
            if outcome.defer_until is not None and not stopping:
                logger.info("job %d: deferred until %s", job.id, outcome.defer_until.isoformat())
                store.defer_job(job.id, outcome.defer_until, outcome.summary, now)
                return
            self._record_in_store(store, job, outcome, now, stopping)

        return self.db.run(record)

    def _record_in_store(
        self, store: Store, job: JobRecord, outcome: Outcome, now: dt.datetime, stopping: bool
    ) -> None:
        # Each line is logged once its write succeeded: a store that fails (a full disk)
        # makes the worker try the write again every poll_seconds.
        if outcome.retry and job.attempts < self.max_attempts and not stopping:
            delay = retry_delay(job.attempts, self.retry_base_seconds, self.retry_max_seconds)
            when = now + dt.timedelta(seconds=delay)
            store.retry_job(job.id, when, outcome.summary, now)
            logger.warning("job %d: %s; retry in %.0f s", job.id, outcome.summary, delay)
        elif (outcome.retry or outcome.defer_until is not None) and stopping:
            # The shutdown cut the attempt short, so it does not count against max_attempts.
            summary = f"interrupted by the engine's shutdown: {outcome.summary}"
            store.retry_job(job.id, now, summary, now, count_attempt=False)
            logger.info("job %d: %s; resumes at next start", job.id, summary)
        else:
            store.finish_job(job.id, outcome.state, outcome.summary, now)
            level = logging.WARNING if outcome.state in UNSUCCESSFUL else logging.INFO
            logger.log(level, "job %d: %s: %s", job.id, outcome.state, outcome.summary)
            self.on_finished(outcome.state)

    def stop(self) -> defer.Deferred[Any]:
        """Stop claiming, and wait for the running jobs to end."""
        self._stopping = True
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        return defer.DeferredList(list(self._running.values()), consumeErrors=True)
