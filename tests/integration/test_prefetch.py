"""The whole prefetch path on real peers: an HL7 order in, priors stamped into the local PACS."""

from __future__ import annotations

import datetime as dt
import socket
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import hl7.client
import pytest
import yaml

from engine.audit import event_code
from engine.jobs.store import JobState, StudyState
from engine.testing.scenario import Scenario, order_message, prefetch_scenario
from engine.testing.sites import EngineProcess, Network
from tests.conftest import audit_file_messages, audit_message
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
        # The audit repository: a UDP socket the engine sends syslog messages to.
        self.syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.syslog.bind(("127.0.0.1", 0))
        self.syslog.settimeout(0.5)

    @property
    def audit_file(self) -> Path:
        return self.store.parent / "audit.log"

    def syslog_messages(self) -> list[ElementTree.Element]:
        messages = []
        while True:
            try:
                messages.append(audit_message(self.syslog.recv(65535)))
            except TimeoutError:
                return messages


@pytest.fixture(scope="module")
def prefetched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prefetched]:
    folder = tmp_path_factory.mktemp("prefetch")
    scenario = prefetch_scenario(dt.date.today())
    network = Network(folder)
    network.start()
    engine = None
    try:
        network.load(scenario)
        state = Prefetched(network, None, scenario, folder / "engine" / "fdqr.sqlite")  # type: ignore[arg-type]
        syslog_port = state.syslog.getsockname()[1]
        config = network.write_engine_config(
            folder / "engine" / "engine.yaml",
            overrides={"audit": {"syslog": f"udp:127.0.0.1:{syslog_port}"}},
        )
        engine = EngineProcess(config, network.ports.mllp, folder / "engine.log")
        state.engine = engine
        engine.start()
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
            # The engine's last audit record is its Application Stop.
            last = audit_file_messages(folder / "engine" / "audit.log")[-1]
            assert event_code(last, "EventTypeCode") == "110121"
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
        assert garbage[2].startswith("ERR||P!D^2|100^Segment sequence error^HL70357|E")
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


def transferred_studies(messages: list[ElementTree.Element]) -> dict[str, ElementTree.Element]:
    """The DICOM Instances Transferred records by the study UID they name."""
    found = {}
    for message in messages:
        if event_code(message) != "110104":
            continue
        for item in message.findall("ParticipantObjectIdentification"):
            if item.attrib["ParticipantObjectTypeCode"] == "2":
                found[item.attrib["ParticipantObjectID"]] = message
    return found


def test_audit_records_each_moved_study_with_local_patient(prefetched: Prefetched) -> None:
    scenario = prefetched.scenario
    nodes = yaml.safe_load(prefetched.engine.config.read_text())["nodes"]
    sources = {
        study.study_instance_uid: nodes[study.source]["ae_title"]
        for study in read_studies(prefetched.store, prefetched.job_id)
        if study.state == StudyState.STORED
    }
    messages = audit_file_messages(prefetched.audit_file)
    assert event_code(messages[0], "EventTypeCode") == "110120"

    transferred = transferred_studies(messages)
    moved = {scenario.study(key).uid for key in scenario.expected_moved}
    assert set(transferred) == moved
    for uid in moved:
        message = transferred[uid]
        event = message.find("EventIdentification")
        assert event is not None and event.attrib["EventOutcomeIndicator"] == "0"
        roles = {
            participant.attrib["UserID"]: participant.find("RoleIDCode")
            for participant in message.findall("ActiveParticipant")
        }
        source, destination = roles[sources[uid]], roles[nodes["local_pacs"]["ae_title"]]
        assert source is not None and source.attrib["csd-code"] == "110153"
        assert destination is not None and destination.attrib["csd-code"] == "110152"
        patients = [
            item.attrib["ParticipantObjectID"]
            for item in message.findall("ParticipantObjectIdentification")
            if item.attrib["ParticipantObjectTypeCode"] == "1"
        ]
        assert patients == [f"{scenario.local_patient.id}^^^LOCAL"]

    text = prefetched.audit_file.read_text()
    for placement in scenario.placements:
        family_name = placement.patient.name.split("^")[0]
        assert family_name not in text
        assert placement.patient.birth_date not in text


def test_audit_records_reach_syslog_over_udp(prefetched: Prefetched) -> None:
    received = prefetched.syslog_messages()
    assert event_code(received[0], "EventTypeCode") == "110120"
    assert set(transferred_studies(received)) == {
        prefetched.scenario.study(key).uid for key in prefetched.scenario.expected_moved
    }
