"""HL7 parsing, acknowledgements and the translation of orders into events."""

from __future__ import annotations

import datetime as dt

import pytest

from engine.hl7.ack import AckError, AckHeader, acknowledgements, build_ack, split_acks
from engine.hl7.codes import AckCode, ErrorCode, Verdict
from engine.hl7.events import IdentifierPolicy, Unhandled, check_header, to_event, to_events
from engine.hl7.message import (
    CharsetDefaults,
    Delimiters,
    HL7Error,
    escape,
    parse,
    parse_timestamp,
    same_message,
)
from engine.jobs.planner import event_label
from engine.model import (
    DemographicsUpdated,
    OrderCancelled,
    OrderChanged,
    OrderPlaced,
    OrderStatusChanged,
    PatientIdentifier,
    PatientsMerged,
)
from engine.testing.dicomgen import PatientSpec
from engine.testing.scenario import order_message

POLICY = IdentifierPolicy(issuer="LOCAL", authorities=("LOCAL",))
PATIENT = PatientSpec("L1", "LOCAL", "DOE^JANE^M", "19650312", "F")
WHEN = dt.datetime(2026, 3, 14, 9, 30)


def order(**options: object) -> bytes:
    return order_message(PATIENT, "MSG1", "ACC1", WHEN, **options)  # type: ignore[arg-type]


def test_parse_reads_fields_by_segment_id() -> None:
    message = parse(order())
    assert message.message_type == "ORM^O01"
    assert message.control_id == "MSG1"
    assert message.get("OBR", 24) == "CT"
    assert message.get("OBR", 4, 2) == "CT Chest"
    assert message.get("PID", 3, 4, repetition=2) == "NATIONAL"


def test_parse_extra_segment_shifts_nothing() -> None:
    text = order().replace(b"\rPID|", b"\rEVN|O01|20260314\rZXY|custom\rPID|")
    message = parse(text)
    assert message.get("PID", 5, 1) == "DOE"
    assert message.get("OBR", 24) == "CT"


def test_parse_delimiters_from_msh() -> None:
    text = b"MSH#@*$%#RIS#RAD#FDQR#LOCAL#2026##ORM@O01#7#P#2.5\rPID#1##A1@@@LOCAL*A2@@@OTHER\r"
    message = parse(text)
    assert message.message_type == "ORM^O01"
    assert message.get("PID", 3, 1, repetition=2) == "A2"
    ack = build_ack(AckHeader.from_message(message), AckCode.APPLICATION_ACCEPT)
    assert ack.startswith(b"MSH#@*$%#FDQR#LOCAL#RIS#RAD#")
    assert b"\rMSA#AA#7\r" in ack


def test_parse_accepts_lf_and_crlf_between_segments() -> None:
    for separator in (b"\n", b"\r\n"):
        message = parse(order().replace(b"\r", separator))
        assert message.get("OBR", 24) == "CT"
        assert [segment.id for segment in message.segments] == ["MSH", "PID", "PV1", "ORC", "OBR"]


def test_parse_bare_lf_inside_field_is_data() -> None:
    text = b"MSH|^~\\&|RIS|RAD|F|L|2026||ORM^O01|1|P|2.5\rNTE|1||line one\nline two\r"
    message = parse(text)
    assert message.get("NTE", 3) == "line one\nline two"


def test_parse_unescapes_after_splitting() -> None:
    text = b"MSH|^~\\&|RIS|RAD|F|L|2026||ORM^O01|1|P|2.5\rNTE|1||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\X41\\\r"
    assert parse(text).get("NTE", 3) == "a|b^c&d~e\\fA"


def test_parse_charset_from_msh18() -> None:
    text = "MSH|^~\\&|RIS|RAD|F|L|2026||ORM^O01|1|P|2.5||||||8859/1\rPID|1||X||MÜLLER^JÖRG\r"
    message = parse(text.encode("latin-1"))
    assert message.get("PID", 5, 1) == "MÜLLER"


