"""Stamping local patient identity into DICOM objects received from another domain.

Only the elements a destination's coercion profile declares change:

- PatientID and IssuerOfPatientID become the local values, with an Issuer of
  Patient ID Qualifiers Sequence (Universal Entity ID and Type) when the
  profile has qualifiers for the issuer;
- the source's (ID, issuer) is added to Other Patient IDs Sequence, existing
  items are kept and exact duplicates dropped; the retired Other Patient IDs
  (0010,1000) is removed;
- PatientName, PatientBirthDate and PatientSex come from the local record (a
  value empty there keeps the object's), with Specific Character Set set to
  match: ISO_IR 192 when needed, or Latin-1 only for a destination that
  accepts nothing else, transliterating or rejecting what does not fit;
- AccessionNumber is kept, prefixed with the source's site code, or blanked;
  StudyInstanceUID is kept or remapped to a UID derived from it. A changed
  value is recorded in the Original Attributes Sequence, which also keeps
  stamping idempotent.

Pixel data is never decoded: for a file, the header up to the pixel data
element is rewritten and the rest of the file is copied byte for byte.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import os
import shutil
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, Literal

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import dcmwrite, write_data_element
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian

from engine.coercion_text import (
    UTF8_CHARSET,
    TextRejected,
    charset_terms,
    convert_to_latin1,
    latin1_person_name,
    switch_to_utf8_for,
)
from engine.dicomfile import Head, scan_head
from engine.model import Demographics, PatientIdentifier

__all__ = ["UTF8_CHARSET", "CoercionProfile", "Header", "Stamp", "StampError", "UniversalEntity"]

# The three pixel data tags, as they appear on disk in little and big endian.
_PIXEL_TAGS = {
    bytes.fromhex(text)
    for text in ("e07f1000", "7fe00010", "e07f0800", "7fe00008", "e07f0900", "7fe00009")
}
_COPY_CHUNK = 1024 * 1024
# AccessionNumber is SH: at most 16 characters.
MAX_ACCESSION_LENGTH = 16
MAX_UID_LENGTH = 64
# Defined term of Reason for the Attribute Modification (0400,0565).
COERCE = "COERCE"
OTHER_PATIENT_IDS = 0x00101000
SPECIFIC_CHARACTER_SET = 0x00080005
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
PATIENT_BIRTH_DATE = 0x00100030
PATIENT_SEX = 0x00100040
STUDY_INSTANCE_UID = 0x0020000D
PATIENT_GROUP = 0x0010


class StampError(Exception):
    """An object that cannot be stamped safely; it must not be stored."""


class StampRejected(StampError):
    """An object the destination's profile does not allow, e.g. text outside Latin-1."""


@dataclasses.dataclass(frozen=True)
class UniversalEntity:
    """Universal Entity ID (e.g. an OID) and Universal Entity ID Type (ISO, DNS, UUID ...)."""

    id: str
    type: str = "ISO"


@dataclasses.dataclass(frozen=True)
class CoercionProfile:
    """How objects are stamped for one destination; the defaults change the least.

    qualifiers and site_codes are (issuer, value) pairs. site codes prefix
    accession numbers (accession prefix) and name the issuer of the original
    accession number (accession blank); an issuer without one uses its own name.
    """

    name: str = "default"
    qualifiers: tuple[tuple[str, UniversalEntity], ...] = ()
    character_set: Literal["unicode", "latin1"] = "unicode"
    non_latin1: Literal["transliterate", "reject"] = "transliterate"
    accession: Literal["keep", "prefix", "blank"] = "keep"
    site_codes: tuple[tuple[str, str], ...] = ()
    study_uid: Literal["keep", "remap"] = "keep"
    uid_root: str = ""
    modifying_system: str = "FDQR"

    def qualifier(self, issuer: str) -> UniversalEntity | None:
        return dict(self.qualifiers).get(issuer)

    def site_code(self, issuer: str) -> str:
        return dict(self.site_codes).get(issuer, issuer)

    def study_uid_for(self, study_instance_uid: str, source_issuer: str) -> str:
        """Return the Study Instance UID an object of this study gets at the destination."""
        if self.study_uid == "keep" or study_instance_uid.startswith(self.uid_root + "."):
            return study_instance_uid
        digest = hashlib.sha256(f"{source_issuer}|{study_instance_uid}".encode()).digest()
        suffix = str(int.from_bytes(digest[:16], "big"))
        return f"{self.uid_root}.{suffix}"[:MAX_UID_LENGTH]


DEFAULT_PROFILE = CoercionProfile()


