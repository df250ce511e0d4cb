"""The `federation` section of conf/engine.yaml: who may use the Q/R SCP, and the member sites.

The Q/R SCP shares the engine's own AE (dicom.ae_title, host and port) with
the Storage SCP, so workstations configure one AE for fdqr and the sites send
the objects of a federated retrieve to that same AE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydicom.charset import python_encoding

from engine.configfile import Document, Problem, check_ae_title

if TYPE_CHECKING:
    from engine.config import EngineSettings

# The DICOM AE title rule, as in engine.config: 1 to 16 characters, no backslash.
AETitle = Annotated[str, AfterValidator(check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]
DEFAULT_CHARACTER_SET = "ISO_IR 192"


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_character_set(value: str | None) -> str | None:
    if value is not None and value not in python_encoding:
        raise ValueError(
            f"unknown Specific Character Set term '{value}' (use e.g. ISO_IR 192 or ISO_IR 100)"
        )
    return value


class Caller(_Settings):
    """A calling AE title that may use the Q/R SCP."""

    move_destinations: list[AETitle] = Field(default_factory=list)
    # Character set of answers when the caller's query names none.
    character_set: str | None = None

    _character_set = pydantic.field_validator("character_set")(_check_character_set)


class MoveDestination(_Settings):
    host: str = Field(min_length=1)
    port: Port
    timeout_seconds: float = Field(default=30, gt=0)


class Site(_Settings):
    """A member site: a node in `nodes` that federated queries go to."""

    # The site's identifier domain; defaults to the node's issuer.
    issuer: str | None = Field(default=None, min_length=1)
    # The whole query at this site, including a level-by-level descent, must end in this time.
    timeout_seconds: float = Field(default=20, gt=0)
    # Whether queries without a patient ID (by name, date, accession) are forwarded here.
    queries_without_patient_id: bool = False
    # A relational site answers queries with keys below or above the query level at once;
    # other sites are queried level by level.
    relational: bool = False


class FederationSettings(_Settings):
    enabled: bool = False
    callers: dict[AETitle, Caller] = Field(default_factory=dict)
    move_destinations: dict[AETitle, MoveDestination] = Field(default_factory=dict)
    sites: dict[str, Site] = Field(default_factory=dict)
    character_set: str = DEFAULT_CHARACTER_SET
    # How long the engine remembers which sites hold a study seen in an answer.
    location_memory_seconds: float = Field(default=3600, gt=0)
    # Answers returned to one query at most; further answers are dropped and logged.
    max_answers: int = Field(default=10000, ge=1)

    _character_set = pydantic.field_validator("character_set")(_check_character_set)


def check_federation(document: Document, settings: EngineSettings) -> list[Problem]:
    """Check the references of the federation section to nodes and destinations."""
    federation = settings.federation
    problems: list[Problem] = []
    if not federation.enabled:
        return problems
    nodes = settings.nodes
    local_issuer = settings.local_patient.issuer

    if not federation.sites:
        problems.append(
            document.problem(
                ("federation", "sites"),
                "no member sites",
                "name at least one node under federation.sites",
            )
        )
    for name, site in federation.sites.items():
        where = ("federation", "sites", name)
        node = nodes.get(name)
        if node is None:
            problems.append(
                document.problem(
                    where,
                    f"unknown node '{name}'",
                    f"define it under nodes; known: {', '.join(sorted(nodes))}",
                )
            )
            continue
        if site.issuer is not None and node.issuer is not None and site.issuer != node.issuer:
            problems.append(
                document.problem(
                    (*where, "issuer"),
                    f"issuer '{site.issuer}' differs from nodes.{name}.issuer '{node.issuer}'",
                    f"remove federation.sites.{name}.issuer, or make both the domain of the"
                    " site's patient IDs",
                )
            )
        if site.issuer is None and node.issuer is None:
            problems.append(
                document.problem(
                    where,
                    f"site '{name}' has no issuer",
                    f"set federation.sites.{name}.issuer or nodes.{name}.issuer to its "
                    f"patient identifier domain ({local_issuer} for the local PACS)",
                )
            )

    problems += _check_site_issuers(document, settings)
    for caller_title, caller in federation.callers.items():
        for index, destination in enumerate(caller.move_destinations):
            if destination not in federation.move_destinations:
                known = ", ".join(sorted(federation.move_destinations)) or "none"
                problems.append(
                    document.problem(
                        ("federation", "callers", caller_title, "move_destinations", index),
                        f"unknown move destination '{destination}'",
                        f"define it under federation.move_destinations; known: {known}",
                    )
                )
    return problems


def _check_site_issuers(document: Document, settings: EngineSettings) -> list[Problem]:
    """Return a problem for a site issuer no domain has, or one another site has too."""
    nodes = settings.nodes
    local_issuer = settings.local_patient.issuer
    known = {node.issuer for node in nodes.values() if node.issuer}
    known |= set(settings.identity.domains) | {local_issuer}
    problems = []
    first_with: dict[str, str] = {}
    for name, site in settings.federation.sites.items():
        node = nodes.get(name)
        issuer = site.issuer or (node.issuer if node else None)
        if node is None or issuer is None:
            continue
        if node.issuer is not None and issuer != node.issuer:
            continue  # reported as differing from the node's issuer
        where = ("federation", "sites", name, "issuer")
        if issuer not in known:
            problems.append(
                document.problem(
                    where,
                    f"unknown domain '{issuer}'",
                    f"use {local_issuer} for the local PACS, or the issuer of a node or a"
                    " domain under identity.domains",
                )
            )
            continue
        other = first_with.setdefault(issuer, name)
        if other != name and not (node.shared_issuer and nodes[other].shared_issuer):
            problems.append(
                document.problem(
                    where,
                    f"issuer '{issuer}' is also the issuer of site '{other}'",
                    "each site's patient IDs are in their own domain; set shared_issuer: true"
                    f" on nodes {other} and {name} when both are archives of one domain",
                )
            )
    return problems


def site_issuer(settings: EngineSettings, name: str) -> str:
    """Return a member site's identifier domain (checked by check_federation)."""
    issuer = settings.federation.sites[name].issuer or settings.nodes[name].issuer
    assert issuer is not None
    return issuer
