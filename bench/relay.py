"""Relay benchmark: fdqr's retrieve + stamp + store against direct transfers, in one run.

Generates a CT study (512x512, 16-bit, Explicit VR Little Endian, pixel data
that does not compress), loads it into a source Orthanc, and measures:

  (a) fdqr: an HL7 order makes `fdqr run` retrieve the study from the source
      (C-MOVE to its Storage SCP), stamp the local identity and store it into
      a destination Orthanc; timed from the retrieve's start to the study's
      verified result, as the job's event log records them;
  (b) orthanc_move: the source's own C-MOVE straight to the same destination;
  (c) dcmtk: DCMTK storescu -> storescp with TCP_NODELAY=1, maximum PDU 128 KB;
  (d) pynetdicom: a plain pynetdicom SCU sending the same files to that storescp;
  (e) source_send: the source's C-MOVE to that storescp (how fast the source sends);
  (f) destination_store: storescu storing the files into the destination Orthanc
      (how fast the destination stores).

No relay between these two Orthanc servers can be faster than the slower of
(e) and (f).

It prints MB/s for each (file bytes / seconds), fdqr's peak resident memory
(VmHWM of the `fdqr run` process), and ends with one JSON line.

    .venv/bin/python bench/relay.py                    # 300 instances, about 160 MB
    .venv/bin/python bench/relay.py --instances 2000   # about 1 GB, for peak memory
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hl7.client
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from engine.jobs.store import Store  # noqa: E402
from engine.testing.dcmtk import StoreSCP  # noqa: E402
from engine.testing.dicomgen import PatientSpec  # noqa: E402
from engine.testing.orthanc import OrthancServer, dcmtk_environment  # noqa: E402
from engine.testing.scenario import order_message, prefetch_scenario  # noqa: E402
from engine.testing.sites import EngineProcess, Network, wait_for_newest_job  # noqa: E402

MB = 1_000_000
JOB_TIMEOUT_SECONDS = 1800.0


@dataclasses.dataclass
class Study:
    folder: Path
    uid: str
    files: list[Path]

    @property
    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)


def generate_study(folder: Path, count: int, patient: PatientSpec) -> Study:
    """Write `count` CT slices of 512x512 16-bit pixels with random values."""
    template_path = get_testdata_file("CT_small.dcm")
    assert template_path is not None
    template = dcmread(template_path)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    series_uid = generate_uid()
    date = (dt.date.today() - dt.timedelta(days=200)).strftime("%Y%m%d")
    files = []
    for index in range(count):
        ds = template.copy()
        ds.file_meta = FileMetaDataset(template.file_meta)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        _set_ids(ds, patient, study_uid, series_uid, date)
        sop_uid = generate_uid()
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = index + 1
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelData = os.urandom(512 * 512 * 2)
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Study(folder, study_uid, files)


def _set_ids(ds: Dataset, patient: PatientSpec, study_uid: str, series_uid: str, date: str) -> None:
    # The remote patient's own demographics, which the engine checks before retrieving.
    ds.PatientID = patient.id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientName = patient.name
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.Modality = "CT"
    ds.StudyDescription = "CT CHEST RELAY BENCHMARK"
    ds.AccessionNumber = "BENCH-1"


def rate(size_bytes: int, seconds: float) -> float:
    return size_bytes / MB / seconds


def median_of(repeats: int, run: Callable[[], float]) -> float:
    """Return the median duration of `repeats` runs (seconds)."""
    return statistics.median(run() for _ in range(repeats))


# (c) and (d): straight to DCMTK's storescp


def clear(scp: StoreSCP) -> None:
    for path in scp.files():
        path.unlink()


def time_dcmtk(study: Study, scp: StoreSCP) -> float:
    clear(scp)
    return time_storescu(study, "STORESCP", scp.dicom_port)


def time_storescu(study: Study, ae_title: str, port: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["storescu", "--max-pdu", "131072", "-aec", ae_title, "127.0.0.1", str(port)]
        + [str(path) for path in study.files],
        env=dcmtk_environment(),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def time_pynetdicom(study: Study, scp: StoreSCP) -> float:
    """Send with pynetdicom as a user would: one association, chunked send from file."""
    clear(scp)
    _config.STORE_SEND_CHUNKED_DATASET = True
    meta = dcmread(study.files[0], stop_before_pixels=True).file_meta
    ae = AE(ae_title="BENCH")
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 600
    context = build_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    started = time.perf_counter()
    association = ae.associate(
        "127.0.0.1", scp.dicom_port, contexts=[context], ae_title="STORESCP", max_pdu=131072
    )
    assert association.is_established, "storescp refused the association"
    for message_id, path in enumerate(study.files, start=1):
        status = association.send_c_store(path, msg_id=message_id)
        assert status and status.Status == 0, f"C-STORE of {path.name} failed: {status}"
    association.release()
    return time.perf_counter() - started


# (b): the source's own C-MOVE to the destination


def time_orthanc_move(study: Study, source: OrthancServer, destination: OrthancServer) -> float:
    clear_destination(destination)
    elapsed = time_move(study, source, destination.ae_title)
    count = destination.instance_count()
    assert count == len(study.files), f"destination holds {count} of {len(study.files)}"
    return elapsed


# (e) and (f): what the source sends and the destination stores at most


def time_source_send(study: Study, source: OrthancServer, scp: StoreSCP) -> float:
    """Time the source's C-MOVE into storescp, which only writes each object to a file."""
    clear(scp)
    elapsed = time_move(study, source, "STORESCP")
    count = len(scp.files())
    assert count == len(study.files), f"storescp received {count} of {len(study.files)}"
    return elapsed


