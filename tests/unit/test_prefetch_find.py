"""The find and select part of the pipeline: queries per source policy, quiet hours, cancels."""

from __future__ import annotations

import datetime as dt
import logging
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from twisted.internet import defer

from engine.coercion import Stamp
from engine.dimse.scu import DimseError
from engine.identity import records
from engine.identity.build import build_resolver
from engine.identity.resolver import TableResolver
from engine.identity.settings import IdentitySettings
from engine.identity.table import CrossReferenceTable
from engine.jobs.policy import SourcePolicy, StudyTurns
from engine.jobs.prefetch import Prefetch, Source, StudyResult
from engine.jobs.receiving import NO_JOB, Expectation, ExpectationRegistry
from engine.jobs.store import JobRecord, JobState, NewJob, StudyState
from engine.model import Demographics, OrderFacts, PatientIdentifier, StudyCandidate
from engine.rules.loader import load_rule_set
from engine.rules.model import RuleSet
from engine.rules.timing import LocalZone, QuietWindow, parse_days
from tests.conftest import NOW
from tests.fakes import ImmediateStore

LOCAL = PatientIdentifier("L1", "LOCAL")
REMOTE = PatientIdentifier("HA-1", "HOSP_A")


class FakePools:
    def run(self, node: str, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(function, *args)


class FakeClient:
    """Returns every study on C-FIND, like a PACS that ignores ModalitiesInStudy matching."""

    def __init__(self, studies: list[tuple[str, str, str, int]]) -> None:
        self.studies = studies
        self.queries: list[Dataset] = []

    def find(self, query: Dataset) -> list[Dataset]:
        self.queries.append(query)
        answers = []
        for uid, date, modality, count in self.studies:
            answer = Dataset()
            answer.StudyInstanceUID = uid
            answer.PatientID = REMOTE.value
            answer.StudyDate = date
            answer.ModalitiesInStudy = modality
            answer.NumberOfStudyRelatedInstances = count
            answers.append(answer)
        return answers


@pytest.fixture
def rule_set(tmp_path: Path) -> RuleSet:
    for name, text in (
        ("routes", "routes:\n  - {name: ris, sources: [a], destination: local}\n"),
        (
            "rules",
            "rules:\n  - name: ct\n    select: {modalities: [CT, MR], lookback: 5y, max_studies: 5}\n",
        ),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.yaml").write_text(textwrap.dedent(text))
    return load_rule_set(tmp_path / "routes", tmp_path / "rules")


def make_pipeline(
    db: ImmediateStore,
    rule_set: RuleSet,
    client: FakeClient,
    policy: SourcePolicy,
    now: dt.datetime,
    tmp_path: Path,
    stopping: bool = False,
) -> tuple[Prefetch, list[str]]:
    table = CrossReferenceTable({LOCAL: {"HOSP_A": REMOTE}})
    pipeline = Prefetch(
        db=db,  # type: ignore[arg-type]
        pools=FakePools(),  # type: ignore[arg-type]
        clients={"a": client, "local": FakeClient([])},  # type: ignore[dict-item]
        sources={"a": Source("a", "HOSP_A", "HOSP_A")},
        registry=ExpectationRegistry("FDQR"),
        identity=lambda: TableResolver(table, "LOCAL"),
        rule_set=lambda: rule_set,
        engine_ae_title="FDQR",
        spool_root=tmp_path / "spool",
        now=lambda: now,
        policies={"a": policy},
        zone=LocalZone("UTC"),
        stopping=lambda: stopping,
    )
    fetched: list[str] = []

    def fetch(job: JobRecord, candidate: StudyCandidate) -> defer.Deferred[StudyResult]:
        fetched.append(candidate.study_instance_uid)
        db.store.update_study(
            job.id, candidate.source, candidate.study_instance_uid, StudyState.STORED
        )
        return defer.succeed(StudyResult(StudyState.STORED, received=1, stored=1))

    pipeline._fetch_study = fetch  # type: ignore[method-assign]
    return pipeline, fetched


def claimed_job(db: ImmediateStore, accession: str = "ACC1") -> JobRecord:
    """Add a job for a CT order of the patient and claim it, as the worker does."""
    db.store.add_job(
        NewJob(
            "ris",
            "ct",
            "local",
            ("a",),
            LOCAL,
            Demographics(),
            OrderFacts(ordered_modality="CT", accession_number=accession),
            NOW,
        ),
        NOW,
    )
    [job] = db.store.claim_due(NOW, 1)
    return job


def run(pipeline: Prefetch, job: JobRecord) -> Any:
    results: list[Any] = []
    pipeline.run(job).addBoth(results.append)
    assert results, "the pipeline did not finish"
    return results[0]


STUDIES = [
    ("1.1", "20250101", "CT", 10),
    ("1.2", "20240101", "MR", 500),
    ("1.3", "20240601", "CR", 2),
]


def test_one_query_per_modality_then_local_filter(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    client = FakeClient(STUDIES)
    pipeline, fetched = make_pipeline(db, rule_set, client, SourcePolicy(), NOW, tmp_path)
    job = claimed_job(db)
    outcome = run(pipeline, job)
    assert outcome.state == JobState.DONE
    assert [q.ModalitiesInStudy for q in client.queries] == ["CT", "MR"]
    assert {q.StudyDate for q in client.queries} == {"20210314-20260314"}
    # The PACS returned every study twice and a CR study, so responses are deduplicated and filtered.
    assert sorted(fetched) == ["1.1", "1.2"]
    skipped = {s.study_instance_uid: s.reason for s in db.store.studies(job.id) if not s.selected}
    assert skipped == {"1.3": "modalities CR not in CT/MR"}
    events = [text for _, text in db.store.events(job.id)]
    assert (
        "source a: 3 studies found (StudyDate=20210314-20260314, ModalitiesInStudy=CT;"
        " StudyDate=20210314-20260314, ModalitiesInStudy=MR)" in events
    )


class UnreachableClient(FakeClient):
    def find(self, query: Dataset) -> list[Dataset]:
        raise DimseError("association with HOSP_A rejected")


def test_failed_query_logged_as_warning(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = UnreachableClient([])
    pipeline, fetched = make_pipeline(db, rule_set, client, SourcePolicy(), NOW, tmp_path)
    job = claimed_job(db)
    with caplog.at_level(logging.INFO, logger="engine.jobs.prefetch"):
        run(pipeline, job)
    assert fetched == []
    [record] = [r for r in caplog.records if "query failed" in r.getMessage()]
    assert record.getMessage() == (
        f"job {job.id}: source a: query failed: association with HOSP_A rejected"
    )
    assert record.levelno == logging.WARNING


def test_query_ended_by_stop_logged_as_info(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = UnreachableClient([])
    pipeline, _ = make_pipeline(db, rule_set, client, SourcePolicy(), NOW, tmp_path, stopping=True)
    job = claimed_job(db)

    with caplog.at_level(logging.INFO, logger="engine.jobs.prefetch"):
        run(pipeline, job)

    [record] = [r for r in caplog.records if "source a: query" in r.getMessage()]
    assert record.getMessage() == (
        f"job {job.id}: source a: query ended by the engine's stop:"
        " association with HOSP_A rejected"
    )
    assert record.levelno == logging.INFO


def test_local_matching_sends_one_query(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    client = FakeClient(STUDIES)
    policy = SourcePolicy(modality_matching="local", date_matching="local")
    pipeline, fetched = make_pipeline(db, rule_set, client, policy, NOW, tmp_path)
    run(pipeline, claimed_job(db))
    [query] = client.queries
    assert query.ModalitiesInStudy == ""
    assert query.StudyDate == ""
    assert sorted(fetched) == ["1.1", "1.2"]


def test_quiet_hours_defer_large_studies(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    window = QuietWindow(parse_days("daily"), dt.time(7), dt.time(19), max_instances=100)
    client = FakeClient(STUDIES)
    pipeline, fetched = make_pipeline(
        db, rule_set, client, SourcePolicy(quiet_hours=(window,)), NOW, tmp_path
    )
    job = claimed_job(db)
    outcome = run(pipeline, job)
    assert fetched == ["1.1"]
    assert outcome.state == JobState.DEFERRED
    assert outcome.defer_until == dt.datetime(2026, 3, 14, 19, 0, tzinfo=dt.UTC)
    assert outcome.summary.endswith("1 postponed for quiet hours")
    events = [text for _, text in db.store.events(job.id)]
    assert any(text.startswith("study 1.2 from a postponed: quiet hours") for text in events)


def test_cancel_requested_stops_before_retrieve(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    client = FakeClient(STUDIES)
    pipeline, fetched = make_pipeline(db, rule_set, client, SourcePolicy(), NOW, tmp_path)
    job = claimed_job(db)
    note = db.store.cancel_order(
        LOCAL, OrderFacts(accession_number="ACC1"), "order cancelled (ORC-1 CA) by message X", NOW
    )
    assert note == f"cancel requested for running job(s) {job.id}"
    outcome = run(pipeline, job)
    assert outcome.state == JobState.CANCELLED
    assert outcome.summary == "order cancelled (ORC-1 CA) by message X"
    assert fetched == []
    assert client.queries == []


def test_merge_during_attempt_is_recorded(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    # Objects that arrive after the merge still carry L1, so the job records a warning.
    client = FakeClient(STUDIES[:1])
    pipeline, _ = make_pipeline(db, rule_set, client, SourcePolicy(), NOW, tmp_path)
    table = CrossReferenceTable({LOCAL: {"HOSP_A": REMOTE}})
    resolver = build_resolver(IdentitySettings(), table, "LOCAL", db, None, lambda: NOW)  # type: ignore[arg-type]
    pipeline.identity = lambda: resolver
    fetch = pipeline._fetch_study
    surviving = PatientIdentifier("L9", "LOCAL")

    def fetch_then_merge(job: JobRecord, candidate: StudyCandidate) -> defer.Deferred[StudyResult]:
        records.merge(db.store, surviving, LOCAL, NOW, "ADT-M1")
        return fetch(job, candidate)

    pipeline._fetch_study = fetch_then_merge  # type: ignore[method-assign]
    outcome = run(pipeline, claimed_job(db))
    assert outcome.state == JobState.DONE
    events = [text for _, text in db.store.events(1)]
    assert (
        "patient L1^^^LOCAL was merged into L9^^^LOCAL while this attempt ran; the studies it"
        " stored carry L1^^^LOCAL, so the destination must apply that merge to them" in events
    ), events


def test_second_job_waits_for_study_another_job_fetches(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    client = FakeClient(STUDIES[:1])
    pipeline, _ = make_pipeline(db, rule_set, client, SourcePolicy(), NOW, tmp_path)
    started: list[int] = []
    held: list[defer.Deferred[StudyResult]] = []

    def slow_fetch(job: JobRecord, candidate: StudyCandidate) -> defer.Deferred[StudyResult]:
        started.append(job.id)
        held.append(defer.Deferred())
        return held[-1]

    pipeline._fetch_study = slow_fetch  # type: ignore[method-assign]
    first, second = claimed_job(db), claimed_job(db, "ACC2")
    first_outcome: list[Any] = []
    second_outcome: list[Any] = []
    pipeline.run(first).addBoth(first_outcome.append)
    pipeline.run(second).addBoth(second_outcome.append)

    assert started == [first.id]
    assert pipeline.turns.holder("local", "1.1") == first.id
    events = [text for _, text in db.store.events(second.id)]
    assert f"study 1.1: job {first.id} is fetching it into local; waiting for it to end" in events

    held[0].callback(StudyResult(StudyState.STORED, received=10, stored=10))
    assert started == [first.id, second.id]
    assert pipeline.turns.holder("local", "1.1") == second.id
    held[1].callback(StudyResult(StudyState.PRESENT))
    assert [outcome.state for outcome in first_outcome + second_outcome] == [JobState.DONE] * 2
    assert pipeline.turns.holder("local", "1.1") is None


def test_study_turns_free_after_failure_and_per_destination() -> None:
    turns = StudyTurns()
    order: list[str] = []
    gate: defer.Deferred[None] = defer.Deferred()

    def step(name: str, result: defer.Deferred[None] | None = None) -> defer.Deferred[None]:
        order.append(name)
        return result if result is not None else defer.succeed(None)

    failing = turns.run("local", "1.1", 1, lambda: defer.fail(DimseError("source down")))
    waiting = turns.run("local", "1.1", 2, step, "second")
    elsewhere = turns.run("other", "1.1", 3, step, "other destination", gate)
    failures: list[Any] = []
    failing.addErrback(failures.append)
    ended: list[str] = []
    waiting.addCallback(lambda _: ended.append("second"))
    elsewhere.addCallback(lambda _: ended.append("other destination"))

    assert [failure.getErrorMessage() for failure in failures] == ["source down"]
    assert order == ["second", "other destination"]
    assert ended == ["second"]
    assert turns.holder("other", "1.1") == 3
    gate.callback(None)
    assert ended == ["second", "other destination"]
    assert turns.holder("other", "1.1") is None
    assert turns._locks == {}


def test_refused_objects_named_in_summary_of_done_job(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    # The source sent another patient's objects with the study; the study is complete.
    client = FakeClient(STUDIES[:1])
    pipeline, _ = make_pipeline(db, rule_set, client, SourcePolicy(), NOW, tmp_path)
    refused = "2 objects refused (object of patient HA-2^^^HOSP_A, expected HA-1^^^HOSP_A)"

    def fetch(job: JobRecord, candidate: StudyCandidate) -> defer.Deferred[StudyResult]:
        return defer.succeed(
            StudyResult(StudyState.STORED, received=10, stored=10, problem=refused, refused=refused)
        )

    pipeline._fetch_study = fetch  # type: ignore[method-assign]
    outcome = run(pipeline, claimed_job(db))
    assert outcome.state == JobState.DONE
    assert outcome.summary == (
        "1 study stored (10 instances), objects refused in 1 study (see the job's log)"
    )


def test_identifier_moved_during_attempt_named(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    # An ADT^A08 gives the hospital A ID to another local patient while the study is stored.
    client = FakeClient(STUDIES[:1])
    pipeline, _ = make_pipeline(db, rule_set, client, SourcePolicy(), NOW, tmp_path)
    other = PatientIdentifier("L2", "LOCAL")

    def fetch_then_move(job: JobRecord, candidate: StudyCandidate) -> defer.Deferred[StudyResult]:
        records.learn(db.store, other, REMOTE, NOW, "ADT-MOVE")
        return defer.succeed(
            StudyResult(StudyState.STORED, received=10, stored=10, stored_in_attempt=10)
        )

    pipeline._fetch_study = fetch_then_move  # type: ignore[method-assign]
    job = claimed_job(db)
    outcome = run(pipeline, job)
    assert outcome.state == JobState.DONE
    assert outcome.summary == (
        "1 study stored (10 instances), 1 identifier(s) moved to another patient during the"
        " attempt (see the job's log)"
    )
    events = [text for _, text in db.store.events(job.id)]
    assert (
        "identifier HA-1^^^HOSP_A was moved to patient L2^^^LOCAL while this attempt ran; the"
        " studies it stored from HA-1^^^HOSP_A carry L1^^^LOCAL: check them at local"
    ) in events


def test_identifier_learned_by_same_patient_not_named(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    client = FakeClient(STUDIES[:1])
    pipeline, _ = make_pipeline(db, rule_set, client, SourcePolicy(), NOW, tmp_path)

    def fetch_and_learn(job: JobRecord, candidate: StudyCandidate) -> defer.Deferred[StudyResult]:
        records.learn(db.store, LOCAL, REMOTE, NOW, "ADT-SAME")
        return defer.succeed(
            StudyResult(StudyState.STORED, received=10, stored=10, stored_in_attempt=10)
        )

    pipeline._fetch_study = fetch_and_learn  # type: ignore[method-assign]
    outcome = run(pipeline, claimed_job(db))
    assert outcome.summary == "1 study stored (10 instances)"


MOVED = "identifier HA-1^^^HOSP_A was moved to patient L2^^^LOCAL"


def test_study_of_moved_identifier_not_fetched(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    # An ADT^A08 gives the hospital A ID to another local patient during the first study.
    client = FakeClient(STUDIES)
    pipeline, fetched = make_pipeline(db, rule_set, client, SourcePolicy(), NOW, tmp_path)
    fetch = pipeline._fetch_study

    def fetch_then_move(job: JobRecord, candidate: StudyCandidate) -> defer.Deferred[StudyResult]:
        records.learn(db.store, PatientIdentifier("L2", "LOCAL"), REMOTE, NOW, "ADT-MOVE")
        return fetch(job, candidate)

    pipeline._fetch_study = fetch_then_move  # type: ignore[method-assign]
    job = claimed_job(db)
    outcome = run(pipeline, job)

    assert fetched == ["1.1"]
    assert outcome.state == JobState.PARTIAL
    assert not outcome.retry
    [study] = [s for s in db.store.studies(job.id) if s.study_instance_uid == "1.2"]
    assert (study.state, study.reason) == (StudyState.FAILED, f"not fetched: {MOVED}")
    events = [text for _, text in db.store.events(job.id)]
    assert f"study 1.2 from a: not fetched: {MOVED}" in events


def test_spooled_objects_of_moved_identifier_deleted_unsent(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    # The first attempt left two objects in the spool (the destination was down).
    client = FakeClient(STUDIES[:1])
    pipeline, fetched = make_pipeline(db, rule_set, client, SourcePolicy(), NOW, tmp_path)
    study_dir = pipeline.spool.study_dir(1, "1.1")

    def fetch_to_spool(job: JobRecord, candidate: StudyCandidate) -> defer.Deferred[StudyResult]:
        fetched.append(candidate.study_instance_uid)
        study_dir.mkdir(parents=True)
        for name in ("a", "b"):
            (study_dir / f"{name}.dcm").write_bytes(b"x" * 10)
        return defer.succeed(StudyResult(StudyState.INCOMPLETE, transient_failure=True))

    pipeline._fetch_study = fetch_to_spool  # type: ignore[method-assign]
    job = claimed_job(db)
    assert job.id == 1
    assert run(pipeline, job).retry

    records.learn(db.store, PatientIdentifier("L2", "LOCAL"), REMOTE, NOW, "ADT-MOVE")
    outcome = run(pipeline, job)

    assert fetched == ["1.1"]
    assert not study_dir.exists()
    assert outcome.state == JobState.FAILED
    assert not outcome.retry
    assert outcome.summary == (
        "0 studies stored (0 instances), 1 not complete, spooled objects of 1 study deleted"
        " unsent: identifier moved to another patient (see the job's log)"
    )
    events = [text for _, text in db.store.events(job.id)]
    assert f"study 1.1 from a: not fetched: {MOVED}; 2 spooled objects deleted unsent" in events


def test_retrieval_of_moved_identifier_stopped(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    pipeline, _ = make_pipeline(db, rule_set, FakeClient([]), SourcePolicy(), NOW, tmp_path)
    other_remote = PatientIdentifier("HA-2", "HOSP_A")
    running = {
        remote: Expectation(
            job_id=1,
            source="a",
            source_ae_title="HOSP_A",
            study_instance_uid=uid,
            remote=remote,
            stamp=Stamp(LOCAL, remote, Demographics()),
            spool_dir=tmp_path / uid,
            message_id=1,
        )
        for remote, uid in ((REMOTE, "1.1"), (other_remote, "1.2"))
    }
    for expectation in running.values():
        pipeline.registry.expect(expectation)
    records.learn(db.store, PatientIdentifier("L2", "LOCAL"), REMOTE, NOW, "ADT-MOVE")
    records.learn(db.store, LOCAL, other_remote, NOW, "ADT-SAME")

    done: list[Any] = []
    pipeline.guard.stop_moved().addBoth(done.append)

    assert done == [None]
    assert running[REMOTE].stopped == MOVED
    assert running[other_remote].stopped == ""
    assert pipeline.registry.active() == [running[other_remote]]


def test_retrieval_of_cancelled_job_stopped(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    pipeline, _ = make_pipeline(db, rule_set, FakeClient([]), SourcePolicy(), NOW, tmp_path)
    job = claimed_job(db)
    expectations = [
        Expectation(
            job_id=job_id,
            source="a",
            source_ae_title="HOSP_A",
            study_instance_uid=f"1.{job_id}",
            remote=REMOTE,
            stamp=Stamp(LOCAL, REMOTE, Demographics()),
            spool_dir=tmp_path / str(job_id),
            message_id=1,
        )
        for job_id in (job.id, job.id + 1, NO_JOB)
    ]
    for expectation in expectations:
        pipeline.registry.expect(expectation)
    db.store.cancel_job(job.id, "order cancelled by ORC-1 CA", NOW)

    done: list[Any] = []
    pipeline.guard.stop_cancelled().addBoth(done.append)

    assert done == [None]
    assert expectations[0].stopped == "its job was cancelled (order cancelled by ORC-1 CA)"
    assert not expectations[0].stored_suspect
    assert [e.stopped for e in expectations[1:]] == ["", ""]


def test_cancel_that_stopped_last_study_ends_job_cancelled(
    db: ImmediateStore, rule_set: RuleSet, tmp_path: Path
) -> None:
    client = FakeClient(STUDIES[:1])
    pipeline, _ = make_pipeline(db, rule_set, client, SourcePolicy(), NOW, tmp_path)
    job = claimed_job(db)

    def fetch_stopped(job: JobRecord, candidate: StudyCandidate) -> defer.Deferred[StudyResult]:
        db.store.cancel_job(job.id, "wrong order", NOW)
        return defer.succeed(
            StudyResult(StudyState.FAILED, received=3, stopped="its job was cancelled")
        )

    pipeline._fetch_study = fetch_stopped  # type: ignore[method-assign]
    outcome = run(pipeline, job)

    assert outcome.state == JobState.CANCELLED
    assert outcome.summary == "wrong order (a retrieve stopped, after 1 study)"
