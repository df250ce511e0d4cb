"""The schema of routes/ and rules/ files, and the loaded rule set.

A route decides which messages start prefetch, from which sources (in order of
preference) and into which destination. A rule decides which prior studies are
relevant for an order.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from engine.configfile import Document, PathKey, Problem

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_DURATION = re.compile(r"^(\d+)\s*([ymwd])$")


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


StringList = Annotated[list[str], BeforeValidator(_as_list)]


@dataclasses.dataclass(frozen=True)
class Duration:
    """A calendar duration such as 5y, 18m, 6w or 30d."""

    amount: int
    unit: str

    def __str__(self) -> str:
        return f"{self.amount}{self.unit}"


def parse_duration(value: object) -> Duration:
    match = _DURATION.match(str(value).strip().lower()) if isinstance(value, str | int) else None
    if match is None:
        raise ValueError(f"invalid duration '{value}' (use e.g. 5y, 18m, 6w, 30d)")
    return Duration(int(match.group(1)), match.group(2))


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteMatch(Schema):
    """Conditions on the message header; all given conditions must hold."""

    message_type: StringList = Field(default_factory=lambda: ["ORM^O01"])
    sending_application: StringList = Field(default_factory=list)
    sending_facility: StringList = Field(default_factory=list)


class RouteSchema(Schema):
    name: str = Field(pattern=NAME_PATTERN)
    match: RouteMatch = RouteMatch()
    sources: list[str] = Field(min_length=1)
    destination: str
    rules: StringList | None = None

    @pydantic.field_validator("sources")
    @classmethod
    def _unique_sources(cls, value: list[str]) -> list[str]:
        duplicates = sorted({name for name in value if value.count(name) > 1})
        if duplicates:
            raise ValueError(f"source listed more than once: {', '.join(duplicates)}")
        return value


class IgnoreMatch(Schema):
    """Messages to store and acknowledge with AA without acting on them, whatever their type."""

    message_type: StringList = Field(min_length=1)
    sending_application: StringList = Field(default_factory=list)
    sending_facility: StringList = Field(default_factory=list)


class RoutesFile(Schema):
    routes: list[RouteSchema] = Field(default_factory=list)
    accept_and_ignore: list[IgnoreMatch] = Field(default_factory=list)


class RuleWhen(Schema):
    """Conditions on the order. ordered_modality comes from OBR-24, else the procedure map."""

    ordered_modality: StringList = Field(default_factory=list)


class Selection(Schema):
    """Which prior studies to retrieve, most recent first."""

    modalities: StringList = Field(min_length=1)
    lookback: Duration
    max_studies: int = Field(ge=1, le=1000)

    @pydantic.field_validator("lookback", mode="before")
    @classmethod
    def _duration(cls, value: object) -> Duration:
        return value if isinstance(value, Duration) else parse_duration(value)

    @pydantic.field_validator("modalities")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [modality.upper() for modality in value]


class RuleSchema(Schema):
    name: str = Field(pattern=NAME_PATTERN)
    when: RuleWhen = RuleWhen()
    select: Selection


class RulesFile(Schema):
    procedure_codes: dict[str, str] = Field(default_factory=dict)
    rules: list[RuleSchema] = Field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Located:
    """Where an item was defined, so later checks can name file, line and path."""

    document: Document
    base: PathKey

    def problem(self, path: PathKey, message: str, hint: str = "") -> Problem:
        return self.document.problem((*self.base, *path), message, hint)


@dataclasses.dataclass(frozen=True)
class Route(Located):
    spec: RouteSchema

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def sources(self) -> list[str]:
        return self.spec.sources

    @property
    def destination(self) -> str:
        return self.spec.destination


@dataclasses.dataclass(frozen=True)
class IgnoredMessages(Located):
    """One accept_and_ignore entry of a routes file."""

    spec: IgnoreMatch

    @property
    def where(self) -> str:
        return f"{self.document.file} accept_and_ignore[{self.base[-1]}]"


@dataclasses.dataclass(frozen=True)
class Rule(Located):
    spec: RuleSchema

    @property
    def name(self) -> str:
        return self.spec.name


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """All routes (in file order) and rules (by name), and the procedure-code map."""

    routes: tuple[Route, ...]
    rules: dict[str, Rule]
    procedure_codes: dict[str, str]
    accept_and_ignore: tuple[IgnoredMessages, ...] = ()

    @classmethod
    def empty(cls) -> RuleSet:
        return cls((), {}, {})
