"""Candidate studies written by analysts (explain --candidates, rule test cases).

JSON file format: a list of studies, or {"candidates": [...]}; each study:

    {"source": "hospital_a", "study_instance_uid": "1.2.3", "study_date": "2025-03-01",
     "modalities": ["CT"], "description": "CT CHEST", "accession_number": "A1",
     "instance_count": 120, "patient": {"value": "HA-1", "issuer": "HOSP_A"}}

Only source and study_instance_uid are required. study_date also takes
YYYYMMDD, modalities also a DICOM multi-value text (CT\\SR). Without a patient,
the study belongs to the patient's identifier at that source.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from engine.configfile import ConfigError, Document, PathKey, Problem, validate
from engine.model import PatientIdentifier, StudyCandidate


class _Patient(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str
    issuer: str


class CandidateSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1)
    study_instance_uid: str = Field(min_length=1)
    study_date: dt.date | None = None
    study_time: str = ""
    modalities: list[str] = Field(default_factory=list)
    description: str = ""
    accession_number: str = ""
    instance_count: int | None = Field(default=None, ge=0)
    patient: _Patient | None = None

    @pydantic.field_validator("study_date", mode="before")
    @classmethod
    def _date(cls, value: object) -> object:
        if isinstance(value, int | str) and len(str(value)) == 8 and str(value).isdigit():
            text = str(value)
            return f"{text[:4]}-{text[4:6]}-{text[6:]}"
        return value

    @pydantic.field_validator("modalities", mode="before")
    @classmethod
    def _modalities(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in value.split("\\") if part]
        return value

    @pydantic.field_validator("study_instance_uid", "accession_number", "study_time", mode="before")
    @classmethod
    def _text(cls, value: object) -> object:
        # A time or accession number written without quotes in YAML reads as an integer.
        # A UID such as 1.10 reads as a float and loses digits, so it must be quoted.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def to_candidate(self, patients: dict[str, PatientIdentifier]) -> StudyCandidate:
        patient = (
            PatientIdentifier(self.patient.value, self.patient.issuer)
            if self.patient is not None
            else patients.get(self.source, PatientIdentifier("", self.source))
        )
        return StudyCandidate(
            source=self.source,
            study_instance_uid=self.study_instance_uid,
            patient=patient,
            study_date=self.study_date,
            study_time=self.study_time,
            modalities=tuple(modality.upper() for modality in self.modalities),
            description=self.description,
            accession_number=self.accession_number,
            instance_count=self.instance_count,
        )


class CandidatesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: list[CandidateSchema] = Field(default_factory=list)


def read_candidates(document: Document, base: PathKey = ("candidates",)) -> list[CandidateSchema]:
    """Validate the candidate list at `base` of a document. Raises ConfigError."""
    data: Any = document.data
    for part in base[:-1]:
        data = data[part]
    wrapped = Document(document.file, {"candidates": data.get(base[-1]) or []}, {})
    try:
        return validate(wrapped, CandidatesFile).candidates
    except ConfigError as error:
        # Point the problems at the real lines of the document.
        problems = []
        for problem in error.problems:
            path = problem.path.removeprefix("candidates")
            full = (*base[:-1], base[-1])
            problems.append(
                Problem(
                    document.file,
                    _join(full) + path,
                    problem.message,
                    document.line_of(_parse_path(full, path)),
                    problem.hint,
                )
            )
        raise ConfigError(problems) from None


def load_candidates_file(path: Path) -> list[CandidateSchema]:
    """Load a JSON candidates file. Raises ConfigError naming the file and the study."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError([Problem(str(path), "", f"cannot be read: {error.strerror}")]) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError([Problem(str(path), "", f"invalid JSON: {error}")]) from None
    if isinstance(data, list):
        data = {"candidates": data}
    return read_candidates(Document(str(path), data, {}))


def _join(path: PathKey) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif text:
            text += f".{part}"
        else:
            text += str(part)
    return text


def _parse_path(base: PathKey, suffix: str) -> PathKey:
    """Turn a suffix such as [2].study_date into path keys after `base`."""
    keys: list[str | int] = list(base)
    for token in suffix.replace("[", ".[").split("."):
        if not token:
            continue
        keys.append(int(token[1:-1]) if token.startswith("[") else token)
    return tuple(keys)
