"""Identity sources: what a chain asks, in order, for a patient's identifier in a domain.

A lookup asks for `identifier` (of any domain) in `domain`: from the local
domain to a remote one when prefetch or federation resolves a local patient,
and from a remote domain to the local one for local_for(). Each source
answers FOUND, NOT_FOUND or FAILED; a FAILED answer says whether trying again
later may help.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Protocol

from twisted.internet import defer

from engine.identity import records
from engine.identity.table import CrossReferenceTable
from engine.jobs.store import AsyncStore
from engine.model import Demographics, PatientIdentifier


class AnswerKind(enum.StrEnum):
    FOUND = "found"
    NOT_FOUND = "not found"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class Answer:
    """One source's answer. detail is fit for a job's event log: identifiers, never names."""

    kind: AnswerKind
    identifier: PatientIdentifier | None = None
    detail: str = ""
    transient: bool = False

    @classmethod
    def found(cls, identifier: PatientIdentifier, detail: str = "") -> Answer:
        return cls(AnswerKind.FOUND, identifier, detail)

    @classmethod
    def not_found(cls, detail: str) -> Answer:
        return cls(AnswerKind.NOT_FOUND, None, detail)

    @classmethod
    def failed(cls, detail: str, transient: bool = True) -> Answer:
        return cls(AnswerKind.FAILED, None, detail, transient)


class IdentitySource(Protocol):
    name: str
    # Network sources are slow and their answers are cached; built-in ones are not.
    cached: bool
    # PDQ needs the patient's demographics; the chain finds them only for such a source.
    needs_demographics: bool

    def lookup(
        self, identifier: PatientIdentifier, domain: str, demographics: Demographics | None
    ) -> defer.Deferred[Answer]:
        """Find the patient with `identifier` in `domain`."""


class TableSource:
    """The configured cross-reference file."""

    name = "table"
    cached = False
    needs_demographics = False

    def __init__(self, table: CrossReferenceTable, local_issuer: str) -> None:
        self.table = table
        self.local_issuer = local_issuer

    def lookup(
        self, identifier: PatientIdentifier, domain: str, demographics: Demographics | None
    ) -> defer.Deferred[Answer]:
        if identifier.issuer == self.local_issuer:
            found = self.table.lookup(identifier, domain)
        elif domain == self.local_issuer:
            found = self.table.local_for(identifier, self.local_issuer)
        else:
            found = None
        if found is None:
            return defer.succeed(Answer.not_found(f"no entry for {identifier} in {domain}"))
        return defer.succeed(Answer.found(found))


class LearnedSource:
    """Cross-references learned from ADT messages whose PID-3 lists several issuers."""

    name = "learned"
    cached = False
    needs_demographics = False

    def __init__(self, db: AsyncStore, local_issuer: str) -> None:
        self.db = db
        self.local_issuer = local_issuer

    def lookup(
        self, identifier: PatientIdentifier, domain: str, demographics: Demographics | None
    ) -> defer.Deferred[Answer]:
        if identifier.issuer == self.local_issuer:
            found = self.db.run(lambda store: records.learned_remote(store, identifier, domain))
        elif domain == self.local_issuer:
            found = self.db.run(lambda store: records.learned_local(store, identifier))
        else:
            return defer.succeed(Answer.not_found("only local identifiers are learned"))

        def answer(result: PatientIdentifier | None) -> Answer:
            if result is None:
                return Answer.not_found(f"nothing learned for {identifier} in {domain}")
            return Answer.found(result)

        return found.addCallback(answer)


class SharedSource:
    """A domain declared to use the local identifiers unchanged."""

    name = "shared"
    cached = False
    needs_demographics = False

    def __init__(self, local_issuer: str) -> None:
        self.local_issuer = local_issuer

    def lookup(
        self, identifier: PatientIdentifier, domain: str, demographics: Demographics | None
    ) -> defer.Deferred[Answer]:
        if identifier.issuer != self.local_issuer and domain != self.local_issuer:
            return defer.succeed(Answer.not_found("neither side is the local domain"))
        return defer.succeed(
            Answer.found(
                PatientIdentifier(identifier.value, domain),
                f"{domain} shares the local identifiers",
            )
        )
