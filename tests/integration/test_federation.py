"""The federated Q/R SCP with DCMTK clients in front and real Orthanc sites behind it."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import io
import time
import urllib.request
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from engine.audit import event_code, participant_name
from engine.testing.adt import demographics_message
from engine.testing.dicomgen import (
    PatientSpec,
    SeriesSpec,
    StudySpec,
    build_study,
    encode,
    uid_for,
)
from engine.testing.scenario import Scenario, prefetch_scenario
from engine.testing.sites import EngineProcess, Network
from tests.conftest import audit_file_messages
from tests.integration.conftest import send
from tests.integration.dcmtk import StoreSCP, findscu, getscu, movescu, run_tool

pytestmark = pytest.mark.integration

SITE_TIMEOUT_SECONDS = 8
# Audit EventIDs.
QUERY = "110112"
TRANSFERRED = "110104"
PATIENT_RECORD = "110110"
SECURITY_ALERT = "110113"
LOCAL_STUDIES = (
    "a-ct-chest-1y",
    "a-mr-brain-2y",
    "a-cr-chest-6m",
    "a-ct-abdomen-7y",
    "b-ct-head-3y",
    "b-mr-knee-4y",
    "b-ct-neck-4y6m",
)


class Federated:
    def __init__(
        self, network: Network, engine: EngineProcess, scenario: Scenario, destination: StoreSCP
    ) -> None:
        self.network = network
        self.engine = engine
        self.scenario = scenario
        self.destination = destination

    @property
    def port(self) -> int:
        return self.network.ports.dicom

    def audit_records(self, event: str, user: str, count: int = 1) -> list[ElementTree.Element]:
        """Wait for the audit records of an event that name a user, at least count of them."""
        deadline = time.monotonic() + 10
        while True:
            path = self.engine.config.parent / "audit.log"
            found = [
                message
                for message in (audit_file_messages(path) if path.exists() else [])
                if event_code(message) == event
                and any(
                    participant.attrib["UserID"] == user
                    for participant in message.findall("ActiveParticipant")
                )
            ]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def outcome(message: ElementTree.Element) -> tuple[str, str]:
    event = message.find("EventIdentification")
    assert event is not None
    return event.attrib["EventOutcomeIndicator"], event.findtext("EventOutcomeDescription") or ""


def roles(message: ElementTree.Element) -> dict[str, tuple[str, str]]:
    """Each active participant's role code and whether it is the requestor, by user ID."""
    found = {}
    for participant in message.findall("ActiveParticipant"):
        role = participant.find("RoleIDCode")
        found[participant_name(participant)] = (
            "" if role is None else role.attrib["csd-code"],
            participant.attrib["UserIsRequestor"],
        )
    return found


def object_ids(message: ElementTree.Element) -> list[str]:
    return [
        item.attrib["ParticipantObjectID"]
        for item in message.findall("ParticipantObjectIdentification")
    ]


def details(message: ElementTree.Element) -> dict[str, str]:
    """The participant object details of a record, decoded."""
    return {
        detail.attrib["type"]: base64.b64decode(detail.attrib["value"]).decode()
        for detail in message.findall("ParticipantObjectIdentification/ParticipantObjectDetail")
    }


def query_of(message: ElementTree.Element) -> Dataset:
    """Decode the query identifier that a Query audit record carries."""
    encoded = message.findtext("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert encoded
    detail = message.find("ParticipantObjectIdentification/ParticipantObjectDetail")
    assert detail is not None
    syntax = base64.b64decode(detail.attrib["value"]).decode()
    implicit = syntax == "1.2.840.10008.1.2"
    return read_dataset(io.BytesIO(base64.b64decode(encoded)), implicit, True)


@pytest.fixture(scope="module")
def federated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federated]:
    folder = tmp_path_factory.mktemp("federation")
    scenario = prefetch_scenario(dt.date.today())
    network = Network(folder)
    destination = StoreSCP("STORESCP", folder / "destination")
    network.start()
    destination.start()
    engine = None
    try:
        network.load(scenario)
        site = {"timeout_seconds": SITE_TIMEOUT_SECONDS}
        federation = {
            "enabled": True,
            "callers": {
                "FINDSCU": {},
                "MOVESCU": {"move_destinations": ["STORESCP"]},
                "GETSCU": {},
            },
            "move_destinations": {"STORESCP": {"host": "127.0.0.1", "port": destination.port}},
            "sites": {
                "hospital_a": site,
                "hospital_b": site,
                "local_pacs": {**site, "issuer": "LOCAL", "queries_without_patient_id": True},
            },
        }
        config = network.write_engine_config(
            folder / "engine" / "engine.yaml", overrides={"federation": federation}
        )
        engine = EngineProcess(config, network.ports.mllp, folder / "engine.log")
        engine.start()
        yield Federated(network, engine, scenario, destination)
    finally:
        if engine is not None:
            status = engine.stop()
            assert status == 0, engine.log_text()[-3000:]
        destination.stop()
        network.stop()


