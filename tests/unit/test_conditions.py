"""The condition language: parsing with every error located, and evaluation on order facts."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from engine.configfile import Document
from engine.hl7.events import IdentifierPolicy, to_event
from engine.hl7.message import parse
from engine.model import Demographics, MessageOrigin, OrderFacts, OrderPlaced, PatientIdentifier
from engine.rules.conditions import Condition, ConditionParser, Never
from engine.rules.facts import FACT_NAMES, UPPER_CASE_FACTS, Facts, extract_facts
from engine.rules.fields import parse_field_path, read_field
from engine.rules.model import Procedure, RuleSet
from engine.rules.timing import LocalZone

POLICY = IdentifierPolicy(issuer="LOCAL", authorities=frozenset({"LOCAL"}))
ORDER = (
    "MSH|^~\\&|RIS|RADIOLOGY|FDQR|LOCAL|20260314093000||ORM^O01|C1|P|2.5.1\r"
    "PID|1||L1^^^LOCAL^MR~998877^^^NATIONAL^NI||DOE^JANE||19650312|F\r"
    "PV1|1|I|ONC-WARD^201^1^LOCAL\r"
    "ORC|NW|PLC1|FIL1||SC||^^^20260315080000||20260314093000\r"
    "OBR|1|PLC1|FIL1|CTCAP^CT Chest Abdomen Pelvis^LOCAL||||||||||||||ACC1\r"
    "OBX|1|ST|A||first\r"
    "OBX|2|ST|B||sec\\T\\ond\r"
)
ZONE = LocalZone("UTC")


def hl7_facts(text: str = ORDER, rule_set: RuleSet | None = None) -> Facts:
    event = to_event(parse(text.encode()), POLICY)
    assert isinstance(event, OrderPlaced)
    return extract_facts(event, rule_set or RuleSet.empty(), ZONE)


def worklist_facts(order: OrderFacts) -> Facts:
    event = OrderPlaced(
        MessageOrigin("WORKLIST", "LOCAL", "MWL", "SPS-1"),
        PatientIdentifier("L1", "LOCAL"),
        Demographics(),
        order,
    )
    return extract_facts(event, RuleSet.empty(), ZONE)


def condition(data: Any) -> Condition:
    parser = ConditionParser(Document("rules/t.yaml", data, {}), FACT_NAMES, UPPER_CASE_FACTS)
    parsed = parser.parse(data, ("when",))
    assert parser.problems == []
    return parsed


def problems(data: Any) -> list[str]:
    parser = ConditionParser(
        Document("rules/t.yaml", {"when": data}, {("when",): 4}), FACT_NAMES, UPPER_CASE_FACTS
    )
    parsed = parser.parse(data, ("when",))
    assert isinstance(parsed, Never)
    return [str(problem) for problem in parser.problems]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"message_type": "ORM^O01"}, True),
        ({"message_type": ["OMI^O23", "ORM^O01"]}, True),
        ({"message_type": "OMI^O23"}, False),
        ({"trigger_event": "O01", "message_code": "ORM"}, True),
        ({"sending_application": "RIS", "sending_facility": "RADIOLOGY"}, True),
        ({"sending_application": "ris"}, False),
        ({"fact": "sending_application", "equals": "ris", "ignore_case": True}, True),
        ({"patient_class": "I"}, True),
        ({"order_control": "NW"}, True),
        ({"procedure_code": "CTCAP"}, True),
        ({"fact": "procedure_text", "regex": "(?i)abdomen"}, True),
        ({"fact": "procedure_text", "regex": "^Abdomen"}, False),
        ({"fact": "ordered_modality", "present": False}, True),
        ({"fact": "accession_number", "present": True}, True),
        ({"not": {"patient_class": "E"}}, True),
        ({"any": [{"patient_class": "E"}, {"patient_class": "I"}]}, True),
        ({"any": [{"patient_class": "E"}, {"patient_class": "O"}]}, False),
        ({"all": [{"patient_class": "I"}, {"order_control": "NW"}]}, True),
        ({"all": [{"patient_class": "I"}, {"order_control": "CA"}]}, False),
        ([{"patient_class": "I"}, {"not": {"order_control": "CA"}}], True),
    ],
)
def test_fact_conditions(data: Any, expected: bool) -> None:
    assert condition(data).evaluate(hl7_facts()).matched is expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"field": "OBR-4.1", "equals": "CTCAP"}, True),
        ({"field": "OBR-4", "equals": "CTCAP"}, True),
        ({"field": "OBR-4.2", "regex": "Pelvis$"}, True),
        ({"field": "PV1-3.1", "regex": "^ONC"}, True),
        ({"field": "PV1-3.2", "in": ["200", "201"]}, True),
        # PID-3 repeats: any repetition may match, or the one asked for.
        ({"field": "PID-3.4", "equals": "NATIONAL"}, True),
        ({"field": "PID-3[1].4", "equals": "NATIONAL"}, False),
        ({"field": "PID-3[2].1", "equals": "998877"}, True),
        # OBX occurs twice: any occurrence, or the one asked for; escapes are decoded.
        ({"field": "OBX-5", "equals": "sec&ond"}, True),
        ({"field": "OBX[1]-5", "equals": "sec&ond"}, False),
        ({"field": "OBX[2]-3", "equals": "B"}, True),
        ({"field": "ORC-7.4", "equals": "20260315080000"}, True),
        ({"field": "MSH-9.2", "equals": "O01"}, True),
        ({"field": "MSH-3", "equals": "RIS"}, True),
        ({"field": "ZDS-1", "present": False}, True),
        ({"field": "OBR-4.1", "equals": "ctcap", "ignore_case": True}, True),
        ({"field": "OBR-4.1", "regex": "ctcap", "ignore_case": True}, True),
    ],
)
def test_field_conditions(data: Any, expected: bool) -> None:
    assert condition(data).evaluate(hl7_facts()).matched is expected


def test_field_path_parts() -> None:
    path = parse_field_path("PID[2]-3[4].5.6")
    assert (path.segment, path.occurrence, path.field, path.repetition) == ("PID", 2, 3, 4)
    assert (path.component, path.subcomponent) == (5, 6)
    message = parse(ORDER.encode())
    assert read_field(message, parse_field_path("PID-3")) == ["L1", "998877"]
    assert read_field(message, parse_field_path("PID-3.4.1")) == ["LOCAL", "NATIONAL"]


@pytest.mark.parametrize("text", ["OBR4", "obr-4", "OBR-0", "OBR-4.", "OBR-4..1", "OB-4", 12])
def test_field_path_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="invalid HL7 field path"):
        parse_field_path(text)


def test_worklist_order_matches_origin_not_fields() -> None:
    facts = worklist_facts(OrderFacts(ordered_modality="mg", accession_number="A9"))
    assert condition({"message_type": "MWL"}).evaluate(facts).matched
    assert condition({"ordered_modality": "MG"}).evaluate(facts).matched
    field = condition({"field": "PV1-3.1", "present": False}).evaluate(facts)
    assert not field.matched
    assert field.text == "PV1-3.1: no HL7 message behind this order (origin MWL)"
    # A field condition is false without a message, so its negation is true.
    assert condition({"not": {"field": "OBR-4.1", "equals": "X"}}).evaluate(facts).matched


def test_modality_values_upper_cased() -> None:
    facts = hl7_facts(ORDER.replace("ACC1\r", "ACC1||||||ct\r"))
    assert condition({"ordered_modality": "ct"}).evaluate(facts).matched
    assert condition({"fact": "ordered_modality", "in": ["mr", "ct"]}).evaluate(facts).matched


def test_trace_says_why() -> None:
    data = {"all": [{"sending_application": "PACS"}, {"field": "PV1-3.1", "regex": "^ICU"}]}
    trace = condition(data).evaluate(hl7_facts())
    assert not trace.matched
    assert trace.failures() == [
        "sending_application 'RIS' does not match 'PACS'",
        "PV1-3.1 'ONC-WARD' does not match /^ICU/",
    ]
    negated = condition({"not": {"patient_class": "I"}}).evaluate(hl7_facts())
    assert negated.failures() == ["not (patient_class 'I' matches 'I')"]
    assert trace.to_dict()["children"][0] == {
        "condition": "sending_application 'RIS' does not match 'PACS'",
        "matched": False,
    }


def test_facts_name_their_source() -> None:
    rule_set = RuleSet((), {}, {"CTCAP": Procedure("CTCAP", "CT", "CHESTABDPELVIS", "", "r.yaml")})
    facts = {fact.name: fact for fact in hl7_facts(rule_set=rule_set)}
    assert facts["ordered_modality"].values == ("CT",)
    assert facts["ordered_modality"].source == "procedure_codes[CTCAP] in r.yaml"
    assert facts["body_part"].values == ("CHESTABDPELVIS",)
    assert facts["scheduled_time"].values == ("2026-03-15T08:00:00+00:00",)
    assert facts["scheduled_time"].source == "ORC-7.4"
    assert facts["placer_order_number"].source == "ORC-2"
    assert facts["accession_number"].source == "OBR-18"
    assert facts["patient"].values == ("L1^^^LOCAL",)


@pytest.mark.parametrize(
    ("segments", "source", "expected"),
    [
        ("TQ1|1||||||20260320101500+0100\r", "TQ1-7", "2026-03-20T10:15:00+01:00"),
        ("SCH|1||||||||||^^^202603211200\r", "SCH-11.4", "2026-03-21T12:00:00+00:00"),
    ],
)
def test_scheduled_time_sources(segments: str, source: str, expected: str) -> None:
    text = ORDER.replace("^^^20260315080000", "") + segments
    facts = {fact.name: fact for fact in hl7_facts(text)}
    assert facts["scheduled_time"].source == source
    assert facts["scheduled_time"].values == (expected,)


def test_scheduled_time_from_obr() -> None:
    obr = (
        "OBR|1|PLC1|FIL1|CTCAP^CT^LOCAL"
        + "|" * 23
        + "^^^20260322090000"
        + "|" * 9
        + "20260323090000"
    )
    text = ORDER.replace("ORC|NW|PLC1|FIL1||SC||^^^20260315080000", "ORC|NW|PLC1|FIL1||SC")
    text = text.replace(
        "OBR|1|PLC1|FIL1|CTCAP^CT Chest Abdomen Pelvis^LOCAL||||||||||||||ACC1", obr
    )
    facts = {fact.name: fact for fact in hl7_facts(text)}
    assert facts["scheduled_time"].source == "OBR-27.4"
    assert facts["scheduled_time"].values == ("2026-03-22T09:00:00+00:00",)
    without_27 = text.replace("^^^20260322090000", "")
    facts = {fact.name: fact for fact in hl7_facts(without_27)}
    assert facts["scheduled_time"].source == "OBR-36"


def test_worklist_scheduled_time_and_body_parts() -> None:
    facts = worklist_facts(
        OrderFacts(scheduled_time=dt.datetime(2026, 3, 20, 8, 0), body_parts=("breast",))
    )
    assert facts.get("scheduled_time") == "2026-03-20T08:00:00+00:00"
    assert facts.order.body_parts == ("BREAST",)
    assert {fact.source for fact in facts} == {"MWL"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"modality": "CT"},
            "rules/t.yaml:4: when.modality: unknown condition 'modality' (use all, any, not, field, fact, or a fact name:",
        ),
        (
            {"field": "OBR4", "equals": "X"},
            "rules/t.yaml:4: when.field: invalid HL7 field path 'OBR4'",
        ),
        (
            {"field": "OBR-4", "regex": "(unclosed"},
            "rules/t.yaml:4: when.regex: invalid regular expression '(unclosed'",
        ),
        (
            {"field": "OBR-4", "equals": "A", "in": ["B"]},
            "rules/t.yaml:4: when: a field or fact condition needs exactly one of equals, in, regex, present (found equals, in)",
        ),
        (
            {"field": "OBR-4", "equals": ["A", "B"]},
            "rules/t.yaml:4: when.equals: equals needs one value (use 'in' for a list of values)",
        ),
        (
            {"fact": "colour", "equals": "red"},
            "rules/t.yaml:4: when.fact: unknown fact 'colour' (known facts: message_type,",
        ),
        ({"all": []}, "rules/t.yaml:4: when.all: 'all' needs a non-empty list of conditions"),
        (
            {"equals": "X"},
            "rules/t.yaml:4: when.equals: 'equals' needs 'field' or 'fact' beside it",
        ),
        ("CT", "rules/t.yaml:4: when: invalid condition 'CT'"),
        (
            {"field": "OBR-4", "present": "yes"},
            "rules/t.yaml:4: when.present: present must be true or false",
        ),
        (
            {"field": "OBR-4", "equals": "X", "case": True},
            "rules/t.yaml:4: when.case: unknown setting 'case' in a field or fact condition",
        ),
    ],
)
def test_parse_errors_located(data: Any, expected: str) -> None:
    [message] = problems(data)
    assert message.startswith(expected)


def test_parse_reports_every_error() -> None:
    data = {"any": [{"modality": "CT"}, {"field": "X-1", "equals": "A"}, {"not": {"colour": 1}}]}
    found = problems(data)
    assert [text.split(":")[2].strip() for text in found] == [
        "when.any[0].modality",
        "when.any[1].field",
        "when.any[2].not.colour",
    ]
