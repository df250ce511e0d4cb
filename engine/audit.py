"""IHE ATNA audit records: DICOM audit messages (PS3.15 A.5) sent as RFC 5424 syslog messages.

The engine records when it starts and stops (Application Activity) and each
study it moves from a source to a destination (DICOM Instances Transferred).
It also records each ADT message applied to a patient record (Patient
Record), each C-FIND its federated Q/R SCP serves (Query) and each request it
refuses (Security Alert).
A record goes to an audit repository over UDP (RFC 5426) or over TCP or TLS
(engine.auditstream), to a file (one syslog message per line), or both.
Sending never stops the engine: a record that cannot be sent is counted and
logged, and the work it describes goes on.

Records carry identifiers (AE titles, patient IDs with their issuer, study
UIDs), never patient names or birth dates. A Query record carries the query
identifier as received, as PS3.15 requires; it is the audit repository's to
protect.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import errno
import ipaddress
import logging
import os
import socket
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from engine.model import PatientIdentifier

logger = logging.getLogger(__name__)

# RFC 5424 PRI: facility 10 (security/authorization) * 8 + severity 5 (notice).
SYSLOG_PRIORITY = 85
# The MSGID that IHE ITI TF-2 (Record Audit Event) gives audit messages.
SYSLOG_MESSAGE_ID = "IHE+RFC-3881"
SYSLOG_APP_NAME = "fdqr"
# RFC 5424 puts a UTF-8 BOM before a message body in UTF-8.
UTF8_BOM = b"\xef\xbb\xbf"
# A failing sink is logged at most once in this many seconds.
ERROR_LOG_SECONDS = 60.0
# A query identifier larger than this is left out of its Query record, so that the record
# still fits one UDP datagram. The record's outcome description then gives its size.
MAX_QUERY_BYTES = 16384
# The encoding of a query identifier when the SCP gives none: Implicit VR Little Endian.
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"


@dataclasses.dataclass(frozen=True)
class Code:
    """A coded value: code, coding scheme designator and meaning."""

    code: str
    scheme: str
    meaning: str


# Event IDs (PS3.16 CID 400) and event types (CID 401).
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
PATIENT_RECORD = Code("110110", "DCM", "Patient Record")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
# Active participant roles (CID 402) and user ID types.
ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
STATION_AE_TITLE = Code("110119", "DCM", "Station AE Title")
# Participant object ID types (CID 404 and RFC 3881).
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")


class Action(enum.StrEnum):
    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(enum.IntEnum):
    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class ObjectType(enum.IntEnum):
    PERSON = 1
    SYSTEM_OBJECT = 2


class ObjectRole(enum.IntEnum):
    PATIENT = 1
    REPORT = 3
    SECURITY_RESOURCE = 13


@dataclasses.dataclass(frozen=True)
class Participant:
    """An active participant: an application, named by its AE title."""

    user_id: str
    requestor: bool
    role: Code | None = None
    # Host name or IP address.
    address: str = ""
    alternative_user_id: str = ""


@dataclasses.dataclass(frozen=True)
class ParticipantObject:
    object_id: str
    object_type: ObjectType
    role: ObjectRole
    id_type: Code
    query: bytes = b""
    details: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    event: Code
    action: Action
    outcome: Outcome
    when: dt.datetime
    participants: tuple[Participant, ...]
    objects: tuple[ParticipantObject, ...] = ()
    event_type: Code | None = None
    outcome_description: str = ""


@dataclasses.dataclass(frozen=True)
class Node:
    """A DICOM node as a participant of a transfer: its AE title and host."""

    ae_title: str
    host: str


def _coded(parent: ElementTree.Element, tag: str, code: Code) -> None:
    ElementTree.SubElement(
        parent,
        tag,
        {"csd-code": code.code, "codeSystemName": code.scheme, "originalText": code.meaning},
    )


def _address_type(address: str) -> str:
    """Return NetworkAccessPointTypeCode: 2 for an IP address, 1 for a host name."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"
    return "2"


