"""Domain types shared by intake, rules, identity and jobs.

Every patient identifier travels with its issuer (assigning authority), as a
PatientIdentifier. Patient names and birth dates live only in Demographics,
which has no string form suitable for logs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.hl7.message import Message


# The maximum length of a DICOM LO value, such as PatientID (PS3.5 table 6.2-1).
MAX_PATIENT_ID_LENGTH = 64


def patient_id_problem(value: str) -> str | None:
    """Return why a value cannot be one DICOM PatientID, or None when it can."""
    if len(value) > MAX_PATIENT_ID_LENGTH:
        return f"is longer than {MAX_PATIENT_ID_LENGTH} characters"
    if "\\" in value:
        return "contains a backslash, which DICOM reads as a second value"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        return "contains a control character"
    return None


@dataclasses.dataclass(frozen=True)
class PatientIdentifier:
    """A patient identifier qualified by its issuer (DICOM IssuerOfPatientID, HL7 CX-4)."""

    value: str
    issuer: str

    def __str__(self) -> str:
        return f"{self.value}^^^{self.issuer}"

    def to_dict(self) -> dict[str, str]:
        return {"value": self.value, "issuer": self.issuer}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatientIdentifier:
        return cls(value=str(data["value"]), issuer=str(data["issuer"]))


@dataclasses.dataclass(frozen=True)
class Demographics:
    """Patient demographics in DICOM form: name as PN (Family^Given^Middle^Prefix^Suffix),
    birth date as DA (YYYYMMDD) and sex as CS (M, F, O or empty)."""

    name: str = ""
    birth_date: str = ""
    sex: str = ""

    def __repr__(self) -> str:
        # Keeps names and birth dates out of logs and tracebacks.
        return "Demographics(<redacted>)"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "birth_date": self.birth_date, "sex": self.sex}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Demographics:
        return cls(
            name=str(data.get("name", "")),
            birth_date=str(data.get("birth_date", "")),
            sex=str(data.get("sex", "")),
        )


@dataclasses.dataclass(frozen=True)
class OrderFacts:
    """What the order asks for, extracted once from the message."""

    placer_order_number: str = ""
    filler_order_number: str = ""
    # The namespace IDs of the order numbers (EI component 2: the placer and filler
    # applications). Order numbers are unique only within their namespace.
    placer_namespace: str = ""
    filler_namespace: str = ""
    accession_number: str = ""
    study_instance_uid: str = ""
    ordered_modality: str = ""
    procedure_code: str = ""
    procedure_coding_system: str = ""
    procedure_text: str = ""
    order_time: dt.datetime | None = None
    # When the procedure is scheduled to start (TQ1-7, OBR-27.4, OBR-36, SCH-11.4,
    # or the worklist's scheduled procedure step start).
    scheduled_time: dt.datetime | None = None
    # Body regions of the ordered procedure (anatomy table names such as CHEST).
    body_parts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        # Written field by field: dataclasses.asdict deep-copies every value, and a
        # job is written for most orders.
        return {
            "placer_order_number": self.placer_order_number,
            "filler_order_number": self.filler_order_number,
            "placer_namespace": self.placer_namespace,
            "filler_namespace": self.filler_namespace,
            "accession_number": self.accession_number,
            "study_instance_uid": self.study_instance_uid,
            "ordered_modality": self.ordered_modality,
            "procedure_code": self.procedure_code,
            "procedure_coding_system": self.procedure_coding_system,
            "procedure_text": self.procedure_text,
            "order_time": self.order_time.isoformat() if self.order_time else None,
            "scheduled_time": self.scheduled_time.isoformat() if self.scheduled_time else None,
            "body_parts": list(self.body_parts),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OrderFacts:
        values = {field.name: data.get(field.name, "") for field in dataclasses.fields(cls)}
        for name in ("order_time", "scheduled_time"):
            raw_time = data.get(name)
            values[name] = dt.datetime.fromisoformat(raw_time) if raw_time else None
        values["body_parts"] = tuple(data.get("body_parts") or ())
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class MessageOrigin:
    """Where an HL7 message came from: the MSH fields that identify it."""

    sending_application: str
    sending_facility: str
    message_type: str
    control_id: str


@dataclasses.dataclass(frozen=True)
class OrderPlaced:
    """A new order (ORM^O01 or OMI^O23 with ORC-1 NW): the event that starts prefetch.

    identifiers holds every qualified PID-3 identifier, the local one included.
    """

    origin: MessageOrigin
    patient: PatientIdentifier
    demographics: Demographics
    order: OrderFacts
    identifiers: tuple[PatientIdentifier, ...] = ()
    # The parsed HL7 message behind the order, for conditions on its fields; None
    # for orders that come from elsewhere (a Modality Worklist poller).
    message: Message | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class OrderCancelled:
    """An order withdrawn (ORC-1 CA cancel, DC discontinue)."""

    origin: MessageOrigin
    patient: PatientIdentifier
    order: OrderFacts
    order_control: str


@dataclasses.dataclass(frozen=True)
class OrderChanged:
    """An order changed (ORC-1 XO), e.g. another procedure or schedule.

    It carries the whole changed order, as OrderPlaced does.
    """

    origin: MessageOrigin
    patient: PatientIdentifier
    demographics: Demographics
    order: OrderFacts
    identifiers: tuple[PatientIdentifier, ...] = ()
    message: Message | None = dataclasses.field(default=None, repr=False, compare=False)

    def as_placed(self) -> OrderPlaced:
        """Return the changed order as a placed one, so its jobs are planned anew."""
        return OrderPlaced(
            self.origin, self.patient, self.demographics, self.order, self.identifiers, self.message
        )


@dataclasses.dataclass(frozen=True)
class OrderStatusChanged:
    """An order's status reported (ORC-1 SC); status is ORC-5."""

    origin: MessageOrigin
    patient: PatientIdentifier
    order: OrderFacts
    status: str


