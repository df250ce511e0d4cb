"""Evaluating routes and rules: which route takes an order, which rules apply,
what to ask the sources, and which candidate studies are selected, each with its reason."""

from __future__ import annotations

import calendar
import dataclasses
import datetime as dt
from collections.abc import Sequence

from engine.model import Decision, OrderFacts, StudyCandidate
from engine.rules.anatomy import Anatomy
from engine.rules.conditions import FactSource, Trace
from engine.rules.model import (
    KEY_IMAGE_MODALITIES,
    REPORT_MODALITIES,
    SAME,
    Duration,
    Route,
    Rule,
    RuleSet,
)

# Modalities that carry no images of their own: reports, key objects, presentation states.
NON_IMAGE_MODALITIES = frozenset({*REPORT_MODALITIES, *KEY_IMAGE_MODALITIES, "PR"})


@dataclasses.dataclass(frozen=True)
class RouteCheck:
    """One route's condition evaluated for an order."""

    route: Route
    trace: Trace
    taken: bool


@dataclasses.dataclass(frozen=True)
class RuleCheck:
    """One rule's condition evaluated for an order on the route that took it."""

    rule: Rule
    trace: Trace


@dataclasses.dataclass(frozen=True)
class Routing:
    """The route an order took (None if no route matches), the rules that apply, and the
    evaluation of every route and rule for explain."""

    route: Route | None
    rules: tuple[Rule, ...]
    route_checks: tuple[RouteCheck, ...]
    rule_checks: tuple[RuleCheck, ...]


def route_order(rule_set: RuleSet, facts: FactSource) -> Routing:
    """Find the first route whose condition holds, and its rules whose condition holds.

    Every route is evaluated, so explain can show why the other routes did not take
    the order.
    """
    checks: list[RouteCheck] = []
    taken: Route | None = None
    for route in rule_set.routes:
        trace = route.condition.evaluate(facts)
        is_taken = trace.matched and taken is None
        if is_taken:
            taken = route
        checks.append(RouteCheck(route, trace, is_taken))
    if taken is None:
        return Routing(None, (), tuple(checks), ())

    names = taken.spec.rules if taken.spec.rules is not None else list(rule_set.rules)
    rule_checks = tuple(
        RuleCheck(rule_set.rules[name], rule_set.rules[name].condition.evaluate(facts))
        for name in names
    )
    rules = tuple(check.rule for check in rule_checks if check.trace.matched)
    return Routing(taken, rules, tuple(checks), rule_checks)


def subtract(date: dt.date, duration: Duration) -> dt.date:
    """Return `date` minus a calendar duration; 29 February minus 1y is 28 February."""
    if duration.unit == "d":
        return date - dt.timedelta(days=duration.amount)
    if duration.unit == "w":
        return date - dt.timedelta(weeks=duration.amount)
    months = duration.amount * (12 if duration.unit == "y" else 1)
    total = date.year * 12 + (date.month - 1) - months
    year, month = divmod(total, 12)
    day = min(date.day, calendar.monthrange(year, month + 1)[1])
    return dt.date(year, month + 1, day)


@dataclasses.dataclass(frozen=True)
class StudyQuery:
    """The request to a source for one rule: the modalities of interest (None: any) and
    a study date range (None: any date). select_priors filters the responses again."""

    modalities: tuple[str, ...] | None
    date_from: dt.date | None
    date_to: dt.date | None

    def to_dict(self) -> dict[str, object]:
        return {
            "modalities": list(self.modalities) if self.modalities is not None else None,
            "date_from": self.date_from.isoformat() if self.date_from else None,
            "date_to": self.date_to.isoformat() if self.date_to else None,
        }


def wanted_modalities(rule: Rule, order: OrderFacts) -> tuple[str, ...]:
    """Return the rule's modalities with `same` replaced by the ordered modality."""
    wanted: list[str] = []
    for modality in rule.spec.select.modalities:
        value = order.ordered_modality.upper() if modality == SAME else modality
        if value and value not in wanted:
            wanted.append(value)
    return tuple(wanted)


def plan_query(rule: Rule, order: OrderFacts, today: dt.date) -> StudyQuery:
    selection = rule.spec.select
    modalities: list[str] | None = list(wanted_modalities(rule, order))
    if SAME in selection.modalities and not order.ordered_modality:
        # The ordered modality is unknown: ask for every study and let selection explain.
        modalities = None
    if modalities is not None:
        if selection.include_reports:
            modalities += [m for m in REPORT_MODALITIES if m not in modalities]
        if selection.include_key_images:
            modalities += [m for m in KEY_IMAGE_MODALITIES if m not in modalities]
    if selection.ordering == "oldest_and_most_recent":
        # The oldest relevant study may lie beyond the lookback.
        return StudyQuery(tuple(modalities) if modalities is not None else None, None, None)
    cutoff = subtract(today, selection.lookback)
    return StudyQuery(tuple(modalities) if modalities is not None else None, cutoff, today)


