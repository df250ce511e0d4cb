"""Coercion profiles: qualifiers, Other Patient IDs, Latin-1 destinations, accession numbers,
UID remapping, and the property that stamping changes only declared elements, idempotently."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from engine.coercion import (
    CoercionProfile,
    Stamp,
    StampRejected,
    UniversalEntity,
    _stamp_stream,
    stamp_dataset,
)
from engine.model import Demographics, PatientIdentifier

LOCAL = PatientIdentifier("L12345", "LOCAL")
REMOTE = PatientIdentifier("HA-1", "HOSP_A")
WHEN = dt.datetime(2026, 3, 14, 9, 30, tzinfo=dt.UTC)
ROOT = "1.2.826.0.1.3680043.10.999"


def dataset(**values: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.PatientID = REMOTE.value
    ds.IssuerOfPatientID = REMOTE.issuer
    ds.PatientName = "REMOTE^NAME"
    ds.AccessionNumber = "A-1001"
    ds.StudyDescription = "CT CHEST"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def stamp(profile: CoercionProfile, name: str = "DOE^JANE") -> Stamp:
    return Stamp(LOCAL, REMOTE, Demographics(name, "19650312", "F"), profile, WHEN)


def test_qualifiers_on_local_and_remote_ids() -> None:
    profile = CoercionProfile(
        qualifiers=(("LOCAL", UniversalEntity("1.2.3.1")), ("HOSP_A", UniversalEntity("1.2.3.2")))
    )
    ds = dataset()
    stamp_dataset(ds, stamp(profile))
    [qualifier] = ds.IssuerOfPatientIDQualifiersSequence
    assert (qualifier.UniversalEntityID, qualifier.UniversalEntityIDType) == ("1.2.3.1", "ISO")
    [other] = ds.OtherPatientIDsSequence
    assert other.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == "1.2.3.2"


def test_other_ids_kept_deduplicated_and_retired_removed() -> None:
    items = []
    for value, issuer in (("X1", "NATIONAL"), ("X1", "NATIONAL"), ("HA-1", "HOSP_A")):
        item = Dataset()
        item.PatientID = value
        item.IssuerOfPatientID = issuer
        items.append(item)
    ds = dataset(OtherPatientIDsSequence=Sequence(items), OtherPatientIDs=["OLD1", "OLD2"])
    stamp_dataset(ds, stamp(CoercionProfile()))
    assert [(i.PatientID, i.IssuerOfPatientID) for i in ds.OtherPatientIDsSequence] == [
        ("X1", "NATIONAL"),
        ("HA-1", "HOSP_A"),
    ]
    assert "OtherPatientIDs" not in ds


def test_latin1_destination_transliterates_name() -> None:
    ds = dataset()
    stamp_dataset(ds, stamp(CoercionProfile(character_set="latin1"), "ŁUKASZ^ŻÓŁW"))
    assert str(ds.PatientName) == "LUKASZ^ZÓLW"
    assert ds.SpecificCharacterSet == "ISO_IR 100"


def test_latin1_destination_keeps_alphabetic_group() -> None:
    ds = dataset()
    stamp_dataset(ds, stamp(CoercionProfile(character_set="latin1"), "Yamada^Tarou=山田^太郎"))
    assert str(ds.PatientName) == "Yamada^Tarou"
    assert "SpecificCharacterSet" not in ds


def test_latin1_destination_rejects_when_configured() -> None:
    profile = CoercionProfile(character_set="latin1", non_latin1="reject")
    with pytest.raises(StampRejected, match="patient name has characters outside Latin-1"):
        stamp_dataset(dataset(), stamp(profile, "ŁUKASZ^ŻÓŁW"))


def test_latin1_destination_converts_utf8_object() -> None:
    ds = dataset(SpecificCharacterSet="ISO_IR 192", StudyDescription="КТ ГРУДЬ")  # noqa: RUF001
    stamp_dataset(ds, stamp(CoercionProfile(character_set="latin1"), "MÜLLER^JÖRG"))
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert ds.StudyDescription == "KT GRUD'"
    assert str(ds.PatientName) == "MÜLLER^JÖRG"
    with pytest.raises(StampRejected, match="StudyDescription has characters outside Latin-1"):
        stamp_dataset(
            dataset(SpecificCharacterSet="ISO_IR 192", StudyDescription="КТ"),  # noqa: RUF001
            stamp(CoercionProfile(character_set="latin1", non_latin1="reject")),
        )


def test_accession_prefix() -> None:
    ds = dataset()
    stamp_dataset(ds, stamp(CoercionProfile(accession="prefix", site_codes=(("HOSP_A", "HA-"),))))
    assert ds.AccessionNumber == "HA-A-1001"
    [record] = ds.OriginalAttributesSequence
    assert record.ModifiedAttributesSequence[0].AccessionNumber == "A-1001"
    assert record.ReasonForTheAttributeModification == "COERCE"
    assert record.AttributeModificationDateTime == "20260314093000"
    assert record.SourceOfPreviousValues == "HOSP_A"


def test_accession_prefix_too_long_rejected() -> None:
    profile = CoercionProfile(accession="prefix", site_codes=(("HOSP_A", "HOSPITAL-A-"),))
    with pytest.raises(StampRejected, match="longer than 16 characters"):
        stamp_dataset(dataset(), stamp(profile))


def test_accession_blank_keeps_original_with_issuer() -> None:
    ds = dataset()
    stamp_dataset(ds, stamp(CoercionProfile(accession="blank", site_codes=(("HOSP_A", "HA"),))))
    assert ds.AccessionNumber == ""
    original = ds.OriginalAttributesSequence[0].ModifiedAttributesSequence[0]
    assert original.AccessionNumber == "A-1001"
    assert original.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "HA"


def test_study_uid_remap_deterministic() -> None:
    profile = CoercionProfile(study_uid="remap", uid_root=ROOT)
    first, second = dataset(), dataset()
    stamp_dataset(first, stamp(profile))
    stamp_dataset(second, stamp(profile))
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert first.StudyInstanceUID.startswith(ROOT + ".")
    assert len(first.StudyInstanceUID) <= 64
    assert profile.study_uid_for("1.2.3.4", "HOSP_A") == first.StudyInstanceUID
    assert profile.study_uid_for("1.2.3.4", "HOSP_B") != first.StudyInstanceUID
    original = first.OriginalAttributesSequence[0].ModifiedAttributesSequence[0]
    assert original.StudyInstanceUID == "1.2.3.4"


# The property: only declared elements change, and stamping twice equals stamping once.

text = st.text(
    alphabet=st.sampled_from(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ ÄÖÜÉŁŻЖ山-")), min_size=0, max_size=12
).map(str.strip)
ids = st.text(alphabet=st.sampled_from(list("ABCDEFGHJK0123456789-")), min_size=1, max_size=10)
issuers = st.sampled_from(["HOSP_A", "HOSP_B", "NATIONAL", "LOCAL"])


@st.composite
def source_files(draw: Any) -> bytes:
    charset = draw(st.sampled_from([None, "ISO_IR 100", "ISO_IR 192"]))
    ds = dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    allowed = (
        (lambda s: s.isascii())
        if charset is None
        else (
            (lambda s: all(ord(c) < 256 for c in s))
            if charset == "ISO_IR 100"
            else (lambda s: True)
        )
    )
    ds.PatientName = draw(text.filter(allowed))
    ds.StudyDescription = draw(text.filter(allowed))
    ds.SeriesDescription = draw(text.filter(allowed))
    ds.AccessionNumber = draw(ids | st.just(""))
    ds.StudyInstanceUID = draw(st.sampled_from(["1.2.3.4", "1.2.840.1.99.7", "2.25.12345"]))
    ds.PatientBirthDate = draw(st.sampled_from(["", "19700101", "20011231"]))
    ds.Modality = draw(st.sampled_from(["CT", "MR", "CR"]))
    ds.InstanceNumber = draw(st.integers(1, 500))
    if draw(st.booleans()):
        ds.OtherPatientIDs = draw(st.lists(ids, min_size=1, max_size=3))
    items = []
    for value, issuer in draw(st.lists(st.tuples(ids, issuers), max_size=4)):
        item = Dataset()
        item.PatientID = value
        item.IssuerOfPatientID = issuer
        items.append(item)
    if items:
        ds.OtherPatientIDsSequence = Sequence(items)
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 8
    ds.PixelData = bytes(draw(st.binary(min_size=16, max_size=16)))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = draw(
        st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    )
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


profiles = st.builds(
    CoercionProfile,
    qualifiers=st.sampled_from([(), (("LOCAL", UniversalEntity("1.2.3.1")),)]),
    character_set=st.sampled_from(["unicode", "latin1"]),
    non_latin1=st.just("transliterate"),
    accession=st.sampled_from(["keep", "prefix", "blank"]),
    site_codes=st.just((("HOSP_A", "X"), ("HOSP_B", "Y"))),
    study_uid=st.sampled_from(["keep", "remap"]),
    uid_root=st.just(ROOT),
)
stamps = st.builds(
    Stamp,
    local=st.builds(PatientIdentifier, ids, st.just("LOCAL")),
    remote=st.builds(PatientIdentifier, ids, st.sampled_from(["HOSP_A", "HOSP_B"])),
    demographics=st.builds(
        Demographics,
        text,
        st.sampled_from(["", "19650312"]),
        st.sampled_from(["", "F", "M", "O"]),
    ),
    profile=profiles,
    modified_at=st.just(WHEN),
)


def stamped(source: bytes, value: Stamp) -> bytes:
    writer = io.BytesIO()
    _stamp_stream(io.BytesIO(source), writer, value)
    return writer.getvalue()


def declared(profile: CoercionProfile) -> set[str]:
    names = {
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDsSequence",
        "OtherPatientIDs",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "SpecificCharacterSet",
    }
    if profile.qualifiers:
        names.add("IssuerOfPatientIDQualifiersSequence")
    if profile.accession != "keep":
        names |= {
            "AccessionNumber",
            "IssuerOfAccessionNumberSequence",
            "OriginalAttributesSequence",
        }
    if profile.study_uid == "remap":
        names |= {"StudyInstanceUID", "OriginalAttributesSequence"}
    return names


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=source_files(), value=stamps)
def test_stamping_changes_only_declared_and_is_idempotent(source: bytes, value: Stamp) -> None:
    once = stamped(source, value)
    assert stamped(once, value) == once

    before, after = dcmread(io.BytesIO(source)), dcmread(io.BytesIO(once))
    charset_changed = before.get("SpecificCharacterSet") != after.get("SpecificCharacterSet")
    allowed = declared(value.profile)
    for tag in set(before.keys()) | set(after.keys()):
        keyword = keyword_for_tag(tag)
        if keyword in allowed:
            continue
        assert tag in before and tag in after, keyword
        raw_before, raw_after = before.get_item(tag), after.get_item(tag)
        if charset_changed and dictionary_VR(tag) in ("LO", "SH", "PN", "ST", "LT", "UT", "UC"):
            # Re-encoded text: the same characters, or their Latin-1 transliteration.
            if value.profile.character_set == "unicode":
                assert before[tag].value == after[tag].value, keyword
            continue
        assert raw_before.value == raw_after.value, keyword

    assert after.PatientID == value.local.value
    assert after.PixelData == before.PixelData
    assert once.endswith(source[source.index(b"\xe0\x7f\x10\x00") :])
    others = [(i.PatientID, i.IssuerOfPatientID) for i in after.OtherPatientIDsSequence]
    assert len(others) == len(set(others))
    assert (value.remote.value, value.remote.issuer) in others
    if value.profile.character_set == "latin1":
        assert after.get("SpecificCharacterSet", "ISO_IR 6") in ("ISO_IR 6", "ISO_IR 100")


def test_local_ids_from_source_dropped() -> None:
    # The source kept a stale local ID of another patient in its Other Patient IDs.
    stale = Dataset()
    stale.PatientID = "L67890"
    stale.IssuerOfPatientID = "LOCAL"
    same = Dataset()
    same.PatientID = "L12345"
    same.IssuerOfPatientID = "LOCAL"
    ds = dataset(OtherPatientIDsSequence=Sequence([stale, same]))
    stamp_dataset(ds, stamp(CoercionProfile()))
    pairs = [(i.PatientID, i.IssuerOfPatientID) for i in ds.OtherPatientIDsSequence]
    assert ("L67890", "LOCAL") not in pairs
    # The patient's own local ID is the Patient ID, not another ID of the patient.
    assert pairs == [("HA-1", "HOSP_A")]