def study_uid(key: str) -> str:
    return uid_for("study", key)


def others(row: Dataset) -> list[tuple[str, str]]:
    return [
        (item.PatientID, item.IssuerOfPatientID) for item in row.get("OtherPatientIDsSequence", [])
    ]


STUDY_KEYS = {
    "PatientID": "L12345",
    "IssuerOfPatientID": None,
    "StudyInstanceUID": None,
    "StudyDate": None,
    "StudyDescription": None,
    "ModalitiesInStudy": None,
    "NumberOfStudyRelatedInstances": None,
    "OtherPatientIDsSequence[0].PatientID": None,
    "OtherPatientIDsSequence[0].IssuerOfPatientID": None,
}


def test_find_merges_every_site_under_local_id(federated: Federated, tmp_path: Path) -> None:
    run, rows = findscu(federated.port, "FINDSCU", "STUDY", STUDY_KEYS, tmp_path)
    assert run.final.status == 0x0000, run.output[-2000:]
    assert run.final.error_comment == ""

    [record] = federated.audit_records(QUERY, "FINDSCU")
    assert outcome(record) == ("0", "")
    query = query_of(record)
    assert (query.QueryRetrieveLevel, query.PatientID) == ("STUDY", "L12345")

    uids = [str(row.StudyInstanceUID) for row in rows]
    assert sorted(uids) == sorted(study_uid(key) for key in LOCAL_STUDIES)
    for row in rows:
        assert row.PatientID == "L12345"
        assert row.IssuerOfPatientID == "LOCAL"
        assert row.RetrieveAETitle == "FDQR"


def test_find_returns_study_of_two_sites_once(federated: Federated, tmp_path: Path) -> None:
    _, rows = findscu(federated.port, "FINDSCU", "STUDY", STUDY_KEYS, tmp_path)
    chest = [row for row in rows if row.StudyInstanceUID == study_uid("a-ct-chest-1y")]
    assert len(chest) == 1
    assert others(chest[0]) in ([("HA-778899", "HOSP_A")], [("HB-4455", "HOSP_B")])
    [brain] = [row for row in rows if row.StudyInstanceUID == study_uid("a-mr-brain-2y")]
    assert others(brain) == [("HA-778899", "HOSP_A")]
    [knee] = [row for row in rows if row.StudyInstanceUID == study_uid("b-mr-knee-4y")]
    assert int(knee.NumberOfStudyRelatedInstances) == 12


def test_find_leaves_out_other_patients(federated: Federated, tmp_path: Path) -> None:
    _, rows = findscu(federated.port, "FINDSCU", "STUDY", STUDY_KEYS, tmp_path)
    uids = {str(row.StudyInstanceUID) for row in rows}
    assert study_uid("a-other-patient-ct") not in uids
    assert study_uid("b-namesake-ct") not in uids


def test_find_matches_wildcard_and_date_range(federated: Federated, tmp_path: Path) -> None:
    today = dt.date.today()
    since = (today - dt.timedelta(days=round(3.5 * 365.25))).strftime("%Y%m%d")
    pairs = {**STUDY_KEYS, "StudyDescription": "CT*", "StudyDate": f"{since}-"}
    run, rows = findscu(federated.port, "FINDSCU", "STUDY", pairs, tmp_path)
    assert run.final.status == 0x0000
    assert sorted(str(row.StudyInstanceUID) for row in rows) == sorted(
        [study_uid("a-ct-chest-1y"), study_uid("b-ct-head-3y")]
    )


