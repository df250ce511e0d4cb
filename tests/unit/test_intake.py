"""HL7 intake: store before ACK, duplicates, and every rejection with its ERR segment."""

from __future__ import annotations

import datetime as dt
import inspect

from twisted.internet import defer

from engine.hl7.events import IdentifierPolicy, Unhandled
from engine.hl7.intake import Intake
from engine.jobs.planner import Plan
from engine.jobs.store import AsyncStore, NewJob
from engine.model import DomainEvent, OrderPlaced
from engine.testing.dicomgen import PatientSpec
from engine.testing.scenario import order_message
from tests.conftest import NOW
from tests.fakes import ImmediateStore

PATIENT = PatientSpec("L1", "LOCAL", "DOE^JANE", "19650312", "F")
POLICY = IdentifierPolicy(issuer="LOCAL", authorities=frozenset({"LOCAL"}))


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


def answer(result: defer.Deferred[bytes]) -> list[str]:
    """Return the segments of an ACK that has already fired."""
    fired: list[bytes] = []
    result.addCallback(fired.append)
    assert fired, "the ACK Deferred has not fired"
    return fired[0].decode().rstrip("\r").split("\r")


def order(control_id: str = "MSG1", **options: object) -> bytes:
    return order_message(PATIENT, control_id, "ACC1", dt.datetime(2026, 3, 14), **options)  # type: ignore[arg-type]


def test_fake_store_matches_async_store() -> None:
    assert inspect.signature(ImmediateStore.run) == inspect.signature(AsyncStore.run)


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
    assert segments[2].startswith("ERR||MSH^1^0|100^Segment sequence error^HL70357|E")
    assert db.store.list_messages() == []


def test_missing_control_id_gets_ae_101(db: ImmediateStore) -> None:
    intake, _ = make_intake(db)
    segments = answer(intake.handle_message(order(control_id=""), "peer"))
    assert segments[1] == "MSA|AE|"
    assert "|MSH^1^10|101^Required field missing^HL70357|" in segments[2]
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
    ack = intake.reject_oversize(order()[:200], 20_000_000, "peer")
    assert ack is not None
    assert b"MSA|AR|MSG1" in ack
    assert intake.reject_oversize(b"\x00\x01garbage", 20_000_000, "peer") is None
