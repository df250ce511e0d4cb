"""Rows for the caller: local identifiers, requested keys, one character set, one row per entity."""

from __future__ import annotations

import io

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode, encode

from engine.federation.levels import Level, Model
from engine.federation.merging import Merger, Origin, build_row, localize
from engine.federation.request import IdentifierError, read_find, read_retrieve
from engine.model import PatientIdentifier

LOCAL = PatientIdentifier("L1", "LOCAL")
REMOTE = PatientIdentifier("HA-1", "HOSP_A")
ORIGIN = Origin("hospital_a", REMOTE, LOCAL)


def study_query(**extra: object) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = "L1"
    query.StudyInstanceUID = ""
    query.StudyDescription = ""
    query.PatientName = ""
    for keyword, value in extra.items():
        setattr(query, keyword, value)
    return query


def site_answer(**extra: object) -> Dataset:
    answer = Dataset()
    answer.PatientID = "HA-1"
    answer.IssuerOfPatientID = "HOSP_A"
    answer.StudyInstanceUID = "1.2.3"
    answer.StudyDescription = "CT HEAD"
    answer.PatientName = "DOE^JANE"
    answer.OtherPatientIDs = "SECRET-REMOTE"
    for keyword, value in extra.items():
        setattr(answer, keyword, value)
    return answer


def encoded(ds: Dataset) -> bytes:
    """Encode a dataset as pynetdicom sends it (implicit VR little endian)."""
    data = encode(ds, True, True)
    assert data is not None
    return data


def encoded_round_trip(row: Dataset) -> Dataset:
    return decode(io.BytesIO(encoded(row)), True, True)


def test_row_has_local_identity_and_requested_keys() -> None:
    query = study_query(OtherPatientIDsSequence=Sequence([Dataset()]))
    answer = site_answer()
    localize(answer, ORIGIN)
    row, replaced = build_row(query, Level.STUDY, answer, ORIGIN, "FDQR", "ISO_IR 192")
    assert replaced == 0
    assert row.PatientID == "L1"
    assert row.IssuerOfPatientID == "LOCAL"
    assert row.RetrieveAETitle == "FDQR"
    assert row.QueryRetrieveLevel == "STUDY"
    assert row.StudyDescription == "CT HEAD"
    [other] = row.OtherPatientIDsSequence
    assert (other.PatientID, other.IssuerOfPatientID) == ("HA-1", "HOSP_A")
    # Only requested keys leave: the site's own remote identifiers stay behind.
    assert "OtherPatientIDs" not in row


def test_row_missing_key_is_zero_length() -> None:
    query = study_query(AccessionNumber="")
    row, _ = build_row(query, Level.STUDY, site_answer(), ORIGIN, "FDQR", "ISO_IR 192")
    assert "AccessionNumber" in row
    assert row.AccessionNumber in ("", None)


def test_row_of_local_pacs_has_no_other_ids() -> None:
    local_origin = Origin("local_pacs", LOCAL, LOCAL)
    query = study_query(OtherPatientIDsSequence=Sequence([Dataset()]))
    row, _ = build_row(query, Level.STUDY, site_answer(PatientID="L1"), local_origin, "FDQR", "")
    assert list(row.OtherPatientIDsSequence) == []


def test_row_adds_unique_keys_of_levels_above() -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.SOPInstanceUID = ""
    answer = site_answer(SeriesInstanceUID="1.2.3.4", SOPInstanceUID="1.2.3.4.5")
    row, _ = build_row(query, Level.IMAGE, answer, ORIGIN, "FDQR", "")
    assert (row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID) == (
        "1.2.3",
        "1.2.3.4",
        "1.2.3.4.5",
    )


def latin1_answer() -> Dataset:
    """An answer as a Latin-1 site sends it: raw bytes decoded with ISO_IR 100."""
    answer = Dataset()
    answer.SpecificCharacterSet = "ISO_IR 100"
    answer.PatientID = "HA-1"
    answer.StudyInstanceUID = "1.2.3"
    answer.PatientName = "MÜLLER^JÖRG"
    answer.StudyDescription = "THORAX ÜBERSICHT"
    decoded = decode(io.BytesIO(encoded(answer)), True, True)
    assert "MÜLLER".encode("latin-1") in encoded(answer)
    decoded.decode()
    return decoded


def test_row_converted_from_latin1_to_utf8() -> None:
    row, replaced = build_row(
        study_query(), Level.STUDY, latin1_answer(), ORIGIN, "FDQR", "ISO_IR 192"
    )
    assert replaced == 0
    back = encoded_round_trip(row)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "MÜLLER^JÖRG"
    assert back.StudyDescription == "THORAX ÜBERSICHT"
    assert "MÜLLER".encode() in encoded(row)


def test_row_characters_outside_target_replaced() -> None:
    answer = site_answer(SpecificCharacterSet="ISO_IR 192", PatientName="ÉLODIE^Ζωή")
    row, replaced = build_row(study_query(), Level.STUDY, answer, ORIGIN, "FDQR", "ISO_IR 100")
    assert replaced == 3
    back = encoded_round_trip(row)
    assert str(back.PatientName) == "ÉLODIE^???"


def test_row_default_repertoire_replaces_non_ascii() -> None:
    answer = site_answer(PatientName="MÜLLER^JÖRG")
    row, replaced = build_row(study_query(), Level.STUDY, answer, ORIGIN, "FDQR", "")
    assert replaced == 2
    assert str(row.PatientName) == "M?LLER^J?RG"


