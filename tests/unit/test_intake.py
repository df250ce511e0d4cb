"""HL7 intake: store before ACK, duplicates, and every rejection with its ERR segment."""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import logging
from collections.abc import Sequence

import pytest
from twisted.internet import defer

from engine.configfile import Document
from engine.hl7.events import IdentifierPolicy, Unhandled
from engine.hl7.intake import Intake, ignore_reason
from engine.hl7.message import CharsetDefaults
from engine.jobs.planner import Plan
from engine.jobs.store import AsyncStore, NewJob
from engine.model import DomainEvent, OrderPlaced
from engine.rules.model import IgnoredMessages, IgnoreMatch, RuleSet
from engine.testing.dicomgen import PatientSpec
from engine.testing.scenario import order_message
from tests.conftest import NOW
from tests.fakes import ImmediateStore

PATIENT = PatientSpec("L1", "LOCAL", "DOE^JANE", "19650312", "F")
POLICY = IdentifierPolicy(issuer="LOCAL", authorities=("LOCAL",))


def one_job_planner(event: DomainEvent | Unhandled) -> Plan:
    if isinstance(event, Unhandled):
        return Plan((), event.reason)
    if not isinstance(event, OrderPlaced):
        return Plan((), type(event).__name__)
    job = NewJob(
        "route", "rule", "dest", ("src",), event.patient, event.demographics, event.order, NOW
    )
    return Plan([job], "1 job")


def make_intake(db: ImmediateStore) -> tuple[Intake, list[str]]:
    wakes: list[str] = []
    intake = Intake(
        db,  # type: ignore[arg-type]
        one_job_planner,
        POLICY,
        now=lambda: NOW,
        on_jobs_created=lambda: wakes.append("wake"),
    )
    return intake, wakes


def answers(result: defer.Deferred[Sequence[bytes]]) -> list[list[str]]:
    """Return the segments of every ACK of a handler result that has already fired."""
    fired: list[Sequence[bytes]] = []
    result.addCallback(fired.append)
    assert fired, "the ACK Deferred has not fired"
    return [ack.decode().rstrip("\r").split("\r") for ack in fired[0]]


def answer(result: defer.Deferred[Sequence[bytes]]) -> list[str]:
    """Return the segments of the one ACK of a handler result that has already fired."""
    [segments] = answers(result)
    return segments


def order(control_id: str = "MSG1", **options: object) -> bytes:
    return order_message(PATIENT, control_id, "ACC1", dt.datetime(2026, 3, 14), **options)  # type: ignore[arg-type]


def test_fake_store_matches_async_store() -> None:
    for name in ("run", "record_message", "note"):
        fake = inspect.signature(getattr(ImmediateStore, name))
        assert fake == inspect.signature(getattr(AsyncStore, name)), name
    assert inspect.signature(ImmediateStore.record_message) == inspect.signature(
        AsyncStore.record_message
    )


def test_order_stored_then_acknowledged(db: ImmediateStore) -> None:
    intake, wakes = make_intake(db)
    segments = answer(intake.handle_message(order(), "peer"))
    assert segments[1] == "MSA|AA|MSG1"
    assert len(db.store.list_messages()) == 1
    assert len(db.store.list_jobs()) == 1
    assert wakes == ["wake"]


def test_duplicate_gets_stored_ack_and_no_job(db: ImmediateStore) -> None:
    intake, wakes = make_intake(db)
    first = answer(intake.handle_message(order(), "peer"))
    second = answer(intake.handle_message(order(), "peer"))
    assert second == first
    assert len(db.store.list_jobs()) == 1
    assert wakes == ["wake"]