def test_parse_undecodable_is_application_error() -> None:
    text = b"MSH|^~\\&|RIS|RAD|F|L|2026||ORM^O01|1|P|2.5||||||UNICODE UTF-8\rPID|1||X||\xff\xfe\r"
    with pytest.raises(HL7Error) as raised:
        parse(text)
    assert raised.value.ack == AckCode.APPLICATION_ERROR
    assert raised.value.code == ErrorCode.DATA_TYPE_ERROR


@pytest.mark.parametrize(
    "text",
    [b"", b"PID|1||X\r", b"MSH", b"MSH|\rPID|", b"MSH|^^\\&|x\r", b"MSH|^~\\&|R\rP!D|x\r"],
)
def test_parse_rejects_malformed(text: bytes) -> None:
    with pytest.raises(HL7Error) as raised:
        parse(text)
    assert raised.value.ack == AckCode.APPLICATION_REJECT


def test_parse_timestamp_forms() -> None:
    assert parse_timestamp("20260314") == dt.datetime(2026, 3, 14)
    assert parse_timestamp("202603140930") == dt.datetime(2026, 3, 14, 9, 30)
    stamped = parse_timestamp("20260314093015.25+0100")
    assert stamped is not None
    assert stamped.utcoffset() == dt.timedelta(hours=1)
    assert stamped.microsecond == 250000
    assert parse_timestamp("2026-03-14") is None
    assert parse_timestamp("20261399") is None


def test_ack_swaps_sender_and_echoes_control_id() -> None:
    message = parse(order())
    ack = build_ack(AckHeader.from_message(message), AckCode.APPLICATION_ACCEPT).decode()
    msh, msa = ack.rstrip("\r").split("\r")
    fields = msh.split("|")
    assert fields[2:6] == ["FDQR", "LOCAL", "RIS", "RADIOLOGY"]
    assert fields[8] == "ACK^O01^ACK"
    assert fields[11] == "2.5.1"
    assert fields[17] == "UNICODE UTF-8"
    assert msa == "MSA|AA|MSG1"


def test_ack_error_segment_has_location_and_code() -> None:
    message = parse(order())
    error = AckError(ErrorCode.REQUIRED_FIELD_MISSING, "PID-3 | missing", ("PID", 1, 3))
    ack = build_ack(AckHeader.from_message(message), AckCode.APPLICATION_ERROR, [error]).decode()
    err = ack.rstrip("\r").split("\r")[2].split("|")
    assert err[0] == "ERR"
    assert err[2] == "PID^1^3"
    assert err[3] == "101^Required field missing^HL70357"
    assert err[4] == "E"
    assert err[8] == "PID-3 \\F\\ missing"


def test_ack_header_from_unparsable_bytes() -> None:
    header = AckHeader.from_raw(b"garbage\rMSH|^~\\&|RIS|RAD|F|L|2026||ORM^O01|C77|P|2.3\r\xff")
    assert header.control_id == "C77"
    assert header.sending_application == "RIS"
    assert AckHeader.from_raw(b"no header at all").control_id == ""


def test_event_new_order() -> None:
    event = to_event(parse(order()), POLICY)
    assert isinstance(event, OrderPlaced)
    assert event.patient == PatientIdentifier("L1", "LOCAL")
    assert event.demographics.name == "DOE^JANE^M"
    assert event.demographics.birth_date == "19650312"
    assert event.demographics.sex == "F"
    assert event.order.accession_number == "ACC1"
    assert event.order.ordered_modality == "CT"
    assert event.order.procedure_code == "CTCHEST"
    assert event.order.order_time == WHEN


def test_event_picks_identifier_by_authority_not_position() -> None:
    text = order().replace(
        b"L1^^^LOCAL^MR~998877^^^NATIONAL^NI", b"998877^^^NATIONAL^NI~L1^^^LOCAL^MR"
    )
    event = to_event(parse(text), POLICY)
    assert isinstance(event, OrderPlaced)
    assert event.patient.value == "L1"


