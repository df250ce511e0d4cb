"""ADT messages through intake: demographics, learned identifiers and merges, stored with the message."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer

from engine.hl7.events import IdentifierPolicy
from engine.hl7.intake import Intake
from engine.identity import records
from engine.identity.adt import IdentityEvents
from engine.identity.domains import DomainDirectory
from engine.identity.settings import DomainSettings
from engine.identity.table import CrossReferenceTable
from engine.jobs.planner import PatientChange, Planner
from engine.model import Demographics, PatientIdentifier
from engine.rules.model import RuleSet
from engine.testing.adt import demographics_message, merge_message
from engine.testing.dicomgen import PatientSpec
from tests.conftest import NOW
from tests.fakes import ImmediateStore

PATIENT = PatientSpec("L1", "LOCAL", "DOE^JANE", "19650312", "F")
WHEN = dt.datetime(2026, 3, 14, 9, 0)
L1 = PatientIdentifier("L1", "LOCAL")


def intake(
    db: ImmediateStore,
    table: CrossReferenceTable | None = None,
    changed: list[tuple[str, str, PatientChange]] | None = None,
) -> Intake:
    """An intake for ADT messages; changed collects (MSH-10, peer, change) for the audit trail."""
    directory = DomainDirectory({"HOSP_B": DomainSettings(universal_id="1.2.3.3")})
    identity = IdentityEvents("LOCAL", directory, table, domains={"HOSP_A", "HOSP_B"})
    planner = Planner(RuleSet.empty, now=lambda: NOW, identity=identity)
    policy = IdentifierPolicy(issuer="LOCAL", authorities=frozenset({"LOCAL"}))
    collected = changed if changed is not None else []
    return Intake(
        db,  # type: ignore[arg-type]
        planner,
        policy,
        now=lambda: NOW,
        on_patient_records=lambda origin, peer, changes: collected.extend(
            (origin.control_id, peer, change) for change in changes
        ),
    )


def send(target: Intake, message: bytes) -> list[str]:
    fired: list[Any] = []
    result: defer.Deferred[Sequence[bytes]] = target.handle_message(message, "test")
    result.addBoth(fired.append)
    [ack] = fired[0]
    return list(ack.decode().rstrip("\r").split("\r"))


def test_a04_records_demographics_and_learns(db: ImmediateStore) -> None:
    message = demographics_message(
        PATIENT, "ADT1", WHEN, "A04", ["HA-1^^^HOSP_A^MR", "HB-1^^^&1.2.3.3&ISO^MR"]
    )
    assert send(intake(db), message)[1] == "MSA|AA|ADT1"
    assert records.local_demographics(db.store, L1) == Demographics("DOE^JANE", "19650312", "F")
    assert records.learned_remote(db.store, L1, "HOSP_A") == PatientIdentifier("HA-1", "HOSP_A")
    # The universal id names the domain configured for it.
    assert records.learned_remote(db.store, L1, "HOSP_B") == PatientIdentifier("HB-1", "HOSP_B")
    [stored] = db.store.list_messages(1)
    assert stored.outcome == (
        "ADT^A04 for L1^^^LOCAL; demographics of L1^^^LOCAL recorded;"
        " learned HA-1^^^HOSP_A for L1^^^LOCAL; learned HB-1^^^HOSP_B for L1^^^LOCAL"
    )
    assert "DOE" not in stored.outcome


def test_identifier_of_other_domain_not_learned(db: ImmediateStore) -> None:
    message = demographics_message(
        PATIENT, "ADT1", WHEN, "A04", ["999-88-7777^^^SSA^SS", "HA-1^^^HOSP_A^MR"]
    )

    assert send(intake(db), message)[1] == "MSA|AA|ADT1"

    assert records.learned_local(db.store, PatientIdentifier("999-88-7777", "SSA")) is None
    assert records.learned_remote(db.store, L1, "HOSP_A") == PatientIdentifier("HA-1", "HOSP_A")
    [stored] = db.store.list_messages(1)
    assert "; 1 PID-3 identifier(s) of other domains not learned;" in stored.outcome
    assert "999-88-7777" not in stored.outcome


def test_two_identifiers_in_domain_learn_none(db: ImmediateStore) -> None:
    target = intake(db)
    send(target, demographics_message(PATIENT, "ADT1", WHEN, "A04", ["HA-0^^^HOSP_A"]))
    both = ["HA-1^^^HOSP_A", "HA-2^^^HOSP_A", "HB-1^^^&1.2.3.3&ISO"]
    assert send(target, demographics_message(PATIENT, "ADT2", WHEN, "A08", both))[1] == (
        "MSA|AA|ADT2"
    )
    # Either could be another patient's, so the identifier learned before stays.
    assert records.learned_remote(db.store, L1, "HOSP_A") == PatientIdentifier("HA-0", "HOSP_A")
    assert records.learned_local(db.store, PatientIdentifier("HA-2", "HOSP_A")) is None
    assert records.learned_remote(db.store, L1, "HOSP_B") == PatientIdentifier("HB-1", "HOSP_B")
    stored = db.store.list_messages(1)[0]
    assert "PID-3 has 2 identifiers in HOSP_A (HA-1, HA-2): none learned" in stored.outcome


def test_identifier_of_table_patient_not_learned(db: ImmediateStore) -> None:
    # The table gives HB-1 to L2, so an ADT of L1 that lists it must not move it to L1.
    at_b = PatientIdentifier("HB-1", "HOSP_B")
    table = CrossReferenceTable({PatientIdentifier("L2", "LOCAL"): {"HOSP_B": at_b}})
    message = demographics_message(PATIENT, "ADT1", WHEN, "A08", ["HB-1^^^HOSP_B", "HA-1^^^HOSP_A"])
    assert send(intake(db, table), message)[1] == "MSA|AA|ADT1"
    assert records.learned_local(db.store, at_b) is None
    assert records.learned_remote(db.store, L1, "HOSP_A") == PatientIdentifier("HA-1", "HOSP_A")
    stored = db.store.list_messages(1)[0]
    assert "HB-1^^^HOSP_B belongs to L2^^^LOCAL in the identity table: not learned" in (
        stored.outcome
    )


def test_a08_updates_demographics(db: ImmediateStore) -> None:
    target = intake(db)
    send(target, demographics_message(PATIENT, "ADT1", WHEN, "A04"))
    changed = PatientSpec("L1", "LOCAL", "DOE-SMITH^JANE", "19650312", "F")
    assert send(target, demographics_message(changed, "ADT2", WHEN, "A08"))[1] == "MSA|AA|ADT2"
    assert records.local_demographics(db.store, L1) == Demographics(
        "DOE-SMITH^JANE", "19650312", "F"
    )


def test_a08_null_deletes_empty_keeps(db: ImmediateStore) -> None:
    target = intake(db)
    send(target, demographics_message(PATIENT, "ADT1", WHEN, "A04"))
    # PID-7 `""` withdraws the birth date; an empty PID-8 leaves the sex as it was.
    withdrawn = PatientSpec("L1", "LOCAL", "DOE^JANE", '""', "")

    assert send(target, demographics_message(withdrawn, "ADT2", WHEN, "A08"))[1] == "MSA|AA|ADT2"

    assert records.local_demographics(db.store, L1) == Demographics("DOE^JANE", "", "F")


def test_a08_without_changes_says_unchanged(db: ImmediateStore) -> None:
    target = intake(db)
    send(target, demographics_message(PATIENT, "ADT1", WHEN, "A04"))

    send(target, demographics_message(PATIENT, "ADT2", WHEN, "A08"))

    assert "demographics of L1^^^LOCAL unchanged" in db.store.list_messages(1)[0].outcome
    record = records.patient_record(db.store, L1)
    assert record is not None
    assert record.message_control_id == "ADT1"


def test_a08_unknown_sex_deletes_stored_sex(db: ImmediateStore) -> None:
    target = intake(db)
    send(target, demographics_message(PATIENT, "ADT1", WHEN, "A04"))
    unknown = PatientSpec("L1", "LOCAL", "DOE^JANE", "19650312", "U")

    assert send(target, demographics_message(unknown, "ADT2", WHEN, "A08"))[1] == "MSA|AA|ADT2"

    assert records.local_demographics(db.store, L1) == Demographics("DOE^JANE", "19650312", "")


def test_a40_merges_and_moves_learned(db: ImmediateStore) -> None:
    target = intake(db)
    retired = PatientSpec("L9", "LOCAL", "DOE^JANE", "19650312", "F")
    send(target, demographics_message(retired, "ADT1", WHEN, "A04", ["HA-9^^^HOSP_A"]))
    assert send(target, merge_message(PATIENT, "L9", "MRG1", WHEN))[1] == "MSA|AA|MRG1"
    assert records.active_patient(db.store, PatientIdentifier("L9", "LOCAL")) == (L1, [L1])
    assert records.learned_remote(db.store, L1, "HOSP_A") == PatientIdentifier("HA-9", "HOSP_A")
    [stored] = db.store.list_messages(1)
    assert stored.outcome == (
        "ADT^A40; merged L9^^^LOCAL into L1^^^LOCAL (learned HA-9^^^HOSP_A moved)"
    )


def test_a40_duplicate_message_changes_nothing(db: ImmediateStore) -> None:
    target = intake(db)
    first = send(target, merge_message(PATIENT, "L9", "MRG1", WHEN))
    again = send(target, merge_message(PATIENT, "L9", "MRG1", WHEN))
    assert first == again
    assert len(records.merges(db.store)) == 1


def test_patient_record_changes_reported_once_after_storing(db: ImmediateStore) -> None:
    changed: list[tuple[str, str, PatientChange]] = []
    target = intake(db, changed=changed)
    adt = demographics_message(PATIENT, "ADT1", WHEN, "A08", [])
    send(target, adt)
    send(target, adt)
    send(target, merge_message(PATIENT, "L9", "MRG1", WHEN))
    assert changed == [
        ("ADT1", "test", PatientChange(L1)),
        ("MRG1", "test", PatientChange(L1)),
        ("MRG1", "test", PatientChange(PatientIdentifier("L9", "LOCAL"), retired=True)),
    ]


def test_merge_into_itself_reports_no_change(db: ImmediateStore) -> None:
    changed: list[tuple[str, str, PatientChange]] = []
    answer = send(intake(db, changed=changed), merge_message(PATIENT, "L1", "MRG2", WHEN))
    assert answer[1] == "MSA|AE|MRG2"
    assert changed == []
