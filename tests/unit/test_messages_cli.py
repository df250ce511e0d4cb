"""`fdqr messages list / show / replay` against a store filled through intake."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from engine import config
from engine.cli import main
from engine.hl7.cli import interpreter_for, render
from engine.hl7.intake import Intake
from engine.hl7.message import CharsetDefaults
from engine.identity import records
from engine.jobs.store import JobRecord, JobState, Store
from engine.model import PatientIdentifier
from engine.runlock import RunLock, lock_file_of
from engine.testing.adt import demographics_message
from engine.testing.dicomgen import PatientSpec
from engine.testing.scenario import order_message
from tests.conftest import NOW, shipped_layout
from tests.fakes import ImmediateStore

PATIENT = PatientSpec("L12345", "LOCAL", "DOE^JANE^M", "19650312", "F")


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """A copy of the shipped configuration with its store in tmp_path; return engine.yaml."""
    return shipped_layout(tmp_path)


def receive(layout: Path, message: bytes) -> None:
    """Take a message in as the engine does, with the configuration's routes and rules."""
    loaded = config.load(layout)
    interpreter = interpreter_for(loaded, NOW)
    db = ImmediateStore(Store(loaded.store_path))
    intake = Intake(db, interpreter.planner, interpreter.policy, now=lambda: NOW)  # type: ignore[arg-type]
    result: list[object] = []
    intake.handle_message(message, "127.0.0.1:4000").addCallback(result.append)
    db.stop()
    assert result, "intake did not answer"


def run(layout: Path, *args: str) -> tuple[int, str]:
    outcome = CliRunner().invoke(main, ["messages", *args, "--config", str(layout)])
    return outcome.exit_code, outcome.output


def order(control_id: str = "ORD1") -> bytes:
    return order_message(PATIENT, control_id, "ACC1", dt.datetime(2026, 3, 14, 9, 0))


def test_list_shows_ack_and_jobs(layout: Path) -> None:
    receive(layout, order())
    status, output = run(layout, "list")
    assert status == 0, output
    header, row = output.strip().split("\n")
    assert header.split() == [
        "ID",
        "RECEIVED",
        "TYPE",
        "CONTROL",
        "ID",
        "SENDER",
        "PEER",
        "ACK",
        "JOBS",
        "OUTCOME",
    ]
    assert " ORM^O01 " in row
    assert " ORD1 " in row
    assert " RIS/RADIOLOGY " in row
    assert " AA " in row
    assert "route ris-orders: 1 job(s) for rules ct-priors" in row


def test_list_filters_by_control_id(layout: Path) -> None:
    receive(layout, order("ORD1"))
    receive(layout, order("ORD2"))
    status, output = run(layout, "list", "--control-id", "ORD2")
    assert status == 0, output
    assert " ORD2 " in output
    assert " ORD1 " not in output


def test_cli_times_in_engine_zone(layout: Path) -> None:
    settings = yaml.safe_load(layout.read_text())
    settings["time_zone"] = "Asia/Tokyo"
    layout.write_text(yaml.safe_dump(settings))
    receive(layout, order())
    tokyo_time = (NOW + dt.timedelta(hours=9)).strftime("%Y-%m-%d %H:%M:%S") + " JST"

    status, listed = run(layout, "list")
    assert status == 0, listed
    assert f" {tokyo_time} " in listed.splitlines()[1]
    status, output = run(layout, "show", "1")
    assert status == 0, output
    assert f"received {tokyo_time}" in output.splitlines()[0]
    jobs = CliRunner().invoke(main, ["jobs", "show", "1", "--config", str(layout)])
    assert jobs.exit_code == 0, jobs.output
    assert f"not before {tokyo_time}" in jobs.output
    assert jobs.output.splitlines()[0] == "job 1: queued, 0 of 5 attempts used"
    assert "  studies: none found yet" in jobs.output
    assert f"    {tokyo_time[:-4]}.000 JST queued by route" in jobs.output


def test_jobs_show_names_message_and_order(layout: Path) -> None:
    receive(layout, order("ORD1"))

    jobs = CliRunner().invoke(main, ["jobs", "show", "1", "--config", str(layout)])

    assert jobs.exit_code == 0, jobs.output
    lines = jobs.output.splitlines()
    assert lines[3] == "  from message 1: ORM^O01 ORD1 from RIS/RADIOLOGY (fdqr messages show)"
    assert lines[4].startswith("  order: placer PLC-ORD1, filler FIL-ORD1, accession ACC1,")