def test_event_without_local_identifier_is_error() -> None:
    text = order().replace(b"L1^^^LOCAL^MR~", b"")
    with pytest.raises(HL7Error) as raised:
        to_event(parse(text), POLICY)
    assert raised.value.location == ("PID", 1, 3)
    assert raised.value.ack == AckCode.APPLICATION_ERROR


@pytest.mark.parametrize(
    ("identifier", "problem"),
    [
        ("L1\\E\\L2", "contains a backslash"),
        ("L1\\X07\\", "contains a control character"),
        ("L" * 65, "is longer than 64 characters"),
    ],
)
def test_event_local_id_not_one_dicom_value(identifier: str, problem: str) -> None:
    # L1\L2 was taken whole and stamped as a PatientID with two values, L1 and L2.
    text = order().replace(b"L1^^^LOCAL^MR", f"{identifier}^^^LOCAL^MR".encode())
    with pytest.raises(HL7Error) as raised:
        to_events(parse(text), POLICY)
    assert raised.value.code == ErrorCode.DATA_TYPE_ERROR
    assert raised.value.location == ("PID", 1, 3)
    assert raised.value.text.startswith(f"the local patient identifier in PID-3 {problem}")


def test_event_identifier_spaces_trimmed() -> None:
    text = order().replace(b"L1^^^LOCAL^MR", b" L1 ^^^LOCAL^MR~ HA-1 ^^^HOSP_A^MR")
    event = to_event(parse(text), POLICY)
    assert isinstance(event, OrderPlaced)
    assert event.patient == PatientIdentifier("L1", "LOCAL")
    assert PatientIdentifier("HA-1", "HOSP_A") in event.identifiers


def test_event_unqualified_identifier_when_allowed() -> None:
    text = order().replace(b"L1^^^LOCAL^MR~998877^^^NATIONAL^NI", b"L1")
    lenient = IdentifierPolicy("LOCAL", ("LOCAL",), unqualified_ids_are_local=True)
    event = to_event(parse(text), lenient)
    assert isinstance(event, OrderPlaced)
    assert event.patient == PatientIdentifier("L1", "LOCAL")
    with pytest.raises(HL7Error):
        to_event(parse(text), POLICY)


@pytest.mark.parametrize("control", ["CA", "DC", "OC", "OD"])
def test_event_cancel(control: str) -> None:
    event = to_event(parse(order(order_control=control)), POLICY)
    assert isinstance(event, OrderCancelled)
    assert event.order_control == control
    assert event.order.placer_order_number == "PLC-MSG1"
    assert event.patient == PatientIdentifier("L1", "LOCAL")


def test_event_change_and_status() -> None:
    changed = to_event(parse(order(order_control="XO")), POLICY)
    assert isinstance(changed, OrderChanged)
    assert changed.order.accession_number == "ACC1"
    status = to_event(parse(order(order_control="SC")), POLICY)
    assert isinstance(status, OrderStatusChanged)
    assert status.status == "SC"
    other = to_event(parse(order(order_control="HD")), POLICY)
    assert isinstance(other, Unhandled)
    assert "'HD'" in other.reason


@pytest.mark.parametrize(
    ("control", "label"),
    [
        ("NW", "new order (ORC-1 NW)"),
        ("XO", "order change (ORC-1 XO)"),
        ("DC", "order cancel (ORC-1 DC)"),
        ("SC", "order status (ORC-1 SC)"),
    ],
)
def test_event_labels_name_order_control(control: str, label: str) -> None:
    assert event_label(to_event(parse(order(order_control=control)), POLICY)) == label


def test_event_missing_order_control() -> None:
    with pytest.raises(HL7Error) as raised:
        to_event(parse(order(order_control="")), POLICY)
    assert raised.value.location == ("ORC", 1, 1)
    assert raised.value.code == ErrorCode.REQUIRED_FIELD_MISSING


