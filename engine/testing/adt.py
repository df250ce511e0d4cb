"""ADT messages as a HIS sends them, for the identity tests and the integration scenarios."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from engine.testing.dicomgen import PatientSpec


def _msh(control_id: str, message_type: str, when: dt.datetime) -> str:
    stamp = when.strftime("%Y%m%d%H%M%S")
    return (
        f"MSH|^~\\&|HIS|HOSPITAL|FDQR|LOCAL|{stamp}||{message_type}|{control_id}|P|2.5.1"
        "||||||UNICODE UTF-8"
    )


def _pid(patient: PatientSpec, other_identifiers: Iterable[str]) -> str:
    pid3 = "~".join([f"{patient.id}^^^{patient.issuer}^MR", *other_identifiers])
    return f"PID|1||{pid3}||{patient.name}||{patient.birth_date}|{patient.sex}"


def demographics_message(
    patient: PatientSpec,
    control_id: str,
    when: dt.datetime,
    trigger: str = "A08",
    other_identifiers: Iterable[str] = (),
) -> bytes:
    """Build an ADT^A01, A04 or A08.

    other_identifiers are further PID-3 repetitions, such as HA-1^^^HOSP_A.
    """
    segments = [
        _msh(control_id, f"ADT^{trigger}^ADT_A01", when),
        f"EVN|{trigger}|{when.strftime('%Y%m%d%H%M%S')}",
        _pid(patient, other_identifiers),
        "PV1|1|O",
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")


def merge_message(
    surviving: PatientSpec, retired_id: str, control_id: str, when: dt.datetime
) -> bytes:
    """Build an ADT^A40: the patient `retired_id` (same issuer) now lives on as `surviving`."""
    segments = [
        _msh(control_id, "ADT^A40^ADT_A39", when),
        f"EVN|A40|{when.strftime('%Y%m%d%H%M%S')}",
        _pid(surviving, ()),
        f"MRG|{retired_id}^^^{surviving.issuer}^MR",
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")