def test_show_redacts_names_and_birth_dates(layout: Path) -> None:
    receive(layout, order())
    status, output = run(layout, "show", "1")
    assert status == 0, output
    assert "message 1: ORM^O01 ORD1 from RIS/RADIOLOGY" in output
    assert "  ack: MSA|AA|ORD1" in output
    assert "  job 1: queued (rule ct-priors)" in output
    assert "DOE" not in output
    assert "19650312" not in output
    assert "PID|1||L12345^^^LOCAL^MR~***^^^NATIONAL^NI||***||***|F" in output
    assert "998877" not in output


@pytest.mark.parametrize(
    ("pid3", "shown"),
    [
        ("L1^^^LOCAL^MR~123-45-6789^^^SSA^SS", "L1^^^LOCAL^MR~***^^^SSA^SS"),
        ("L1^^^LOCAL^MR~AB123^^^FRA^NNFRA", "L1^^^LOCAL^MR~***^^^FRA^NNFRA"),
        ("L1^^^LOCAL^MR~HA-7^^^HOSP_A^PI", "L1^^^LOCAL^MR~HA-7^^^HOSP_A^PI"),
        ("L1^^^LOCAL", "L1^^^LOCAL"),
    ],
)
def test_render_redacts_personal_ids(pid3: str, shown: str) -> None:
    content = (
        f"MSH|^~\\&|RIS|RAD|FDQR|LOCAL|20260314||ADT^A08|C1|P|2.5\rPID|1||{pid3}||DOE^JANE\r"
    ).encode()
    rendered = render(content, CharsetDefaults(), unredacted=False)
    assert f"PID|1||{shown}||***" in rendered


@pytest.mark.parametrize(
    ("pid3", "shown"),
    [
        ("L1^^^LOCAL^MR~987-65-4321^^^SSA", "L1^^^LOCAL^MR~***^^^SSA"),
        ("L1^^^LOCAL~INS42^^^&1.2.9&ISO^PI", "L1^^^LOCAL~***^^^&1.2.9&ISO^PI"),
        (
            "L1^^^LOCAL~HA-7^^^HOSP_A~HB-7^^^&1.2.3.3&ISO",
            "L1^^^LOCAL~HA-7^^^HOSP_A~HB-7^^^&1.2.3.3&ISO",
        ),
        ("L1~X9^^^", "L1~X9^^^"),
    ],
)
def test_render_redacts_ids_of_other_domains(pid3: str, shown: str) -> None:
    content = (
        f"MSH|^~\\&|RIS|RAD|FDQR|LOCAL|20260314||ADT^A08|C1|P|2.5\rPID|1|S1^^^SSA|{pid3}\r"
    ).encode()
    authorities = frozenset({"LOCAL", "HOSP_A", "1.2.3.3"})

    rendered = render(content, CharsetDefaults(), unredacted=False, authorities=authorities)

    assert f"PID|1|***^^^SSA|{shown}" in rendered


def test_render_hides_other_identifier_fields() -> None:
    content = (
        "MSH|^~\\&|HIS|ADT|FDQR|LOCAL|20260314||ADT^A40|C1|P|2.5\r"
        "PID|1||L1^^^LOCAL||DOE^JANE|||F||||||||||ACC9^^^HIS\r"
        "NK1|1|DOE^JOHN|SPO" + "|" * 30 + "NK9^^^SSA\r"
        "MRG|L0^^^LOCAL|ALT9^^^SSA|ACC8^^^HIS|L7^^^LOCAL\r"
    ).encode()

    rendered = render(
        content, CharsetDefaults(), unredacted=False, authorities=frozenset({"LOCAL"})
    )

    pid, nk1, mrg = rendered.splitlines()[1:]
    assert pid.endswith("|||||***")
    assert nk1.endswith("|***")
    assert mrg == "MRG|L0^^^LOCAL|***^^^SSA|***^^^HIS|L7^^^LOCAL"


def test_show_hides_ids_of_unknown_domains(layout: Path) -> None:
    message = order().replace(b"998877^^^NATIONAL^NI", b"998877^^^SSA")
    receive(layout, message)

    status, output = run(layout, "show", "1")

    assert status == 0, output
    assert "PID|1||L12345^^^LOCAL^MR~***^^^SSA||***" in output