@dataclasses.dataclass(frozen=True)
class Stamp:
    """What to write into each object: the local identity, where the object came from, and
    the destination's profile. modified_at is the Attribute Modification DateTime recorded
    for changed accession numbers and UIDs (the time of stamping when None)."""

    local: PatientIdentifier
    remote: PatientIdentifier
    demographics: Demographics
    profile: CoercionProfile = DEFAULT_PROFILE
    modified_at: dt.datetime | None = None


@dataclasses.dataclass(frozen=True)
class Header:
    """The identifying attributes of a received object, read before stamping."""

    study_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_birth_date: str = ""
    patient_sex: str = ""


QUALIFIERS = 0x00100024  # Issuer of Patient ID Qualifiers Sequence


def stamp_dataset(ds: Dataset, stamp: Stamp) -> None:
    """Set the local identity on a dataset in place; pixel data is not touched.

    Raises StampRejected when the profile does not allow the result.
    """
    profile = stamp.profile
    name = _fit_character_set(ds, stamp)

    # The source's qualifiers name the source's domain: they go with its ID among the others.
    source_qualifiers = ds.get(QUALIFIERS)
    ds.PatientID = stamp.local.value
    ds.IssuerOfPatientID = stamp.local.issuer
    _set_qualifiers(ds, profile.qualifier(stamp.local.issuer))
    _add_other_patient_id(
        ds,
        stamp.remote,
        profile.qualifier(stamp.remote.issuer),
        stamp.local,
        source_qualifiers.value if source_qualifiers is not None else None,
    )
    if OTHER_PATIENT_IDS in ds:
        del ds[OTHER_PATIENT_IDS]

    demographics = stamp.demographics
    if name:
        ds.PatientName = name
    if demographics.birth_date:
        ds.PatientBirthDate = demographics.birth_date
    if demographics.sex:
        ds.PatientSex = demographics.sex

    _coerce_study(ds, stamp)

    # A group length would be wrong after the change; it is retired outside group 0002.
    for group in (0x0008, 0x0010, 0x0020, 0x0400):
        if (group << 16) in ds:
            del ds[group << 16]


def _fit_character_set(ds: Dataset, stamp: Stamp) -> str:
    """Make the dataset's character set hold the stamped text; return the name to write."""
    name = stamp.demographics.name
    if stamp.profile.character_set == "unicode":
        switch_to_utf8_for(ds, [name])
        return name
    reject = stamp.profile.non_latin1 == "reject"
    try:
        if name:
            name = latin1_person_name(name, reject)
        convert_to_latin1(ds, reject)
    except TextRejected as error:
        raise StampRejected(f"destination accepts only Latin-1: {error}") from None
    if not name.isascii() and charset_terms(ds) == ["ISO_IR 6"]:
        ds.SpecificCharacterSet = "ISO_IR 100"
    return name


def _set_qualifiers(ds: Dataset, entity: UniversalEntity | None) -> None:
    """Set the Issuer of Patient ID Qualifiers to entity, or remove them when it is None.

    Left in place, another domain's qualifiers would put the ID in that domain.
    """
    if entity is None:
        if QUALIFIERS in ds:
            del ds[QUALIFIERS]
        return
    item = Dataset()
    item.UniversalEntityID = entity.id
    item.UniversalEntityIDType = entity.type
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([item])


def _add_other_patient_id(
    ds: Dataset,
    identifier: PatientIdentifier,
    entity: UniversalEntity | None,
    local: PatientIdentifier,
    source_qualifiers: Sequence | None = None,
) -> None:
    seen: set[tuple[object, object]] = set()
    items = Sequence()
    for existing in ds.get("OtherPatientIDsSequence") or []:
        key = (existing.get("PatientID"), existing.get("IssuerOfPatientID"))
        if key[1] == local.issuer:
            # Another local patient's ID: an archive that links patients by their other
            # IDs would join this object to that patient. The patient's own local ID is
            # the Patient ID itself, not another one.
            continue
        if key not in seen:
            seen.add(key)
            items.append(existing)
    # An object from the local domain (e.g. the local PACS as a federated site) carries
    # the local ID already; it is not another ID of the patient.
    if identifier.issuer != local.issuer and (identifier.value, identifier.issuer) not in seen:
        item = Dataset()
        item.PatientID = identifier.value
        item.IssuerOfPatientID = identifier.issuer
        item.TypeOfPatientID = "TEXT"
        if entity is not None:
            _set_qualifiers(item, entity)
        elif source_qualifiers:
            item.IssuerOfPatientIDQualifiersSequence = source_qualifiers
        items.append(item)
    if items:
        ds.OtherPatientIDsSequence = items
    elif "OtherPatientIDsSequence" in ds:
        del ds.OtherPatientIDsSequence


