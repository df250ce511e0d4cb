"""Turning an order event into jobs with the current routes and rules."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Sequence

from engine.hl7.events import Unhandled
from engine.identity import records
from engine.jobs.store import Action, NewJob, Store
from engine.model import (
    DemographicsUpdated,
    DomainEvent,
    OrderCancelled,
    OrderChanged,
    OrderPlaced,
    OrderStatusChanged,
    PatientIdentifier,
    PatientsMerged,
)
from engine.rules.evaluate import evaluate_order
from engine.rules.model import RuleSet
from engine.rules.timing import LocalZone

logger = logging.getLogger(__name__)
# Plans the identity effects of ADT events: returns the outcome and the store actions.
IdentityPlanner = Callable[[DemographicsUpdated | PatientsMerged], tuple[str, Sequence[Action]]]


def event_label(event: DomainEvent | Unhandled) -> str:
    """Return what kind of event a message is, in the words an interface analyst uses."""
    if isinstance(event, Unhandled):
        return event.reason
    if isinstance(event, OrderCancelled):
        return f"order cancel (ORC-1 {event.order_control})"
    if isinstance(event, OrderChanged):
        return "order change (ORC-1 XO)"
    if isinstance(event, OrderPlaced):
        return "new order (ORC-1 NW)"
    if isinstance(event, OrderStatusChanged):
        return "order status (ORC-1 SC)"
    if isinstance(event, PatientsMerged):
        return "patient merge (ADT^A40)"
    return f"demographics ({event.origin.message_type})"


@dataclasses.dataclass(frozen=True)
class PatientChange:
    """A change a message makes to the engine's record of a patient, for the audit trail."""

    patient: PatientIdentifier
    # True for the ID a merge retires (MRG-1), False for a record updated.
    retired: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a message makes the engine do, applied in the transaction that stores it.

    jobs are created; each action runs against the store in the same
    transaction and returns a note; outcome is the one-line summary kept with
    the message; patient_changes name the patient records the actions change.
    """

    jobs: Sequence[NewJob]
    outcome: str
    actions: Sequence[Action] = ()
    patient_changes: Sequence[PatientChange] = ()


class Planner:
    """Creates one job per rule that applies to an order on the route that takes it,
    and cancels the pending jobs of a cancelled order.

    The rule set is read on every call, so a reloaded set applies to the next message.
    """

    def __init__(
        self,
        rule_set: Callable[[], RuleSet],
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        identity: IdentityPlanner | None = None,
        zone: LocalZone | None = None,
    ) -> None:
        self.rule_set = rule_set
        self.now = now
        self.identity = identity
        self.zone = zone or LocalZone()

    def __call__(self, event: DomainEvent | Unhandled) -> Plan:
        if isinstance(event, Unhandled):
            return Plan((), event.reason)
        if isinstance(event, OrderPlaced):
            return self._plan_order(event)
        if isinstance(event, OrderCancelled):
            return self._plan_cancel(event)
        if isinstance(event, OrderChanged):
            return self._plan_change(event)
        if isinstance(event, DemographicsUpdated | PatientsMerged) and self.identity is not None:
            outcome, actions = self.identity(event)
            if isinstance(event, PatientsMerged):
                changes = [PatientChange(event.surviving), PatientChange(event.retired, True)]
            else:
                changes = [PatientChange(event.patient)]
            return Plan((), outcome, actions, changes)
        # NOTE: status reports (ORC-1 SC) are stored and acknowledged but change no job.
        return Plan((), f"{event_label(event)}: recorded, no action taken")

    def _plan_order(self, event: OrderPlaced) -> Plan:
        evaluation = evaluate_order(self.rule_set(), event, self.zone, self.now())
        routing = evaluation.routing
        if routing.route is None or not routing.rules or evaluation.fetch is None:
            return Plan((), evaluation.outcome)

        route = routing.route
        fetch = evaluation.fetch
        jobs = [
            NewJob(
                route=route.name,
                rule=rule.name,
                destination=route.destination,
                sources=tuple(route.sources),
                patient=event.patient,
                demographics=event.demographics,
                order=evaluation.facts.order,
                not_before=fetch.not_before,
                skip_repeated_orders=True,
                suppression_window=rule.spec.suppression_window,
                schedule_note=fetch.reason,
            )
            for rule in routing.rules
        ]
        return Plan(jobs, evaluation.outcome)

    def _plan_cancel(self, event: OrderCancelled) -> Plan:
        reason = (
            f"order cancelled (ORC-1 {event.order_control}) by message {event.origin.control_id}"
        )

        def cancel(store: Store, now: dt.datetime) -> str:
            return store.cancel_order(_merged_ids(store, event.patient), event.order, reason, now)

        return Plan((), f"order cancel (ORC-1 {event.order_control})", [cancel])

    def _plan_change(self, event: OrderChanged) -> Plan:
        """Replace the order's unfinished jobs with the jobs the changed order calls for.

        The old jobs are cancelled before the new ones are admitted, in the same
        transaction, so a new job is not held back as a repeat of an old one.
        A job of the order that is already running or finished stays, and a new
        job of the same rule is then suppressed as a repeated order.
        """
        reason = f"order changed (ORC-1 XO) by message {event.origin.control_id}"

        def replace(store: Store, now: dt.datetime) -> str:
            patients = _merged_ids(store, event.patient)
            return store.cancel_order(patients, event.order, reason, now, replaced=True)

        plan = self._plan_order(event.as_placed())
        return Plan(plan.jobs, f"{event_label(event)}: {plan.outcome}", [replace])


def _merged_ids(store: Store, patient: PatientIdentifier) -> list[PatientIdentifier]:
    """Return the IDs a patient's orders may be filed under.

    They are the active ID after merges and every ID merged into it, so that a
    cancel finds an order placed before a merge.
    """
    active, _ = records.active_patient(store, patient)
    return [active, *records.retired_into(store, active)]
