"""Modality Worklist C-FIND: the query for scheduled steps in a time window, and reading matches."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pynetdicom.sop_class import ModalityWorklistInformationFind

from engine.dimse.scu import NodeClient
from engine.model import Demographics, patient_id_problem

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WorklistItem:
    """One scheduled procedure step read from a worklist C-FIND match."""

    step_id: str
    accession_number: str
    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    demographics: Demographics
    modality: str
    station_ae_title: str
    start: dt.datetime | None
    procedure_code: str = ""
    procedure_coding_system: str = ""
    procedure_text: str = ""
    step_description: str = ""
    body_part: str = ""

    @property
    def key(self) -> str:
        """Return the step's key at its worklist: its SPS ID and accession number.

        An SPS ID is unique only within its requested procedure, so two orders of
        one worklist may have the same one.
        """
        if self.step_id and self.accession_number:
            return f"{self.step_id}|{self.accession_number}"
        return self.step_id or self.accession_number

    @property
    def legacy_key(self) -> str:
        """Return the key that steps stored by earlier versions have: the SPS ID alone."""
        return self.step_id or self.accession_number

    def same_order(self, other: WorklistItem) -> bool:
        """Tell whether other is this step unchanged: same start, patient, study, modality
        and procedure, the facts that rules decide on."""
        return (
            self.start == other.start
            and self.patient_id == other.patient_id
            and self.issuer_of_patient_id == other.issuer_of_patient_id
            and self.accession_number == other.accession_number
            and self.study_instance_uid == other.study_instance_uid
            and self.modality == other.modality
            and self.procedure_code == other.procedure_code
            and self.procedure_coding_system == other.procedure_coding_system
            and self.procedure_text == other.procedure_text
            and self.body_part == other.body_part
        )


class MalformedItem(ValueError):
    """A worklist match that cannot become an order."""


def worklist_query(
    start: dt.datetime, end: dt.datetime, modality: str = "", station: str = ""
) -> Dataset:
    """Build a Modality Worklist query for steps scheduled between two dates.

    The date range covers whole days. The exact window is applied to the matches
    on our side, because combined date-time range matching is optional for SCPs.
    """
    query = Dataset()
    for keyword in (
        "PatientID",
        "IssuerOfPatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyInstanceUID",
        "RequestedProcedureID",
        "RequestedProcedureDescription",
    ):
        setattr(query, keyword, "")
    code = Dataset()
    code.CodeValue = ""
    code.CodingSchemeDesignator = ""
    code.CodeMeaning = ""
    query.RequestedProcedureCodeSequence = Sequence([code])

    step = Dataset()
    step.ScheduledStationAETitle = station
    step.ScheduledProcedureStepStartDate = f"{start:%Y%m%d}-{end:%Y%m%d}"
    step.ScheduledProcedureStepStartTime = ""
    step.Modality = modality
    step.ScheduledProcedureStepID = ""
    step.ScheduledProcedureStepDescription = ""
    query.ScheduledProcedureStepSequence = Sequence([step])
    return query


def find_worklist(client: NodeClient, query: Dataset) -> list[Dataset]:
    """Run one Modality Worklist C-FIND at a node and return the matches (blocking)."""
    return client.find(query, ModalityWorklistInformationFind, "worklist C-FIND")


def answer_keys(answer: Dataset) -> set[str]:
    """Return the keys a match would have as a step, read without checking the rest."""
    steps = answer.get("ScheduledProcedureStepSequence") or []
    step_id = _text(steps[0], "ScheduledProcedureStepID") if len(steps) else ""
    accession = _text(answer, "AccessionNumber")
    keys = {step_id or accession}
    if step_id and accession:
        keys.add(f"{step_id}|{accession}")
    return keys - {""}


def read_item(answer: Dataset) -> WorklistItem:
    """Read one match; raise MalformedItem when it lacks what an order needs."""
    steps = answer.get("ScheduledProcedureStepSequence") or []
    if len(steps) == 0:
        raise MalformedItem("no Scheduled Procedure Step Sequence item")
    step = steps[0]
    step_id = _text(step, "ScheduledProcedureStepID")
    accession = _text(answer, "AccessionNumber")
    if not step_id and not accession:
        raise MalformedItem("neither Scheduled Procedure Step ID nor Accession Number")
    # The step's IDs name the item in the log; the patient's values stay out of it.
    step_name = f"step {step_id or '-'}|{accession or '-'}"
    patient_id = _text(answer, "PatientID")
    if not patient_id:
        raise MalformedItem(f"{step_name}: no Patient ID")
    problem = (
        "has more than one value"
        if isinstance(answer.get("PatientID"), MultiValue)
        else patient_id_problem(patient_id)
    )
    if problem:
        raise MalformedItem(f"{step_name}: Patient ID {problem}")

    codes = answer.get("RequestedProcedureCodeSequence") or []
    code = codes[0] if len(codes) else Dataset()
    return WorklistItem(
        step_id=step_id,
        accession_number=accession,
        study_instance_uid=_text(answer, "StudyInstanceUID"),
        patient_id=patient_id,
        issuer_of_patient_id=_text(answer, "IssuerOfPatientID"),
        demographics=Demographics(
            name=_text(answer, "PatientName"),
            birth_date=_text(answer, "PatientBirthDate"),
            sex=_text(answer, "PatientSex").upper(),
        ),
        modality=_text(step, "Modality").upper(),
        station_ae_title=_text(step, "ScheduledStationAETitle"),
        start=_start_of(step),
        procedure_code=_text(code, "CodeValue"),
        procedure_coding_system=_text(code, "CodingSchemeDesignator"),
        procedure_text=_text(answer, "RequestedProcedureDescription") or _text(code, "CodeMeaning"),
        step_description=_text(step, "ScheduledProcedureStepDescription"),
        body_part=_text(answer, "BodyPartExamined") or _text(step, "BodyPartExamined"),
    )


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _start_of(step: Dataset) -> dt.datetime | None:
    date = _text(step, "ScheduledProcedureStepStartDate")
    time = _text(step, "ScheduledProcedureStepStartTime").split(".")[0].ljust(6, "0")[:6]
    try:
        return dt.datetime.strptime(date + time, "%Y%m%d%H%M%S")
    except ValueError:
        return None
