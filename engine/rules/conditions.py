"""The condition language of routes and rules: a declared grammar, evaluated by this module.

A condition is one of:

    all: [CONDITION, ...]          every one holds
    any: [CONDITION, ...]          at least one holds
    not: CONDITION                 the condition does not hold
    FACT: VALUE or [VALUE, ...]    a named order fact equals the value, or one of the list
    {fact: FACT, OPERATOR}         a named order fact, with an explicit operator
    {field: PATH, OPERATOR}        an HL7 field (OBR-4.1, PV1-3.1, PID-3[2].4)

OPERATOR is one of `equals: VALUE`, `in: [VALUE, ...]`, `regex: PATTERN` (searched,
so anchor with ^ and $) or `present: true|false`; `ignore_case: true` compares
without case. A mapping of several FACT keys, or a list, means all of them.
Nothing in a condition is executed: values are compared as text.

A fact or field with several values (PID-3 repetitions, several body parts)
holds when any value matches. A field condition never holds for an order
without an HL7 message behind it (a worklist order), whatever its operator.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from engine.configfile import Document, PathKey, Problem
from engine.hl7.message import Message
from engine.rules.fields import FieldPath, parse_field_path, read_field

OPERATORS = ("equals", "in", "regex", "present")
_TEST_KEYS = frozenset({"fact", "field", "ignore_case", *OPERATORS})
_COMBINATORS = ("all", "any", "not")


class FactSource(Protocol):
    """The input of conditions: named order facts, and the HL7 message if there is one."""

    @property
    def message(self) -> Message | None: ...

    @property
    def origin_type(self) -> str: ...

    def values(self, name: str) -> tuple[str, ...]: ...


class Trace:
    """The result of evaluating a condition, with the reason, for explain.

    The reason is put into words only when it is read, because the engine
    evaluates every route and rule for each order it receives and reads only
    whether they matched.
    """

    def __init__(
        self,
        text: str | Callable[[], str],
        matched: bool,
        children: tuple[Trace, ...] = (),
    ) -> None:
        self._text = text
        self.matched = matched
        self.children = children

    @functools.cached_property
    def text(self) -> str:
        return self._text if isinstance(self._text, str) else self._text()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"condition": self.text, "matched": self.matched}
        if self.children:
            data["children"] = [child.to_dict() for child in self.children]
        return data

    def failures(self) -> list[str]:
        """Return the texts of the leaf conditions that made this condition fail."""
        if self.matched:
            return []
        if not self.children:
            return [self.text]
        if self.text.startswith("not"):
            return [f"not ({self.children[0].text})"]
        return [text for child in self.children for text in child.failures()]


class Condition(Protocol):
    def evaluate(self, facts: FactSource) -> Trace: ...


@dataclasses.dataclass(frozen=True)
class Always:
    """The condition of a rule or route that states none."""

    text: str = "no condition"

    def evaluate(self, facts: FactSource) -> Trace:
        return Trace(self.text, True)


@dataclasses.dataclass(frozen=True)
class All:
    children: tuple[Condition, ...]

    def evaluate(self, facts: FactSource) -> Trace:
        traces = tuple(child.evaluate(facts) for child in self.children)
        if len(traces) == 1:
            return traces[0]
        return Trace("all of", all(trace.matched for trace in traces), traces)


@dataclasses.dataclass(frozen=True)
class AnyOf:
    children: tuple[Condition, ...]

    def evaluate(self, facts: FactSource) -> Trace:
        traces = tuple(child.evaluate(facts) for child in self.children)
        return Trace("any of", any(trace.matched for trace in traces), traces)


@dataclasses.dataclass(frozen=True)
class Not:
    child: Condition

    def evaluate(self, facts: FactSource) -> Trace:
        trace = self.child.evaluate(facts)
        return Trace("not", not trace.matched, (trace,))


@dataclasses.dataclass(frozen=True)
class Test:
    """One comparison: equals, in, regex or present."""

    operator: str
    values: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None
    present: bool = True
    ignore_case: bool = False

    def check(self, subject: str, found: Sequence[str]) -> Trace:
        if self.operator == "present":
            holds = bool(found) == self.present
        else:
            holds = any(self._matches(value) for value in found)
        return Trace(lambda: self._describe(subject, found, holds), holds)

    def _describe(self, subject: str, found: Sequence[str], holds: bool) -> str:
        shown = ", ".join(f"'{value}'" for value in found) or "empty"
        if self.operator == "present":
            state = f"present ({shown})" if found else "empty"
            wanted = "present" if self.present else "empty"
            return f"{subject} is {state}, expected {wanted}"
        if not found:
            return f"{subject} is empty, expected {self._expectation()}"
        verb = "matches" if holds else "does not match"
        return f"{subject} {shown} {verb} {self._expectation()}"

    def _expectation(self) -> str:
        case = " (ignoring case)" if self.ignore_case else ""
        if self.operator == "regex":
            assert self.pattern is not None
            return f"/{self.pattern.pattern}/{case}"
        if self.operator == "equals":
            return f"'{self.values[0]}'{case}"
        return "one of " + ", ".join(self.values) + case

    def _matches(self, value: str) -> bool:
        if self.operator == "regex":
            assert self.pattern is not None
            return self.pattern.search(value) is not None
        if self.ignore_case:
            return value.casefold() in self._folded_values
        return value in self.values

    @functools.cached_property
    def _folded_values(self) -> frozenset[str]:
        return frozenset(wanted.casefold() for wanted in self.values)


@dataclasses.dataclass(frozen=True)
class FactTest:
    name: str
    test: Test

    def evaluate(self, facts: FactSource) -> Trace:
        return self.test.check(self.name, facts.values(self.name))


@dataclasses.dataclass(frozen=True)
class FieldTest:
    path: FieldPath
    test: Test

    def evaluate(self, facts: FactSource) -> Trace:
        if facts.message is None:
            return Trace(
                f"{self.path}: no HL7 message behind this order (origin {facts.origin_type})",
                False,
            )
        return self.test.check(str(self.path), read_field(facts.message, self.path))


class ConditionParser:
    """Parses condition data from a YAML document, collecting problems with their paths."""

    def __init__(
        self,
        document: Document,
        fact_names: Sequence[str],
        upper_case_facts: frozenset[str] = frozenset(),
        known_values: Mapping[str, tuple[Collection[str], str]] | None = None,
    ) -> None:
        self.document = document
        self.fact_names = tuple(fact_names)
        # Facts whose values are upper-case codes (modalities, body parts): values in
        # conditions on them are upper-cased too, so `ordered_modality: ct` works.
        self.upper_case_facts = upper_case_facts
        # The values some facts can take, with a hint naming them: a value in an equals
        # or in test outside them is a typo that would make the condition never hold.
        self.known_values = known_values or {}
        self.problems: list[Problem] = []

    def parse(self, data: object, path: PathKey) -> Condition:
        """Return the condition at `path`; on an error, record it and return a condition
        that never holds, so parsing continues and every error is reported."""
        problems_before = len(self.problems)
        condition = self._parse(data, path)
        if len(self.problems) > problems_before or condition is None:
            return Never()
        return condition

    def _problem(self, path: PathKey, message: str, hint: str = "") -> None:
        self.problems.append(self.document.problem(path, message, hint))

    def _known(self, fact: str, values: Sequence[str], path: PathKey) -> bool:
        """Record a problem for each value the fact cannot take; True when there is none."""
        if fact not in self.known_values:
            return True
        allowed, hint = self.known_values[fact]
        unknown = [value for value in values if value not in allowed]
        for value in unknown:
            self._problem(path, f"unknown {fact} '{value}'", hint)
        return not unknown

    def _parse(self, data: object, path: PathKey) -> Condition | None:
        if isinstance(data, list):
            if not data:
                self._problem(path, "empty list of conditions")
                return None
            return All(tuple(self._parse_required(item, (*path, i)) for i, item in enumerate(data)))
        if not isinstance(data, Mapping) or not data:
            self._problem(
                path,
                f"invalid condition {_short(data)}",
                "use all, any, not, a fact name, or {field: PATH, equals|in|regex|present: ...}",
            )
            return None
        if "field" in data or "fact" in data:
            return self._parse_test(data, path)

        parts: list[Condition] = []
        for key, value in data.items():
            part = self._parse_key(str(key), value, (*path, str(key)))
            if part is not None:
                parts.append(part)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return All(tuple(parts))

    def _parse_required(self, data: object, path: PathKey) -> Condition:
        return self._parse(data, path) or Never()

    def _parse_key(self, key: str, value: object, path: PathKey) -> Condition | None:
        if key in ("all", "any"):
            if not isinstance(value, list) or not value:
                self._problem(path, f"'{key}' needs a non-empty list of conditions")
                return None
            children = tuple(self._parse_required(item, (*path, i)) for i, item in enumerate(value))
            return All(children) if key == "all" else AnyOf(children)
        if key == "not":
            return Not(self._parse_required(value, path))
        if key in self.fact_names:
            values = self._values(value, path)
            if values is None:
                return None
            if key in self.upper_case_facts:
                values = tuple(item.upper() for item in values)
            if not self._known(key, values, path):
                return None
            operator = "equals" if len(values) == 1 else "in"
            return FactTest(key, Test(operator, values))
        if key in _TEST_KEYS:
            self._problem(path, f"'{key}' needs 'field' or 'fact' beside it")
            return None
        self._problem(
            path,
            f"unknown condition '{key}'",
            "use all, any, not, field, fact, or a fact name: " + ", ".join(self.fact_names),
        )
        return None

    def _parse_test(self, data: Mapping[Any, Any], path: PathKey) -> Condition | None:
        unknown = [str(key) for key in data if key not in _TEST_KEYS]
        for key in unknown:
            self._problem(
                (*path, key),
                f"unknown setting '{key}' in a field or fact condition",
                "use field or fact, one of equals, in, regex, present, and optionally ignore_case",
            )
        if "field" in data and "fact" in data:
            self._problem(path, "a condition names either 'field' or 'fact', not both")
            return None
        operators = [key for key in OPERATORS if key in data]
        if len(operators) != 1:
            self._problem(
                path,
                "a field or fact condition needs exactly one of equals, in, regex, present"
                + (f" (found {', '.join(operators)})" if operators else ""),
            )
            return None
        test = self._parse_operator(operators[0], data, path)
        if test is None or unknown:
            return None

        if "fact" in data and data["fact"] in self.upper_case_facts and test.values:
            test = dataclasses.replace(test, values=tuple(v.upper() for v in test.values))
        if "fact" in data:
            name = data["fact"]
            if name not in self.fact_names:
                self._problem(
                    (*path, "fact"),
                    f"unknown fact {_short(name)}",
                    "known facts: " + ", ".join(self.fact_names),
                )
                return None
            if test.operator in ("equals", "in") and not self._known(
                str(name), test.values, (*path, test.operator)
            ):
                return None
            return FactTest(str(name), test)
        try:
            field_path = parse_field_path(data["field"])
        except ValueError as error:
            self._problem((*path, "field"), str(error))
            return None
        return FieldTest(field_path, test)

    def _parse_operator(self, operator: str, data: Mapping[Any, Any], path: PathKey) -> Test | None:
        ignore_case = data.get("ignore_case", False)
        if not isinstance(ignore_case, bool):
            self._problem((*path, "ignore_case"), "ignore_case must be true or false")
            return None
        value = data[operator]
        where = (*path, operator)
        if operator == "present":
            if not isinstance(value, bool):
                self._problem(where, "present must be true or false")
                return None
            return Test("present", present=value)
        if operator == "regex":
            if not isinstance(value, str):
                self._problem(where, f"regex must be a text pattern, not {_short(value)}")
                return None
            try:
                flags = re.IGNORECASE if ignore_case else 0
                return Test("regex", pattern=re.compile(value, flags), ignore_case=ignore_case)
            except re.error as error:
                self._problem(where, f"invalid regular expression '{value}': {error}")
                return None
        if operator == "equals" and isinstance(value, list | dict):
            self._problem(where, "equals needs one value", "use 'in' for a list of values")
            return None
        values = self._values(value, where)
        if values is None:
            return None
        return Test(operator, values, ignore_case=ignore_case)

    def _values(self, value: object, path: PathKey) -> tuple[str, ...] | None:
        items = value if isinstance(value, list) else [value]
        if not items or any(isinstance(item, dict | list) or item is None for item in items):
            self._problem(path, f"expected a value or a list of values, not {_short(value)}")
            return None
        return tuple(_text(item) for item in items)


@dataclasses.dataclass(frozen=True)
class Never:
    """Stands in for a condition that failed to parse; the rule set is rejected anyway."""

    def evaluate(self, facts: FactSource) -> Trace:
        return Trace("invalid condition", False)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
