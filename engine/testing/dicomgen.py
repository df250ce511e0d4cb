"""Building test studies from the real images that ship in pydicom's test data.

The first instance of a series is the real image with patient and study
attributes rewritten; further instances are generated slices: the same header
with new UIDs and positions, and for uncompressed images the pixel rows shifted
so every slice differs. UIDs are derived from names, so a scenario builds the
same objects on every run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
from collections.abc import Iterator

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, generate_uid

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")


@dataclasses.dataclass(frozen=True)
class PatientSpec:
    id: str
    issuer: str
    name: str
    birth_date: str
    sex: str


@dataclasses.dataclass(frozen=True)
class SeriesSpec:
    """count instances made from a pydicom test file; modality overrides the template's."""

    template: str
    count: int
    modality: str
    description: str = ""
    body_part: str = ""


@dataclasses.dataclass(frozen=True)
class StudySpec:
    key: str
    date: dt.date
    description: str
    accession: str
    series: tuple[SeriesSpec, ...]
    time: str = "101500"

    @property
    def uid(self) -> str:
        return uid_for("study", self.key)

    @property
    def instance_count(self) -> int:
        return sum(series.count for series in self.series)

    @property
    def modalities(self) -> set[str]:
        return {series.modality for series in self.series}


def uid_for(*names: str) -> str:
    return str(generate_uid(entropy_srcs=["fdqr-test", *names]))


def _template(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name} not found")
    return dcmread(path)


def build_study(patient: PatientSpec, study: StudySpec, copy_key: str = "") -> Iterator[Dataset]:
    """Yield every instance of a study for a patient.

    Two calls with the same study and different copy_key give objects with the
    same UIDs, as when one study is held by two sites.
    """
    for series_number, series in enumerate(study.series, start=1):
        template = _template(series.template)
        series_uid = uid_for("series", study.key, str(series_number))
        for index in range(series.count):
            ds = template.copy()
            ds.file_meta = FileMetaDataset(template.file_meta)
            _set_patient(ds, patient)
            _set_study(ds, study, series, series_number, series_uid)
            sop_uid = UID(uid_for("instance", study.key, str(series_number), str(index)))
            ds.SOPInstanceUID = sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            if series.modality == "CR" and ds.SOPClassUID != CR_IMAGE_STORAGE:
                ds.SOPClassUID = CR_IMAGE_STORAGE
                ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
            ds.InstanceNumber = index + 1
            if "ImagePositionPatient" in ds:
                x, y, _ = (float(value) for value in ds.ImagePositionPatient)
                ds.ImagePositionPatient = [x, y, float(index) * 2.5]
                ds.SliceLocation = float(index) * 2.5
            if index > 0:
                _shift_pixels(ds, index)
            yield ds


def _set_patient(ds: Dataset, patient: PatientSpec) -> None:
    ds.PatientID = patient.id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientName = patient.name
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    for keyword in ("OtherPatientIDsSequence", "OtherPatientIDs", "OtherPatientNames"):
        if keyword in ds:
            delattr(ds, keyword)


def _set_study(
    ds: Dataset, study: StudySpec, series: SeriesSpec, series_number: int, series_uid: str
) -> None:
    date = study.date.strftime("%Y%m%d")
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = date
    ds.StudyTime = study.time
    ds.SeriesDate = date
    ds.ContentDate = date
    ds.AccessionNumber = study.accession
    ds.StudyDescription = study.description
    ds.StudyID = study.key[:16]
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series.description
    ds.Modality = series.modality
    if series.body_part:
        ds.BodyPartExamined = series.body_part
    if "AcquisitionDate" in ds:
        ds.AcquisitionDate = date


def _shift_pixels(ds: Dataset, index: int) -> None:
    if ds.file_meta.TransferSyntaxUID.is_compressed or "PixelData" not in ds:
        return
    data = bytes(ds.PixelData)
    row_bytes = int(ds.Columns) * (int(ds.BitsAllocated) // 8) * int(ds.get("SamplesPerPixel", 1))
    shift = (index * row_bytes) % max(len(data), 1)
    ds.PixelData = data[shift:] + data[:shift]


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def years_before(today: dt.date, years: float) -> dt.date:
    return today - dt.timedelta(days=round(years * 365.25))
