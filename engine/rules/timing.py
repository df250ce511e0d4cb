"""Time in routes, rules and source policies: spans, the local time zone, lead times
and quiet hours.

Every function takes the current time as an argument, so tests drive them with
an injected clock. Stored and compared times are timezone-aware; wall-clock
settings (quiet hours) and HL7 times without an offset are in the engine's
local time zone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import zoneinfo
from collections.abc import Sequence

_SPAN = re.compile(r"^(\d+)\s*(s|min|h|d|w)$")
_SPAN_UNITS = {
    "s": dt.timedelta(seconds=1),
    "min": dt.timedelta(minutes=1),
    "h": dt.timedelta(hours=1),
    "d": dt.timedelta(days=1),
    "w": dt.timedelta(weeks=1),
}
_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_timespan(value: object) -> dt.timedelta:
    """Parse a span such as 30s, 90min, 24h, 2d or 1w. Raises ValueError with a hint."""
    text = str(value).strip().lower() if isinstance(value, str | int) else ""
    match = _SPAN.match(text)
    if match is None:
        hint = " (m means months in lookback; write min for minutes)" if text.endswith("m") else ""
        raise ValueError(f"invalid time span '{value}' (use e.g. 30s, 90min, 24h, 2d, 1w){hint}")
    return int(match.group(1)) * _SPAN_UNITS[match.group(2)]


def format_timespan(span: dt.timedelta) -> str:
    seconds = int(span.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("min", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class LocalZone:
    """The engine's local time zone: an IANA name, or the system's when none is set."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self._zone = zoneinfo.ZoneInfo(name) if name else None

    def __repr__(self) -> str:
        return f"LocalZone({self.name or 'system'})"

    def aware(self, value: dt.datetime) -> dt.datetime:
        """Return a naive local wall-clock time as an aware time; aware times pass unchanged."""
        if value.tzinfo is not None:
            return value
        if self._zone is not None:
            return value.replace(tzinfo=self._zone)
        return value.astimezone()

    def shown(self, value: dt.datetime, timespec: str = "seconds") -> str:
        """Return a time as the CLI prints it: in this zone, with the zone's abbreviation.

        A naive time is taken as wall-clock time in this zone, as HL7 times without
        an offset are.
        """
        aware = self.aware(value)
        local = aware.astimezone(self._zone) if self._zone else aware.astimezone()
        text = local.replace(tzinfo=None).isoformat(sep=" ", timespec=timespec)
        return f"{text} {local.strftime('%Z')}"

    def local(self, value: dt.datetime) -> dt.datetime:
        """Return an aware time as naive local wall-clock time."""
        converted = value.astimezone(self._zone) if self._zone else value.astimezone()
        return converted.replace(tzinfo=None)


def check_zone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone '{name}' (use an IANA name such as Europe/Paris or UTC)"
        ) from None
    return name


@dataclasses.dataclass(frozen=True)
class FetchTime:
    """When a job may start, and why."""

    not_before: dt.datetime
    reason: str


def fetch_time(
    now: dt.datetime, scheduled: dt.datetime | None, lead_time: dt.timedelta | None
) -> FetchTime:
    """Return when to fetch: now, or `lead_time` before the scheduled procedure.

    The start is never after the scheduled time: a procedure closer than the
    lead time, or already past, is fetched now.
    """
    if lead_time is None:
        return FetchTime(now, "fetch now")
    if scheduled is None:
        return FetchTime(now, "fetch now: the order has no scheduled time")
    start = scheduled - lead_time
    lead = format_timespan(lead_time)
    if start <= now:
        return FetchTime(
            now, f"fetch now: scheduled {scheduled.isoformat()} is less than {lead} away"
        )
    return FetchTime(start, f"fetch at {start.isoformat()}: {lead} before {scheduled.isoformat()}")


