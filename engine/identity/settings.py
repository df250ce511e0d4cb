"""The `identity:` section of conf/engine.yaml: domains, identity sources, chains, cache, check.

A chain lists, for one identifier domain (a source node's issuer), the identity
sources tried in order. Three sources are built in: `table` (the configured
cross-reference file), `learned` (identifiers learned from ADT messages) and
`shared` (the domain uses the local identifiers unchanged). The others are
declared under `sources` as IHE PIX (ITI-9), PDQ (ITI-21) or PIXm (ITI-83)
services.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

BUILTIN_SOURCES = ("table", "learned", "shared")
PdqField = Literal["family_name", "given_name", "birth_date", "sex"]
CheckAttribute = Literal["name", "birth_date", "sex"]
PDQ_FIELDS: tuple[PdqField, ...] = ("family_name", "given_name", "birth_date", "sex")
CHECK_ATTRIBUTES: tuple[CheckAttribute, ...] = ("name", "birth_date", "sex")
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DomainSettings(_Settings):
    """How an identifier domain (a DICOM IssuerOfPatientID) is named in HL7 and FHIR.

    namespace_id is HL7 CX-4.1 and defaults to the issuer itself; universal_id
    and universal_id_type are CX-4.2 and CX-4.3 (an OID with type ISO);
    fhir_system is the Identifier.system used by PIXm, by default
    urn:oid:<universal_id> for an ISO universal id.
    """

    namespace_id: str | None = None
    universal_id: str | None = None
    universal_id_type: str = "ISO"
    fhir_system: str | None = None

    @pydantic.model_validator(mode="after")
    def _oid(self) -> DomainSettings:
        if (
            self.universal_id is not None
            and self.universal_id_type == "ISO"
            and not _OID.match(self.universal_id)
        ):
            raise ValueError(f"universal_id '{self.universal_id}' is not an OID (type ISO)")
        return self


class SourceSettings(_Settings):
    """One network identity source.

    type pix and pdq talk HL7 v2 over MLLP to `endpoint`, a Twisted client
    endpoint string such as tcp:host=pix.example.org:port=3600 (tls:... for TLS);
    type pixm sends FHIR requests to `base_url`.
    """

    type: Literal["pix", "pdq", "pixm"]
    endpoint: str | None = None
    base_url: str | None = None
    timeout_seconds: float = Field(default=10, gt=0)
    max_response_bytes: int = Field(default=1024 * 1024, ge=1024)
    # MSH-3 to MSH-6 of the queries (pix and pdq).
    sending_application: str = "FDQR"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    hl7_version: str = "2.5"
    # pdq: the demographics sent in QPD-3, which every hit must match exactly.
    match: list[PdqField] = Field(default_factory=lambda: list(PDQ_FIELDS))
    # pdq: RCP-2, the most hits the supplier may return.
    max_hits: int = Field(default=10, ge=2, le=1000)

    @pydantic.model_validator(mode="after")
    def _connection(self) -> SourceSettings:
        if self.type in ("pix", "pdq"):
            if not self.endpoint:
                raise ValueError(f"a {self.type} source needs endpoint (e.g. tcp:host=H:port=P)")
            if not re.match(r"^(tcp|tls|ssl|unix):", self.endpoint):
                raise ValueError(
                    f"endpoint '{self.endpoint}' must be a Twisted client endpoint string"
                    " such as tcp:host=127.0.0.1:port=3600"
                )
            if self.base_url is not None:
                raise ValueError(f"base_url applies to pixm sources, not {self.type}")
        else:
            if not self.base_url or not re.match(r"^https?://[^/]+", self.base_url):
                raise ValueError("a pixm source needs base_url, e.g. http://host:8080/fhir")
            if self.endpoint is not None:
                raise ValueError("endpoint applies to pix and pdq sources, not pixm")
        if self.type == "pdq" and not self.match:
            raise ValueError("a pdq source needs at least one field in match")
        return self


class CacheSettings(_Settings):
    """How long answers of network sources are kept; 0 keeps none."""

    ttl_seconds: float = Field(default=3600, ge=0)
    negative_ttl_seconds: float = Field(default=300, ge=0)


class CheckSettings(_Settings):
    """The comparison of a remote patient's C-FIND demographics with the local record.

    exact compares the values as they are (trailing PN component separators and
    padding aside); normalised ignores case, accents, punctuation, and the order
    of family and given name, and compares no other name component; off skips
    the check. when_missing says what a value missing on the remote side means.
    """

    strictness: Literal["exact", "normalised", "off"] = "normalised"
    attributes: list[CheckAttribute] = Field(default_factory=lambda: list(CHECK_ATTRIBUTES))
    when_missing: Literal["accept", "quarantine"] = "accept"

    @pydantic.field_validator("strictness", mode="before")
    @classmethod
    def _unquoted_off(cls, value: object) -> object:
        # YAML 1.1 reads an unquoted off as false.
        return "off" if value is False else value


class IdentitySettings(_Settings):
    # The cross-reference table: a YAML (.yaml, .yml) or CSV (.csv) file.
    table: Path | None = None
    domains: dict[str, DomainSettings] = Field(default_factory=dict)
    sources: dict[str, SourceSettings] = Field(default_factory=dict)
    # Identity sources tried in order, per domain (issuer); other domains use default_chain.
    chains: dict[str, list[str]] = Field(default_factory=dict)
    default_chain: list[str] = Field(default_factory=lambda: ["table", "learned"])
    cache: CacheSettings = CacheSettings()
    check: CheckSettings = CheckSettings()

    @pydantic.field_validator("sources")
    @classmethod
    def _names(cls, value: dict[str, SourceSettings]) -> dict[str, SourceSettings]:
        reserved = sorted(set(value) & set(BUILTIN_SOURCES))
        if reserved:
            raise ValueError(f"source name reserved for a built-in source: {', '.join(reserved)}")
        return value
