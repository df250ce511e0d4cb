"""Evaluating an order against the rule set: facts, route, rules and start time.

The planner and `fdqr rules explain` both call evaluate_order, so what explain
shows is what the engine does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from engine.model import OrderPlaced
from engine.rules.facts import Facts, extract_facts
from engine.rules.model import RuleSet
from engine.rules.select import Routing, route_order
from engine.rules.timing import FetchTime, LocalZone, fetch_time


@dataclasses.dataclass(frozen=True)
class OrderEvaluation:
    facts: Facts
    routing: Routing
    # None when no route takes the order.
    fetch: FetchTime | None

    @property
    def outcome(self) -> str:
        """Return a one-line summary of what the order starts."""
        route = self.routing.route
        if route is None:
            return "no route matches"
        if not self.routing.rules:
            modality = self.facts.order.ordered_modality or "unknown"
            return f"route {route.name}: no rule applies (ordered modality {modality})"
        names = ", ".join(rule.name for rule in self.routing.rules)
        return f"route {route.name}: {len(self.routing.rules)} job(s) for rules {names}"


def evaluate_order(
    rule_set: RuleSet, event: OrderPlaced, zone: LocalZone, now: dt.datetime
) -> OrderEvaluation:
    facts = extract_facts(event, rule_set, zone)
    routing = route_order(rule_set, facts)
    fetch = None
    if routing.route is not None:
        timing = routing.route.spec.timing
        fetch = fetch_time(now, facts.order.scheduled_time, timing.lead_time)
        if facts.invalid_time_field and timing.lead_time is not None:
            reason = f"{fetch.reason} ({facts.invalid_time_field} is not a valid timestamp)"
            fetch = dataclasses.replace(fetch, reason=reason)
    return OrderEvaluation(facts, routing, fetch)