def time_destination_store(study: Study, destination: OrthancServer) -> float:
    """Time DCMTK storescu storing the study into the destination Orthanc."""
    clear_destination(destination)
    elapsed = time_storescu(study, destination.ae_title, destination.dicom_port)
    count = destination.instance_count()
    assert count == len(study.files), f"destination holds {count} of {len(study.files)}"
    return elapsed


def time_move(study: Study, source: OrthancServer, destination_ae_title: str) -> float:
    ae = AE(ae_title="BENCH")
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 600
    context = build_context(StudyRootQueryRetrieveInformationModelMove)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study.uid
    started = time.perf_counter()
    association = ae.associate(
        source.host, source.dicom_port, contexts=[context], ae_title=source.ae_title
    )
    assert association.is_established, "source refused the association"
    final = None
    for status, _ in association.send_c_move(
        identifier, destination_ae_title, StudyRootQueryRetrieveInformationModelMove
    ):
        final = status
    association.release()
    elapsed = time.perf_counter() - started
    assert final is not None and final.Status == 0, f"C-MOVE failed: {final}"
    return elapsed


def clear_destination(destination: OrthancServer) -> None:
    for study_id in destination.study_ids():
        destination._request("DELETE", f"/studies/{study_id}")


# (a): fdqr


@dataclasses.dataclass
class FdqrRun:
    transfer_seconds: float
    job_seconds: float
    peak_rss_mb: float
    summary: str


def time_fdqr(
    network: Network, folder: Path, study: Study, control_id: str, overrides: dict[str, object]
) -> FdqrRun:
    destination = network.sites["local_pacs"]
    clear_destination(destination)
    run_folder = folder / f"engine-{control_id}"
    shutil.rmtree(run_folder, ignore_errors=True)
    config = network.write_engine_config(run_folder / "engine.yaml", overrides=overrides)
    store_path = run_folder / "fdqr.sqlite"
    engine = EngineProcess(config, network.ports.mllp, run_folder / "engine.log")
    engine.start()
    try:
        scenario = prefetch_scenario(dt.date.today())
        message = order_message(
            scenario.local_patient, control_id, f"ACC-{control_id}", dt.datetime.now()
        )
        started = time.perf_counter()
        with hl7.client.MLLPClient("127.0.0.1", network.ports.mllp) as client:
            client.send_message(message)
        job = wait_for_newest_job(store_path, JOB_TIMEOUT_SECONDS, 0.05)
        job_id, summary = job.id, f"{job.state}: {job.summary}"
        job_seconds = time.perf_counter() - started
        peak_rss_mb = peak_rss(engine)
    finally:
        engine.stop()

    count = destination.instance_count()
    assert count == len(study.files), f"fdqr stored {count} of {len(study.files)}: {summary}"
    window = transfer_window(store_path, job_id, study.uid)
    return FdqrRun(window, job_seconds, peak_rss_mb, summary)


def transfer_window(store_path: Path, job_id: int, study_uid: str) -> float:
    """Seconds from the rule's selection (retrieve starts next) to the study's result event."""
    store = Store(store_path)
    try:
        events = store.events(job_id)
    finally:
        store.close()
    start = next(at for at, text in events if "candidate studies selected" in text)
    end = next(at for at, text in events if text.startswith(f"study {study_uid} from "))
    return (end - start).total_seconds()


