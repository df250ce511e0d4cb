"""Identity across hospitals on real peers: Orthanc sites, PIX/PIXm doubles on loopback, `fdqr run`."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.jobs.store import JobState
from engine.testing.adt import merge_message
from engine.testing.dicomgen import PatientSpec, SeriesSpec, StudySpec, years_before
from engine.testing.ports import free_port, wait_for_port
from engine.testing.scenario import Placement, Scenario, order_message
from engine.testing.sites import REPOSITORY, EngineProcess, Network
from tests.integration.conftest import (
    instances_of_study,
    place_order,
    read_events,
    read_jobs,
    send,
    wait_for_job,
)

pytestmark = pytest.mark.integration

TODAY = dt.date.today()
LOCAL = PatientSpec("L12345", "LOCAL", "DOE^JANE^M", "19650312", "F")
AT_A = PatientSpec("HA-778899", "HOSP_A", "DOE^JANE", "19650312", "F")
AT_B = PatientSpec("HB-4455", "HOSP_B", "DOE^JANE^MARIE", "19650312", "F")
# A different person at hospital B whose ID equals our patient's ID at hospital A.
NAMESAKE_AT_B = PatientSpec("HA-778899", "HOSP_B", "POE^EDGAR", "19700505", "M")


def _study(key: str, years: float) -> StudySpec:
    series = (SeriesSpec("CT_small.dcm", 3, "CT", "AXIAL", "CHEST"),)
    return StudySpec(key, years_before(TODAY, years), "CT CHEST", f"ACC-{key[:8]}", series)


STUDY_A = _study("id-a-ct", 1)
STUDY_B = _study("id-b-ct", 2)
NAMESAKE_STUDY = _study("id-b-namesake", 1.5)


def scenario(local: PatientSpec = LOCAL) -> Scenario:
    return Scenario(
        today=TODAY,
        local_patient=local,
        placements=(
            Placement("hospital_a", AT_A, STUDY_A),
            Placement("hospital_b", AT_B, STUDY_B),
            Placement("hospital_b", NAMESAKE_AT_B, NAMESAKE_STUDY),
        ),
        expected_moved=(STUDY_A.key, STUDY_B.key),
        expected_present=(),
        must_not_move=(NAMESAKE_STUDY.key,),
    )


class Site:
    """A network with the mini scenario loaded and `fdqr run` started with some overrides."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.network = Network(folder)
        self.engine: EngineProcess | None = None
        self.store = folder / "engine" / "fdqr.sqlite"
        self.config = folder / "engine" / "engine.yaml"

    def start(self, overrides: dict[str, Any], local: PatientSpec = LOCAL) -> None:
        self.network.start()
        self.network.load(scenario(local))
        self.network.write_engine_config(self.config, overrides=overrides)
        self.start_engine()

    def start_engine(self) -> None:
        log = self.folder / f"engine-{time.monotonic_ns()}.log"
        self.engine = EngineProcess(self.config, self.network.ports.mllp, log)
        self.engine.start()

    def stop(self) -> None:
        if self.engine is not None:
            status = self.engine.stop()
            assert status == 0, self.engine.log_text()[-3000:]
        self.network.stop()

    def order(self, control_id: str, patient: PatientSpec = LOCAL) -> int:
        message = order_message(patient, control_id, f"ACC-{control_id}", dt.datetime.now())
        return place_order(self.network.ports.mllp, self.store, message, control_id)

    def events(self, job_id: int) -> list[str]:
        return read_events(self.store, job_id)

    @property
    def local_pacs(self) -> Any:
        return self.network.sites["local_pacs"]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    instance = Site(tmp_path)
    try:
        yield instance
    finally:
        instance.stop()


DOMAINS = {
    "LOCAL": {"universal_id": "1.2.3.1"},
    "HOSP_A": {"universal_id": "1.2.3.2"},
    "HOSP_B": {"universal_id": "1.2.3.3"},
}


@pytest.fixture
def identity_services(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """The PIX Manager and PIXm doubles as a process on loopback; yield their ports."""
    registry = {
        "domains": [
            {
                "issuer": issuer,
                "namespace_id": issuer,
                "universal_id": oid["universal_id"],
                "fhir_system": f"urn:oid:{oid['universal_id']}",
            }
            for issuer, oid in DOMAINS.items()
        ],
        "patients": [
            {
                "identifiers": [
                    ["L12345", "LOCAL"],
                    ["HA-778899", "HOSP_A"],
                    ["HB-4455", "HOSP_B"],
                ],
                "family_name": "DOE",
                "given_name": "JANE",
                "birth_date": "19650312",
                "sex": "F",
            },
            {
                "identifiers": [["HA-778899", "HOSP_B"]],
                "family_name": "POE",
                "given_name": "EDGAR",
                "birth_date": "19700505",
                "sex": "M",
            },
        ],
    }
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(registry))
    pix_port, pixm_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.testing.identity_doubles",
            str(path),
            "--pix-port",
            str(pix_port),
            "--pixm-port",
            str(pixm_port),
        ],
        cwd=REPOSITORY,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "doubles.log", "wb"),  # noqa: SIM115 (closed with the process)
    )
    try:
        wait_for_port("127.0.0.1", pix_port)
        wait_for_port("127.0.0.1", pixm_port)
        yield pix_port, pixm_port
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_same_id_means_different_patients_at_two_sites(
    site: Site, identity_services: tuple[int, int]
) -> None:
    pix_port, pixm_port = identity_services
    site.start(
        {
            "identity": {
                "domains": DOMAINS,
                "sources": {
                    "pix_manager": {
                        "type": "pix",
                        "endpoint": f"tcp:host=127.0.0.1:port={pix_port}",
                    },
                    "pixm_b": {"type": "pixm", "base_url": f"http://127.0.0.1:{pixm_port}/fhir"},
                },
                "chains": {"HOSP_A": ["pix_manager"], "HOSP_B": ["pixm_b"]},
                "default_chain": [],
            }
        }
    )
    job_id = site.order("SAMEID1")
    job = wait_for_job(site.store, job_id)
    assert job.state == JobState.DONE, job.summary

    assert site.local_pacs.study_uids() == {STUDY_A.uid, STUDY_B.uid}
    for study, remote in ((STUDY_A, AT_A), (STUDY_B, AT_B)):
        for instance in instances_of_study(site.local_pacs, study.uid):
            assert instance.PatientID == "L12345"
            others = [(i.PatientID, i.IssuerOfPatientID) for i in instance.OtherPatientIDsSequence]
            assert others == [(remote.id, remote.issuer)]
    events = site.events(job_id)
    assert (
        "source hospital_a: identity pix_manager: L12345^^^LOCAL is HA-778899^^^HOSP_A: QAK-2 OK"
        in events
    )
    assert (
        "source hospital_b: identity pixm_b: L12345^^^LOCAL is HB-4455^^^HOSP_B: HTTP 200" in events
    )
    assert not any("DOE" in text for text in events)


