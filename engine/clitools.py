"""Helpers shared by the `fdqr` command groups: loading configuration, opening the store,
printing tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from engine import config as config_module
from engine.configfile import ConfigError
from engine.jobs.store import Store


def load_settings_or_exit(config_path: Path) -> config_module.EngineSettings:
    """Load conf/engine.yaml alone, or print its problems and exit with status 2."""
    try:
        return config_module.load_settings(config_path)
    except ConfigError as error:
        click.echo(str(error), err=True)
        raise SystemExit(2) from None


def load_or_exit(config_path: Path) -> config_module.Config:
    """Load the configuration, or print every problem and exit with status 2."""
    try:
        return config_module.load(config_path)
    except ConfigError as error:
        click.echo(f"configuration invalid, {len(error.problems)} problem(s):", err=True)
        for problem in error.problems:
            click.echo(f"  {problem}", err=True)
        raise SystemExit(2) from None


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
    return Store(path)


def format_table(rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Format rows as left-aligned columns; the first row is the heading."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append(indent + "  ".join(cells).rstrip())
    return "\n".join(lines)