def _coerce_study(ds: Dataset, stamp: Stamp) -> None:
    """Apply the accession number and Study Instance UID rules, recording original values."""
    profile = stamp.profile
    original = Dataset()

    accession = str(ds.get("AccessionNumber", "") or "")
    if (
        profile.accession != "keep"
        and accession
        and not _already_modified(ds, profile, "AccessionNumber")
    ):
        original.AccessionNumber = accession
        issuer = ds.get("IssuerOfAccessionNumberSequence")
        if issuer is not None:
            original.IssuerOfAccessionNumberSequence = issuer
        if profile.accession == "prefix":
            prefixed = profile.site_code(stamp.remote.issuer) + accession
            if len(prefixed) > MAX_ACCESSION_LENGTH:
                raise StampRejected(
                    f"prefixed accession number '{prefixed}' is longer than"
                    f" {MAX_ACCESSION_LENGTH} characters"
                )
            ds.AccessionNumber = prefixed
        else:
            ds.AccessionNumber = ""
            if issuer is None:
                item = Dataset()
                item.LocalNamespaceEntityID = profile.site_code(stamp.remote.issuer)
                original.IssuerOfAccessionNumberSequence = Sequence([item])
            if "IssuerOfAccessionNumberSequence" in ds:
                del ds.IssuerOfAccessionNumberSequence

    uid = str(ds.get("StudyInstanceUID", "") or "")
    remapped = profile.study_uid_for(uid, stamp.remote.issuer) if uid else uid
    if remapped != uid:
        original.StudyInstanceUID = uid
        ds.StudyInstanceUID = remapped

    if len(original):
        _record_original(ds, original, stamp)


def _already_modified(ds: Dataset, profile: CoercionProfile, keyword: str) -> bool:
    for item in ds.get("OriginalAttributesSequence") or []:
        if item.get("ModifyingSystem") != profile.modifying_system:
            continue
        for modified in item.get("ModifiedAttributesSequence") or []:
            if keyword in modified:
                return True
    return False


def _record_original(ds: Dataset, original: Dataset, stamp: Stamp) -> None:
    when = stamp.modified_at or dt.datetime.now(dt.UTC)
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([original])
    item.AttributeModificationDateTime = when.strftime("%Y%m%d%H%M%S")
    item.ModifyingSystem = stamp.profile.modifying_system
    item.SourceOfPreviousValues = stamp.remote.issuer
    item.ReasonForTheAttributeModification = COERCE
    items = ds.get("OriginalAttributesSequence") or Sequence()
    items.append(item)
    ds.OriginalAttributesSequence = items


def header_of(head: Head) -> Header:
    """Return the identifying attributes of a scanned file head."""
    return Header(
        study_instance_uid=head.text(STUDY_INSTANCE_UID),
        sop_instance_uid=head.text(SOP_INSTANCE_UID),
        sop_class_uid=head.text(SOP_CLASS_UID),
        patient_id=head.text(PATIENT_ID),
        issuer_of_patient_id=head.text(ISSUER_OF_PATIENT_ID),
        patient_birth_date=head.text(PATIENT_BIRTH_DATE),
        patient_sex=head.text(PATIENT_SEX),
    )


def read_header(source: Path | bytes) -> Header:
    """Read the identifying attributes of a DICOM file (or one in memory) without pixel data."""
    try:
        head = scan_head(source)
        if head is not None:
            return header_of(head)
    except OSError as error:
        raise StampError(f"not a readable DICOM file: {error}") from error
    try:
        ds = dcmread(
            BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=True
        )
    except Exception as error:
        raise StampError(f"not a readable DICOM file: {error}") from error
    return Header(
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        patient_id=str(ds.get("PatientID", "")),
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "")),
        patient_birth_date=str(ds.get("PatientBirthDate", "")),
        patient_sex=str(ds.get("PatientSex", "")),
    )


def stamp_file(
    source: Path | bytes,
    target: Path,
    stamp: Stamp,
    fsync: bool = True,
    head: Head | None = None,
) -> None:
    """Write a stamped copy of `source` (a file, or a whole file in memory) to `target`.

    The copy is written next to `target` and renamed into place, after an
    fsync when asked, so a crash never leaves a partial file under that name.
    head is the scanned head of `source` when the caller already has it.
    """
    partial = target.with_name(target.name + ".partial")
    try:
        head = head or scan_head(source)
        opened = BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
        with opened as reader, open(partial, "wb") as writer:
            if head is None or not _splice(head, reader, writer, stamp):
                reader.seek(0)
                _stamp_stream(reader, writer, stamp)
            writer.flush()
            if fsync:
                os.fsync(writer.fileno())
        os.replace(partial, target)
    except StampError:
        partial.unlink(missing_ok=True)
        raise
    except Exception as error:
        partial.unlink(missing_ok=True)
        raise StampError(f"stamping failed: {error}") from error


