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

from engine.coercion import DEFAULT_PROFILE, CoercionProfile, Stamp
from engine.coercion_text import is_latin1
from engine.dimse.pools import NodePools
from engine.dimse.queries import (
    candidate_queries,
    describe_query,
    read_study_answers,
)
from engine.dimse.scu import DimseError, NodeClient
from engine.identity import records
from engine.identity.check import differences
from engine.identity.resolver import ChainResolver, IdentityResolver
from engine.identity.settings import CheckSettings
from engine.jobs.guard import RetrievalGuard
from engine.jobs.policy import RetrieveSlots, SourcePolicy, StudyTurns
from engine.jobs.receiving import ExpectationRegistry, Receiver
from engine.jobs.spool import Spool
from engine.jobs.store import AsyncStore, JobRecord, JobState, Store, StudyRecord, StudyState
from engine.jobs.transfer import (
    SourceNode,
    StudyReport,
    StudyTransfer,
    TransferSettings,
    instance_count,
)
from engine.model import Demographics, PatientIdentifier, StudyCandidate
from engine.rules.model import Rule, RuleSet
from engine.rules.select import StudyQuery, plan_query, select_priors
from engine.rules.timing import LocalZone

logger = logging.getLogger(__name__)
# Study results an operator should look at: logged as warnings.
_UNSUCCESSFUL_STUDY = frozenset({StudyState.FAILED, StudyState.INCOMPLETE})


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a job attempt ended. retry requests another attempt later. defer_until puts
    the job back until then without counting the attempt (quiet hours)."""

    state: JobState
    summary: str
    retry: bool = False
    defer_until: dt.datetime | None = None


@dataclasses.dataclass(frozen=True)
class StudyResult:
    state: StudyState
    # Counts over the job's attempts so far (see study_counts).
    received: int = 0
    stored: int = 0
    transient_failure: bool = False
    problem: str = ""
    failed: int = 0
    # Instances this attempt stored, for the metrics.
    stored_in_attempt: int = 0
    # Objects the engine refused, and why; kept also when the study is complete.
    refused: str = ""
    # Why the retrieval was stopped before its end, or "".
    stopped: str = ""


@dataclasses.dataclass(frozen=True)
class Source:
    """A source node of a job, as the pipeline needs it."""

    name: str
    ae_title: str
    issuer: str
    retrieve: str = "move"  # "move", "get" or "auto"


@dataclasses.dataclass(frozen=True)
class IdentityLookups:
    """The identity step's result.

    job carries the patient's active local ID (after merges) and the demographics
    objects are stamped with; failed lists the sources whose lookup failed in a
    way that may pass; stop, when set, ends the attempt with that outcome.
    """

    job: JobRecord
    lookups: list[tuple[Source, PatientIdentifier]]
    failed: list[str]
    stop: Outcome | None = None


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
        guard: RetrievalGuard | None = None,
        rule_set: Callable[[], RuleSet],
        engine_ae_title: str,
        spool_root: Path,
        now: Callable[[], dt.datetime],
        coercion: Callable[[str], CoercionProfile] = lambda destination: DEFAULT_PROFILE,
        check: CheckSettings | None = None,
        policies: dict[str, SourcePolicy] | None = None,
        zone: LocalZone | None = None,
        spool: Spool | None = None,
        receiver: Receiver | None = None,
        transfer_settings: TransferSettings | None = None,
        stopping: Callable[[], bool] = lambda: False,
        on_study: Callable[[JobRecord, StudyCandidate, StudyResult], None] = (
            lambda job, candidate, result: None
        ),
    ) -> None:
        self.db = db
        # True once the engine stops: failures it causes are then no source's fault.
        self.stopping = stopping
        # Called with each study's job, candidate and result when its fetch ends.
        self.on_study = on_study
        self.pools = pools
        self.clients = clients
        self.sources = sources
        self.registry = registry
        self.identity = identity
        self.rule_set = rule_set
        self.engine_ae_title = engine_ae_title
        self.spool_root = spool_root
        self.now = now
        self.coercion = coercion
        self.check = check or CheckSettings()
        self.policies = policies or {}
        self.zone = zone or LocalZone()
        self.slots = RetrieveSlots(self.policies)
        self.turns = StudyTurns()
        self.spool = spool or Spool(spool_root, max_bytes=1 << 62)
        self.guard = guard or RetrievalGuard(db, registry)
        self.transfer = StudyTransfer(
            guard=self.guard,
            pools=pools,
            clients=clients,
            sources={
                name: SourceNode(source.name, source.ae_title, source.retrieve, source.issuer)
                for name, source in sources.items()
            },
            registry=registry,
            receiver=receiver,
            spool=self.spool,
            engine_ae_title=engine_ae_title,
            settings=transfer_settings or TransferSettings(),
            stopping=stopping,
        )

    def policy(self, source: str) -> SourcePolicy:
        return self.policies.get(source) or SourcePolicy()

    def note(self, job: JobRecord, text: str, level: int = logging.INFO) -> defer.Deferred[None]:
        """Log and record an event of a job; it is written with the next store work."""
        logger.log(level, "job %d: %s", job.id, text)
        self.db.note(job.id, text, self.now())
        return defer.succeed(None)

    @defer.inlineCallbacks
    def run(self, job: JobRecord) -> Generator[defer.Deferred[Any], Any, Outcome]:
        # One rule set for the whole attempt, even if a reload swaps it meanwhile.
        rule_set = self.rule_set()
        rule = rule_set.rules.get(job.rule)
        if rule is None:
            return Outcome(JobState.FAILED, f"rule {job.rule} is no longer defined")
        if job.destination not in self.clients:
            return Outcome(
                JobState.FAILED, f"destination {job.destination} is no longer configured"
            )
        cancel = yield self._cancel_reason(job)
        if cancel:
            return Outcome(JobState.CANCELLED, cancel)
        withheld = yield self._discard_moved_leftovers(job)
        outcome: Outcome = yield self._attempt(job, rule_set, rule)
        if withheld:
            summary = (
                f"{outcome.summary}, spooled objects of {_studies(withheld)} deleted unsent:"
                " identifier moved to another patient (see the job's log)"
            )
            outcome = dataclasses.replace(outcome, summary=summary)
        return outcome

    @defer.inlineCallbacks
    def _attempt(
        self, job: JobRecord, rule_set: RuleSet, rule: Rule
    ) -> Generator[defer.Deferred[Any], Any, Outcome]:
        identities: IdentityLookups = yield self._resolve_identities(job)
        if identities.stop is not None:
            return identities.stop
        job = identities.job
        lookups = identities.lookups
        if not lookups and identities.failed:
            failed = ", ".join(identities.failed)
            return Outcome(JobState.FAILED, f"identity lookup failed for {failed}", retry=True)
        if not lookups:
            return Outcome(
                JobState.DONE, "nothing to fetch: no source has an identifier for the patient"
            )

        today = self.zone.local(self.now()).date()
        query = plan_query(rule, job.order, today)
        candidates, failed_sources = yield self._find_candidates(job, lookups, query)
        failed_sources = identities.failed + failed_sources
        decisions = select_priors(rule, job.order, candidates, today, rule_set)
        yield self.db.run(lambda store: store.record_decisions(job.id, decisions))
        selected = [decision.candidate for decision in decisions if decision.selected]
        yield self.note(
            job,
            f"rule {rule.name}: {len(selected)} of {len(candidates)} candidate studies selected",
        )
        held: Outcome | None = yield self._check_patients(job, selected)
        if held is not None:
            return held

        results: list[StudyResult] = []
        postponed: list[dt.datetime] = []
        # The remote patients of the studies this attempt stored.
        stored_from: list[PatientIdentifier] = []
        for candidate in selected:
            cancel = yield self._cancel_reason(job)
            if cancel:
                return Outcome(JobState.CANCELLED, f"{cancel} (after {_studies(len(results))})")
            quiet = self.policy(candidate.source).quiet(
                self.zone, self.now(), candidate.instance_count
            )
            if not quiet.allowed and quiet.until is not None:
                yield self.note(
                    job,
                    f"study {candidate.study_instance_uid} from {candidate.source}"
                    f" postponed: {quiet.reason}",
                )
                postponed.append(quiet.until)
                continue
            owner = yield self.db.run(_moved_owner(job.patient, candidate.patient))
            if owner is not None:
                results.append((yield self._not_fetched(job, candidate, owner)))
                continue
            result = yield self._fetch_in_turn(job, candidate)
            self.on_study(job, candidate, result)
            results.append(result)
            if result.stored_in_attempt:
                stored_from.append(candidate.patient)

        stopped = [result for result in results if result.stopped]
        if stopped:
            cancel = yield self._cancel_reason(job)
            if cancel:
                return Outcome(
                    JobState.CANCELLED,
                    f"{cancel} (a retrieve stopped, after {_studies(len(results))})",
                )
        outcome = self._summarize(results, failed_sources)
        if any(result.stored for result in results):
            yield self._warn_if_merged(job)
        moved = yield self._moved_identifiers(job, stored_from)
        if moved:
            outcome = dataclasses.replace(
                outcome,
                summary=f"{outcome.summary}, {moved} (see the job's log)",
            )
        if postponed:
            return Outcome(
                JobState.DEFERRED,
                f"{outcome.summary}, {len(postponed)} postponed for quiet hours",
                defer_until=min(postponed),
            )
        return outcome

    def _cancel_reason(self, job: JobRecord) -> defer.Deferred[str | None]:
        return self.db.run(lambda store: store.cancellation(job.id))

    @defer.inlineCallbacks
    def _resolve_identities(
        self, job: JobRecord
    ) -> Generator[defer.Deferred[Any], Any, IdentityLookups]:
        resolver = self.identity()
        job = yield self._active_patient(job, resolver)
        stop = self._check_destination_charset(job)
        if stop is not None:
            return IdentityLookups(job, [], [], stop)

        lookups = []
        failed = []
        for name in job.sources:
            source = self.sources.get(name)
            if source is None:
                yield self.note(
                    job, f"source {name} skipped: node is no longer configured", logging.WARNING
                )
                continue
            resolution = yield resolver.resolve(job.patient, source.issuer)
            for line in resolution.trail:
                yield self.note(job, f"source {name}: identity {line}")
            remote = resolution.identifier
            if remote is None:
                retry = "; retried later" if resolution.transient else ""
                yield self.note(
                    job,
                    f"source {name} skipped: no identifier for {job.patient} "
                    f"in domain {source.issuer} ({resolution.source}: {resolution.detail}){retry}",
                    # A failed lookup is a problem, but a patient unknown at that site is not.
                    logging.WARNING if resolution.transient else logging.INFO,
                )
                if resolution.transient:
                    failed.append(name)
                continue
            yield self.note(job, f"source {name}: patient is {remote} ({resolution.source})")
            lookups.append((source, remote))
        return IdentityLookups(job, lookups, failed)

    @defer.inlineCallbacks
    def _active_patient(
        self, job: JobRecord, resolver: IdentityResolver
    ) -> Generator[defer.Deferred[Any], Any, JobRecord]:
        """Return the job with the patient's active ID after merges, and the demographics
        of the local record (ADT) over those of the order."""
        patient = job.patient
        # NOTE: the merge state is read once per attempt, so objects that arrive after a
        # merge still carry the retired ID. _warn_if_merged records it when the attempt ends.
        if isinstance(resolver, ChainResolver):
            active, path = yield resolver.active_patient(job.patient)
            if path:
                chain = " -> ".join(str(item) for item in [job.patient, *path])
                yield self.note(job, f"patient {job.patient} was merged: {chain}; using {active}")
                patient = active
        recorded = yield self.db.run(lambda store: records.local_demographics(store, patient))
        demographics = job.demographics
        if recorded is not None:
            demographics = Demographics(
                name=recorded.name or demographics.name,
                birth_date=recorded.birth_date or demographics.birth_date,
                sex=recorded.sex or demographics.sex,
            )
            yield self.note(job, f"demographics from the local record of {patient}")
        return dataclasses.replace(job, patient=patient, demographics=demographics)

    @defer.inlineCallbacks
    def _warn_if_merged(self, job: JobRecord) -> Generator[defer.Deferred[Any], Any, None]:
        """Record when the job's patient was merged while this attempt stored studies."""
        resolver = self.identity()
        if not isinstance(resolver, ChainResolver):
            return
        active, path = yield resolver.active_patient(job.patient)
        if path:
            yield self.note(
                job,
                f"patient {job.patient} was merged into {active} while this attempt ran; the"
                f" studies it stored carry {job.patient}, so the destination must apply that"
                " merge to them",
                logging.WARNING,
            )

    @defer.inlineCallbacks
    def _moved_identifiers(
        self, job: JobRecord, remotes: list[PatientIdentifier]
    ) -> Generator[defer.Deferred[Any], Any, str]:
        """Record when a remote ID the attempt stored studies of now belongs to another patient.

        An ADT message can move a learned identifier to another local patient
        while the studies are retrieved and stamped with the job's patient.
        The objects already stored then carry an ID the engine no longer
        holds for them, and a person must check them at the destination.
        Returns a note for the job's summary, "" when nothing moved.
        """
        if not remotes:
            return ""

        def owners(store: Store) -> dict[PatientIdentifier, PatientIdentifier]:
            found = {remote: records.moved_owner(store, job.patient, remote) for remote in remotes}
            return {remote: owner for remote, owner in found.items() if owner is not None}

        moved = yield self.db.run(owners)
        for remote, owner in moved.items():
            yield self.note(
                job,
                f"identifier {remote} was moved to patient {owner} while this attempt ran; the"
                f" studies it stored from {remote} carry {job.patient}: check them at"
                f" {job.destination}",
                logging.WARNING,
            )
        if not moved:
            return ""
        return f"{len(moved)} identifier(s) moved to another patient during the attempt"

    @defer.inlineCallbacks
    def _discard_moved_leftovers(self, job: JobRecord) -> Generator[defer.Deferred[Any], Any, int]:
        """Delete the spooled objects of an earlier attempt whose remote ID moved meanwhile.

        They are stamped with the job's patient, and the identifier they came
        with now belongs to another local patient, so they must not be sent.
        Returns the number of studies whose objects were deleted.
        """
        if not self.spool.job_dir(job.id).is_dir():
            # Most attempts find nothing left: no store work for them.
            return 0
        waiting = [
            study
            for study in (yield self.db.run(lambda store: store.studies(job.id)))
            if self.spool.pending(self.spool.study_dir(job.id, study.study_instance_uid))
        ]
        withheld = 0
        for study in waiting:
            owner = yield self.db.run(_moved_owner(job.patient, study.remote_patient))
            if owner is not None:
                yield self._withhold_study(
                    job, study.source, study.study_instance_uid, study.remote_patient, owner
                )
                withheld += 1
        return withheld

    @defer.inlineCallbacks
    def _not_fetched(
        self, job: JobRecord, candidate: StudyCandidate, owner: PatientIdentifier
    ) -> Generator[defer.Deferred[Any], Any, StudyResult]:
        reason = yield self._withhold_study(
            job, candidate.source, candidate.study_instance_uid, candidate.patient, owner
        )
        return StudyResult(StudyState.FAILED, problem=reason)

    @defer.inlineCallbacks
    def _withhold_study(
        self,
        job: JobRecord,
        source: str,
        uid: str,
        remote: PatientIdentifier,
        owner: PatientIdentifier,
    ) -> Generator[defer.Deferred[Any], Any, str]:
        """Fail a study whose remote ID moved to `owner`, deleting its spooled objects."""
        study_dir = self.spool.study_dir(job.id, uid)
        deleted = len(self.spool.pending(study_dir))
        if study_dir.is_dir():
            self.spool.discard_study(study_dir)
        reason = f"not fetched: identifier {remote} was moved to patient {owner}"
        if deleted:
            reason += f"; {deleted} spooled objects deleted unsent"
        yield self.db.run(
            lambda store: store.update_study(job.id, source, uid, StudyState.FAILED, reason=reason)
        )
        yield self.note(job, f"study {uid} from {source}: {reason}", logging.WARNING)
        return reason

    def _check_destination_charset(self, job: JobRecord) -> Outcome | None:
        profile = self.coercion(job.destination)
        if (
            profile.character_set == "latin1"
            and profile.non_latin1 == "reject"
            and not is_latin1(job.demographics.name.split("=")[0])
        ):
            return Outcome(
                JobState.FAILED,
                f"destination {job.destination} accepts only Latin-1 and the name of"
                f" {job.patient} has other characters (profile {profile.name}: non_latin1 reject)",
            )
        return None

    @defer.inlineCallbacks
    def _check_patients(
        self, job: JobRecord, selected: list[StudyCandidate]
    ) -> Generator[defer.Deferred[Any], Any, Outcome | None]:
        """Hold the job when a selected study's remote patient differs from the local record.

        Nothing is retrieved then; the job is quarantined with the reasons, in
        words without names or birth dates.
        """
        accepted = yield self.db.run(lambda store: records.accepted_remote_patients(store, job.id))
        reasons: dict[tuple[str, PatientIdentifier], list[str]] = {}
        for candidate in selected:
            if candidate.patient in accepted:
                continue
            found = differences(job.demographics, candidate.demographics, self.check)
            if found:
                key = (candidate.source, candidate.patient)
                reasons.setdefault(key, [])
                reasons[key] += [item for item in found if item not in reasons[key]]
        if not reasons:
            return None

        text = "; ".join(
            f"source {source} patient {remote}: {', '.join(found)}"
            for (source, remote), found in reasons.items()
        )
        for candidate in selected:
            key = (candidate.source, candidate.patient)
            reason = "held: " + ", ".join(reasons[key]) if key in reasons else "held with its job"
            yield self.db.run(_hold_study(job.id, candidate, reason))
        yield self.note(
            job,
            f"demographics check ({self.check.strictness}) failed: {text}",
            logging.WARNING,
        )
        return Outcome(
            JobState.QUARANTINED,
            f"nothing retrieved: {text} (see fdqr identity release)",
        )

    @defer.inlineCallbacks
    def _find_candidates(
        self,
        job: JobRecord,
        lookups: list[tuple[Source, PatientIdentifier]],
        query: StudyQuery,
    ) -> Generator[defer.Deferred[Any], Any, tuple[list[StudyCandidate], list[str]]]:
        searches = [self._query_source(source, remote, query) for source, remote in lookups]
        answers = yield defer.DeferredList(searches, consumeErrors=True)

        candidates: list[StudyCandidate] = []
        failed: list[str] = []
        for (source, remote), (success, result) in zip(lookups, answers, strict=True):
            if not success:
                failed.append(source.name)
                if self.stopping():
                    # The stop ends the associations, so this is no outage of the source.
                    text = f"source {source.name}: query ended by the engine's stop"
                    yield self.note(job, f"{text}: {_reason(result)}")
                    continue
                yield self.note(
                    job, f"source {source.name}: query failed: {_reason(result)}", logging.WARNING
                )
                continue
            datasets, queries = result
            filtered = read_study_answers(source.name, remote, datasets)
            for reason in filtered.ignored:
                yield self.note(job, f"source {source.name}: ignored {reason}")
            found = _unique_studies(filtered.candidates)
            yield self.note(
                job, f"source {source.name}: {_studies(len(found))} found ({'; '.join(queries)})"
            )
            candidates.extend(found)
        return candidates, failed

    @defer.inlineCallbacks
    def _query_source(
        self, source: Source, remote: PatientIdentifier, query: StudyQuery
    ) -> Generator[defer.Deferred[Any], Any, tuple[list[Any], list[str]]]:
        """Run every C-FIND a query needs at one source; fail if any of them fails."""
        policy = self.policy(source.name)
        identifiers = candidate_queries(
            remote,
            query.modalities,
            query.date_from,
            query.date_to,
            policy.modality_matching,
            policy.date_matching,
        )
        client = self.clients[source.name]
        runs = [self.pools.run(source.name, client.find, identifier) for identifier in identifiers]
        results = yield defer.gatherResults(runs, consumeErrors=True)
        answers = [answer for result in results for answer in result]
        return answers, [describe_query(identifier) for identifier in identifiers]

    @defer.inlineCallbacks
    def _fetch_in_turn(
        self, job: JobRecord, candidate: StudyCandidate
    ) -> Generator[defer.Deferred[Any], Any, StudyResult]:
        """Fetch a study when no other job fetches it into the same destination.

        The turn is taken before the source's retrieve slot, so a job that
        waits for its turn keeps no slot busy.
        """
        uid = candidate.study_instance_uid
        holder = self.turns.holder(job.destination, uid)
        if holder is not None:
            yield self.note(
                job,
                f"study {uid}: job {holder} is fetching it into {job.destination};"
                " waiting for it to end",
            )
        result: StudyResult = yield self.turns.run(
            job.destination,
            uid,
            job.id,
            self.slots.run,
            candidate.source,
            self._fetch_study,
            job,
            candidate,
        )
        return result

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
            logging.WARNING if result.state in _UNSUCCESSFUL_STUDY else logging.INFO,
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
        stamp = Stamp(
            local=job.patient,
            remote=candidate.patient,
            demographics=job.demographics,
            profile=self.coercion(job.destination),
            modified_at=self.now(),
        )
        report: StudyReport = yield self.transfer.fetch(
            job, candidate, stamp, lambda text, level=logging.INFO: self.note(job, text, level)
        )
        # The study's folder, and the job's, go once every object left them.
        self.spool.remove_if_empty(self.spool.study_dir(job.id, uid))
        if report.failed_instances:
            yield self.db.run(
                lambda store: store.record_failed_instances(
                    job.id, candidate.source, uid, report.failed_instances, self.now()
                )
            )
        received, stored = study_counts(report, earlier)
        state = report.state
        if state == StudyState.PRESENT and stored:
            state = StudyState.STORED
        return StudyResult(
            state=state,
            received=received,
            stored=stored,
            transient_failure=report.transient,
            problem=report.problem if state != StudyState.STORED else report.refused,
            failed=report.failed,
            stored_in_attempt=report.stored,
            refused=report.refused,
            stopped=report.stopped,
        )

    def _summarize(self, results: list[StudyResult], failed_sources: list[str]) -> Outcome:
        stored = [r for r in results if r.state == StudyState.STORED]
        present = [r for r in results if r.state == StudyState.PRESENT]
        unfinished = [r for r in results if r.state not in (StudyState.STORED, StudyState.PRESENT)]
        instances = sum(r.stored for r in stored)
        parts = [f"{_studies(len(stored))} stored ({instance_count(instances)})"]
        if present:
            parts.append(f"{len(present)} already at the destination")
        if unfinished:
            parts.append(f"{len(unfinished)} not complete")
        if failed_sources:
            parts.append(f"query failed at {', '.join(failed_sources)}")
        refused = [r for r in results if r.refused]
        if refused:
            # A source that sends another patient's objects with a study needs a look.
            parts.append(f"objects refused in {_studies(len(refused))} (see the job's log)")
        summary = ", ".join(parts)

        transient = bool(failed_sources) or any(r.transient_failure for r in unfinished)
        if not unfinished and not failed_sources:
            return Outcome(JobState.DONE, summary)
        if transient:
            return Outcome(
                JobState.PARTIAL if stored or present else JobState.FAILED, summary, retry=True
            )
        return Outcome(JobState.PARTIAL if stored or present else JobState.FAILED, summary)


