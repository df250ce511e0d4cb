"""Identifier domains as HL7 v2 (CX-4 assigning authority) and FHIR (Identifier.system) name them.

Inside the engine a domain is its DICOM IssuerOfPatientID (e.g. HOSP_A). The
directory translates it to and from the names identity services use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from engine.identity.settings import DomainSettings


@dataclasses.dataclass(frozen=True)
class Domain:
    issuer: str
    namespace_id: str
    universal_id: str = ""
    universal_id_type: str = ""
    fhir_system: str = ""

    def hd(self, subcomponent: str = "&") -> str:
        """Return the domain as an HL7 HD (namespace&universal id&type), without escaping."""
        if not self.universal_id:
            return self.namespace_id
        return subcomponent.join([self.namespace_id, self.universal_id, self.universal_id_type])


class DomainDirectory:
    """The configured domains; an issuer that is not configured is its own namespace id."""

    def __init__(self, domains: Mapping[str, DomainSettings] | None = None) -> None:
        self._domains: dict[str, Domain] = {}
        for issuer, settings in (domains or {}).items():
            universal = settings.universal_id or ""
            system = settings.fhir_system or ""
            if not system and universal and settings.universal_id_type == "ISO":
                system = f"urn:oid:{universal}"
            self._domains[issuer] = Domain(
                issuer=issuer,
                namespace_id=settings.namespace_id or issuer,
                universal_id=universal,
                universal_id_type=settings.universal_id_type if universal else "",
                fhir_system=system,
            )

    def get(self, issuer: str) -> Domain:
        return self._domains.get(issuer) or Domain(issuer=issuer, namespace_id=issuer)

    def issuer_for_authority(self, namespace_id: str, universal_id: str = "") -> str | None:
        """Return the issuer an HL7 assigning authority denotes, None if it is ambiguous.

        The universal id decides when given: a namespace id of a domain configured
        with another universal id denotes none (another authority that uses the
        same namespace). An unconfigured namespace is its own issuer.
        """
        if universal_id:
            for domain in self._domains.values():
                if domain.universal_id == universal_id:
                    return domain.issuer
        if namespace_id:
            for domain in self._domains.values():
                if domain.namespace_id == namespace_id:
                    if universal_id and domain.universal_id:
                        return None
                    return domain.issuer
            return namespace_id
        return universal_id or None

    def issuer_for_name(self, name: str) -> str:
        """Return the issuer an authority name (a namespace id or a universal id) denotes."""
        for domain in self._domains.values():
            if name in (domain.universal_id, domain.namespace_id):
                return domain.issuer
        return name

    def issuer_for_system(self, system: str) -> str | None:
        for domain in self._domains.values():
            if domain.fhir_system and domain.fhir_system == system:
                return domain.issuer
        return None
