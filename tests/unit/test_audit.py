"""IHE ATNA audit records: message content, syslog framing, sinks and failures."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import socket
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from engine.audit import (
    Action,
    Auditor,
    FileSink,
    Node,
    Outcome,
    UdpSink,
    event_code,
    participant_name,
    read_syslog_message,
)
from engine.config import syslog_address
from engine.model import PatientIdentifier
from tests.conftest import NOW, audit_message

PATIENT = PatientIdentifier("L12345", "LOCAL")
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


class ListSink:
    name = "memory"

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def send(self, message: bytes) -> None:
        self.messages.append(message)

    def close(self) -> None:
        pass


def auditor(*sinks: object, now: dt.datetime = NOW) -> Auditor:
    return Auditor("FDQR", site="Network North", sinks=sinks, now=lambda: now, hostname="pacs-gw")  # type: ignore[arg-type]


def participants(message: ElementTree.Element) -> dict[str, ElementTree.Element]:
    """The active participants by AE title (the engine's is in AlternativeUserID)."""
    return {participant_name(item): item for item in message.findall("ActiveParticipant")}


def role(participant: ElementTree.Element) -> str:
    element = participant.find("RoleIDCode")
    return "" if element is None else element.attrib["csd-code"]


def objects(message: ElementTree.Element) -> dict[str, ElementTree.Element]:
    return {
        item.attrib["ParticipantObjectID"]: item
        for item in message.findall("ParticipantObjectIdentification")
    }


def id_type(item: ElementTree.Element) -> tuple[str, str]:
    element = item.find("ParticipantObjectIDTypeCode")
    assert element is not None
    return element.attrib["csd-code"], element.attrib["codeSystemName"]


def test_study_transferred_names_nodes_study_and_patient() -> None:
    sink = ListSink()
    auditor(sink).study_transferred(
        PATIENT,
        STUDY_UID,
        Node("HOSP_A", "10.1.2.3"),
        Node("LOCAL_PACS", "pacs.example.org"),
        Outcome.SUCCESS,
    )

    [line] = sink.messages
    message = audit_message(line)
    event = message.find("EventIdentification")
    assert event is not None
    assert event_code(message) == "110104"
    assert event.attrib["EventActionCode"] == "C"
    assert event.attrib["EventOutcomeIndicator"] == "0"
    assert event.attrib["EventDateTime"] == "2026-03-14T09:30:00.000+00:00"

    people = participants(message)
    assert set(people) == {"FDQR", "HOSP_A", "LOCAL_PACS"}
    assert people["FDQR"].attrib["UserIsRequestor"] == "true"
    assert people["FDQR"].attrib["UserID"] == str(os.getpid())
    assert people["FDQR"].attrib["AlternativeUserID"] == "AETITLES=FDQR"
    assert (role(people["HOSP_A"]), people["HOSP_A"].attrib["UserIsRequestor"]) == (
        "110153",
        "false",
    )
    assert people["HOSP_A"].attrib["NetworkAccessPointTypeCode"] == "2"
    assert role(people["LOCAL_PACS"]) == "110152"
    assert people["LOCAL_PACS"].attrib["NetworkAccessPointID"] == "pacs.example.org"
    assert people["LOCAL_PACS"].attrib["NetworkAccessPointTypeCode"] == "1"

    items = objects(message)
    assert set(items) == {STUDY_UID, "L12345^^^LOCAL"}
    study, patient = items[STUDY_UID], items["L12345^^^LOCAL"]
    assert (study.attrib["ParticipantObjectTypeCode"], id_type(study)) == ("2", ("110180", "DCM"))
    assert patient.attrib["ParticipantObjectTypeCode"] == "1"
    assert patient.attrib["ParticipantObjectTypeCodeRole"] == "1"
    assert id_type(patient) == ("2", "RFC-3881")

    source = message.find("AuditSourceIdentification")
    assert source is not None
    assert source.attrib == {"AuditSourceID": "FDQR", "AuditEnterpriseSiteID": "Network North"}


def test_incomplete_transfer_is_minor_failure_with_description() -> None:
    sink = ListSink()
    auditor(sink).study_transferred(
        PATIENT,
        STUDY_UID,
        Node("HOSP_A", "127.0.0.1"),
        Node("LOCAL_PACS", "127.0.0.1"),
        Outcome.MINOR_FAILURE,
        "3 of 120 instances failed",
    )

    message = audit_message(sink.messages[0])
    event = message.find("EventIdentification")
    assert event is not None
    assert event.attrib["EventOutcomeIndicator"] == "4"
    assert event.findtext("EventOutcomeDescription") == "3 of 120 instances failed"


def test_application_start_and_stop_records() -> None:
    sink = ListSink()
    audit = auditor(sink)
    audit.application_started()
    audit.application_stopped()

    started, stopped = (audit_message(line) for line in sink.messages)
    assert [event_code(started), event_code(started, "EventTypeCode")] == ["110100", "110120"]
    assert [event_code(stopped), event_code(stopped, "EventTypeCode")] == ["110100", "110121"]
    [engine] = participants(started).values()
    assert role(engine) == "110150"
    assert engine.attrib["UserIsRequestor"] == "false"


def encoded_query() -> bytes:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = "L12345"
    query.StudyInstanceUID = ""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, query)
    return buffer.getvalue()


