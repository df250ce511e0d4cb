"""The configured cross-reference table: (local ID, local issuer) to (remote ID, remote issuer).

File format (YAML):

    cross_references:
      - local: {id: L12345, issuer: LOCAL}
        remote:
          - {id: A-778899, issuer: HOSP_A}
          - {id: B-4455, issuer: HOSP_B}
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from engine.configfile import ConfigError, Problem, load_document, validate
from engine.model import PatientIdentifier


class _Identifier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    issuer: str = Field(min_length=1)

    def to_identifier(self) -> PatientIdentifier:
        return PatientIdentifier(self.id, self.issuer)


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    local: _Identifier
    remote: list[_Identifier] = Field(min_length=1)


class _TableFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cross_references: list[_Entry] = Field(default_factory=list)


class CrossReferenceTable:
    """Looks up a local identifier's counterpart in another issuer's domain."""

    def __init__(self, entries: dict[PatientIdentifier, dict[str, PatientIdentifier]]) -> None:
        self._entries = entries
        self._owners = {
            remote: local for local, mapped in entries.items() for remote in mapped.values()
        }

    @classmethod
    def empty(cls) -> CrossReferenceTable:
        return cls({})

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, local: PatientIdentifier, issuer: str) -> PatientIdentifier | None:
        if local.issuer == issuer:
            return local
        return self._entries.get(local, {}).get(issuer)

    def local_for(self, remote: PatientIdentifier, local_issuer: str) -> PatientIdentifier | None:
        """Return the local patient a remote identifier belongs to, if the table says."""
        if remote.issuer == local_issuer:
            return remote
        return self._owners.get(remote)


def load_table(path: Path) -> CrossReferenceTable:
    """Load a cross-reference file. Raises ConfigError naming every conflicting entry."""
    document = load_document(path)
    parsed = validate(document, _TableFile)
    entries: dict[PatientIdentifier, dict[str, PatientIdentifier]] = {}
    owners: dict[PatientIdentifier, PatientIdentifier] = {}
    problems: list[Problem] = []

    for index, entry in enumerate(parsed.cross_references):
        local = entry.local.to_identifier()
        mapped = entries.setdefault(local, {})
        for position, item in enumerate(entry.remote):
            remote = item.to_identifier()
            where = ("cross_references", index, "remote", position)
            if remote.issuer in mapped and mapped[remote.issuer] != remote:
                problems.append(
                    document.problem(
                        where,
                        f"{local} already maps to {mapped[remote.issuer]} in {remote.issuer}",
                        "one local patient has one identifier per domain",
                    )
                )
                continue
            owner = owners.get(remote)
            if owner is not None and owner != local:
                problems.append(
                    document.problem(
                        where,
                        f"{remote} is already mapped to local patient {owner}",
                        "one remote identifier belongs to one local patient",
                    )
                )
                continue
            mapped[remote.issuer] = remote
            owners[remote] = local

    if problems:
        raise ConfigError(problems)
    return CrossReferenceTable(entries)
