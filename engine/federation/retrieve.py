"""The reactor side of a federated C-MOVE or C-GET: where the data is, and pulling it in stamped.

plan() finds the sites that hold each requested study (remembered from an
earlier query, or asked again by Study Instance UID), and counts the
instances to send at the chosen site with a level-by-level C-FIND, so the
caller's pending responses carry true sub-operation counts. pull() runs one
study's C-MOVE from the site to the engine's own Storage SCP: the objects go
through the same checks and stamping as prefetch (ExpectationRegistry,
Receiver, stamp_file) and land in a spool folder, from which the SCP thread
sends them on.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from twisted.internet import defer

from engine.coercion import Stamp
from engine.dimse.scu import MoveOutcome, NodeClient
from engine.federation.fanout import Done, FederatedFind, Federation, FindEvent
from engine.federation.levels import Level, Model
from engine.federation.locations import Location
from engine.federation.matching import values_of
from engine.federation.request import FindRequest, RetrieveRequest
from engine.federation.sitefind import SiteHandle, SitePlan, run_site_find
from engine.jobs.guard import RetrievalGuard
from engine.jobs.receiving import NO_JOB, Expectation, ExpectationRegistry
from engine.jobs.spool import FEDERATION_FOLDER, Spool
from engine.model import Demographics, PatientIdentifier

logger = logging.getLogger(__name__)

NOT_FOUND = "not found at any member site"
SEVERAL_PATIENTS = "held for more than one patient; retrieve it with a Patient ID"
UNREACHABLE = "sites not reachable"


@dataclasses.dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    sop_class_uid: str


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One study (or part of it) to pull from one site."""

    location: Location
    study_instance_uid: str
    identifier: Dataset
    instances: tuple[Instance, ...]
    # Other sites that hold the study, tried in order when the C-MOVE at `location` fails.
    alternatives: tuple[Location, ...] = ()


@dataclasses.dataclass
class RetrievePlan:
    items: list[WorkItem] = dataclasses.field(default_factory=list)
    # Studies that could not be located or counted, with the reason.
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(len(item.instances) for item in self.items)


class InstanceCounter(Protocol):
    """List the instances to send from a site, in the site's thread pool."""

    def __call__(
        self, site: str, location: Location, identifier: Dataset
    ) -> defer.Deferred[list[Instance]]: ...


class SiteMover(Protocol):
    def __call__(
        self, site: str, identifier: Dataset, destination: str, message_id: int
    ) -> defer.Deferred[MoveOutcome]: ...


@dataclasses.dataclass
class Retrieval:
    """The parts a federated retrieve uses besides the Federation."""

    federation: Federation
    registry: ExpectationRegistry
    clients: dict[str, NodeClient]
    count_instances: InstanceCounter
    move: SiteMover
    spool: Spool
    # Stops a pull whose remote patient an ADT message moved to another local patient.
    guard: RetrievalGuard | None = None


class RetrievalStopped(Exception):
    """A pull was stopped before the site's C-MOVE, for the reason given."""