@pytest.mark.parametrize(
    ("control", "text"),
    [
        ("ZZ", "ORC-1 order control 'ZZ' is not in HL7 Table 0119"),
        ("nw", "ORC-1 order control 'nw' is not in HL7 Table 0119 (codes are upper case: NW)"),
    ],
)
def test_event_unknown_order_control(control: str, text: str) -> None:
    with pytest.raises(HL7Error) as raised:
        to_event(parse(order(order_control=control)), POLICY)
    assert str(raised.value) == text
    assert raised.value.location == ("ORC", 1, 1)
    assert raised.value.code == ErrorCode.TABLE_VALUE_NOT_FOUND


def test_event_order_lists_qualified_identifiers() -> None:
    event = to_event(parse(order()), POLICY)
    assert isinstance(event, OrderPlaced)
    assert event.identifiers == (
        PatientIdentifier("L1", "LOCAL"),
        PatientIdentifier("998877", "NATIONAL"),
    )


ADT = (
    "MSH|^~\\&|HIS|ADT|FDQR|LOCAL|20260314||ADT^{trigger}|A{trigger}|P|2.5\r"
    "EVN|{trigger}|20260314\r"
    "PID|1||L1^^^LOCAL^MR~HA-9^^^HOSP_A&1.2.3&ISO^MR||DOE^JANE||19650312|F\r"
)


@pytest.mark.parametrize("trigger", ["A01", "A04", "A08"])
def test_event_demographics_update(trigger: str) -> None:
    event = to_event(parse(ADT.format(trigger=trigger).encode()), POLICY)
    assert isinstance(event, DemographicsUpdated)
    assert event.patient == PatientIdentifier("L1", "LOCAL")
    assert event.demographics.name == "DOE^JANE"
    assert event.identifiers == (
        PatientIdentifier("L1", "LOCAL"),
        PatientIdentifier("HA-9", "HOSP_A"),
    )


def test_event_merge_reads_mrg() -> None:
    text = ADT.format(trigger="A40") + "MRG|L0^^^LOCAL^MR\r"
    event = to_event(parse(text.encode()), POLICY)
    assert isinstance(event, PatientsMerged)
    assert event.surviving == PatientIdentifier("L1", "LOCAL")
    assert event.retired == PatientIdentifier("L0", "LOCAL")


def test_event_merge_without_mrg() -> None:
    with pytest.raises(HL7Error) as raised:
        to_event(parse(ADT.format(trigger="A40").encode()), POLICY)
    assert raised.value.location == ("MRG", 1, 1)


def test_check_header_missing_control_id() -> None:
    message = parse(order().replace(b"|MSG1|", b"||"))
    with pytest.raises(HL7Error) as raised:
        check_header(message)
    assert raised.value.code == ErrorCode.REQUIRED_FIELD_MISSING
    assert raised.value.location == ("MSH", 1, 10)


def test_check_header_unsupported_type() -> None:
    message = parse(order().replace(b"ORM^O01", b"ORU^R01"))
    with pytest.raises(HL7Error) as raised:
        check_header(message)
    assert raised.value.code == ErrorCode.UNSUPPORTED_MESSAGE_TYPE
    assert raised.value.ack == AckCode.APPLICATION_REJECT


def test_event_identifier_by_configured_authority_order() -> None:
    text = order().replace(
        b"L1^^^LOCAL^MR~998877^^^NATIONAL^NI", b"OLD7^^^LOCAL_OLD^MR~L1^^^LOCAL^MR"
    )
    preferred = IdentifierPolicy("LOCAL", ("LOCAL", "LOCAL_OLD"))
    fallback = IdentifierPolicy("LOCAL", ("LOCAL_OLD", "LOCAL"))
    assert to_event(parse(text), preferred).patient == PatientIdentifier("L1", "LOCAL")  # type: ignore[union-attr]
    assert to_event(parse(text), fallback).patient == PatientIdentifier("OLD7", "LOCAL")  # type: ignore[union-attr]


