"""Stopping retrievals in progress that must not go on: a moved identifier, a cancelled job.

A retrieval is stopped through the ExpectationRegistry: the objects that still
arrive are rejected, and those waiting in the spool are deleted unsent.
"""

from __future__ import annotations

from twisted.internet import defer

from engine.identity import records
from engine.jobs.receiving import NO_JOB, Expectation, ExpectationRegistry
from engine.jobs.store import AsyncStore, Store
from engine.model import PatientIdentifier


class RetrievalGuard:
    def __init__(self, db: AsyncStore, registry: ExpectationRegistry) -> None:
        self.db = db
        self.registry = registry

    def stop_moved(self, expectations: list[Expectation] | None = None) -> defer.Deferred[None]:
        """Stop each retrieval whose remote patient now belongs to another local patient.

        An ADT message can give a learned remote ID to another local patient
        while that ID's study is retrieved and stamped with the job's patient.
        Called after each ADT message that changed patient records (for every
        retrieval in progress), and by each retrieval once it is registered, so
        a move committed at any time before or during it is seen.
        """
        running = self.registry.active() if expectations is None else expectations
        if not running:
            return defer.succeed(None)

        def owners(store: Store) -> list[tuple[Expectation, PatientIdentifier]]:
            found = [
                (
                    expectation,
                    records.moved_owner(store, expectation.stamp.local, expectation.remote),
                )
                for expectation in running
            ]
            return [(expectation, owner) for expectation, owner in found if owner is not None]

        def stop(found: list[tuple[Expectation, PatientIdentifier]]) -> None:
            for expectation, owner in found:
                self.registry.stop(
                    expectation, f"identifier {expectation.remote} was moved to patient {owner}"
                )

        return self.db.run(owners).addCallback(stop)

    def stop_cancelled(self) -> defer.Deferred[None]:
        """Stop each retrieval whose job a person or an order cancel asked to cancel.

        The objects already stored are the right patient's, so they are not suspect.
        """
        running = [e for e in self.registry.active() if e.job_id != NO_JOB]
        if not running:
            return defer.succeed(None)

        def stop(reasons: dict[int, str]) -> None:
            for expectation in running:
                reason = reasons.get(expectation.job_id)
                if reason is not None:
                    self.registry.stop(
                        expectation, f"its job was cancelled ({reason})", stored_suspect=False
                    )

        job_ids = sorted({expectation.job_id for expectation in running})
        return self.db.run(lambda store: store.cancellations(job_ids)).addCallback(stop)
