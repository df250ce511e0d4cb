"""Durable identity records: the local patient record, learned cross-references, merges,
the answer cache of network sources, and operator acceptances.

Every function takes the job Store and runs in one transaction, joining the
transaction of a message when it runs as one of its plan actions. Merges form
a forest: each retired ID has exactly one surviving ID, and merge() never lets
the links form a cycle.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import sqlite3
from collections.abc import Collection

from engine.jobs.store import Store
from engine.model import Demographics, PatientIdentifier

logger = logging.getLogger(__name__)
# Longer merge chains than this are cut when followed (they cannot occur without a bug).
MAX_MERGE_DEPTH = 64


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds")


# Local patient record


def save_demographics(
    store: Store,
    patient: PatientIdentifier,
    demographics: Demographics,
    now: dt.datetime,
    control_id: str,
    deleted: Collection[str] = (),
) -> str:
    """Store a patient's demographics from an ADT message.

    A field empty there keeps its stored value, and a field named in deleted
    (sent as the HL7 null `""`) loses it.
    """
    with store.transaction() as db:
        previous = _demographics(db, patient)
        if previous is not None:
            demographics = Demographics(
                name=demographics.name or ("" if "name" in deleted else previous.name),
                birth_date=demographics.birth_date
                or ("" if "birth_date" in deleted else previous.birth_date),
                sex=demographics.sex or ("" if "sex" in deleted else previous.sex),
            )
        if demographics == previous:
            # The record keeps the time and control id of the message that last changed it.
            return f"demographics of {patient} unchanged"
        db.execute(
            "INSERT INTO identity_patients (patient_id, issuer, demographics, updated_at,"
            " message_control_id) VALUES (?,?,?,?,?) ON CONFLICT (patient_id, issuer) DO UPDATE"
            " SET demographics = excluded.demographics, updated_at = excluded.updated_at,"
            " message_control_id = excluded.message_control_id",
            (
                patient.value,
                patient.issuer,
                json.dumps(demographics.to_dict()),
                _iso(now),
                control_id,
            ),
        )
    return f"demographics of {patient} {'recorded' if previous is None else 'updated'}"


def local_demographics(store: Store, patient: PatientIdentifier) -> Demographics | None:
    """Return the local record of a patient, or None if no ADT message registered it."""
    with store.reading() as db:
        return _demographics(db, patient)


def latest_order_demographics(store: Store, patient: PatientIdentifier) -> Demographics | None:
    """Return the demographics of the patient's most recent job (from its order's PID)."""
    with store.reading() as db:
        row = db.execute(
            "SELECT demographics FROM jobs WHERE patient_id = ? AND patient_issuer = ?"
            " ORDER BY id DESC LIMIT 1",
            (patient.value, patient.issuer),
        ).fetchone()
    return Demographics.from_dict(json.loads(row["demographics"])) if row else None


def known_demographics(store: Store, patient: PatientIdentifier) -> Demographics | None:
    """Return the patient's local record (ADT), else the PID of their latest order, else None."""
    return local_demographics(store, patient) or latest_order_demographics(store, patient)


def _demographics(db: sqlite3.Connection, patient: PatientIdentifier) -> Demographics | None:
    row = _patient_row(db, patient)
    return Demographics.from_dict(json.loads(row["demographics"])) if row else None


def _patient_row(db: sqlite3.Connection, patient: PatientIdentifier) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        "SELECT * FROM identity_patients WHERE patient_id = ? AND issuer = ?",
        (patient.value, patient.issuer),
    ).fetchone()
    return row


@dataclasses.dataclass(frozen=True)
class PatientRecord:
    """The local record of a patient as ADT messages left it."""

    demographics: Demographics
    updated_at: str
    message_control_id: str


def patient_record(store: Store, patient: PatientIdentifier) -> PatientRecord | None:
    """Return the local record of a patient, or None if no ADT message registered it."""
    with store.reading() as db:
        row = _patient_row(db, patient)
    if row is None:
        return None
    return PatientRecord(
        Demographics.from_dict(json.loads(row["demographics"])),
        row["updated_at"],
        row["message_control_id"],
    )


def learned_for(store: Store, local: PatientIdentifier) -> list[LearnedReference]:
    """Return the cross-references learned for one local patient, by domain."""
    with store.reading() as db:
        rows = db.execute(
            "SELECT * FROM identity_learned WHERE local_id = ? AND local_issuer = ?"
            " ORDER BY domain",
            (local.value, local.issuer),
        ).fetchall()
    return [_learned_reference(row) for row in rows]


# Learned cross-references


@dataclasses.dataclass(frozen=True)
class LearnedReference:
    local: PatientIdentifier
    remote: PatientIdentifier
    learned_at: str
    message_control_id: str


