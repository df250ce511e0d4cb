"""Test doubles shared by the unit tests."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TypeVar

from twisted.internet import defer

from engine.jobs.store import MessageWrite, Recorded, Store

T = TypeVar("T")


class ImmediateStore:
    """An AsyncStore that runs the work at once on the calling thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.fail_next: Exception | None = None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.store.close()

    def run(self, work: Callable[[Store], T]) -> defer.Deferred[T]:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            return defer.fail(error)
        try:
            return defer.succeed(work(self.store))
        except Exception as error:
            return defer.fail(error)

    def record_message(self, write: MessageWrite) -> defer.Deferred[Recorded]:
        return self.run(lambda store: _record_one(store, write))

    def note(self, job_id: int, text: str, now: dt.datetime) -> None:
        self.store.add_events([(job_id, text, now)])


def _record_one(store: Store, write: MessageWrite) -> Recorded:
    [outcome] = store.record_messages([write])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
