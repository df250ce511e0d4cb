"""The whole prefetch path on real peers: an HL7 order in, priors stamped into the local PACS."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import hl7.client
import pytest

from engine.jobs.store import JobState, StudyState
from engine.testing.scenario import Scenario, order_message, prefetch_scenario
from engine.testing.sites import EngineProcess, Network
from tests.integration.conftest import (
    ack_segments,
    instance_by_uid,
    instances_of_study,
    read_jobs,
    read_studies,
    send,
    wait_for_job,
)

pytestmark = pytest.mark.integration


class Prefetched:
    """The network after one order went through the engine."""

    def __init__(
        self, network: Network, engine: EngineProcess, scenario: Scenario, store: Path
    ) -> None:
        self.network = network
        self.engine = engine
        self.scenario = scenario
        self.store = store
        self.message = b""
        self.ack: list[str] = []
        self.job_id = 0


@pytest.fixture(scope="module")
def prefetched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prefetched]:
    folder = tmp_path_factory.mktemp("prefetch")
    scenario = prefetch_scenario(dt.date.today())
    network = Network(folder)
    network.start()
    engine = None
    try:
        network.load(scenario)
        config = network.write_engine_config(folder / "engine" / "engine.yaml")
        engine = EngineProcess(config, network.ports.mllp, folder / "engine.log")
        engine.start()
        state = Prefetched(network, engine, scenario, folder / "engine" / "fdqr.sqlite")
        state.message = order_message(
            scenario.local_patient, "ORD1", "ACC-NEW-1", dt.datetime.now()
        )
        state.ack = send(network.ports.mllp, state.message)
        [job] = read_jobs(state.store)
        state.job_id = job.id
        wait_for_job(state.store, job.id)
        yield state
    finally:
        if engine is not None:
            status = engine.stop()
            assert status == 0, engine.log_text()[-3000:]
        network.stop()


def test_order_acknowledged_aa(prefetched: Prefetched) -> None:
    msh, msa = prefetched.ack
    assert msa == "MSA|AA|ORD1"
    assert msh.split("|")[2:6] == ["FDQR", "LOCAL", "RIS", "RADIOLOGY"]


def test_job_done_with_counts(prefetched: Prefetched) -> None:
    [job] = [job for job in read_jobs(prefetched.store) if job.id == prefetched.job_id]
    assert job.state == JobState.DONE
    studies = {
        s.study_instance_uid: s for s in read_studies(prefetched.store, job.id) if s.selected
    }
    for key in prefetched.scenario.expected_moved:
        spec = prefetched.scenario.study(key)
        record = studies[spec.uid]
        assert record.state == StudyState.STORED
        assert (record.found, record.received, record.stored) == (spec.instance_count,) * 3
    for key in prefetched.scenario.expected_present:
        assert studies[prefetched.scenario.study(key).uid].state == StudyState.PRESENT


def test_destination_holds_exactly_expected(prefetched: Prefetched) -> None:
    scenario = prefetched.scenario
    local = prefetched.network.sites["local_pacs"]
    expected = {
        scenario.study(key).uid for key in scenario.expected_moved + scenario.expected_present
    }
    assert local.study_uids() == expected
    for key in scenario.must_not_move:
        assert scenario.study(key).uid not in local.study_uids()
    total = sum(
        scenario.study(key).instance_count
        for key in scenario.expected_moved + scenario.expected_present
    )
    assert local.instance_count() == total


@pytest.mark.parametrize("key", ["a-ct-chest-1y", "a-mr-brain-2y", "b-ct-head-3y"])
def test_every_instance_stamped_pixels_identical(prefetched: Prefetched, key: str) -> None:
    scenario = prefetched.scenario
    spec = scenario.study(key)
    remote = scenario.remote_patient_of(key)
    source = prefetched.network.sites["hospital_a" if key.startswith("a-") else "hospital_b"]
    stored = instances_of_study(prefetched.network.sites["local_pacs"], spec.uid)
    assert len(stored) == spec.instance_count

    for instance in stored:
        assert instance.PatientID == scenario.local_patient.id
        assert instance.IssuerOfPatientID == "LOCAL"
        assert instance.PatientName == scenario.local_patient.name
        assert instance.PatientBirthDate == scenario.local_patient.birth_date
        others = [
            (item.PatientID, item.IssuerOfPatientID) for item in instance.OtherPatientIDsSequence
        ]
        assert others == [(remote.id, remote.issuer)]
        original = instance_by_uid(source, instance.SOPInstanceUID)
        assert instance.PixelData == original.PixelData
        assert instance.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert instance.StudyInstanceUID == original.StudyInstanceUID
        assert instance.SeriesInstanceUID == original.SeriesInstanceUID


def test_duplicate_message_gets_same_ack_and_no_job(prefetched: Prefetched) -> None:
    jobs_before = len(read_jobs(prefetched.store))
    again = send(prefetched.network.ports.mllp, prefetched.message)
    assert again == prefetched.ack
    assert len(read_jobs(prefetched.store)) == jobs_before


def test_reused_control_id_gets_ae(prefetched: Prefetched) -> None:
    scenario = prefetched.scenario
    other = order_message(scenario.local_patient, "ORD1", "ACC-OTHER", dt.datetime.now())
    jobs_before = len(read_jobs(prefetched.store))
    answer = send(prefetched.network.ports.mllp, other)
    assert answer[1] == "MSA|AE|ORD1"
    assert "|MSH^1^10|205^Duplicate key identifier^HL70357|" in answer[2]
    assert len(read_jobs(prefetched.store)) == jobs_before


def test_repeated_order_is_suppressed(prefetched: Prefetched) -> None:
    scenario = prefetched.scenario
    local = prefetched.network.sites["local_pacs"]
    count_before = local.instance_count()
    # The RIS sends the same order (same accession number) with a new MSH-10.
    message = order_message(scenario.local_patient, "ORD2", "ACC-NEW-1", dt.datetime.now())
    assert send(prefetched.network.ports.mllp, message)[1] == "MSA|AA|ORD2"
    job = read_jobs(prefetched.store)[-1]
    assert job.id != prefetched.job_id
    assert job.state == JobState.SUPPRESSED
    assert job.summary == f"repeated order: job {prefetched.job_id} already covers this order"
    assert read_studies(prefetched.store, job.id) == []
    assert local.instance_count() == count_before


def test_new_order_stores_no_second_copy(prefetched: Prefetched) -> None:
    scenario = prefetched.scenario
    local = prefetched.network.sites["local_pacs"]
    count_before = local.instance_count()
    message = order_message(scenario.local_patient, "ORD5", "ACC-NEW-5", dt.datetime.now())
    assert send(prefetched.network.ports.mllp, message)[1] == "MSA|AA|ORD5"
    job = wait_for_job(prefetched.store, max(job.id for job in read_jobs(prefetched.store)))
    assert job.state == JobState.DONE
    assert job.summary.startswith("0 studies stored (0 instances), 4 already at the destination")
    assert local.instance_count() == count_before


def test_bad_message_answered_and_connection_usable(prefetched: Prefetched) -> None:
    scenario = prefetched.scenario
    with hl7.client.MLLPClient("127.0.0.1", prefetched.network.ports.mllp) as client:
        garbage = ack_segments(client.send_message(b"MSH|^~\\&|RIS|RAD\rP!D|broken"))
        assert garbage[1] == "MSA|AR|"
        assert garbage[2].startswith("ERR||P!D^2^0|100^Segment sequence error^HL70357|E")
        no_control_id = ack_segments(
            client.send_message(b"MSH|^~\\&|RIS|RAD|F|L|2026||ORM^O01\rPID|1")
        )
        assert no_control_id[1] == "MSA|AE|"
        assert "|MSH^1^10|101^Required field missing^HL70357|" in no_control_id[2]
        unknown_type = ack_segments(
            client.send_message(
                order_message(scenario.local_patient, "ORD3", "ACC3", dt.datetime.now()).replace(
                    b"ORM^O01", b"ORU^R01"
                )
            )
        )
        assert unknown_type[1] == "MSA|AR|ORD3"
        assert "200^Unsupported message type" in unknown_type[2]
        good = ack_segments(
            client.send_message(
                order_message(
                    scenario.local_patient, "ORD4", "ACC4", dt.datetime.now(), order_control="SC"
                )
            )
        )
        assert good[1] == "MSA|AA|ORD4"
    assert prefetched.engine.running