def learn(
    store: Store,
    local: PatientIdentifier,
    remote: PatientIdentifier,
    now: dt.datetime,
    control_id: str,
) -> str:
    """Record that `remote` identifies the local patient in its domain; return a note.

    The newest message wins: an earlier identifier of the patient in that
    domain is replaced, and a remote identifier earlier learned for another
    local patient is moved, which the note says.
    """
    with store.transaction() as db:
        notes: list[str] = []
        owner = db.execute(
            "SELECT local_id, local_issuer FROM identity_learned"
            " WHERE domain = ? AND remote_id = ?",
            (remote.issuer, remote.value),
        ).fetchone()
        if owner is not None:
            previous_owner = PatientIdentifier(owner["local_id"], owner["local_issuer"])
            if previous_owner == local:
                return f"{remote} already known for {local}"
            db.execute(
                "DELETE FROM identity_learned WHERE domain = ? AND remote_id = ?",
                (remote.issuer, remote.value),
            )
            notes.append(f"moved from {previous_owner}")
            logger.warning(
                "learned identifier %s moved from %s to %s (message %s)",
                remote,
                previous_owner,
                local,
                control_id,
            )
        replaced = db.execute(
            "SELECT remote_id FROM identity_learned WHERE local_id = ? AND local_issuer = ?"
            " AND domain = ?",
            (local.value, local.issuer, remote.issuer),
        ).fetchone()
        if replaced is not None:
            notes.append(f"replaces {replaced['remote_id']}^^^{remote.issuer}")
        db.execute(
            "INSERT INTO identity_learned (local_id, local_issuer, domain, remote_id, learned_at,"
            " message_control_id) VALUES (?,?,?,?,?,?) ON CONFLICT (local_id, local_issuer,"
            " domain) DO UPDATE SET remote_id = excluded.remote_id,"
            " learned_at = excluded.learned_at, message_control_id = excluded.message_control_id",
            (local.value, local.issuer, remote.issuer, remote.value, _iso(now), control_id),
        )
    suffix = f" ({', '.join(notes)})" if notes else ""
    return f"learned {remote} for {local}{suffix}"


def learned_remote(store: Store, local: PatientIdentifier, domain: str) -> PatientIdentifier | None:
    with store.reading() as db:
        row = db.execute(
            "SELECT remote_id FROM identity_learned WHERE local_id = ? AND local_issuer = ?"
            " AND domain = ?",
            (local.value, local.issuer, domain),
        ).fetchone()
    return PatientIdentifier(row["remote_id"], domain) if row else None


def learned_local(store: Store, remote: PatientIdentifier) -> PatientIdentifier | None:
    with store.reading() as db:
        row = db.execute(
            "SELECT local_id, local_issuer FROM identity_learned"
            " WHERE domain = ? AND remote_id = ?",
            (remote.issuer, remote.value),
        ).fetchone()
    return PatientIdentifier(row["local_id"], row["local_issuer"]) if row else None


def moved_owner(
    store: Store, local: PatientIdentifier, remote: PatientIdentifier
) -> PatientIdentifier | None:
    """Return the other local patient a learned `remote` now belongs to, or None.

    None also when `remote` was never learned, or belongs to `local` or to the
    patient `local` was merged into.
    """
    owner = learned_local(store, remote)
    if owner is None or owner == local:
        return None
    active, _ = active_patient(store, local)
    return None if owner == active else owner


def learned_references(store: Store, limit: int = 200) -> list[LearnedReference]:
    with store.reading() as db:
        rows = db.execute(
            "SELECT * FROM identity_learned ORDER BY learned_at DESC LIMIT ?", (limit,)
        ).fetchall()
    return [_learned_reference(row) for row in rows]


def _learned_reference(row: sqlite3.Row) -> LearnedReference:
    return LearnedReference(
        PatientIdentifier(row["local_id"], row["local_issuer"]),
        PatientIdentifier(row["remote_id"], row["domain"]),
        row["learned_at"],
        row["message_control_id"],
    )


# Merges


@dataclasses.dataclass(frozen=True)
class MergeRecord:
    retired: PatientIdentifier
    surviving: PatientIdentifier
    merged_at: str
    message_control_id: str


