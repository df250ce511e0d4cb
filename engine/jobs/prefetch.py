"""The prefetch pipeline of one job: identity, find, select, retrieve, store.

identity  -> the patient's identifier in each source's domain
find      -> candidate studies per source, queried in parallel
select    -> the rule's decision for every candidate
retrieve  -> C-MOVE (or C-GET) of each selected study; the engine's Storage
             SCP stamps the local identity and spools every object
store     -> C-STORE of the spooled objects to the destination while the
             study is still arriving, then verification at the destination
             (see engine.jobs.transfer)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from engine.coercion import Stamp
from engine.dimse.pools import NodePools
from engine.dimse.queries import read_study_answers, studies_of_patient
from engine.dimse.scu import DimseError, NodeClient
from engine.identity.resolver import IdentityResolver
from engine.jobs.receiving import ExpectationRegistry, Receiver
from engine.jobs.spool import Spool
from engine.jobs.store import AsyncStore, JobRecord, JobState, StudyState
from engine.jobs.transfer import SourceNode, StudyReport, StudyTransfer, TransferSettings
from engine.model import PatientIdentifier, StudyCandidate
from engine.rules.model import RuleSet
from engine.rules.select import select_priors

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a job attempt ended. retry asks for another attempt later."""

    state: JobState
    summary: str
    retry: bool = False


@dataclasses.dataclass(frozen=True)
class StudyResult:
    state: StudyState
    received: int = 0
    stored: int = 0
    transient_failure: bool = False
    problem: str = ""
    failed: int = 0


@dataclasses.dataclass(frozen=True)
class Source:
    """A source node of a job, as the pipeline needs it."""

    name: str
    ae_title: str
    issuer: str
    retrieve: str = "move"  # "move", "get" or "auto"


