"""Checking the identity settings against the nodes, and building the configured chains."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from engine.configfile import Document, Problem
from engine.identity.domains import DomainDirectory
from engine.identity.pixm import PixmSource
from engine.identity.pixpdq import PdqSource, PixSource
from engine.identity.resolver import ChainResolver
from engine.identity.settings import BUILTIN_SOURCES, IdentitySettings
from engine.identity.sources import IdentitySource, LearnedSource, SharedSource, TableSource
from engine.identity.table import CrossReferenceTable
from engine.jobs.store import AsyncStore


def check_identity(
    document: Document, settings: IdentitySettings, local_issuer: str, node_issuers: set[str]
) -> list[Problem]:
    """Return the problems of the identity section that need the rest of the configuration."""
    problems: list[Problem] = []
    known_domains = node_issuers | set(settings.domains) | {local_issuer}
    directory = DomainDirectory(settings.domains)
    chains = {**{"(default)": settings.default_chain}, **settings.chains}

    for domain, chain in chains.items():
        base = (
            ("identity", "default_chain")
            if domain == "(default)"
            else (
                "identity",
                "chains",
                domain,
            )
        )
        if domain != "(default)" and domain not in known_domains:
            problems.append(
                document.problem(
                    base,
                    f"unknown domain '{domain}'",
                    "use the issuer of a node or a domain under identity.domains",
                )
            )
        for index, name in enumerate(chain):
            source = settings.sources.get(name)
            if source is None and name not in BUILTIN_SOURCES:
                known = ", ".join([*BUILTIN_SOURCES, *sorted(settings.sources)])
                problems.append(
                    document.problem((*base, index), f"unknown identity source '{name}'", known)
                )
                continue
            if source is not None and source.type == "pixm" and domain != "(default)":
                for needed in (local_issuer, domain):
                    if not directory.get(needed).fhir_system:
                        problems.append(
                            document.problem(
                                (*base, index),
                                f"pixm source '{name}' needs a FHIR system for domain {needed}",
                                f"set identity.domains.{needed}.universal_id or fhir_system",
                            )
                        )
        if len(set(chain)) != len(chain):
            problems.append(document.problem(base, "an identity source is listed twice"))
    return problems


def build_resolver(
    settings: IdentitySettings,
    table: CrossReferenceTable,
    local_issuer: str,
    db: AsyncStore,
    reactor: Any,
    now: Callable[[], dt.datetime],
) -> ChainResolver:
    directory = DomainDirectory(settings.domains)
    sources: dict[str, IdentitySource] = {
        "table": TableSource(table, local_issuer),
        "learned": LearnedSource(db, local_issuer),
        "shared": SharedSource(local_issuer),
    }
    for name, source in settings.sources.items():
        if source.type == "pix":
            sources[name] = PixSource(name, source, directory, reactor, now)
        elif source.type == "pdq":
            sources[name] = PdqSource(name, source, directory, reactor, now)
        else:
            sources[name] = PixmSource(name, source, directory, reactor)
    return ChainResolver(
        db=db,
        local_issuer=local_issuer,
        chains={
            domain: [sources[name] for name in chain] for domain, chain in settings.chains.items()
        },
        default_chain=[sources[name] for name in settings.default_chain],
        cache=settings.cache,
        now=now,
    )
