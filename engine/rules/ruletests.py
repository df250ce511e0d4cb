"""`fdqr rules test`: analyst-written cases kept beside the rules, in rules/tests/*.yaml.

    cases:
      - name: CT chest takes recent CT and MR
        message: ct-chest.hl7          # an HL7 file beside this one, or `hl7:` inline
        today: 2026-03-14               # the date the rules are evaluated on
        candidates:                     # as in engine.rules.candidates
          - {source: hospital_a, study_instance_uid: 1.1, study_date: 2025-03-01,
             modalities: [CT], description: CT CHEST}
        expect:
          route: ris-orders             # null: no route takes the order
          rules: [ct-priors]            # the rules that apply (optional)
          facts: {ordered_modality: CT} # facts and their values (optional)
          selected:                     # per rule, the selected study UIDs
            ct-priors: ['1.1']
          skipped:                      # per rule, UID and a part of the reason (optional)
            ct-priors: {'1.9': before lookback}

A case passes when every expectation it states holds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.configfile import ConfigError, Document, Problem, load_document, validate
from engine.hl7.events import (
    IdentifierPolicy,
    check_control_id,
    check_header,
    origin_of,
    to_event,
)
from engine.hl7.intake import ignore_reason
from engine.hl7.message import HL7Error, parse
from engine.jobs.planner import event_label
from engine.model import Decision, OrderPlaced, PatientIdentifier
from engine.rules.candidates import CandidateSchema, read_candidates
from engine.rules.evaluate import evaluate_order
from engine.rules.explain import Explanation, RuleExplanation, explain
from engine.rules.facts import FACT_NAMES
from engine.rules.loader import yaml_files
from engine.rules.model import RuleSet
from engine.rules.timing import LocalZone


class _Expect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    route: str | None = "(any)"
    rules: list[str] | None = None
    facts: dict[str, str | list[str]] = Field(default_factory=dict)
    selected: dict[str, list[str]] = Field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = Field(default_factory=dict)


class _Case(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    message: str | None = None
    hl7: str | None = None
    today: dt.date
    candidates: list[Any] = Field(default_factory=list)
    expect: _Expect


class _CaseFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cases: list[_Case] = Field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class CaseResult:
    file: str
    line: int | None
    name: str
    failures: tuple[str, ...]
    explanation: Explanation | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "name": self.name,
            "passed": self.passed,
            "failures": list(self.failures),
        }


@dataclasses.dataclass(frozen=True)
class LoadedCase:
    document: Document
    index: int
    case: _Case
    candidates: list[CandidateSchema]
    message: bytes


def case_files(folder: Path) -> list[Path]:
    return yaml_files(folder) if folder.is_dir() else []


def _case_file_name(path: Path, rules_folder: Path | None) -> str:
    if rules_folder is not None and path.resolve().is_relative_to(rules_folder.resolve()):
        return str(path.resolve().relative_to(rules_folder.resolve().parent))
    return str(path)


def load_cases(
    paths: list[Path], rule_set: RuleSet | None = None, rules_folder: Path | None = None
) -> list[LoadedCase]:
    """Load and check case files. Raises ConfigError listing every problem.

    With a rule set, each expectation must name its routes, rules and facts.
    Files in rules_folder are named from it (rules/tests/worked-examples.yaml),
    other files by their path as given.
    """
    problems: list[Problem] = []
    loaded: list[LoadedCase] = []
    for path in paths:
        try:
            document = load_document(path, _case_file_name(path, rules_folder))
            parsed = validate(document, _CaseFile)
        except ConfigError as error:
            problems += error.problems
            continue
        for index, case in enumerate(parsed.cases):
            base = ("cases", index)
            try:
                candidates = read_candidates(document, (*base, "candidates"))
            except ConfigError as error:
                problems += error.problems
                continue
            if rule_set is not None:
                problems += _unknown_names(document, (*base, "expect"), case.expect, rule_set)
            message = _message(document, path, case, base, problems)
            if message is not None:
                loaded.append(LoadedCase(document, index, case, candidates, message))
    if problems:
        raise ConfigError(problems)
    return loaded


def _unknown_names(
    document: Document, path: tuple[str | int, ...], expect: _Expect, rule_set: RuleSet
) -> list[Problem]:
    """Return a problem for each route, rule or fact an expectation names that does not exist."""
    problems = []
    routes = [route.name for route in rule_set.routes]
    if expect.route not in ("(any)", None, *routes):
        problems.append(
            document.problem(
                (*path, "route"),
                f"unknown route '{expect.route}'",
                f"known routes: {', '.join(routes)}, or null for none",
            )
        )
    rule_hint = f"known rules: {', '.join(rule_set.rules)}"
    for position, name in enumerate(expect.rules or []):
        if name not in rule_set.rules:
            problems.append(
                document.problem((*path, "rules", position), f"unknown rule '{name}'", rule_hint)
            )
    for section in ("selected", "skipped"):
        for name in getattr(expect, section):
            if name not in rule_set.rules:
                problems.append(
                    document.problem((*path, section, name), f"unknown rule '{name}'", rule_hint)
                )
    for name in expect.facts:
        if name not in FACT_NAMES:
            problems.append(
                document.problem(
                    (*path, "facts", name),
                    f"unknown fact '{name}'",
                    f"known facts: {', '.join(FACT_NAMES)}",
                )
            )
    return problems


def _message(
    document: Document, path: Path, case: _Case, base: tuple[str, int], problems: list[Problem]
) -> bytes | None:
    if (case.message is None) == (case.hl7 is None):
        problems.append(document.problem(base, "a case needs either message (a file) or hl7"))
        return None
    if case.hl7 is not None:
        return case.hl7.strip().replace("\r\n", "\r").replace("\n", "\r").encode("utf-8")
    assert case.message is not None
    file = path.parent / case.message
    try:
        return file.read_bytes()
    except OSError as error:
        problems.append(
            document.problem((*base, "message"), f"cannot read {file}: {error.strerror}")
        )
        return None


def run_case(
    loaded: LoadedCase, rule_set: RuleSet, policy: IdentifierPolicy, zone: LocalZone
) -> CaseResult:
    """Run one case against a rule set and compare with its expectations."""
    case = loaded.case
    line = loaded.document.line_of(("cases", loaded.index))
    file = loaded.document.file

    try:
        message = parse(loaded.message)
        check_control_id(message)
        ignored = ignore_reason(rule_set, origin_of(message))
        if ignored is not None:
            return CaseResult(
                file, line, case.name, (f"the message is acknowledged and ignored: {ignored}",)
            )
        check_header(message)
        event = to_event(message, policy)
    except HL7Error as error:
        return CaseResult(file, line, case.name, (f"the message is rejected: {error.text}",))
    if not isinstance(event, OrderPlaced):
        kind = event_label(event)
        return CaseResult(file, line, case.name, (f"the message is not a new order ({kind})",))

    now = zone.aware(dt.datetime.combine(case.today, dt.time(12, 0)))
    evaluation = evaluate_order(rule_set, event, zone, now)
    patients: dict[str, PatientIdentifier] = {}
    studies = [candidate.to_candidate(patients) for candidate in loaded.candidates]
    names = [check.rule.name for check in evaluation.routing.rule_checks]
    explanation = explain(
        evaluation,
        rule_set,
        today=case.today,
        candidates={name: studies for name in names},
        candidates_from=f"{file} case {case.name}",
    )
    failures = _unknown_rules(case.expect, rule_set) + _compare(case.expect, explanation)
    return CaseResult(file, line, case.name, tuple(failures), explanation)


def _compare(expect: _Expect, explanation: Explanation) -> list[str]:
    failures: list[str] = []
    evaluation = explanation.evaluation
    route = evaluation.routing.route
    route_name = route.name if route else None
    if expect.route != "(any)" and expect.route != route_name:
        failures.append(f"route: expected {expect.route}, got {route_name}")
    applied = [rule.name for rule in evaluation.routing.rules]
    if expect.rules is not None and sorted(expect.rules) != sorted(applied):
        failures.append(f"rules: expected {_names(expect.rules)}, got {_names(applied)}")

    for name, value_or_list in expect.facts.items():
        values = list(evaluation.facts.values(name))
        items = value_or_list if isinstance(value_or_list, list) else [value_or_list]
        expected = [str(value) for value in items]
        if expected != values:
            failures.append(f"fact {name}: expected {_names(expected)}, got {_names(values)}")

    by_rule = {rule.rule.name: rule for rule in explanation.rules if rule.applies}
    for name, uids in expect.selected.items():
        failures += _compare_selected(name, [str(uid) for uid in uids], by_rule.get(name))
    for name, reasons in expect.skipped.items():
        failures += _compare_skipped(name, reasons, by_rule.get(name))
    return failures


def _unknown_rules(expect: _Expect, rule_set: RuleSet) -> list[str]:
    """Return a failure for each rule an expectation names that the rule set lacks."""
    named = [*(expect.rules or []), *expect.selected, *expect.skipped]
    unknown = sorted({name for name in named if name not in rule_set.rules})
    known = ", ".join(sorted(rule_set.rules)) or "none"
    return [f"rule {name}: no rule has this name (known: {known})" for name in unknown]


def _decisions(rule: RuleExplanation) -> dict[str, Decision]:
    return {item.decision.candidate.study_instance_uid: item.decision for item in rule.candidates}


def _compare_selected(name: str, uids: list[str], rule: RuleExplanation | None) -> list[str]:
    if rule is None:
        return [f"rule {name}: expected to apply, but it does not"]
    failures = []
    decisions = _decisions(rule)
    for uid in uids:
        decision = decisions.get(uid)
        if decision is None:
            failures.append(f"rule {name}: study {uid} is not among the candidates")
        elif not decision.selected:
            failures.append(f"rule {name}: expected {uid} selected, but skipped: {decision.reason}")
    for uid, decision in decisions.items():
        if decision.selected and uid not in uids:
            failures.append(f"rule {name}: {uid} selected but not expected: {decision.reason}")
    return failures


def _compare_skipped(name: str, reasons: dict[str, str], rule: RuleExplanation | None) -> list[str]:
    if rule is None:
        return [f"rule {name}: expected to apply, but it does not"]
    failures = []
    decisions = _decisions(rule)
    for uid, part in reasons.items():
        decision = decisions.get(str(uid))
        if decision is None:
            failures.append(f"rule {name}: study {uid} is not among the candidates")
        elif decision.selected:
            failures.append(f"rule {name}: expected {uid} skipped, but selected: {decision.reason}")
        elif part.lower() not in decision.reason.lower():
            failures.append(
                f"rule {name}: {uid} skipped because {decision.reason!r},"
                f" expected a reason containing {part!r}"
            )
    return failures


def _names(values: list[str]) -> str:
    return ", ".join(values) or "none"