class FederatedRetrieve:
    """One C-MOVE or C-GET request of a caller."""

    _ids = itertools.count(1)

    def __init__(self, retrieval: Retrieval, request: RetrieveRequest, request_id: str) -> None:
        self.retrieval = retrieval
        self.request = request
        self.request_id = request_id
        self.spool_dir = retrieval.spool.root / FEDERATION_FOLDER / f"retrieve-{next(self._ids)}"
        self.cancelled = False
        self._expectation: Expectation | None = None
        # Pulled studies whose objects are being sent on, by Study Instance UID.
        self._sending: dict[str, Expectation] = {}
        self._demographics: dict[PatientIdentifier, Demographics] = {}
        # The sites the last lookup could not query.
        self._unreachable: list[str] = []

    @property
    def federation(self) -> Federation:
        return self.retrieval.federation

    @defer.inlineCallbacks
    def plan(self) -> Generator[defer.Deferred[Any], Any, RetrievePlan]:
        plan = RetrievePlan()
        studies: tuple[str, ...] = self.request.study_uids
        if self.request.level is Level.PATIENT:
            studies = yield self._studies_of_patient()
        for study in studies:
            self._unreachable = []
            locations = yield self._locate(study)
            if not locations and self._unreachable:
                # Not found at the sites that responded; the others could hold it.
                plan.unavailable[study] = f"{UNREACHABLE}: {', '.join(self._unreachable)}"
                continue
            if not locations:
                plan.unavailable[study] = NOT_FOUND
                continue
            patients = sorted({str(location.local) for location in locations})
            if len(patients) > 1:
                # Sites hold this UID for different patients: sending either could be
                # the wrong patient's study for this caller.
                logger.warning(
                    "federated retrieve %s: study %s is held for patients %s; not sent",
                    self.request_id,
                    study,
                    ", ".join(patients),
                )
                plan.unavailable[study] = SEVERAL_PATIENTS
                continue
            item = yield self._count_at_first(study, locations, plan)
            if item is not None:
                plan.items.append(item)
        logger.info(
            "federated retrieve %s: %d studies, %d instances to send, %d unavailable",
            self.request_id,
            len(plan.items),
            plan.total,
            len(plan.unavailable),
        )
        return plan

    @defer.inlineCallbacks
    def _studies_of_patient(self) -> Generator[defer.Deferred[Any], Any, tuple[str, ...]]:
        assert self.request.patient is not None
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = self.request.patient.value
        query.IssuerOfPatientID = self.request.patient.issuer
        query.StudyInstanceUID = ""
        rows = yield self._find(query, self.request.patient, uid_lookup=False)
        return tuple(str(row.StudyInstanceUID) for row in rows)

    @defer.inlineCallbacks
    def _locate(self, study: str) -> Generator[defer.Deferred[Any], Any, list[Location]]:
        memory = self.federation.locations
        if not memory.locations(study):
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = study
            query.PatientID = ""
            patient = self.request.patient
            if patient is not None:
                query.PatientID = patient.value
                query.IssuerOfPatientID = patient.issuer
            yield self._find(query, patient, uid_lookup=True)
        locations = memory.locations(study)
        if self.request.patient is not None:
            local = yield self._local(self.request.patient)
            others = [location for location in locations if location.local != local]
            for location in others:
                logger.warning(
                    "federated retrieve %s: study %s at %s belongs to another patient; not sent",
                    self.request_id,
                    study,
                    location.site,
                )
            locations = [location for location in locations if location.local == local]
        return locations

    def _local(self, patient: PatientIdentifier) -> defer.Deferred[PatientIdentifier | None]:
        if patient.issuer == self.federation.local_issuer:
            return defer.succeed(patient)
        resolver = self.federation.identity()
        return resolver.local_for(patient).addCallback(lambda resolution: resolution.identifier)

    def _find(
        self, query: Dataset, patient: PatientIdentifier | None, uid_lookup: bool
    ) -> defer.Deferred[list[Dataset]]:
        rows: list[Dataset] = []
        done: defer.Deferred[list[Dataset]] = defer.Deferred()

        def sink(event: FindEvent) -> None:
            if isinstance(event, Done):
                self._unreachable = list(event.summary.failed)
                done.callback(rows)
            else:
                rows.append(event.dataset)

        request = FindRequest(Model.STUDY_ROOT, Level.STUDY, query, patient, "")
        find = FederatedFind(
            self.federation, request, "", sink, f"{self.request_id}-lookup", uid_lookup=uid_lookup
        )
        find.start()
        return done

    @defer.inlineCallbacks
    def _count_at_first(
        self, study: str, locations: list[Location], plan: RetrievePlan
    ) -> Generator[defer.Deferred[Any], Any, WorkItem | None]:
        identifier = self._site_identifier(study)
        problems = []
        for index, location in enumerate(locations):
            try:
                instances = yield self.retrieval.count_instances(
                    location.site, location, identifier
                )
            except Exception as error:
                problems.append(f"{location.site}: {error}")
                logger.warning(
                    "federated retrieve %s: counting study %s at %s failed: %s",
                    self.request_id,
                    study,
                    location.site,
                    error,
                )
                continue
            alternatives = tuple(locations[index + 1 :])
            return WorkItem(location, study, identifier, tuple(instances), alternatives)
        plan.unavailable[study] = "; ".join(problems)
        return None

    def _site_identifier(self, study: str) -> Dataset:
        """Build the Study Root identifier the site is asked to move."""
        identifier = Dataset()
        level = max(self.request.level, Level.STUDY)
        identifier.QueryRetrieveLevel = level.name
        identifier.StudyInstanceUID = study
        if level >= Level.SERIES:
            identifier.SeriesInstanceUID = list(self.request.series_uids)
        if level >= Level.IMAGE:
            identifier.SOPInstanceUID = list(self.request.instance_uids)
        return identifier

    @defer.inlineCallbacks
    def pull(self, item: WorkItem) -> Generator[defer.Deferred[Any], Any, Path]:
        """Move one item into a spool folder, stamped; return the folder.

        When the C-MOVE fails, the other sites that hold the study are tried in turn.
        """
        problem: Exception | None = None
        for location in (item.location, *item.alternatives):
            if self.cancelled:
                break
            try:
                spool: Path = yield self._pull_from(item, location)
                return spool
            except Exception as error:
                problem = error
                logger.warning(
                    "federated retrieve %s: C-MOVE of study %s from %s failed: %s",
                    self.request_id,
                    item.study_instance_uid,
                    location.site,
                    error,
                )
        if self.cancelled:
            self.clean_up()
            return self.spool_dir / item.study_instance_uid
        assert problem is not None
        raise problem

    @defer.inlineCallbacks
    def _pull_from(
        self, item: WorkItem, location: Location
    ) -> Generator[defer.Deferred[Any], Any, Path]:
        client = self.retrieval.clients[location.site]
        demographics = yield self._local_demographics(location.local)
        # Each object must carry the local record's birth date and sex, where both have
        # one: another person filed under the site's patient ID is rejected.
        checked = demographics if self.federation.check.strictness != "off" else None
        expectation = Expectation(
            job_id=NO_JOB,
            source=location.site,
            source_ae_title=client.node.ae_title,
            study_instance_uid=item.study_instance_uid,
            remote=location.remote,
            stamp=Stamp(local=location.local, remote=location.remote, demographics=demographics),
            spool_dir=self.spool_dir / item.study_instance_uid,
            message_id=client.next_message_id(),
            demographics=checked,
        )
        self._expectation = expectation
        registry = self.retrieval.registry
        registry.expect(expectation)
        try:
            # Registered first, so an ADT that moves the identifier from now on stops it too.
            if self.retrieval.guard is not None:
                yield self.retrieval.guard.stop_moved([expectation])
            if expectation.stopped:
                raise RetrievalStopped(expectation.stopped)
            outcome = yield self.retrieval.move(
                location.site,
                item.identifier,
                self.federation.ae_title,
                expectation.message_id,
            )
        finally:
            registry.forget(expectation)
            self._expectation = None
        # Until its objects are sent on, a move of the identifier still stops them.
        registry.watch(expectation)
        self._sending[item.study_instance_uid] = expectation
        logger.info(
            "federated retrieve %s: study %s from %s: %d received, %d rejected, site status 0x%04X",
            self.request_id,
            item.study_instance_uid,
            location.site,
            expectation.received,
            expectation.rejected,
            outcome.status,
        )
        if self.cancelled:
            self.clean_up()
        return expectation.spool_dir

    @defer.inlineCallbacks
    def _local_demographics(
        self, patient: PatientIdentifier
    ) -> Generator[defer.Deferred[Any], Any, Demographics]:
        if patient not in self._demographics:
            known = yield self.federation.demographics(patient)
            if known is None:
                logger.warning(
                    "federated retrieve %s: no local record of patient %s:"
                    " objects keep the site's name, birth date and sex",
                    self.request_id,
                    patient,
                )
            self._demographics[patient] = known or Demographics()
        return self._demographics[patient]

    def cancel(self) -> None:
        """Refuse further objects of the running pull; the site's C-MOVE then ends early."""
        self.cancelled = True
        if self._expectation is not None:
            self.retrieval.registry.forget(self._expectation)

    def stopped(self, study_instance_uid: str) -> str:
        """Return why the objects of a pulled study must not be sent on, or ""."""
        expectation = self._sending.get(study_instance_uid)
        return expectation.stopped if expectation is not None else ""

    def sent(self, study_instance_uid: str) -> None:
        """Forget a pulled study whose objects were sent on; safe from any thread."""
        expectation = self._sending.pop(study_instance_uid, None)
        if expectation is not None:
            self.retrieval.registry.unwatch(expectation)

    def clean_up(self) -> None:
        """Delete this retrieve's objects and free their space in the spool; safe from any
        thread."""
        for study_instance_uid in list(self._sending):
            self.sent(study_instance_uid)
        self.retrieval.spool.discard(self.spool_dir)