def test_find_series_of_known_study(federated: Federated, tmp_path: Path) -> None:
    findscu(federated.port, "FINDSCU", "STUDY", STUDY_KEYS, tmp_path / "study")
    pairs = {
        "StudyInstanceUID": study_uid("a-ct-chest-1y"),
        "SeriesInstanceUID": None,
        "SeriesDescription": None,
        "Modality": None,
        "NumberOfSeriesRelatedInstances": None,
    }
    run, rows = findscu(federated.port, "FINDSCU", "SERIES", pairs, tmp_path / "series")
    assert run.final.status == 0x0000
    assert sorted(str(row.SeriesDescription) for row in rows) == ["AXIAL 2.5MM", "CORONAL MPR"]
    assert {row.PatientID for row in rows} == {"L12345"}


def test_find_images_level_by_level(federated: Federated, tmp_path: Path) -> None:
    pairs = {
        "PatientID": "L12345",
        "StudyDescription": "CHEST PA*",
        "SOPInstanceUID": None,
        "InstanceNumber": None,
    }
    run, rows = findscu(federated.port, "FINDSCU", "IMAGE", pairs, tmp_path)
    assert run.final.status == 0x0000
    assert len(rows) == 2
    assert {str(row.StudyInstanceUID) for row in rows} == {study_uid("a-cr-chest-6m")}


def test_find_patient_level_one_row(federated: Federated, tmp_path: Path) -> None:
    pairs = {
        "PatientID": "L12345",
        "PatientName": None,
        "IssuerOfPatientID": None,
        "OtherPatientIDsSequence": None,
    }
    run, rows = findscu(federated.port, "FINDSCU", "PATIENT", pairs, tmp_path, root="-P")
    assert run.final.status == 0x0000
    assert [(row.PatientID, row.IssuerOfPatientID) for row in rows] == [("L12345", "LOCAL")]
    # Every site's identifier of the patient, whichever site responded first.
    listed = {(item.PatientID, item.IssuerOfPatientID) for item in rows[0].OtherPatientIDsSequence}
    assert listed == {("HA-778899", "HOSP_A"), ("HB-4455", "HOSP_B")}


def test_find_without_patient_id_only_where_allowed(federated: Federated, tmp_path: Path) -> None:
    chest = {"AccessionNumber": "HA-ACC-1001", "StudyInstanceUID": None, "PatientID": None}
    run, rows = findscu(federated.port, "FINDSCU", "STUDY", chest, tmp_path / "chest")
    assert run.final.status == 0x0000
    assert rows == []

    knee = {"AccessionNumber": "HB-ACC-5210", "StudyInstanceUID": None, "PatientID": None}
    run, rows = findscu(federated.port, "FINDSCU", "STUDY", knee, tmp_path / "knee")
    assert [(str(row.StudyInstanceUID), row.PatientID) for row in rows] == [
        (study_uid("b-mr-knee-4y"), "L12345")
    ]


def test_find_unknown_patient_no_rows(federated: Federated, tmp_path: Path) -> None:
    run, rows = findscu(
        federated.port, "FINDSCU", "STUDY", {**STUDY_KEYS, "PatientID": "X1"}, tmp_path
    )
    assert run.final.status == 0x0000
    assert rows == []


def test_find_unknown_caller_refused(federated: Federated, tmp_path: Path) -> None:
    run, rows = findscu(federated.port, "STRANGER", "STUDY", STUDY_KEYS, tmp_path)
    assert run.final.status == 0x0124
    assert rows == []
    [record] = federated.audit_records(QUERY, "STRANGER")
    assert outcome(record) == ("8", "status 0x0124: AE title STRANGER is not allowed")
    [alert] = federated.audit_records(SECURITY_ALERT, "STRANGER")
    assert outcome(alert) == ("4", "C-FIND refused: AE title STRANGER is not allowed")
    assert roles(alert)["STRANGER"] == ("", "true")


