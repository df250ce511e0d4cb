"""`fdqr rules`: check, explain and test routes and rules."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from twisted.internet import defer, threads
from twisted.python.failure import Failure

from engine import config as config_module
from engine.clitools import config_option
from engine.configfile import ConfigError, Problem
from engine.dimse.queries import candidate_queries, read_study_answers
from engine.dimse.scu import AssociationTracker, NodeAddress, NodeClient
from engine.hl7.events import (
    IdentifierPolicy,
    check_control_id,
    check_header,
    origin_of,
    to_event,
)
from engine.hl7.intake import ignore_reason
from engine.hl7.message import HL7Error, parse
from engine.hl7.wiring import identifier_policy
from engine.identity.build import build_resolver
from engine.identity.resolver import IdentityResolver, TableResolver
from engine.jobs.planner import Planner
from engine.jobs.store import AsyncStore, Store
from engine.model import OrderChanged, OrderPlaced, PatientIdentifier, StudyCandidate
from engine.rules.candidates import load_candidates_file
from engine.rules.evaluate import OrderEvaluation, evaluate_order
from engine.rules.explain import IdentityLookup, explain, render_text
from engine.rules.ruletests import case_files, load_cases, run_case
from engine.rules.select import plan_query

T = TypeVar("T")


@click.group(name="rules")
@config_option
def rules_group(config_path: Path) -> None:
    """Check, explain and test routes and rules."""


def _report(problems: Sequence[Problem]) -> None:
    click.echo(f"{len(problems)} problem(s):", err=True)
    for problem in problems:
        click.echo(f"  {problem}", err=True)


def _load(config_path: Path) -> config_module.Config:
    try:
        return config_module.load(config_path)
    except ConfigError as error:
        _report(error.problems)
        raise SystemExit(2) from None


def _tests_folder(config: config_module.Config) -> Path:
    return config.resolve(config.settings.rules) / "tests"


def _policy(config: config_module.Config) -> IdentifierPolicy:
    return identifier_policy(config.settings)


@rules_group.command(name="check")
@config_option
def check(config_path: Path) -> None:
    """Validate routes/, rules/, the anatomy table and the rule test cases; report every
    problem at once with file, line, path, value and a hint."""
    problems: list[Problem] = []
    loaded = None
    try:
        loaded = config_module.load(config_path)
    except ConfigError as error:
        problems += error.problems
    cases = 0
    if loaded is not None:
        try:
            cases = len(
                load_cases(
                    case_files(_tests_folder(loaded)),
                    loaded.rule_set,
                    loaded.resolve(loaded.settings.rules),
                )
            )
        except ConfigError as error:
            problems += error.problems
    if problems or loaded is None:
        _report(problems)
        raise SystemExit(2)
    rule_set = loaded.rule_set
    click.echo(
        f"valid: {len(rule_set.routes)} routes, {len(rule_set.rules)} rules,"
        f" {len(rule_set.procedures)} procedure codes, {len(rule_set.anatomy)} body regions,"
        f" {cases} test cases"
    )


@rules_group.command(name="explain")
@click.argument("order_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--candidates",
    "candidates_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="JSON file of candidate studies (see docs/rules.md) to run the selection on.",
)
@click.option("--live", is_flag=True, help="Query the route's sources for candidate studies.")
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
@click.option(
    "--at",
    "at_time",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"]),
    help="Evaluate as at this local time (lookback, lead time, quiet hours); default: now.",
)
@config_option
def explain_command(
    order_file: Path,
    candidates_file: Path | None,
    live: bool,
    as_json: bool,
    at_time: dt.datetime | None,
    config_path: Path,
) -> None:
    """Explain an HL7 order: facts, routes, rules, identity lookups and every candidate study."""
    if live and candidates_file is not None:
        raise click.UsageError("use either --candidates or --live")
    loaded = _load(config_path)
    settings = loaded.settings
    zone = settings.zone
    now = zone.aware(at_time) if at_time else dt.datetime.now(dt.UTC)
    today = zone.local(now).date()

    try:
        message = parse(order_file.read_bytes())
        # In the engine's order: a control id first, then accept_and_ignore, which
        # also applies to message types no route supports.
        check_control_id(message)
        ignored = ignore_reason(loaded.rule_set, origin_of(message))
        if ignored is not None:
            click.echo(
                f"{order_file}: the engine acknowledges this message and ignores it: {ignored}"
            )
            return
        check_header(message)
        event = to_event(message, _policy(loaded))
    except HL7Error as error:
        click.echo(f"{order_file}: the engine rejects this message: {error.text}", err=True)
        raise SystemExit(2) from None
    if isinstance(event, OrderChanged):
        click.echo(
            f"{order_file}: a changed order (ORC-1 XO): the engine cancels the order's"
            " unfinished jobs and plans it anew, as follows"
        )
        event = event.as_placed()
    if not isinstance(event, OrderPlaced):
        plan = Planner(lambda: loaded.rule_set, now=lambda: now, zone=zone)(event)
        click.echo(f"{order_file}: not a new order: {plan.outcome}")
        return

    rule_set = loaded.rule_set
    evaluation = evaluate_order(rule_set, event, zone, now)
    file_candidates = None
    if candidates_file is not None:
        try:
            file_candidates = load_candidates_file(candidates_file)
        except ConfigError as error:
            _report(error.problems)
            raise SystemExit(2) from None

    identities: list[IdentityLookup] = []
    # Sources whose live query failed.
    failures: list[str] = []
    candidates: dict[str, list[StudyCandidate]] | None = None
    source = "none"
    route = evaluation.routing.route
    if route is not None:
        identities, found = _explain_lookups(
            loaded, event.patient, evaluation, today, live, failures
        )
        if file_candidates is not None:
            patients = {item.source: item.identifier for item in identities if item.identifier}
            studies = [item.to_candidate(patients) for item in file_candidates]
            names = [check.rule.name for check in evaluation.routing.rule_checks]
            candidates = {name: studies for name in names}
            source = str(candidates_file)
        elif live:
            candidates = found
            source = "live queries"
            if failures:
                source += f"; failed at {', '.join(sorted(set(failures)))}"

    explanation = explain(
        evaluation,
        rule_set,
        today=today,
        identities=identities,
        candidates=candidates,
        candidates_from=source,
        policies=settings.source_policies(),
        zone=zone,
        now=now,
    )
    if as_json:
        click.echo(json.dumps(explanation.to_dict(), indent=2))
    else:
        click.echo(render_text(explanation))
    if failures:
        # The candidates are incomplete, so the explanation may not be what the engine does.
        raise SystemExit(1)


@defer.inlineCallbacks
def _gather(
    loaded: config_module.Config,
    resolver: IdentityResolver,
    patient: PatientIdentifier,
    evaluation: OrderEvaluation,
    today: dt.date,
    live: bool,
    failures: list[str],
) -> Generator[defer.Deferred[Any], Any, tuple[list[IdentityLookup], dict[str, Any]]]:
    """Look the patient up at every source of the route, then query them if `live`."""
    assert evaluation.routing.route is not None
    identities = yield _lookups(loaded, resolver, patient, evaluation.routing.route.sources)
    found: dict[str, list[StudyCandidate]] = {}
    if live:
        patients = {item.source: item.identifier for item in identities if item.identifier}
        found = yield _live(loaded, evaluation, patients, today, failures)
    return identities, found


@defer.inlineCallbacks
def _lookups(
    loaded: config_module.Config,
    resolver: IdentityResolver,
    patient: PatientIdentifier,
    sources: Sequence[str],
) -> Generator[defer.Deferred[Any], Any, list[IdentityLookup]]:
    lookups = []
    for name in sources:
        node = loaded.settings.nodes.get(name)
        if node is None or node.issuer is None:
            lookups.append(IdentityLookup(name, None, "configuration", "not a configured source"))
            continue
        resolution = yield resolver.resolve(patient, node.issuer)
        lookups.append(
            IdentityLookup(name, resolution.identifier, resolution.source, resolution.detail)
        )
    return lookups


@defer.inlineCallbacks
def _live(
    loaded: config_module.Config,
    evaluation: OrderEvaluation,
    patients: dict[str, PatientIdentifier],
    today: dt.date,
    failures: list[str],
) -> Generator[defer.Deferred[Any], Any, dict[str, list[StudyCandidate]]]:
    """Query every source of the route with each applicable rule's query; the sources
    whose query failed are added to failures."""
    settings = loaded.settings
    tracker = AssociationTracker()
    policies = settings.source_policies()
    route = evaluation.routing.route
    assert route is not None
    result: dict[str, list[StudyCandidate]] = {}
    for rule in evaluation.routing.rules:
        query = plan_query(rule, evaluation.facts.order, today)
        found: list[StudyCandidate] = []
        for name in route.sources:
            remote = patients.get(name)
            node = settings.nodes.get(name)
            if remote is None or node is None:
                continue
            policy = policies.get(name)
            identifiers = candidate_queries(
                remote,
                query.modalities,
                query.date_from,
                query.date_to,
                policy.modality_matching if policy else "one_per_query",
                policy.date_matching if policy else "range",
            )
            client = NodeClient(
                NodeAddress(name, node.ae_title, node.host, node.port, node.timeout_seconds),
                settings.dicom.ae_title,
                tracker,
            )
            answers = []
            for identifier in identifiers:
                try:
                    answers += yield threads.deferToThread(client.find, identifier)
                except Exception as error:
                    click.echo(f"query at {name} failed: {error}", err=True)
                    failures.append(name)
            seen: set[str] = set()
            for candidate in read_study_answers(name, remote, answers).candidates:
                if candidate.study_instance_uid not in seen:
                    seen.add(candidate.study_instance_uid)
                    found.append(candidate)
        result[rule.name] = found
    return result


@rules_group.command(name="test")
@click.argument("case_paths", nargs=-1, type=click.Path(path_type=Path, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Print the explanation of failed cases.")
@config_option
def test_command(
    case_paths: tuple[Path, ...], as_json: bool, verbose: bool, config_path: Path
) -> None:
    """Run the rule test cases (default: every file in the rules folder's tests/)."""
    loaded = _load(config_path)
    paths: list[Path] = []
    for path in case_paths or (_tests_folder(loaded),):
        paths += case_files(path) if path.is_dir() else [path]
    try:
        cases = load_cases(paths, loaded.rule_set, loaded.resolve(loaded.settings.rules))
    except ConfigError as error:
        _report(error.problems)
        raise SystemExit(2) from None

    zone = loaded.settings.zone
    results = [run_case(case, loaded.rule_set, _policy(loaded), zone) for case in cases]
    failed = [result for result in results if not result.passed]
    if as_json:
        click.echo(json.dumps([result.to_dict() for result in results], indent=2))
    else:
        for result in results:
            where = f"{result.file}:{result.line}" if result.line else result.file
            click.echo(f"{'PASS' if result.passed else 'FAIL'}  {where}  {result.name}")
            for failure in result.failures:
                click.echo(f"      {failure}")
            if verbose and not result.passed and result.explanation is not None:
                click.echo("      " + render_text(result.explanation).replace("\n", "\n      "))
        click.echo(
            f"{len(results)} cases: {len(results) - len(failed)} passed, {len(failed)} failed"
        )
    if not results:
        click.echo("no test cases found", err=True)
    raise SystemExit(1 if failed or not results else 0)


def _explain_lookups(
    loaded: config_module.Config,
    patient: PatientIdentifier,
    evaluation: Any,
    today: dt.date,
    live: bool,
    failures: list[str],
) -> Any:
    """Look identities up for explain: offline with the cross-reference table only,
    live with the engine's whole identity chain (PIX, PDQ, PIXm, learned identifiers)."""
    settings = loaded.settings
    if not live:
        resolver: IdentityResolver = TableResolver(
            loaded.identity_table, settings.local_patient.issuer
        )
        return _run(lambda: _gather(loaded, resolver, patient, evaluation, today, live, failures))

    from twisted.internet import reactor

    db = AsyncStore(reactor, Store(loaded.store_path))  # type: ignore[arg-type]
    db.start()
    try:
        chain = build_resolver(
            settings.identity,
            loaded.identity_table,
            settings.local_patient.issuer,
            db,
            reactor,
            lambda: dt.datetime.now(dt.UTC),
        )
        return _run(lambda: _gather(loaded, chain, patient, evaluation, today, live, failures))
    finally:
        db.stop()


def _run(start: Callable[[], defer.Deferred[T]]) -> T:
    """Return the result of a Deferred, running the reactor only if it does not fire at once."""
    deferred = start()
    results: list[Any] = []
    deferred.addBoth(results.append)
    if not results:
        from twisted.internet import reactor

        deferred.addBoth(lambda _: reactor.stop())
        reactor.run()
    outcome = results[0]
    if isinstance(outcome, Failure):
        outcome.raiseException()
    return outcome  # type: ignore[no-any-return]


if __name__ == "__main__":
    sys.exit(rules_group())