def count_instances_at_site(
    client: NodeClient, location: Location, identifier: Dataset
) -> list[Instance]:
    """List the instances an identifier names at a site, level by level (blocking)."""
    keys = Dataset()
    keys.PatientID = location.remote.value
    keys.StudyInstanceUID = identifier.StudyInstanceUID
    series = values_of(identifier["SeriesInstanceUID"]) if "SeriesInstanceUID" in identifier else []
    wanted = set(values_of(identifier["SOPInstanceUID"]) if "SOPInstanceUID" in identifier else [])
    keys.SeriesInstanceUID = series
    keys.SOPInstanceUID = ""
    keys.SOPClassUID = ""
    found: list[Dataset] = []
    plan = SitePlan(location.site, Level.IMAGE, keys, relational=False)
    run_site_find(client, plan, SiteHandle(), found.append)
    instances = [
        Instance(str(answer.SOPInstanceUID), str(answer.get("SOPClassUID", "")))
        for answer in found
        if answer.get("SOPInstanceUID")
        and str(answer.get("PatientID", location.remote.value)) == location.remote.value
    ]
    if wanted:
        instances = [instance for instance in instances if instance.sop_instance_uid in wanted]
    return instances


def site_runners(
    pools: Any, clients: dict[str, NodeClient]
) -> tuple[Callable[..., defer.Deferred[int]], InstanceCounter, SiteMover]:
    """Build the functions that run site work in the per-node thread pools."""

    def run_site(
        site: str, plan: SitePlan, handle: SiteHandle, emit: Callable[[Dataset], None]
    ) -> defer.Deferred[int]:
        result: defer.Deferred[int] = pools.run(
            site, run_site_find, clients[site], plan, handle, emit
        )
        return result

    def count(site: str, location: Location, identifier: Dataset) -> defer.Deferred[list[Instance]]:
        result: defer.Deferred[list[Instance]] = pools.run(
            site, count_instances_at_site, clients[site], location, identifier
        )
        return result

    def move(
        site: str, identifier: Dataset, destination: str, message_id: int
    ) -> defer.Deferred[MoveOutcome]:
        result: defer.Deferred[MoveOutcome] = pools.run(
            site, clients[site].move, identifier, destination, message_id
        )
        return result

    return run_site, count, move