def _splice(head: Head, reader: BinaryIO, writer: BinaryIO, stamp: Stamp) -> bool:
    """Stamp by re-encoding only the patient group (0010) and copying every other byte.

    Returns False, having written nothing, when the stamp needs more than that
    (a profile that changes accession numbers or UIDs, or a new character set).
    """
    profile = stamp.profile
    if profile.character_set != "unicode" or profile.accession != "keep":
        return False
    if profile.study_uid != "keep":
        return False

    charset = head.span(SPECIFIC_CHARACTER_SET)
    patient = [span for span in head.spans if span.group == PATIENT_GROUP]
    encoded = b"".join(head.data[span.start : span.end] for span in [charset, *patient] if span)
    group = _stamped_patient_group(encoded, head.implicit_vr, stamp)
    if group is None:
        return False

    writer.write(head.data[: head.meta_end])
    written = False
    for span in head.spans:
        if span.group >= PATIENT_GROUP and not written:
            writer.write(group)
            written = True
        if span.group != PATIENT_GROUP:
            writer.write(head.data[span.start : span.end])
    if not written:
        writer.write(group)
    # For a file in memory, head.data is all of it and nothing is left to copy.
    writer.write(memoryview(head.data)[head.rest :])
    _copy_rest(reader, writer, len(head.data))
    return True


@functools.lru_cache(maxsize=64)
def _stamped_patient_group(encoded: bytes, implicit_vr: bool, stamp: Stamp) -> bytes | None:
    """Stamp an encoded patient group (with the character set before it) and encode it again.

    Return None when the stamp changes more than that group. The objects of
    a study carry the same patient group byte for byte, so the cache decodes
    it once per study. A StampRejected is raised again for each object.
    """
    small = read_dataset(BytesIO(encoded), implicit_vr, True)
    charset_before = small.get("SpecificCharacterSet")
    stamp_dataset(small, stamp)
    if small.get("SpecificCharacterSet") != charset_before:
        return None
    others = [tag for tag in small.keys() if tag != SPECIFIC_CHARACTER_SET]  # noqa: SIM118
    if any(tag >> 16 != PATIENT_GROUP for tag in others):
        return None
    return _encode_patient_group(small, implicit_vr)


def _copy_rest(reader: BinaryIO, writer: BinaryIO, offset: int) -> None:
    """Copy the reader's bytes from `offset` on to the end of the writer.

    The kernel copies them (copy_file_range) where it can, and the GIL is
    released for the whole copy; otherwise they pass through a buffer.
    """
    writer.flush()
    try:
        source, target = reader.fileno(), writer.fileno()
        while True:
            copied = os.copy_file_range(source, target, _COPY_CHUNK, offset)
            if copied == 0:
                return
            offset += copied
    except OSError:
        # Not supported here (an old kernel, some file systems, a file in memory):
        # copy what is left.
        reader.seek(offset)
        writer.seek(0, os.SEEK_END)
        shutil.copyfileobj(reader, writer, _COPY_CHUNK)


def _encode_patient_group(ds: Dataset, implicit_vr: bool) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit_vr
    encodings = ds._character_set
    for tag in sorted(ds.keys()):
        if tag >> 16 == PATIENT_GROUP:
            write_data_element(buffer, ds[tag], encodings)
    return buffer.getvalue()


def _stamp_stream(reader: BinaryIO, writer: BinaryIO, stamp: Stamp) -> None:
    ds = dcmread(reader, stop_before_pixels=True)
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if ds.file_meta else None
    if transfer_syntax is None:
        raise StampError("file has no transfer syntax in its file meta information")

    offset = reader.tell()
    next_tag = reader.read(4)
    at_pixels = next_tag in _PIXEL_TAGS
    at_end = next_tag == b""
    if transfer_syntax == DeflatedExplicitVRLittleEndian or not (at_pixels or at_end):
        # The whole dataset is deflated (or the offset is unknown): rewrite all of it.
        reader.seek(0)
        full = dcmread(reader)
        stamp_dataset(full, stamp)
        dcmwrite(writer, full, enforce_file_format=True)
        return

    stamp_dataset(ds, stamp)
    dcmwrite(writer, ds, enforce_file_format=True)
    reader.seek(offset)
    shutil.copyfileobj(reader, writer, _COPY_CHUNK)
