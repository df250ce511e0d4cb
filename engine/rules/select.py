"""Evaluating routes and rules: which route takes an order, which rules apply,
and which candidate studies are selected, each with its reason."""

from __future__ import annotations

import calendar
import dataclasses
import datetime as dt
from collections.abc import Sequence

from engine.model import Decision, MessageOrigin, OrderFacts, StudyCandidate
from engine.rules.model import Duration, Route, Rule, RuleSet


@dataclasses.dataclass(frozen=True)
class Routing:
    """The route an order took and the rules that apply to it."""

    route: Route
    rules: tuple[Rule, ...]
    ordered_modality: str


def route_matches(route: Route, origin: MessageOrigin) -> bool:
    match = route.spec.match
    if origin.message_type not in match.message_type:
        return False
    if match.sending_application and origin.sending_application not in match.sending_application:
        return False
    return not (match.sending_facility and origin.sending_facility not in match.sending_facility)


def ordered_modality(order: OrderFacts, rule_set: RuleSet) -> str:
    """Return the ordered modality: OBR-24 when present, else the procedure-code map."""
    if order.ordered_modality:
        return order.ordered_modality
    return rule_set.procedure_codes.get(order.procedure_code, "")


def route_order(rule_set: RuleSet, origin: MessageOrigin, order: OrderFacts) -> Routing | None:
    """Find the first route that takes the message, and its rules that match the order."""
    for route in rule_set.routes:
        if not route_matches(route, origin):
            continue
        modality = ordered_modality(order, rule_set)
        names = route.spec.rules if route.spec.rules is not None else list(rule_set.rules)
        rules = tuple(
            rule_set.rules[name] for name in names if _rule_applies(rule_set.rules[name], modality)
        )
        return Routing(route, rules, modality)
    return None


def _rule_applies(rule: Rule, modality: str) -> bool:
    wanted = [value.upper() for value in rule.spec.when.ordered_modality]
    return not wanted or modality in wanted


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


def select_priors(
    rule: Rule,
    order: OrderFacts,
    candidates: Sequence[StudyCandidate],
    today: dt.date,
) -> list[Decision]:
    """Decide for every candidate whether the rule selects it, most recent first.

    Candidates come in source preference order: a study held by several
    sources is taken from the first one.
    """
    selection = rule.spec.select
    cutoff = subtract(today, selection.lookback)
    wanted = set(selection.modalities)
    decisions: list[Decision] = []
    eligible: list[StudyCandidate] = []
    first_source: dict[str, str] = {}

    for candidate in candidates:
        uid = candidate.study_instance_uid
        if uid in first_source:
            decisions.append(
                Decision(candidate, False, f"same study is taken from {first_source[uid]}")
            )
            continue
        first_source[uid] = candidate.source
        reason = _exclusion(candidate, order, wanted, cutoff, selection.lookback)
        if reason:
            decisions.append(Decision(candidate, False, reason))
        else:
            eligible.append(candidate)

    eligible.sort(key=lambda c: (c.study_date or dt.date.min, c.study_time), reverse=True)
    for rank, candidate in enumerate(eligible, start=1):
        if rank <= selection.max_studies:
            decisions.append(
                Decision(
                    candidate, True, f"rule {rule.name}: rank {rank} of max {selection.max_studies}"
                )
            )
        else:
            decisions.append(
                Decision(
                    candidate, False, f"beyond max_studies {selection.max_studies} (rank {rank})"
                )
            )
    return decisions


def _exclusion(
    candidate: StudyCandidate,
    order: OrderFacts,
    wanted: set[str],
    cutoff: dt.date,
    lookback: Duration,
) -> str:
    if order.study_instance_uid and candidate.study_instance_uid == order.study_instance_uid:
        return "the ordered study itself (same Study Instance UID)"
    if order.accession_number and candidate.accession_number == order.accession_number:
        return "the ordered study itself (same accession number)"
    if not candidate.modalities:
        return "no modalities in study returned by the source"
    if not wanted & set(candidate.modalities):
        return f"modalities {'/'.join(candidate.modalities)} not in {'/'.join(sorted(wanted))}"
    if candidate.study_date is None:
        return "no study date returned by the source"
    if candidate.study_date < cutoff:
        return f"study date {candidate.study_date} before lookback {lookback} ({cutoff})"
    return ""