@dataclasses.dataclass(frozen=True)
class QuietWindow:
    """Wall-clock hours on some weekdays when a source must not serve retrieves.

    An end at or before the start spans midnight; the weekday is the start's.
    max_instances allows studies of at most that many instances during the window.
    """

    days: frozenset[int]
    start: dt.time
    end: dt.time
    max_instances: int | None = None

    def __str__(self) -> str:
        days = ",".join(WEEKDAYS[day] for day in sorted(self.days))
        text = f"{days} {self.start:%H:%M}-{self.end:%H:%M}"
        if self.max_instances is not None:
            text += f" (studies of at most {self.max_instances} instances allowed)"
        return text

    def active_span(self, local: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
        """Return (start, end) of this window's occurrence that contains `local`, if any."""
        for days_back in (0, 1):
            day = local.date() - dt.timedelta(days=days_back)
            if day.weekday() not in self.days:
                continue
            start = dt.datetime.combine(day, self.start)
            end = dt.datetime.combine(day, self.end)
            if end <= start:
                end += dt.timedelta(days=1)
            if start <= local < end:
                return start, end
        return None


def parse_days(value: object) -> frozenset[int]:
    """Parse weekdays: daily, weekdays, weekend, mon-fri, or a list such as [sat, sun]."""
    items = value if isinstance(value, list) else str(value).split(",")
    days: set[int] = set()
    for item in items:
        text = str(item).strip().lower()
        if text in ("daily", "all"):
            days.update(range(7))
        elif text == "weekdays":
            days.update(range(5))
        elif text == "weekend":
            days.update((5, 6))
        elif "-" in text:
            first, _, last = text.partition("-")
            if first not in WEEKDAYS or last not in WEEKDAYS:
                raise ValueError(_days_error(value))
            start, end = WEEKDAYS.index(first), WEEKDAYS.index(last)
            days.update(
                range(start, end + 1) if start <= end else [*range(start, 7), *range(end + 1)]
            )
        elif text in WEEKDAYS:
            days.add(WEEKDAYS.index(text))
        else:
            raise ValueError(_days_error(value))
    if not days:
        raise ValueError(_days_error(value))
    return frozenset(days)


def _days_error(value: object) -> str:
    return f"invalid days '{value}' (use e.g. mon-fri, weekdays, weekend, daily, [sat, sun])"


def parse_hours(value: object) -> tuple[dt.time, dt.time]:
    """Parse wall-clock hours HH:MM-HH:MM, e.g. 07:00-19:00 or 22:00-06:00."""
    text = str(value).strip() if isinstance(value, str) else ""
    first, _, last = text.partition("-")
    start, end = _CLOCK.match(first.strip()), _CLOCK.match(last.strip())
    if start is None or end is None:
        raise ValueError(f"invalid hours '{value}' (use HH:MM-HH:MM, e.g. 07:00-19:00)")
    start_time = dt.time(int(start.group(1)), int(start.group(2)))
    end_time = dt.time(int(end.group(1)), int(end.group(2)))
    if start_time == end_time:
        raise ValueError(f"invalid hours '{value}': start and end are equal")
    return start_time, end_time


@dataclasses.dataclass(frozen=True)
class QuietDecision:
    """Whether a study may be retrieved from a source now; if not, until when to wait."""

    allowed: bool
    reason: str = ""
    until: dt.datetime | None = None


def quiet_decision(
    windows: Sequence[QuietWindow],
    zone: LocalZone,
    now: dt.datetime,
    instance_count: int | None,
) -> QuietDecision:
    """Decide whether quiet hours allow retrieving a study of `instance_count` instances now."""
    local = zone.local(now)
    blocking = []
    for window in windows:
        span = window.active_span(local)
        if span is None:
            continue
        limit = window.max_instances
        if limit is not None and instance_count is not None and instance_count <= limit:
            continue
        blocking.append(window)
    if not blocking:
        return QuietDecision(True)

    until_local = quiet_end(windows, local, instance_count)
    until = zone.aware(until_local)
    window = blocking[0]
    if window.max_instances is None:
        why = f"quiet hours {window}: no retrieves"
    elif instance_count is None:
        why = f"quiet hours {window}: the study's instance count is unknown"
    else:
        why = f"quiet hours {window}: study has {instance_count} instances"
    return QuietDecision(False, f"{why}; wait until {until.isoformat()}", until)


def quiet_end(
    windows: Sequence[QuietWindow], local: dt.datetime, instance_count: int | None
) -> dt.datetime:
    """Return the first local time from `local` on when no window blocks the study."""
    moment = local
    # Adjacent or overlapping windows chain; a week of them would block for ever.
    for _ in range(len(windows) * 8 + 1):
        ends = []
        for window in windows:
            span = window.active_span(moment)
            limit = window.max_instances
            allowed = limit is not None and instance_count is not None and instance_count <= limit
            if span is not None and not allowed:
                ends.append(span[1])
        if not ends:
            return moment
        moment = max(ends)
    return moment