class Prefetch:
    """Runs the pipeline for one job at a time; several jobs may run concurrently."""

    def __init__(
        self,
        *,
        db: AsyncStore,
        pools: NodePools,
        clients: dict[str, NodeClient],
        sources: dict[str, Source],
        registry: ExpectationRegistry,
        identity: Callable[[], IdentityResolver],
        rule_set: Callable[[], RuleSet],
        engine_ae_title: str,
        spool_root: Path,
        now: Callable[[], dt.datetime],
        spool: Spool | None = None,
        receiver: Receiver | None = None,
        transfer_settings: TransferSettings | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.db = db
        self.pools = pools
        self.clients = clients
        self.sources = sources
        self.registry = registry
        self.identity = identity
        self.rule_set = rule_set
        self.engine_ae_title = engine_ae_title
        self.spool_root = spool_root
        self.now = now
        self.spool = spool or Spool(spool_root, max_bytes=1 << 62)
        self.transfer = StudyTransfer(
            pools=pools,
            clients=clients,
            sources={
                name: SourceNode(source.name, source.ae_title, source.retrieve)
                for name, source in sources.items()
            },
            registry=registry,
            receiver=receiver,
            spool=self.spool,
            engine_ae_title=engine_ae_title,
            settings=transfer_settings or TransferSettings(),
            stopping=stopping,
        )

    def note(self, job: JobRecord, text: str) -> defer.Deferred[None]:
        logger.info("job %d: %s", job.id, text)
        now = self.now()
        return self.db.run(lambda store: store.add_event(job.id, text, now))

    @defer.inlineCallbacks
    def run(self, job: JobRecord) -> Generator[defer.Deferred[Any], Any, Outcome]:
        rule = self.rule_set().rules.get(job.rule)
        if rule is None:
            return Outcome(JobState.FAILED, f"rule {job.rule} is no longer defined")
        if job.destination not in self.clients:
            return Outcome(
                JobState.FAILED, f"destination {job.destination} is no longer configured"
            )

        lookups = yield self._resolve_identities(job)
        if not lookups:
            return Outcome(
                JobState.DONE, "nothing to fetch: no source has an identifier for the patient"
            )

        candidates, failed_sources = yield self._find_candidates(job, lookups)
        decisions = select_priors(rule, job.order, candidates, self.now().date())
        yield self.db.run(lambda store: store.record_decisions(job.id, decisions))
        selected = [decision.candidate for decision in decisions if decision.selected]
        yield self.note(
            job,
            f"rule {rule.name}: {len(selected)} of {len(candidates)} candidate studies selected",
        )

        results = []
        for candidate in selected:
            result = yield self._fetch_study(job, candidate)
            results.append(result)
        return self._summarize(results, failed_sources)

    @defer.inlineCallbacks
    def _resolve_identities(
        self, job: JobRecord
    ) -> Generator[defer.Deferred[Any], Any, list[tuple[Source, PatientIdentifier]]]:
        resolver = self.identity()
        lookups = []
        for name in job.sources:
            source = self.sources.get(name)
            if source is None:
                yield self.note(job, f"source {name} skipped: node is no longer configured")
                continue
            resolution = yield resolver.resolve(job.patient, source.issuer)
            remote = resolution.identifier
            if remote is None:
                yield self.note(
                    job,
                    f"source {name} skipped: no identifier for {job.patient} "
                    f"in domain {source.issuer} ({resolution.source}: {resolution.detail})",
                )
                continue
            yield self.note(job, f"source {name}: patient is {remote} ({resolution.source})")
            lookups.append((source, remote))
        return lookups

    @defer.inlineCallbacks
    def _find_candidates(
        self, job: JobRecord, lookups: list[tuple[Source, PatientIdentifier]]
    ) -> Generator[defer.Deferred[Any], Any, tuple[list[StudyCandidate], list[str]]]:
        queries = [
            self.pools.run(source.name, self.clients[source.name].find, studies_of_patient(remote))
            for source, remote in lookups
        ]
        answers = yield defer.DeferredList(queries, consumeErrors=True)

        candidates: list[StudyCandidate] = []
        failed: list[str] = []
        for (source, remote), (success, result) in zip(lookups, answers, strict=True):
            if not success:
                failed.append(source.name)
                yield self.note(job, f"source {source.name}: query failed: {_reason(result)}")
                continue
            filtered = read_study_answers(source.name, remote, result)
            for reason in filtered.ignored:
                yield self.note(job, f"source {source.name}: ignored {reason}")
            yield self.note(job, f"source {source.name}: {len(filtered.candidates)} studies found")
            candidates.extend(filtered.candidates)
        return candidates, failed

    @defer.inlineCallbacks
    def _fetch_study(
        self, job: JobRecord, candidate: StudyCandidate
    ) -> Generator[defer.Deferred[Any], Any, StudyResult]:
        uid = candidate.study_instance_uid
        result: StudyResult
        try:
            result = yield self._retrieve_and_store(job, candidate)
        except DimseError as error:
            result = StudyResult(
                StudyState.FAILED, transient_failure=error.transient, problem=str(error)
            )
        yield self.db.run(
            lambda store: store.update_study(
                job.id,
                candidate.source,
                uid,
                result.state,
                received=result.received,
                stored=result.stored,
                failed=result.failed,
                reason=result.problem or None,
            )
        )
        yield self.note(
            job,
            f"study {uid} from {candidate.source}: {result.state}"
            + (f" ({result.problem})" if result.problem else ""),
        )
        return result

    @defer.inlineCallbacks
    def _retrieve_and_store(
        self, job: JobRecord, candidate: StudyCandidate
    ) -> Generator[defer.Deferred[Any], Any, StudyResult]:
        uid = candidate.study_instance_uid
        earlier = yield self.db.run(
            lambda store: {(s.source, s.study_instance_uid): s for s in store.studies(job.id)}.get(
                (candidate.source, uid)
            )
        )
        yield self.db.run(
            lambda store: store.update_study(job.id, candidate.source, uid, StudyState.RETRIEVING)
        )
        stamp = Stamp(local=job.patient, remote=candidate.patient, demographics=job.demographics)
        report: StudyReport = yield self.transfer.fetch(
            job, candidate, stamp, lambda text: self.note(job, text)
        )
        if report.failed_instances:
            yield self.db.run(
                lambda store: store.record_failed_instances(
                    job.id, candidate.source, uid, report.failed_instances, self.now()
                )
            )
        # Counts add up over the attempts of a job: a retry fetches only what is missing.
        received = report.received + (earlier.received if earlier else 0)
        stored = report.stored + (earlier.stored if earlier else 0)
        state = report.state
        if state == StudyState.PRESENT and stored:
            state = StudyState.STORED
        return StudyResult(
            state=state,
            received=received,
            stored=stored,
            transient_failure=report.transient,
            problem=report.problem if state != StudyState.STORED else "",
            failed=report.failed,
        )

    def _summarize(self, results: list[StudyResult], failed_sources: list[str]) -> Outcome:
        stored = [r for r in results if r.state == StudyState.STORED]
        present = [r for r in results if r.state == StudyState.PRESENT]
        unfinished = [r for r in results if r.state not in (StudyState.STORED, StudyState.PRESENT)]
        instances = sum(r.stored for r in stored)
        parts = [f"{len(stored)} studies stored ({instances} instances)"]
        if present:
            parts.append(f"{len(present)} already at the destination")
        if unfinished:
            parts.append(f"{len(unfinished)} not complete")
        if failed_sources:
            parts.append(f"query failed at {', '.join(failed_sources)}")
        summary = ", ".join(parts)

        transient = bool(failed_sources) or any(r.transient_failure for r in unfinished)
        if not unfinished and not failed_sources:
            return Outcome(JobState.DONE, summary)
        if transient:
            return Outcome(
                JobState.PARTIAL if stored or present else JobState.FAILED, summary, retry=True
            )
        return Outcome(JobState.PARTIAL if stored or present else JobState.FAILED, summary)


def _reason(failure: Failure) -> str:
    return failure.getErrorMessage() if isinstance(failure, Failure) else str(failure)
