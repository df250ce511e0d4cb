"""Benchmark: a federated C-FIND takes about as long as the slowest site, not the sum of all.

Starts five small pynetdicom Q/R SCPs on loopback (the sites), each returning
its matches to a Study Root C-FIND after a set delay, one slower than the rest, and `fdqr run`
with those sites as federation members. It then times, as the median of
several runs, a C-FIND straight to the slowest site and the same C-FIND
through fdqr (association, query and release each time), checks that fdqr
returned every site's studies under the local patient ID, and prints the
slowest site's time, fdqr's time, their ratio, and one JSON line:
{"sites", "slowest_site_ms", "federated_ms", "ratio"}.

Run from the repository: .venv/bin/python bench/federated_find.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from engine.testing.ports import free_port  # noqa: E402
from engine.testing.sites import EngineProcess, shipped_settings  # noqa: E402

LOCAL_ID = "L1001"
LOCAL_ISSUER = "LOCAL"
CALLER = "BENCH"


class DelayedSite:
    """A Q/R SCP that returns its studies to every C-FIND after `delay` seconds."""

    def __init__(self, index: int, delay: float, studies: int) -> None:
        self.index = index
        self.name = f"site_{index}"
        self.ae_title = f"SITE{index}"
        self.issuer = f"DOMAIN_{index}"
        self.patient_id = f"S{index}-{LOCAL_ID}"
        self.delay = delay
        self.studies = studies
        self.port = free_port()
        self._ae = AE(ae_title=self.ae_title)
        self._ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self._server: Any = None

    def start(self) -> None:
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_FIND, self._on_find)],
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        time.sleep(self.delay)
        if str(query.get("PatientID", "")) not in ("", self.patient_id):
            return
        for number in range(self.studies):
            answer = Dataset()
            answer.QueryRetrieveLevel = "STUDY"
            answer.PatientID = self.patient_id
            answer.IssuerOfPatientID = self.issuer
            answer.StudyInstanceUID = f"1.2.826.0.1.3680043.10.999.{self.index}.{number + 1}"
            answer.StudyDate = "20240101"
            answer.StudyDescription = f"STUDY {number + 1} AT {self.ae_title}"
            yield 0xFF00, answer


def study_query(patient_id: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    query.StudyDate = ""
    query.StudyDescription = ""
    return query


def timed_find(port: int, called: str, query: Dataset) -> tuple[float, list[Dataset], int]:
    """Associate, run one C-FIND and release; return seconds, matches and the final status."""
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    started = time.perf_counter()
    association = ae.associate("127.0.0.1", port, ae_title=called)
    if not association.is_established:
        raise RuntimeError(f"association with {called} on port {port} failed")
    answers = []
    final = -1
    for status, identifier in association.send_c_find(
        query, StudyRootQueryRetrieveInformationModelFind
    ):
        code = int(status.Status) if status is not None and "Status" in status else -1
        if code in (0xFF00, 0xFF01) and identifier is not None:
            answers.append(identifier)
        else:
            final = code
    association.release()
    return time.perf_counter() - started, answers, final


def write_config(folder: Path, sites: list[DelayedSite], dicom_port: int, mllp_port: int) -> Path:
    settings = shipped_settings()
    settings["dicom"]["port"] = dicom_port
    settings["mllp"]["listen"] = f"tcp:{mllp_port}:interface=127.0.0.1"
    settings["store"]["path"] = str(folder / "fdqr.sqlite")
    settings["spool"]["path"] = str(folder / "spool")
    settings["audit"]["file"] = str(folder / "audit.log")
    for site in sites:
        settings["nodes"][site.name] = {
            "ae_title": site.ae_title,
            "host": "127.0.0.1",
            "port": site.port,
            "issuer": site.issuer,
            "max_associations": 2,
            "timeout_seconds": 30,
        }
    settings["federation"] = {
        "enabled": True,
        "callers": {CALLER: {}},
        "sites": {site.name: {"timeout_seconds": 30} for site in sites},
    }
    table = {
        "cross_references": [
            {
                "local": {"id": LOCAL_ID, "issuer": LOCAL_ISSUER},
                "remote": [{"id": site.patient_id, "issuer": site.issuer} for site in sites],
            }
        ]
    }
    (folder / "identity.yaml").write_text(yaml.safe_dump(table))
    settings["identity"]["table"] = str(folder / "identity.yaml")
    path = folder / "engine.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def measure(arguments: argparse.Namespace) -> dict[str, Any]:
    delays = [arguments.delay_ms / 1000.0 + 0.05 * index for index in range(arguments.sites - 1)]
    delays.append(arguments.slow_ms / 1000.0)
    sites = [DelayedSite(index + 1, delay, arguments.studies) for index, delay in enumerate(delays)]
    slowest = max(sites, key=lambda site: site.delay)
    with tempfile.TemporaryDirectory(prefix="fdqr-bench-") as temporary:
        folder = Path(temporary)
        dicom_port, mllp_port = free_port(), free_port()
        config = write_config(folder, sites, dicom_port, mllp_port)
        for site in sites:
            site.start()
        engine = EngineProcess(config, mllp_port, folder / "engine.log")
        try:
            engine.start()
            direct, federated = [], []
            expected = arguments.sites * arguments.studies
            for run in range(arguments.runs + 1):
                seconds, answers, _ = timed_find(
                    slowest.port, slowest.ae_title, study_query(slowest.patient_id)
                )
                if run > 0:
                    direct.append(seconds)
                seconds, answers, final = timed_find(dicom_port, "FDQR", study_query(LOCAL_ID))
                if final != 0 or len(answers) != expected:
                    raise RuntimeError(
                        f"fdqr returned {len(answers)} rows (expected {expected}), "
                        f"final status 0x{final:04X}; see {folder / 'engine.log'}"
                    )
                if any(answer.PatientID != LOCAL_ID for answer in answers):
                    raise RuntimeError("fdqr returned a row without the local patient ID")
                # The first run warms up both paths and is not counted.
                if run > 0:
                    federated.append(seconds)
        finally:
            engine.stop()
            for site in sites:
                site.stop()
    slowest_ms = statistics.median(direct) * 1000
    federated_ms = statistics.median(federated) * 1000
    return {
        "sites": arguments.sites,
        "slowest_site_ms": round(slowest_ms, 1),
        "federated_ms": round(federated_ms, 1),
        "ratio": round(federated_ms / slowest_ms, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=5, help="number of sites (default 5)")
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=100,
        help="delay of the fastest site in ms; each further site waits 50 ms longer (default 100)",
    )
    parser.add_argument(
        "--slow-ms", type=float, default=600, help="delay of the slow site in ms (default 600)"
    )
    parser.add_argument("--studies", type=int, default=20, help="studies per site (default 20)")
    parser.add_argument("--runs", type=int, default=7, help="measured runs (default 7)")
    arguments = parser.parse_args()
    if arguments.sites < 2:
        parser.error("--sites must be at least 2")

    result = measure(arguments)
    print(f"slowest site: {result['slowest_site_ms']:.1f} ms (median of {arguments.runs} runs)")
    print(f"fdqr, {result['sites']} sites: {result['federated_ms']:.1f} ms")
    print(f"ratio: {result['ratio']:.3f} (target at most 1.2)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
