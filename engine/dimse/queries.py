"""C-FIND identifiers for the prefetch path, and reading their answers."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from engine.model import Demographics, PatientIdentifier, StudyCandidate

STUDY_RETURN_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ModalitiesInStudy",
    "StudyDescription",
    "AccessionNumber",
    "NumberOfStudyRelatedInstances",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
)


@dataclasses.dataclass(frozen=True)
class FilteredAnswers:
    """Candidates read from C-FIND answers, and the answers that were set aside."""

    candidates: list[StudyCandidate]
    ignored: list[str]


# Ways to request modalities (ModalitiesInStudy) from a source: one value per C-FIND,
# several values in one C-FIND, or none (the responses are filtered here).
MODALITY_MATCHING = ("one_per_query", "list", "local")
# Ways to request a date range (StudyDate D1-D2) from a source, or none.
DATE_MATCHING = ("range", "local")


def studies_of_patient(patient: PatientIdentifier) -> Dataset:
    """Build a Study Root STUDY level query for one patient's studies."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient.value
    for keyword in STUDY_RETURN_KEYS:
        setattr(query, keyword, "")
    return query


def candidate_queries(
    patient: PatientIdentifier,
    modalities: Sequence[str] | None,
    date_from: dt.date | None,
    date_to: dt.date | None,
    modality_matching: str = "one_per_query",
    date_matching: str = "range",
) -> list[Dataset]:
    """Build the C-FIND identifiers that request a patient's candidate studies from one source.

    modalities None requests every modality, date_from and date_to None every
    date. Some PACS ignore ModalitiesInStudy or reject several values in it, and
    some ignore date ranges, so every answer is filtered again by the selection.
    """
    base = studies_of_patient(patient)
    if date_matching == "range" and (date_from or date_to):
        base.StudyDate = f"{_da(date_from)}-{_da(date_to)}"
    if not modalities or modality_matching == "local":
        return [base]
    if modality_matching == "list":
        query = copy.deepcopy(base)
        query.ModalitiesInStudy = list(modalities) if len(modalities) > 1 else modalities[0]
        return [query]
    queries = []
    for modality in modalities:
        query = copy.deepcopy(base)
        query.ModalitiesInStudy = modality
        queries.append(query)
    return queries


def describe_query(query: Dataset) -> str:
    """Return the matching keys of a study query, for logs and explain (no patient ID)."""
    parts = []
    for keyword in ("StudyDate", "ModalitiesInStudy"):
        value = query.get(keyword)
        if value in (None, ""):
            continue
        shown = "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
        parts.append(f"{keyword}={shown}")
    return ", ".join(parts) or "all studies"


def _da(value: dt.date | None) -> str:
    return value.strftime("%Y%m%d") if value else ""


def study_by_uid(study_instance_uid: str) -> Dataset:
    """Build a STUDY level query for one study, returning its instance count."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    query.NumberOfStudyRelatedInstances = ""
    return query


def move_study(study_instance_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_instance_uid
    return identifier


def read_study_answers(
    source: str, patient: PatientIdentifier, answers: list[Dataset]
) -> FilteredAnswers:
    """Turn answers into candidates, re-checking the patient on our side.

    An answer for another patient ID or another issuer is set aside: some PACS
    ignore keys they do not support and return more than was asked.
    """
    candidates: list[StudyCandidate] = []
    ignored: list[str] = []
    for answer in answers:
        uid = str(answer.get("StudyInstanceUID", "") or "")
        patient_id = str(answer.get("PatientID", "") or "")
        issuer = str(answer.get("IssuerOfPatientID", "") or "")
        if not uid:
            ignored.append("answer without Study Instance UID")
            continue
        if patient_id and patient_id != patient.value:
            ignored.append(f"study {uid}: answer for another patient ID")
            continue
        if issuer and issuer != patient.issuer:
            ignored.append(f"study {uid}: issuer '{issuer}' is not '{patient.issuer}'")
            continue
        candidates.append(
            StudyCandidate(
                source=source,
                study_instance_uid=uid,
                patient=patient,
                study_date=parse_da(str(answer.get("StudyDate", "") or "")),
                study_time=str(answer.get("StudyTime", "") or ""),
                modalities=_multi_value(answer.get("ModalitiesInStudy")),
                description=str(answer.get("StudyDescription", "") or ""),
                accession_number=str(answer.get("AccessionNumber", "") or ""),
                instance_count=_int_or_none(answer.get("NumberOfStudyRelatedInstances")),
                demographics=patient_demographics(answer),
            )
        )
    return FilteredAnswers(candidates, ignored)


def patient_demographics(answer: Dataset) -> Demographics:
    """Read the patient's name, birth date and sex from a C-FIND response."""
    return Demographics(
        name=str(answer.get("PatientName", "") or ""),
        birth_date=str(answer.get("PatientBirthDate", "") or ""),
        sex=str(answer.get("PatientSex", "") or ""),
    )


