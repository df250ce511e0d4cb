"""`fdqr rules explain`: why an order goes where it goes and fetches what it fetches.

The explanation is built as data (Explanation.to_dict) from the same
evaluation the planner and the prefetch pipeline use, then printed as text or
JSON. It contains identifiers and codes, never patient names or birth dates.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from engine.jobs.policy import SourcePolicy
from engine.model import Decision, PatientIdentifier, StudyCandidate
from engine.rules.anatomy import Anatomy
from engine.rules.conditions import Trace
from engine.rules.evaluate import OrderEvaluation
from engine.rules.facts import Fact
from engine.rules.model import Route, Rule, RuleSet
from engine.rules.select import RouteCheck, StudyQuery, plan_query, select_priors
from engine.rules.timing import LocalZone, format_timespan


@dataclasses.dataclass(frozen=True)
class IdentityLookup:
    """A source's identifier for the patient, or why there is none."""

    source: str
    identifier: PatientIdentifier | None
    via: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "identifier": str(self.identifier) if self.identifier else None,
            "via": self.via,
            "detail": self.detail,
        }


@dataclasses.dataclass(frozen=True)
class CandidateVerdict:
    decision: Decision
    # Body regions recognised in the study description.
    regions: tuple[str, ...]
    # For a selected study: why it would not be retrieved now (quiet hours), or ''.
    retrieve_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        candidate = self.decision.candidate
        return {
            "source": candidate.source,
            "study_instance_uid": candidate.study_instance_uid,
            "study_date": candidate.study_date.isoformat() if candidate.study_date else None,
            "modalities": list(candidate.modalities),
            "description": candidate.description,
            "instance_count": candidate.instance_count,
            "body_regions": list(self.regions),
            "selected": self.decision.selected,
            "reason": self.decision.reason,
            "retrieve_note": self.retrieve_note,
        }


@dataclasses.dataclass(frozen=True)
class RuleExplanation:
    rule: Rule
    applies: bool
    trace: Trace
    query: StudyQuery | None
    candidates: tuple[CandidateVerdict, ...]

    def to_dict(self) -> dict[str, Any]:
        spec = self.rule.spec
        window = spec.suppression_window
        return {
            "name": self.rule.name,
            "defined_in": _where(
                self.rule.document.file, self.rule.document.line_of(self.rule.base)
            ),
            "applies": self.applies,
            "condition": self.trace.to_dict(),
            "suppression_window": format_timespan(window) if window else None,
            "query": self.query.to_dict() if self.query else None,
            "candidates": [verdict.to_dict() for verdict in self.candidates],
        }


@dataclasses.dataclass(frozen=True)
class Explanation:
    evaluation: OrderEvaluation
    identities: tuple[IdentityLookup, ...]
    rules: tuple[RuleExplanation, ...]
    # Origin of the candidate studies: a file, live queries, or none.
    candidates_from: str
    today: dt.date

    def to_dict(self) -> dict[str, Any]:
        facts = self.evaluation.facts
        routing = self.evaluation.routing
        fetch = self.evaluation.fetch
        return {
            "message": {
                "message_type": facts.origin.message_type,
                "control_id": facts.origin.control_id,
                "sending_application": facts.origin.sending_application,
                "sending_facility": facts.origin.sending_facility,
            },
            "facts": [fact.to_dict() for fact in facts],
            "routes": [_route_dict(check) for check in routing.route_checks],
            "route": routing.route.name if routing.route else None,
            "outcome": self.evaluation.outcome,
            "fetch": (
                {"not_before": fetch.not_before.isoformat(), "reason": fetch.reason}
                if fetch
                else None
            ),
            "identities": [lookup.to_dict() for lookup in self.identities],
            "candidates_from": self.candidates_from,
            "today": self.today.isoformat(),
            "rules": [rule.to_dict() for rule in self.rules],
        }


def _route_dict(check: RouteCheck) -> dict[str, Any]:
    if check.taken:
        status = "taken"
    elif check.trace.matched:
        status = "matches, but an earlier route took the order"
    else:
        status = "does not match: " + "; ".join(check.trace.failures())
    route = check.route
    return {
        "name": route.name,
        "defined_in": _where(route.document.file, route.document.line_of(route.base)),
        "matched": check.trace.matched,
        "taken": check.taken,
        "status": status,
        "condition": check.trace.to_dict(),
        "sources": list(route.sources),
        "destination": route.destination,
    }


def _where(file: str, line: int | None) -> str:
    return f"{file}:{line}" if line else file


def order_candidates(route: Route, candidates: Sequence[StudyCandidate]) -> list[StudyCandidate]:
    """Put candidates in the route's source order, as the pipeline finds them."""
    position = {name: index for index, name in enumerate(route.sources)}
    known = [candidate for candidate in candidates if candidate.source in position]
    return sorted(known, key=lambda candidate: position[candidate.source])


