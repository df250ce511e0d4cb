"""Matching received objects to the retrievals that asked for them, and spooling them stamped.

The reactor adds and removes retrievals in the registry. The Receiver runs in
the Storage SCP's association threads, where it matches and counts objects.
A lock guards the registry, so an object needs no round trip to the reactor.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

from engine.coercion import (
    Header,
    Stamp,
    StampError,
    StampRejected,
    header_of,
    read_header,
    stamp_file,
)
from engine.dicomfile import scan_head
from engine.dimse.status import Status
from engine.dimse.storescp import Arrival, Verdict
from engine.identity.check import same_value
from engine.jobs.spool import Spool, SpoolFull, file_size
from engine.model import Demographics, PatientIdentifier

logger = logging.getLogger(__name__)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


# The job id of a retrieval that no job asked for (a federated retrieve).
NO_JOB = 0


@dataclasses.dataclass(eq=False)
class Expectation:
    """A retrieval in progress: which study from which source, and how to stamp it.

    job_id is NO_JOB for a retrieve of the federated Q/R SCP, which has no job.
    """

    job_id: int
    source: str
    source_ae_title: str
    study_instance_uid: str
    remote: PatientIdentifier
    stamp: Stamp
    spool_dir: Path
    message_id: int
    # The requested patient's birth date and sex: those of the source's C-FIND response
    # for a job, those of the local record for a federated retrieve. An object with
    # other values belongs to another person. None turns the check off.
    demographics: Demographics | None = None
    received: int = 0
    rejected: int = 0
    # Rejections that a retry would repeat: all but those of a full spool.
    rejected_again_on_retry: int = 0
    rejections: list[str] = dataclasses.field(default_factory=list)
    # Called in the Storage SCP's thread with each object's spool path once it is
    # written, so the pipeline can forward it while the rest is still arriving.
    on_spooled: Callable[[Path], None] | None = None
    # Why the retrieval was stopped, for example because an ADT message gave the
    # remote patient to another local patient, or "" while it runs. Objects that
    # arrive after that are rejected.
    stopped: str = ""
    # Whether the objects stored before the stop may belong to another patient.
    stored_suspect: bool = False
    # Called once with that reason, so spooled objects are not sent on.
    on_stopped: Callable[[str], None] | None = None

    @property
    def owner(self) -> str:
        """What the retrieval is for, as log lines name it."""
        return "federated retrieve" if self.job_id == NO_JOB else f"job {self.job_id}"


class ExpectationRegistry:
    """The retrievals in progress, looked up by study, move request and sender.

    Its methods may be called from any thread.
    """

    def __init__(self, our_ae_title: str) -> None:
        self.our_ae_title = our_ae_title
        self._active: list[Expectation] = []
        # Retrievals whose objects are all received but still being sent on.
        self._watched: list[Expectation] = []
        self._lock = threading.Lock()
        self.unmatched = 0

    def expect(self, expectation: Expectation) -> None:
        with self._lock:
            self._active.append(expectation)

    def forget(self, expectation: Expectation) -> None:
        with self._lock:
            if expectation in self._active:
                self._active.remove(expectation)

    def watch(self, expectation: Expectation) -> None:
        """Keep a retrieval that receives no more objects stoppable while they are sent on."""
        with self._lock:
            self._watched.append(expectation)

    def unwatch(self, expectation: Expectation) -> None:
        with self._lock:
            if expectation in self._watched:
                self._watched.remove(expectation)

    def active(self) -> list[Expectation]:
        """Return the retrievals in progress that were not stopped, watched ones too."""
        with self._lock:
            return [e for e in (*self._active, *self._watched) if not e.stopped]

    def stop(self, expectation: Expectation, reason: str, stored_suspect: bool = True) -> None:
        """Stop a retrieval: reject its further objects and withhold those not yet sent.

        stored_suspect is True when the objects already stored may be another
        patient's (an identifier moved), not merely unwanted (a cancelled job).
        """
        with self._lock:
            if expectation.stopped:
                return
            expectation.stopped = reason
            expectation.stored_suspect = stored_suspect
        logger.warning(
            "%s: retrieval of study %s from %s stopped: %s",
            expectation.owner,
            expectation.study_instance_uid,
            expectation.source,
            reason,
        )
        if expectation.on_stopped is not None:
            expectation.on_stopped(reason)

    def match(
        self,
        study_instance_uid: str,
        calling_ae_title: str,
        originator_ae_title: str,
        originator_message_id: int | None,
    ) -> Expectation | None:
        """Find the retrieval an object belongs to; None when none or more than one patient fits.

        The Move Originator fields narrow the choice when the source sets them,
        but some PACS leave them out, so the study is what must match.
        """
        with self._lock:
            found = [e for e in self._active if e.study_instance_uid == study_instance_uid]
        if originator_message_id and originator_ae_title == self.our_ae_title:
            by_request = [e for e in found if e.message_id == originator_message_id]
            found = by_request or found
        by_sender = [e for e in found if e.source_ae_title == calling_ae_title]
        found = by_sender or found
        identities = {(e.stamp.local, e.remote) for e in found}
        if len(identities) != 1:
            return None
        return found[0]

    def record(
        self,
        expectation: Expectation,
        accepted: bool,
        reason: str = "",
        retry_helps: bool = False,
    ) -> None:
        """Count an object as received, or as rejected for reason.

        retry_helps marks a rejection that a later retrieve may not repeat (a full spool).
        """
        with self._lock:
            if accepted:
                expectation.received += 1
                return
            expectation.rejected += 1
            if not retry_helps:
                expectation.rejected_again_on_retry += 1
            if len(expectation.rejections) < 20:
                expectation.rejections.append(reason)

    def record_unmatched(self) -> None:
        with self._lock:
            self.unmatched += 1


class Receiver:
    """The Storage SCP's ArrivalHandler for retrieved objects."""

    def __init__(
        self,
        registry: ExpectationRegistry,
        fsync: bool = True,
        spool: Spool | None = None,
    ) -> None:
        self.registry = registry
        self.fsync = fsync
        self.spool = spool

    def __call__(self, arrival: Arrival) -> Verdict:
        try:
            # One scan of the encoded head serves the checks and the stamping.
            head = scan_head(arrival.source)
            header = header_of(head) if head is not None else read_header(arrival.source)
        except (StampError, OSError) as error:
            logger.warning("rejected object from %s: %s", arrival.calling_ae_title, error)
            return Verdict(Status.CANNOT_UNDERSTAND, "object cannot be read")

        expectation = self.registry.match(
            header.study_instance_uid,
            arrival.calling_ae_title,
            arrival.move_originator_ae_title,
            arrival.move_originator_message_id,
        )
        if expectation is None:
            self.registry.record_unmatched()
            logger.warning(
                "rejected object %s of study %s from %s: no retrieval in progress matches it",
                header.sop_instance_uid,
                header.study_instance_uid,
                arrival.calling_ae_title,
            )
            return Verdict(Status.REFUSED_NOT_AUTHORIZED, "no retrieval expects this study")

        problem = _check_object(header, expectation)
        if problem:
            self.registry.record(expectation, False, problem)
            logger.warning(
                "%s: rejected object %s from %s: %s",
                expectation.owner,
                header.sop_instance_uid,
                expectation.source,
                problem,
            )
            return Verdict(Status.REFUSED_NOT_AUTHORIZED, problem)

        target = expectation.spool_dir / f"{header.sop_instance_uid}.dcm"
        reserved = arrival.size
        try:
            if self.spool is not None:
                self.spool.reserve(reserved)
        except SpoolFull as error:
            self.registry.record(expectation, False, str(error), retry_helps=True)
            logger.warning(
                "%s: object %s refused: %s", expectation.owner, header.sop_instance_uid, error
            )
            return Verdict(Status.OUT_OF_RESOURCES, "spool full")
        try:
            expectation.spool_dir.mkdir(parents=True, exist_ok=True)
            replaced = file_size(target)
            stamp_file(arrival.source, target, expectation.stamp, fsync=self.fsync, head=head)
        except StampRejected as error:
            if self.spool is not None:
                self.spool.release(reserved)
            self.registry.record(expectation, False, str(error))
            logger.warning(
                "%s: object %s rejected by the destination's profile: %s",
                expectation.owner,
                header.sop_instance_uid,
                error,
            )
            return Verdict(Status.PROCESSING_FAILURE, "rejected by the coercion profile")
        except (StampError, OSError) as error:
            if self.spool is not None:
                self.spool.release(reserved)
            self.registry.record(expectation, False, str(error))
            logger.error(
                "%s: object %s not stored in the spool: %s",
                expectation.owner,
                header.sop_instance_uid,
                error,
            )
            return Verdict(Status.OUT_OF_RESOURCES, "object could not be spooled")
        if self.spool is not None:
            # A second copy of the same instance replaced the first one in place.
            self.spool.adjust(reserved + replaced, file_size(target))

        self.registry.record(expectation, True)
        if expectation.on_spooled is not None:
            expectation.on_spooled(target)
        return Verdict(Status.SUCCESS)


def _check_object(header: Header, expectation: Expectation) -> str:
    """Return why an object must not be stored under the expected patient, or ''."""
    if expectation.stopped:
        return f"retrieval stopped: {expectation.stopped}"
    if not _UID.match(header.sop_instance_uid) or len(header.sop_instance_uid) > 64:
        return "invalid SOP Instance UID"
    if header.patient_id != expectation.remote.value:
        return "patient ID differs from the requested patient"
    if header.issuer_of_patient_id and header.issuer_of_patient_id != expectation.remote.issuer:
        return "issuer of patient ID differs from the source's domain"
    return _other_person(header, expectation.demographics)


def _other_person(header: Header, expected: Demographics | None) -> str:
    """Return why an object's birth date or sex shows another person than the requested one.

    Names are not compared here: their encoding differs between character sets.
    """
    if expected is None:
        return ""
    for attribute, theirs, label in (
        ("birth_date", header.patient_birth_date, "birth date"),
        ("sex", header.patient_sex, "sex"),
    ):
        ours = str(getattr(expected, attribute)).strip()
        if ours and theirs.strip() and not same_value(attribute, ours, theirs.strip(), False):
            return f"patient {label} differs from the requested patient's"
    return ""
