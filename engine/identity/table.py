"""The configured cross-reference table: (local ID, local issuer) to (remote ID, remote issuer).

File format (YAML):

    cross_references:
      - local: {id: L12345, issuer: LOCAL}
        remote:
          - {id: A-778899, issuer: HOSP_A}
          - {id: B-4455, issuer: HOSP_B}

or CSV (a file whose name ends in .csv), one remote identifier per row, with
this header line:

    local_id,local_issuer,remote_id,remote_issuer
    L12345,LOCAL,A-778899,HOSP_A
    L12345,LOCAL,B-4455,HOSP_B
"""

from __future__ import annotations

import csv
import io
from collections.abc import Collection, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from engine.configfile import ConfigError, Problem, load_document, validate
from engine.model import PatientIdentifier, patient_id_problem


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

    def canonical(self) -> str:
        """Return the entries as one text, the same for the same entries in any order."""
        return "\n".join(
            sorted(
                f"{local}\t{issuer}\t{remote}"
                for local, mapped in self._entries.items()
                for issuer, remote in mapped.items()
            )
        )

    def lookup(self, local: PatientIdentifier, issuer: str) -> PatientIdentifier | None:
        if local.issuer == issuer:
            return local
        return self._entries.get(local, {}).get(issuer)

    def local_for(self, remote: PatientIdentifier, local_issuer: str) -> PatientIdentifier | None:
        """Return the local patient a remote identifier belongs to, if the table says."""
        if remote.issuer == local_issuer:
            return remote
        return self._owners.get(remote)


CSV_COLUMNS = ("local_id", "local_issuer", "remote_id", "remote_issuer")
# A row of either format: where it is (for errors), the local and the remote identifier.
_Row = tuple[Problem, PatientIdentifier, PatientIdentifier]


def load_table(
    path: Path, local_issuer: str | None = None, known_domains: Collection[str] = ()
) -> CrossReferenceTable:
    """Load a YAML or CSV cross-reference file. Raises ConfigError naming every bad entry.

    With local_issuer, each row must map a local identifier to one in another
    domain, and with known_domains that domain must be one of them.
    """
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _yaml_rows(path)
    entries: dict[PatientIdentifier, dict[str, PatientIdentifier]] = {}
    owners: dict[PatientIdentifier, PatientIdentifier] = {}
    problems: list[Problem] = []

    for where, local, remote in rows:
        problem = _row_problem(local, remote, local_issuer, known_domains)
        if problem is not None:
            problems.append(_at(where, *problem))
            continue
        mapped = entries.setdefault(local, {})
        if remote.issuer in mapped and mapped[remote.issuer] != remote:
            problems.append(
                _at(
                    where,
                    f"{local} already maps to {mapped[remote.issuer]} in {remote.issuer}",
                    "one local patient has one identifier per domain",
                )
            )
            continue
        owner = owners.get(remote)
        if owner is not None and owner != local:
            problems.append(
                _at(
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


def _row_problem(
    local: PatientIdentifier,
    remote: PatientIdentifier,
    local_issuer: str | None,
    known_domains: Collection[str],
) -> tuple[str, str] | None:
    """Return the message and hint of a row that can never be used correctly, or None."""
    for identifier in (local, remote):
        problem = patient_id_problem(identifier.value)
        if problem is not None:
            return f"patient ID of {identifier.issuer} {problem}", "fix the ID in the table"
    if local_issuer is None:
        return None
    if local.issuer != local_issuer:
        return (
            f"local identifier {local} is not in the local domain {local_issuer}",
            "each entry maps a local identifier (local_patient.issuer) to other domains",
        )
    if remote.issuer == local_issuer:
        return (
            f"{remote} is in the local domain, not another one",
            "list the patient's identifiers in other domains",
        )
    if known_domains and remote.issuer not in known_domains:
        return (
            f"unknown domain '{remote.issuer}' of {remote}",
            "use the issuer of a node or a domain under identity.domains",
        )
    return None


def _at(where: Problem, message: str, hint: str) -> Problem:
    return Problem(where.file, where.path, message, where.line, hint)


def _yaml_rows(path: Path) -> list[_Row]:
    document = load_document(path)
    parsed = validate(document, _TableFile)
    rows: list[_Row] = []
    for index, entry in enumerate(parsed.cross_references):
        local = entry.local.to_identifier()
        for position, item in enumerate(entry.remote):
            where = document.problem(("cross_references", index, "remote", position), "")
            rows.append((where, local, item.to_identifier()))
    return rows


def _csv_rows(path: Path) -> list[_Row]:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise ConfigError([Problem(name, "", f"cannot be read: {error.strerror}")]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([Problem(name, "", f"is not UTF-8 text ({error.reason})")]) from None

    lines = _numbered_records(text)
    header = next(lines, None)
    if header is None or tuple(cell.strip() for cell in header[1]) != CSV_COLUMNS:
        found = ",".join(header[1]) if header else ""
        raise ConfigError(
            [
                Problem(
                    name,
                    "header",
                    f"invalid CSV header '{found}'",
                    header[0] if header else 1,
                    f"the first line must be {','.join(CSV_COLUMNS)}",
                )
            ]
        )

    rows: list[_Row] = []
    problems: list[Problem] = []
    for number, cells in lines:
        if not any(cell.strip() for cell in cells):
            continue
        where = Problem(name, f"row {number}", "", number)
        values = [cell.strip() for cell in cells]
        if len(values) != len(CSV_COLUMNS) or not all(values):
            problems.append(
                _at(
                    where,
                    f"invalid row '{','.join(cells)}'",
                    f"each row needs the four values {','.join(CSV_COLUMNS)}",
                )
            )
            continue
        local_id, local_issuer, remote_id, remote_issuer = values
        rows.append(
            (
                where,
                PatientIdentifier(local_id, local_issuer),
                PatientIdentifier(remote_id, remote_issuer),
            )
        )
    if problems:
        raise ConfigError(problems)
    return rows


def _numbered_records(text: str) -> Iterator[tuple[int, list[str]]]:
    """Yield each CSV record with the line it starts on."""
    reader = csv.reader(io.StringIO(text))
    start = 1
    for record in reader:
        yield start, record
        start = reader.line_num + 1
