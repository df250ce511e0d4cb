"""Turning an order event into jobs with the current routes and rules."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Sequence

from engine.hl7.events import Unhandled
from engine.jobs.store import Action, NewJob
from engine.model import DemographicsUpdated, DomainEvent, OrderPlaced, PatientsMerged
from engine.rules.model import RuleSet
from engine.rules.select import route_order

logger = logging.getLogger(__name__)
# Plans the identity effects of ADT events: returns the outcome and the store actions.
IdentityPlanner = Callable[[DemographicsUpdated | PatientsMerged], tuple[str, Sequence[Action]]]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a message makes the engine do, applied in the transaction that stores it.

    jobs are created; each action runs against the store in the same
    transaction and returns a note; outcome is the one-line summary kept with
    the message.
    """

    jobs: Sequence[NewJob]
    outcome: str
    actions: Sequence[Action] = ()


class Planner:
    """Creates one job per rule that applies to an order on the route that takes it.

    The rule set is read on every call, so a reloaded set applies to the next message.
    """

    def __init__(
        self,
        rule_set: Callable[[], RuleSet],
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        identity: IdentityPlanner | None = None,
    ) -> None:
        self.rule_set = rule_set
        self.now = now
        self.identity = identity

    def __call__(self, event: DomainEvent | Unhandled) -> Plan:
        if isinstance(event, Unhandled):
            return Plan((), event.reason)
        if isinstance(event, DemographicsUpdated | PatientsMerged) and self.identity is not None:
            outcome, actions = self.identity(event)
            return Plan((), outcome, actions)
        if not isinstance(event, OrderPlaced):
            # NOTE: cancels, changes, status reports, demographics and merges are
            # stored and acknowledged but do not change jobs or identities yet.
            return Plan((), f"{type(event).__name__}: recorded, no action taken")
        return self._plan_order(event)

    def _plan_order(self, event: OrderPlaced) -> Plan:

        routing = route_order(self.rule_set(), event.origin, event.order)
        if routing is None:
            return Plan((), "no route matches")
        if not routing.rules:
            modality = routing.ordered_modality or "unknown"
            return Plan((), f"route {routing.route.name}: no rule for ordered modality {modality}")

        now = self.now()
        jobs = [
            NewJob(
                route=routing.route.name,
                rule=rule.name,
                destination=routing.route.destination,
                sources=tuple(routing.route.sources),
                patient=event.patient,
                demographics=event.demographics,
                order=event.order,
                not_before=now,
            )
            for rule in routing.rules
        ]
        names = ", ".join(rule.name for rule in routing.rules)
        return Plan(jobs, f"route {routing.route.name}: {len(jobs)} job(s) for rules {names}")
