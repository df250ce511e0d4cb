"""The interface between identity sources and their users (prefetch, federation).

A resolver finds a local patient's identifier in another domain, and the local
patient behind a remote identifier. Every answer says which identity source
gave it, so jobs can record how each identifier was found.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from twisted.internet import defer

from engine.identity import records
from engine.identity.settings import CacheSettings
from engine.identity.sources import Answer, AnswerKind, IdentitySource
from engine.identity.table import CrossReferenceTable
from engine.jobs.store import AsyncStore
from engine.model import Demographics, PatientIdentifier

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Resolution:
    """The answer of an identity lookup.

    identifier is None when no source knows the patient in that domain; source
    names the identity source that answered (e.g. "table"), and detail says why
    in words fit for a job's event log (identifiers only, never names). trail
    holds one line per source asked, in order; transient is True when no
    identifier was found but a source failed in a way that may pass, so the
    lookup is worth repeating later.
    """

    identifier: PatientIdentifier | None
    source: str
    detail: str = ""
    trail: tuple[str, ...] = ()
    transient: bool = False


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


class ChainResolver:
    """An IdentityResolver that asks the chain of identity sources of each domain in order.

    The first FOUND answer wins. A failed source is skipped, and when no source
    finds the patient the Resolution is transient if any failure was. Answers
    of network sources are cached in the store for the configured TTL; failures
    are never cached. Local IDs are followed through recorded merges: a
    retired ID resolves as the ID it lives on as, and when that ID is unknown
    in a domain, the IDs merged into it are tried, most recent merge first.
    """

    def __init__(
        self,
        *,
        db: AsyncStore,
        local_issuer: str,
        chains: Mapping[str, Sequence[IdentitySource]],
        default_chain: Sequence[IdentitySource],
        cache: CacheSettings,
        now: Callable[[], dt.datetime],
    ) -> None:
        self.db = db
        self.local_issuer = local_issuer
        self.chains = chains
        self.default_chain = default_chain
        self.cache = cache
        self.now = now

    def chain_for(self, domain: str) -> Sequence[IdentitySource]:
        return self.chains.get(domain, self.default_chain)

    def resolve(self, local: PatientIdentifier, domain: str) -> defer.Deferred[Resolution]:
        return defer.ensureDeferred(self._resolve(local, domain))

    def local_for(self, remote: PatientIdentifier) -> defer.Deferred[Resolution]:
        return defer.ensureDeferred(self._local_for(remote))

    def active_patient(
        self, local: PatientIdentifier
    ) -> defer.Deferred[tuple[PatientIdentifier, list[PatientIdentifier]]]:
        """Return the ID a local patient lives on as after every merge, and the path to it."""
        return self.db.run(lambda store: records.active_patient(store, local))

    async def _resolve(self, local: PatientIdentifier, domain: str) -> Resolution:
        if domain == local.issuer:
            return Resolution(local, "local", "the patient's own domain")
        active, path = await self.active_patient(local)
        trail: list[str] = []
        if path:
            trail.append(f"{local} was merged into {active}")
        retired = await self.db.run(lambda store: records.retired_into(store, active))

        transient = False
        chain = self.chain_for(domain)
        for query in [active, *retired]:
            for source in chain:
                answer = await self._ask(source, query, domain, trail)
                if answer.kind == AnswerKind.FOUND and answer.identifier is not None:
                    via = f" (through merged {query})" if query != active else ""
                    return Resolution(
                        answer.identifier, source.name, answer.detail + via, tuple(trail)
                    )
                transient = transient or answer.transient
        names = ", ".join(source.name for source in chain) or "no source"
        detail = f"no identifier for {active} in {domain} ({names})"
        return Resolution(None, "chain", detail, tuple(trail), transient)

    async def _local_for(self, remote: PatientIdentifier) -> Resolution:
        if remote.issuer == self.local_issuer:
            active, _ = await self.active_patient(remote)
            return Resolution(active, "local", "the patient's own domain")
        trail: list[str] = []
        transient = False
        chain = self.chain_for(remote.issuer)
        for source in chain:
            answer = await self._ask(source, remote, self.local_issuer, trail)
            if answer.kind == AnswerKind.FOUND and answer.identifier is not None:
                active, path = await self.active_patient(answer.identifier)
                if path:
                    trail.append(f"{answer.identifier} was merged into {active}")
                return Resolution(active, source.name, answer.detail, tuple(trail))
            transient = transient or answer.transient
        names = ", ".join(source.name for source in chain) or "no source"
        detail = f"no local patient for {remote} ({names})"
        return Resolution(None, "chain", detail, tuple(trail), transient)

    async def _ask(
        self, source: IdentitySource, query: PatientIdentifier, domain: str, trail: list[str]
    ) -> Answer:
        now = self.now()
        if source.cached:
            hit = await self.db.run(
                lambda store: records.cached_answer(store, query, domain, source.name, now)
            )
            if hit is not None:
                answer = (
                    Answer.found(hit.identifier, hit.detail)
                    if hit.identifier is not None
                    else Answer.not_found(hit.detail)
                )
                trail.append(f"{_describe(source.name, query, domain, answer)} (cached)")
                return answer

        demographics: Demographics | None = None
        if source.needs_demographics and query.issuer == self.local_issuer:
            demographics = await self._demographics(query)
        try:
            answer = await source.lookup(query, domain, demographics)
        except Exception as error:
            logger.exception("identity source %s failed on %s", source.name, query)
            answer = Answer.failed(f"internal error: {type(error).__name__}")
        trail.append(_describe(source.name, query, domain, answer))

        if source.cached and answer.kind != AnswerKind.FAILED:
            ttl = (
                self.cache.ttl_seconds
                if answer.kind == AnswerKind.FOUND
                else self.cache.negative_ttl_seconds
            )
            await self.db.run(
                lambda store: records.cache_answer(
                    store, query, domain, source.name, answer.identifier, answer.detail, now, ttl
                )
            )
        return answer

    async def _demographics(self, patient: PatientIdentifier) -> Demographics | None:
        recorded = await self.db.run(lambda store: records.local_demographics(store, patient))
        if recorded is not None:
            return recorded
        return await self.db.run(lambda store: records.latest_order_demographics(store, patient))


def _describe(name: str, query: PatientIdentifier, domain: str, answer: Answer) -> str:
    if answer.kind == AnswerKind.FOUND:
        text = f"{name}: {query} is {answer.identifier}"
    elif answer.kind == AnswerKind.NOT_FOUND:
        text = f"{name}: {query} not found in {domain}"
    else:
        retry = "" if answer.transient else ", not retried"
        text = f"{name}: lookup of {query} in {domain} failed{retry}"
    return f"{text}: {answer.detail}" if answer.detail else text
