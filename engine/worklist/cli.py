"""`fdqr worklist`: poll the configured worklists once, or show what a poll would schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from engine.clitools import config_option, load_or_exit
from engine.config import Config


@click.group(name="worklist")
@config_option
def worklist_group(config_path: Path) -> None:
    """Modality Worklist polling."""


@worklist_group.command(name="poll")
@config_option
@click.option(
    "--dry-run", is_flag=True, help="Query and plan, but store nothing and create no job."
)
def poll_command(config_path: Path, dry_run: bool) -> None:
    """Poll every configured worklist once and print each step with what it schedules.

    Without --dry-run the orders are stored like the engine's own polls, and a
    running engine picks their jobs up.
    """
    from twisted.internet import task

    config = load_or_exit(config_path)
    if not config.settings.worklist.sources:
        click.echo(f"{config_path}: no worklist sources configured (worklist.sources)", err=True)
        raise SystemExit(2)
    results: list[Any] = []
    task.react(lambda reactor: _poll_once(reactor, config, dry_run, results))


def _poll_once(reactor: Any, config: Config, dry_run: bool, results: list[Any]) -> Any:
    from engine.service import Engine

    engine = Engine(config, reactor)
    engine.db.start()
    engine.pools.start()
    polled = engine.worklist.poll_all(dry_run=dry_run)

    def report(poll_results: list[Any]) -> None:
        for result in poll_results:
            _print_result(result, dry_run)
        results.extend(poll_results)

    def stop(passthrough: Any) -> Any:
        engine.pools.stop()
        engine.db.stop()
        return passthrough

    return polled.addCallback(report).addBoth(stop)


def _print_result(result: Any, dry_run: bool) -> None:
    verb = "would schedule" if dry_run else "scheduled"
    click.echo(f"worklist {result.node}:")
    if result.error:
        click.echo(f"  poll failed: {result.error}")
        return
    click.echo(
        f"  {len(result.items)} step(s) in the window, {result.outside_window} outside it,"
        f" {len(result.malformed)} malformed"
    )
    for item, outcome in result.new_orders:
        click.echo(f"  new   {_describe(item)}: {verb}: {outcome}")
    for item in result.already_seen:
        click.echo(f"  seen  {_describe(item)}: already ordered")
    for item, outcome in result.removed:
        click.echo(
            f"  gone  {_describe(item)}: {'would cancel' if dry_run else 'cancelled'}: {outcome}"
        )
    for reason in result.malformed:
        click.echo(f"  skipped malformed item: {reason}")


def _describe(item: Any) -> str:
    start = item.start.strftime("%Y-%m-%d %H:%M") if item.start else "no start time"
    return (
        f"step {item.step_id or '-'} accession {item.accession_number or '-'} {item.modality}"
        f" at {item.station_ae_title or '-'} {start}, patient {item.patient_id}"
    )