def merge(
    store: Store,
    surviving: PatientIdentifier,
    retired: PatientIdentifier,
    now: dt.datetime,
    control_id: str,
) -> str:
    """Record that `retired` now lives on as `surviving`, and move what was learned and
    cached for `retired` to `surviving`; return a note.

    A merge of an ID into itself changes nothing. When `surviving` was itself
    retired into `retired` (directly or through other merges), that earlier
    link is removed, because this newer message says `surviving` is active; so
    the links never form a cycle.
    """
    if surviving == retired:
        return f"merge of {retired} into itself ignored"
    with store.transaction() as db:
        notes: list[str] = []
        current = _surviving_link(db, retired)
        if current == surviving:
            return f"{retired} was already merged into {surviving}"
        if current is not None:
            notes.append(f"{retired} was merged into {current} before; now into {surviving}")
        if retired in _merge_path(db, surviving):
            link = _surviving_link(db, surviving)
            db.execute(
                "DELETE FROM identity_merges WHERE retired_id = ? AND retired_issuer = ?",
                (surviving.value, surviving.issuer),
            )
            notes.append(f"earlier merge of {surviving} into {link} reversed")
            logger.warning(
                "merge message %s reverses the earlier merge of %s into %s",
                control_id,
                surviving,
                link,
            )
        db.execute(
            "INSERT INTO identity_merges (retired_id, retired_issuer, surviving_id,"
            " surviving_issuer, merged_at, message_control_id) VALUES (?,?,?,?,?,?)"
            " ON CONFLICT (retired_id, retired_issuer) DO UPDATE SET"
            " surviving_id = excluded.surviving_id, surviving_issuer = excluded.surviving_issuer,"
            " merged_at = excluded.merged_at, message_control_id = excluded.message_control_id",
            (
                retired.value,
                retired.issuer,
                surviving.value,
                surviving.issuer,
                _iso(now),
                control_id,
            ),
        )
        notes += _move_learned(db, surviving, retired)
        notes += _move_cache(db, surviving, retired)
    return f"merged {retired} into {surviving}" + (f" ({'; '.join(notes)})" if notes else "")


def _surviving_link(db: sqlite3.Connection, patient: PatientIdentifier) -> PatientIdentifier | None:
    row = db.execute(
        "SELECT surviving_id, surviving_issuer FROM identity_merges"
        " WHERE retired_id = ? AND retired_issuer = ?",
        (patient.value, patient.issuer),
    ).fetchone()
    return PatientIdentifier(row["surviving_id"], row["surviving_issuer"]) if row else None


def _merge_path(db: sqlite3.Connection, patient: PatientIdentifier) -> list[PatientIdentifier]:
    """Return the IDs a patient was merged into, nearest first, ending at the active one."""
    path: list[PatientIdentifier] = []
    current = _surviving_link(db, patient)
    while current is not None and current not in path and len(path) < MAX_MERGE_DEPTH:
        path.append(current)
        current = _surviving_link(db, current)
    return path


def _move_learned(
    db: sqlite3.Connection, surviving: PatientIdentifier, retired: PatientIdentifier
) -> list[str]:
    rows = db.execute(
        "SELECT domain, remote_id FROM identity_learned WHERE local_id = ? AND local_issuer = ?",
        (retired.value, retired.issuer),
    ).fetchall()
    notes = []
    for row in rows:
        remote = PatientIdentifier(row["remote_id"], row["domain"])
        own = db.execute(
            "SELECT remote_id FROM identity_learned WHERE local_id = ? AND local_issuer = ?"
            " AND domain = ?",
            (surviving.value, surviving.issuer, row["domain"]),
        ).fetchone()
        if own is not None:
            # The surviving record's own identifier in that domain wins.
            db.execute(
                "DELETE FROM identity_learned WHERE local_id = ? AND local_issuer = ?"
                " AND domain = ?",
                (retired.value, retired.issuer, row["domain"]),
            )
            notes.append(f"learned {remote} dropped, {surviving} has its own")
            continue
        db.execute(
            "UPDATE identity_learned SET local_id = ?, local_issuer = ?"
            " WHERE local_id = ? AND local_issuer = ? AND domain = ?",
            (surviving.value, surviving.issuer, retired.value, retired.issuer, row["domain"]),
        )
        notes.append(f"learned {remote} moved")
    return notes


def _move_cache(
    db: sqlite3.Connection, surviving: PatientIdentifier, retired: PatientIdentifier
) -> list[str]:
    # Answers about the retired ID become answers about the surviving one where it has
    # none of its own; the surviving ID's negative answers no longer hold.
    db.execute(
        "DELETE FROM identity_cache WHERE query_id = ? AND query_issuer = ? AND answer_id IS NULL",
        (surviving.value, surviving.issuer),
    )
    moved = db.execute(
        "UPDATE OR IGNORE identity_cache SET query_id = ?, query_issuer = ?"
        " WHERE query_id = ? AND query_issuer = ? AND answer_id IS NOT NULL",
        (surviving.value, surviving.issuer, retired.value, retired.issuer),
    ).rowcount
    db.execute(
        "DELETE FROM identity_cache WHERE query_id = ? AND query_issuer = ?",
        (retired.value, retired.issuer),
    )
    # Remote identifiers that were found to belong to the retired ID now belong to the survivor.
    repointed = db.execute(
        "UPDATE identity_cache SET answer_id = ? WHERE domain = ? AND answer_id = ?",
        (surviving.value, surviving.issuer, retired.value),
    ).rowcount
    count = moved + repointed
    return [f"{count} cached answer(s) moved"] if count else []


