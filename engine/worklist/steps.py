"""The worklist steps seen at each node, kept to notice the ones that disappear."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable
from typing import Any

from engine.dimse.worklist import WorklistItem
from engine.jobs.store import Store
from engine.model import Demographics


def item_to_json(item: WorklistItem) -> str:
    data: dict[str, Any] = dataclasses.asdict(item)
    data["start"] = item.start.isoformat() if item.start else None
    return json.dumps(data)


def item_from_json(text: str) -> WorklistItem:
    data = json.loads(text)
    data["demographics"] = Demographics.from_dict(data["demographics"])
    data["start"] = dt.datetime.fromisoformat(data["start"]) if data["start"] else None
    return WorklistItem(**data)


def _start_text(item: WorklistItem) -> str | None:
    return item.start.isoformat() if item.start else None


@dataclasses.dataclass(frozen=True)
class KnownStep:
    item: WorklistItem
    removed: bool


def known_step(store: Store, node: str, key: str) -> KnownStep | None:
    with store.reading() as db:
        row = db.execute(
            "SELECT item, removed_at FROM worklist_steps WHERE node = ? AND step_key = ?",
            (node, key),
        ).fetchone()
    if row is None:
        return None
    return KnownStep(item_from_json(row["item"]), row["removed_at"] is not None)


def remember(store: Store, node: str, item: WorklistItem, now: dt.datetime) -> None:
    """Record a step as present at its worklist (again)."""
    with store.transaction() as db:
        db.execute(
            "INSERT INTO worklist_steps (node, step_key, start, item, first_seen, last_seen)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT (node, step_key) DO UPDATE SET"
            " start = excluded.start, item = excluded.item, last_seen = excluded.last_seen,"
            " removed_at = NULL",
            (
                node,
                item.key,
                _start_text(item),
                item_to_json(item),
                now.isoformat(),
                now.isoformat(),
            ),
        )


def forget(store: Store, node: str, key: str) -> None:
    """Delete a step's record, e.g. one stored under a key of an earlier version."""
    with store.transaction() as db:
        db.execute("DELETE FROM worklist_steps WHERE node = ? AND step_key = ?", (node, key))


def mark_removed(store: Store, node: str, key: str, now: dt.datetime) -> None:
    with store.transaction() as db:
        db.execute(
            "UPDATE worklist_steps SET removed_at = ? WHERE node = ? AND step_key = ?",
            (now.isoformat(), node, key),
        )


def present_between(
    store: Store, node: str, start: dt.datetime, end: dt.datetime
) -> list[WorklistItem]:
    """Return the steps last seen at a node and scheduled within [start, end]."""
    with store.reading() as db:
        rows = db.execute(
            "SELECT item FROM worklist_steps WHERE node = ? AND removed_at IS NULL"
            " AND start >= ? AND start <= ?",
            (node, start.isoformat(), end.isoformat()),
        ).fetchall()
    return [item_from_json(row["item"]) for row in rows]


def keys(items: Iterable[WorklistItem]) -> set[str]:
    return {item.key for item in items}