def _studies(count: int) -> str:
    return "1 study" if count == 1 else f"{count} studies"


def study_counts(report: StudyReport, earlier: StudyRecord | None) -> tuple[int, int]:
    """Return a study's received and stored counts over the attempts of its job so far.

    Counts add up over attempts, since a retry fetches only what is missing. They are
    saved when an attempt ends, so an attempt cut short by a crash is not counted. A
    count the destination confirmed then replaces the stored count (it can include
    instances stored there before the job), and what the job stored it also received.
    """
    received = report.received + (earlier.received if earlier else 0)
    stored = report.stored + (earlier.stored if earlier else 0)
    if report.confirmed is not None:
        received = max(received, stored)
        stored = max(stored, report.confirmed)
    return received, stored


def _moved_owner(
    local: PatientIdentifier, remote: PatientIdentifier
) -> Callable[[Store], PatientIdentifier | None]:
    return lambda store: records.moved_owner(store, local, remote)


def _hold_study(job_id: int, candidate: StudyCandidate, reason: str) -> Callable[[Store], None]:
    def hold(store: Store) -> None:
        store.update_study(
            job_id,
            candidate.source,
            candidate.study_instance_uid,
            StudyState.QUARANTINED,
            reason=reason,
        )

    return hold


def _reason(failure: Failure) -> str:
    if isinstance(failure, Failure) and isinstance(failure.value, defer.FirstError):
        failure = failure.value.subFailure
    return failure.getErrorMessage() if isinstance(failure, Failure) else str(failure)


def _unique_studies(candidates: list[StudyCandidate]) -> list[StudyCandidate]:
    """Keep the first C-FIND response for each study, because one query per modality
    returns a study once for each of its modalities that was requested."""
    seen: set[str] = set()
    unique = []
    for candidate in candidates:
        if candidate.study_instance_uid not in seen:
            seen.add(candidate.study_instance_uid)
            unique.append(candidate)
    return unique
