"""Translating parsed HL7 messages into domain events."""

from __future__ import annotations

import dataclasses

from engine.hl7.codes import AckCode, ErrorCode
from engine.hl7.message import HL7Error, Message, parse_timestamp
from engine.model import Demographics, MessageOrigin, OrderFacts, OrderPlaced, PatientIdentifier

ORDER_TYPES = frozenset({"ORM^O01", "OMI^O23"})
# Message types the engine accepts and stores; only new orders start prefetch for now.
SUPPORTED_TYPES = ORDER_TYPES | frozenset({"ADT^A01", "ADT^A04", "ADT^A08", "ADT^A40", "SIU^S12"})
NEW_ORDER_CONTROL = "NW"

# HL7 Table 0001 administrative sex to DICOM Patient's Sex (M, F, O or empty).
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "U": ""}


@dataclasses.dataclass(frozen=True)
class IdentifierPolicy:
    """Which PID-3 repetition carries the local patient identifier.

    authorities are the assigning authority names (CX-4.1 namespace or CX-4.2
    universal id) that denote the local domain; issuer is the DICOM
    IssuerOfPatientID written for it. unqualified_ids_are_local accepts a PID-3
    with a single identifier and no assigning authority as local.
    """

    issuer: str
    authorities: frozenset[str]
    unqualified_ids_are_local: bool = False


@dataclasses.dataclass(frozen=True)
class Unhandled:
    """A supported message that does not start any work (e.g. an ORC-1 other than NW)."""

    origin: MessageOrigin
    reason: str


def origin_of(message: Message) -> MessageOrigin:
    return MessageOrigin(
        sending_application=message.get("MSH", 3),
        sending_facility=message.get("MSH", 4),
        message_type=message.message_type,
        control_id=message.control_id,
    )


def check_header(message: Message) -> None:
    """Reject messages that no route can process: no control id, unsupported type."""
    if not message.control_id:
        raise HL7Error(
            "MSH-10 (message control id) is missing",
            ErrorCode.REQUIRED_FIELD_MISSING,
            ("MSH", 1, 10),
            AckCode.APPLICATION_ERROR,
        )
    if message.message_type not in SUPPORTED_TYPES:
        raise HL7Error(
            f"unsupported message type '{message.message_type}'",
            ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
            ("MSH", 1, 9),
            AckCode.APPLICATION_REJECT,
        )


def to_event(message: Message, policy: IdentifierPolicy) -> OrderPlaced | Unhandled:
    origin = origin_of(message)
    if message.message_type not in ORDER_TYPES:
        return Unhandled(origin, f"{message.message_type} does not start prefetch")

    order_control = message.get("ORC", 1)
    if order_control != NEW_ORDER_CONTROL:
        return Unhandled(origin, f"order control '{order_control}' does not start prefetch")

    return OrderPlaced(
        origin=origin,
        patient=local_identifier(message, policy),
        demographics=demographics(message),
        order=order_facts(message),
    )


def local_identifier(message: Message, policy: IdentifierPolicy) -> PatientIdentifier:
    """Choose the PID-3 repetition of the local domain by its assigning authority."""
    repetitions = [rep for rep in message.repetitions("PID", 3) if rep and rep[0] not in ("", '""')]
    if not repetitions:
        raise HL7Error(
            "PID-3 (patient identifier list) is missing",
            ErrorCode.REQUIRED_FIELD_MISSING,
            ("PID", 1, 3),
            AckCode.APPLICATION_ERROR,
        )

    for components in repetitions:
        authority = components[3] if len(components) > 3 else ""
        names = {part for part in authority.split(message.delimiters.subcomponent) if part}
        if names & policy.authorities:
            return PatientIdentifier(components[0], policy.issuer)

    only = repetitions[0]
    unqualified = len(repetitions) == 1 and not (only[3] if len(only) > 3 else "")
    if policy.unqualified_ids_are_local and unqualified:
        return PatientIdentifier(repetitions[0][0], policy.issuer)

    raise HL7Error(
        "PID-3 has no identifier with a local assigning authority "
        f"({', '.join(sorted(policy.authorities))})",
        ErrorCode.UNKNOWN_KEY_IDENTIFIER,
        ("PID", 1, 3),
        AckCode.APPLICATION_ERROR,
    )


def demographics(message: Message) -> Demographics:
    # XPN is family^given^middle^suffix^prefix; DICOM PN is family^given^middle^prefix^suffix.
    name = message.repetitions("PID", 5)
    parts = (name[0] if name else []) + [""] * 5
    family, given, middle, suffix, prefix = (part if part != '""' else "" for part in parts[:5])
    person_name = "^".join([family, given, middle, prefix, suffix]).rstrip("^")
    birth = message.get("PID", 7)[:8]
    sex = _SEX.get(message.get("PID", 8).upper(), "")
    return Demographics(name=person_name, birth_date=birth, sex=sex)


def order_facts(message: Message) -> OrderFacts:
    accession = message.get("OBR", 18) or message.get("IPC", 1)
    study_uid = message.get("ZDS", 1) or message.get("IPC", 3)
    modality = message.get("OBR", 24) or message.get("IPC", 5)
    order_time = parse_timestamp(message.get("ORC", 9)) or parse_timestamp(message.get("MSH", 7))
    return OrderFacts(
        placer_order_number=message.get("ORC", 2) or message.get("OBR", 2),
        filler_order_number=message.get("ORC", 3) or message.get("OBR", 3),
        accession_number=accession,
        study_instance_uid=study_uid,
        ordered_modality=modality.upper(),
        procedure_code=message.get("OBR", 4, 1),
        procedure_text=message.get("OBR", 4, 2),
        procedure_coding_system=message.get("OBR", 4, 3),
        order_time=order_time,
    )
