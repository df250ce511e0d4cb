"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import datetime as dt
import shutil
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from engine.audit import read_syslog_message
from engine.jobs.store import Store
from tests.fakes import ImmediateStore

NOW = dt.datetime(2026, 3, 14, 9, 30, tzinfo=dt.UTC)
REPOSITORY = Path(__file__).resolve().parents[1]


def shipped_layout(folder: Path) -> Path:
    """Copy the shipped conf/, routes/ and rules/ into folder, with the store file there.

    Returns the copy's engine.yaml.
    """
    for name in ("conf", "routes", "rules"):
        shutil.copytree(REPOSITORY / name, folder / name)
    path = folder / "conf" / "engine.yaml"
    settings = yaml.safe_load(path.read_text())
    settings["store"]["path"] = str(folder / "fdqr.sqlite")
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    instance = Store(tmp_path / "fdqr.sqlite")
    yield instance
    instance.close()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[ImmediateStore]:
    fake = ImmediateStore(Store(tmp_path / "fdqr.sqlite"))
    yield fake
    fake.stop()


def audit_message(line: bytes) -> ElementTree.Element:
    """Parse one audit syslog message (RFC 5424 header, BOM, XML) into its AuditMessage."""
    header = line.partition(b"\xef\xbb\xbf")[0]
    assert header.startswith(b"<85>1 "), header
    assert header.endswith(b" IHE+RFC-3881 - "), header
    return read_syslog_message(line)


def audit_file_messages(path: Path) -> list[ElementTree.Element]:
    return [audit_message(line) for line in path.read_bytes().splitlines()]