def test_event_authority_by_universal_id() -> None:
    text = order().replace(b"L1^^^LOCAL^MR", b"L1^^^&1.2.3.4&ISO^MR")
    policy = IdentifierPolicy("LOCAL", ("1.2.3.4",))
    event = to_event(parse(text), policy)
    assert isinstance(event, OrderPlaced)
    assert event.patient == PatientIdentifier("L1", "LOCAL")


def test_event_two_local_identifiers_is_error() -> None:
    text = order().replace(b"~998877^^^NATIONAL^NI", b"~L2^^^LOCAL^MR")
    with pytest.raises(HL7Error) as raised:
        to_event(parse(text), POLICY)
    assert raised.value.code == ErrorCode.DUPLICATE_KEY_IDENTIFIER
    assert raised.value.ack == AckCode.APPLICATION_ERROR
    assert "L1, L2" in raised.value.text


def test_event_same_local_identifier_twice_is_fine() -> None:
    text = order().replace(b"~998877^^^NATIONAL^NI", b"~L1^^^LOCAL^PI")
    assert to_event(parse(text), POLICY).patient == PatientIdentifier("L1", "LOCAL")  # type: ignore[union-attr]


def test_event_null_identifier_means_no_value() -> None:
    text = order().replace(
        b"L1^^^LOCAL^MR~998877^^^NATIONAL^NI", b'""^^^LOCAL^MR~L1^^^""~L9^^^LOCAL'
    )
    event = to_event(parse(text), POLICY)
    assert event.patient == PatientIdentifier("L9", "LOCAL")  # type: ignore[union-attr]
    only_null = order().replace(b"L1^^^LOCAL^MR~998877^^^NATIONAL^NI", b'""')
    with pytest.raises(HL7Error) as raised:
        to_event(parse(only_null), POLICY)
    assert raised.value.code == ErrorCode.REQUIRED_FIELD_MISSING


def test_events_one_per_order_group() -> None:
    second = b"ORC|CA|PLC-2|FIL-2\rOBR|1|PLC-2|FIL-2|MRBRAIN^MR Brain^LOCAL\rNTE|1||note\r"
    events = to_events(parse(order() + second), POLICY)
    assert [type(event).__name__ for event in events] == ["OrderPlaced", "OrderCancelled"]
    assert events[0].order.placer_order_number == "PLC-MSG1"  # type: ignore[union-attr]
    assert events[1].order.placer_order_number == "PLC-2"  # type: ignore[union-attr]
    assert events[1].order.procedure_code == "MRBRAIN"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        to_event(parse(order() + second), POLICY)


def test_events_invalid_second_group_rejects_message() -> None:
    second = b"ORC||PLC-2\rOBR|1|PLC-2\r"
    with pytest.raises(HL7Error) as raised:
        to_events(parse(order() + second), POLICY)
    assert raised.value.location == ("ORC", 2, 1)


def test_events_second_patient_rejects_message() -> None:
    # Without the check, PLC-2 was filed under the first PID's patient (L1).
    second = b"PID|2||L2^^^LOCAL^MR\rORC|NW|PLC-2|FIL-2\rOBR|1|PLC-2|FIL-2\r"
    adt = ADT.format(trigger="A08") + "PID|2||L2^^^LOCAL^MR\r"
    # SIU^S12 allows a group appointment, which the engine does not split.
    siu = (
        "MSH|^~\\&|RIS|RAD|FDQR|LOCAL|20260314||SIU^S12|S1|P|2.5\r"
        "SCH|APT-1|FAPT-1\rPID|1||L1^^^LOCAL^MR\rPID|2||L2^^^LOCAL^MR\r"
        "RGS|1\rAIS|1||CTHEAD^CT Head^LOCAL|20260320083000\r"
    )
    for message in (order() + second, adt.encode(), siu.encode()):
        with pytest.raises(HL7Error) as raised:
            to_events(parse(message), POLICY)
        assert raised.value.code == ErrorCode.SEGMENT_SEQUENCE_ERROR
        assert raised.value.location == ("PID", 2, 0)
        assert raised.value.ack == AckCode.APPLICATION_ERROR


