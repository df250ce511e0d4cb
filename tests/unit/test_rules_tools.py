"""The analyst tools (explain as data, rules check, rules test) and hot reload."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from twisted.internet import task

from engine import config
from engine.cli import main
from engine.hl7.events import IdentifierPolicy, to_event
from engine.hl7.message import parse
from engine.model import OrderPlaced, PatientIdentifier, StudyCandidate
from engine.rules.evaluate import evaluate_order
from engine.rules.explain import IdentityLookup, explain, render_text
from engine.rules.reload import RuleFileWatcher, RuleSetHolder
from engine.rules.timing import LocalZone

REPOSITORY = Path(__file__).resolve().parents[2]
AT = "2026-03-14T10:00"


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """A copy of the shipped conf/, routes/ and rules/; return the engine.yaml path."""
    for folder in ("conf", "routes", "rules"):
        shutil.copytree(REPOSITORY / folder, tmp_path / folder)
    return tmp_path / "conf" / "engine.yaml"


def invoke(*arguments: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(arguments), catch_exceptions=False)
    return result.exit_code, result.output


def candidates_file(tmp_path: Path, items: list[dict[str, Any]]) -> Path:
    path = tmp_path / "candidates.json"
    path.write_text(json.dumps(items))
    return path


CANDIDATES = [
    {
        "source": "hospital_a",
        "study_instance_uid": "1.1",
        "study_date": "2025-03-01",
        "modalities": ["CT"],
        "description": "CT CHEST",
        "instance_count": 80,
    },
    {
        "source": "hospital_b",
        "study_instance_uid": "1.1",
        "study_date": "20250301",
        "modalities": "CT",
        "description": "CT CHEST",
    },
    {
        "source": "hospital_b",
        "study_instance_uid": "1.2",
        "study_date": "2018-01-01",
        "modalities": ["MR"],
        "description": "MR BRAIN",
    },
    {
        "source": "elsewhere",
        "study_instance_uid": "1.3",
        "study_date": "2025-01-01",
        "modalities": ["CT"],
    },
]


def test_explain_as_data(layout: Path) -> None:
    loaded = config.load(layout)
    message = parse((layout.parent.parent / "rules/tests/orders/ct-chest.hl7").read_bytes())
    event = to_event(message, IdentifierPolicy("LOCAL", frozenset({"LOCAL"})))
    assert isinstance(event, OrderPlaced)
    now = dt.datetime(2026, 3, 14, 10, 0, tzinfo=dt.UTC)
    evaluation = evaluate_order(loaded.rule_set, event, LocalZone("UTC"), now)
    remote = PatientIdentifier("HA-778899", "HOSP_A")
    study = StudyCandidate(
        "hospital_a", "1.1", remote, dt.date(2025, 3, 1), "", ("CT",), "CT CHEST"
    )
    explanation = explain(
        evaluation,
        loaded.rule_set,
        today=now.date(),
        identities=[
            IdentityLookup("hospital_a", remote, "table"),
            IdentityLookup("hospital_b", None, "table", "no entry"),
        ],
        candidates={"ct-priors": [study]},
        candidates_from="test",
    )
    data = explanation.to_dict()

    assert data["route"] == "ris-orders"
    assert data["outcome"] == "route ris-orders: 1 job(s) for rules ct-priors"
    assert [(r["name"], r["taken"], r["status"]) for r in data["routes"]] == [
        ("ris-orders", True, "taken"),
        ("worklist-orders", False, "does not match: message_type 'ORM^O01' does not match 'MWL'"),
    ]
    assert data["routes"][0]["defined_in"] == "routes/orders.yaml:5"
    facts = {fact["name"]: fact for fact in data["facts"]}
    assert facts["body_part"] == {
        "name": "body_part",
        "values": ["CHEST"],
        "source": "procedure_codes[CTCHEST] in rules/priors.yaml",
    }
    assert facts["scheduled_time"]["source"] == "TQ1-7"
    assert data["identities"][1] == {
        "source": "hospital_b",
        "identifier": None,
        "via": "table",
        "detail": "no entry",
    }
    rules = {rule["name"]: rule for rule in data["rules"]}
    assert [name for name, rule in rules.items() if rule["applies"]] == ["ct-priors"]
    assert rules["ct-priors"]["query"] == {
        "modalities": ["CT", "MR"],
        "date_from": "2021-03-14",
        "date_to": "2026-03-14",
    }
    [candidate] = rules["ct-priors"]["candidates"]
    assert candidate["selected"] is True
    assert candidate["reason"] == "rule ct-priors: rank 1 of max 4"
    assert candidate["body_regions"] == ["CHEST"]
    assert rules["mammo-priors"]["condition"] == {
        "condition": "ordered_modality 'CT' does not match 'MG'",
        "matched": False,
    }
    assert rules["oncology-ct-cap"]["suppression_window"] == "1d"
    text = render_text(explanation)
    assert "  -> ris-orders (routes/orders.yaml:5): taken" in text
    assert "  hospital_b: no identifier (table: no entry)" in text


def test_explain_and_test_show_accept_and_ignore(layout: Path) -> None:
    routes = layout.parent.parent / "routes" / "orders.yaml"
    routes.write_text(
        routes.read_text() + "\naccept_and_ignore:\n  - message_type: [ORU^R01, ORM^O01]\n"
    )
    order = layout.parent.parent / "rules/tests/orders/mammo-screening.hl7"
    code, output = invoke("rules", "explain", str(order), "--config", str(layout))
    assert code == 0, output
    assert "the engine acknowledges this message and ignores it: accepted and ignored" in output
    assert "Rule mammo-priors" not in output
    code, output = invoke("rules", "test", "--config", str(layout))
    assert code == 1
    assert "the message is acknowledged and ignored: accepted and ignored" in output
    # A type no route supports is ignored too, as the engine ignores it.
    result = layout.parent / "result.hl7"
    result.write_bytes(order.read_bytes().replace(b"ORM^O01", b"ORU^R01"))
    code, output = invoke("rules", "explain", str(result), "--config", str(layout))
    assert code == 0, output
    assert "the engine acknowledges this message and ignores it" in output


def test_explain_command_json(layout: Path, tmp_path: Path) -> None:
    order = layout.parent.parent / "rules/tests/orders/ct-chest.hl7"
    path = candidates_file(tmp_path, CANDIDATES)
    code, output = invoke(
        "rules",
        "explain",
        str(order),
        "--candidates",
        str(path),
        "--json",
        "--at",
        AT,
        "--config",
        str(layout),
    )
    assert code == 0, output
    data = json.loads(output)
    assert [lookup["identifier"] for lookup in data["identities"]] == [
        "HA-778899^^^HOSP_A",
        "HB-4455^^^HOSP_B",
    ]
    [rule] = [rule for rule in data["rules"] if rule["applies"]]
    reasons = {(c["source"], c["study_instance_uid"]): c["reason"] for c in rule["candidates"]}
    assert reasons == {
        ("hospital_a", "1.1"): "rule ct-priors: rank 1 of max 4",
        ("hospital_b", "1.1"): "same study is taken from hospital_a",
        ("hospital_b", "1.2"): "study date 2018-01-01 before lookback 5y (2021-03-14)",
        ("elsewhere", "1.3"): "source elsewhere is not a source of route ris-orders",
    }


def test_explain_command_text_and_errors(layout: Path, tmp_path: Path) -> None:
    order = layout.parent.parent / "rules/tests/orders/mammo-screening.hl7"
    code, output = invoke("rules", "explain", str(order), "--at", AT, "--config", str(layout))
    assert code == 0, output
    assert "Rule mammo-priors: applies" in output
    assert "  query: modalities MG, KO; study dates any date" in output
    assert "no candidate studies given" in output

    bad = candidates_file(tmp_path, [{"source": "a", "study_date": "2025-02-30"}])
    code, output = invoke(
        "rules", "explain", str(order), "--candidates", str(bad), "--config", str(layout)
    )
    assert code == 2
    assert "candidates[0].study_instance_uid: missing required setting" in output
    assert "candidates[0].study_date: input should be a valid date" in output

    cancel = tmp_path / "cancel.hl7"
    cancel.write_bytes(order.read_bytes().replace(b"ORC|NW", b"ORC|CA"))
    code, output = invoke("rules", "explain", str(cancel), "--config", str(layout))
    assert code == 0
    assert "cancel.hl7: not a new order: order cancel (ORC-1 CA)" in output

    change = tmp_path / "change.hl7"
    change.write_bytes(order.read_bytes().replace(b"ORC|NW", b"ORC|XO"))
    code, output = invoke("rules", "explain", str(change), "--at", AT, "--config", str(layout))
    assert code == 0
    assert "a changed order (ORC-1 XO)" in output
    assert "Rule mammo-priors: applies" in output

    garbage = tmp_path / "garbage.hl7"
    garbage.write_bytes(b"not hl7")
    code, output = invoke("rules", "explain", str(garbage), "--config", str(layout))
    assert code == 2
    assert "the engine rejects this message" in output


def test_rules_check_reports_every_error(layout: Path) -> None:
    code, output = invoke("rules", "check", "--config", str(layout))
    assert code == 0, output
    assert output.startswith("valid: 2 routes, 5 rules, 8 procedure codes, 20 body regions")

    rules = layout.parent.parent / "rules" / "priors.yaml"
    text = rules.read_text()
    text = text.replace(
        "lookback: 3y\n      max_studies: 4", "lookback: 3 years\n      max_studies: 4"
    )
    text = text.replace("{field: PV1-3.1, regex: '^ONC'}", "{field: PV1-3.1, regex: '^(ONC'}")
    text = text.replace("body_part: [HEAD, BRAIN, HEADNECK]}", "body_prt: [HEAD]}", 1)
    rules.write_text(text)
    code, output = invoke("rules", "check", "--config", str(layout))
    assert code == 2
    lines = output.splitlines()
    # The bad pattern is in two rules: ct-priors excludes what oncology-ct-cap takes.
    assert lines[0] == "4 problem(s):"
    assert "rules/priors.yaml:63: rules[2].select.lookback: invalid duration '3 years'" in output
    assert (
        "rules/priors.yaml:31: rules[0].when.all[2].not.regex: invalid regular expression '^(ONC'"
        in output
    )
    assert (
        "rules/priors.yaml:45: rules[1].when.any[1].all[1].regex: invalid regular expression '^(ONC'"
        in output
    )
    assert (
        "rules/priors.yaml:87: rules[4].when.all[1].not.body_prt: unknown condition 'body_prt'"
        in output
    )


def test_rules_test_command(layout: Path) -> None:
    code, output = invoke("rules", "test", "--config", str(layout))
    assert code == 0, output
    assert output.splitlines()[-1] == "6 cases: 6 passed, 0 failed"

    cases = layout.parent.parent / "rules" / "tests" / "worked-examples.yaml"
    cases.write_text(cases.read_text().replace("max_studies 4", "max_studies 3"))
    code, output = invoke("rules", "test", "--config", str(layout), "--json")
    assert code == 1
    results = json.loads(output)
    [failed] = [result for result in results if not result["passed"]]
    assert failed["name"] == "CT chest takes the four most recent CT and MR of any body part"
    assert failed["failures"] == [
        "rule ct-priors: 2.25.107 skipped because 'beyond max_studies 4 (rank 5)',"
        " expected a reason containing 'beyond max_studies 3'"
    ]


def test_rules_test_names_unknown_rule(layout: Path) -> None:
    cases = layout.parent.parent / "rules" / "tests" / "worked-examples.yaml"
    text = cases.read_text()
    cases.write_text(
        text.replace("      selected:\n        ct-priors:", "      selected:\n        ct-prior:", 1)
    )
    code, output = invoke("rules", "test", "--config", str(layout), "--json")
    assert code == 2
    assert "cases[0].expect.selected.ct-prior: unknown rule 'ct-prior'" in output
    assert "known rules: ct-priors," in output


def test_rules_check_names_unknown_route_and_fact(layout: Path) -> None:
    cases = layout.parent.parent / "rules" / "tests" / "worked-examples.yaml"
    text = cases.read_text()
    text = text.replace("route: ris-orders", "route: ris-ordrs", 1)
    text = text.replace("facts: {ordered_modality:", "facts: {ordered_modalty:", 1)
    cases.write_text(text)
    code, output = invoke("rules", "check", "--config", str(layout))
    assert code == 2
    assert "cases[0].expect.route: unknown route 'ris-ordrs'" in output
    assert "cases[0].expect.facts.ordered_modalty: unknown fact 'ordered_modalty'" in output


def test_rules_test_names_case_files(layout: Path, tmp_path: Path) -> None:
    # A file of the rules folder is named from it, any other by its path as given.
    shipped = layout.parent.parent / "rules" / "tests" / "broken.yaml"
    elsewhere = tmp_path / "broken.yaml"
    for path in (shipped, elsewhere):
        path.write_text("cases:\n  - name: x\n")

    code, output = invoke("rules", "test", str(shipped), str(elsewhere), "--config", str(layout))

    assert code == 2
    assert "  rules/tests/broken.yaml:2: cases[0].today: missing required setting" in output
    assert f"  {elsewhere}:2: cases[0].today: missing required setting" in output


def test_rules_test_without_cases_fails(layout: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("cases: []\n")
    code, output = invoke("rules", "test", str(empty), "--config", str(layout))
    assert code == 1
    assert "no test cases found" in output


def holder_for(layout: Path) -> RuleSetHolder:
    loaded = config.load(layout)
    return RuleSetHolder(
        loaded.rule_set,
        load=lambda: config.load_rules(layout, loaded.settings),
        files=lambda: config.rule_files(layout, loaded.settings),
    )


def test_reload_swaps_valid_rule_set(layout: Path) -> None:
    holder = holder_for(layout)
    before = holder.current()
    assert holder.check_files() is False
    rules = layout.parent.parent / "rules" / "priors.yaml"
    rules.write_text(rules.read_text().replace("max_studies: 4\n", "max_studies: 7\n", 1))
    assert holder.check_files() is True
    after = holder.current()
    assert after is not before
    assert after.rules["ct-priors"].spec.select.max_studies == 7
    assert before.rules["ct-priors"].spec.select.max_studies == 4


def test_reload_rejects_invalid_and_keeps_old(
    layout: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = holder_for(layout)
    before = holder.current()
    routes = layout.parent.parent / "routes" / "orders.yaml"
    routes.write_text(
        routes.read_text().replace("destination: local_pacs", "destination: nowhere", 1)
    )
    with caplog.at_level(logging.ERROR):
        assert holder.reload("SIGHUP") is False
    assert holder.current() is before
    assert holder.rejected == 1
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == (
        "rules reload (SIGHUP) rejected, 1 problem(s); the running rules stay in place"
    )
    assert "routes[0].destination: unknown node 'nowhere'" in messages[1]


def test_reload_rejects_losing_every_route(layout: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = holder_for(layout)
    before = holder.current()
    # An editor truncated the file before writing it again.
    (layout.parent.parent / "routes" / "orders.yaml").write_text("")
    with caplog.at_level(logging.ERROR):
        assert holder.reload("changed: orders.yaml") is False
    assert holder.current() is before
    assert holder.rejected == 1
    assert "the routes folder now defines none" in caplog.text


def test_reload_rejects_losing_every_rule(layout: Path, caplog: pytest.LogCaptureFixture) -> None:
    routes = layout.parent.parent / "routes" / "orders.yaml"
    lines = routes.read_text().splitlines(keepends=True)
    # Routes that name no rule take every rule, so an empty rules folder is valid.
    routes.write_text("".join(line for line in lines if not line.strip().startswith("rules:")))
    holder = holder_for(layout)
    before = holder.current()
    for path in (layout.parent.parent / "rules").glob("*.yaml"):
        path.write_text("")
    with caplog.at_level(logging.ERROR):
        assert holder.reload("changed: priors.yaml") is False
    assert holder.current() is before
    assert "the rules folder now defines none" in caplog.text


def test_watcher_reloads_on_change(layout: Path) -> None:
    holder = holder_for(layout)
    clock = task.Clock()
    watcher = RuleFileWatcher(holder, clock, interval=2)
    watcher.start()
    clock.advance(2)
    assert holder.reloads == 0
    (layout.parent.parent / "rules" / "extra.yaml").write_text(
        "rules:\n  - name: extra\n    when: {ordered_modality: US}\n"
        "    select: {modalities: US, lookback: 1y, max_studies: 1}\n"
    )
    clock.advance(2)
    assert holder.reloads == 1
    assert "extra" in holder.current().rules
    watcher.stop()
    assert clock.getDelayedCalls() == []


def test_jobs_command_shows_cancelled_and_due(layout: Path) -> None:
    from engine.jobs.store import NewJob, Store
    from engine.model import Demographics, OrderFacts

    store = Store(layout.parent.parent / "var" / "fdqr.sqlite")
    local = PatientIdentifier("L12345", "LOCAL")
    due = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    now = dt.datetime(2026, 3, 14, 9, 0, tzinfo=dt.UTC)
    for accession in ("A1", "A2"):
        order = OrderFacts(accession_number=accession)
        job = NewJob("ris", "ct", "local", ("a",), local, Demographics(), order, due)
        store.add_job(job, now)
    store.cancel_order(local, OrderFacts(accession_number="A1"), "order cancelled", now)
    store.close()

    code, output = invoke("jobs", "--config", str(layout))
    assert code == 0, output
    header, second, first = output.splitlines()
    assert "NOT BEFORE" in header
    assert first.split()[:2] == ["1", "cancelled"]
    assert second.split()[:2] == ["2", "queued"]
    assert due.astimezone().strftime("%Y-%m-%d %H:%M:%S") in second
    assert due.astimezone().strftime("%Y-%m-%d %H:%M:%S") not in first
    code, output = invoke("jobs", "--config", str(layout), "--state", "cancelled")
    assert [line.split()[0] for line in output.splitlines()[1:]] == ["1"]


def test_worklist_order_takes_worklist_route(layout: Path) -> None:
    from engine.jobs.planner import Planner
    from engine.model import Demographics, MessageOrigin, OrderFacts

    loaded = config.load(layout)
    now = dt.datetime(2026, 3, 14, 6, 0, tzinfo=dt.UTC)
    planner = Planner(lambda: loaded.rule_set, now=lambda: now, zone=LocalZone("UTC"))
    scheduled = dt.datetime(2026, 3, 14, 11, 0)
    event = OrderPlaced(
        MessageOrigin("WORKLIST", "LOCAL", "MWL", "SPS-77"),
        PatientIdentifier("L12345", "LOCAL"),
        Demographics(),
        OrderFacts(accession_number="A77", ordered_modality="MG", scheduled_time=scheduled),
    )
    plan = planner(event)
    assert plan.outcome == "route worklist-orders: 1 job(s) for rules mammo-priors"
    [job] = plan.jobs
    assert job.route == "worklist-orders"
    assert job.not_before == dt.datetime(2026, 3, 14, 9, 0, tzinfo=dt.UTC)
    assert job.order.body_parts == ()
    assert job.suppression_window == dt.timedelta(hours=24)


def test_sources_section_errors(layout: Path) -> None:
    text = layout.read_text()
    text = text.replace(
        "  hospital_a:\n    modality_matching", "  nowhere:\n    modality_matching", 1
    )
    text = text.replace(
        "    # quiet_hours:\n    #   - days: mon-fri\n    #     hours: 07:00-19:00",
        "    quiet_hours:\n      - days: mon-fri\n        hours: 7-19",
    )
    layout.write_text(text + "time_zone: Mars/Olympus\n")
    with pytest.raises(config.ConfigError) as raised:
        config.load(layout)
    messages = [str(problem) for problem in raised.value.problems]
    assert any(
        "sources.hospital_b.quiet_hours[0].hours: invalid hours '7-19' (use HH:MM-HH:MM" in m
        for m in messages
    )
    assert any("time_zone: unknown time zone 'Mars/Olympus'" in m for m in messages)

    layout.write_text(
        layout.read_text()
        .replace("hours: 7-19", "hours: 07:00-19:00")
        .replace("time_zone: Mars/Olympus\n", "")
    )
    with pytest.raises(config.ConfigError) as raised:
        config.load(layout)
    [problem] = raised.value.problems
    assert problem.path == "sources.nowhere"
    assert problem.message == "unknown node 'nowhere'"
