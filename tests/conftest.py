"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.jobs.store import Store
from tests.fakes import ImmediateStore

NOW = dt.datetime(2026, 3, 14, 9, 30, tzinfo=dt.UTC)


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