@dataclasses.dataclass(frozen=True)
class DemographicsUpdated:
    """A patient's demographics registered or updated (ADT^A01, A04, A08)."""

    origin: MessageOrigin
    patient: PatientIdentifier
    demographics: Demographics
    identifiers: tuple[PatientIdentifier, ...] = ()
    # The Demographics fields the message deletes: sent as the HL7 null `""`.
    deleted: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class PatientsMerged:
    """Two patient records merged (ADT^A40): `retired` (MRG-1) now lives on as `surviving`."""

    origin: MessageOrigin
    surviving: PatientIdentifier
    retired: PatientIdentifier


DomainEvent = (
    OrderPlaced
    | OrderCancelled
    | OrderChanged
    | OrderStatusChanged
    | DemographicsUpdated
    | PatientsMerged
)


@dataclasses.dataclass(frozen=True)
class StudyCandidate:
    """One study returned by a source's C-FIND at STUDY level."""

    source: str
    study_instance_uid: str
    patient: PatientIdentifier
    study_date: dt.date | None = None
    study_time: str = ""
    modalities: tuple[str, ...] = ()
    description: str = ""
    accession_number: str = ""
    instance_count: int | None = None
    # The patient attributes of the C-FIND answer, for the check before storing.
    demographics: Demographics = Demographics()

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "study_instance_uid": self.study_instance_uid,
            "patient": self.patient.to_dict(),
            "study_date": self.study_date.isoformat() if self.study_date else None,
            "study_time": self.study_time,
            "modalities": list(self.modalities),
            "description": self.description,
            "accession_number": self.accession_number,
            "instance_count": self.instance_count,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyCandidate:
        raw_date = data.get("study_date")
        count = data.get("instance_count")
        return cls(
            source=str(data["source"]),
            study_instance_uid=str(data["study_instance_uid"]),
            patient=PatientIdentifier.from_dict(data["patient"]),
            study_date=dt.date.fromisoformat(raw_date) if raw_date else None,
            study_time=str(data.get("study_time", "")),
            modalities=tuple(data.get("modalities", ())),
            description=str(data.get("description", "")),
            accession_number=str(data.get("accession_number", "")),
            instance_count=int(count) if count is not None else None,
        )


@dataclasses.dataclass(frozen=True)
class Decision:
    """Whether a candidate study was selected for retrieval, and why."""

    candidate: StudyCandidate
    selected: bool
    reason: str
