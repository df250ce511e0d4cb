"""HL7 field paths (`OBR-4.1`, `PID-3[2].4`, `OBX[2]-5`) and reading their values.

A path is SEGMENT[occurrence]-FIELD[repetition].COMPONENT.SUBCOMPONENT, every
number 1-based. Without an occurrence every occurrence of the segment is read,
and without a repetition every repetition of the field, so a condition holds
when any of them matches. Without a component the first component is read
(`OBR-24` is `OBR-24.1`).
"""

from __future__ import annotations

import dataclasses
import re

from engine.hl7.message import Message

_PATH = re.compile(
    r"^(?P<segment>[A-Z][A-Z0-9]{2})(?:\[(?P<occurrence>[1-9]\d*)\])?"
    r"-(?P<field>[1-9]\d*)(?:\[(?P<repetition>[1-9]\d*)\])?"
    r"(?:\.(?P<component>[1-9]\d*)(?:\.(?P<subcomponent>[1-9]\d*))?)?$"
)


@dataclasses.dataclass(frozen=True)
class FieldPath:
    segment: str
    field: int
    component: int = 1
    subcomponent: int = 0
    occurrence: int | None = None
    repetition: int | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"{self.segment}-{self.field}.{self.component}"


def parse_field_path(text: object) -> FieldPath:
    """Parse a field path. Raises ValueError naming the expected form."""
    match = _PATH.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid HL7 field path {text!r} "
            "(use SEGMENT-FIELD[.COMPONENT[.SUBCOMPONENT]], e.g. OBR-4.1, PV1-3.1, PID-3[2].4)"
        )

    def number(name: str) -> int | None:
        value = match.group(name)
        return int(value) if value else None

    return FieldPath(
        segment=match.group("segment"),
        field=int(match.group("field")),
        component=number("component") or 1,
        subcomponent=number("subcomponent") or 0,
        occurrence=number("occurrence"),
        repetition=number("repetition"),
        text=text.strip() if isinstance(text, str) else "",
    )


def read_field(message: Message, path: FieldPath) -> list[str]:
    """Return the non-empty, unescaped values at `path`, one per occurrence and repetition."""
    segments = list(message.segments_of(path.segment))
    if path.occurrence is not None:
        segments = segments[path.occurrence - 1 : path.occurrence]

    values: list[str] = []
    delimiters = message.delimiters
    for segment in segments:
        raw = segment.raw_field(path.field)
        if path.segment == "MSH" and path.field in (1, 2):
            values.append(raw)
            continue
        repetitions = raw.split(delimiters.repetition) if raw else []
        if path.repetition is not None:
            repetitions = repetitions[path.repetition - 1 : path.repetition]
        for repetition in repetitions:
            value = _component(repetition, path, message)
            if value and value != '""':
                values.append(value)
    return values


def _component(repetition: str, path: FieldPath, message: Message) -> str:
    components = repetition.split(message.delimiters.component)
    if path.component > len(components):
        return ""
    value = components[path.component - 1]
    if path.subcomponent:
        parts = value.split(message.delimiters.subcomponent)
        value = parts[path.subcomponent - 1] if path.subcomponent <= len(parts) else ""
    return message.unescape(value)