def test_query_record_carries_the_identifier_as_received() -> None:
    sink = ListSink()
    identifier = encoded_query()
    auditor(sink).query_answered(
        Node("WORKSTATION", "127.0.0.1"),
        "1.2.840.10008.5.1.4.1.2.2.1",
        identifier,
        "1.2.840.10008.1.2.1",
        Outcome.SUCCESS,
    )

    message = audit_message(sink.messages[0])
    assert event_code(message) == "110112"
    caller = participants(message)["WORKSTATION"]
    assert (role(caller), caller.attrib["UserIsRequestor"]) == ("110153", "true")
    assert role(participants(message)["FDQR"]) == "110152"

    [item] = objects(message).values()
    assert item.attrib["ParticipantObjectID"] == "1.2.840.10008.5.1.4.1.2.2.1"
    assert id_type(item) == ("110181", "DCM")
    assert base64.b64decode(item.findtext("ParticipantObjectQuery") or "") == identifier
    detail = item.find("ParticipantObjectDetail")
    assert detail is not None
    assert detail.attrib["type"] == "TransferSyntax"
    assert base64.b64decode(detail.attrib["value"]) == b"1.2.840.10008.1.2.1"


def test_syslog_header_is_rfc5424_with_ihe_message_id() -> None:
    sink = ListSink()
    auditor(sink).application_started()

    header, _, _ = sink.messages[0].partition(b"\xef\xbb\xbf")
    fields = header.decode().split(" ")
    assert fields[:3] == ["<85>1", "2026-03-14T09:30:00.000Z", "pacs-gw"]
    assert fields[3] == "fdqr"
    assert fields[4].isdigit()
    assert fields[5:] == ["IHE+RFC-3881", "-", ""]


def test_values_are_escaped_in_xml() -> None:
    sink = ListSink()
    auditor(sink).study_transferred(
        PatientIdentifier('A<1>&"2', "LOCAL"),
        STUDY_UID,
        Node("HOSP_A", "127.0.0.1"),
        Node("LOCAL_PACS", "127.0.0.1"),
        Outcome.SERIOUS_FAILURE,
        "status <0xA702> & more",
    )

    message = audit_message(sink.messages[0])
    assert 'A<1>&"2^^^LOCAL' in objects(message)
    event = message.find("EventIdentification")
    assert event is not None
    assert event.findtext("EventOutcomeDescription") == "status <0xA702> & more"


def test_without_sinks_nothing_is_built() -> None:
    audit = Auditor("FDQR")
    audit.application_started()
    assert not audit.enabled
    assert (audit.sent, audit.failed) == (0, 0)


def test_udp_sink_sends_one_datagram_per_record() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    port = receiver.getsockname()[1]
    sink = UdpSink("127.0.0.1", port)
    try:
        audit = auditor(sink)
        audit.application_started()
        audit.application_stopped()
        first, second = receiver.recv(65535), receiver.recv(65535)
    finally:
        sink.close()
        receiver.close()

    assert event_code(audit_message(first), "EventTypeCode") == "110120"
    assert event_code(audit_message(second), "EventTypeCode") == "110121"
    assert audit.sent == 2