def test_move_delivers_stamped_study_with_counts(federated: Federated) -> None:
    federated.destination.clear()
    run = movescu(
        federated.port,
        "MOVESCU",
        "STORESCP",
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid("b-ct-head-3y")},
    )
    assert run.final.status == 0x0000, run.output[-3000:]
    assert run.final.count("Completed") == 50
    assert run.final.count("Failed") == 0
    assert run.pending
    for response in run.pending:
        counts = [response.count(name) for name in ("Remaining", "Completed", "Failed", "Warning")]
        assert sum(count or 0 for count in counts) == 50

    received = federated.destination.received()
    assert len(received) == 50
    for instance in received:
        assert instance.StudyInstanceUID == study_uid("b-ct-head-3y")
        assert instance.PatientID == "L12345"
        assert instance.IssuerOfPatientID == "LOCAL"
        assert others(instance) == [("HB-4455", "HOSP_B")]
        # The engine has no local record of the patient yet: the site's name stays.
        assert instance.PatientName == "DOE^JANE^MARIE"

    [record] = federated.audit_records(TRANSFERRED, "MOVESCU")
    assert outcome(record) == ("0", "")
    assert roles(record) == {
        "FDQR": ("", "false"),
        "HOSP_B": ("110153", "false"),
        "STORESCP": ("110152", "false"),
        "MOVESCU": ("", "true"),
    }
    assert object_ids(record) == [study_uid("b-ct-head-3y"), "L12345^^^LOCAL"]
    # The retrieve's objects left the spool, and so did the space they took there.
    deadline = time.monotonic() + 10
    while spool_bytes(federated.network.ports.web) != 0:
        assert time.monotonic() < deadline, spool_bytes(federated.network.ports.web)
        time.sleep(0.2)
    assert not list((federated.engine.config.parent / "spool").rglob("*.dcm"))


def spool_bytes(web_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    [line] = [line for line in text.splitlines() if line.startswith("fdqr_spool_bytes ")]
    return float(line.split()[1])


def test_local_record_in_answers_and_objects(federated: Federated, tmp_path: Path) -> None:
    # identity.check (normalised) finds this equal to the sites' DOE^JANE^MARIE.
    local = dataclasses.replace(federated.scenario.local_patient, name="Doe^Jane^M")
    message = demographics_message(local, "FED-A08", dt.datetime.now())
    assert send(federated.network.ports.mllp, message)[1] == "MSA|AA|FED-A08"

    _, rows = findscu(
        federated.port, "FINDSCU", "STUDY", {**STUDY_KEYS, "PatientName": None}, tmp_path
    )
    assert sorted(str(row.StudyInstanceUID) for row in rows) == sorted(
        study_uid(key) for key in LOCAL_STUDIES
    )
    assert {str(row.PatientName) for row in rows} == {"Doe^Jane^M"}

    federated.destination.clear()
    run = movescu(
        federated.port,
        "MOVESCU",
        "STORESCP",
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid("a-cr-chest-6m")},
    )
    assert run.final.status == 0x0000, run.output[-3000:]
    received = federated.destination.received()
    assert len(received) == 2
    for instance in received:
        assert instance.PatientID == "L12345"
        assert instance.PatientName == "Doe^Jane^M"
        assert instance.PatientBirthDate == local.birth_date


def test_move_one_series_never_queried(federated: Federated) -> None:
    federated.destination.clear()
    series = uid_for("series", "a-ct-abdomen-7y", "1")
    run = movescu(
        federated.port,
        "MOVESCU",
        "STORESCP",
        {
            "QueryRetrieveLevel": "SERIES",
            "StudyInstanceUID": study_uid("a-ct-abdomen-7y"),
            "SeriesInstanceUID": series,
        },
    )
    assert run.final.status == 0x0000, run.output[-3000:]
    assert run.final.count("Completed") == 30
    received = federated.destination.received()
    assert {instance.SeriesInstanceUID for instance in received} == {series}
    assert {instance.PatientID for instance in received} == {"L12345"}


def test_get_delivers_stamped_study(federated: Federated, tmp_path: Path) -> None:
    run = getscu(
        federated.port,
        "GETSCU",
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid("a-cr-chest-6m")},
        tmp_path,
    )
    assert run.final.status == 0x0000, run.output[-3000:]
    assert run.final.count("Completed") == 2

    received = [dcmread(path) for path in tmp_path.iterdir()]
    assert len(received) == 2
    for instance in received:
        assert instance.PatientID == "L12345"
        assert others(instance) == [("HA-778899", "HOSP_A")]

    [record] = federated.audit_records(TRANSFERRED, "GETSCU")
    assert outcome(record) == ("0", "")
    assert roles(record) == {
        "FDQR": ("", "false"),
        "HOSP_A": ("110153", "false"),
        "GETSCU": ("110152", "true"),
    }
    assert object_ids(record) == [study_uid("a-cr-chest-6m"), "L12345^^^LOCAL"]