def to_xml(record: AuditRecord, source_id: str, site: str = "") -> bytes:
    """Encode a record as a PS3.15 A.5.1 AuditMessage (UTF-8, one line)."""
    message = ElementTree.Element("AuditMessage")
    event = ElementTree.SubElement(
        message,
        "EventIdentification",
        {
            "EventActionCode": record.action.value,
            "EventDateTime": record.when.astimezone(dt.UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": str(record.outcome.value),
        },
    )
    _coded(event, "EventID", record.event)
    if record.event_type is not None:
        _coded(event, "EventTypeCode", record.event_type)
    if record.outcome_description:
        ElementTree.SubElement(event, "EventOutcomeDescription").text = record.outcome_description

    for participant in record.participants:
        attributes = {
            "UserID": participant.user_id,
            "UserIsRequestor": "true" if participant.requestor else "false",
        }
        if participant.alternative_user_id:
            attributes["AlternativeUserID"] = participant.alternative_user_id
        if participant.address:
            attributes["NetworkAccessPointID"] = participant.address
            attributes["NetworkAccessPointTypeCode"] = _address_type(participant.address)
        element = ElementTree.SubElement(message, "ActiveParticipant", attributes)
        if participant.role is not None:
            _coded(element, "RoleIDCode", participant.role)

    source = ElementTree.SubElement(
        message, "AuditSourceIdentification", {"AuditSourceID": source_id}
    )
    if site:
        source.set("AuditEnterpriseSiteID", site)
    # AuditSourceTypeCode 4: an application server process.
    ElementTree.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})

    for item in record.objects:
        element = ElementTree.SubElement(
            message,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": item.object_id,
                "ParticipantObjectTypeCode": str(item.object_type.value),
                "ParticipantObjectTypeCodeRole": str(item.role.value),
            },
        )
        _coded(element, "ParticipantObjectIDTypeCode", item.id_type)
        if item.query:
            ElementTree.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(
                item.query
            ).decode("ascii")
        for detail_type, value in item.details:
            ElementTree.SubElement(
                element,
                "ParticipantObjectDetail",
                {"type": detail_type, "value": base64.b64encode(value.encode()).decode("ascii")},
            )
    encoded: bytes = ElementTree.tostring(message, encoding="utf-8", xml_declaration=False)
    return encoded


def syslog_message(body: bytes, when: dt.datetime, hostname: str, process_id: int) -> bytes:
    """Wrap an audit message in an RFC 5424 syslog message without structured data."""
    timestamp = when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = (
        f"<{SYSLOG_PRIORITY}>1 {timestamp} {hostname or '-'} {SYSLOG_APP_NAME} {process_id}"
        f" {SYSLOG_MESSAGE_ID} - "
    )
    return header.encode("ascii", "replace") + UTF8_BOM + body


def read_syslog_message(message: bytes) -> ElementTree.Element:
    """Return the AuditMessage of one syslog message as syslog_message writes it.

    Raises ValueError when the message has no UTF-8 BOM before its body or the
    body is not XML.
    """
    _, bom, body = message.rstrip(b"\n").partition(UTF8_BOM)
    if not bom:
        raise ValueError("no UTF-8 BOM before the audit message")
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError as error:
        raise ValueError(f"the audit message is not XML: {error}") from error


def read_file(path: Path) -> list[ElementTree.Element]:
    """Return the AuditMessages of a file that FileSink wrote."""
    return [read_syslog_message(line) for line in path.read_bytes().splitlines() if line]


def participant_name(participant: ElementTree.Element) -> str:
    """Return an ActiveParticipant's AE title when AlternativeUserID gives one, else its UserID."""
    alternative = participant.attrib.get("AlternativeUserID", "")
    if alternative.startswith("AETITLES="):
        return alternative.removeprefix("AETITLES=").split(";")[0]
    return participant.attrib["UserID"]


def event_code(message: ElementTree.Element, tag: str = "EventID") -> str:
    """Return the code of a record's EventID, or of another coded element of its event."""
    element = message.find(f"EventIdentification/{tag}")
    return "" if element is None else element.attrib["csd-code"]


def patient_object(patient: PatientIdentifier) -> ParticipantObject:
    """Return the patient as a participant object, its ID in HL7 CX form (ID^^^issuer)."""
    return ParticipantObject(
        f"{patient.value}^^^{patient.issuer}", ObjectType.PERSON, ObjectRole.PATIENT, PATIENT_NUMBER
    )


class Sink(Protocol):
    name: str

    def send(self, message: bytes) -> None: ...

    # Returns None, or a Deferred that fires once the sink wrote what it kept.
    def close(self) -> object: ...


class UdpSink:
    """Sends each message as one UDP datagram (RFC 5426)."""

    def __init__(self, host: str, port: int, name: str = "") -> None:
        self.name = name or f"udp:{host}:{port}"
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self._socket = socket.socket(family, kind, proto)
        self._address = address

    def send(self, message: bytes) -> None:
        self._socket.sendto(message, self._address)

    def close(self) -> None:
        self._socket.close()


