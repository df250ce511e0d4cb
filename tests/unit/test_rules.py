"""Loading routes and rules, routing orders, and selecting priors."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path

import pytest

from engine.configfile import ConfigError
from engine.model import (
    Demographics,
    MessageOrigin,
    OrderFacts,
    OrderPlaced,
    PatientIdentifier,
    StudyCandidate,
)
from engine.rules.facts import Facts, extract_facts
from engine.rules.loader import load_rule_set
from engine.rules.model import Duration, RuleSet, parse_duration
from engine.rules.select import Routing, route_order, select_priors, subtract
from engine.rules.timing import LocalZone

ROUTES = """
routes:
  - name: ris
    match: {message_type: [ORM^O01], sending_application: RIS}
    sources: [a, b]
    destination: local
  - name: other
    match: {message_type: ORM^O01}
    sources: [b]
    destination: local
    rules: [mr]
"""
RULES = """
procedure_codes:
  CTCHEST: CT
rules:
  - name: ct
    when: {ordered_modality: [CT]}
    select: {modalities: [CT, MR], lookback: 5y, max_studies: 2}
  - name: mr
    when: {ordered_modality: MR}
    select: {modalities: MR, lookback: 18m, max_studies: 1}
"""
TODAY = dt.date(2026, 3, 14)
PATIENT = PatientIdentifier("R1", "A")


def write_rule_set(tmp_path: Path, routes: str = ROUTES, rules: str = RULES) -> tuple[Path, Path]:
    routes_folder = tmp_path / "routes"
    rules_folder = tmp_path / "rules"
    routes_folder.mkdir()
    rules_folder.mkdir()
    (routes_folder / "orders.yaml").write_text(textwrap.dedent(routes))
    (rules_folder / "priors.yaml").write_text(textwrap.dedent(rules))
    return routes_folder, rules_folder


@pytest.fixture
def rule_set(tmp_path: Path) -> RuleSet:
    return load_rule_set(*write_rule_set(tmp_path))


def candidate(
    uid: str,
    date: dt.date | None,
    modalities: tuple[str, ...] = ("CT",),
    source: str = "a",
    accession: str = "",
) -> StudyCandidate:
    return StudyCandidate(
        source=source,
        study_instance_uid=uid,
        patient=PATIENT,
        study_date=date,
        modalities=modalities,
        accession_number=accession,
    )


def origin(application: str = "RIS", message_type: str = "ORM^O01") -> MessageOrigin:
    return MessageOrigin(application, "RAD", message_type, "1")


def facts_of(rule_set: RuleSet, order: OrderFacts, source: MessageOrigin | None = None) -> Facts:
    event = OrderPlaced(source or origin(), PATIENT, Demographics(), order)
    return extract_facts(event, rule_set, LocalZone("UTC"))


def routed(rule_set: RuleSet, source: MessageOrigin, order: OrderFacts) -> Routing:
    return route_order(rule_set, facts_of(rule_set, order, source))


def test_load_keeps_file_order(rule_set: RuleSet) -> None:
    assert [route.name for route in rule_set.routes] == ["ris", "other"]
    assert sorted(rule_set.rules) == ["ct", "mr"]
    procedure = rule_set.procedures["CTCHEST"]
    assert (procedure.modality, procedure.body_part, procedure.origin) == (
        "CT",
        "",
        "rules/priors.yaml",
    )
    assert rule_set.rules["mr"].spec.select.modalities == ["MR"]


def test_load_reports_every_error_with_line(tmp_path: Path) -> None:
    rules = RULES.replace("lookback: 5y", "lookback: 5 yrs").replace(
        "max_studies: 1", "max_studies: 0"
    )
    routes = ROUTES.replace(
        "destination: local\n  - name: other", "destination: local\n  - name: ris"
    )
    with pytest.raises(ConfigError) as raised:
        load_rule_set(*write_rule_set(tmp_path, routes, rules))
    messages = [str(problem) for problem in raised.value.problems]
    assert messages == [
        "rules/priors.yaml:7: rules[0].select.lookback: invalid duration '5 yrs' (use e.g. 5y, 18m, 6w, 30d)",
        "rules/priors.yaml:10: rules[1].select.max_studies: input should be greater than or equal to 1 (value 0)",
        "routes/orders.yaml:7: routes[1].name: route name 'ris' is already used in routes/orders.yaml",
    ]


def test_load_reports_unknown_rule(tmp_path: Path) -> None:
    routes = ROUTES.replace("rules: [mr]", "rules: [mr, nope]")
    with pytest.raises(ConfigError) as raised:
        load_rule_set(*write_rule_set(tmp_path, routes, RULES))
    assert [str(problem) for problem in raised.value.problems] == [
        "routes/orders.yaml:11: routes[1].rules[1]: unknown rule 'nope' (known rules: ct, mr)"
    ]


def test_load_reports_unknown_modalities(tmp_path: Path) -> None:
    rules = (
        RULES.replace("CTCHEST: CT", "CTCHEST: CT\n  CTFOO: {modality: XX}\n  MRX: MRI")
        .replace("ordered_modality: [CT]", "ordered_modality: [CTT, RAD]")
        .replace("modalities: [CT, MR]", "modalities: [CT, MRI, same, ct]")
    )
    with pytest.raises(ConfigError) as raised:
        load_rule_set(*write_rule_set(tmp_path, ROUTES, rules))
    messages = [str(problem).split(" (use ")[0] for problem in raised.value.problems]
    # Reported in one round with the other invalid values, such as a wrong lookback.
    assert sorted(messages) == [
        "rules/priors.yaml:4: procedure_codes.CTFOO.modality: unknown modality 'XX'",
        "rules/priors.yaml:5: procedure_codes.MRX.modality: unknown modality 'MRI'",
        "rules/priors.yaml:8: rules[0].when.ordered_modality: unknown ordered_modality 'CTT'",
        "rules/priors.yaml:9: rules[0].select.modalities: unknown modality 'MRI'",
    ]
    [condition] = [p for p in raised.value.problems if "ordered_modality" in p.path]
    assert "or an HL7 Table 0074 code of OBR-24 such as RAD" in str(condition)


def test_load_reports_message_types_never_seen(tmp_path: Path) -> None:
    routes = ROUTES.replace("message_type: [ORM^O01]", "message_type: [ORM^O01^ORM_O01, ADT^A01]")
    routes += "accept_and_ignore:\n  - {message_type: [ORU^R01, orm^o01, ORM-O01]}\n"
    with pytest.raises(ConfigError) as raised:
        load_rule_set(*write_rule_set(tmp_path, routes, RULES))
    messages = [str(problem).split(" (")[0] for problem in raised.value.problems]
    assert messages == [
        "routes/orders.yaml:4: routes[0].match.message_type: unknown message_type 'ORM^O01^ORM_O01'",
        "routes/orders.yaml:4: routes[0].match.message_type: unknown message_type 'ADT^A01'",
        "routes/orders.yaml:13: accept_and_ignore[0].message_type[1]: invalid message type 'orm^o01'",
        "routes/orders.yaml:13: accept_and_ignore[0].message_type[2]: invalid message type 'ORM-O01'",
    ]
    assert "routes take MWL, OMI^O23, ORM^O01, SIU^S12" in str(raised.value.problems[0])


def test_load_reports_procedure_code_of_wrong_type(tmp_path: Path) -> None:
    rules = RULES.replace("CTCHEST: CT", "CTCHEST: CT\n  MRX: 42")
    with pytest.raises(ConfigError) as raised:
        load_rule_set(*write_rule_set(tmp_path, ROUTES, rules))
    assert [str(problem) for problem in raised.value.problems] == [
        "rules/priors.yaml:4: procedure_codes.MRX: a procedure code maps to a modality such as"
        " CT, or to {modality, body_part, coding_system} (value 42)"
    ]


def test_load_rejects_unknown_setting(tmp_path: Path) -> None:
    rules = RULES.replace("max_studies: 2", "max_studies: 2, max_age: 3")
    with pytest.raises(ConfigError) as raised:
        load_rule_set(*write_rule_set(tmp_path, ROUTES, rules))
    assert "rules[0].select.max_age: unknown setting (value 3)" in str(raised.value)


def test_load_rejects_duplicate_rule_name(tmp_path: Path) -> None:
    routes_folder, rules_folder = write_rule_set(tmp_path)
    (rules_folder / "more.yaml").write_text(
        "rules:\n  - name: ct\n    select: {modalities: CT, lookback: 1y, max_studies: 1}\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_rule_set(routes_folder, rules_folder)
    assert str(raised.value) == (
        "rules/priors.yaml:5: rules[0].name: rule name 'ct' is already used in rules/more.yaml"
    )


def test_load_reports_invalid_yaml_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_rule_set(*write_rule_set(tmp_path, ROUTES, "rules:\n  - name: [unclosed\n"))
    problem = raised.value.problems[0]
    assert problem.file == "rules/priors.yaml"
    assert problem.line == 3
    assert "invalid YAML" in problem.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5y", Duration(5, "y")),
        ("18m", Duration(18, "m")),
        ("30d", Duration(30, "d")),
        ("6W", Duration(6, "w")),
    ],
)
def test_parse_duration(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["5", "y", "5 yrs", "-1y", "1.5y", ""])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["151y", "3000y", "1801m", "7827w", "54790d"])
def test_parse_duration_rejects_over_150_years(text: str) -> None:
    with pytest.raises(ValueError, match=f"duration '{text}' is longer than 150 years"):
        parse_duration(text)


def test_parse_duration_longest_accepted() -> None:
    assert parse_duration("150y") == Duration(150, "y")
    assert parse_duration("1800m") == Duration(1800, "m")
    assert parse_duration("7826w") == Duration(7826, "w")
    assert parse_duration("54786d") == Duration(54786, "d")
    # 150 years before today is still a valid date.
    assert subtract(dt.date(2026, 1, 1), parse_duration("150y")) == dt.date(1876, 1, 1)
    assert subtract(dt.date(2026, 1, 1), parse_duration("54786d")).year > 1


def test_subtract_calendar_units() -> None:
    assert subtract(dt.date(2024, 2, 29), Duration(1, "y")) == dt.date(2023, 2, 28)
    assert subtract(dt.date(2026, 3, 31), Duration(1, "m")) == dt.date(2026, 2, 28)
    assert subtract(dt.date(2026, 3, 14), Duration(18, "m")) == dt.date(2024, 9, 14)
    assert subtract(dt.date(2026, 3, 14), Duration(30, "d")) == dt.date(2026, 2, 12)


def test_route_first_match_and_rules(rule_set: RuleSet) -> None:
    routing = routed(rule_set, origin(), OrderFacts(ordered_modality="CT"))
    assert routing.route is not None
    assert routing.route.name == "ris"
    assert [rule.name for rule in routing.rules] == ["ct"]
    assert [check.taken for check in routing.route_checks] == [True, False]
    # The second route matches too, but the first match wins.
    assert routing.route_checks[1].trace.matched


def test_route_other_sender_takes_second_route(rule_set: RuleSet) -> None:
    routing = routed(rule_set, origin("PACS"), OrderFacts(ordered_modality="CT"))
    assert routing.route is not None
    assert routing.route.name == "other"
    assert routing.route_checks[0].trace.failures() == [
        "sending_application 'PACS' does not match 'RIS'"
    ]
    # The route names only the MR rule, so a CT order gets no rule.
    assert routing.rules == ()
    assert [check.rule.name for check in routing.rule_checks] == ["mr"]


def test_route_modality_from_procedure_map(rule_set: RuleSet) -> None:
    facts = facts_of(rule_set, OrderFacts(procedure_code="CTCHEST"))
    assert facts.order.ordered_modality == "CT"
    [fact] = [fact for fact in facts if fact.name == "ordered_modality"]
    assert fact.source == "procedure_codes[CTCHEST] in rules/priors.yaml"
    routing = route_order(rule_set, facts)
    assert [rule.name for rule in routing.rules] == ["ct"]


def test_route_none_for_other_type(rule_set: RuleSet) -> None:
    routing = routed(rule_set, origin(message_type="OMI^O23"), OrderFacts(ordered_modality="CT"))
    assert routing.route is None
    assert routing.rules == ()
    assert all(not check.trace.matched for check in routing.route_checks)


def test_select_most_recent_within_max(rule_set: RuleSet) -> None:
    candidates = [
        candidate("1", dt.date(2025, 1, 1)),
        candidate("2", dt.date(2026, 1, 1), ("MR",)),
        candidate("3", dt.date(2024, 1, 1)),
    ]
    decisions = select_priors(rule_set.rules["ct"], OrderFacts(), candidates, TODAY)
    chosen = [d.candidate.study_instance_uid for d in decisions if d.selected]
    assert chosen == ["2", "1"]
    skipped = {d.candidate.study_instance_uid: d.reason for d in decisions if not d.selected}
    assert skipped == {"3": "beyond max_studies 2 (rank 3)"}


def test_select_modality_and_lookback(rule_set: RuleSet) -> None:
    candidates = [
        candidate("cr", dt.date(2026, 1, 1), ("CR",)),
        candidate("old", dt.date(2021, 3, 13)),
        candidate("edge", dt.date(2021, 3, 14)),
        candidate("nodate", None),
        candidate("nomod", dt.date(2026, 1, 1), ()),
    ]
    decisions = {
        d.candidate.study_instance_uid: d
        for d in select_priors(rule_set.rules["ct"], OrderFacts(), candidates, TODAY)
    }
    assert decisions["cr"].reason == "modalities CR not in CT/MR"
    assert decisions["old"].reason == "study date 2021-03-13 before lookback 5y (2021-03-14)"
    assert decisions["edge"].selected
    assert decisions["nodate"].reason == "no study date returned by the source"
    assert decisions["nomod"].reason == "no modalities in study returned by the source"


def test_select_skips_future_dates(rule_set: RuleSet) -> None:
    # A site one time zone ahead may date a study of today tomorrow; later dates are errors.
    candidates = [
        candidate("tomorrow", TODAY + dt.timedelta(days=1)),
        candidate("later", TODAY + dt.timedelta(days=2)),
    ]
    decisions = {
        d.candidate.study_instance_uid: d
        for d in select_priors(rule_set.rules["ct"], OrderFacts(), candidates, TODAY)
    }
    assert decisions["tomorrow"].selected
    assert (
        decisions["later"].reason == "study date 2026-03-16 is in the future (today is 2026-03-14)"
    )


def test_select_never_the_ordered_study(rule_set: RuleSet) -> None:
    order = OrderFacts(accession_number="ACC9", study_instance_uid="9.9")
    candidates = [
        candidate("9.9", dt.date(2026, 3, 14)),
        candidate("8", dt.date(2026, 3, 14), accession="ACC9"),
        candidate("7", dt.date(2026, 3, 1)),
    ]
    decisions = {
        d.candidate.study_instance_uid: d
        for d in select_priors(rule_set.rules["ct"], order, candidates, TODAY)
    }
    assert not decisions["9.9"].selected
    assert "ordered study itself" in decisions["9.9"].reason
    assert not decisions["8"].selected
    assert decisions["7"].selected


def test_select_study_at_two_sources_taken_from_first(rule_set: RuleSet) -> None:
    candidates = [
        candidate("1", dt.date(2026, 1, 1), source="a"),
        candidate("1", dt.date(2026, 1, 1), source="b"),
    ]
    decisions = select_priors(rule_set.rules["ct"], OrderFacts(), candidates, TODAY)
    by_source = {d.candidate.source: d for d in decisions}
    assert by_source["a"].selected
    assert not by_source["b"].selected
    assert by_source["b"].reason == "same study is taken from a"
