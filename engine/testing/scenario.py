"""The prefetch scenario shared by the demo and the integration tests.

One patient treated at two hospitals, with priors of several modalities,
dates and body parts, and the traps a real network has: another patient at
the same site, a different patient with the same ID string at the other
site, a study held by both sites, and a prior the local PACS already has.
Dates are relative to `today`, so the rules select the same studies on any day.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable

from engine.testing.dicomgen import PatientSpec, SeriesSpec, StudySpec, years_before

LOCAL_ISSUER = "LOCAL"


@dataclasses.dataclass(frozen=True)
class Placement:
    """A study held by a site, filed there under that site's patient."""

    site: str
    patient: PatientSpec
    study: StudySpec


@dataclasses.dataclass(frozen=True)
class Scenario:
    today: dt.date
    local_patient: PatientSpec
    placements: tuple[Placement, ...]
    # What a CT order for the local patient must do with the shipped ct-priors rule.
    expected_moved: tuple[str, ...]
    expected_present: tuple[str, ...]
    # Keys of studies that must never reach the destination through this order.
    must_not_move: tuple[str, ...]

    def study(self, key: str) -> StudySpec:
        for placement in self.placements:
            if placement.study.key == key:
                return placement.study
        raise KeyError(key)

    def at(self, site: str) -> list[Placement]:
        return [placement for placement in self.placements if placement.site == site]

    def remote_patient_of(self, key: str) -> PatientSpec:
        for placement in self.placements:
            if placement.study.key == key and placement.site != "local_pacs":
                return placement.patient
        raise KeyError(key)


def _ct(count: int, description: str, body_part: str) -> SeriesSpec:
    return SeriesSpec("CT_small.dcm", count, "CT", description, body_part)


def prefetch_scenario(today: dt.date) -> Scenario:
    local = PatientSpec("L12345", LOCAL_ISSUER, "DOE^JANE^M", "19650312", "F")
    at_a = PatientSpec("HA-778899", "HOSP_A", "DOE^JANE", "19650312", "F")
    at_b = PatientSpec("HB-4455", "HOSP_B", "DOE^JANE^MARIE", "19650312", "F")
    other_at_a = PatientSpec("HA-990011", "HOSP_A", "ROE^RICHARD", "19580101", "M")
    # A different person at hospital B whose ID happens to equal our patient's ID at A.
    namesake_at_b = PatientSpec("HA-778899", "HOSP_B", "POE^EDGAR", "19700505", "M")

    def ago(years: float) -> dt.date:
        return years_before(today, years)

    ct_chest = StudySpec(
        "a-ct-chest-1y",
        ago(1),
        "CT CHEST WITH CONTRAST",
        "HA-ACC-1001",
        (_ct(60, "AXIAL 2.5MM", "CHEST"), _ct(40, "CORONAL MPR", "CHEST")),
    )
    mr_brain = StudySpec(
        "a-mr-brain-2y",
        ago(2),
        "MR BRAIN",
        "HA-ACC-0877",
        (
            SeriesSpec("MR_small.dcm", 20, "MR", "T1 AXIAL", "HEAD"),
            SeriesSpec("MR_small_jp2klossless.dcm", 20, "MR", "T2 AXIAL J2K", "HEAD"),
        ),
    )
    cr_chest = StudySpec(
        "a-cr-chest-6m",
        ago(0.5),
        "CHEST PA AND LATERAL",
        "HA-ACC-1104",
        (SeriesSpec("CT_small.dcm", 2, "CR", "PA LAT", "CHEST"),),
    )
    ct_abdomen_old = StudySpec(
        "a-ct-abdomen-7y",
        ago(7),
        "CT ABDOMEN",
        "HA-ACC-0102",
        (_ct(30, "AXIAL 5MM", "ABDOMEN"),),
    )
    ct_head = StudySpec(
        "b-ct-head-3y",
        ago(3),
        "CT HEAD WITHOUT CONTRAST",
        "HB-ACC-5531",
        (_ct(50, "AXIAL 5MM", "HEAD"),),
    )
    mr_knee = StudySpec(
        "b-mr-knee-4y",
        ago(4),
        "MR KNEE LEFT",
        "HB-ACC-5210",
        (SeriesSpec("MR_small_RLE.dcm", 12, "MR", "PD SAG RLE", "KNEE"),),
    )
    ct_neck = StudySpec(
        "b-ct-neck-4y6m",
        ago(4.5),
        "CT NECK",
        "HB-ACC-5101",
        (_ct(20, "AXIAL 3MM", "NECK"),),
    )
    other_patient_ct = StudySpec(
        "a-other-patient-ct",
        ago(1),
        "CT CHEST",
        "HA-ACC-1002",
        (_ct(30, "AXIAL 2.5MM", "CHEST"),),
    )
    namesake_ct = StudySpec(
        "b-namesake-ct",
        ago(1),
        "CT CHEST",
        "HB-ACC-5600",
        (_ct(20, "AXIAL 2.5MM", "CHEST"),),
    )

    placements = (
        Placement("hospital_a", at_a, ct_chest),
        Placement("hospital_a", at_a, mr_brain),
        Placement("hospital_a", at_a, cr_chest),
        Placement("hospital_a", at_a, ct_abdomen_old),
        Placement("hospital_a", other_at_a, other_patient_ct),
        Placement("hospital_b", at_b, ct_head),
        Placement("hospital_b", at_b, mr_knee),
        Placement("hospital_b", at_b, ct_neck),
        # Hospital B received a copy of A's chest CT, same UIDs, filed under B's ID.
        Placement("hospital_b", at_b, ct_chest),
        Placement("hospital_b", namesake_at_b, namesake_ct),
        # The local PACS already holds the knee MR under the local ID.
        Placement("local_pacs", local, mr_knee),
    )
    return Scenario(
        today=today,
        local_patient=local,
        placements=placements,
        expected_moved=(ct_chest.key, mr_brain.key, ct_head.key),
        expected_present=(mr_knee.key,),
        must_not_move=(
            cr_chest.key,
            ct_abdomen_old.key,
            ct_neck.key,
            other_patient_ct.key,
            namesake_ct.key,
        ),
    )


def order_message(
    patient: PatientSpec,
    control_id: str,
    accession: str,
    when: dt.datetime,
    modality: str = "CT",
    procedure: tuple[str, str] = ("CTCHEST", "CT Chest"),
    sending_application: str = "RIS",
    order_control: str = "NW",
    extra_identifiers: Iterable[str] = ("998877^^^NATIONAL^NI",),
) -> bytes:
    """Build an ORM^O01 for one procedure, as a RIS would send it."""
    stamp = when.strftime("%Y%m%d%H%M%S")
    pid3 = "~".join([f"{patient.id}^^^{patient.issuer}^MR", *extra_identifiers])
    obr = [""] * 25
    obr[0] = "OBR"
    obr[1] = "1"
    obr[2] = f"PLC-{control_id}"
    obr[3] = f"FIL-{control_id}"
    obr[4] = f"{procedure[0]}^{procedure[1]}^LOCAL"
    obr[7] = stamp
    obr[18] = accession
    obr[24] = modality
    segments = [
        f"MSH|^~\\&|{sending_application}|RADIOLOGY|FDQR|LOCAL|{stamp}||ORM^O01|{control_id}|P|2.5.1"
        "||||||UNICODE UTF-8",
        f"PID|1||{pid3}||{patient.name}||{patient.birth_date}|{patient.sex}",
        "PV1|1|O",
        f"ORC|{order_control}|PLC-{control_id}|FIL-{control_id}||SC||||{stamp}",
        "|".join(obr),
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")