def test_get_decompresses_for_uncompressed_only_caller(
    federated: Federated, tmp_path: Path
) -> None:
    # getscu offers only uncompressed transfer syntaxes; the knee MR is stored RLE Lossless.
    run = getscu(
        federated.port,
        "GETSCU",
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid("b-mr-knee-4y")},
        tmp_path,
    )
    assert run.final.status == 0x0000, run.output[-3000:]
    assert run.final.count("Completed") == 12

    received = [dcmread(path) for path in tmp_path.iterdir()]
    assert len(received) == 12
    for instance in received:
        assert not instance.file_meta.TransferSyntaxUID.is_compressed
        assert instance.PatientID == "L12345"
        assert len(instance.PixelData) == instance.Rows * instance.Columns * 2
        # Served by the local PACS or hospital B: never the local ID as another ID.
        assert ("L12345", "LOCAL") not in others(instance)
    assert not list(federated.engine.config.parent.rglob("*.transcoded.partial"))


def test_move_unknown_destination_a801(federated: Federated) -> None:
    run = movescu(
        federated.port,
        "MOVESCU",
        "NOWHERE",
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid("b-ct-head-3y")},
    )
    assert run.final.status == 0xA801
    assert run.pending == []
    [alert] = federated.audit_records(SECURITY_ALERT, "MOVESCU")
    assert event_code(alert, "EventTypeCode") == "110132"
    assert outcome(alert) == ("4", "C-MOVE refused: move destination NOWHERE is not allowed")


def test_move_without_study_uid_a900(federated: Federated) -> None:
    run = movescu(federated.port, "MOVESCU", "STORESCP", {"QueryRetrieveLevel": "STUDY"})
    assert run.final.status == 0xA900
    assert "StudyInstanceUID" in run.final.error_comment


def test_move_cancelled_by_caller(federated: Federated) -> None:
    federated.destination.clear()
    run = movescu(
        federated.port,
        "MOVESCU",
        "STORESCP",
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid("a-ct-chest-1y")},
        extra=["--cancel", "3"],
    )
    assert run.final.status == 0xFE00, run.output[-3000:]
    completed = run.final.count("Completed") or 0
    remaining = run.final.count("Remaining") or 0
    assert 3 <= completed < 100
    assert completed + remaining + (run.final.count("Failed") or 0) == 100
    assert len(federated.destination.received()) == completed


def test_find_cancelled_while_site_is_slow(federated: Federated, tmp_path: Path) -> None:
    hospital_b = federated.network.sites["hospital_b"]
    hospital_b.pause()
    try:
        run, rows = findscu(
            federated.port, "FINDSCU", "STUDY", STUDY_KEYS, tmp_path, extra=["--cancel", "1"]
        )
    finally:
        hospital_b.resume()
    assert run.final.status == 0xFE00, run.output[-3000:]
    assert run.elapsed_seconds < SITE_TIMEOUT_SECONDS
    assert len(rows) >= 1


def test_find_with_stopped_site_answers_in_time(federated: Federated, tmp_path: Path) -> None:
    hospital_b = federated.network.sites["hospital_b"]
    hospital_b.pause()
    try:
        run, rows = findscu(federated.port, "FINDSCU", "STUDY", STUDY_KEYS, tmp_path)
    finally:
        hospital_b.resume()
    assert run.final.status == 0x0000
    assert run.final.error_comment.startswith("no answer from hospital_b (timed out")
    assert run.elapsed_seconds < SITE_TIMEOUT_SECONDS + 10
    uids = {str(row.StudyInstanceUID) for row in rows}
    assert study_uid("a-mr-brain-2y") in uids
    assert study_uid("b-mr-knee-4y") in uids
    assert study_uid("b-ct-head-3y") not in uids
    assert "hospital_b timed out" in federated.engine.log_text()


def test_find_with_site_down_reports_failure(federated: Federated, tmp_path: Path) -> None:
    hospital_b = federated.network.sites["hospital_b"]
    records_before = len(federated.audit_records(QUERY, "FINDSCU"))
    hospital_b.stop()
    try:
        run, rows = findscu(federated.port, "FINDSCU", "STUDY", STUDY_KEYS, tmp_path)
    finally:
        hospital_b.start()
    assert run.final.status == 0x0000
    assert run.final.error_comment == "no answer from hospital_b (failed)"
    records = federated.audit_records(QUERY, "FINDSCU", records_before + 1)
    assert outcome(records[-1]) == ("4", "no answer from hospital_b (failed)")
    assert run.elapsed_seconds < SITE_TIMEOUT_SECONDS
    uids = {str(row.StudyInstanceUID) for row in rows}
    assert study_uid("a-mr-brain-2y") in uids
    assert study_uid("b-ct-head-3y") not in uids


