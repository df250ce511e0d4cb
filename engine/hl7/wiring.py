"""The planner and identifier policy that the engine, its intake processes and the CLI share."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from engine.config import Config, EngineSettings
from engine.hl7.events import IdentifierPolicy
from engine.identity.adt import IdentityEvents
from engine.identity.domains import DomainDirectory
from engine.jobs.planner import Planner
from engine.rules.model import RuleSet


def identifier_policy(settings: EngineSettings) -> IdentifierPolicy:
    """Return how the local patient identifier is found in PID-3."""
    local = settings.local_patient
    return IdentifierPolicy(
        issuer=local.issuer,
        authorities=tuple(local.authorities or [local.issuer]),
        unqualified_ids_are_local=local.unqualified_ids_are_local,
    )


def engine_planner(
    config: Config, rule_set: Callable[[], RuleSet], now: Callable[[], dt.datetime]
) -> Planner:
    """Return the planner of the running engine: routes and rules, the time zone, ADT effects."""
    settings = config.settings
    return Planner(
        rule_set,
        now=now,
        identity=IdentityEvents(
            settings.local_patient.issuer,
            DomainDirectory(settings.identity.domains),
            config.identity_table,
        ),
        zone=settings.zone,
    )
