"""The read-only JSON API and the status page, rendered with Twisted's DummyRequest."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from engine.jobs.store import JobState, Store
from engine.model import MessageOrigin
from engine.web.api import JobsPage, MessagesPage, StatusPage, StorePage
from tests.conftest import NOW
from tests.unit.test_jobs import new_job
from tests.unit.test_metrics import SyncStore

ACK = b"MSH|^~\\&|FDQR|LOCAL|RIS|HOSP|20260314||ACK^O01^ACK|9|P|2.5\rMSA|AA|C-1\r"


def get(page: StorePage, path: list[bytes], **args: str | list[str]) -> DummyRequest:
    request = DummyRequest(path)
    for name, value in args.items():
        request.args[name.encode()] = [
            item.encode() for item in ([value] if isinstance(value, str) else value)
        ]
    page.render(request)
    assert request.finished == 1
    return request


def body(request: DummyRequest) -> Any:
    return json.loads(b"".join(request.written))


@pytest.fixture
def store() -> Store:
    store = Store(":memory:")
    origin = MessageOrigin("RIS", "HOSP", "ORM^O01", "C-1")
    store.record_message(
        origin, "127.0.0.1:5000", b"MSH|...PID|DOE^JANE", ACK, "1 job", [new_job()], NOW
    )
    second = store.add_job(new_job(rule="mr"), NOW)
    store.finish_job(second, JobState.DONE, "nothing to fetch <b>", NOW)
    return store


def test_jobs_listed_newest_first(store: Store) -> None:
    request = get(JobsPage(SyncStore(store)), [])  # type: ignore[arg-type]
    jobs = body(request)["jobs"]
    assert [job["id"] for job in jobs] == [2, 1]
    assert jobs[0]["state"] == "done"
    assert jobs[1]["message_id"] == 1
    assert jobs[1]["patient"] == {"id": "L1", "issuer": "LOCAL"}
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"application/json; charset=utf-8"
    ]


def test_jobs_omit_name_and_birth_date(store: Store) -> None:
    text = b"".join(get(JobsPage(SyncStore(store)), [b"1"]).written).decode()  # type: ignore[arg-type]
    assert "DOE" not in text
    assert "19650312" not in text


def test_jobs_filtered_by_state_and_limit(store: Store) -> None:
    page = JobsPage(SyncStore(store))  # type: ignore[arg-type]
    assert [job["id"] for job in body(get(page, [], state="queued"))["jobs"]] == [1]
    assert [job["id"] for job in body(get(page, [], state=["queued", "done"]))["jobs"]] == [2, 1]
    assert [job["id"] for job in body(get(page, [], limit="1"))["jobs"]] == [2]


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ({"limit": "ten"}, "invalid limit 'ten': expected a whole number"),
        ({"limit": "0"}, "invalid limit 0: expected 1 to 1000"),
        ({"limit": "\uff11"}, "invalid limit '\uff11': expected a whole number"),
        ({"state": "finished"}, "invalid state 'finished': expected one of queued"),
    ],
)
def test_jobs_invalid_query_rejected(store: Store, args: dict[str, str], text: str) -> None:
    request = get(JobsPage(SyncStore(store)), [], **args)  # type: ignore[arg-type]
    assert request.responseCode == 400
    assert body(request)["error"].startswith(text)


def test_job_detail_has_candidates_and_events(store: Store) -> None:
    detail = body(get(JobsPage(SyncStore(store)), [b"2"]))  # type: ignore[arg-type]
    assert detail["id"] == 2
    assert detail["rule"] == "mr"
    assert detail["order"]["accession_number"] == "ACC1"
    assert detail["candidates"] == []
    assert detail["events"][-1]["text"] == "done: nothing to fetch <b>"


@pytest.mark.parametrize(
    ("segment", "status", "text"),
    [
        (b"99", 404, "job 99 not found"),
        (b"9223372036854775808", 404, "job 9223372036854775808 not found"),
        (b"x", 400, "invalid job id 'x'"),
        ("\u0661".encode(), 400, "invalid job id '\u0661'"),
    ],
)
def test_job_detail_not_found(store: Store, segment: bytes, status: int, text: str) -> None:
    request = get(JobsPage(SyncStore(store)), [segment])  # type: ignore[arg-type]
    assert request.responseCode == status
    assert body(request)["error"].startswith(text)


def test_messages_listed_without_content(store: Store) -> None:
    request = get(MessagesPage(SyncStore(store)), [], type="ORM^O01")  # type: ignore[arg-type]
    [message] = body(request)["messages"]
    assert message["control_id"] == "C-1"
    assert message["ack_code"] == "AA"
    assert message["outcome"] == "1 job"
    assert "content" not in message
    assert "DOE" not in json.dumps(message)
    other = get(MessagesPage(SyncStore(store)), [], type="ADT^A08")  # type: ignore[arg-type]
    assert body(other)["messages"] == []


def test_status_page_escapes_text(store: Store) -> None:
    request = get(StatusPage(SyncStore(store)), [])  # type: ignore[arg-type]
    page = b"".join(request.written).decode()
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert "<td>queued</td><td>1</td>" in page
    assert "<td>done</td><td>1</td>" in page
    assert "nothing to fetch &lt;b&gt;" in page
    assert "<td>C-1</td>" in page
    assert "DOE" not in page


def test_store_failure_is_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    class BrokenStore:
        def run(self, work: Any) -> defer.Deferred[Any]:
            return defer.fail(RuntimeError("disk I/O error"))

    with caplog.at_level(logging.ERROR):
        request = get(JobsPage(BrokenStore()), [])  # type: ignore[arg-type]
    assert request.responseCode == 500
    assert body(request)["error"] == "reading the store failed; see the engine log"
    assert "failed: disk I/O error" in caplog.text


def test_client_gone_before_read_gets_nothing(store: Store) -> None:
    class SlowStore:
        def __init__(self) -> None:
            self.pending: list[tuple[Any, defer.Deferred[Any]]] = []

        def run(self, work: Any) -> defer.Deferred[Any]:
            result: defer.Deferred[Any] = defer.Deferred()
            self.pending.append((work, result))
            return result

    slow = SlowStore()
    request = DummyRequest([])
    JobsPage(slow).render(request)  # type: ignore[arg-type]
    request.processingFailed(Failure(ConnectionDone("client closed")))
    [(work, result)] = slow.pending
    result.callback(work(store))
    assert request.written == []
    assert request.finished == 0
