"""Stamping local patient identity into DICOM objects received from another domain.

Only the declared patient elements change. Pixel data is never decoded: for a
file, the header up to the pixel data element is rewritten and the rest of the
file is copied byte for byte.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian

from engine.model import Demographics, PatientIdentifier

UTF8_CHARSET = "ISO_IR 192"
# The three pixel data tags, as they appear on disk in little and big endian.
_PIXEL_TAGS = {
    bytes.fromhex(text)
    for text in ("e07f1000", "7fe00010", "e07f0800", "7fe00008", "e07f0900", "7fe00009")
}
_COPY_CHUNK = 1024 * 1024


class StampError(Exception):
    """An object that cannot be stamped safely; it must not be stored."""


@dataclasses.dataclass(frozen=True)
class Stamp:
    """What to write into each object: the local identity, and where the object came from."""

    local: PatientIdentifier
    remote: PatientIdentifier
    demographics: Demographics


@dataclasses.dataclass(frozen=True)
class Header:
    """The identifying attributes of a received object, read before stamping."""

    study_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str
    issuer_of_patient_id: str


def stamp_dataset(ds: Dataset, stamp: Stamp) -> None:
    """Set the local identity on a dataset in place; pixel data is not touched."""
    _set_charset_for(ds, stamp.demographics)

    ds.PatientID = stamp.local.value
    ds.IssuerOfPatientID = stamp.local.issuer
    _add_other_patient_id(ds, stamp.remote)

    demographics = stamp.demographics
    if demographics.name:
        ds.PatientName = demographics.name
    if demographics.birth_date:
        ds.PatientBirthDate = demographics.birth_date
    if demographics.sex:
        ds.PatientSex = demographics.sex

    # A group length would be wrong after the change; it is retired outside group 0002.
    for group in (0x0008, 0x0010):
        if (group << 16) in ds:
            del ds[group << 16]


def _add_other_patient_id(ds: Dataset, identifier: PatientIdentifier) -> None:
    items = ds.get("OtherPatientIDsSequence") or Sequence()
    for item in items:
        if (item.get("PatientID"), item.get("IssuerOfPatientID")) == (
            identifier.value,
            identifier.issuer,
        ):
            return
    item = Dataset()
    item.PatientID = identifier.value
    item.IssuerOfPatientID = identifier.issuer
    item.TypeOfPatientID = "TEXT"
    items.append(item)
    ds.OtherPatientIDsSequence = items


def _set_charset_for(ds: Dataset, demographics: Demographics) -> None:
    """Switch the dataset to UTF-8 when its character set cannot encode the new text."""
    text = demographics.name
    if text.isascii():
        return
    current = ds.get("SpecificCharacterSet", "")
    terms = [current] if isinstance(current, str) else list(current)
    terms = [term for term in terms if term] or ["ISO_IR 6"]
    # pydicom reads the default repertoire leniently as Latin-1; the standard says ASCII.
    codec = "ascii" if terms[0] == "ISO_IR 6" else python_encoding.get(terms[0])
    if len(terms) == 1 and codec is not None:
        try:
            text.encode(codec)
            return
        except UnicodeEncodeError:
            pass
    # Decode every text element with the old character set first, so that all of
    # them are written again in the new one.
    ds.decode()
    ds.SpecificCharacterSet = UTF8_CHARSET


def read_header(path: Path) -> Header:
    """Read the identifying attributes of a DICOM file without reading pixel data."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as error:
        raise StampError(f"not a readable DICOM file: {error}") from error
    return Header(
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        patient_id=str(ds.get("PatientID", "")),
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "")),
    )


def stamp_file(source: Path, target: Path, stamp: Stamp, fsync: bool = True) -> None:
    """Write a stamped copy of `source` to `target`.

    The copy is written next to `target` and renamed into place, after an
    fsync when asked, so a crash never leaves a partial file under that name.
    """
    partial = target.with_name(target.name + ".partial")
    try:
        with open(source, "rb") as reader, open(partial, "wb") as writer:
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
