"""The interface between identity sources and their users (prefetch, federation).

A resolver finds a local patient's identifier in another domain, and the local
patient behind a remote identifier. Every answer says which identity source
gave it, so jobs can record how each identifier was found.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from twisted.internet import defer

from engine.identity.table import CrossReferenceTable
from engine.model import PatientIdentifier


@dataclasses.dataclass(frozen=True)
class Resolution:
    """The answer of an identity lookup.

    identifier is None when no source knows the patient in that domain; source
    names the identity source that answered (e.g. "table"), and detail says why
    in words fit for a job's event log (identifiers only, never names).
    """

    identifier: PatientIdentifier | None
    source: str
    detail: str = ""


class IdentityResolver(Protocol):
    def resolve(self, local: PatientIdentifier, domain: str) -> defer.Deferred[Resolution]:
        """Find the local patient's identifier in `domain` (an issuer of patient IDs)."""

    def local_for(self, remote: PatientIdentifier) -> defer.Deferred[Resolution]:
        """Find the local patient that a remote identifier belongs to."""


class TableResolver:
    """An IdentityResolver backed by the configured cross-reference table."""

    def __init__(self, table: CrossReferenceTable, local_issuer: str) -> None:
        self.table = table
        self.local_issuer = local_issuer

    def resolve(self, local: PatientIdentifier, domain: str) -> defer.Deferred[Resolution]:
        found = self.table.lookup(local, domain)
        if found is None:
            return defer.succeed(
                Resolution(None, "table", f"no entry for {local} in domain {domain}")
            )
        return defer.succeed(Resolution(found, "table"))

    def local_for(self, remote: PatientIdentifier) -> defer.Deferred[Resolution]:
        found = self.table.local_for(remote, self.local_issuer)
        if found is None:
            return defer.succeed(Resolution(None, "table", f"no local patient for {remote}"))
        return defer.succeed(Resolution(found, "table"))