def test_same_control_id_other_sender_is_new(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    answer(intake.handle_message(order(), "peer"))
    answer(intake.handle_message(order(sending_application="RIS2"), "peer"))
    assert len(db.store.list_jobs()) == 2


def test_unparsable_message_gets_ar(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    segments = answer(intake.handle_message(b"this is not HL7", "peer"))
    assert segments[1] == "MSA|AR|"
    assert segments[2].startswith("ERR||MSH^1|100^Segment sequence error^HL70357|E")
    assert db.store.list_messages() == []


@pytest.mark.parametrize("content", [b"MSH\rPID|1", b"MSH\nEVN|A01", b"MSH|^~\rPID|1"])
def test_bare_msh_segment_gets_ar(db: ImmediateStore, content: bytes) -> None:
    intake, _ = make_intake(db)
    segments = answer(intake.handle_message(content, "peer"))
    assert segments[1] == "MSA|AR|"
    assert "|100^Segment sequence error^HL70357|" in segments[2]
    assert db.store.list_messages() == []


def misplaced(field: int, value: bytes) -> bytes:
    """Return an order whose MSH field `field` contains `value`, as in a malformed message."""
    segments = order().split(b"\r")
    fields = segments[0].split(b"|")
    fields += [b""] * (field - len(fields))
    fields[field - 1] = value
    segments[0] = b"|".join(fields)
    return b"\r".join(segments)


@pytest.mark.parametrize(("field", "code"), [(9, "200"), (15, "103"), (18, "103")])
def test_rejection_log_leaves_out_misplaced_values(
    db: ImmediateStore, caplog: pytest.LogCaptureFixture, field: int, code: str
) -> None:
    intake, _ = make_intake(db)
    with caplog.at_level(logging.INFO, logger="engine.hl7.intake"):
        segments = answer(intake.handle_message(misplaced(field, b"DOE^JANE"), "peer"))
    assert f"|{code}^" in segments[2]
    assert "DOE" in segments[2]
    [record] = caplog.records
    assert "DOE" not in record.getMessage()
    assert f"MSH-{field}" in record.getMessage() or "message type" in record.getMessage()


def test_undecodable_message_logged_with_control_id(
    db: ImmediateStore, caplog: pytest.LogCaptureFixture
) -> None:
    intake, _ = make_intake(db)
    text = order(control_id="T209").replace(b"DOE^JANE", "DOÉ^JANE".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="engine.hl7.intake"):
        segments = answer(intake.handle_message(text, "peer"))
    assert segments[1] == "MSA|AE|T209"
    [record] = caplog.records
    assert record.getMessage().startswith("rejected unparsable message T209 from peer: ")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (11, b"T", "|MSH^1^11|202^Unsupported processing id^HL70357|"),
        (11, b"D", "|MSH^1^11|202^Unsupported processing id^HL70357|"),
        (12, b"9.9", "|MSH^1^12|203^Unsupported version id^HL70357|"),
        (12, b"3.0", "|MSH^1^12|203^Unsupported version id^HL70357|"),
    ],
)
def test_other_environment_rejected_ar(
    db: ImmediateStore, field: int, value: bytes, expected: str
) -> None:
    intake, _ = make_intake(db)
    segments = answer(intake.handle_message(misplaced(field, value), "peer"))
    assert segments[1] == "MSA|AR|MSG1"
    assert expected in segments[2]
    assert db.store.list_messages() == []


@pytest.mark.parametrize(("field", "value"), [(11, b"P"), (11, b""), (12, b"2.3"), (12, b"")])
def test_production_and_v2_versions_accepted(db: ImmediateStore, field: int, value: bytes) -> None:
    intake, _ = make_intake(db)
    segments = answer(intake.handle_message(misplaced(field, value), "peer"))
    assert segments[1] == "MSA|AA|MSG1"
    assert len(db.store.list_jobs()) == 1


