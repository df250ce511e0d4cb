"""Retrieve, store and verify one study: the transfer steps of a prefetch job.

deliver   -> objects an earlier attempt left in the spool go to the destination first
retrieve  -> C-MOVE to the engine's Storage SCP, or C-GET on the same association;
             every object is stamped and spooled, and forwarded to the destination
             while the rest of the study is still arriving
verify    -> the destination is asked how many instances it holds; when that
             differs from the source, the two IMAGE level lists are compared and
             only the missing instances are fetched again (repair passes)

Everything blocking runs in the node pools; this module runs on the reactor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, Protocol

from pydicom.multival import MultiValue
from twisted.internet import defer, threads

from engine.coercion import Stamp, stamp_file
from engine.dimse.forward import Forwarder, ForwardOutcome
from engine.dimse.pools import NodePools
from engine.dimse.queries import (
    InstanceRef,
    instances_of_series,
    move_instances,
    move_study,
    read_instance_count,
    read_instances,
    read_series,
    read_sop_classes,
    series_of_study,
    sop_classes_of_study,
)
from engine.dimse.scu import DimseError, MoveOutcome, NodeClient, RetrieveNotSupported
from engine.dimse.status import Status, describe, is_success_or_warning
from engine.jobs.guard import RetrievalGuard
from engine.jobs.receiving import Expectation, ExpectationRegistry, Receiver
from engine.jobs.spool import Spool, file_size
from engine.jobs.store import JobRecord, StudyState
from engine.model import StudyCandidate

logger = logging.getLogger(__name__)


def instance_count(count: int) -> str:
    """Return e.g. "1 instance" or "3 instances"."""
    return "1 instance" if count == 1 else f"{count} instances"


# SOP Instance UIDs per IMAGE level C-MOVE of a repair pass (keeps identifiers small).
REPAIR_BATCH = 200
# Failed SOP Instance UIDs written into one job event; all of them go to the store.
UIDS_IN_EVENT = 10


@dataclasses.dataclass(frozen=True)
class TransferSettings:
    study_deadline_seconds: float = 3600.0
    destination_associations: int = 2
    repair_passes: int = 1
    # Destinations without a C-FIND SCP, whose content cannot be checked.
    store_only: frozenset[str] = frozenset()
    # Reject an object whose birth date or sex differs from the study's C-FIND response
    # (on unless identity.check.strictness is off).
    check_objects: bool = True


@dataclasses.dataclass(frozen=True)
class SourceNode:
    """A source as the transfer needs it: AE title and how to retrieve from it."""

    name: str
    ae_title: str
    retrieve: str = "move"  # "move", "get" or "auto"
    issuer: str = ""  # the IssuerOfPatientID of the source's patient IDs


class StudyConflict(Exception):
    """The destination stores the study's UID under another patient ID or issuer."""

    def __init__(self, uid: str, holders: list[str], local: str) -> None:
        super().__init__(
            f"destination stores study UID {uid} under patient ID {', '.join(holders)}, not"
            f" {local}; correct the study at the destination"
        )


@dataclasses.dataclass
class StudyReport:
    """What happened to one study during one attempt."""

    state: StudyState = StudyState.FAILED
    received: int = 0
    stored: int = 0
    failed: int = 0
    transient: bool = False
    problems: list[str] = dataclasses.field(default_factory=list)
    failed_instances: list[str] = dataclasses.field(default_factory=list)
    # Instances the destination holds when verification found none missing.
    confirmed: int | None = None
    # Objects the engine refused (another patient's, a full spool), and why.
    refused: str = ""
    # Refused objects that a retry would refuse again (all but those of a full spool).
    refused_again_on_retry: int = 0
    # Why the retrieval was stopped before its end (see ExpectationRegistry.stop), or "".
    stopped: str = ""

    @property
    def problem(self) -> str:
        return "; ".join(dict.fromkeys(self.problems))


class Note(Protocol):
    """A callable that records an event of the job and logs it, at INFO unless given a level."""

    def __call__(self, text: str, level: int = logging.INFO) -> defer.Deferred[None]: ...