def explain(
    evaluation: OrderEvaluation,
    rule_set: RuleSet,
    *,
    today: dt.date,
    identities: Sequence[IdentityLookup] = (),
    candidates: Mapping[str, Sequence[StudyCandidate]] | None = None,
    candidates_from: str = "none",
    policies: Mapping[str, SourcePolicy] | None = None,
    zone: LocalZone | None = None,
    now: dt.datetime | None = None,
) -> Explanation:
    """Build the explanation of an evaluated order.

    candidates maps a rule name to its candidate studies (a file gives the same
    list to every rule); None explains routing and queries only. Candidates from
    a source that is not on the route are shown as skipped.
    """
    routing = evaluation.routing
    route = routing.route
    order = evaluation.facts.order
    rules: list[RuleExplanation] = []
    for check in routing.rule_checks:
        rule = check.rule
        applies = check.trace.matched
        query = plan_query(rule, order, today) if applies else None
        verdicts: tuple[CandidateVerdict, ...] = ()
        if applies and route is not None and candidates is not None:
            found = candidates.get(rule.name, ())
            verdicts = _verdicts(
                rule, route, order, found, today, rule_set, policies or {}, zone, now
            )
        rules.append(RuleExplanation(rule, applies, check.trace, query, verdicts))
    return Explanation(evaluation, tuple(identities), tuple(rules), candidates_from, today)


def _verdicts(
    rule: Rule,
    route: Route,
    order: Any,
    found: Sequence[StudyCandidate],
    today: dt.date,
    rule_set: RuleSet,
    policies: Mapping[str, SourcePolicy],
    zone: LocalZone | None,
    now: dt.datetime | None,
) -> tuple[CandidateVerdict, ...]:
    on_route = order_candidates(route, found)
    outside = [candidate for candidate in found if candidate not in on_route]
    decisions = select_priors(rule, order, on_route, today, rule_set)
    decisions += [
        Decision(
            candidate, False, f"source {candidate.source} is not a source of route {route.name}"
        )
        for candidate in outside
    ]
    # Most recent first, as an analyst reads a patient's history; ties keep source order.
    decisions.sort(key=lambda decision: decision.candidate.study_date or dt.date.min, reverse=True)
    verdicts = []
    for decision in decisions:
        note = ""
        policy = policies.get(decision.candidate.source)
        if decision.selected and policy is not None and zone is not None and now is not None:
            quiet = policy.quiet(zone, now, decision.candidate.instance_count)
            note = "" if quiet.allowed else f"retrieve postponed now: {quiet.reason}"
        regions = _regions(rule_set.anatomy, rule_set, decision.candidate.description)
        verdicts.append(CandidateVerdict(decision, regions, note))
    return tuple(verdicts)


def _regions(anatomy: Anatomy, rule_set: RuleSet, description: str) -> tuple[str, ...]:
    return anatomy.outermost(anatomy.find_regions(description, rule_set.body_part_patterns))


def render_text(explanation: Explanation) -> str:
    """Render an explanation for reading in a terminal."""
    data = explanation.to_dict()
    lines: list[str] = []
    message = data["message"]
    lines.append(
        f"Order {message['message_type']} {message['control_id']} from "
        f"{message['sending_application']}/{message['sending_facility']}"
    )
    lines.append("")
    lines.append("Order facts:")
    width = max((len(fact.name) for fact in explanation.evaluation.facts), default=0)
    for fact in explanation.evaluation.facts:
        lines.append(f"  {fact.name.ljust(width)}  {_fact_value(fact)}  ({fact.source})")

    lines.append("")
    lines.append("Routes (the first that matches takes the order):")
    for route in data["routes"]:
        mark = "->" if route["taken"] else "  "
        lines.append(f"  {mark} {route['name']} ({route['defined_in']}): {route['status']}")
    if data["route"] is None:
        lines.append("  No route matches: the order starts no job.")
    lines.append(f"Outcome: {data['outcome']}")
    if data["fetch"]:
        lines.append(f"Start: {data['fetch']['reason']}")

    if explanation.identities:
        lines.append("")
        lines.append("Identity lookups:")
        for lookup in explanation.identities:
            if lookup.identifier is not None:
                lines.append(f"  {lookup.source}: {lookup.identifier} ({lookup.via})")
            else:
                lines.append(f"  {lookup.source}: no identifier ({lookup.via}: {lookup.detail})")

    for rule in explanation.rules:
        lines.append("")
        lines.extend(_rule_lines(rule, explanation.candidates_from))
    return "\n".join(lines)


def _rule_lines(rule: RuleExplanation, candidates_from: str) -> list[str]:
    state = "applies" if rule.applies else "does not apply: " + "; ".join(rule.trace.failures())
    lines = [f"Rule {rule.rule.name}: {state}"]
    if not rule.applies:
        return lines
    if rule.query is not None:
        query = rule.query
        modalities = ", ".join(query.modalities) if query.modalities else "any"
        dates = f"{query.date_from} to {query.date_to}" if query.date_from else "any date"
        lines.append(f"  query: modalities {modalities}; study dates {dates}")
    window = rule.rule.spec.suppression_window
    if window:
        lines.append(f"  suppression window: {format_timespan(window)} per patient")
    if candidates_from == "none":
        lines.append("  no candidate studies given (use --candidates FILE.json or --live)")
        return lines
    if not rule.candidates:
        lines.append(f"  no candidate studies ({candidates_from})")
    for verdict in rule.candidates:
        candidate = verdict.decision.candidate
        mark = "SELECT" if verdict.decision.selected else "skip  "
        date = candidate.study_date.isoformat() if candidate.study_date else "no date"
        lines.append(
            f"  {mark} {candidate.source} {date} {'/'.join(candidate.modalities) or '-'}"
            f" '{candidate.description}' {candidate.study_instance_uid}"
        )
        lines.append(f"         {verdict.decision.reason}")
        if verdict.retrieve_note:
            lines.append(f"         {verdict.retrieve_note}")
    return lines


def _fact_value(fact: Fact) -> str:
    return ", ".join(fact.values)