def test_file_sink_appends_one_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "var" / "audit.log"
    for _ in range(2):
        sink = FileSink(path)
        auditor(sink).study_transferred(
            PATIENT,
            STUDY_UID,
            Node("HOSP_A", "127.0.0.1"),
            Node("LOCAL_PACS", "127.0.0.1"),
            Outcome.MINOR_FAILURE,
            "first line\nsecond line",
        )
        sink.close()

    lines = path.read_bytes().splitlines()
    assert len(lines) == 2
    for line in lines:
        event = audit_message(line).find("EventIdentification")
        assert event is not None
        assert event.findtext("EventOutcomeDescription") == "first line second line"


class FlakySink(ListSink):
    """Raises a disk error while broken; takes messages again when repaired."""

    name = "/var/log/audit.log"

    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    def send(self, message: bytes) -> None:
        if self.broken:
            raise OSError(28, "No space left on device")
        super().send(message)

    def close(self) -> None:
        raise OSError(28, "No space left on device")


def test_file_sink_creates_file_again_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = FileSink(path)
    sink.send(b"first")
    path.rename(tmp_path / "audit.log.1")
    sink.send(b"second")
    (tmp_path / "audit.log.1").unlink()
    path.unlink()
    sink.send(b"third")
    sink.close()
    assert path.read_bytes() == b"third\n"


def test_file_sink_ends_cut_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = FileSink(path)
    real_write = os.write
    calls = [0]

    def disk_fills_once(fd: int, data: bytes) -> int:
        calls[0] += 1
        if calls[0] == 1:
            return real_write(fd, data[:7])
        return real_write(fd, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "write", disk_fills_once)
        with pytest.raises(OSError, match="only 7 of 13 bytes written"):
            sink.send(b"first record")
        sink.send(b"second")
    sink.close()
    assert path.read_bytes().splitlines() == [b"first r", b"second"]


def test_file_sink_write_error_raised() -> None:
    sink = FileSink(Path("/dev/full"))
    with pytest.raises(OSError, match="No space left on device"):
        sink.send(b"lost")
    sink.close()


def test_failing_sink_counted_and_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [100.0]
    flaky, working = FlakySink(), ListSink()
    lost: list[str] = []
    audit = Auditor(
        "FDQR",
        sinks=[flaky, working],
        monotonic=lambda: clock[0],
        on_failed=lost.append,
    )

    with caplog.at_level(logging.WARNING, logger="engine.audit"):
        audit.application_started()
        audit.application_started()
        clock[0] += 61
        audit.application_started()
        flaky.broken = False
        audit.application_stopped()

    assert (audit.failed, audit.sent) == (3, 5)
    assert len(working.messages) == 4
    assert len(flaky.messages) == 1
    assert lost == ["/var/log/audit.log"] * 3
    assert [record.getMessage() for record in caplog.records] == [
        "audit record Application Activity not sent to /var/log/audit.log:"
        " No space left on device (1 records not sent to it since it last took one)",
        "audit record Application Activity not sent to /var/log/audit.log:"
        " No space left on device (3 records not sent to it since it last took one)",
        "audit: /var/log/audit.log takes records again; 3 records were not sent to it",
    ]


def test_close_reports_losses_and_never_fails(caplog: pytest.LogCaptureFixture) -> None:
    audit = Auditor("FDQR", sinks=[FlakySink()])
    audit.application_started()
    closed: list[object] = []
    with caplog.at_level(logging.WARNING, logger="engine.audit"):
        audit.close().addBoth(closed.append)
    assert closed == [None]
    assert "audit: 1 records were not sent since the start" in caplog.text
    assert "audit: closing /var/log/audit.log failed: [Errno 28] No space left on device" in (
        caplog.text
    )


def test_stop_without_recorded_start_makes_no_record() -> None:
    sink = ListSink()
    audit = auditor(sink)
    audit.application_stopped()
    assert sink.messages == []


