"""Prometheus metrics of a running engine, in a registry of its own.

Counters are incremented where the work happens, from any thread. The job
counts by state are read from the store every `refresh_seconds`, not at
scrape time, so a scrape never waits for the store thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from engine.hl7.ack import ack_code
from engine.jobs.store import AsyncStore, JobState, StudyState

logger = logging.getLogger(__name__)

# MSA-1 codes of original and enhanced acknowledgement mode.
ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")


# The states a study's fetch ends in, which fdqr_studies_total counts. Skipped
# studies (not selected by the rule) and held ones are in the job's table only.
FETCH_ENDS = (StudyState.STORED, StudyState.PRESENT, StudyState.INCOMPLETE, StudyState.FAILED)


class EngineMetrics:
    """The engine's counters and gauges, named as Prometheus conventions ask (fdqr_...)."""

    def __init__(self, spool_bytes: Callable[[], float] = lambda: 0) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.hl7_messages = Counter(
            "fdqr_hl7_messages",
            "HL7 messages answered, by the MSA-1 code of the first acknowledgement"
            " (none: acknowledgements, which get no ACK)",
            ["ack"],
            registry=self.registry,
        )
        self._by_code = {code: self.hl7_messages.labels(code) for code in ACK_CODES}
        self._no_ack = self.hl7_messages.labels("none")

        self.hl7_duplicates = Counter(
            "fdqr_hl7_duplicates",
            "HL7 messages answered with the stored ACK of an earlier copy",
            registry=self.registry,
        )
        self.jobs = Gauge(
            "fdqr_jobs",
            "Jobs in the store, by state, as of the last refresh",
            ["state"],
            registry=self.registry,
        )

        self.jobs_finished = Counter(
            "fdqr_jobs_finished",
            "Jobs the engine ended in a final state since it started, by state",
            ["state"],
            registry=self.registry,
        )
        self.studies = Counter(
            "fdqr_studies",
            "Studies that job attempts fetched or found at the destination, by state",
            ["state"],
            registry=self.registry,
        )
        self.instances_stored = Counter(
            "fdqr_instances_stored",
            "Instances stored to destinations by job attempts",
            registry=self.registry,
        )
        self.audit_records_lost = Counter(
            "fdqr_audit_records_lost",
            "Audit records a sink did not take (write error, repository unreachable too long),"
            " by sink",
            ["sink"],
            registry=self.registry,
        )
        spool = Gauge(
            "fdqr_spool_bytes",
            "Bytes of received objects in the spool, waiting for their destination",
            registry=self.registry,
        )
        spool.set_function(spool_bytes)

        for state in JobState:
            self.jobs.labels(state.value)
            # A suppressed job is stored so by intake; the worker never ends one.
            if state.finished and state != JobState.SUPPRESSED:
                self.jobs_finished.labels(state.value)
        for study_state in FETCH_ENDS:
            self.studies.labels(study_state.value)

    def answered(self, acks: Any) -> None:
        """Count one HL7 message by the MSA-1 code of its first acknowledgement."""
        self.answered_code(ack_code(acks[0]) if acks else None)

    def answered_code(self, code: str | None, count: int = 1) -> None:
        """Count HL7 messages by the MSA-1 code of their first acknowledgement, None for none."""
        if code is None:
            self._no_ack.inc(count)
            return
        counter = self._by_code.get(code)
        if counter is not None:
            counter.inc(count)

    def job_finished(self, state: JobState) -> None:
        self.jobs_finished.labels(state.value).inc()

    def study_ended(self, state: StudyState, stored: int) -> None:
        self.studies.labels(state.value).inc()
        self.instances_stored.inc(stored)

    def set_job_counts(self, counts: dict[str, int]) -> None:
        for state in JobState:
            self.jobs.labels(state.value).set(counts.get(state.value, 0))


class JobCountRefresh:
    """A timer that copies the job counts by state from the store into the fdqr_jobs gauge."""

    def __init__(
        self, db: AsyncStore, metrics: EngineMetrics, clock: IReactorTime, refresh_seconds: float
    ) -> None:
        self.db = db
        self.metrics = metrics
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = clock
        self.refresh_seconds = refresh_seconds

    def start(self) -> None:
        self._loop.start(self.refresh_seconds, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def refresh(self) -> Any:
        counted = self.db.run(lambda store: store.job_counts())
        counted.addCallback(self.metrics.set_job_counts)
        counted.addErrback(self._failed)
        return counted

    def _failed(self, failure: Failure) -> None:
        logger.error("reading job counts for the metrics failed: %s", failure.getErrorMessage())