def peak_rss(engine: EngineProcess) -> float:
    """Return VmHWM (peak resident set size) of the engine process in MB."""
    pid = engine.pid
    assert pid is not None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError("VmHWM not found")


def show(label: str, size: int, seconds: float) -> None:
    print(f"{label:42} {rate(size, seconds):7.1f} MB/s ({seconds:.2f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300, help="CT slices in the study")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the median counts")
    parser.add_argument(
        "--folder", type=Path, default=REPOSITORY / "var" / "bench-relay", help="work folder"
    )
    parser.add_argument(
        "--destination-associations",
        type=int,
        default=None,
        help="transfer.destination_associations for fdqr (default: conf/engine.yaml's)",
    )
    parser.add_argument(
        "--destination-max-pdu",
        type=int,
        default=0,
        help="MaximumPduLength of the destination Orthanc in bytes (default: Orthanc's 16384)",
    )
    parser.add_argument(
        "--source-max-pdu",
        type=int,
        help="MaximumPduLength of the source Orthanc in bytes (default: Orthanc's 16384)",
    )
    parser.add_argument("--keep", action="store_true", help="leave the work folder in place")
    args = parser.parse_args()

    folder: Path = args.folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    scenario = prefetch_scenario(dt.date.today())
    remote = scenario.remote_patient_of("a-ct-chest-1y")
    study = generate_study(folder / "study", args.instances, remote)
    size = study.size_bytes
    print(f"study: {args.instances} CT instances, {size / MB:.1f} MB, {os.cpu_count()} CPUs")

    site_settings: dict[str, dict[str, object]] = {}
    if args.destination_max_pdu:
        site_settings["local_pacs"] = {"MaximumPduLength": args.destination_max_pdu}
    if args.source_max_pdu:
        site_settings["hospital_a"] = {"MaximumPduLength": args.source_max_pdu}
    network = Network(folder / "sites", site_settings=site_settings or None)
    source, destination = network.sites["hospital_a"], network.sites["local_pacs"]
    source.modalities["local_pacs"] = (
        destination.ae_title,
        destination.host,
        destination.dicom_port,
    )
    scp = StoreSCP(folder / "storescp", max_pdu=131072)
    source.modalities["storescp"] = ("STORESCP", "127.0.0.1", scp.dicom_port)
    overrides: dict[str, object] = {"spool": {"fsync": True}}
    if args.destination_associations:
        overrides["transfer"] = {"destination_associations": args.destination_associations}
    try:
        network.start()
        scp.start()
        for path in study.files:
            source.upload(path.read_bytes())

        dcmtk = median_of(args.repeats, lambda: time_dcmtk(study, scp))
        show("(c) dcmtk storescu -> storescp", size, dcmtk)
        pynet = median_of(args.repeats, lambda: time_pynetdicom(study, scp))
        show("(d) pynetdicom SCU -> storescp", size, pynet)
        move = median_of(args.repeats, lambda: time_orthanc_move(study, source, destination))
        show("(b) Orthanc C-MOVE source -> destination", size, move)
        sending = median_of(args.repeats, lambda: time_source_send(study, source, scp))
        show("(e) Orthanc C-MOVE source -> storescp", size, sending)
        storing = median_of(args.repeats, lambda: time_destination_store(study, destination))
        show("(f) storescu -> destination Orthanc", size, storing)
        runs = [
            time_fdqr(network, folder, study, f"BENCH{index}", overrides)
            for index in range(args.repeats)
        ]
        fdqr = statistics.median(run.transfer_seconds for run in runs)
        job = statistics.median(run.job_seconds for run in runs)
        peak = max(run.peak_rss_mb for run in runs)
        show("(a) fdqr retrieve + stamp + store", size, fdqr)
        print(f"    whole job from the order: {job:.2f} s; {runs[-1].summary}")
        print(f"fdqr peak RSS: {peak:.0f} MB")
    finally:
        scp.stop()
        network.stop()
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)

    result = {
        "fdqr_mb_s": round(rate(size, fdqr), 1),
        "orthanc_move_mb_s": round(rate(size, move), 1),
        "dcmtk_mb_s": round(rate(size, dcmtk), 1),
        "pynetdicom_mb_s": round(rate(size, pynet), 1),
        "ratio_vs_dcmtk": round(dcmtk / fdqr, 3),
        "ratio_vs_orthanc": round(move / fdqr, 3),
        "source_send_mb_s": round(rate(size, sending), 1),
        "destination_store_mb_s": round(rate(size, storing), 1),
        "peak_rss_mb": round(peak, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
