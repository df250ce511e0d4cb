"""The reactor side of a federated C-FIND: one query to every member site, one stream of rows.

For each site: translate the caller's patient into the site's domain (a site
without a mapping is not asked), plan the site's query, run it in the site's
thread pool, and handle every match as it arrives: check that it belongs to
the requested patient, rewrite it to local identifiers, match it again
against the caller's keys, merge it by the level's unique key, and pass new
rows to the sink at once. Each site has its own timeout; a site that fails or
runs out of time is reported in the summary and never holds the others back.

Everything here runs on the reactor thread. Site threads reach it only
through reactor.callFromThread.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Generator
from typing import Any, Protocol

from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall

from engine.dimse.queries import patient_demographics
from engine.federation.levels import Level
from engine.federation.locations import Location, LocationMemory
from engine.federation.matching import matches, values_of
from engine.federation.merging import Merger, Origin, build_row, localize, other_ids
from engine.federation.request import FindRequest
from engine.federation.sitefind import QueryCancelled, SiteHandle, SitePlan
from engine.identity.check import differences
from engine.identity.resolver import IdentityResolver, Resolution
from engine.identity.settings import CheckSettings
from engine.model import Demographics, PatientIdentifier

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MemberSite:
    name: str
    ae_title: str
    issuer: str
    timeout_seconds: float
    queries_without_patient_id: bool
    relational: bool


# Looks up the local patient's name, birth date and sex in the engine's records; None if absent.
DemographicsLookup = Callable[[PatientIdentifier], defer.Deferred[Demographics | None]]


def no_records(patient: PatientIdentifier) -> defer.Deferred[Demographics | None]:
    return defer.succeed(None)


class SiteRunner(Protocol):
    """Run a site's plan in the site's thread pool; `emit` is called there for every match."""

    def __call__(
        self, site: str, plan: SitePlan, handle: SiteHandle, emit: Callable[[Dataset], None]
    ) -> defer.Deferred[int]: ...


@dataclasses.dataclass
class Federation:
    """The dependencies of every federated operation, built once by the engine.

    demographics looks up the local patient's record. Its name, birth date
    and sex replace the site's in the C-FIND responses and in every retrieved
    object. Before that, check compares the site's values with the record,
    as prefetch does, and a match whose patient differs is dropped. Without a
    record the site's values stay and nothing is compared.
    """

    reactor: Any
    sites: dict[str, MemberSite]
    identity: Callable[[], IdentityResolver]
    run_site: SiteRunner
    locations: LocationMemory
    local_issuer: str
    ae_title: str
    max_answers: int
    demographics: DemographicsLookup = no_records
    check: CheckSettings = dataclasses.field(default_factory=CheckSettings)


@dataclasses.dataclass(frozen=True)
class Row:
    dataset: Dataset


@dataclasses.dataclass
class FindSummary:
    asked: list[str] = dataclasses.field(default_factory=list)
    answered: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    rows: int = 0
    duplicates: int = 0
    ignored: int = 0
    over_limit: int = 0
    replaced_characters: int = 0

    def failure_comment(self) -> str:
        """Return the sites that failed as Error Comment text (LO, 64 characters at most)."""
        text = self.failure_text()
        return text if len(text) <= 64 else text[:61] + "..."

    def failure_text(self) -> str:
        """Return every site that failed, with the kind of failure ("" when none failed)."""
        if not self.failed:
            return ""
        return "no answer from " + ", ".join(
            f"{site} ({reason.split(':')[0]})" for site, reason in sorted(self.failed.items())
        )


@dataclasses.dataclass(frozen=True)
class Done:
    summary: FindSummary


FindEvent = Row | Done


@dataclasses.dataclass(frozen=True)
class _SiteQuery:
    site: MemberSite
    plan: SitePlan
    # The patient asked for at this site and locally; None for a query without patient ID.
    remote: PatientIdentifier | None
    local: PatientIdentifier | None


class FederatedFind:
    """One federated C-FIND in progress."""

    def __init__(
        self,
        federation: Federation,
        request: FindRequest,
        character_set: str,
        sink: Callable[[FindEvent], None],
        query_id: str,
        uid_lookup: bool = False,
    ) -> None:
        self.federation = federation
        self.request = request
        self.character_set = character_set
        self.sink = sink
        self.query_id = query_id
        # A lookup by Study Instance UID for a retrieve may ask every site.
        self.uid_lookup = uid_lookup
        self.summary = FindSummary()
        self.merger = Merger(request.level, federation.max_answers)
        # PATIENT level rows wait for every site, so each lists every site's identifier.
        self._patient_rows: dict[tuple[str, ...], Dataset] = {}
        self.cancelled = False
        self.finished = False
        self._running: dict[str, SiteHandle | None] = {}
        self._timers: dict[str, IDelayedCall] = {}
        self._lookups = 0
        self._local_of: dict[PatientIdentifier, PatientIdentifier | None] = {}
        # The local record of each local patient met so far; None when the engine has none.
        self._records: dict[PatientIdentifier, Demographics | None] = {}
        self._starting = True

    @property
    def resolver(self) -> IdentityResolver:
        return self.federation.identity()

    def start(self) -> defer.Deferred[None]:
        return self._start()

    @defer.inlineCallbacks
    def _start(self) -> Generator[defer.Deferred[Any], Any, None]:
        local: PatientIdentifier | None = None
        if self.request.patient is not None:
            local = yield self._local_patient(self.request.patient)
            if local is None:
                for name in self.federation.sites:
                    self.summary.skipped[name] = f"patient {self.request.patient} is not known"
            else:
                self._records[local] = yield self.federation.demographics(local)
        if self.request.patient is None or local is not None:
            for site in self.federation.sites.values():
                self._running[site.name] = None
                self._run_site(site, local)
        self._starting = False
        self._finish_if_done()

    @defer.inlineCallbacks
    def _local_patient(
        self, patient: PatientIdentifier
    ) -> Generator[defer.Deferred[Any], Any, PatientIdentifier | None]:
        if patient.issuer == self.federation.local_issuer:
            return patient
        resolution: Resolution = yield self.resolver.local_for(patient)
        return resolution.identifier

    def cancel(self) -> None:
        """Stop sending rows and send C-CANCEL to every site still running."""
        if self.cancelled or self.finished:
            return
        self.cancelled = True
        logger.info("federated query %s cancelled by the caller", self.query_id)
        for handle in self._running.values():
            if handle is not None:
                handle.cancel()

    @defer.inlineCallbacks
    def _run_site(
        self, site: MemberSite, local: PatientIdentifier | None
    ) -> Generator[defer.Deferred[Any], Any, None]:
        timer = self.federation.reactor.callLater(site.timeout_seconds, self._timed_out, site.name)
        self._timers[site.name] = timer
        try:
            query = yield self._plan(site, local)
            if query is None or self.cancelled:
                return
            handle = SiteHandle()
            self._running[site.name] = handle
            self.summary.asked.append(site.name)

            def emit(answer: Dataset) -> None:
                self.federation.reactor.callFromThread(self._on_answer, query, answer)

            count = yield self.federation.run_site(site.name, query.plan, handle, emit)
            if site.name in self._running:
                self.summary.answered.append(site.name)
                logger.info(
                    "federated query %s: %s returned %d matches", self.query_id, site.name, count
                )
        except QueryCancelled:
            logger.info("federated query %s: %s confirmed the cancel", self.query_id, site.name)
        except Exception as error:
            if site.name in self._running and not self.cancelled:
                self.summary.failed[site.name] = f"failed: {error}"
                logger.warning("federated query %s: %s failed: %s", self.query_id, site.name, error)
        finally:
            if timer.active():
                timer.cancel()
            self._running.pop(site.name, None)
            self._finish_if_done()

    @defer.inlineCallbacks
    def _plan(
        self, site: MemberSite, local: PatientIdentifier | None
    ) -> Generator[defer.Deferred[Any], Any, _SiteQuery | None]:
        keys = copy.deepcopy(self.request.identifier)
        for keyword in ("SpecificCharacterSet", "OtherPatientIDsSequence", "RetrieveAETitle"):
            if keyword in keys:
                delattr(keys, keyword)
        # The site's objects may carry no issuer: the issuer is checked here, not there.
        keys.IssuerOfPatientID = ""
        if self.federation.check.strictness != "off":
            for keyword in _CHECKED_KEYWORDS:
                if keyword not in keys:
                    setattr(keys, keyword, "")

        if local is not None:
            resolution = yield self.resolver.resolve(local, site.issuer)
            remote = resolution.identifier
            if remote is None:
                self._skip(site, f"no identifier in domain {site.issuer} ({resolution.source})")
                return None
            keys.PatientID = remote.value
            return self._query(site, keys, remote, local)

        known = self._known_location(site)
        if known is not None:
            keys.PatientID = known.remote.value
            return self._query(site, keys, known.remote, known.local)
        if self._study_keys() and not self.uid_lookup and self._held_elsewhere():
            self._skip(site, "does not hold the study")
            return None
        if not (site.queries_without_patient_id or self.uid_lookup):
            self._skip(site, "queries without patient ID are not allowed")
            return None
        if "PatientID" in keys:
            # A local ID pattern means nothing at the site; it is matched here after mapping.
            keys.PatientID = ""
        return self._query(site, keys, None, None)

    def _query(
        self,
        site: MemberSite,
        keys: Dataset,
        remote: PatientIdentifier | None,
        local: PatientIdentifier | None,
    ) -> _SiteQuery:
        plan = SitePlan(site.name, self.request.level, keys, site.relational)
        return _SiteQuery(site, plan, remote, local)

    def _study_keys(self) -> list[str]:
        identifier = self.request.identifier
        if "StudyInstanceUID" not in identifier or self.request.level is Level.PATIENT:
            return []
        return values_of(identifier["StudyInstanceUID"])

    def _known_location(self, site: MemberSite) -> Location | None:
        studies = self._study_keys()
        if len(studies) != 1:
            return None
        for location in self.federation.locations.locations(studies[0]):
            if location.site == site.name:
                return location
        return None

    def _held_elsewhere(self) -> bool:
        studies = self._study_keys()
        return len(studies) == 1 and bool(self.federation.locations.locations(studies[0]))

    def _skip(self, site: MemberSite, reason: str) -> None:
        self.summary.skipped[site.name] = reason
        logger.info("federated query %s: %s not asked: %s", self.query_id, site.name, reason)

    def _timed_out(self, name: str) -> None:
        if name not in self._running:
            return
        site = self.federation.sites[name]
        handle = self._running.pop(name)
        self.summary.failed[name] = f"timed out after {site.timeout_seconds:g} s"
        logger.warning(
            "federated query %s: %s timed out after %g s",
            self.query_id,
            name,
            site.timeout_seconds,
        )
        if handle is not None:
            handle.abort()
        self._finish_if_done()

    def _on_answer(self, query: _SiteQuery, answer: Dataset) -> None:
        if self.cancelled or self.finished or query.site.name not in self._running:
            return
        origin = self._origin_if_known(query, answer)
        if isinstance(origin, Origin):
            self._accept(origin, answer)
        elif origin is not None:
            self._lookups += 1
            origin.addCallback(self._accept_mapped, query, answer)
            origin.addErrback(self._lookup_failed, query)

    def _origin_if_known(
        self, query: _SiteQuery, answer: Dataset
    ) -> Origin | defer.Deferred[PatientIdentifier | None] | None:
        """Return whose entity a match is, a lookup in progress, or None to ignore it."""
        site = query.site
        patient_id = str(answer.get("PatientID", "") or "").strip()
        issuer = str(answer.get("IssuerOfPatientID", "") or "").strip()
        if issuer and issuer != site.issuer:
            self._ignore(site, f"issuer '{issuer}' is not the site's domain")
            return None
        if query.remote is not None and query.local is not None:
            if patient_id and patient_id != query.remote.value:
                self._ignore(site, "answer for another patient ID")
                return None
            return Origin(site.name, query.remote, query.local)
        if not patient_id:
            self._ignore(site, "answer without PatientID")
            return None
        return self._local_for(PatientIdentifier(patient_id, site.issuer))

    def _local_for(self, remote: PatientIdentifier) -> defer.Deferred[PatientIdentifier | None]:
        if remote in self._local_of:
            return defer.succeed(self._local_of[remote])

        def remember(resolution: Resolution) -> PatientIdentifier | None:
            self._local_of[remote] = resolution.identifier
            return resolution.identifier

        return self.resolver.local_for(remote).addCallback(remember)

    @defer.inlineCallbacks
    def _accept_mapped(
        self, local: PatientIdentifier | None, query: _SiteQuery, answer: Dataset
    ) -> Generator[defer.Deferred[Any], Any, None]:
        try:
            if local is None:
                self._ignore(query.site, "no local patient for the site's patient ID")
                return
            if local not in self._records:
                record = yield self.federation.demographics(local)
                self._records[local] = record
                if record is None:
                    logger.warning(
                        "federated query %s: no local record of patient %s: responses keep"
                        " the site's name, birth date and sex, unchecked",
                        self.query_id,
                        local,
                    )
            if not (self.cancelled or self.finished):
                patient_id = str(answer.get("PatientID", "")).strip()
                remote = PatientIdentifier(patient_id, query.site.issuer)
                self._accept(Origin(query.site.name, remote, local), answer)
        except Exception as error:
            # Without the local record the match cannot be checked, so it is not sent.
            self._ignore(query.site, f"local record lookup failed: {error}")
        finally:
            self._lookups -= 1
            self._finish_if_done()

    def _lookup_failed(self, failure: Any, query: _SiteQuery) -> None:
        self._lookups -= 1
        self._ignore(query.site, f"identity lookup failed: {failure.getErrorMessage()}")
        self._finish_if_done()

    def _ignore(self, site: MemberSite, reason: str) -> None:
        self.summary.ignored += 1
        logger.info("federated query %s: %s: ignored %s", self.query_id, site.name, reason)

    def _accept(self, origin: Origin, answer: Dataset) -> None:
        record = self._records.get(origin.local)
        if record is not None:
            found = differences(record, patient_demographics(answer), self.federation.check)
            if found:
                self.summary.ignored += 1
                logger.warning(
                    "federated query %s: %s: dropped a match of %s for local patient %s: %s",
                    self.query_id,
                    origin.site,
                    origin.remote,
                    origin.local,
                    ", ".join(found),
                )
                return
        localize(answer, origin, record)
        if not matches(self.request.identifier, answer):
            self.summary.ignored += 1
            return
        row, replaced = build_row(
            self.request.identifier,
            self.request.level,
            answer,
            origin,
            self.federation.ae_title,
            self.character_set,
        )
        self.summary.replaced_characters += replaced
        study = str(answer.get("StudyInstanceUID", "") or "")
        if study and self.request.level is not Level.PATIENT:
            self.federation.locations.remember(
                study, Location(origin.site, origin.remote, origin.local)
            )
        if self.request.level is Level.PATIENT:
            _blank_patient_counts(row)
        if self.merger.add(row, origin):
            self.summary.rows += 1
            if self.request.level is Level.PATIENT:
                self._patient_rows[self.merger.key_of(row, origin)] = row
            else:
                self.sink(Row(row))

    def _finish_if_done(self) -> None:
        if self.finished or self._starting or self._running or self._lookups:
            return
        self.finished = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        for key, row in self._patient_rows.items():
            if "OtherPatientIDsSequence" in self.request.identifier:
                row.OtherPatientIDsSequence = other_ids(self.merger.sites_by_key[key])
            self.sink(Row(row))
        self._patient_rows.clear()
        for key in sorted(self.merger.several_patients):
            patients = sorted({str(origin.local) for origin in self.merger.sites_by_key[key]})
            logger.warning(
                "federated query %s: %s is held for patients %s; one row was sent, and a"
                " retrieve of it without a Patient ID is refused",
                self.query_id,
                "/".join(key),
                ", ".join(patients),
            )
        self.summary.duplicates = self.merger.duplicates
        self.summary.over_limit = self.merger.dropped_over_limit
        if self.summary.over_limit:
            logger.warning(
                "federated query %s: %d rows over the limit of %d were dropped",
                self.query_id,
                self.summary.over_limit,
                self.federation.max_answers,
            )
        logger.info(
            "federated query %s done: %d rows, %d duplicates merged, asked %s, failed %s",
            self.query_id,
            self.summary.rows,
            self.summary.duplicates,
            ", ".join(self.summary.asked) or "none",
            ", ".join(self.summary.failed) or "none",
        )
        self.sink(Done(self.summary))


# The attributes identity.check compares, asked from every site so that it can.
_CHECKED_KEYWORDS = ("PatientName", "PatientBirthDate", "PatientSex")


# PATIENT-level counts of one site. A row is sent with the first site's response, and
# a study prefetched to the local PACS is at two sites, so neither that site's count
# nor a sum is the patient's. They are sent empty, which C-FIND reads as unknown.
_PATIENT_COUNTS = (
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
)


def _blank_patient_counts(row: Dataset) -> None:
    for keyword in _PATIENT_COUNTS:
        if keyword in row:
            setattr(row, keyword, None)