class StudyTransfer:
    """Moves selected studies from their source through the engine into the destination."""

    def __init__(
        self,
        *,
        pools: NodePools,
        clients: dict[str, NodeClient],
        sources: dict[str, SourceNode],
        registry: ExpectationRegistry,
        receiver: Receiver | None,
        spool: Spool,
        engine_ae_title: str,
        settings: TransferSettings,
        stopping: Callable[[], bool] = lambda: False,
        guard: RetrievalGuard | None = None,
    ) -> None:
        self.guard = guard
        self.pools = pools
        self.clients = clients
        self.sources = sources
        self.registry = registry
        self.receiver = receiver
        self.spool = spool
        self.engine_ae_title = engine_ae_title
        self.settings = settings
        self.stopping = stopping

    @defer.inlineCallbacks
    def fetch(
        self, job: JobRecord, candidate: StudyCandidate, stamp: Stamp, note: Note
    ) -> Generator[defer.Deferred[Any], Any, StudyReport]:
        """Bring one study to the destination. Raises DimseError when a node cannot be reached."""
        uid = candidate.study_instance_uid
        # The destination may hold the study under the UID its coercion profile gives it.
        uid_there = stamp.profile.study_uid_for(uid, candidate.patient.issuer)
        report = StudyReport()
        deadline = time.monotonic() + self.settings.study_deadline_seconds

        leftovers = self.spool.pending(self.spool.study_dir(job.id, uid))
        if leftovers:
            yield note(f"study {uid}: {len(leftovers)} objects wait in the spool; storing them")
            # They were stamped by an earlier attempt: a merge or a demographics update
            # since then must reach them before the destination does.
            yield threads.deferToThread(self._restamp, leftovers, stamp)
            forwarded = yield self._deliver_leftovers(job, candidate, stamp, report, note)
            if report.stopped:
                return report
            if forwarded.error is not None:
                return self._destination_down(report, forwarded, job, uid)

        if job.destination in self.settings.store_only:
            yield self._retrieve(job, candidate, stamp, [move_study(uid)], deadline, report, note)
            return report if report.stopped else _unverified(report)

        try:
            present: int | None = yield self._destination_count(job, uid_there, stamp)
        except StudyConflict as conflict:
            conflicted: StudyReport = yield self._conflict(uid, conflict, report, note)
            return conflicted
        except DimseError as error:
            if not error.transient:
                raise
            # The objects wait in the spool until the destination is back.
            yield note(
                f"study {uid}: destination not reachable ({error}); retrieving anyway",
                logging.WARNING,
            )
            present = None
        expected = candidate.instance_count
        if present and expected is not None and present >= expected and not leftovers:
            report.state = StudyState.PRESENT
            report.problems.append(f"destination already has {instance_count(present)}")
            return report

        if not present:
            yield self._retrieve(job, candidate, stamp, [move_study(uid)], deadline, report, note)
        else:
            missing = yield self._missing(job, candidate, uid_there)
            if not missing and not leftovers:
                report.state = StudyState.PRESENT
                report.problems.append(f"destination already has all {present} instances")
                return report
            if missing:
                yield note(f"study {uid}: destination has {present}; fetching {len(missing)}")
                identifiers = _repair_identifiers(uid, missing)
                yield self._retrieve(job, candidate, stamp, identifiers, deadline, report, note)
        if report.stopped or (report.transient and self._spool_has(job, uid)):
            return report

        yield self._verify(job, candidate, stamp, deadline, report, note)
        return report

    def _restamp(self, paths: list[Path], stamp: Stamp) -> None:
        """Stamp spooled objects again with the job's current identity (blocking)."""
        for path in paths:
            before = file_size(path)
            stamp_file(path, path, stamp)
            self.spool.adjust(before, file_size(path))

    # Verifying and repairing

    @defer.inlineCallbacks
    def _verify(
        self,
        job: JobRecord,
        candidate: StudyCandidate,
        stamp: Stamp,
        deadline: float,
        report: StudyReport,
        note: Note,
    ) -> Generator[defer.Deferred[Any], Any, None]:
        uid = candidate.study_instance_uid
        uid_there = stamp.profile.study_uid_for(uid, candidate.patient.issuer)
        for repair in range(self.settings.repair_passes + 1):
            try:
                present = yield self._destination_count(job, uid_there, stamp)
            except StudyConflict as conflict:
                yield self._conflict(uid, conflict, report, note)
                return
            if candidate.instance_count is not None and present == candidate.instance_count:
                missing: list[InstanceRef] = []
            else:
                missing = yield self._missing(job, candidate, uid_there)
            if not missing:
                report.state = StudyState.STORED
                report.transient = False
                report.problems = [p for p in report.problems if not p.startswith("received")]
                if present is not None:
                    report.confirmed = present
                    yield note(f"study {uid}: destination confirms {present} instances")
                return
            if repair == self.settings.repair_passes:
                break
            yield note(
                f"study {uid}: destination lacks {len(missing)} instances; "
                f"repair pass {repair + 1} fetches only those"
            )
            identifiers = _repair_identifiers(uid, missing)
            yield self._retrieve(job, candidate, stamp, identifiers, deadline, report, note)
            if report.stopped:
                return

        report.state = StudyState.INCOMPLETE
        report.problems.append(f"destination lacks {len(missing)} instances after verification")
        # Missing instances the source reported as failed will not come by retrying soon.
        report.transient = report.transient or not report.failed_instances
        if report.refused_again_on_retry >= len(missing):
            # The engine itself rejected them (another person's objects, for example), so a
            # retry would reject them again.
            report.transient = False

    @defer.inlineCallbacks
    def _destination_count(
        self, job: JobRecord, uid: str, stamp: Stamp
    ) -> Generator[defer.Deferred[Any], Any, int | None]:
        """Return how many instances of the study the destination holds, None if unknown.

        Raises StudyConflict when the destination stores the study UID under another
        patient ID, or under this ID with the IssuerOfPatientID of a source's domain.
        Its count is then not this patient's, and a copy stored next to it would split
        one study between two patients. Any other issuer matches, because an archive
        may return none or replace it with its own.
        """
        destination = self.clients[job.destination]
        query = sop_classes_of_study(uid)
        query.PatientID = ""
        query.IssuerOfPatientID = ""
        answers = yield self.pools.run(job.destination, destination.find, query)
        local = stamp.local
        source_issuers = {node.issuer for node in self.sources.values()} - {"", local.issuer}
        others = set()
        for answer in answers:
            value = _text(answer.get("PatientID", ""))
            issuer = _text(answer.get("IssuerOfPatientID", ""))
            if value and value != local.value:
                others.add(value)
            elif value and issuer in source_issuers:
                others.add(f"{value} of issuer {issuer}")
        if others:
            raise StudyConflict(uid, sorted(others), f"{local.value} of issuer {local.issuer}")
        count: int | None = read_instance_count(answers)
        return count

    @defer.inlineCallbacks
    def _conflict(
        self, uid: str, conflict: StudyConflict, report: StudyReport, note: Note
    ) -> Generator[defer.Deferred[Any], Any, StudyReport]:
        report.state = StudyState.FAILED
        report.transient = False
        report.problems.append(str(conflict))
        stored = f"{report.stored} instances stored" if report.stored else "nothing retrieved"
        yield note(f"study {uid}: {conflict} ({stored})", logging.WARNING)
        return report

    @defer.inlineCallbacks
    def _missing(
        self, job: JobRecord, candidate: StudyCandidate, uid_there: str
    ) -> Generator[defer.Deferred[Any], Any, list[InstanceRef]]:
        """Return the instances the source has and the destination does not (IMAGE level).

        uid_there is the study's UID at the destination; SOP Instance UIDs are kept.
        """
        at_source = yield self._instances(candidate.source, candidate.study_instance_uid)
        at_destination = yield self._instances(job.destination, uid_there)
        held = {instance.sop_instance_uid for instance in at_destination}
        return [instance for instance in at_source if instance.sop_instance_uid not in held]

    @defer.inlineCallbacks
    def _instances(
        self, node: str, uid: str
    ) -> Generator[defer.Deferred[Any], Any, list[InstanceRef]]:
        client = self.clients[node]
        series_answers = yield self.pools.run(node, client.find, series_of_study(uid))
        instances: list[InstanceRef] = []
        for series in read_series(series_answers):
            answers = yield self.pools.run(node, client.find, instances_of_series(uid, series))
            instances += read_instances(series, answers)
        return instances

    # Retrieving, with forwarding while objects arrive

    @defer.inlineCallbacks
    def _retrieve(
        self,
        job: JobRecord,
        candidate: StudyCandidate,
        stamp: Stamp,
        identifiers: list[Any],
        deadline: float,
        report: StudyReport,
        note: Note,
    ) -> Generator[defer.Deferred[Any], Any, None]:
        source = self.sources[candidate.source]
        client = self.clients[source.name]
        uid = candidate.study_instance_uid
        forwarder = self._forwarder(job)
        expectation = self._expectation(job, candidate, stamp, forwarder)
        expectation.message_id = client.next_message_id()
        workers = [
            self.pools.run(job.destination, forwarder.run_worker) for _ in range(forwarder.workers)
        ]
        self.registry.expect(expectation)
        try:
            # Registered first, so an ADT that moves the identifier from now on stops it too.
            if self.guard is not None:
                yield self.guard.stop_moved([expectation])
            for identifier in identifiers:
                if expectation.stopped:
                    break
                expectation.message_id = client.next_message_id()
                outcome = yield self._retrieve_one(
                    source, client, identifier, expectation, deadline, note
                )
                _add_outcome(report, outcome)
        finally:
            self.registry.forget(expectation)
            forwarder.finish()
            yield defer.DeferredList(workers, consumeErrors=True)

        report.received += expectation.received
        if expectation.rejected:
            reasons = "; ".join(sorted(set(expectation.rejections)))
            report.refused = f"{expectation.rejected} objects refused ({reasons})"
            report.refused_again_on_retry += expectation.rejected_again_on_retry
            report.problems.append(report.refused)
            # The job's event log keeps it, also when the study is complete in the end.
            yield note(
                f"study {uid}: rejected {expectation.rejected} object(s) from {source.name}"
                f" ({reasons})",
                logging.WARNING,
            )
        self._add_forwarded(report, forwarder.outcome)
        if expectation.stopped:
            yield self._stopped(report, expectation, forwarder.outcome, job, note)
            return
        if report.failed_instances:
            shown = ", ".join(report.failed_instances[:UIDS_IN_EVENT])
            more = len(report.failed_instances) - UIDS_IN_EVENT
            yield note(
                f"study {uid}: {source.name} failed to send {len(report.failed_instances)} "
                f"instances: {shown}" + (f" and {more} more" if more > 0 else ""),
                logging.WARNING,
            )
        if forwarder.outcome.error is not None:
            self._destination_down(report, forwarder.outcome, job, uid)

    def _stopped(
        self,
        report: StudyReport,
        expectation: Expectation,
        forwarded: ForwardOutcome,
        job: JobRecord,
        note: Note,
    ) -> defer.Deferred[None]:
        """End a study whose retrieval was stopped; it is not retried."""
        report.state = StudyState.FAILED
        report.transient = False
        report.stopped = expectation.stopped
        # Objects left in the spool (a destination that is down) carry the same stamp.
        left = self.spool.pending(expectation.spool_dir)
        if left:
            self.spool.discard_study(expectation.spool_dir)
        deleted = forwarded.withheld + len(left)
        text = f"retrieval stopped: {expectation.stopped}; {deleted} spooled objects deleted unsent"
        if report.stored and expectation.stored_suspect:
            text += (
                f"; {report.stored} objects stored before that carry {expectation.stamp.local}:"
                f" check them at {job.destination}"
            )
        # The stop comes first in the study's reason: the rest follows from it.
        report.problems.insert(0, text)
        return note(f"study {expectation.study_instance_uid}: {text}", logging.WARNING)

    @defer.inlineCallbacks
    def _retrieve_one(
        self,
        source: SourceNode,
        client: NodeClient,
        identifier: Any,
        expectation: Expectation,
        deadline: float,
        note: Note,
    ) -> Generator[defer.Deferred[Any], Any, MoveOutcome]:
        if source.retrieve in ("get", "auto") and self.receiver is not None:
            sop_classes = yield self._sop_classes(source.name, expectation.study_instance_uid)
            try:
                outcome: MoveOutcome = yield self.pools.run(
                    source.name,
                    client.get,
                    identifier,
                    sop_classes,
                    expectation.message_id,
                    self.receiver,
                    deadline,
                )
                return outcome
            except RetrieveNotSupported as error:
                if source.retrieve == "get":
                    raise DimseError(
                        f"{error} (node set to retrieve: get)", transient=False
                    ) from error
                yield note(f"{error}; retrieving with C-MOVE instead")
        outcome = yield self.pools.run(
            source.name,
            client.move,
            identifier,
            self.engine_ae_title,
            expectation.message_id,
            deadline,
        )
        return outcome

    @defer.inlineCallbacks
    def _sop_classes(self, node: str, uid: str) -> Generator[defer.Deferred[Any], Any, list[str]]:
        client = self.clients[node]
        answers = yield self.pools.run(node, client.find, sop_classes_of_study(uid))
        classes = read_sop_classes(answers)
        if not classes:
            # SOPClassesInStudy is optional for a Q/R SCP; the IMAGE level lists every class.
            instances = yield self._instances(node, uid)
            classes = list(dict.fromkeys(i.sop_class_uid for i in instances if i.sop_class_uid))
        return classes

    def _forwarder(self, job: JobRecord) -> Forwarder:
        return Forwarder(
            self.clients[job.destination],
            self.spool.confirm,
            workers=self.settings.destination_associations,
            stopping=self.stopping,
        )

    def _expectation(
        self, job: JobRecord, candidate: StudyCandidate, stamp: Stamp, forwarder: Forwarder
    ) -> Expectation:
        source = self.sources[candidate.source]
        return Expectation(
            job_id=job.id,
            source=source.name,
            source_ae_title=source.ae_title,
            study_instance_uid=candidate.study_instance_uid,
            remote=candidate.patient,
            stamp=stamp,
            spool_dir=self.spool.study_dir(job.id, candidate.study_instance_uid),
            message_id=0,
            on_spooled=forwarder.put,
            on_stopped=forwarder.withhold,
            demographics=candidate.demographics if self.settings.check_objects else None,
        )

    @defer.inlineCallbacks
    def _deliver_leftovers(
        self,
        job: JobRecord,
        candidate: StudyCandidate,
        stamp: Stamp,
        report: StudyReport,
        note: Note,
    ) -> Generator[defer.Deferred[Any], Any, ForwardOutcome]:
        """Send what an earlier attempt left in the spool; a cancel or an ID move stops it."""
        forwarder = self._forwarder(job)
        watched = self._expectation(job, candidate, stamp, forwarder)
        self.registry.watch(watched)
        try:
            if self.guard is not None:
                yield self.guard.stop_moved([watched])
            forwarded: ForwardOutcome = yield self._forward_leftovers(
                forwarder, job, candidate.study_instance_uid
            )
        finally:
            self.registry.unwatch(watched)
        report.stored += forwarded.stored
        if watched.stopped:
            yield self._stopped(report, watched, forwarded, job, note)
        return forwarded

    @defer.inlineCallbacks
    def _forward_leftovers(
        self, forwarder: Forwarder, job: JobRecord, uid: str
    ) -> Generator[defer.Deferred[Any], Any, ForwardOutcome]:
        study_dir = self.spool.study_dir(job.id, uid)
        for path in self.spool.pending(study_dir):
            forwarder.put(path)
        forwarder.finish()
        workers = [
            self.pools.run(job.destination, forwarder.run_worker) for _ in range(forwarder.workers)
        ]
        yield defer.DeferredList(workers, consumeErrors=True)
        self.spool.remove_if_empty(study_dir)
        return forwarder.outcome

    def _add_forwarded(self, report: StudyReport, outcome: ForwardOutcome) -> None:
        report.stored += outcome.stored
        if outcome.failed:
            first_reason = outcome.failed[0][1]
            report.problems.append(f"{len(outcome.failed)} objects not stored ({first_reason})")

    def _destination_down(
        self, report: StudyReport, outcome: ForwardOutcome, job: JobRecord, uid: str
    ) -> StudyReport:
        waiting = len(self.spool.pending(self.spool.study_dir(job.id, uid)))
        report.state = StudyState.INCOMPLETE
        report.transient = True
        report.problems.append(
            f"destination unreachable ({outcome.error}); {waiting} objects wait in the spool"
        )
        return report

    def _spool_has(self, job: JobRecord, uid: str) -> bool:
        return bool(self.spool.pending(self.spool.study_dir(job.id, uid)))


