"""The message store: group commit, duplicates within a batch, replays."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from engine.jobs.store import AsyncStore, ControlIdReused, MessageWrite, NewJob, Recorded, Store
from engine.model import Demographics, MessageOrigin, OrderFacts, PatientIdentifier
from tests.conftest import NOW

PATIENT = PatientIdentifier("L1", "LOCAL")


def job() -> NewJob:
    return NewJob("ris", "ct", "local", ("a",), PATIENT, Demographics(), OrderFacts(), NOW)


def write(control_id: str, ack: bytes = b"ACK", actions: tuple[Any, ...] = ()) -> MessageWrite:
    origin = MessageOrigin("RIS", "RAD", "ORM^O01", control_id)
    return MessageWrite(
        origin, "peer", b"MSH|" + control_id.encode(), ack, "ok", [job()], NOW, actions
    )


def count_commits(store: Store) -> list[str]:
    statements: list[str] = []
    store._db.set_trace_callback(
        lambda sql: statements.append(sql) if sql.strip().upper() == "COMMIT" else None
    )
    return statements


def test_batch_is_one_commit(store: Store) -> None:
    commits = count_commits(store)
    results = store.record_messages([write("C1"), write("C2"), write("C3")])
    assert [result[2] for result in results if not isinstance(result, Exception)] == [False] * 3
    assert len(commits) == 1
    assert len(store.list_messages()) == 3
    assert len(store.list_jobs()) == 3


def test_batch_duplicate_gets_first_ack(store: Store) -> None:
    first, second = store.record_messages([write("C1", b"ACK-1"), write("C1", b"ACK-2")])
    assert not isinstance(first, Exception)
    assert second == (first[0], b"ACK-1", True)
    assert len(store.list_jobs()) == 1


def test_failing_message_is_undone_alone(store: Store) -> None:
    def broken(store: Store, now: object) -> str:
        store.add_job(job(), NOW)  # written, then undone with the rest of this message
        raise RuntimeError("action failed")

    results = store.record_messages([write("C1"), write("C2", actions=(broken,)), write("C3")])
    assert isinstance(results[1], RuntimeError)
    assert [message.origin.control_id for message in store.list_messages()] == ["C3", "C1"]
    assert len(store.list_jobs()) == 2
    # The failed message can be sent again and is then stored.
    [again] = store.record_messages([write("C2")])
    assert not isinstance(again, Exception)
    assert again[2] is False


class ThreadedReactor:
    """callFromThread for tests: calls are queued and run on the test's thread."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.calls.put((function, args))

    def run_calls(self, until: Callable[[], bool], timeout: float = 30.0) -> None:
        while not until():
            function, args = self.calls.get(timeout=timeout)
            function(*args)


@pytest.fixture
def async_store(tmp_path: Path) -> Iterator[tuple[AsyncStore, ThreadedReactor]]:
    reactor = ThreadedReactor()
    db = AsyncStore(reactor, Store(tmp_path / "fdqr.sqlite"))  # type: ignore[arg-type]
    db.start()
    yield db, reactor
    db.stop()


def fired(deferred: defer.Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    deferred.addBoth(results.append)
    return results


def test_async_store_groups_waiting_messages(
    async_store: tuple[AsyncStore, ThreadedReactor],
) -> None:
    db, reactor = async_store
    commits = count_commits(db.store)
    gate = threading.Event()
    blocked = fired(db.run(lambda store: gate.wait(30)))
    results = [fired(db.record_message(write(control_id))) for control_id in ("C1", "C2", "C1")]
    # Nothing is acknowledged while the store thread is busy, so no ACK can precede its commit.
    assert results == [[], [], []]
    gate.set()
    reactor.run_calls(until=lambda: all(results) and bool(blocked))
    assert len(commits) == 1
    outcomes: list[Recorded] = [result[0] for result in results]
    assert [outcome[2] for outcome in outcomes] == [False, False, True]
    assert outcomes[2][0] == outcomes[0][0]
    assert len(db.store.list_jobs()) == 2


def test_async_store_answers_after_commit(
    async_store: tuple[AsyncStore, ThreadedReactor],
) -> None:
    db, reactor = async_store
    seen: list[int] = []

    def check_committed(result: Recorded) -> Recorded:
        # Another connection sees the message: it is committed, not just written.
        other = Store(db.store._db.execute("PRAGMA database_list").fetchone()["file"])
        try:
            seen.append(len(other.list_messages()))
        finally:
            other.close()
        return result

    result = fired(db.record_message(write("C1")).addCallback(check_committed))
    reactor.run_calls(until=lambda: bool(result))
    assert seen == [1]


def test_async_store_keeps_run_order(async_store: tuple[AsyncStore, ThreadedReactor]) -> None:
    db, reactor = async_store
    order: list[str] = []
    gate = threading.Event()
    first = fired(db.run(lambda store: (gate.wait(30), order.append("run 1"))))
    recorded = fired(db.record_message(write("C1")))
    second = fired(db.run(lambda store: order.append("run 2")))
    gate.set()
    reactor.run_calls(until=lambda: bool(first and recorded and second))
    assert order == ["run 1", "run 2"]
    assert not isinstance(recorded[0], Exception)


def test_async_store_failed_commit_fails_every_message(
    async_store: tuple[AsyncStore, ThreadedReactor],
) -> None:
    db, reactor = async_store
    gate = threading.Event()
    fired(db.run(lambda store: gate.wait(30)))
    original = db.store.record_messages

    def failing(writes: list[MessageWrite]) -> list[Recorded | Exception]:
        raise OSError("disk full")

    db.store.record_messages = failing  # type: ignore[method-assign, assignment]
    results = [fired(db.record_message(write(c))) for c in ("C1", "C2")]
    gate.set()
    reactor.run_calls(until=lambda: all(results))
    assert all(r[0].check(OSError) for r in results)
    db.store.record_messages = original  # type: ignore[method-assign]
    again = fired(db.record_message(write("C1")))
    reactor.run_calls(until=lambda: bool(again))
    assert again[0][2] is False


def test_replay_creates_jobs_despite_duplicate_key(store: Store) -> None:
    [recorded] = store.record_messages([write("C1")])
    assert not isinstance(recorded, Exception)
    message_id = recorded[0]
    replay = store.record_replay(message_id, "1 job(s)", [job()], NOW)
    assert replay.message_id == message_id
    assert len(replay.job_ids) == 1
    assert [j.id for j in store.message_jobs(message_id)] == [1, *replay.job_ids]
    assert store.replays(message_id) == [replay]
    assert store.events(replay.job_ids[0])[-1][1] == f"created by a replay of message {message_id}"
    with pytest.raises(KeyError):
        store.record_replay(999, "x", [job()], NOW)


def test_reused_control_id_fails_alone(store: Store) -> None:
    def same(stored: bytes, received: bytes) -> bool:
        return stored == received

    first = write("C1")
    reused = dataclasses.replace(write("C1"), content=b"MSH|other", same_message=same)
    resent = dataclasses.replace(write("C1"), same_message=same)
    results = store.record_messages([first, reused, resent])
    assert isinstance(results[1], ControlIdReused)
    assert results[1].control_id == "C1"
    assert results[2] == (results[0][0], b"ACK", True)  # type: ignore[index]
    assert len(store.list_jobs()) == 1