def test_event_order_number_namespaces() -> None:
    second = b"ORC|NW|PLC-2^CARDIO||\rOBR|1|PLC-2^CARDIO|FIL-2^PACS|MRBRAIN^MR Brain^LOCAL\r"
    events = to_events(parse(order() + second), POLICY)
    orders = [event.order for event in events]  # type: ignore[union-attr]
    assert [(o.placer_order_number, o.placer_namespace) for o in orders][1] == ("PLC-2", "CARDIO")
    # An empty ORC-3 is read from OBR-3, namespace included.
    assert (orders[1].filler_order_number, orders[1].filler_namespace) == ("FIL-2", "PACS")


def test_event_merge_pairs() -> None:
    text = (
        ADT.format(trigger="A40")
        + "MRG|L0^^^LOCAL^MR\r"
        + "PID|2||L5^^^LOCAL^MR\rMRG|L4^^^LOCAL^MR\r"
    )
    events = to_events(parse(text.encode()), POLICY)
    assert [(e.surviving.value, e.retired.value) for e in events] == [("L1", "L0"), ("L5", "L4")]  # type: ignore[union-attr]


def test_event_merge_second_mrg_rejected() -> None:
    # Without the check, the second MRG (L4) was dropped and the message got AA.
    text = ADT.format(trigger="A40") + "MRG|L0^^^LOCAL^MR\rMRG|L4^^^LOCAL^MR\r"
    with pytest.raises(HL7Error) as raised:
        to_events(parse(text.encode()), POLICY)
    assert raised.value.code == ErrorCode.SEGMENT_SEQUENCE_ERROR
    assert raised.value.location == ("MRG", 2, 0)


def test_event_merge_into_itself_rejected() -> None:
    text = ADT.format(trigger="A40") + "MRG|L1^^^LOCAL^MR\r"
    with pytest.raises(HL7Error) as raised:
        to_event(parse(text.encode()), POLICY)
    assert raised.value.ack == AckCode.APPLICATION_ERROR
    assert raised.value.code == ErrorCode.DUPLICATE_KEY_IDENTIFIER
    assert raised.value.location == ("MRG", 1, 1)


def test_event_schedule_is_order() -> None:
    text = (
        "MSH|^~\\&|RIS|RAD|FDQR|LOCAL|20260314||SIU^S12|S1|P|2.5\r"
        "SCH|APT-1|FAPT-1|||||||||^^^20260320080000|||||||||||||||PLC-9|FIL-9\r"
        "PID|1||L1^^^LOCAL^MR||DOE^JANE||19650312|F\r"
        "RGS|1\r"
        "AIS|1||CTHEAD^CT Head^LOCAL|20260320083000\r"
    )
    event = to_event(parse(text.encode()), POLICY)
    assert isinstance(event, OrderPlaced)
    assert event.patient == PatientIdentifier("L1", "LOCAL")
    assert event.order.placer_order_number == "PLC-9"
    assert event.order.filler_order_number == "FIL-9"
    assert event.order.procedure_code == "CTHEAD"
    assert event.order.scheduled_time == dt.datetime(2026, 3, 20, 8, 30)
    assert event.order.order_time == dt.datetime(2026, 3, 14)
    assert event.message is not None


