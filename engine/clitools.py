"""Helpers shared by the `fdqr` command groups: loading configuration, opening the store,
printing tables."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from engine import config as config_module
from engine.configfile import ConfigError
from engine.jobs.store import JobRecord, Store, StoreError

DEFAULT_CONFIG = Path(os.environ.get("FDQR_CONFIG", "conf/engine.yaml"))
_CONFIG_HELP = "Engine configuration file (conf/engine.yaml); FDQR_CONFIG sets the default."
_CONFIG_FILE = click.Path(path_type=Path, dir_okay=False)


def _resolve_config(context: click.Context, parameter: Any, value: Path | None) -> Path:
    """Return the --config given here, else the one given before the subcommand, else the default.

    The value is kept in the context object, which the subcommands' contexts inherit.
    """
    if value is None:
        value = context.obj if isinstance(context.obj, Path) else DEFAULT_CONFIG
    context.obj = value
    return value


# On fdqr itself, on each group and on each command: `fdqr --config F jobs show 1`,
# `fdqr jobs --config F show 1` and `fdqr jobs show 1 --config F` are the same.
config_option = click.option(
    "--config",
    "config_path",
    type=_CONFIG_FILE,
    default=None,
    callback=_resolve_config,
    help=f"{_CONFIG_HELP} Accepted before or after the subcommand.",
)


def require_config(config_path: Path) -> None:
    """Exit with status 2, naming the ways to give a configuration, when the file is missing."""
    if not config_path.is_file():
        click.echo(
            f"{config_path}: configuration file not found; give one with --config FILE or"
            " the FDQR_CONFIG variable, or run the command in the project folder",
            err=True,
        )
        raise SystemExit(2)


def load_settings_or_exit(config_path: Path) -> config_module.EngineSettings:
    """Load conf/engine.yaml alone, or print its problems and exit with status 2."""
    require_config(config_path)
    try:
        return config_module.load_settings(config_path)
    except ConfigError as error:
        click.echo(str(error), err=True)
        raise SystemExit(2) from None


def load_or_exit(config_path: Path) -> config_module.Config:
    """Load the configuration, or print every problem and exit with status 2."""
    require_config(config_path)
    try:
        return config_module.load(config_path)
    except ConfigError as error:
        click.echo(f"configuration invalid, {len(error.problems)} problem(s):", err=True)
        for problem in error.problems:
            click.echo(f"  {problem}", err=True)
        raise SystemExit(2) from None


class _WholeNumber(click.IntRange):
    # Click's own name gives "'abc' is not a valid integer range."
    name = "whole number"


# A job or message id: SQLite row ids go up to 2**63 - 1.
ROW_ID = _WholeNumber(1, 2**63 - 1)
# How many rows a listing shows (--limit).
ROW_COUNT = _WholeNumber(1, 1_000_000)


def open_store(config_path: Path) -> Store:
    """Open the store a configuration names, or explain why it cannot be read and exit."""
    settings = load_settings_or_exit(config_path)
    if str(settings.store.path) == config_module.MEMORY_STORE:
        click.echo(
            f"the store of {config_path} is in memory (store.path {config_module.MEMORY_STORE}),"
            " so only the running engine can read it",
            err=True,
        )
        raise SystemExit(1)
    path = config_module.resolve(config_path.resolve(), settings.store.path)
    if not path.exists():
        click.echo(
            f"no store at {path}: the engine has not run with this configuration yet", err=True
        )
        raise SystemExit(1)
    try:
        return Store(path)
    except StoreError as error:
        click.echo(str(error), err=True)
        raise SystemExit(1) from error


def job_or_exit(store: Store, job_id: int) -> JobRecord:
    """Return the job, or print that it was not found and exit with status 1."""
    job = store.get_job(job_id)
    if job is None:
        # Ids go up without gaps and only retention deletes jobs, so it deleted a missing
        # id below the newest one.
        newest = store.list_jobs(1)
        deleted = bool(newest) and job_id < newest[0].id
        reason = " (deleted: store.retention_days deletes old finished jobs)" if deleted else ""
        click.echo(f"job {job_id} not found{reason}", err=True)
        raise SystemExit(1)
    return job


def format_table(rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Format rows as left-aligned columns; the first row is the heading."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append(indent + "  ".join(cells).rstrip())
    return "\n".join(lines)
