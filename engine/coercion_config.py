"""The `coercion:` section of conf/engine.yaml: a declared stamping profile per destination.

    coercion:
      profiles:
        latin1-pacs:
          character_set: latin1        # unicode (default) or latin1
          non_latin1: transliterate    # or reject (latin1 only)
          accession: prefix            # keep (default), prefix or blank
          site_codes: {HOSP_A: HA-}    # per source issuer; default the issuer itself
          study_uid: keep              # keep (default) or remap
          uid_root: 1.2.826.0.1.3680043.10.999   # a root you own, for remap
          issuer_qualifiers: true      # Issuer of Patient ID Qualifiers Sequence
      destinations:
        local_pacs: latin1-pacs        # other destinations get the default profile

issuer_qualifiers takes each issuer's Universal Entity ID from identity.domains.
"""

from __future__ import annotations

import re
from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from engine.coercion import CoercionProfile, UniversalEntity
from engine.configfile import Document, Problem
from engine.identity.domains import DomainDirectory
from engine.identity.settings import IdentitySettings

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
# Room left in a 64-character UID for the 39-digit suffix and its dot.
MAX_UID_ROOT_LENGTH = 24
# A site code is the start of an SH value: no backslash or control characters.
_SITE_CODE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,15}$")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProfileSettings(_Settings):
    issuer_qualifiers: bool = False
    character_set: Literal["unicode", "latin1"] = "unicode"
    non_latin1: Literal["transliterate", "reject"] = "transliterate"
    accession: Literal["keep", "prefix", "blank"] = "keep"
    site_codes: dict[str, str] = Field(default_factory=dict)
    study_uid: Literal["keep", "remap"] = "keep"
    uid_root: str | None = None

    @pydantic.field_validator("site_codes")
    @classmethod
    def _codes(cls, value: dict[str, str]) -> dict[str, str]:
        for issuer, code in value.items():
            if not _SITE_CODE.match(code):
                raise ValueError(
                    f"site code '{code}' of {issuer} must be 1 to 15 printable characters"
                    " without backslash"
                )
        return value

    @pydantic.model_validator(mode="after")
    def _root(self) -> ProfileSettings:
        if self.study_uid == "remap":
            if self.uid_root is None:
                raise ValueError("study_uid remap needs uid_root, a UID root your site owns")
            if not _OID.match(self.uid_root) or len(self.uid_root) > MAX_UID_ROOT_LENGTH:
                raise ValueError(
                    f"uid_root '{self.uid_root}' must be a UID root of at most"
                    f" {MAX_UID_ROOT_LENGTH} characters"
                )
        return self


class CoercionSettings(_Settings):
    profiles: dict[str, ProfileSettings] = Field(default_factory=dict)
    destinations: dict[str, str] = Field(default_factory=dict)


def check_coercion(
    document: Document,
    settings: CoercionSettings,
    identity: IdentitySettings,
    nodes: set[str],
    local_issuer: str,
) -> list[Problem]:
    problems: list[Problem] = []
    for destination, profile in settings.destinations.items():
        where = ("coercion", "destinations", destination)
        if destination not in nodes:
            problems.append(
                document.problem(
                    where, f"unknown node '{destination}'", f"known: {', '.join(sorted(nodes))}"
                )
            )
        if profile not in settings.profiles:
            known = ", ".join(sorted(settings.profiles)) or "none defined"
            problems.append(
                document.problem(where, f"unknown profile '{profile}'", f"known: {known}")
            )
    directory = DomainDirectory(identity.domains)
    for name, profile_settings in settings.profiles.items():
        if profile_settings.issuer_qualifiers and not directory.get(local_issuer).universal_id:
            problems.append(
                document.problem(
                    ("coercion", "profiles", name, "issuer_qualifiers"),
                    f"the local domain {local_issuer} has no universal_id",
                    f"set identity.domains.{local_issuer}.universal_id",
                )
            )
    return problems


def build_profiles(
    settings: CoercionSettings, identity: IdentitySettings, modifying_system: str
) -> dict[str, CoercionProfile]:
    """Return the profile of each configured destination."""
    directory = DomainDirectory(identity.domains)
    qualifiers = tuple(
        (issuer, UniversalEntity(domain.universal_id, domain.universal_id_type))
        for issuer in identity.domains
        if (domain := directory.get(issuer)).universal_id
    )
    profiles = {
        name: CoercionProfile(
            name=name,
            qualifiers=qualifiers if item.issuer_qualifiers else (),
            character_set=item.character_set,
            non_latin1=item.non_latin1,
            accession=item.accession,
            site_codes=tuple(item.site_codes.items()),
            study_uid=item.study_uid,
            uid_root=item.uid_root or "",
            modifying_system=modifying_system,
        )
        for name, item in settings.profiles.items()
    }
    return {destination: profiles[name] for destination, name in settings.destinations.items()}