def test_parse_sender_charset_default() -> None:
    charsets = CharsetDefaults(
        "UNICODE UTF-8", {("OLD", "RAD"): "8859/1", ("WIN", ""): "WINDOWS-1252"}
    )
    for sender, facility, codec in (
        ("OLD", "RAD", "iso8859-1"),
        ("OLD", "ER", "utf-8"),
        ("WIN", "ANY", "cp1252"),
        ("RIS", "RAD", "utf-8"),
    ):
        text = f"MSH|^~\\&|{sender}^1.2^ISO|{facility}|F|L|2026||ORM^O01|1|P|2.5\r".encode()
        assert parse(text, charsets).charset == codec


def test_parse_msh18_wins_over_sender_default() -> None:
    charsets = CharsetDefaults("UNICODE UTF-8", {("OLD", ""): "8859/1"})
    text = "MSH|^~\\&|OLD|RAD|F|L|2026||ORM^O01|1|P|2.5||||||UNICODE UTF-8\rPID|1||X||JÖRG\r"
    assert parse(text.encode(), charsets).get("PID", 5) == "JÖRG"


def test_parse_unknown_charset_is_ae_103() -> None:
    text = b"MSH|^~\\&|RIS|RAD|F|L|2026||ORM^O01|1|P|2.5||||||KLINGON\r"
    with pytest.raises(HL7Error) as raised:
        parse(text)
    assert raised.value.code == ErrorCode.TABLE_VALUE_NOT_FOUND
    assert raised.value.ack == AckCode.APPLICATION_ERROR
    assert raised.value.location == ("MSH", 1, 18)
    assert raised.value.log_text == "unsupported character set in MSH-18: 'KLINGON'"


def test_unknown_charset_not_like_a_name_not_logged() -> None:
    text = b"MSH|^~\\&|RIS|RAD|F|L|2026||ORM^O01|1|P|2.5||||||DOE JANE 19650312!\r"
    with pytest.raises(HL7Error) as raised:
        parse(text)
    assert raised.value.log_text == (
        "unsupported character set in MSH-18 (a value of 18 characters)"
    )


def test_escape_line_breaks() -> None:
    assert escape("a\rb\nc|", Delimiters()) == "a\\X0D\\b\\X0A\\c\\F\\"


def test_split_acks_round_trip() -> None:
    header = AckHeader.from_message(parse(order()))
    acks = [build_ack(header, AckCode.COMMIT_ACCEPT), build_ack(header, AckCode.APPLICATION_ACCEPT)]
    assert split_acks(b"".join(acks)) == acks
    assert split_acks(b"") == []


def test_acknowledgements_original_mode_one_ack() -> None:
    header = AckHeader.from_message(parse(order()))
    [ack] = acknowledgements(header, Verdict.REJECT)
    assert b"\rMSA|AR|MSG1\r" in ack


def test_ack_header_from_raw_invalid_delimiters_defaults() -> None:
    header = AckHeader.from_raw(b"MSH\x01\x00\x00|x|y\r")
    assert header.delimiters == Delimiters()
    header = AckHeader.from_raw(b"MSH|^^\\&|RIS\r")
    assert header.delimiters == Delimiters()


def test_ack_header_from_raw_keeps_valid_ack_modes() -> None:
    header = AckHeader.from_raw(b"MSH|^~\\&|R|F|A|L|2026||ORM^O01|C1|P|2.5|||AL|ER\r\xff")
    assert (header.accept_ack_type, header.application_ack_type) == ("AL", "ER")
    invalid = AckHeader.from_raw(b"MSH|^~\\&|R|F|A|L|2026||ORM^O01|C1|P|2.5|||ZZ|ER\r\xff")
    assert not invalid.enhanced_mode


def test_same_message_ignores_msh7_and_line_breaks() -> None:
    original = order()
    resent = original.replace(b"|20260314093000||", b"|20260314094500||", 1)
    resent = resent.replace(b"\r", b"\r\n")
    assert same_message(original, resent)
    assert not same_message(original, original.replace(b"ACC1", b"ACC2"))
    assert not same_message(original, original.replace(b"|MSG1|", b"|MSG2|"))