def test_training_accepted_when_configured(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    intake.interpreter = dataclasses.replace(intake.interpreter, processing_ids=("P", "T"))
    segments = answer(intake.handle_message(misplaced(11, b"T"), "peer"))
    assert segments[1] == "MSA|AA|MSG1"


def test_control_id_read_whole(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    first = answer(intake.handle_message(order(control_id="CTL^X"), "peer"))
    second = answer(intake.handle_message(order(control_id="CTL^Y"), "peer"))
    assert first[1] == "MSA|AA|CTL^X"
    assert second[1] == "MSA|AA|CTL^Y"
    stored = sorted(message.origin.control_id for message in db.store.list_messages())
    assert stored == ["CTL^X", "CTL^Y"]


@pytest.mark.parametrize(
    ("text", "msa", "location"),
    [
        (order(control_id=""), "MSA|AE|", "MSH^1^10"),
        (order().replace(b"|ORM^O01|", b"||"), "MSA|AE|MSG1", "MSH^1^9"),
    ],
)
def test_missing_required_field_gets_ae_101(
    db: ImmediateStore, text: bytes, msa: str, location: str
) -> None:
    intake, _ = make_intake(db)
    segments = answer(intake.handle_message(text, "peer"))
    assert segments[1] == msa
    assert f"|{location}|101^Required field missing^HL70357|" in segments[2]
    assert db.store.list_messages() == []
    assert db.store.list_jobs() == []


def test_unsupported_type_gets_ar_200(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    text = order().replace(b"ORM^O01", b"ORU^R01")
    segments = answer(intake.handle_message(text, "peer"))
    assert segments[1] == "MSA|AR|MSG1"
    assert "|200^Unsupported message type^HL70357|" in segments[2]


def test_unknown_patient_domain_gets_ae(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    text = order().replace(b"L1^^^LOCAL^MR~", b"")
    segments = answer(intake.handle_message(text, "peer"))
    assert segments[1] == "MSA|AE|MSG1"
    assert "|PID^1^3|204^" in segments[2]
    assert db.store.list_messages() == []


def test_store_failure_gets_ae_207_and_nothing_kept(db: ImmediateStore) -> None:
    intake, wakes = make_intake(db)
    db.fail_next = OSError("disk full")
    segments = answer(intake.handle_message(order(), "peer"))
    assert segments[1] == "MSA|AE|MSG1"
    assert "|207^Application internal error^HL70357|" in segments[2]
    assert wakes == []
    # The sender resends; the message is then accepted.
    assert answer(intake.handle_message(order(), "peer"))[1] == "MSA|AA|MSG1"


def test_cancel_is_stored_without_job(db: ImmediateStore) -> None:
    intake, wakes = make_intake(db)
    segments = answer(intake.handle_message(order(order_control="CA"), "peer"))
    assert segments[1] == "MSA|AA|MSG1"
    assert db.store.list_jobs() == []
    assert db.store.list_messages()[0].outcome == "OrderCancelled"
    assert wakes == []


def test_oversize_reject_needs_msh() -> None:
    intake, _ = make_intake(ImmediateStore.__new__(ImmediateStore))
    counted: list[Sequence[bytes]] = []
    intake.on_answered = counted.append
    [ack] = intake.reject_oversize(order()[:200], 20_000_000, "peer", 10_485_760)
    assert b"\rMSA|AR|MSG1\r" in ack
    assert b"exceeds the size limit of 10485760 bytes (mllp.max_message_bytes)" in ack
    assert intake.reject_oversize(b"\x00\x01garbage", 20_000_000, "peer") == []
    # Both count in the metrics: one AR, one without an ACK.
    assert counted == [[ack], []]


def with_ack_modes(text: bytes, accept: str, application: str) -> bytes:
    """Set MSH-15 and MSH-16 of a message built by order_message."""
    return text.replace(b"|P|2.5.1||||||", f"|P|2.5.1|||{accept}|{application}||".encode())


@pytest.mark.parametrize(
    ("accept", "application", "expected"),
    [
        ("AL", "AL", ["MSA|CA|MSG1", "MSA|AA|MSG1"]),
        ("AL", "NE", ["MSA|CA|MSG1"]),
        ("NE", "AL", ["MSA|AA|MSG1"]),
        ("NE", "NE", []),
        ("SU", "ER", ["MSA|CA|MSG1"]),
        ("ER", "SU", ["MSA|AA|MSG1"]),
        ("AL", "", ["MSA|CA|MSG1", "MSA|AA|MSG1"]),
        ("", "NE", ["MSA|CA|MSG1"]),
    ],
)
def test_enhanced_mode_accepted(
    db: ImmediateStore, accept: str, application: str, expected: list[str]
) -> None:
    intake, _ = make_intake(db)
    acks = answers(intake.handle_message(with_ack_modes(order(), accept, application), "peer"))
    assert [segments[1] for segments in acks] == expected
    assert len(db.store.list_jobs()) == 1


@pytest.mark.parametrize(
    ("accept", "application", "expected"),
    [
        ("AL", "AL", ["MSA|CE|MSG1"]),
        ("ER", "AL", ["MSA|CE|MSG1"]),
        ("ER", "NE", ["MSA|CE|MSG1"]),
        ("SU", "ER", ["MSA|AE|MSG1"]),
        ("SU", "SU", []),
        ("NE", "AL", ["MSA|AE|MSG1"]),
    ],
)
def test_enhanced_mode_error(
    db: ImmediateStore, accept: str, application: str, expected: list[str]
) -> None:
    intake, _ = make_intake(db)
    text = with_ack_modes(order().replace(b"L1^^^LOCAL^MR~", b""), accept, application)
    acks = answers(intake.handle_message(text, "peer"))
    assert [segments[1] for segments in acks] == expected
    for segments in acks:
        assert "|PID^1^3|204^Unknown key identifier^HL70357|" in segments[2]
    assert db.store.list_messages() == []


def test_enhanced_mode_reject_is_cr_alone(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    text = with_ack_modes(order().replace(b"ORM^O01", b"ORU^R01"), "AL", "AL")
    acks = answers(intake.handle_message(text, "peer"))
    assert [segments[1] for segments in acks] == ["MSA|CR|MSG1"]
    assert all("|200^Unsupported message type^HL70357|" in segments[2] for segments in acks)


def test_enhanced_application_ack_asks_no_answer(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    commit, application = answers(
        intake.handle_message(with_ack_modes(order(), "AL", "AL"), "peer")
    )
    assert commit[0].split("|")[14:16] == ["", ""]
    assert application[0].split("|")[14:16] == ["NE", "NE"]
    assert application[0].split("|")[17] == "UNICODE UTF-8"


def test_enhanced_duplicate_gets_both_stored_acks(db: ImmediateStore) -> None:
    intake, wakes = make_intake(db)
    text = with_ack_modes(order(), "AL", "AL")
    first = answers(intake.handle_message(text, "peer"))
    second = answers(intake.handle_message(text, "peer"))
    assert second == first
    assert len(first) == 2
    assert len(db.store.list_jobs()) == 1
    assert wakes == ["wake"]


def test_invalid_ack_type_rejected_in_original_mode(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    segments = answer(intake.handle_message(with_ack_modes(order(), "XX", "AL"), "peer"))
    assert segments[1] == "MSA|AR|MSG1"
    assert "|MSH^1^15|103^Table value not found^HL70357|" in segments[2]
    assert db.store.list_messages() == []


def test_incoming_ack_is_not_answered(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    text = b"MSH|^~\\&|RIS|RAD|FDQR|LOCAL|2026||ACK^O01^ACK|A1|P|2.5.1\rMSA|AA|X1\r"
    assert answers(intake.handle_message(text, "peer")) == []
    assert db.store.list_messages() == []


def test_missing_control_id_enhanced_is_ce_101(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    text = with_ack_modes(order(control_id=""), "AL", "NE")
    [segments] = answers(intake.handle_message(text, "peer"))
    assert segments[1] == "MSA|CE|"
    assert "|MSH^1^10|101^Required field missing^HL70357|" in segments[2]
    assert db.store.list_messages() == []


def test_version_2_3_error_uses_err_1(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    text = order(control_id="").replace(b"|P|2.5.1|", b"|P|2.3|")
    segments = answer(intake.handle_message(text, "peer"))
    assert segments[1] == "MSA|AE||MSH-10 (message control id) is missing"
    assert segments[2] == "ERR|MSH^1^10^101&Required field missing&HL70357"


def test_ack_uses_message_delimiters(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    text = order().replace(b"|", b"#").replace(b"^", b"@")
    segments = answer(intake.handle_message(text, "peer"))
    assert segments[0].startswith("MSH#@~\\&#FDQR#LOCAL#RIS#RADIOLOGY#")
    assert segments[1] == "MSA#AA#MSG1"


def ignoring(*entries: dict[str, object]) -> RuleSet:
    document = Document("routes/ignore.yaml", {}, {})
    return dataclasses.replace(
        RuleSet.empty(),
        accept_and_ignore=tuple(
            IgnoredMessages(document, ("accept_and_ignore", index), IgnoreMatch(**entry))  # type: ignore[arg-type]
            for index, entry in enumerate(entries)
        ),
    )


def make_ignoring_intake(db: ImmediateStore, rule_set: RuleSet) -> tuple[Intake, list[object]]:
    planned: list[object] = []

    def planner(event: DomainEvent | Unhandled) -> Plan:
        planned.append(event)
        return one_job_planner(event)

    intake = Intake(
        db,  # type: ignore[arg-type]
        planner,
        POLICY,
        now=lambda: NOW,
        ignored=lambda origin: ignore_reason(rule_set, origin),
    )
    return intake, planned


def test_accept_and_ignore_unsupported_type(db: ImmediateStore) -> None:
    rule_set = ignoring({"message_type": ["ORU^R01"], "sending_application": "RIS"})
    intake, planned = make_ignoring_intake(db, rule_set)
    text = order().replace(b"ORM^O01", b"ORU^R01")
    segments = answer(intake.handle_message(text, "peer"))
    assert segments[1] == "MSA|AA|MSG1"
    [stored] = db.store.list_messages()
    assert stored.outcome == "accepted and ignored (routes/ignore.yaml accept_and_ignore[0])"
    assert db.store.list_jobs() == []
    assert planned == []


def test_accept_and_ignore_other_sender_still_rejected(db: ImmediateStore) -> None:
    rule_set = ignoring({"message_type": "ORU^R01", "sending_application": "LAB"})
    intake, _ = make_ignoring_intake(db, rule_set)
    text = order().replace(b"ORM^O01", b"ORU^R01")
    segments = answer(intake.handle_message(text, "peer"))
    assert segments[1] == "MSA|AR|MSG1"
    assert "|200^Unsupported message type^HL70357|" in segments[2]


def test_accept_and_ignore_supported_type_creates_no_job(db: ImmediateStore) -> None:
    rule_set = ignoring({"message_type": "ORM^O01", "sending_facility": ["RADIOLOGY"]})
    intake, planned = make_ignoring_intake(db, rule_set)
    assert answer(intake.handle_message(order(), "peer"))[1] == "MSA|AA|MSG1"
    assert db.store.list_jobs() == []
    assert planned == []


def test_accept_and_ignore_still_needs_control_id(db: ImmediateStore) -> None:
    rule_set = ignoring({"message_type": "ORU^R01"})
    intake, _ = make_ignoring_intake(db, rule_set)
    text = order(control_id="").replace(b"ORM^O01", b"ORU^R01")
    segments = answer(intake.handle_message(text, "peer"))
    assert segments[1] == "MSA|AE|"
    assert db.store.list_messages() == []


def test_order_with_two_orders_creates_two_jobs(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    text = order()
    second = (
        b"ORC|NW|PLC-2|FIL-2||SC\rOBR|1|PLC-2|FIL-2|MRBRAIN^MR Brain^LOCAL"
        + b"|" * 14
        + b"ACC2||||||MR\r"
    )
    segments = answer(intake.handle_message(text + second, "peer"))
    assert segments[1] == "MSA|AA|MSG1"
    jobs = sorted(db.store.list_jobs(), key=lambda job: job.id)
    assert [job.order.accession_number for job in jobs] == ["ACC1", "ACC2"]
    assert [job.order.ordered_modality for job in jobs] == ["CT", "MR"]
    assert len(db.store.list_messages()) == 1


def test_order_for_two_patients_gets_ae(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    second = b"PID|2||L2^^^LOCAL^MR\rORC|NW|PLC-2|FIL-2\rOBR|1|PLC-2|FIL-2\r"
    segments = answer(intake.handle_message(order() + second, "peer"))
    assert segments[1] == "MSA|AE|MSG1"
    assert "|PID^2|100^Segment sequence error^HL70357|" in segments[2]
    assert db.store.list_messages() == []
    assert db.store.list_jobs() == []


def test_order_without_orc_segment_gets_ae(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    text = b"".join(
        segment + b"\r"
        for segment in order().split(b"\r")
        if segment and not segment.startswith(b"ORC|")
    )
    segments = answer(intake.handle_message(text, "peer"))
    assert segments[1] == "MSA|AE|MSG1"
    assert segments[2].startswith("ERR||ORC^1|100^Segment sequence error^HL70357|E")
    assert segments[2].endswith("the ORC segment (common order) is missing")
    assert db.store.list_messages() == []


def test_merge_into_itself_gets_ae(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    text = (
        b"MSH|^~\\&|HIS|ADT|FDQR|LOCAL|2026||ADT^A40|M1|P|2.5\r"
        b"EVN|A40|2026\rPID|1||L1^^^LOCAL^MR\rMRG|L1^^^LOCAL^MR\r"
    )
    segments = answer(intake.handle_message(text, "peer"))
    assert segments[1] == "MSA|AE|M1"
    assert "|MRG^1^1|205^Duplicate key identifier^HL70357|" in segments[2]
    assert db.store.list_messages() == []


def test_sender_charset_applies_without_msh18(db: ImmediateStore) -> None:
    charsets = CharsetDefaults("UNICODE UTF-8", {("OLDRIS", ""): "8859/1"})
    captured: list[DomainEvent | Unhandled] = []

    def planner(event: DomainEvent | Unhandled) -> Plan:
        captured.append(event)
        return Plan((), "seen")

    intake = Intake(db, planner, POLICY, charsets=charsets, now=lambda: NOW)  # type: ignore[arg-type]
    latin = PatientSpec("L1", "LOCAL", "MÜLLER^JÖRG", "19650312", "M")
    text = order_message(latin, "C1", "A1", dt.datetime(2026, 3, 14), sending_application="OLDRIS")
    text = text.decode().replace("||||||UNICODE UTF-8", "").encode("latin-1")
    assert answer(intake.handle_message(text, "peer"))[1] == "MSA|AA|C1"
    [event] = captured
    assert isinstance(event, OrderPlaced)
    assert event.demographics.name == "MÜLLER^JÖRG"
    # The same bytes from a sender without a configured charset are not UTF-8: AE 102.
    other = text.replace(b"|OLDRIS|", b"|RIS|")
    segments = answer(intake.handle_message(other, "peer"))
    assert segments[1] == "MSA|AE|C1"
    assert "|MSH^1^18|102^Data type error^HL70357|" in segments[2]


def test_resend_with_new_timestamp_is_duplicate(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    first = answer(intake.handle_message(order(), "peer"))
    resent = order().replace(b"|20260314000000||ORM^O01|", b"|20260314000500||ORM^O01|")
    second = answer(intake.handle_message(resent.replace(b"\r", b"\r\n"), "peer"))
    assert second == first
    assert len(db.store.list_jobs()) == 1


def test_reused_control_id_gets_ae_205(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    answer(intake.handle_message(order(), "peer"))
    other_order = order().replace(b"ACC1", b"ACC9")
    segments = answer(intake.handle_message(other_order, "peer"))
    assert segments[1] == "MSA|AE|MSG1"
    assert "|MSH^1^10|205^Duplicate key identifier^HL70357|" in segments[2]
    assert "send this message with a new control id" in segments[2]
    assert len(db.store.list_messages()) == 1
    assert len(db.store.list_jobs()) == 1
