"""Scanning encoded DICOM heads, and stamping by splicing the patient group."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from engine.coercion import (
    CoercionProfile,
    Stamp,
    UniversalEntity,
    _splice,
    _stamp_stream,
    read_header,
    stamp_file,
)
from engine.dicomfile import read_file_meta, scan_head
from engine.model import Demographics, PatientIdentifier

STAMP = Stamp(
    local=PatientIdentifier("L12345", "LOCAL"),
    remote=PatientIdentifier("HA-1", "HOSP_A"),
    demographics=Demographics("DOE^JANE^M", "19650312", "F"),
)
GROUP_LENGTHS = {0x00080000, 0x00100000, 0x00200000, 0x04000000}


def sample(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None
    return Path(path)


def full_rewrite(source: Path, stamp: Stamp) -> bytes:
    writer = io.BytesIO()
    with open(source, "rb") as reader:
        _stamp_stream(reader, writer, stamp)
    return writer.getvalue()


def spliced(source: Path, stamp: Stamp) -> bytes | None:
    head = scan_head(source)
    assert head is not None
    writer = io.BytesIO()
    with open(source, "rb") as reader:
        if not _splice(head, reader, writer, stamp):
            return None
    return writer.getvalue()


def assert_same_dataset(first: bytes, second: bytes) -> None:
    """Check that two files hold the same elements (group lengths aside)."""
    one, two = dcmread(io.BytesIO(first)), dcmread(io.BytesIO(second))
    assert one.file_meta.TransferSyntaxUID == two.file_meta.TransferSyntaxUID
    tags = (set(one.keys()) | set(two.keys())) - GROUP_LENGTHS
    for tag in sorted(tags):
        assert tag in one and tag in two, hex(tag)
        assert one[tag].value == two[tag].value, hex(tag)


@pytest.mark.parametrize(
    ("name", "scanned"),
    [
        ("CT_small.dcm", True),
        ("MR_small.dcm", True),
        ("MR_small_implicit.dcm", True),
        ("MR_small_jp2klossless.dcm", True),
        ("MR_small_RLE.dcm", True),
        ("test-SR.dcm", True),
        ("rtplan.dcm", True),
        ("MR_small_bigendian.dcm", False),
        ("image_dfl.dcm", False),
    ],
)
def test_scan_head_reads_identifiers(name: str, scanned: bool) -> None:
    head = scan_head(sample(name))
    assert (head is not None) == scanned
    ds = dcmread(sample(name), stop_before_pixels=True)
    header = read_header(sample(name))
    assert header.study_instance_uid == ds.StudyInstanceUID
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.patient_id == str(ds.get("PatientID", ""))


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_jp2klossless.dcm",
        "rtplan.dcm",
    ],
)
def test_splice_matches_full_rewrite(name: str) -> None:
    splice = spliced(sample(name), STAMP)
    assert splice is not None
    assert_same_dataset(splice, full_rewrite(sample(name), STAMP))
    # The file meta information is kept byte for byte.
    head = scan_head(sample(name))
    assert head is not None
    assert splice[: head.meta_end] == sample(name).read_bytes()[: head.meta_end]


def test_splice_declines_new_character_set() -> None:
    stamp = Stamp(STAMP.local, STAMP.remote, Demographics("ŁUKASZ^ŻÓŁW", "", ""))
    assert spliced(sample("CT_small.dcm"), stamp) is None


@pytest.mark.parametrize(
    "profile",
    [
        CoercionProfile(accession="prefix"),
        CoercionProfile(study_uid="remap", uid_root="1.2.3"),
        CoercionProfile(character_set="latin1"),
    ],
)
def test_splice_declines_profiles_beyond_patient_group(profile: CoercionProfile) -> None:
    stamp = Stamp(STAMP.local, STAMP.remote, STAMP.demographics, profile)
    assert spliced(sample("CT_small.dcm"), stamp) is None


def test_stamp_file_falls_back_for_big_endian(tmp_path: Path) -> None:
    target = tmp_path / "out.dcm"
    stamp_file(sample("MR_small_bigendian.dcm"), target, STAMP)
    assert dcmread(target).PatientID == "L12345"


def test_scan_head_reads_past_first_chunk(tmp_path: Path) -> None:
    ds = dcmread(sample("CT_small.dcm"))
    # A large element before group 0020 pushes the scan past the first read.
    ds.add_new(0x00091001, "LO", "private creator")
    ds.add_new(0x00091010, "OB", b"\x00" * (400 * 1024))
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    head = scan_head(path)
    assert head is not None
    assert head.text(0x0020000D) == ds.StudyInstanceUID
    splice = spliced(path, STAMP)
    assert splice is not None
    assert_same_dataset(splice, full_rewrite(path, STAMP))


@st.composite
def source_files(draw: Any) -> bytes:
    ds = Dataset()
    charset = draw(st.sampled_from([None, "ISO_IR 100", "ISO_IR 192"]))
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyDescription = draw(st.sampled_from(["CT CHEST", "", "MR"]))
    if draw(st.booleans()):
        # An undefined length sequence before the patient group, with nested items.
        inner = Dataset()
        inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        inner.ReferencedSOPInstanceUID = "1.2.3.9"
        outer = Dataset()
        outer.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        outer.ReferencedSOPInstanceUID = "1.2.3.8"
        outer.ReferencedImageSequence = Sequence([inner])
        ds.ReferencedStudySequence = Sequence([outer, Dataset()])
        ds["ReferencedStudySequence"].is_undefined_length = draw(st.booleans())
    ds.PatientName = draw(
        st.sampled_from(["REMOTE^PAT", "", "MÜLLER^A"]) if charset else st.just("X^Y")
    )
    ds.PatientID = "HA-1"
    if draw(st.booleans()):
        ds.IssuerOfPatientID = "HOSP_A"
    if draw(st.booleans()):
        ds.OtherPatientIDs = ["OLD1", "OLD2"]
    if draw(st.booleans()):
        item = Dataset()
        item.PatientID = draw(st.sampled_from(["HA-1", "NAT-9"]))
        item.IssuerOfPatientID = draw(st.sampled_from(["HOSP_A", "NATIONAL"]))
        ds.OtherPatientIDsSequence = Sequence([item])
    ds.PatientBirthDate = draw(st.sampled_from(["", "19650312"]))
    ds.PatientComments = draw(st.sampled_from(["", "kept as it is"]))
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.1"
    ds.InstanceNumber = 7
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 8
    ds.PixelData = draw(st.binary(min_size=4, max_size=4))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = draw(
        st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    )
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


stamps = st.builds(
    Stamp,
    local=st.builds(PatientIdentifier, st.sampled_from(["L1", "L12345"]), st.just("LOCAL")),
    remote=st.builds(PatientIdentifier, st.sampled_from(["HA-1", "HA-2"]), st.just("HOSP_A")),
    demographics=st.builds(
        Demographics,
        st.sampled_from(["", "DOE^JANE", "MÜLLER^JÖRG"]),
        st.sampled_from(["", "19650312"]),
        st.sampled_from(["", "F"]),
    ),
    profile=st.builds(
        CoercionProfile,
        qualifiers=st.sampled_from([(), (("LOCAL", UniversalEntity("1.2.3.1")),)]),
    ),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(source=source_files(), stamp=stamps)
def test_splice_equals_full_rewrite(
    tmp_path_factory: pytest.TempPathFactory, source: bytes, stamp: Stamp
) -> None:
    path = tmp_path_factory.mktemp("splice") / "source.dcm"
    path.write_bytes(source)
    full = full_rewrite(path, stamp)
    splice = spliced(path, stamp)
    if splice is None:
        # Only a switch of character set is left to the full rewrite here.
        assert dcmread(io.BytesIO(full)).get("SpecificCharacterSet") != dcmread(path).get(
            "SpecificCharacterSet"
        )
        return
    assert_same_dataset(splice, full)
    assert splice.endswith(source[source.index(b"\xe0\x7f\x10\x00") :])


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm"])
def test_file_meta_read_like_pydicom(name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    ds = dcmread(path, stop_before_pixels=True)

    meta = read_file_meta(Path(path))

    assert meta is not None
    assert meta.sop_class_uid == ds.file_meta.MediaStorageSOPClassUID
    assert meta.sop_instance_uid == ds.file_meta.MediaStorageSOPInstanceUID
    assert meta.transfer_syntax == ds.file_meta.TransferSyntaxUID
    # Preamble, "DICM", the group length element (12 bytes), then the group it counts.
    assert meta.dataset_start == 132 + 12 + ds.file_meta.FileMetaInformationGroupLength


def test_file_meta_of_non_dicom_is_none(tmp_path: Path) -> None:
    text = tmp_path / "note.txt"
    text.write_bytes(b"not a DICOM file" * 20)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\x40\x00" + b"1.2")

    assert read_file_meta(text) is None
    assert read_file_meta(truncated) is None