def test_find_with_every_site_down_audited_in_full(federated: Federated, tmp_path: Path) -> None:
    sites = [federated.network.sites[name] for name in ("hospital_a", "hospital_b", "local_pacs")]
    records_before = len(federated.audit_records(QUERY, "FINDSCU"))
    for site in sites:
        site.stop()
    try:
        run, rows = findscu(federated.port, "FINDSCU", "STUDY", STUDY_KEYS, tmp_path)
    finally:
        for site in sites:
            site.start()
    assert run.final.status == 0xC001
    assert rows == []
    records = federated.audit_records(QUERY, "FINDSCU", records_before + 1)
    # The response's Error Comment is cut to 64 characters; the record has the whole text.
    assert outcome(records[-1]) == (
        "8",
        "status 0xC001: no answer from hospital_a (failed), hospital_b (failed),"
        " local_pacs (failed)",
    )


def test_echo_answered(federated: Federated) -> None:
    command = ["echoscu", "-v", "-aet", "FINDSCU", "-aec", "FDQR", "127.0.0.1", str(federated.port)]
    run = run_tool(command)
    assert "Received Echo Response (Success)" in run.output, run.output[-2000:]


def test_find_drops_studies_of_another_patient(federated: Federated, tmp_path: Path) -> None:
    # An ADT gives patient L67890 the hospital B ID HB-7777, which belongs to another
    # person there. Hospital B then returns that person's study, whose name, birth date
    # and sex give it away.
    stranger = PatientSpec("HB-7777", "HOSP_B", "DOE^JOHN", "19700101", "M")
    series = (SeriesSpec("CT_small.dcm", 2, "CT"),)
    spec = StudySpec("b-stranger-ct", dt.date(2025, 1, 2), "CT STRANGER", "ACC-STR", series)
    for dataset in build_study(stranger, spec):
        federated.network.sites["hospital_b"].upload(encode(dataset))
    other = PatientSpec("L67890", "LOCAL", "ROE^RICHARD", "19580101", "M")
    message = demographics_message(other, "FED-ROE", dt.datetime.now(), "A08", ["HB-7777^^^HOSP_B"])
    assert send(federated.network.ports.mllp, message)[1] == "MSA|AA|FED-ROE"

    run, rows = findscu(
        federated.port, "FINDSCU", "STUDY", {**STUDY_KEYS, "PatientID": "L67890"}, tmp_path
    )
    assert run.final.status == 0x0000
    assert spec.uid not in {str(row.StudyInstanceUID) for row in rows}
    log = federated.engine.log_text()
    assert "hospital_b: dropped a match of HB-7777^^^HOSP_B for local patient L67890^^^LOCAL" in log


def test_adt_learns_no_identifier_of_table_patient(federated: Federated, tmp_path: Path) -> None:
    # The identity table gives HB-4455 to L12345, so an ADT of L67890 listing it learns nothing.
    other = PatientSpec("L67890", "LOCAL", "ROE^RICHARD", "19580101", "M")
    message = demographics_message(
        other, "FED-ROE2", dt.datetime.now(), "A08", ["HB-4455^^^HOSP_B"]
    )
    assert send(federated.network.ports.mllp, message)[1] == "MSA|AA|FED-ROE2"
    _, rows = findscu(
        federated.port, "FINDSCU", "STUDY", {**STUDY_KEYS, "PatientID": "L67890"}, tmp_path
    )
    assert not {str(row.StudyInstanceUID) for row in rows} & {
        study_uid(key) for key in LOCAL_STUDIES
    }
    assert "which the identity table assigns to L12345^^^LOCAL" in federated.engine.log_text()

    [record] = [
        message
        for message in federated.audit_records(PATIENT_RECORD, "HIS|HOSPITAL")
        if details(message) == {"MSH-9": "ADT^A08", "MSH-10": "FED-ROE2"}
    ]
    assert object_ids(record) == ["L67890^^^LOCAL"]
    event = record.find("EventIdentification")
    assert event is not None and event.attrib["EventActionCode"] == "U"
    assert roles(record) == {"HIS|HOSPITAL": ("110153", "true"), "FDQR": ("110152", "false")}
    [sender] = [
        p for p in record.findall("ActiveParticipant") if p.attrib["UserIsRequestor"] == "true"
    ]
    assert sender.attrib["NetworkAccessPointID"] == "127.0.0.1"
