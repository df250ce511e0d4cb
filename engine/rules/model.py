"""The schema of routes/ and rules/ files, and the loaded rule set.

A route decides which messages start prefetch, from which sources (in order of
preference) and into which destination. A rule decides which prior studies are
relevant for an order.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from engine.configfile import Document, PathKey, Problem
from engine.rules.anatomy import Anatomy
from engine.rules.conditions import Condition
from engine.rules.modalities import DICOM_HINT, DICOM_MODALITIES
from engine.rules.timing import parse_timespan

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


# The maximum lookback: longer than any patient's history, and far enough
# from date arithmetic's limit (year 1) that "today minus the lookback" always works.
MAX_DURATION_YEARS = 150
# Mean lengths in days of the Gregorian calendar's units, to compare durations with it.
_DAYS_PER_UNIT = {"y": 365.2425, "m": 365.2425 / 12, "w": 7.0, "d": 1.0}


def parse_duration(value: object) -> Duration:
    match = _DURATION.match(str(value).strip().lower()) if isinstance(value, str | int) else None
    if match is None:
        raise ValueError(f"invalid duration '{value}' (use e.g. 5y, 18m, 6w, 30d)")
    duration = Duration(int(match.group(1)), match.group(2))
    limit = MAX_DURATION_YEARS * _DAYS_PER_UNIT["y"]
    if duration.amount * _DAYS_PER_UNIT[duration.unit] > limit + 1e-6:
        raise ValueError(f"duration '{value}' is longer than {MAX_DURATION_YEARS} years")
    return duration


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _timespan(value: object) -> dt.timedelta:
    return value if isinstance(value, dt.timedelta) else parse_timespan(value)


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as error:
        raise ValueError(f"invalid regular expression '{value}': {error}") from None
    return value


TimeSpan = Annotated[dt.timedelta, BeforeValidator(_timespan)]
Pattern = Annotated[str, AfterValidator(_regex)]
# HL7 order messages: what a route without `match` takes.
DEFAULT_ROUTE_MESSAGE_TYPES = ("ORM^O01", "OMI^O23")


class RouteTiming(Schema):
    """When a route's jobs start: now, or a lead time before the scheduled procedure."""

    fetch: Literal["now", "before_scheduled_time"] = "now"
    lead_time: TimeSpan | None = None

    @pydantic.model_validator(mode="after")
    def _lead_time_matches_fetch(self) -> RouteTiming:
        if self.fetch == "before_scheduled_time" and self.lead_time is None:
            raise ValueError("fetch: before_scheduled_time needs a lead_time such as 2h")
        if self.fetch == "now" and self.lead_time is not None:
            raise ValueError("lead_time applies only with fetch: before_scheduled_time")
        return self


class RouteSchema(Schema):
    name: str = Field(pattern=NAME_PATTERN)
    # A condition (see engine.rules.conditions), parsed by the loader.
    match: Any = None
    sources: list[str] = Field(min_length=1)
    destination: str
    rules: StringList | None = None
    timing: RouteTiming = RouteTiming()

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


SAME = "SAME"
# Modalities of reports and key object selections, which the include_* options add.
REPORT_MODALITIES = ("SR", "DOC")
KEY_IMAGE_MODALITIES = ("KO",)


class Selection(Schema):
    """The criteria that pick the prior studies to retrieve for an order."""

    # Modalities of the priors; `same` is the ordered modality.
    modalities: StringList = Field(min_length=1)
    # `same`: the prior shows the ordered region; `related`: any region related to it
    # in the anatomy table; or a list of regions. Absent: any body part.
    body_part: Literal["same", "related"] | list[str] | None = None
    unknown_body_part: Literal["include", "exclude"] = "include"
    lookback: Duration
    max_studies: int = Field(ge=1, le=1000)
    ordering: Literal["most_recent", "oldest_and_most_recent"] = "most_recent"
    include_descriptions: list[Pattern] = Field(default_factory=list)
    exclude_descriptions: list[Pattern] = Field(default_factory=list)
    include_reports: bool = False
    include_key_images: bool = False
    skip_ordered_study: bool = True
    # Sources to take a study from when several hold it; the route's order breaks ties.
    prefer_sources: list[str] = Field(default_factory=list)

    @pydantic.field_validator("lookback", mode="before")
    @classmethod
    def _duration(cls, value: object) -> Duration:
        return value if isinstance(value, Duration) else parse_duration(value)

    @pydantic.field_validator("modalities")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        modalities = [modality.upper() for modality in value]
        unknown = [m for m in modalities if m != SAME and m not in DICOM_MODALITIES]
        if unknown:
            listed = ", ".join(f"'{modality}'" for modality in unknown)
            raise ValueError(f"unknown modality {listed} ({DICOM_HINT}, or same)")
        return modalities

    @pydantic.field_validator("body_part", mode="before")
    @classmethod
    def _body_part(cls, value: object) -> object:
        if isinstance(value, str) and value.lower() not in ("same", "related"):
            return [value.upper()]
        if isinstance(value, list):
            return [item.upper() if isinstance(item, str) else item for item in value]
        return value.lower() if isinstance(value, str) else value


class RuleSchema(Schema):
    name: str = Field(pattern=NAME_PATTERN)
    # A condition on the order (see engine.rules.conditions), parsed by the loader.
    when: Any = None
    select: Selection
    # No second job for the same patient, rule and destination within this span.
    suppression_window: TimeSpan | None = None


class ProcedureSchema(Schema):
    """The meaning of a procedure code (OBR-4.1): its modality and body region."""

    modality: str = ""
    body_part: str = ""
    coding_system: str = ""

    @pydantic.field_validator("modality")
    @classmethod
    def _modality(cls, value: str) -> str:
        if value and value.upper() not in DICOM_MODALITIES:
            raise ValueError(f"unknown modality '{value}' ({DICOM_HINT})")
        return value


def _procedure(value: object) -> object:
    """Read the short form of a procedure code (the modality alone) as the long one."""
    if isinstance(value, str):
        return {"modality": value}
    if not isinstance(value, dict):
        raise ValueError(
            "a procedure code maps to a modality such as CT, or to"
            " {modality, body_part, coding_system}"
        )
    return value


class RulesFile(Schema):
    procedure_codes: dict[str, Annotated[ProcedureSchema, BeforeValidator(_procedure)]] = Field(
        default_factory=dict
    )
    # Extra patterns that name body regions in procedure texts and study descriptions.
    body_parts: dict[str, list[Pattern]] = Field(default_factory=dict)
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
    condition: Condition

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
    condition: Condition
    include_patterns: tuple[re.Pattern[str], ...] = ()
    exclude_patterns: tuple[re.Pattern[str], ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name


@dataclasses.dataclass(frozen=True)
class Procedure:
    """A procedure code's modality and body region, and where the mapping is defined."""

    code: str
    modality: str
    body_part: str
    coding_system: str
    origin: str


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """All routes (in file order), rules (by name), the procedure-code map, the body-part
    patterns of the rule files and the anatomy table."""

    routes: tuple[Route, ...]
    rules: dict[str, Rule]
    procedures: dict[str, Procedure]
    body_part_patterns: dict[str, tuple[re.Pattern[str], ...]] = dataclasses.field(
        default_factory=dict
    )
    anatomy: Anatomy = dataclasses.field(default_factory=Anatomy.empty)
    accept_and_ignore: tuple[IgnoredMessages, ...] = ()

    @classmethod
    def empty(cls) -> RuleSet:
        return cls((), {}, {})
