"""The planner and identifier policy that the engine, its intake processes and the CLI share."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from engine.config import Config, EngineSettings, load_rules, rule_files
from engine.hl7.events import IdentifierPolicy
from engine.identity.adt import IdentityEvents
from engine.identity.domains import DomainDirectory
from engine.jobs.planner import IdentityPlanner, Planner
from engine.jobs.store import Action
from engine.model import DemographicsUpdated, PatientsMerged
from engine.rules.model import RuleSet
from engine.rules.reload import RuleSetHolder


def identifier_policy(settings: EngineSettings) -> IdentifierPolicy:
    """Return how the local patient identifier is found in PID-3."""
    local = settings.local_patient
    return IdentifierPolicy(
        issuer=local.issuer,
        authorities=tuple(local.authorities or [local.issuer]),
        unqualified_ids_are_local=local.unqualified_ids_are_local,
    )


# The outcome of an ADT message replayed: its effects were applied when it arrived,
# and applying them again could put back older demographics over newer ones.
REPLAYED_ADT = "patient records unchanged: a replay does not apply ADT messages again"


def engine_rules(config: Config) -> RuleSetHolder:
    """Return the holder of the configuration's rule set, reloaded from its files."""
    return RuleSetHolder(
        config.rule_set,
        load=lambda: load_rules(config.path, config.settings),
        files=lambda: rule_files(config.path, config.settings),
    )


def engine_planner(
    config: Config,
    rule_set: Callable[[], RuleSet],
    now: Callable[[], dt.datetime],
    replay: bool = False,
) -> Planner:
    """Return the planner of the running engine: routes and rules, the time zone, ADT effects.

    For a replay, ADT messages change no patient record (REPLAYED_ADT).
    """
    settings = config.settings
    node_issuers = {node.issuer for node in settings.nodes.values() if node.issuer}
    identity: IdentityPlanner = IdentityEvents(
        settings.local_patient.issuer,
        DomainDirectory(settings.identity.domains),
        config.identity_table,
        domains=node_issuers | set(settings.identity.domains),
    )
    if replay:
        identity = _replayed_adt
    return Planner(rule_set, now=now, identity=identity, zone=settings.zone)


def _replayed_adt(event: DemographicsUpdated | PatientsMerged) -> tuple[str, Sequence[Action]]:
    return f"{event.origin.message_type}: {REPLAYED_ADT}", ()