def active_patient(
    store: Store, patient: PatientIdentifier
) -> tuple[PatientIdentifier, list[PatientIdentifier]]:
    """Return the ID a patient lives on as after every merge, and the path to it."""
    with store.reading() as db:
        path = _merge_path(db, patient)
    return (path[-1] if path else patient), path


def retired_into(store: Store, patient: PatientIdentifier) -> list[PatientIdentifier]:
    """Return every ID merged into `patient`, directly or not, most recent merge first."""
    found: list[PatientIdentifier] = []
    with store.reading() as db:
        frontier = [patient]
        while frontier and len(found) < MAX_MERGE_DEPTH:
            current = frontier.pop(0)
            rows = db.execute(
                "SELECT retired_id, retired_issuer FROM identity_merges"
                " WHERE surviving_id = ? AND surviving_issuer = ? ORDER BY merged_at DESC",
                (current.value, current.issuer),
            ).fetchall()
            for row in rows:
                retired = PatientIdentifier(row["retired_id"], row["retired_issuer"])
                if retired != patient and retired not in found:
                    found.append(retired)
                    frontier.append(retired)
    return found


def merges(store: Store, limit: int = 200) -> list[MergeRecord]:
    with store.reading() as db:
        rows = db.execute(
            "SELECT * FROM identity_merges ORDER BY merged_at DESC LIMIT ?", (limit,)
        ).fetchall()
    return [
        MergeRecord(
            PatientIdentifier(row["retired_id"], row["retired_issuer"]),
            PatientIdentifier(row["surviving_id"], row["surviving_issuer"]),
            row["merged_at"],
            row["message_control_id"],
        )
        for row in rows
    ]


# Cache of network answers


@dataclasses.dataclass(frozen=True)
class CachedAnswer:
    """A stored answer: identifier None for a negative answer."""

    identifier: PatientIdentifier | None
    detail: str
    expires_at: dt.datetime


def cached_answer(
    store: Store, query: PatientIdentifier, domain: str, source: str, now: dt.datetime
) -> CachedAnswer | None:
    with store.reading() as db:
        row = db.execute(
            "SELECT answer_id, detail, expires_at FROM identity_cache WHERE query_id = ?"
            " AND query_issuer = ? AND domain = ? AND source = ? AND expires_at > ?",
            (query.value, query.issuer, domain, source, _iso(now)),
        ).fetchone()
    if row is None:
        return None
    answer = PatientIdentifier(row["answer_id"], domain) if row["answer_id"] is not None else None
    return CachedAnswer(answer, row["detail"], dt.datetime.fromisoformat(row["expires_at"]))


def cache_answer(
    store: Store,
    query: PatientIdentifier,
    domain: str,
    source: str,
    answer: PatientIdentifier | None,
    detail: str,
    now: dt.datetime,
    ttl_seconds: float,
) -> None:
    if ttl_seconds <= 0:
        return
    expires = now + dt.timedelta(seconds=ttl_seconds)
    with store.transaction() as db:
        db.execute("DELETE FROM identity_cache WHERE expires_at <= ?", (_iso(now),))
        db.execute(
            "INSERT INTO identity_cache (query_id, query_issuer, domain, source, answer_id,"
            " detail, stored_at, expires_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (query_id,"
            " query_issuer, domain, source) DO UPDATE SET answer_id = excluded.answer_id,"
            " detail = excluded.detail, stored_at = excluded.stored_at,"
            " expires_at = excluded.expires_at",
            (
                query.value,
                query.issuer,
                domain,
                source,
                answer.value if answer else None,
                detail,
                _iso(now),
                _iso(expires),
            ),
        )


# Operator acceptances of quarantined jobs


def accept_remote_patients(
    store: Store, job_id: int, remotes: list[PatientIdentifier], now: dt.datetime
) -> None:
    with store.transaction() as db:
        for remote in remotes:
            db.execute(
                "INSERT OR REPLACE INTO identity_accepted (job_id, remote_id, remote_issuer,"
                " accepted_at) VALUES (?,?,?,?)",
                (job_id, remote.value, remote.issuer, _iso(now)),
            )


def accepted_remote_patients(store: Store, job_id: int) -> set[PatientIdentifier]:
    with store.reading() as db:
        rows = db.execute(
            "SELECT remote_id, remote_issuer FROM identity_accepted WHERE job_id = ?", (job_id,)
        ).fetchall()
    return {PatientIdentifier(row["remote_id"], row["remote_issuer"]) for row in rows}