class FileSink:
    """Appends each message as one line to a file, in one unbuffered write.

    A write that fails loses that line only; nothing is kept to be written
    later. A line cut short (disk full) is ended before the next one, so
    each record still starts a line. When the file was renamed or removed
    (log rotation), the next write creates it again.
    """

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = -1
        # True after a line was cut short: the next write ends it first.
        self._cut = False
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        status = os.fstat(self._fd)
        self._identity = (status.st_dev, status.st_ino)

    def _reopen_if_moved(self) -> None:
        try:
            status = os.stat(self.path)
            moved = (status.st_dev, status.st_ino) != self._identity
        except FileNotFoundError:
            moved = True
        if moved:
            os.close(self._fd)
            self._fd = -1
            self._open()

    def send(self, message: bytes) -> None:
        line = message.replace(b"\n", b" ") + b"\n"
        with self._lock:
            if self._fd == -1:
                self._open()
            else:
                self._reopen_if_moved()
            if self._cut:
                os.write(self._fd, b"\n")
                self._cut = False
            written = os.write(self._fd, line)
            if written != len(line):
                self._cut = written > 0
                raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written")

    def close(self) -> None:
        with self._lock:
            if self._fd != -1:
                os.close(self._fd)
                self._fd = -1


class Auditor:
    """Builds audit records for the engine's events and sends them to every sink.

    Safe to call from any thread. With no sinks, every method returns at once.
    """

    def __init__(
        self,
        ae_title: str,
        source_id: str = "",
        site: str = "",
        sinks: Sequence[Sink] = (),
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        hostname: str = "",
        monotonic: Callable[[], float] = time.monotonic,
        on_failed: Callable[[str], None] = lambda sink: None,
    ) -> None:
        self.ae_title = ae_title
        self.source_id = source_id or ae_title
        self.site = site
        self.sinks = list(sinks)
        self.now = now
        self.hostname = hostname or socket.gethostname()
        self.process_id = os.getpid()
        self.monotonic = monotonic
        # Metrics hook: called with the sink's name for each record it did not take.
        self.on_failed = on_failed
        self.sent = 0
        self.failed = 0
        self._started = False
        self._lock = threading.Lock()
        # Per sink: records not sent since the last one it took, and when that was logged.
        self._failing: dict[str, int] = {}
        self._error_logged_at: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    @property
    def engine_user_id(self) -> str:
        """The engine's UserID: its process ID (PS3.15 A.5.2.1)."""
        return str(self.process_id)

    def close(self) -> defer.Deferred[None]:
        """Close every sink; fire when each has written what it kept.

        A sink that fails to close is logged; the Deferred fires with None all the same.
        """
        closing = [
            defer.maybeDeferred(sink.close).addErrback(self._close_failed, sink)
            for sink in self.sinks
        ]
        self.sinks = []
        if self.failed:
            logger.warning("audit: %d records were not sent since the start", self.failed)
        closed = defer.gatherResults(closing)
        return closed.addCallback(lambda _: None)

    def _close_failed(self, failure: Failure, sink: Sink) -> None:
        logger.warning("audit: closing %s failed: %s", sink.name, failure.getErrorMessage())

    def _engine(self, requestor: bool, role: Code | None = None) -> Participant:
        # The AE title goes in AlternativeUserID, as PS3.15 A.5.2.2 gives it for a DICOM process.
        return Participant(
            self.engine_user_id,
            requestor,
            role,
            alternative_user_id=f"AETITLES={self.ae_title}",
        )

    # Events

    def application_started(self) -> None:
        self._started = True
        self._application(APPLICATION_START)

    def application_stopped(self) -> None:
        """Record the stop of an engine whose start was recorded; a failed start has none."""
        if self._started:
            self._started = False
            self._application(APPLICATION_STOP)

    def _application(self, event_type: Code) -> None:
        if not self.enabled:
            return
        self.emit(
            AuditRecord(
                APPLICATION_ACTIVITY,
                Action.EXECUTE,
                Outcome.SUCCESS,
                self.now(),
                (self._engine(False, ROLE_APPLICATION),),
                event_type=event_type,
            )
        )

    def study_transferred(
        self,
        patient: PatientIdentifier,
        study_instance_uid: str,
        source: Node,
        destination: Node,
        outcome: Outcome,
        description: str = "",
        requestor: Node | None = None,
    ) -> None:
        """Record a study the engine moved from a source to a destination.

        The engine retrieves it (C-MOVE or C-GET) and stores it (C-STORE).
        The requestor is the engine for a job, or the caller of the
        federated Q/R SCP, which is also the destination of a C-GET. The
        patient is named by the local identifier stamped into the objects.
        """
        if not self.enabled:
            return
        participants = [
            self._engine(requestor is None),
            Participant(source.ae_title, False, ROLE_SOURCE, source.host),
            Participant(
                destination.ae_title, requestor == destination, ROLE_DESTINATION, destination.host
            ),
        ]
        if requestor is not None and requestor != destination:
            participants.append(Participant(requestor.ae_title, True, address=requestor.host))
        self.emit(
            AuditRecord(
                INSTANCES_TRANSFERRED,
                Action.CREATE,
                outcome,
                self.now(),
                tuple(participants),
                (
                    ParticipantObject(
                        study_instance_uid,
                        ObjectType.SYSTEM_OBJECT,
                        ObjectRole.REPORT,
                        STUDY_INSTANCE_UID,
                    ),
                    patient_object(patient),
                ),
                outcome_description=description,
            )
        )

    def patient_record(
        self,
        sender: Node,
        patient: PatientIdentifier,
        action: Action,
        message_type: str,
        control_id: str,
    ) -> None:
        """Record a change to the engine's record of a patient that an HL7 message made.

        The sender is named as MSH-3|MSH-4; the message's type and MSH-10 are
        details of the patient object.
        """
        if not self.enabled:
            return
        patient_item = dataclasses.replace(
            patient_object(patient),
            details=(("MSH-9", message_type), ("MSH-10", control_id)),
        )
        self.emit(
            AuditRecord(
                PATIENT_RECORD,
                action,
                Outcome.SUCCESS,
                self.now(),
                (
                    Participant(sender.ae_title, True, ROLE_SOURCE, sender.host),
                    self._engine(False, ROLE_DESTINATION),
                ),
                (patient_item,),
            )
        )

    def restricted_use(self, caller: Node, service: str, sop_class_uid: str, reason: str) -> None:
        """Record a request the engine refused to a caller (Security Alert).

        service names the request (C-FIND, C-MOVE, C-GET), reason why it was refused.
        """
        if not self.enabled:
            return
        self.emit(
            AuditRecord(
                SECURITY_ALERT,
                Action.EXECUTE,
                Outcome.MINOR_FAILURE,
                self.now(),
                (
                    Participant(caller.ae_title, True, address=caller.host),
                    self._engine(False),
                ),
                (
                    ParticipantObject(
                        sop_class_uid,
                        ObjectType.SYSTEM_OBJECT,
                        ObjectRole.SECURITY_RESOURCE,
                        SOP_CLASS_UID,
                    ),
                ),
                event_type=USE_OF_RESTRICTED_FUNCTION,
                outcome_description=f"{service} refused: {reason}",
            )
        )

    def query_answered(
        self,
        caller: Node,
        sop_class_uid: str,
        identifier: bytes,
        transfer_syntax: str,
        outcome: Outcome,
        description: str = "",
    ) -> None:
        """Record a C-FIND that the federated Q/R SCP received, with its identifier as sent."""
        if not self.enabled:
            return
        if len(identifier) > MAX_QUERY_BYTES:
            left_out = f"query identifier of {len(identifier)} bytes left out"
            description = f"{description}; {left_out}" if description else left_out
            identifier = b""
        self.emit(
            AuditRecord(
                QUERY,
                Action.EXECUTE,
                outcome,
                self.now(),
                (
                    Participant(caller.ae_title, True, ROLE_SOURCE, caller.host),
                    self._engine(False, ROLE_DESTINATION),
                ),
                (
                    ParticipantObject(
                        sop_class_uid,
                        ObjectType.SYSTEM_OBJECT,
                        ObjectRole.REPORT,
                        SOP_CLASS_UID,
                        query=identifier,
                        details=(("TransferSyntax", transfer_syntax or IMPLICIT_VR_LITTLE_ENDIAN),),
                    ),
                ),
                outcome_description=description,
            )
        )

    # Sending

    def emit(self, record: AuditRecord) -> None:
        """Send one record to every sink. An OSError of a sink is counted and logged, not raised."""
        body = to_xml(record, self.source_id, self.site)
        message = syslog_message(body, record.when, self.hostname, self.process_id)
        for sink in self.sinks:
            try:
                sink.send(message)
            except OSError as error:
                self._failed(sink, record, error)
            else:
                self._sent(sink)

    def _sent(self, sink: Sink) -> None:
        with self._lock:
            self.sent += 1
            lost = self._failing.pop(sink.name, 0)
            self._error_logged_at.pop(sink.name, None)
        if lost:
            logger.warning(
                "audit: %s takes records again; %d records were not sent to it", sink.name, lost
            )

    def _failed(self, sink: Sink, record: AuditRecord, error: OSError) -> None:
        self.on_failed(sink.name)
        with self._lock:
            self.failed += 1
            lost = self._failing[sink.name] = self._failing.get(sink.name, 0) + 1
            now = self.monotonic()
            last = self._error_logged_at.get(sink.name)
            if last is not None and now - last < ERROR_LOG_SECONDS:
                return
            self._error_logged_at[sink.name] = now
        logger.warning(
            "audit record %s not sent to %s: %s (%d records not sent to it since it last took one)",
            record.event.meaning,
            sink.name,
            error.strerror or error,
            lost,
        )
