"""Loading routes/ and rules/ folders into one checked RuleSet."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from pathlib import Path

import pydantic

from engine.configfile import ConfigError, Document, Problem, load_document, validate
from engine.hl7.events import ORDER_TYPES, SCHEDULE_TYPE
from engine.rules.anatomy import Anatomy, compile_pattern
from engine.rules.conditions import Always, ConditionParser
from engine.rules.facts import FACT_NAMES, UPPER_CASE_FACTS
from engine.rules.modalities import ORDERED_HINT, ORDERED_MODALITIES
from engine.rules.model import (
    DEFAULT_ROUTE_MESSAGE_TYPES,
    IgnoredMessages,
    Procedure,
    ProcedureSchema,
    Route,
    RouteSchema,
    RoutesFile,
    Rule,
    RuleSchema,
    RuleSet,
    RulesFile,
)
from engine.worklist.orders import WORKLIST_MESSAGE_TYPE


def yaml_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def load_rule_set(
    routes_folder: Path, rules_folder: Path, anatomy: Anatomy | None = None
) -> RuleSet:
    """Load every YAML file of both folders. Raises ConfigError listing every problem.

    Body regions named in rules must exist in `anatomy` when one is given. Without
    one, any region name is accepted, and regions relate only to themselves.
    """
    rule_set, problems = read_rule_set(routes_folder, rules_folder, anatomy)
    if problems:
        raise ConfigError(problems)
    return rule_set


def read_rule_set(
    routes_folder: Path, rules_folder: Path, anatomy: Anatomy | None = None
) -> tuple[RuleSet, list[Problem]]:
    """Load both folders as load_rule_set does; return the rule set and every problem.

    With problems, the rule set contains what loaded: the routes and rules of the
    files without schema errors, so further checks can run on them at once.
    """
    anatomy = anatomy if anatomy is not None else Anatomy.empty()
    loader = _Loader(anatomy)
    for folder in (routes_folder, rules_folder):
        if not folder.is_dir():
            loader.problems.append(Problem(str(folder), "", "folder not found"))

    for document, parsed, positions in _load_all(
        rules_folder, RulesFile, loader.problems, loader.parser
    ):
        assert isinstance(parsed, RulesFile)
        loader.add_rules_file(document, parsed, positions)
    # Unknown-rule errors would only repeat an error in a rules file that did not load,
    # or a missing folder.
    rules_loaded = not loader.problems
    for document, parsed, positions in _load_all(
        routes_folder, RoutesFile, loader.problems, loader.parser
    ):
        assert isinstance(parsed, RoutesFile)
        loader.add_routes_file(document, parsed, rules_loaded, positions)

    rule_set = RuleSet(
        tuple(loader.routes),
        loader.rules,
        loader.procedures,
        loader.body_patterns,
        anatomy,
        tuple(loader.ignored),
    )
    return rule_set, loader.problems


# The message types that reach routes: HL7 orders and schedules, and worklist steps.
ROUTED_TYPES = frozenset({*ORDER_TYPES, SCHEDULE_TYPE, WORKLIST_MESSAGE_TYPE})
ROUTED_TYPES_HINT = (
    "routes take " + ", ".join(sorted(ROUTED_TYPES)) + ", written as MSH-9.1^MSH-9.2"
)
# A message type as the engine reads MSH-9: TYPE^TRIGGER.
_MESSAGE_TYPE = re.compile(r"[A-Z0-9]{3}\^[A-Z0-9]{3}")


class _Loader:
    def __init__(self, anatomy: Anatomy) -> None:
        self.anatomy = anatomy
        self.problems: list[Problem] = []
        self.routes: list[Route] = []
        self.rules: dict[str, Rule] = {}
        self.procedures: dict[str, Procedure] = {}
        self.body_patterns: dict[str, tuple[re.Pattern[str], ...]] = {}
        self.route_files: dict[str, str] = {}
        self.ignored: list[IgnoredMessages] = []

    def parser(self, document: Document) -> ConditionParser:
        known: dict[str, tuple[Collection[str], str]] = {
            "ordered_modality": (ORDERED_MODALITIES, ORDERED_HINT),
            "message_type": (ROUTED_TYPES, ROUTED_TYPES_HINT),
        }
        if self.anatomy:
            known["body_part"] = (self.anatomy.regions, self.region_hint())
        return ConditionParser(document, FACT_NAMES, UPPER_CASE_FACTS, known)

    def region_hint(self) -> str:
        return f"use a region of the anatomy table {self.anatomy.source}: " + ", ".join(
            sorted(self.anatomy.regions)
        )

    def check_region(self, document: Document, path: tuple[str | int, ...], name: str) -> None:
        if self.anatomy and name not in self.anatomy:
            self.problems.append(
                document.problem(path, f"unknown body region '{name}'", self.region_hint())
            )

    def add_rules_file(self, document: Document, parsed: RulesFile, positions: list[int]) -> None:
        for code, entry in parsed.procedure_codes.items():
            self.add_procedure(document, code, entry)
        for region, texts in parsed.body_parts.items():
            self.check_region(document, ("body_parts", region), region)
            patterns = tuple(compile_pattern(text) for text in texts)
            self.body_patterns[region] = self.body_patterns.get(region, ()) + patterns

        for index, spec in zip(positions, parsed.rules, strict=True):
            base = ("rules", index)
            if spec.name in self.rules:
                first = self.rules[spec.name].document.file
                self.problems.append(
                    document.problem(
                        (*base, "name"), f"rule name '{spec.name}' is already used in {first}"
                    )
                )
                continue
            parser = self.parser(document)
            when = Always() if spec.when is None else parser.parse(spec.when, (*base, "when"))
            self.problems.extend(parser.problems)
            selection = spec.select
            if isinstance(selection.body_part, list):
                for position, region in enumerate(selection.body_part):
                    self.check_region(document, (*base, "select", "body_part", position), region)
            self.rules[spec.name] = Rule(
                document,
                base,
                spec,
                when,
                tuple(compile_pattern(text) for text in selection.include_descriptions),
                tuple(compile_pattern(text) for text in selection.exclude_descriptions),
            )

    def add_procedure(self, document: Document, code: str, spec: ProcedureSchema) -> None:
        path = ("procedure_codes", code)
        procedure = Procedure(
            code=code,
            modality=spec.modality.upper(),
            body_part=spec.body_part.upper(),
            coding_system=spec.coding_system,
            origin=document.file,
        )
        if procedure.body_part:
            self.check_region(document, (*path, "body_part"), procedure.body_part)
        known = self.procedures.get(code)
        if known is not None and (known.modality, known.body_part, known.coding_system) != (
            procedure.modality,
            procedure.body_part,
            procedure.coding_system,
        ):
            self.problems.append(
                document.problem(
                    path,
                    f"procedure code '{code}' maps to {_describe(procedure)} here but to "
                    f"{_describe(known)} in {known.origin}",
                )
            )
            return
        self.procedures[code] = procedure

    def add_routes_file(
        self, document: Document, parsed: RoutesFile, rules_loaded: bool, positions: list[int]
    ) -> None:
        for index, spec in zip(positions, parsed.routes, strict=True):
            base = ("routes", index)
            parser = self.parser(document)
            data = spec.match
            if data is None:
                data = {"message_type": list(DEFAULT_ROUTE_MESSAGE_TYPES)}
            condition = parser.parse(data, (*base, "match"))
            self.problems.extend(parser.problems)
            route = Route(document, base, spec, condition)
            if spec.name in self.route_files:
                first = self.route_files[spec.name]
                self.problems.append(
                    route.problem(("name",), f"route name '{spec.name}' is already used in {first}")
                )
            self.route_files[spec.name] = document.file
            for position, rule_name in enumerate(spec.rules or []):
                if rules_loaded and rule_name not in self.rules:
                    self.problems.append(
                        route.problem(
                            ("rules", position),
                            f"unknown rule '{rule_name}'",
                            f"known rules: {', '.join(sorted(self.rules)) or 'none'}",
                        )
                    )
            self.check_preferred_sources(route)
            self.routes.append(route)
        for index, match in enumerate(parsed.accept_and_ignore):
            base = ("accept_and_ignore", index)
            for position, message_type in enumerate(match.message_type):
                if not _MESSAGE_TYPE.fullmatch(message_type):
                    self.problems.append(
                        document.problem(
                            (*base, "message_type", position),
                            f"invalid message type '{message_type}'",
                            "write MSH-9.1 and MSH-9.2 in capitals, such as ORU^R01",
                        )
                    )
            self.ignored.append(IgnoredMessages(document, base, match))

    def check_preferred_sources(self, route: Route) -> None:
        names = route.spec.rules if route.spec.rules is not None else list(self.rules)
        for name in names:
            rule = self.rules.get(name)
            if rule is None:
                continue
            for position, source in enumerate(rule.spec.select.prefer_sources):
                if source not in route.sources and route.spec.rules is not None:
                    self.problems.append(
                        rule.problem(
                            ("select", "prefer_sources", position),
                            f"preferred source '{source}' is not a source of route {route.name}",
                            f"sources of route {route.name}: {', '.join(route.sources)}",
                        )
                    )


def _describe(procedure: Procedure) -> str:
    parts = [procedure.modality or "no modality", procedure.body_part or "no body part"]
    if procedure.coding_system:
        parts.append(f"coding system {procedure.coding_system}")
    return "'" + ", ".join(parts) + "'"


Loaded = tuple[Document, RoutesFile | RulesFile, list[int]]


def _load_all(
    folder: Path,
    model: type[RoutesFile] | type[RulesFile],
    problems: list[Problem],
    parser_for: Callable[[Document], ConditionParser],
) -> list[Loaded]:
    """Load every file of a folder, each with the positions of its routes or rules.

    In a file with schema errors, the routes or rules without any are kept, so
    their names and nodes are checked in the same run.
    """
    loaded: list[Loaded] = []
    if not folder.is_dir():
        return loaded
    section = "routes" if model is RoutesFile else "rules"
    for path in yaml_files(folder):
        try:
            document = load_document(path, _display_name(path))
        except ConfigError as error:
            problems.extend(error.problems)
            continue
        try:
            parsed = validate(document, model)
            loaded.append((document, parsed, list(range(len(getattr(parsed, section))))))
        except ConfigError as error:
            problems.extend(error.problems)
            salvaged = _valid_items(document, model, section)
            valid_positions = salvaged[1] if salvaged is not None else []
            # The schema leaves conditions alone, so check those of the items not kept
            # (the loader checks the rest): every error at once.
            problems.extend(_condition_problems(parser_for(document), model, set(valid_positions)))
            if salvaged is not None:
                loaded.append((document, *salvaged))
    return loaded


def _valid_items(
    document: Document, model: type[RoutesFile] | type[RulesFile], section: str
) -> tuple[RoutesFile | RulesFile, list[int]] | None:
    """Return a file's routes or rules that have no schema error, with their positions.

    None when the rest of the file has errors too.
    """
    data = document.data if isinstance(document.data, dict) else None
    items = data.get(section) if data is not None else None
    if data is None or not isinstance(items, list):
        return None
    item_model = RouteSchema if model is RoutesFile else RuleSchema
    kept: list[object] = []
    positions: list[int] = []
    for position, item in enumerate(items):
        try:
            item_model.model_validate(item)
        except pydantic.ValidationError:
            continue
        kept.append(item)
        positions.append(position)
    try:
        return model.model_validate({**data, section: kept}), positions
    except pydantic.ValidationError:
        return None


def _condition_problems(
    parser: ConditionParser, model: type[RoutesFile] | type[RulesFile], skipped: set[int]
) -> list[Problem]:
    """Check the conditions of a file that failed validation, from its raw data.

    The items at the `skipped` positions are left out.
    """
    section, key = ("routes", "match") if model is RoutesFile else ("rules", "when")
    data = parser.document.data if isinstance(parser.document.data, dict) else {}
    items = data.get(section)
    for index, item in enumerate(items if isinstance(items, list) else []):
        if index not in skipped and isinstance(item, dict) and item.get(key) is not None:
            parser.parse(item[key], (section, index, key))
    return parser.problems


def _display_name(path: Path) -> str:
    # Shown as folder/file (rules/priors.yaml), as analysts know them.
    return f"{path.parent.name}/{path.name}"