def test_show_unredacted_on_request(layout: Path) -> None:
    receive(layout, order())
    status, output = run(layout, "show", "1", "--unredacted")
    assert status == 0, output
    assert "PID|1||L12345^^^LOCAL^MR~998877^^^NATIONAL^NI||DOE^JANE^M||19650312|F" in output


def test_show_unknown_message(layout: Path) -> None:
    receive(layout, order())
    status, output = run(layout, "show", "7")
    assert status == 1
    assert "message 7 not found" in output


def test_config_accepted_before_subcommand(layout: Path) -> None:
    receive(layout, order())
    expected = run(layout, "list")
    assert expected[0] == 0, expected[1]
    for args in (
        ["--config", str(layout), "messages", "list"],
        ["messages", "--config", str(layout), "list"],
        ["--config", "elsewhere.yaml", "messages", "list", "--config", str(layout)],
    ):
        outcome = CliRunner().invoke(main, args)
        assert (outcome.exit_code, outcome.output) == expected, args


def test_replay_refuses_while_jobs_unfinished(layout: Path) -> None:
    receive(layout, order())
    status, output = run(layout, "replay", "1")
    assert status == 1
    assert "message 1 has unfinished jobs 1 (queued)" in output
    assert "--force" in output
    assert len(read_jobs(layout)) == 1


def test_replay_notes_when_no_engine_runs(layout: Path) -> None:
    receive(layout, order())
    finish_all(layout)
    note = "  note: no engine runs with this store now; the jobs run when `fdqr run` starts"

    status, output = run(layout, "replay", "1", "--force")
    assert status == 0, output
    assert note in output.splitlines()

    engine = RunLock(lock_file_of(config.load(layout).store_path), "the store")
    engine.acquire()
    try:
        status, output = run(layout, "replay", "1", "--force")
    finally:
        engine.release()
    assert status == 0, output
    assert note not in output.splitlines()


def test_replay_creates_jobs_for_stored_duplicate_key(layout: Path) -> None:
    receive(layout, order())
    finish_all(layout)
    status, output = run(layout, "replay", "1")
    assert status == 0, output
    assert "message 1 replayed (replay 1): route ris-orders: 1 job(s) for rules ct-priors" in output
    assert "created job 2: queued" in output
    jobs = read_jobs(layout)
    assert [job.message_id for job in jobs] == [1, 1]
    status, output = run(layout, "show", "1")
    assert "replay 1 at " in output
    assert "(jobs 2)" in output


def test_replay_suppressed_by_other_messages_job(layout: Path) -> None:
    receive(layout, order("ORD1"))
    receive(layout, order("ORD2"))
    assert [job.state for job in read_jobs(layout)] == [JobState.QUEUED, JobState.SUPPRESSED]
    status, output = run(layout, "replay", "2")
    assert status == 0, output
    assert "created job 3: suppressed (repeated order: job 1 already covers this order)" in output


def test_replay_with_force_and_dry_run(layout: Path) -> None:
    receive(layout, order())
    status, output = run(layout, "replay", "1", "--dry-run")
    assert status == 0, output
    assert "would create a job: route ris-orders, rule ct-priors, L12345^^^LOCAL" in output
    assert "note: jobs 1 (queued) have not finished, so the replay needs --force" in output
    assert len(read_jobs(layout)) == 1
    status, output = run(layout, "replay", "1", "--force")
    assert status == 0, output
    assert "created job 2: queued" in output
    assert len(read_jobs(layout)) == 2


def test_replay_of_cancelled_order_needs_force(layout: Path) -> None:
    receive(layout, order("ORD1"))
    cancel = order_message(
        PATIENT, "ORD1-CA", "ACC1", dt.datetime(2026, 3, 14, 9, 5), order_control="CA"
    )
    receive(layout, cancel)
    assert [job.state for job in read_jobs(layout)] == [JobState.CANCELLED]

    status, output = run(layout, "replay", "1", "--dry-run")
    assert status == 0, output
    assert "note: job 1 of this order was cancelled (order cancelled (ORC-1 CA) by " in output
    assert "message 1 would be replayed (with --force): " in output
    status, output = run(layout, "replay", "1")
    assert status == 1
    assert (
        "message 1 was not replayed: its order or a job of it was cancelled (see the notes)"
        in output
    )
    assert len(read_jobs(layout)) == 1
    status, output = run(layout, "replay", "1", "--force")
    assert status == 0, output
    assert "created job 2: queued" in output