def test_merger_one_row_per_study() -> None:
    merger = Merger(Level.STUDY, max_rows=10)
    other_origin = Origin("hospital_b", PatientIdentifier("HB-1", "HOSP_B"), LOCAL)
    first, _ = build_row(study_query(), Level.STUDY, site_answer(), ORIGIN, "FDQR", "")
    again, _ = build_row(study_query(), Level.STUDY, site_answer(), other_origin, "FDQR", "")
    assert merger.add(first, ORIGIN)
    assert not merger.add(again, other_origin)
    assert merger.rows == 1
    assert merger.duplicates == 1
    assert merger.sites_by_key[("1.2.3",)] == [ORIGIN, other_origin]
    assert merger.several_patients == set()


def test_merger_notes_study_held_for_two_patients() -> None:
    merger = Merger(Level.STUDY, max_rows=10)
    stranger = Origin(
        "hospital_b", PatientIdentifier("HB-7", "HOSP_B"), PatientIdentifier("L2", "LOCAL")
    )
    assert merger.add(site_answer(), ORIGIN)
    assert not merger.add(site_answer(), stranger)
    assert merger.several_patients == {("1.2.3",)}


def test_merger_patient_level_by_local_id() -> None:
    merger = Merger(Level.PATIENT, max_rows=10)
    other_origin = Origin("hospital_b", PatientIdentifier("HB-1", "HOSP_B"), LOCAL)
    assert merger.add(Dataset(), ORIGIN)
    assert not merger.add(Dataset(), other_origin)


def test_merger_drops_rows_over_limit() -> None:
    merger = Merger(Level.STUDY, max_rows=1)
    assert merger.add(site_answer(StudyInstanceUID="1.1"), ORIGIN)
    assert not merger.add(site_answer(StudyInstanceUID="1.2"), ORIGIN)
    assert merger.dropped_over_limit == 1


def test_read_find_patient_key() -> None:
    request = read_find(Model.STUDY_ROOT, study_query(), "LOCAL")
    assert request.level is Level.STUDY
    assert request.patient == PatientIdentifier("L1", "LOCAL")
    foreign = read_find(Model.STUDY_ROOT, study_query(IssuerOfPatientID="HOSP_A"), "LOCAL")
    assert foreign.patient == PatientIdentifier("L1", "HOSP_A")
    pattern = read_find(Model.STUDY_ROOT, study_query(PatientID="L*"), "LOCAL")
    assert pattern.patient is None


@pytest.mark.parametrize(
    ("model", "values", "message"),
    [
        (Model.STUDY_ROOT, {}, "QueryRetrieveLevel is missing"),
        (
            Model.STUDY_ROOT,
            {"QueryRetrieveLevel": "WARD"},
            "is not PATIENT, STUDY, SERIES or IMAGE",
        ),
        (Model.STUDY_ROOT, {"QueryRetrieveLevel": "PATIENT"}, "not part of the study root model"),
        (
            Model.STUDY_ROOT,
            {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.x"},
            "not a valid UID",
        ),
    ],
)
def test_read_find_rejects(model: Model, values: dict[str, str], message: str) -> None:
    query = Dataset()
    for keyword, value in values.items():
        setattr(query, keyword, value)
    with pytest.raises(IdentifierError, match=message):
        read_find(model, query, "LOCAL")


def retrieve_identifier(**values: object) -> Dataset:
    identifier = Dataset()
    for keyword, value in values.items():
        setattr(identifier, keyword, value)
    return identifier


def test_read_retrieve_series_level() -> None:
    request = read_retrieve(
        Model.STUDY_ROOT,
        retrieve_identifier(
            QueryRetrieveLevel="SERIES",
            StudyInstanceUID="1.2",
            SeriesInstanceUID=["1.2.1", "1.2.2"],
        ),
        "LOCAL",
    )
    assert request.study_uids == ("1.2",)
    assert request.series_uids == ("1.2.1", "1.2.2")


@pytest.mark.parametrize(
    ("model", "values", "message"),
    [
        (Model.STUDY_ROOT, {"QueryRetrieveLevel": "STUDY"}, "StudyInstanceUID is missing"),
        (
            Model.STUDY_ROOT,
            {
                "QueryRetrieveLevel": "SERIES",
                "StudyInstanceUID": ["1.1", "1.2"],
                "SeriesInstanceUID": "1.1.1",
            },
            "StudyInstanceUID must be one value",
        ),
        (
            Model.STUDY_ROOT,
            {
                "QueryRetrieveLevel": "IMAGE",
                "StudyInstanceUID": "1.1",
                "SeriesInstanceUID": "1.1.1",
            },
            "SOPInstanceUID is missing",
        ),
        (
            Model.PATIENT_ROOT,
            {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.1"},
            "PatientID",
        ),
        (Model.PATIENT_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientID": "L*"}, "PatientID"),
    ],
)
def test_read_retrieve_rejects(model: Model, values: dict[str, object], message: str) -> None:
    with pytest.raises(IdentifierError, match=message):
        read_retrieve(model, retrieve_identifier(**values), "LOCAL")


def test_read_find_decodes_caller_charset() -> None:
    query = study_query(SpecificCharacterSet="ISO_IR 192", PatientName="MÜLLER*")
    received = decode(io.BytesIO(encoded(query)), True, True)
    request = read_find(Model.STUDY_ROOT, received, "LOCAL")
    assert request.character_set == "ISO_IR 192"
    del request.identifier.SpecificCharacterSet
    assert str(request.identifier.PatientName) == "MÜLLER*"
