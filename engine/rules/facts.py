"""Order facts: the named values routes and rules decide on, each with where it came from.

Facts are extracted once per order. An HL7 order gives them from its fields. An
order from a Modality Worklist (origin message type MWL) has no message, so its
facts come from the OrderFacts its poller filled in and name MWL as their source.
The rule set's procedure-code map and body-part patterns fill in what the order
leaves out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from engine.hl7.message import Message, parse_timestamp
from engine.model import MessageOrigin, OrderFacts, OrderPlaced
from engine.rules.model import RuleSet
from engine.rules.timing import LocalZone

FACT_NAMES = (
    "message_type",
    "message_code",
    "trigger_event",
    "sending_application",
    "sending_facility",
    "control_id",
    "patient",
    "patient_class",
    "order_control",
    "placer_order_number",
    "filler_order_number",
    "accession_number",
    "study_instance_uid",
    "ordered_modality",
    "procedure_code",
    "procedure_text",
    "procedure_coding_system",
    "body_part",
    "scheduled_time",
    "order_time",
)
UPPER_CASE_FACTS = frozenset({"ordered_modality", "body_part"})
# Fields that carry the scheduled start of the procedure, as (label, segment,
# field, component, subcomponent); the first one found is used. ORC-7 is the
# order's copy of OBR-27 in HL7 v2.3 and v2.4.
SCHEDULED_TIME_FIELDS = (
    ("TQ1-7", "TQ1", 7, 1, 0),
    ("OBR-27.4", "OBR", 27, 4, 1),
    ("ORC-7.4", "ORC", 7, 4, 1),
    ("OBR-36", "OBR", 36, 1, 0),
    ("SCH-11.4", "SCH", 11, 4, 1),
)


@dataclasses.dataclass(frozen=True)
class Fact:
    name: str
    values: tuple[str, ...]
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "values": list(self.values), "source": self.source}


class Facts:
    """The named facts of one order, what conditions read (see FactSource)."""

    def __init__(
        self,
        facts: list[Fact],
        order: OrderFacts,
        origin: MessageOrigin,
        message: Message | None,
        invalid_time_field: str = "",
    ) -> None:
        self._facts = {fact.name: fact for fact in facts}
        self.order = order
        self.origin = origin
        self._message = message
        # The first scheduled time field (e.g. "TQ1-7") with a value that is not a timestamp.
        self.invalid_time_field = invalid_time_field

    @property
    def message(self) -> Message | None:
        return self._message

    @property
    def origin_type(self) -> str:
        return self.origin.message_type

    def values(self, name: str) -> tuple[str, ...]:
        fact = self._facts.get(name)
        return fact.values if fact else ()

    def get(self, name: str) -> str:
        values = self.values(name)
        return values[0] if values else ""

    def __iter__(self) -> Iterator[Fact]:
        return iter(self._facts.values())


def extract_facts(event: OrderPlaced, rule_set: RuleSet, zone: LocalZone) -> Facts:
    """Extract the facts of an order; the returned Facts.order is the OrderFacts a job keeps."""
    message = event.message
    origin = event.origin
    order = event.order
    builder = _Builder(message, origin.message_type)

    code, _, trigger = origin.message_type.partition("^")
    builder.add_field("message_type", origin.message_type, "MSH-9")
    builder.add_field("message_code", code, "MSH-9.1")
    builder.add_field("trigger_event", trigger, "MSH-9.2")
    builder.add_field("sending_application", origin.sending_application, "MSH-3")
    builder.add_field("sending_facility", origin.sending_facility, "MSH-4")
    builder.add_field("control_id", origin.control_id, "MSH-10")
    builder.add_field("patient", str(event.patient), "PID-3")
    builder.add_field("patient_class", _read(message, "PV1", 2), "PV1-2")
    builder.add_field("order_control", _read(message, "ORC", 1), "ORC-1")
    builder.add_first("placer_order_number", order.placer_order_number, "ORC-2", "OBR-2")
    builder.add_first("filler_order_number", order.filler_order_number, "ORC-3", "OBR-3")
    builder.add_first("accession_number", order.accession_number, "OBR-18", "IPC-1")
    builder.add_first("study_instance_uid", order.study_instance_uid, "ZDS-1", "IPC-3")
    builder.add_field("procedure_code", order.procedure_code, "OBR-4.1")
    builder.add_field("procedure_text", order.procedure_text, "OBR-4.2")
    builder.add_field("procedure_coding_system", order.procedure_coding_system, "OBR-4.3")

    procedure = rule_set.procedures.get(order.procedure_code)
    if (
        procedure
        and procedure.coding_system
        and procedure.coding_system != (order.procedure_coding_system)
    ):
        procedure = None
    mapped = f"procedure_codes[{order.procedure_code}] in {procedure.origin}" if procedure else ""

    modality = order.ordered_modality.upper()
    if modality:
        builder.add_first("ordered_modality", modality, "OBR-24", "IPC-5")
    elif procedure and procedure.modality:
        modality = procedure.modality
        builder.add("ordered_modality", modality, mapped)

    body_parts, body_source = _body_parts(order, procedure, mapped, rule_set, origin)
    builder.add("body_part", body_parts, body_source)

    scheduled, scheduled_source, invalid_time_field = _scheduled_time(order, message, zone, origin)
    if scheduled is not None:
        builder.add("scheduled_time", scheduled.isoformat(), scheduled_source)
    order_time = zone.aware(order.order_time) if order.order_time else None
    if order_time is not None:
        builder.add_first("order_time", order_time.isoformat(), "ORC-9", "MSH-7")

    enriched = dataclasses.replace(
        order,
        ordered_modality=modality,
        body_parts=body_parts,
        scheduled_time=scheduled,
        order_time=order_time,
    )
    return Facts(builder.facts, enriched, origin, message, invalid_time_field)


class _Builder:
    def __init__(self, message: Message | None, origin_type: str) -> None:
        self.message = message
        self.origin_type = origin_type
        self.facts: list[Fact] = []

    def add(self, name: str, value: str | tuple[str, ...], source: str) -> None:
        values = (value,) if isinstance(value, str) else value
        values = tuple(item for item in values if item)
        if values:
            self.facts.append(Fact(name, values, source))

    def add_field(self, name: str, value: str, field: str) -> None:
        """Add a fact read from a message field; an order without a message names its origin."""
        self.add(name, value, field if self.message is not None else self.origin_type)

    def add_first(self, name: str, value: str, *fields: str) -> None:
        """Add a fact read by intake from the first non-empty of `fields`, naming that field."""
        source = fields[0]
        if self.message is not None:
            for label in fields:
                segment, _, number = label.partition("-")
                field, _, component = number.partition(".")
                if self.message.get(segment, int(field), int(component or 1)):
                    source = label
                    break
        self.add_field(name, value, source)


def _read(message: Message | None, segment: str, field: int) -> str:
    return message.get(segment, field) if message is not None else ""


def _body_parts(
    order: OrderFacts,
    procedure: Any,
    mapped: str,
    rule_set: RuleSet,
    origin: MessageOrigin,
) -> tuple[tuple[str, ...], str]:
    if procedure is not None and procedure.body_part:
        return (procedure.body_part,), mapped
    if order.body_parts:
        return tuple(part.upper() for part in order.body_parts), origin.message_type
    anatomy = rule_set.anatomy
    found = anatomy.find_regions(order.procedure_text, rule_set.body_part_patterns)
    if found:
        return anatomy.outermost(found), f"procedure text (OBR-4.2) '{order.procedure_text}'"
    return (), ""


def _scheduled_time(
    order: OrderFacts, message: Message | None, zone: LocalZone, origin: MessageOrigin
) -> tuple[Any, str, str]:
    """Return the scheduled time and its source, or None, "" and the first invalid field."""
    if order.scheduled_time is not None:
        return zone.aware(order.scheduled_time), origin.message_type, ""
    if message is None:
        return None, "", ""
    invalid_field = ""
    for label, segment, field, component, subcomponent in SCHEDULED_TIME_FIELDS:
        text = message.get(segment, field, component, subcomponent)
        value = parse_timestamp(text)
        if value is not None:
            return zone.aware(value), label, ""
        if text and not invalid_field:
            invalid_field = label
    return None, "", invalid_field
