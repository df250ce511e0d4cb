"""Prometheus metrics: counting acknowledgements, job states and studies, and the HTTP pages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import generate_latest
from twisted.internet import defer, task
from twisted.web.test.requesthelper import DummyRequest

from engine.hl7.ack import ack_code
from engine.jobs.store import JobState, Store, StudyState
from engine.web.metrics import EngineMetrics, JobCountRefresh
from engine.web.server import Health
from tests.conftest import NOW
from tests.unit.test_jobs import new_job

T = TypeVar("T")


def sample(metrics: EngineMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, f"no sample {name} {labels}"
    return value


class SyncStore:
    """AsyncStore's run() on the calling thread."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def run(self, work: Callable[[Store], T]) -> defer.Deferred[T]:
        return defer.succeed(work(self.store))


def test_ack_code_standard_delimiters() -> None:
    ack = b"MSH|^~\\&|FDQR|LOCAL|RIS|HOSP|20260314||ACK^O01^ACK|1|P|2.5\rMSA|AE|C-1\rERR|||101\r"
    assert ack_code(ack) == "AE"


def test_ack_code_other_field_separator() -> None:
    ack = b"MSH#^~\\&#FDQR#LOCAL#RIS#HOSP#20260314##ACK#1#P#2.5\rMSA#CA#C-1\r"
    assert ack_code(ack) == "CA"


def test_ack_code_without_msa() -> None:
    assert ack_code(b"MSH|^~\\&|FDQR\r") == ""
    assert ack_code(b"") == ""


def test_answered_counts_first_ack_code() -> None:
    metrics = EngineMetrics()
    commit = b"MSH|^~\\&|A|B|C|D|1||ACK|1|P|2.5\rMSA|CA|C-1\r"
    application = b"MSH|^~\\&|A|B|C|D|1||ACK|2|P|2.5\rMSA|AA|C-1\r"
    metrics.answered([commit, application])
    metrics.answered([application])
    metrics.answered([])
    assert sample(metrics, "fdqr_hl7_messages_total", {"ack": "CA"}) == 1
    assert sample(metrics, "fdqr_hl7_messages_total", {"ack": "AA"}) == 1
    assert sample(metrics, "fdqr_hl7_messages_total", {"ack": "none"}) == 1
    assert sample(metrics, "fdqr_hl7_messages_total", {"ack": "AR"}) == 0


def test_job_counts_refresh_on_clock() -> None:
    store = Store(":memory:")
    metrics = EngineMetrics()
    clock = task.Clock()
    refresh = JobCountRefresh(SyncStore(store), metrics, clock, 15)  # type: ignore[arg-type]
    refresh.start()
    assert sample(metrics, "fdqr_jobs", {"state": JobState.QUEUED.value}) == 0

    first = store.add_job(new_job(), NOW)
    store.add_job(new_job(rule="mr"), NOW)
    store.finish_job(first, JobState.DONE, "1 study stored", NOW)
    clock.advance(14)
    assert sample(metrics, "fdqr_jobs", {"state": JobState.QUEUED.value}) == 0
    clock.advance(1)
    assert sample(metrics, "fdqr_jobs", {"state": JobState.QUEUED.value}) == 1
    assert sample(metrics, "fdqr_jobs", {"state": JobState.DONE.value}) == 1
    assert sample(metrics, "fdqr_jobs", {"state": JobState.FAILED.value}) == 0
    refresh.stop()


def test_job_counts_refresh_failure_logged(caplog: Any) -> None:
    class BrokenStore:
        def run(self, work: Any) -> defer.Deferred[Any]:
            return defer.fail(RuntimeError("database is locked"))

    metrics = EngineMetrics()
    refresh = JobCountRefresh(BrokenStore(), metrics, task.Clock(), 15)  # type: ignore[arg-type]
    refresh.refresh()
    assert "reading job counts for the metrics failed: database is locked" in caplog.text


def test_finished_jobs_and_studies_counted() -> None:
    spool = [4096]
    metrics = EngineMetrics(spool_bytes=lambda: spool[0])
    metrics.job_finished(JobState.DONE)
    metrics.job_finished(JobState.DONE)
    metrics.job_finished(JobState.QUARANTINED)
    metrics.study_ended(StudyState.STORED, 120)
    metrics.study_ended(StudyState.FAILED, 3)
    assert sample(metrics, "fdqr_jobs_finished_total", {"state": "done"}) == 2
    assert sample(metrics, "fdqr_jobs_finished_total", {"state": "quarantined"}) == 1
    assert sample(metrics, "fdqr_studies_total", {"state": StudyState.STORED.value}) == 1
    assert sample(metrics, "fdqr_instances_stored_total") == 123
    assert sample(metrics, "fdqr_spool_bytes") == 4096
    spool[0] = 0
    assert sample(metrics, "fdqr_spool_bytes") == 0


def test_exposition_has_process_metrics() -> None:
    text = generate_latest(EngineMetrics().registry).decode()
    assert "# TYPE fdqr_hl7_messages_total counter" in text
    assert "process_resident_memory_bytes" in text


def test_health_page_returns_ok() -> None:
    request = DummyRequest([b""])
    body = Health().render_GET(request)
    assert body == b"ok\n"
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]


def test_jobs_finished_only_final_states() -> None:
    text = generate_latest(EngineMetrics().registry).decode()
    assert 'fdqr_jobs_finished_total{state="done"} 0.0' in text
    assert 'fdqr_jobs_finished_total{state="queued"}' not in text
    assert 'fdqr_jobs{state="queued"} 0.0' in text


def test_only_counted_states_exposed() -> None:
    # The worker never ends a job as suppressed, and skipped studies are never fetched.
    text = generate_latest(EngineMetrics().registry).decode()
    assert 'fdqr_jobs_finished_total{state="suppressed"}' not in text
    assert 'fdqr_studies_total{state="skipped"}' not in text
    assert 'fdqr_studies_total{state="present"} 0.0' in text
    assert 'fdqr_jobs{state="suppressed"} 0.0' in text
