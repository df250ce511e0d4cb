"""DCMTK's wlmscpfs as a Modality Worklist server for tests and the demo.

wlmscpfs answers C-FIND from the worklist files (*.wl) in a folder named after
the AE title it is called as; the folder also needs a file named "lockfile".
Tests add and remove scheduled procedure steps by writing and deleting files.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import subprocess
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from engine.testing.dicomgen import PatientSpec, uid_for
from engine.testing.orthanc import dcmtk_environment
from engine.testing.ports import free_port, stop_process, wait_for_port

WLMSCPFS_BINARY = "wlmscpfs"
# Modality Worklist Information Model - FIND; wlmscpfs reads it from the file meta.
MWL_FIND = "1.2.840.10008.5.1.4.31"


@dataclasses.dataclass(frozen=True)
class ScheduledStep:
    """One scheduled procedure step as a RIS would publish it."""

    step_id: str
    accession: str
    patient: PatientSpec
    start: dt.datetime
    modality: str
    station_ae_title: str
    procedure_code: str
    procedure_meaning: str
    description: str = ""

    @property
    def study_uid(self) -> str:
        return uid_for("worklist-study", self.accession)


def step_dataset(step: ScheduledStep) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = step.patient.id
    ds.IssuerOfPatientID = step.patient.issuer
    ds.PatientName = step.patient.name
    ds.PatientBirthDate = step.patient.birth_date
    ds.PatientSex = step.patient.sex
    ds.AccessionNumber = step.accession
    ds.StudyInstanceUID = step.study_uid
    ds.RequestedProcedureID = f"RP-{step.accession}"
    ds.RequestedProcedureDescription = step.procedure_meaning
    code = Dataset()
    code.CodeValue = step.procedure_code
    code.CodingSchemeDesignator = "LOCAL"
    code.CodeMeaning = step.procedure_meaning
    ds.RequestedProcedureCodeSequence = Sequence([code])
    item = Dataset()
    item.ScheduledStationAETitle = step.station_ae_title
    item.ScheduledProcedureStepStartDate = step.start.strftime("%Y%m%d")
    item.ScheduledProcedureStepStartTime = step.start.strftime("%H%M%S")
    item.Modality = step.modality
    item.ScheduledProcedureStepID = step.step_id
    item.ScheduledProcedureStepDescription = step.description or step.procedure_meaning
    item.ScheduledPerformingPhysicianName = ""
    ds.ScheduledProcedureStepSequence = Sequence([item])
    return ds


class WorklistServer:
    """A wlmscpfs process serving the steps the test writes."""

    def __init__(self, folder: Path, ae_title: str = "RIS_MWL", port: int | None = None) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def data_folder(self) -> Path:
        return self.folder / "worklists" / self.ae_title

    def start(self) -> None:
        if shutil.which(WLMSCPFS_BINARY) is None:
            raise RuntimeError(
                f"'{WLMSCPFS_BINARY}' not found on PATH: install the Debian package 'dcmtk' "
                "(make test and make demo install it)"
            )
        self.data_folder.mkdir(parents=True, exist_ok=True)
        (self.data_folder / "lockfile").touch()
        self._log = open(self.folder / "wlmscpfs.log", "ab")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(
            [
                WLMSCPFS_BINARY,
                "--single-process",
                "--keep-char-set",
                # Serve incomplete items too, as a broken RIS export would reach a modality.
                "--disable-file-reject",
                "--data-files-path",
                str(self.data_folder.parent),
                str(self.port),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dcmtk_environment(),
        )
        wait_for_port(self.host, self.port, timeout=15)

    def stop(self) -> None:
        if self._process is None:
            return
        stop_process(self._process)
        self._process = None
        self._log.close()

    def add(self, step: ScheduledStep) -> Path:
        path = self.data_folder / f"{step.step_id}.wl"
        ds = step_dataset(step)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(MWL_FIND)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(uid_for("worklist-file", step.step_id))
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dcmwrite(path, ds, enforce_file_format=True)
        return path

    def remove(self, step: ScheduledStep) -> None:
        (self.data_folder / f"{step.step_id}.wl").unlink()

    def add_malformed(self, name: str) -> Path:
        """Write a file wlmscpfs cannot use, as a broken RIS export would."""
        path = self.data_folder / f"{name}.wl"
        path.write_bytes(b"this is not a DICOM worklist file")
        return path
