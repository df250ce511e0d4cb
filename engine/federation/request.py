"""Reading a caller's C-FIND, C-MOVE or C-GET identifier into a checked request.

A request that cannot be served raises IdentifierError, which the SCP answers
with 0xA900 (Identifier does not match SOP Class) and the reason as Error Comment.
"""

from __future__ import annotations

import copy
import dataclasses
import re

from pydicom.dataset import Dataset

from engine.federation.levels import UNIQUE_KEYS, Level, Model
from engine.federation.matching import universal_uid_keys, values_of
from engine.model import PatientIdentifier

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_WILDCARDS = ("*", "?")


class IdentifierError(Exception):
    """An identifier that does not fit the information model or the level."""

    def __init__(self, text: str, keyword: str = "") -> None:
        super().__init__(text)
        self.keyword = keyword


@dataclasses.dataclass(frozen=True)
class FindRequest:
    model: Model
    level: Level
    identifier: Dataset
    # The patient the caller asked for, in the caller's words: the local
    # domain unless IssuerOfPatientID names another one. None for a query
    # without a single, wildcard-free patient ID.
    patient: PatientIdentifier | None
    character_set: str


@dataclasses.dataclass(frozen=True)
class RetrieveRequest:
    model: Model
    level: Level
    identifier: Dataset
    patient: PatientIdentifier | None
    # The unique keys given for the retrieve level and the levels above it.
    study_uids: tuple[str, ...]
    series_uids: tuple[str, ...]
    instance_uids: tuple[str, ...]


def read_level(model: Model, identifier: Dataset) -> Level:
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not raw:
        raise IdentifierError("QueryRetrieveLevel is missing", "QueryRetrieveLevel")
    try:
        level = Level[raw]
    except KeyError:
        raise IdentifierError(
            f"QueryRetrieveLevel '{raw}' is not PATIENT, STUDY, SERIES or IMAGE",
            "QueryRetrieveLevel",
        ) from None
    if level not in model.levels:
        raise IdentifierError(f"level {raw} is not part of the {model.value} model")
    return level


def read_find(model: Model, identifier: Dataset, local_issuer: str) -> FindRequest:
    """Check a C-FIND identifier; UI keys of `*` become universal matching."""
    query = _copy(identifier)
    # Text is decoded with the caller's character set now: the site queries
    # built from these keys declare their own.
    query.decode()
    level = read_level(model, query)
    universal_uid_keys(query)
    for element in query:
        if element.VR == "UI":
            for value in values_of(element):
                if not _UID.match(value) or len(value) > 64:
                    raise IdentifierError(f"{element.keyword} is not a valid UID", element.keyword)
    charset = query.get("SpecificCharacterSet", "") or ""
    terms = [charset] if isinstance(charset, str) else list(charset)
    return FindRequest(
        model=model,
        level=level,
        identifier=query,
        patient=_patient_key(query, local_issuer),
        character_set="\\".join(term for term in terms if term),
    )


def read_retrieve(model: Model, identifier: Dataset, local_issuer: str) -> RetrieveRequest:
    """Check a C-MOVE or C-GET identifier: the unique keys of its level and the levels above."""
    query = _copy(identifier)
    level = read_level(model, query)
    patient = _patient_key(query, local_issuer)
    if model is Model.PATIENT_ROOT and patient is None:
        raise IdentifierError("PatientID must be one value without wildcards", "PatientID")

    uids: dict[Level, tuple[str, ...]] = {}
    for above in (Level.STUDY, Level.SERIES, Level.IMAGE):
        if above > level:
            break
        keyword = UNIQUE_KEYS[above]
        values = tuple(values_of(query[keyword])) if keyword in query else ()
        if not values:
            raise IdentifierError(f"{keyword} is missing", keyword)
        if above < level and len(values) != 1:
            raise IdentifierError(f"{keyword} must be one value at level {level.name}", keyword)
        for value in values:
            if not _UID.match(value) or len(value) > 64:
                raise IdentifierError(f"{keyword} is not a valid UID", keyword)
        uids[above] = values
    return RetrieveRequest(
        model=model,
        level=level,
        identifier=query,
        patient=patient,
        study_uids=uids.get(Level.STUDY, ()),
        series_uids=uids.get(Level.SERIES, ()),
        instance_uids=uids.get(Level.IMAGE, ()),
    )


def _patient_key(query: Dataset, local_issuer: str) -> PatientIdentifier | None:
    if "PatientID" not in query:
        return None
    values = values_of(query["PatientID"])
    if len(values) != 1 or any(wildcard in values[0] for wildcard in _WILDCARDS):
        return None
    issuer = str(query.get("IssuerOfPatientID", "") or "").strip()
    return PatientIdentifier(values[0], issuer or local_issuer)


def _copy(identifier: Dataset) -> Dataset:
    return copy.deepcopy(identifier)