def read_instance_count(answers: list[Dataset]) -> int | None:
    """Return the instance count of a study from STUDY level answers, None if absent."""
    if not answers:
        return None
    counts = [_int_or_none(answer.get("NumberOfStudyRelatedInstances")) for answer in answers]
    known = [count for count in counts if count is not None]
    return max(known) if known else 0


def parse_da(value: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _multi_value(value: object) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(part.strip().upper() for part in value.split("\\") if part.strip())
    return tuple(str(part).strip().upper() for part in value if str(part).strip())  # type: ignore[attr-defined]


def _int_or_none(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


# Queries of the retrieval pipeline: what a study contains, series by series.


@dataclasses.dataclass(frozen=True)
class InstanceRef:
    """One instance of a study as a node's IMAGE level C-FIND returns it."""

    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


def sop_classes_of_study(study_instance_uid: str) -> Dataset:
    """Build a STUDY level query for the SOP classes and instance count of one study."""
    query = study_by_uid(study_instance_uid)
    query.SOPClassesInStudy = ""
    return query


def series_of_study(study_instance_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = ""
    query.NumberOfSeriesRelatedInstances = ""
    return query


def instances_of_series(study_instance_uid: str, series_instance_uid: str) -> Dataset:
    """Build an IMAGE level query; the higher level unique keys are set, as PS3.4 C.4.1.2.1 asks."""
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = series_instance_uid
    query.SOPInstanceUID = ""
    query.SOPClassUID = ""
    return query


def move_instances(
    study_instance_uid: str, series_instance_uid: str, sop_instance_uids: list[str]
) -> Dataset:
    """Build an IMAGE level C-MOVE or C-GET identifier for some instances of one series."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = study_instance_uid
    identifier.SeriesInstanceUID = series_instance_uid
    identifier.SOPInstanceUID = sop_instance_uids
    return identifier


def read_sop_classes(answers: list[Dataset]) -> list[str]:
    """Return the SOPClassesInStudy values of STUDY level answers, in order, without repeats."""
    classes: list[str] = []
    for answer in answers:
        value = answer.get("SOPClassesInStudy")
        for uid in _multi_value_uids(value):
            if uid not in classes:
                classes.append(uid)
    return classes


def read_series(answers: list[Dataset]) -> list[str]:
    return list(
        dict.fromkeys(
            str(answer.SeriesInstanceUID) for answer in answers if answer.get("SeriesInstanceUID")
        )
    )


def read_instances(series_instance_uid: str, answers: list[Dataset]) -> list[InstanceRef]:
    return [
        InstanceRef(
            series_instance_uid=series_instance_uid,
            sop_instance_uid=str(answer.SOPInstanceUID),
            sop_class_uid=str(answer.get("SOPClassUID", "") or ""),
        )
        for answer in answers
        if answer.get("SOPInstanceUID")
    ]


def _multi_value_uids(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split("\\") if part.strip()]
    return [str(part).strip() for part in value if str(part).strip()]  # type: ignore[attr-defined]
