"""Stamping local identity into DICOM objects: only the declared elements change."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from engine.coercion import (
    CoercionProfile,
    Stamp,
    StampError,
    StampRejected,
    read_header,
    stamp_dataset,
    stamp_file,
)
from engine.model import Demographics, PatientIdentifier

STAMP = Stamp(
    local=PatientIdentifier("L12345", "LOCAL"),
    remote=PatientIdentifier("HA-1", "HOSP_A"),
    demographics=Demographics("DOE^JANE^M", "19650312", "F"),
)
STAMPED = {
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "OtherPatientIDs",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
}
TEST_FILES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_RLE.dcm",
    "JPEG2000.dcm",
    "image_dfl.dcm",
    "test-SR.dcm",
]


def sample(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None
    return Path(path)


def changed_elements(before: Dataset, after: Dataset) -> set[str]:
    tags = set(before.keys()) | set(after.keys())
    return {
        before[tag].keyword if tag in before else after[tag].keyword
        for tag in tags
        if tag not in before or tag not in after or before[tag].value != after[tag].value
    }


@pytest.mark.parametrize("name", TEST_FILES)
def test_stamp_file_changes_only_identity(name: str, tmp_path: Path) -> None:
    source = sample(name)
    target = tmp_path / "out.dcm"
    stamp_file(source, target, STAMP)
    before, after = dcmread(source), dcmread(target)

    assert changed_elements(before, after) <= STAMPED
    assert after.PatientID == "L12345"
    assert after.IssuerOfPatientID == "LOCAL"
    assert after.PatientName == "DOE^JANE^M"
    assert after.PatientBirthDate == "19650312"
    assert after.PatientSex == "F"
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    if "PixelData" in before:
        assert after.PixelData == before.PixelData


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_jp2klossless.dcm"])
def test_stamp_file_keeps_pixel_bytes_on_disk(name: str, tmp_path: Path) -> None:
    source = sample(name)
    target = tmp_path / "out.dcm"
    stamp_file(source, target, STAMP)
    original, stamped = source.read_bytes(), target.read_bytes()
    with open(source, "rb") as reader:
        dcmread(reader, stop_before_pixels=True)
        offset = reader.tell()
    tail = original[offset:]
    assert stamped.endswith(tail)
    assert len(tail) > 1000


def test_stamp_adds_remote_id_once_and_keeps_others(tmp_path: Path) -> None:
    source = sample("CT_small.dcm")
    existing = [
        (item.PatientID, item.get("IssuerOfPatientID"))
        for item in dcmread(source).OtherPatientIDsSequence
    ]
    once, twice = tmp_path / "once.dcm", tmp_path / "twice.dcm"
    stamp_file(source, once, STAMP)
    stamp_file(once, twice, STAMP)
    items = [
        (item.PatientID, item.get("IssuerOfPatientID"))
        for item in dcmread(twice).OtherPatientIDsSequence
    ]
    assert items == [*existing, ("HA-1", "HOSP_A")]
    assert once.read_bytes() == twice.read_bytes()


def test_stamp_from_local_domain_adds_no_other_id(tmp_path: Path) -> None:
    # The local PACS as a federated site: its objects carry the local ID already.
    local = STAMP.local
    ds = dcmread(sample("CT_small.dcm"))
    item = Dataset()
    item.PatientID, item.IssuerOfPatientID = local.value, local.issuer
    ds.OtherPatientIDsSequence = [item]
    stamp_dataset(ds, Stamp(local, local, STAMP.demographics))
    assert "OtherPatientIDsSequence" not in ds
    assert (ds.PatientID, ds.IssuerOfPatientID) == (local.value, local.issuer)


def test_source_domain_qualifiers_move_to_its_other_id(tmp_path: Path) -> None:
    # The source's qualifiers name its own domain: left on the stamped ID, they would put
    # L12345 in HOSP_A's domain.
    ds = dcmread(sample("CT_small.dcm"))
    ds.PatientID, ds.IssuerOfPatientID = "HA-1", "HOSP_A"
    qualifier = Dataset()
    qualifier.UniversalEntityID, qualifier.UniversalEntityIDType = "1.2.3.4.5.2", "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [qualifier]
    del ds.OtherPatientIDsSequence
    source = tmp_path / "source.dcm"
    ds.save_as(source)
    stamped = tmp_path / "stamped.dcm"

    stamp_file(source, stamped, STAMP)

    result = dcmread(stamped)
    assert "IssuerOfPatientIDQualifiersSequence" not in result
    [other] = result.OtherPatientIDsSequence
    assert (other.PatientID, other.IssuerOfPatientID) == ("HA-1", "HOSP_A")
    assert other.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == "1.2.3.4.5.2"


def test_stamp_switches_to_utf8_when_needed(tmp_path: Path) -> None:
    stamp = Stamp(STAMP.local, STAMP.remote, Demographics("ŁUKASZ^ŻÓŁW", "19650312", "M"))
    for name in ("MR_small.dcm", "CT_small.dcm"):
        source = sample(name)
        target = tmp_path / "out.dcm"
        stamp_file(source, target, stamp)
        before, after = dcmread(source), dcmread(target)
        assert after.SpecificCharacterSet == "ISO_IR 192"
        assert str(after.PatientName) == "ŁUKASZ^ŻÓŁW"
        # Every other text element reads the same in the new character set.
        assert changed_elements(before, after) <= STAMPED | {"SpecificCharacterSet"}


def test_stamp_keeps_latin1_when_it_fits(tmp_path: Path) -> None:
    stamp = Stamp(STAMP.local, STAMP.remote, Demographics("MÜLLER^JÖRG", "19650312", "M"))
    target = tmp_path / "out.dcm"
    stamp_file(sample("CT_small.dcm"), target, stamp)
    after = dcmread(target)
    assert after.SpecificCharacterSet == "ISO_IR 100"
    assert str(after.PatientName) == "MÜLLER^JÖRG"
    assert "MÜLLER".encode("latin-1") in target.read_bytes()


def test_stamp_keeps_object_values_missing_in_order() -> None:
    ds = Dataset()
    ds.PatientID = "HA-1"
    ds.PatientName = "REMOTE^NAME"
    ds.PatientBirthDate = "19650312"
    ds.PatientSex = "F"
    stamp_dataset(ds, Stamp(STAMP.local, STAMP.remote, Demographics("DOE^JANE", "", "")))
    assert ds.PatientName == "DOE^JANE"
    assert ds.PatientBirthDate == "19650312"
    assert ds.PatientSex == "F"


def test_stamp_file_rejects_non_dicom(tmp_path: Path) -> None:
    source = tmp_path / "junk.dcm"
    source.write_bytes(b"not a dicom file at all" * 10)
    target = tmp_path / "out.dcm"
    with pytest.raises(StampError):
        stamp_file(source, target, STAMP)
    assert not target.exists()
    assert not (tmp_path / "out.dcm.partial").exists()


def test_read_header() -> None:
    header = read_header(sample("CT_small.dcm"))
    ds = dcmread(sample("CT_small.dcm"))
    assert header.study_instance_uid == ds.StudyInstanceUID
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.patient_id == ds.PatientID


def test_same_patient_group_stamped_per_stamp(tmp_path: Path) -> None:
    """The stamped patient group is cached per study, so the stamp must be part of the key."""
    other = Stamp(
        local=PatientIdentifier("L999", "LOCAL"),
        remote=PatientIdentifier("HA-1", "HOSP_A"),
        demographics=Demographics("ROE^RICHARD", "19700101", "M"),
    )
    first, second, third = tmp_path / "1.dcm", tmp_path / "2.dcm", tmp_path / "3.dcm"

    stamp_file(sample("CT_small.dcm"), first, STAMP)
    stamp_file(sample("CT_small.dcm"), second, other)
    stamp_file(sample("CT_small.dcm"), third, STAMP)

    assert dcmread(first).PatientID == "L12345"
    assert dcmread(second).PatientID == "L999"
    assert dcmread(second).PatientName == "ROE^RICHARD"
    assert third.read_bytes() == first.read_bytes()


def test_rejection_repeated_for_each_object(tmp_path: Path) -> None:
    profile = CoercionProfile(character_set="latin1", non_latin1="reject")
    rejected = Stamp(
        local=PatientIdentifier("L1", "LOCAL"),
        remote=PatientIdentifier("HA-1", "HOSP_A"),
        demographics=Demographics("ŁUKASZ^ŻÓŁW"),
        profile=profile,
    )

    for index in range(2):
        with pytest.raises(StampRejected):
            stamp_file(sample("CT_small.dcm"), tmp_path / f"{index}.dcm", rejected)
        assert not (tmp_path / f"{index}.dcm").exists()