def test_remote_demographic_mismatch_quarantines(site: Site, tmp_path: Path) -> None:
    # A wrong cross-reference: at hospital B, HA-778899 is somebody else.
    table = tmp_path / "wrong.csv"
    table.write_text(
        "local_id,local_issuer,remote_id,remote_issuer\n"
        "L12345,LOCAL,HA-778899,HOSP_A\n"
        "L12345,LOCAL,HA-778899,HOSP_B\n"
    )
    site.start({"identity": {"table": str(table)}})
    job_id = site.order("MISMATCH1")
    job = wait_for_job(site.store, job_id)

    assert job.state == JobState.QUARANTINED
    assert job.summary == (
        "nothing retrieved: source hospital_b patient HA-778899^^^HOSP_B:"
        " name differs, birth date differs, sex differs (see fdqr identity release)"
    )
    assert site.local_pacs.instance_count() == 0
    listing = CliRunner().invoke(main, ["jobs", "--config", str(site.config)])
    assert listing.exit_code == 0, listing.output
    assert f"{job_id}    quarantined" in listing.output
    assert "POE" not in listing.output


def test_merge_between_order_and_retrieve(site: Site) -> None:
    site.start(
        {"jobs": {"retry_delay_seconds": 1, "max_retry_delay_seconds": 2, "max_attempts": 50}}
    )
    site.local_pacs.stop()
    job_id = site.order("MERGE1")
    deadline = time.monotonic() + 60
    while read_jobs(site.store)[-1].state != JobState.WAITING:
        assert time.monotonic() < deadline, "the job did not wait for the destination"
        time.sleep(0.2)

    surviving = PatientSpec("L55555", "LOCAL", "DOE^JANE^M", "19650312", "F")
    ack = send(
        site.network.ports.mllp, merge_message(surviving, "L12345", "A40-1", dt.datetime.now())
    )
    assert ack[1] == "MSA|AA|A40-1"
    site.local_pacs.start()

    job = wait_for_job(site.store, job_id)
    assert job.state == JobState.DONE, job.summary
    assert site.local_pacs.study_uids() == {STUDY_A.uid, STUDY_B.uid}
    for uid in (STUDY_A.uid, STUDY_B.uid):
        assert {i.PatientID for i in instances_of_study(site.local_pacs, uid)} == {"L55555"}
    assert (
        "patient L12345^^^LOCAL was merged: L12345^^^LOCAL -> L55555^^^LOCAL; using L55555^^^LOCAL"
        in site.events(job_id)
    )


def test_name_outside_latin1_for_latin1_destination(site: Site) -> None:
    polish = PatientSpec("L12345", "LOCAL", "DOĘ^JANĘ^M", "19650312", "F")
    site.start(
        {
            "coercion": {
                "profiles": {"latin1-pacs": {"character_set": "latin1"}},
                "destinations": {"local_pacs": "latin1-pacs"},
            }
        },
        local=polish,
    )
    job_id = site.order("LATIN1", polish)
    job = wait_for_job(site.store, job_id)
    assert job.state == JobState.DONE, job.summary
    for instance in instances_of_study(site.local_pacs, STUDY_A.uid):
        assert str(instance.PatientName) == "DOE^JANE^M"
        assert instance.get("SpecificCharacterSet", "ISO_IR 100") in ("ISO_IR 100", "")

    # With rejection configured, the job fails before anything is retrieved.
    assert site.engine is not None
    site.engine.stop()
    site.engine = None
    settings_text = site.config.read_text().replace(
        "character_set: latin1", "character_set: latin1\n      non_latin1: reject"
    )
    site.config.write_text(settings_text)
    site.start_engine()
    count = site.local_pacs.instance_count()
    rejected = wait_for_job(site.store, site.order("LATIN2", polish))
    assert rejected.state == JobState.FAILED
    assert "accepts only Latin-1" in rejected.summary
    assert site.local_pacs.instance_count() == count
