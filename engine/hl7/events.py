"""Translating parsed HL7 messages into domain events."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Sequence

from engine.hl7.codes import AckCode, ErrorCode
from engine.hl7.message import HL7Error, Message, Segment, parse_timestamp
from engine.model import (
    Demographics,
    DemographicsUpdated,
    DomainEvent,
    MessageOrigin,
    OrderCancelled,
    OrderChanged,
    OrderFacts,
    OrderPlaced,
    OrderStatusChanged,
    PatientIdentifier,
    PatientsMerged,
    patient_id_problem,
)

ORDER_TYPES = frozenset({"ORM^O01", "OMI^O23"})
DEMOGRAPHIC_TYPES = frozenset({"ADT^A01", "ADT^A04", "ADT^A08"})
MERGE_TYPE = "ADT^A40"
SCHEDULE_TYPE = "SIU^S12"
# Message types the engine accepts and stores.
SUPPORTED_TYPES = ORDER_TYPES | DEMOGRAPHIC_TYPES | frozenset({MERGE_TYPE, SCHEDULE_TYPE})
# MSH-9.1 of an acknowledgement, which is never answered.
ACK_MESSAGE_CODE = "ACK"
HL7_NULL = '""'
# ORC-1 order control codes (HL7 Table 0119) the engine acts on.
NEW_ORDER_CONTROL = "NW"
# CA and DC ask for a cancel; OC and OD report one made by the filler (e.g. the RIS).
CANCEL_ORDER_CONTROLS = frozenset({"CA", "DC", "OC", "OD"})
CHANGE_ORDER_CONTROL = "XO"
STATUS_ORDER_CONTROL = "SC"
# HL7 Table 0119 as of v2.5.1, whose codes are case-sensitive. Others get AE 103.
# fmt: off
ORDER_CONTROLS = frozenset({
    "AF", "CA", "CH", "CN", "CR", "DC", "DE", "DF", "DR", "FU", "HD", "HR", "LI",
    "NA", "NW", "OC", "OD", "OE", "OF", "OH", "OK", "OP", "OR", "PA", "PR", "PY",
    "RC", "RE", "RF", "RL", "RO", "RP", "RQ", "RR", "RU", "SC", "SN", "SR", "SS",
    "UA", "UC", "UD", "UF", "UH", "UM", "UN", "UR", "UX", "XO", "XR", "XX",
})
# fmt: on

# HL7 Table 0001 administrative sex to DICOM Patient's Sex (M, F, O or empty).
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "U": ""}


@dataclasses.dataclass(frozen=True)
class IdentifierPolicy:
    """Which PID-3 repetition carries the local patient identifier.

    authorities are the assigning authority names (CX-4.1 namespace or CX-4.2
    universal id) that denote the local domain, most preferred first; issuer
    is the DICOM IssuerOfPatientID written for it. unqualified_ids_are_local
    accepts a PID-3 with a single identifier and no assigning authority as local.
    """

    issuer: str
    authorities: Sequence[str]
    unqualified_ids_are_local: bool = False


@dataclasses.dataclass(frozen=True)
class Unhandled:
    """A supported message that starts no work (e.g. SIU^S12, or an ORC-1 not acted on)."""

    origin: MessageOrigin
    reason: str


def origin_of(message: Message) -> MessageOrigin:
    return MessageOrigin(
        sending_application=message.get("MSH", 3),
        sending_facility=message.get("MSH", 4),
        message_type=message.message_type,
        control_id=message.control_id,
    )


def check_control_id(message: Message) -> None:
    """Reject a message without MSH-10: it cannot be acknowledged or deduplicated."""
    if not message.control_id:
        raise HL7Error(
            "MSH-10 (message control id) is missing",
            ErrorCode.REQUIRED_FIELD_MISSING,
            ("MSH", 1, 10),
            AckCode.APPLICATION_ERROR,
        )


# HL7 Table 0103: production, training, debugging.
PROCESSING_IDS = ("P", "T", "D")
# HL7 v2 versions as MSH-12 writes them: 2.3, 2.5.1.
_VERSION = re.compile(r"2\.[1-9](\.[0-9]+)?")


def check_environment(message: Message, processing_ids: Collection[str]) -> None:
    """Reject a message of another processing mode (MSH-11) or of an HL7 version other than v2.

    A test system pointed at production sends training or debugging messages,
    which must not start retrievals into the production PACS. An empty field
    is accepted.
    """
    processing = message.get("MSH", 11, 1)
    if processing and processing not in processing_ids:
        # The log shows only table values; the sender's ACK shows what it sent.
        quoted = f"'{processing}'" if processing in PROCESSING_IDS else "that value"
        accepted = ", ".join(processing_ids)
        raise HL7Error(
            f"processing ID '{processing[:20]}' is not accepted here (accepted: {accepted})",
            ErrorCode.UNSUPPORTED_PROCESSING_ID,
            ("MSH", 1, 11),
            AckCode.APPLICATION_REJECT,
            log_text=f"MSH-11 processing ID {quoted} is not in mllp.processing_ids ({accepted})",
        )
    version = message.get("MSH", 12, 1)
    if version and not _VERSION.fullmatch(version):
        raise HL7Error(
            f"unsupported HL7 version '{version[:20]}' in MSH-12 (HL7 v2.1 to v2.9 are supported)",
            ErrorCode.UNSUPPORTED_VERSION_ID,
            ("MSH", 1, 12),
            AckCode.APPLICATION_REJECT,
            log_text=(
                f"unsupported HL7 version '{version}' in MSH-12"
                if re.fullmatch(r"[0-9.]{1,10}", version)
                else f"unsupported HL7 version in MSH-12 (a value of {len(version)} characters)"
            ),
        )


def check_supported(message: Message) -> None:
    if not message.get("MSH", 9, 1):
        raise HL7Error(
            "MSH-9 (message type) is missing",
            ErrorCode.REQUIRED_FIELD_MISSING,
            ("MSH", 1, 9),
            AckCode.APPLICATION_ERROR,
        )
    if message.message_type not in SUPPORTED_TYPES:
        raise HL7Error(
            f"unsupported message type '{message.message_type}'",
            ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
            ("MSH", 1, 9),
            AckCode.APPLICATION_REJECT,
            log_text=f"unsupported message type {_loggable_type(message.message_type)}",
        )


# A message type as HL7 spells one (ORU^R01, ADT^A08^ADT_A01): safe to write to the log.
_MESSAGE_TYPE = re.compile(r"[A-Z0-9]{3}(\^[A-Z0-9]{3}(\^[A-Z0-9]{3}_[A-Z0-9]{3})?)?")


def _loggable_type(value: str) -> str:
    if _MESSAGE_TYPE.fullmatch(value):
        return f"'{value}'"
    return f"(a value of {len(value)} characters)"


def check_header(message: Message) -> None:
    """Reject messages that no route can process: no control id, unsupported type."""
    check_control_id(message)
    check_supported(message)


def is_acknowledgement(message: Message) -> bool:
    return message.get("MSH", 9, 1) == ACK_MESSAGE_CODE


def to_events(message: Message, policy: IdentifierPolicy) -> list[DomainEvent | Unhandled]:
    """Translate a message whose header passed check_header into its domain events.

    An order message gives one event per order (ORC group); a merge gives one
    per patient (PID and MRG pair). Raises HL7Error if any part is invalid,
    so a message is taken whole or not at all.
    """
    origin = origin_of(message)
    kind = message.message_type
    if kind in ORDER_TYPES or kind in DEMOGRAPHIC_TYPES or kind == SCHEDULE_TYPE:
        _check_one_patient(message)
    if kind in ORDER_TYPES:
        return [
            _order_event(part, origin, policy, number)
            for number, part in enumerate(_groups(message, "ORC"), start=1)
        ]
    if kind in DEMOGRAPHIC_TYPES:
        return [
            DemographicsUpdated(
                origin=origin,
                patient=local_identifier(message, policy),
                demographics=demographics(message),
                identifiers=qualified_identifiers(message, policy),
                deleted=deleted_demographics(message),
            )
        ]
    if kind == MERGE_TYPE:
        return [
            _merge_event(part, origin, policy, number)
            for number, part in enumerate(_groups(message, "PID"), start=1)
        ]
    if kind == SCHEDULE_TYPE:
        return [_schedule_event(message, origin, policy)]
    return [Unhandled(origin, f"{kind} does not start prefetch")]


def _check_one_patient(message: Message) -> None:
    """Reject an order, appointment or ADT message with more than one PID segment.

    The patient is read from the first PID, so an order that follows a second
    PID would go to the wrong patient. ORM, OMI and ADT^A01/A04/A08 allow one
    patient. SIU^S12 allows several (a group appointment), which the engine
    does not split, so the sender gets an error instead of one patient being dropped.
    """
    count = sum(1 for _ in message.segments_of("PID"))
    if count > 1:
        raise HL7Error(
            f"{message.message_type} contains {count} PID segments, but a message of this"
            " type concerns one patient; send one message per patient",
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
            ("PID", 2, 0),
            AckCode.APPLICATION_ERROR,
        )


def to_event(message: Message, policy: IdentifierPolicy) -> DomainEvent | Unhandled:
    """Translate a message that carries one order, patient or merge into its event."""
    events = to_events(message, policy)
    if len(events) != 1:
        raise ValueError(f"message carries {len(events)} events; use to_events")
    return events[0]


def _groups(message: Message, first_segment: str) -> list[Message]:
    """Split a message into one message per group that starts with first_segment.

    Each part keeps the segments before the first group (MSH, EVN, PID ...),
    so fields are read as from a message with that one group.
    """
    starts = [i for i, segment in enumerate(message.segments) if segment.id == first_segment]
    if len(starts) <= 1:
        return [message]
    header = message.segments[: starts[0]]
    ends = [*starts[1:], len(message.segments)]
    return [
        _part(message, [*header, *message.segments[start:end]])
        for start, end in zip(starts, ends, strict=True)
    ]


def _part(message: Message, segments: list[Segment]) -> Message:
    return Message(segments, message.delimiters, message.charset)


def _order_event(
    message: Message, origin: MessageOrigin, policy: IdentifierPolicy, number: int
) -> DomainEvent | Unhandled:
    if message.segment("ORC") is None:
        raise HL7Error(
            "the ORC segment (common order) is missing",
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
            ("ORC", number, 0),
            AckCode.APPLICATION_ERROR,
        )
    order_control = message.get("ORC", 1)
    if not order_control:
        raise HL7Error(
            "ORC-1 (order control) is missing",
            ErrorCode.REQUIRED_FIELD_MISSING,
            ("ORC", number, 1),
            AckCode.APPLICATION_ERROR,
        )
    if order_control not in ORDER_CONTROLS:
        hint = ""
        if order_control.upper() in ORDER_CONTROLS:
            hint = f" (codes are upper case: {order_control.upper()})"
        raise HL7Error(
            f"ORC-1 order control '{order_control[:20]}' is not in HL7 Table 0119{hint}",
            ErrorCode.TABLE_VALUE_NOT_FOUND,
            ("ORC", number, 1),
            AckCode.APPLICATION_ERROR,
        )
    patient = local_identifier(message, policy)
    order = order_facts(message)
    if order_control in (NEW_ORDER_CONTROL, CHANGE_ORDER_CONTROL):
        kind = OrderPlaced if order_control == NEW_ORDER_CONTROL else OrderChanged
        return kind(
            origin=origin,
            patient=patient,
            demographics=demographics(message),
            order=order,
            identifiers=qualified_identifiers(message, policy),
            message=message,
        )
    if order_control in CANCEL_ORDER_CONTROLS:
        return OrderCancelled(origin, patient, order, order_control)
    if order_control == STATUS_ORDER_CONTROL:
        return OrderStatusChanged(origin, patient, order, message.get("ORC", 5))
    return Unhandled(origin, f"order control '{order_control}' is not acted on")


def _merge_event(
    message: Message, origin: MessageOrigin, policy: IdentifierPolicy, number: int
) -> PatientsMerged:
    surviving = local_identifier(message, policy)
    retired = local_identifier(message, policy, "MRG", 1, number)
    if sum(1 for _ in message.segments_of("MRG")) > 1:
        # Each retired identifier comes in its own PID and MRG pair.
        raise HL7Error(
            f"the PID of merge {number} is followed by more than one MRG segment; send"
            " the PID again before each MRG",
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
            ("MRG", number + 1, 0),
            AckCode.APPLICATION_ERROR,
        )
    if retired == surviving:
        raise HL7Error(
            f"MRG-1 merges patient identifier {retired.value} into itself",
            ErrorCode.DUPLICATE_KEY_IDENTIFIER,
            ("MRG", number, 1),
            AckCode.APPLICATION_ERROR,
        )
    return PatientsMerged(origin=origin, surviving=surviving, retired=retired)


def _schedule_event(
    message: Message, origin: MessageOrigin, policy: IdentifierPolicy
) -> OrderPlaced:
    """Read a booked appointment (SIU^S12) as an order: SCH for ids, AIS for the procedure.

    The appointment's start (AIS-4, else SCH-11.4) is the order's scheduled time,
    and the message time (MSH-7) its order time.
    """
    start = parse_timestamp(message.get("AIS", 4)) or parse_timestamp(message.get("SCH", 11, 4, 1))
    placer, placer_namespace = _order_number(message, ("SCH", 26), ("SCH", 1))
    filler, filler_namespace = _order_number(message, ("SCH", 27), ("SCH", 2))
    order = OrderFacts(
        placer_order_number=placer,
        filler_order_number=filler,
        placer_namespace=placer_namespace,
        filler_namespace=filler_namespace,
        procedure_code=message.get("AIS", 3, 1),
        procedure_text=message.get("AIS", 3, 2),
        procedure_coding_system=message.get("AIS", 3, 3),
        order_time=parse_timestamp(message.get("MSH", 7)),
        scheduled_time=start,
    )
    return OrderPlaced(
        origin=origin,
        patient=local_identifier(message, policy),
        demographics=demographics(message),
        order=order,
        identifiers=qualified_identifiers(message, policy),
        message=message,
    )


def local_identifier(
    message: Message,
    policy: IdentifierPolicy,
    segment: str = "PID",
    field: int = 3,
    sequence: int = 1,
) -> PatientIdentifier:
    """Choose the identifier of the local domain by its assigning authority (CX-4).

    Reads PID-3 by default, MRG-1 for the retired identifier of a merge. The
    first configured authority found wins; two different identifiers under
    that authority are an error, because either could be the wrong patient.
    """
    location = (segment, sequence, field)
    name = f"{segment}-{field}"
    repetitions = [
        [rep[0].strip(), *rep[1:]]
        for rep in message.repetitions(segment, field)
        if rep and rep[0].strip() not in ("", HL7_NULL)
    ]
    if not repetitions:
        raise HL7Error(
            f"{name} (patient identifier list) is missing",
            ErrorCode.REQUIRED_FIELD_MISSING,
            location,
            AckCode.APPLICATION_ERROR,
        )

    for authority in policy.authorities:
        values = sorted(
            {
                components[0]
                for components in repetitions
                if authority in _authority_names(message, components)
            }
        )
        if len(values) > 1:
            raise HL7Error(
                f"{name} has {len(values)} different identifiers of assigning authority "
                f"{authority}: {', '.join(values)}",
                ErrorCode.DUPLICATE_KEY_IDENTIFIER,
                location,
                AckCode.APPLICATION_ERROR,
            )
        if values:
            return PatientIdentifier(_checked_id(values[0], name, location), policy.issuer)

    only = repetitions[0]
    unqualified = len(repetitions) == 1 and not _authority_names(message, only)
    if policy.unqualified_ids_are_local and unqualified:
        return PatientIdentifier(_checked_id(only[0], name, location), policy.issuer)

    raise HL7Error(
        f"{name} has no identifier with a local assigning authority "
        f"({', '.join(policy.authorities)})",
        ErrorCode.UNKNOWN_KEY_IDENTIFIER,
        location,
        AckCode.APPLICATION_ERROR,
    )


def _checked_id(value: str, name: str, location: tuple[str, int, int]) -> str:
    problem = patient_id_problem(value)
    if problem is not None:
        # The value is left out: it may hold anything, a name included.
        raise HL7Error(
            f"the local patient identifier in {name} {problem}",
            ErrorCode.DATA_TYPE_ERROR,
            location,
            AckCode.APPLICATION_ERROR,
        )
    return value


def qualified_identifiers(
    message: Message, policy: IdentifierPolicy
) -> tuple[PatientIdentifier, ...]:
    """Return every PID-3 identifier that names its assigning authority.

    The local one carries the local issuer; the others carry their CX-4
    namespace (or universal id when the namespace is empty).
    """
    found: list[PatientIdentifier] = []
    local = set(policy.authorities)
    for components in message.repetitions("PID", 3):
        names = _authority_names(message, components)
        if not components or not names:
            continue
        # An identifier that cannot be a DICOM PatientID could not be queried or stamped.
        value = components[0].strip()
        if value in ("", HL7_NULL) or patient_id_problem(value) is not None:
            continue
        if names & local:
            issuer = policy.issuer
        else:
            authority = [
                part if part != HL7_NULL else ""
                for part in components[3].split(message.delimiters.subcomponent)
            ]
            issuer = authority[0] or (authority[1] if len(authority) > 1 else "")
        identifier = PatientIdentifier(value, issuer)
        if identifier not in found:
            found.append(identifier)
    return tuple(found)


def _authority_names(message: Message, components: list[str]) -> set[str]:
    authority = components[3] if len(components) > 3 else ""
    parts = authority.split(message.delimiters.subcomponent)[:2]
    return {part for part in parts if part and part != HL7_NULL}


def demographics(message: Message) -> Demographics:
    # XPN is family^given^middle^suffix^prefix; DICOM PN is family^given^middle^prefix^suffix.
    name = message.repetitions("PID", 5)
    parts = (name[0] if name else []) + [""] * 5
    family, given, middle, suffix, prefix = (part if part != '""' else "" for part in parts[:5])
    person_name = "^".join([family, given, middle, prefix, suffix]).rstrip("^")
    birth = message.get("PID", 7)[:8]
    sex = _SEX.get(message.get("PID", 8).upper(), "")
    return Demographics(name=person_name, birth_date=birth, sex=sex)


# The PID fields of each Demographics field.
_DEMOGRAPHIC_FIELDS = {"name": 5, "birth_date": 7, "sex": 8}


def deleted_demographics(message: Message) -> frozenset[str]:
    """Return the Demographics fields whose PID field is the HL7 null `""` (delete the value),
    and the sex when PID-8 is U (unknown).

    An empty field leaves the stored value as it is.
    """
    pid = message.segment("PID")
    if pid is None:
        return frozenset()
    deleted = {
        name for name, field in _DEMOGRAPHIC_FIELDS.items() if pid.raw_field(field) == HL7_NULL
    }
    # U (unknown) has no DICOM value, so it reads as empty, but the HIS states it.
    if message.get("PID", 8).upper() == "U":
        deleted.add("sex")
    return frozenset(deleted)


def order_facts(message: Message) -> OrderFacts:
    accession = message.get("OBR", 18) or message.get("IPC", 1)
    study_uid = message.get("ZDS", 1) or message.get("IPC", 3)
    modality = message.get("OBR", 24) or message.get("IPC", 5)
    order_time = parse_timestamp(message.get("ORC", 9)) or parse_timestamp(message.get("MSH", 7))
    placer, placer_namespace = _order_number(message, ("ORC", 2), ("OBR", 2))
    filler, filler_namespace = _order_number(message, ("ORC", 3), ("OBR", 3))
    return OrderFacts(
        placer_order_number=placer,
        filler_order_number=filler,
        placer_namespace=placer_namespace,
        filler_namespace=filler_namespace,
        accession_number=accession,
        study_instance_uid=study_uid,
        ordered_modality=modality.upper(),
        procedure_code=message.get("OBR", 4, 1),
        procedure_text=message.get("OBR", 4, 2),
        procedure_coding_system=message.get("OBR", 4, 3),
        order_time=order_time,
    )


def _order_number(message: Message, *fields: tuple[str, int]) -> tuple[str, str]:
    """Return the order number and its namespace ID (EI components 1 and 2) from the
    first of `fields` that has a number, or two empty strings."""
    for segment, field in fields:
        number = message.get(segment, field)
        if number:
            return number, message.get(segment, field, 2)
    return "", ""
