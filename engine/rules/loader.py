"""Loading routes/ and rules/ folders into one checked RuleSet."""

from __future__ import annotations

from pathlib import Path

from engine.configfile import ConfigError, Document, Problem, load_document, validate
from engine.rules.model import IgnoredMessages, Route, RoutesFile, Rule, RuleSet, RulesFile


def yaml_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def load_rule_set(routes_folder: Path, rules_folder: Path) -> RuleSet:
    """Load every YAML file of both folders. Raises ConfigError listing every problem."""
    problems: list[Problem] = []
    routes: list[Route] = []
    ignored: list[IgnoredMessages] = []
    rules: dict[str, Rule] = {}
    procedure_codes: dict[str, str] = {}
    code_origin: dict[str, str] = {}

    for folder in (routes_folder, rules_folder):
        if not folder.is_dir():
            problems.append(Problem(str(folder), "", "folder not found"))

    rule_problems_before = len(problems)
    for document, parsed in _load_all(rules_folder, RulesFile, problems):
        assert isinstance(parsed, RulesFile)
        for index, rule_spec in enumerate(parsed.rules):
            if rule_spec.name in rules:
                first = rules[rule_spec.name].document.file
                problems.append(
                    document.problem(
                        ("rules", index, "name"),
                        f"rule name '{rule_spec.name}' is already used in {first}",
                    )
                )
                continue
            rules[rule_spec.name] = Rule(document, ("rules", index), rule_spec)
        for code, modality in parsed.procedure_codes.items():
            if code in procedure_codes and procedure_codes[code] != modality.upper():
                problems.append(
                    document.problem(
                        ("procedure_codes", code),
                        f"procedure code '{code}' maps to '{modality}' here but to "
                        f"'{procedure_codes[code]}' in {code_origin[code]}",
                    )
                )
                continue
            procedure_codes[code] = modality.upper()
            code_origin[code] = document.file

    # Unknown-rule errors would only repeat an error in a rules file that did not load.
    rules_loaded = len(problems) == rule_problems_before
    route_names: dict[str, str] = {}
    for document, parsed in _load_all(routes_folder, RoutesFile, problems):
        assert isinstance(parsed, RoutesFile)
        for index, spec in enumerate(parsed.routes):
            route = Route(document, ("routes", index), spec)
            if spec.name in route_names:
                problems.append(
                    route.problem(
                        ("name",),
                        f"route name '{spec.name}' is already used in {route_names[spec.name]}",
                    )
                )
            route_names[spec.name] = document.file
            for position, rule_name in enumerate(spec.rules or []):
                if rules_loaded and rule_name not in rules:
                    problems.append(
                        route.problem(
                            ("rules", position),
                            f"unknown rule '{rule_name}'",
                            f"known rules: {', '.join(sorted(rules)) or 'none'}",
                        )
                    )
            routes.append(route)
        for index, match in enumerate(parsed.accept_and_ignore):
            ignored.append(IgnoredMessages(document, ("accept_and_ignore", index), match))

    if problems:
        raise ConfigError(problems)
    return RuleSet(tuple(routes), rules, procedure_codes, tuple(ignored))


def _load_all(
    folder: Path, model: type[RoutesFile] | type[RulesFile], problems: list[Problem]
) -> list[tuple[Document, RoutesFile | RulesFile]]:
    loaded: list[tuple[Document, RoutesFile | RulesFile]] = []
    if not folder.is_dir():
        return loaded
    for path in yaml_files(folder):
        try:
            document = load_document(path, _display_name(path))
            loaded.append((document, validate(document, model)))
        except ConfigError as error:
            problems.extend(error.problems)
    return loaded


def _display_name(path: Path) -> str:
    # Shown as folder/file (rules/priors.yaml), as analysts know them.
    return f"{path.parent.name}/{path.name}"