def test_replay_dry_run_of_cancel_lists_changes(layout: Path) -> None:
    receive(layout, order("ORD1"))
    cancel = order_message(
        PATIENT, "ORD1-CA", "ACC1", dt.datetime(2026, 3, 14, 9, 5), order_control="CA"
    )
    receive(layout, cancel)
    # The same accession number again: a new order of the cancelled one's numbers.
    receive(layout, order("ORD2"))
    [_, second] = sorted(read_jobs(layout), key=lambda job: job.id)

    status, output = run(layout, "replay", "2", "--dry-run")

    assert status == 0, output
    assert f"  its actions would give: cancelled job(s) {second.id}" in output.splitlines()
    # Nothing was changed.
    assert {job.id: job.state for job in read_jobs(layout)}[second.id] == JobState.QUEUED


def test_replay_of_order_change_ignores_jobs_it_replaced(layout: Path) -> None:
    receive(layout, order("ORD1"))
    change = order_message(
        PATIENT, "ORD1-XO", "ACC1", dt.datetime(2026, 3, 14, 9, 5), order_control="XO"
    )
    receive(layout, change)
    [replaced, new] = sorted(read_jobs(layout), key=lambda job: job.id)
    assert replaced.state == JobState.CANCELLED
    store = Store(config.load(layout).store_path)
    store.finish_job(new.id, JobState.DONE, "done", NOW)
    store.close()

    status, output = run(layout, "replay", "2", "--dry-run")

    assert status == 0, output
    assert "note:" not in output
    assert "message 2 would be replayed: " in output


def test_replay_after_late_cancel_needs_force(layout: Path) -> None:
    receive(layout, order("ORD1"))
    finish_all(layout)
    cancel = order_message(
        PATIENT, "ORD1-CA", "ACC1", dt.datetime(2026, 3, 14, 9, 5), order_control="CA"
    )
    receive(layout, cancel)

    status, output = run(layout, "replay", "1", "--dry-run")
    assert status == 0, output
    assert "note: the order of job 1 was cancelled after it ended (done: " in output
    status, output = run(layout, "replay", "1")
    assert status == 1
    assert "its order or a job of it was cancelled" in output


def test_replay_uses_current_rules(layout: Path) -> None:
    receive(layout, order())
    finish_all(layout)
    routes = layout.parent.parent / "routes" / "orders.yaml"
    routes.write_text(
        routes.read_text().replace("sending_application: RIS", "sending_application: OTHER")
    )
    status, output = run(layout, "replay", "1")
    assert status == 0, output
    assert "message 1 replayed (replay 1): no route matches" in output
    assert "created no jobs" in output


def test_replay_rejected_by_current_configuration(layout: Path) -> None:
    receive(layout, order())
    finish_all(layout)
    settings = yaml.safe_load(layout.read_text())
    settings["local_patient"]["authorities"] = ["ELSEWHERE"]
    layout.write_text(yaml.safe_dump(settings))
    status, output = run(layout, "replay", "1")
    assert status == 1
    assert "cannot be processed with the current configuration" in output
    assert "(HL7 error 204); nothing was changed" in output


def read_jobs(layout: Path) -> list[JobRecord]:
    store = Store(config.load(layout).store_path)
    try:
        return list(reversed(store.list_jobs()))
    finally:
        store.close()


def finish_all(layout: Path) -> None:
    store = Store(config.load(layout).store_path)
    try:
        for job in store.list_jobs():
            store.finish_job(job.id, JobState.DONE, "done", NOW)
    finally:
        store.close()


def test_replay_leaves_patient_records_unchanged(layout: Path) -> None:
    # Replaying an older ADT^A08 would put its demographics back over newer ones.
    older = demographics_message(PATIENT, "ADT1", dt.datetime(2026, 3, 14, 9, 0), "A08")
    receive(layout, older)
    newer_patient = dataclasses.replace(PATIENT, name="DOE^JANE^MARIE")
    receive(layout, demographics_message(newer_patient, "ADT2", dt.datetime(2026, 3, 15), "A08"))

    status, output = run(layout, "replay", "1")

    assert status == 0, output
    assert (
        "message 1 replayed (replay 1): ADT^A08: patient records unchanged: a replay does not"
        " apply ADT messages again" in output
    )
    store = Store(config.load(layout).store_path)
    try:
        demographics = records.local_demographics(store, PatientIdentifier("L12345", "LOCAL"))
    finally:
        store.close()
    assert demographics is not None
    assert demographics.name == "DOE^JANE^MARIE"