def _unverified(report: StudyReport) -> StudyReport:
    """Judge a study at a store-only destination by the C-STORE results alone."""
    if report.state == StudyState.INCOMPLETE:
        return report
    complete = not report.problems and report.stored >= report.received > 0
    report.state = StudyState.STORED if complete else StudyState.INCOMPLETE
    report.transient = report.transient or (not complete and not report.failed_instances)
    return report


def _add_outcome(report: StudyReport, outcome: MoveOutcome) -> None:
    if not is_success_or_warning(outcome.status):
        report.problems.append(f"retrieve ended with status {describe(outcome.status)}")
        report.transient = True
    if outcome.status == Status.OUT_OF_RESOURCES_SUB_OPERATIONS:
        report.transient = True
    report.failed += outcome.failed
    if outcome.failed:
        report.problems.append(f"source failed {outcome.failed} sub-operations")
    for uid in outcome.failed_instances:
        if uid not in report.failed_instances:
            report.failed_instances.append(uid)


def _repair_identifiers(uid: str, missing: list[InstanceRef]) -> list[Any]:
    by_series: dict[str, list[str]] = {}
    for instance in missing:
        by_series.setdefault(instance.series_instance_uid, []).append(instance.sop_instance_uid)
    identifiers = []
    for series, sop_uids in by_series.items():
        for start in range(0, len(sop_uids), REPAIR_BATCH):
            identifiers.append(move_instances(uid, series, sop_uids[start : start + REPAIR_BATCH]))
    return identifiers


def _text(value: Any) -> str:
    """Return an attribute value as DICOM writes it: values joined by backslashes."""
    if isinstance(value, MultiValue):
        return "\\".join(str(item) for item in value).strip()
    return str(value or "").strip()
