"""Per-source policies of the prefetch pipeline: how to query, when and how much to retrieve."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from twisted.internet import defer

from engine.rules.timing import LocalZone, QuietDecision, QuietWindow, quiet_decision

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SourcePolicy:
    """The query and retrieve policy of one source.

    modality_matching and date_matching set how candidate queries are built (see
    engine.dimse.queries.candidate_queries). max_retrieves limits the studies
    retrieved from the source at once across all jobs (None: no limit beyond the
    node's association limit). quiet_hours are windows without retrieves, or with
    only small studies.
    """

    modality_matching: str = "one_per_query"
    date_matching: str = "range"
    max_retrieves: int | None = None
    quiet_hours: tuple[QuietWindow, ...] = ()

    def quiet(self, zone: LocalZone, now: dt.datetime, instance_count: int | None) -> QuietDecision:
        return quiet_decision(self.quiet_hours, zone, now, instance_count)


class RetrieveSlots:
    """Limits how many retrieves run at once per source, across all jobs."""

    def __init__(self, policies: Mapping[str, SourcePolicy]) -> None:
        self._semaphores = {
            name: defer.DeferredSemaphore(policy.max_retrieves)
            for name, policy in policies.items()
            if policy.max_retrieves is not None
        }

    def run(
        self, source: str, function: Callable[..., defer.Deferred[T]], *args: Any
    ) -> defer.Deferred[T]:
        """Call `function` when the source has a free retrieve slot; free it when it ends."""
        semaphore = self._semaphores.get(source)
        if semaphore is None:
            return defer.maybeDeferred(function, *args)
        return semaphore.run(function, *args)

    def waiting(self, source: str) -> int:
        semaphore = self._semaphores.get(source)
        return len(semaphore.waiting) if semaphore is not None else 0


class StudyTurns:
    """Lets one job at a time fetch a study into a destination; other jobs wait their turn.

    Two orders for one patient often arrive together and select the same priors.
    The job that comes second then finds the study at the destination instead of
    retrieving it from the source again.
    """

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], defer.DeferredLock] = {}
        self._holders: dict[tuple[str, str], int] = {}

    def holder(self, destination: str, study_instance_uid: str) -> int | None:
        """Return the job fetching the study into the destination now, if any."""
        return self._holders.get((destination, study_instance_uid))

    def run(
        self,
        destination: str,
        study_instance_uid: str,
        job_id: int,
        function: Callable[..., defer.Deferred[T]],
        *args: Any,
    ) -> defer.Deferred[T]:
        """Call `function` when no other job fetches the study into the destination."""
        key = (destination, study_instance_uid)
        lock = self._locks.setdefault(key, defer.DeferredLock())

        def take_turn(_: object) -> defer.Deferred[T]:
            self._holders[key] = job_id
            return defer.maybeDeferred(function, *args)

        def end_turn(result: object) -> object:
            del self._holders[key]
            lock.release()
            if not lock.locked and not lock.waiting and self._locks.get(key) is lock:
                del self._locks[key]
            return result

        turn = lock.acquire()
        turn.addCallback(take_turn)
        turn.addBoth(end_turn)
        return turn  # type: ignore[return-value]