def select_priors(
    rule: Rule,
    order: OrderFacts,
    candidates: Sequence[StudyCandidate],
    today: dt.date,
    rule_set: RuleSet | None = None,
) -> list[Decision]:
    """Decide for every candidate whether the rule selects it, and why.

    Candidates come in the route's source order. A study that several sources
    have is taken from the rule's first preferred source that has it, else from
    the first in route order.
    """
    return _Selector(rule, order, today, rule_set or RuleSet.empty()).decide(candidates)


@dataclasses.dataclass
class _Eligible:
    candidate: StudyCandidate
    note: str
    kind: str  # "image" counts against max_studies; "report" and "key images" do not


class _Selector:
    def __init__(self, rule: Rule, order: OrderFacts, today: dt.date, rule_set: RuleSet) -> None:
        self.rule = rule
        self.selection = rule.spec.select
        self.order = order
        self.today = today
        self.anatomy: Anatomy = rule_set.anatomy
        self.patterns = rule_set.body_part_patterns
        self.cutoff = subtract(today, self.selection.lookback)
        self.wanted = set(wanted_modalities(rule, order))

    def decide(self, candidates: Sequence[StudyCandidate]) -> list[Decision]:
        decisions: list[Decision] = []
        eligible: list[_Eligible] = []
        taken_from = self._holders(candidates)

        for candidate in candidates:
            holder = taken_from[candidate.study_instance_uid]
            if holder is not candidate:
                decisions.append(Decision(candidate, False, self._duplicate_reason(holder)))
                continue
            reason, item = self._check(candidate)
            if item is None:
                decisions.append(Decision(candidate, False, reason))
            else:
                eligible.append(item)
        return decisions + self._rank(eligible)

    def _holders(self, candidates: Sequence[StudyCandidate]) -> dict[str, StudyCandidate]:
        preferred = self.selection.prefer_sources
        best: dict[str, tuple[tuple[int, int], StudyCandidate]] = {}
        for position, candidate in enumerate(candidates):
            rank = (
                preferred.index(candidate.source)
                if candidate.source in preferred
                else len(preferred)
            )
            key = (rank, position)
            current = best.get(candidate.study_instance_uid)
            if current is None or key < current[0]:
                best[candidate.study_instance_uid] = (key, candidate)
        return {uid: holder for uid, (_, holder) in best.items()}

    def _duplicate_reason(self, holder: StudyCandidate) -> str:
        if holder.source in self.selection.prefer_sources:
            return f"same study is taken from {holder.source} (preferred source)"
        return f"same study is taken from {holder.source}"

    def _check(self, candidate: StudyCandidate) -> tuple[str, _Eligible | None]:
        """Return (reason it is skipped, None) or ('', what makes it eligible)."""
        selection = self.selection
        order = self.order
        if selection.skip_ordered_study:
            if (
                order.study_instance_uid
                and candidate.study_instance_uid == order.study_instance_uid
            ):
                return "the ordered study itself (same Study Instance UID)", None
            if order.accession_number and candidate.accession_number == order.accession_number:
                return "the ordered study itself (same accession number)", None
        if not candidate.modalities:
            return "no modalities in study returned by the source", None
        if SAME in selection.modalities and not order.ordered_modality:
            return "modalities: same, but the ordered modality is unknown", None
        kind, reason = self._modality_kind(candidate)
        if not kind:
            return reason, None

        reason = self._description_exclusion(candidate.description)
        if reason:
            return reason, None
        reason, note = self._body_part(candidate)
        if reason:
            return reason, None
        if candidate.study_date is None:
            return "no study date returned by the source", None
        # A day of leeway for a site in a time zone ahead of the engine's.
        if candidate.study_date > self.today + dt.timedelta(days=1):
            return (
                f"study date {candidate.study_date} is in the future (today is {self.today})",
                None,
            )
        return "", _Eligible(candidate, note, kind)

    def _modality_kind(self, candidate: StudyCandidate) -> tuple[str, str]:
        modalities = set(candidate.modalities)
        if self.wanted & modalities:
            return "image", ""
        shown = "/".join(candidate.modalities)
        if not modalities - NON_IMAGE_MODALITIES:
            if modalities & set(REPORT_MODALITIES):
                if self.selection.include_reports:
                    return "report", ""
                return "", f"report-only study ({shown}); set include_reports to fetch it"
            if modalities & set(KEY_IMAGE_MODALITIES):
                if self.selection.include_key_images:
                    return "key images", ""
                return "", f"key-image-only study ({shown}); set include_key_images to fetch it"
        return "", f"modalities {shown} not in {'/'.join(sorted(self.wanted))}"

    def _description_exclusion(self, description: str) -> str:
        for pattern in self.rule.exclude_patterns:
            if pattern.search(description):
                return f"description '{description}' matches exclude pattern /{pattern.pattern}/"
        includes = self.rule.include_patterns
        if includes and not any(pattern.search(description) for pattern in includes):
            shown = ", ".join(f"/{pattern.pattern}/" for pattern in includes)
            return f"description '{description}' matches no include pattern ({shown})"
        return ""

    def _body_part(self, candidate: StudyCandidate) -> tuple[str, str]:
        """Return (reason it is skipped, '') or ('', note on why the body part fits)."""
        mode = self.selection.body_part
        if mode is None:
            return "", ""
        if isinstance(mode, list):
            ordered: tuple[str, ...] = tuple(mode)
            label = "the rule's regions " + ", ".join(mode)
        else:
            ordered = self.order.body_parts
            label = "ordered " + ", ".join(ordered)
            if not ordered:
                return "", "body part not checked: the order's body part is unknown"

        regions = self.anatomy.outermost(
            self.anatomy.find_regions(candidate.description, self.patterns)
        )
        if not regions:
            if self.selection.unknown_body_part == "include":
                return "", "body part not recognised in the description; unknown_body_part: include"
            return (
                f"body part not recognised in description '{candidate.description}'"
                " (unknown_body_part: exclude)",
                "",
            )
        for prior in regions:
            for wanted in ordered:
                if mode == "related":
                    why = self.anatomy.relation(prior, wanted)
                else:
                    why = self.anatomy.covers(prior, wanted)
                if why:
                    return "", why
        relation = "related to" if mode == "related" else "the same as"
        return f"body part {', '.join(regions)} is not {relation} {label}", ""

    def _rank(self, eligible: list[_Eligible]) -> list[Decision]:
        decisions: list[Decision] = []
        maximum = self.selection.max_studies
        images = [item for item in eligible if item.kind == "image"]
        extras = [item for item in eligible if item.kind != "image"]
        by_date = sorted(images, key=_recency, reverse=True)

        within = [item for item in by_date if _date(item) >= self.cutoff]
        outside = [item for item in by_date if _date(item) < self.cutoff]
        oldest: _Eligible | None = None
        if self.selection.ordering == "oldest_and_most_recent" and by_date:
            oldest = by_date[-1]
            recent = [item for item in within if item is not oldest][: maximum - 1]
            if oldest in within[:maximum]:
                recent = within[:maximum]
                oldest = None
        else:
            recent = within[:maximum]

        for rank, item in enumerate(within, start=1):
            if item in recent:
                text = f"rule {self.rule.name}: rank {rank} of max {maximum}"
                decisions.append(Decision(item.candidate, True, _with_note(text, item.note)))
            elif item is not oldest:
                decisions.append(
                    Decision(item.candidate, False, f"beyond max_studies {maximum} (rank {rank})")
                )
        for item in outside:
            if item is oldest:
                continue
            decisions.append(Decision(item.candidate, False, self._before_lookback(item)))
        if oldest is not None:
            text = f"rule {self.rule.name}: oldest relevant study (ordering oldest_and_most_recent)"
            decisions.append(Decision(oldest.candidate, True, _with_note(text, oldest.note)))

        for item in sorted(extras, key=_recency, reverse=True):
            if _date(item) < self.cutoff:
                decisions.append(Decision(item.candidate, False, self._before_lookback(item)))
                continue
            text = f"rule {self.rule.name}: {item.kind} study, not counted in max_studies"
            decisions.append(Decision(item.candidate, True, _with_note(text, item.note)))
        return decisions

    def _before_lookback(self, item: _Eligible) -> str:
        return (
            f"study date {item.candidate.study_date} before lookback "
            f"{self.selection.lookback} ({self.cutoff})"
        )


def _recency(item: _Eligible) -> tuple[dt.date, str]:
    return (_date(item), item.candidate.study_time)


def _date(item: _Eligible) -> dt.date:
    return item.candidate.study_date or dt.date.min


def _with_note(text: str, note: str) -> str:
    return f"{text}; {note}" if note else text
