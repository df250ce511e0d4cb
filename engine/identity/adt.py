"""Planning the identity effects of ADT messages, applied with the message in one transaction.

ADT^A01, A04 and A08 (DemographicsUpdated) update the local patient record and
teach the engine every other qualified identifier of PID-3 in a domain the engine
uses (a node's issuer or one of identity.domains). An identifier is not learned
when PID-3 has more than one in its domain, or when the cross-reference table
assigns it to another patient. Identifiers of other domains (a national ID, an
insurance number) are neither learned nor named in the outcome. ADT^A40
(PatientsMerged) records that the MRG-1 ID now lives on as the PID-3 one.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection, Sequence

from engine.identity import records
from engine.identity.domains import DomainDirectory
from engine.identity.table import CrossReferenceTable
from engine.jobs.store import Action, Store
from engine.model import DemographicsUpdated, PatientIdentifier, PatientsMerged

logger = logging.getLogger(__name__)


class IdentityEvents:
    """Turns DemographicsUpdated and PatientsMerged into an outcome and store actions."""

    def __init__(
        self,
        local_issuer: str,
        directory: DomainDirectory,
        table: CrossReferenceTable | None = None,
        *,
        domains: Collection[str],
    ) -> None:
        self.local_issuer = local_issuer
        self.directory = directory
        self.table = table or CrossReferenceTable.empty()
        # The issuers whose identifiers are learned: the nodes' and identity.domains.
        self.domains = frozenset(domains)

    def __call__(self, event: DemographicsUpdated | PatientsMerged) -> tuple[str, Sequence[Action]]:
        if isinstance(event, PatientsMerged):
            return self._merge(event)
        return self._demographics(event)

    def _demographics(self, event: DemographicsUpdated) -> tuple[str, Sequence[Action]]:
        patient = event.patient
        control_id = event.origin.control_id
        demographics = event.demographics

        def update(store: Store, now: dt.datetime) -> str:
            return records.save_demographics(
                store, patient, demographics, now, control_id, event.deleted
            )

        actions: list[Action] = [update]
        outcome = f"{event.origin.message_type} for {patient}"
        by_domain: dict[str, list[PatientIdentifier]] = {}
        others = 0
        for remote in self._remote_identifiers(event.identifiers, patient):
            if remote.issuer in self.domains:
                by_domain.setdefault(remote.issuer, []).append(remote)
            else:
                others += 1
        if others:
            # Values stay out: such an identifier can be a national ID.
            outcome += f"; {others} PID-3 identifier(s) of other domains not learned"
        for domain, remotes in by_domain.items():
            if len(remotes) > 1:
                # Either identifier could belong to another patient, so neither is learned
                # and an earlier one stays, as when a PIX response is ambiguous.
                listed = ", ".join(remote.value for remote in remotes)
                logger.warning(
                    "message %s: PID-3 of %s has %d identifiers in domain %s (%s); none is learned",
                    control_id,
                    patient,
                    len(remotes),
                    domain,
                    listed,
                )
                outcome += (
                    f"; PID-3 has {len(remotes)} identifiers in {domain} ({listed}): none learned"
                )
                continue

            [remote] = remotes
            owner = self.table.local_for(remote, self.local_issuer)
            if owner not in (None, patient):
                # The cross-reference table, kept by the hospital, assigns it to another patient.
                logger.warning(
                    "message %s: PID-3 of %s lists %s, which the identity table assigns to %s;"
                    " not learned",
                    control_id,
                    patient,
                    remote,
                    owner,
                )
                outcome += f"; {remote} belongs to {owner} in the identity table: not learned"
                continue

            actions.append(_learn(patient, remote, control_id))
        return outcome, actions

    def _remote_identifiers(
        self, identifiers: Sequence[PatientIdentifier], patient: PatientIdentifier
    ) -> list[PatientIdentifier]:
        """Return PID-3's other identifiers, with their issuer named as the engine names it."""
        found: list[PatientIdentifier] = []
        for identifier in identifiers:
            issuer = self.directory.issuer_for_name(identifier.issuer)
            if issuer == self.local_issuer or identifier == patient:
                continue
            remote = PatientIdentifier(identifier.value, issuer)
            if remote not in found:
                found.append(remote)
        return found

    def _merge(self, event: PatientsMerged) -> tuple[str, Sequence[Action]]:
        surviving, retired = event.surviving, event.retired
        control_id = event.origin.control_id

        def merge(store: Store, now: dt.datetime) -> str:
            return records.merge(store, surviving, retired, now, control_id)

        return f"{event.origin.message_type}", [merge]


def _learn(local: PatientIdentifier, remote: PatientIdentifier, control_id: str) -> Action:
    def learn(store: Store, now: dt.datetime) -> str:
        return records.learn(store, local, remote, now, control_id)

    return learn