def test_large_query_identifier_left_out_of_record() -> None:
    sink = ListSink()
    auditor(sink).query_answered(
        Node("WORKSTATION", "127.0.0.1"),
        "1.2.840.10008.5.1.4.1.2.2.1",
        b"\x00" * 20000,
        "1.2.840.10008.1.2",
        Outcome.SUCCESS,
    )
    message = audit_message(sink.messages[0])
    assert message.find("ParticipantObjectIdentification/ParticipantObjectQuery") is None
    event = message.find("EventIdentification")
    assert event is not None
    assert event.findtext("EventOutcomeDescription") == "query identifier of 20000 bytes left out"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("udp:127.0.0.1:514", ("udp", "127.0.0.1", 514)),
        ("tcp:audit.example.org:601", ("tcp", "audit.example.org", 601)),
        ("tls:audit.example.org:6514", ("tls", "audit.example.org", 6514)),
        ("udp:[::1]:514", ("udp", "::1", 514)),
    ],
)
def test_syslog_address_accepted(value: str, expected: tuple[str, str, int]) -> None:
    assert syslog_address(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "127.0.0.1:514",
        "ssl:127.0.0.1:514",
        "udp:127.0.0.1",
        "tls:host:0",
        "udp::514",
        "udp: 127.0.0.1:514",
    ],
)
def test_syslog_address_rejected_naming_value(value: str) -> None:
    with pytest.raises(ValueError, match=f"invalid syslog address '{value}'"):
        syslog_address(value)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"<85>1 - - fdqr 1 IHE+RFC-3881 - <AuditMessage/>", "no UTF-8 BOM"),
        (b"<85>1 - - fdqr 1 IHE+RFC-3881 - \xef\xbb\xbf<AuditMessage>", "not XML"),
    ],
)
def test_reading_a_malformed_message_names_the_problem(line: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        read_syslog_message(line)


def test_patient_record_names_sender_patient_and_message() -> None:
    sink = ListSink()
    auditor(sink).patient_record(
        Node("RIS|RADIOLOGY", "10.0.0.7"), PATIENT, Action.DELETE, "ADT^A40", "MRG1"
    )

    message = audit_message(sink.messages[0])
    event = message.find("EventIdentification")
    assert event is not None
    assert (event_code(message), event.attrib["EventActionCode"]) == ("110110", "D")
    people = participants(message)
    assert (role(people["RIS|RADIOLOGY"]), people["RIS|RADIOLOGY"].attrib["UserIsRequestor"]) == (
        "110153",
        "true",
    )
    assert people["RIS|RADIOLOGY"].attrib["NetworkAccessPointID"] == "10.0.0.7"
    assert role(people["FDQR"]) == "110152"
    [patient] = objects(message).values()
    assert patient.attrib["ParticipantObjectID"] == "L12345^^^LOCAL"
    details = {
        detail.attrib["type"]: base64.b64decode(detail.attrib["value"]).decode()
        for detail in patient.findall("ParticipantObjectDetail")
    }
    assert details == {"MSH-9": "ADT^A40", "MSH-10": "MRG1"}


def test_refused_request_is_security_alert_for_restricted_function() -> None:
    sink = ListSink()
    auditor(sink).restricted_use(
        Node("INTRUDER", "127.0.0.1"),
        "C-MOVE",
        "1.2.840.10008.5.1.4.1.2.2.2",
        "AE title INTRUDER is not allowed",
    )
    message = audit_message(sink.messages[0])
    assert [event_code(message), event_code(message, "EventTypeCode")] == ["110113", "110132"]
    event = message.find("EventIdentification")
    assert event is not None
    assert event.attrib["EventOutcomeIndicator"] == "4"
    assert event.findtext("EventOutcomeDescription") == (
        "C-MOVE refused: AE title INTRUDER is not allowed"
    )
    assert participants(message)["INTRUDER"].attrib["UserIsRequestor"] == "true"
    [item] = objects(message).values()
    assert item.attrib["ParticipantObjectTypeCodeRole"] == "13"
    assert id_type(item) == ("110181", "DCM")
