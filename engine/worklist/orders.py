"""Turning worklist items into the order events an HL7 ORM would produce."""

from __future__ import annotations

import datetime as dt

from engine.dimse.worklist import MalformedItem, WorklistItem
from engine.hl7.events import IdentifierPolicy
from engine.model import MessageOrigin, OrderCancelled, OrderFacts, OrderPlaced, PatientIdentifier

# The message type of orders read from a worklist; routes match it like an HL7 type.
WORKLIST_MESSAGE_TYPE = "MWL"


def origin_of(node: str, item: WorklistItem, suffix: str = "") -> MessageOrigin:
    """Name a step's order as a message: sending application = worklist node, control id = step."""
    start = f"@{item.start:%Y%m%d%H%M}" if item.start else ""
    return MessageOrigin(
        sending_application=node,
        sending_facility="",
        message_type=WORKLIST_MESSAGE_TYPE,
        # The patient ID is part of it, so a step moved to another patient is a new order.
        control_id=f"{item.key}{start}/{item.patient_id}{suffix}",
    )


def local_patient(item: WorklistItem, policy: IdentifierPolicy) -> PatientIdentifier:
    """Return the local identity of a worklist item; the worklist is in the local domain.

    An empty Issuer of Patient ID is read as the local issuer; another issuer is refused.
    """
    issuer = item.issuer_of_patient_id
    if issuer and issuer != policy.issuer and issuer not in policy.authorities:
        raise MalformedItem(
            f"step {item.key}: patient ID issuer '{issuer}' is not the local domain"
        )
    return PatientIdentifier(item.patient_id, policy.issuer)


def order_facts(item: WorklistItem) -> OrderFacts:
    start = item.start.astimezone() if item.start else None
    return OrderFacts(
        placer_order_number=item.step_id,
        accession_number=item.accession_number,
        study_instance_uid=item.study_instance_uid,
        ordered_modality=item.modality,
        procedure_code=item.procedure_code,
        procedure_coding_system=item.procedure_coding_system,
        procedure_text=item.procedure_text,
        order_time=start,
        scheduled_time=start,
        body_parts=(item.body_part.upper(),) if item.body_part else (),
    )


def placed(
    node: str, item: WorklistItem, policy: IdentifierPolicy, suffix: str = ""
) -> OrderPlaced:
    """Return the order of a step; suffix makes its control id differ from earlier versions'."""
    patient = local_patient(item, policy)
    return OrderPlaced(
        origin=origin_of(node, item, suffix),
        patient=patient,
        demographics=item.demographics,
        order=order_facts(item),
        identifiers=(patient,),
    )


def removed(
    node: str, item: WorklistItem, policy: IdentifierPolicy, now: dt.datetime
) -> OrderCancelled:
    """Return the cancel for a step that left the worklist before it was performed."""
    suffix = f"/removed@{now:%Y%m%d%H%M%S}"
    return OrderCancelled(
        origin=origin_of(node, item, suffix),
        patient=local_patient(item, policy),
        order=order_facts(item),
        order_control="CA",
    )
