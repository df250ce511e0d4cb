"""The durable store for messages and jobs (SQLite in WAL mode).

Store is synchronous and must be used from one thread at a time: the engine
runs it on a dedicated thread through AsyncStore, the CLI uses it directly.
Each public method is one transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from engine.model import Decision, Demographics, MessageOrigin, OrderFacts, PatientIdentifier

T = TypeVar("T")
# A change to the store made in the transaction of a message; returns a note for its outcome.
Action = Callable[["Store", dt.datetime], str]

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    peer TEXT NOT NULL,
    sending_application TEXT NOT NULL,
    sending_facility TEXT NOT NULL,
    control_id TEXT NOT NULL,
    message_type TEXT NOT NULL,
    content BLOB NOT NULL,
    ack BLOB NOT NULL,
    outcome TEXT NOT NULL,
    UNIQUE (sending_application, sending_facility, control_id)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    message_id INTEGER REFERENCES messages(id),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    state TEXT NOT NULL,
    not_before TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    route TEXT NOT NULL,
    rule TEXT NOT NULL,
    destination TEXT NOT NULL,
    sources TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    patient_issuer TEXT NOT NULL,
    demographics TEXT NOT NULL,
    order_facts TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, not_before);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    at TEXT NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id);
CREATE TABLE IF NOT EXISTS job_studies (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    source TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    remote_patient_id TEXT NOT NULL,
    remote_issuer TEXT NOT NULL,
    study_date TEXT,
    modalities TEXT NOT NULL,
    description TEXT NOT NULL,
    selected INTEGER NOT NULL,
    reason TEXT NOT NULL,
    state TEXT NOT NULL,
    found INTEGER,
    received INTEGER NOT NULL DEFAULT 0,
    stored INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, source, study_instance_uid)
);
CREATE TABLE IF NOT EXISTS job_failed_instances (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    source TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    reported_at TEXT NOT NULL,
    PRIMARY KEY (job_id, source, study_instance_uid, sop_instance_uid)
);
"""


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"  # waiting for a retry after a transient failure
    DONE = "done"
    PARTIAL = "partial"  # finished, but some studies or instances failed
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.PARTIAL, JobState.FAILED)


class StudyState(enum.StrEnum):
    SKIPPED = "skipped"  # not selected by the rule
    PENDING = "pending"  # selected, not retrieved yet
    PRESENT = "present"  # the destination already has it
    RETRIEVING = "retrieving"
    STORED = "stored"
    INCOMPLETE = "incomplete"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class NewJob:
    route: str
    rule: str
    destination: str
    sources: Sequence[str]
    patient: PatientIdentifier
    demographics: Demographics
    order: OrderFacts
    not_before: dt.datetime


@dataclasses.dataclass(frozen=True)
class JobRecord:
    id: int
    message_id: int | None
    created_at: dt.datetime
    updated_at: dt.datetime
    state: JobState
    not_before: dt.datetime
    attempts: int
    route: str
    rule: str
    destination: str
    sources: tuple[str, ...]
    patient: PatientIdentifier
    demographics: Demographics
    order: OrderFacts
    summary: str


@dataclasses.dataclass(frozen=True)
class StudyRecord:
    job_id: int
    source: str
    study_instance_uid: str
    remote_patient: PatientIdentifier
    study_date: str | None
    modalities: str
    description: str
    selected: bool
    reason: str
    state: StudyState
    found: int | None
    received: int
    stored: int
    failed: int


@dataclasses.dataclass(frozen=True)
class MessageRecord:
    id: int
    received_at: dt.datetime
    peer: str
    origin: MessageOrigin
    ack: bytes
    outcome: str


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def _time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


class Store:
    """Messages, jobs, their studies and their event log, in one SQLite file."""

    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL makes every commit reach the disk (fsync) before it returns.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._depth = 0

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Run a block in one transaction; a nested block joins the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield self._db
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
        finally:
            self._depth = 0

    # Messages

    def record_message(
        self,
        origin: MessageOrigin,
        peer: str,
        content: bytes,
        ack: bytes,
        outcome: str,
        jobs: Sequence[NewJob],
        now: dt.datetime,
        actions: Sequence[Action] = (),
    ) -> tuple[int, bytes, bool]:
        """Store a message, its ACK, its jobs and the effect of its actions at once.

        Returns (message id, ACK to send, duplicate). For a duplicate (same
        sending application, facility and control id) nothing is written and
        the stored ACK is returned.
        """
        with self._transaction() as db:
            row = db.execute(
                "SELECT id, ack FROM messages WHERE sending_application = ? "
                "AND sending_facility = ? AND control_id = ?",
                (origin.sending_application, origin.sending_facility, origin.control_id),
            ).fetchone()
            if row is not None:
                return int(row["id"]), bytes(row["ack"]), True
            notes = [action(self, now) for action in actions]
            if notes:
                outcome = "; ".join([outcome, *notes])
            cursor = db.execute(
                "INSERT INTO messages (received_at, peer, sending_application, sending_facility,"
                " control_id, message_type, content, ack, outcome) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    _iso(now),
                    peer,
                    origin.sending_application,
                    origin.sending_facility,
                    origin.control_id,
                    origin.message_type,
                    content,
                    ack,
                    outcome,
                ),
            )
            message_id = int(cursor.lastrowid or 0)
            for job in jobs:
                self._insert_job(db, message_id, job, now)
            return message_id, ack, False

    def list_messages(self, limit: int = 50) -> list[MessageRecord]:
        rows = self._db.execute(
            "SELECT * FROM messages ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [
            MessageRecord(
                id=row["id"],
                received_at=_time(row["received_at"]),
                peer=row["peer"],
                origin=MessageOrigin(
                    row["sending_application"],
                    row["sending_facility"],
                    row["message_type"],
                    row["control_id"],
                ),
                ack=bytes(row["ack"]),
                outcome=row["outcome"],
            )
            for row in rows
        ]

    # Jobs

    def add_job(self, job: NewJob, now: dt.datetime, message_id: int | None = None) -> int:
        with self._transaction() as db:
            return self._insert_job(db, message_id, job, now)

    def _insert_job(
        self, db: sqlite3.Connection, message_id: int | None, job: NewJob, now: dt.datetime
    ) -> int:
        cursor = db.execute(
            "INSERT INTO jobs (message_id, created_at, updated_at, state, not_before, route, rule,"
            " destination, sources, patient_id, patient_issuer, demographics, order_facts)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                message_id,
                _iso(now),
                _iso(now),
                JobState.QUEUED.value,
                _iso(job.not_before),
                job.route,
                job.rule,
                job.destination,
                json.dumps(list(job.sources)),
                job.patient.value,
                job.patient.issuer,
                json.dumps(job.demographics.to_dict()),
                json.dumps(job.order.to_dict()),
            ),
        )
        job_id = int(cursor.lastrowid or 0)
        db.execute(
            "INSERT INTO job_events (job_id, at, text) VALUES (?,?,?)",
            (job_id, _iso(now), f"queued by route {job.route}, rule {job.rule}"),
        )
        return job_id

    def requeue_interrupted(self, now: dt.datetime) -> list[int]:
        """Put jobs left running by a stopped or crashed engine back in the queue."""
        with self._transaction() as db:
            ids = [
                int(row["id"])
                for row in db.execute("SELECT id FROM jobs WHERE state = ?", (JobState.RUNNING,))
            ]
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?",
                    (JobState.QUEUED, _iso(now), job_id),
                )
                db.execute(
                    "INSERT INTO job_events (job_id, at, text) VALUES (?,?,?)",
                    (job_id, _iso(now), "requeued after the engine restarted"),
                )
            return ids

    def claim_due(self, now: dt.datetime, limit: int) -> list[JobRecord]:
        """Mark up to `limit` due jobs as running and return them, oldest first."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?) AND not_before <= ? ORDER BY id LIMIT ?",
                (JobState.QUEUED, JobState.WAITING, _iso(now), limit),
            ).fetchall()
            for row in rows:
                db.execute(
                    "UPDATE jobs SET state = ?, attempts = attempts + 1, updated_at = ?"
                    " WHERE id = ?",
                    (JobState.RUNNING, _iso(now), row["id"]),
                )
        return [
            dataclasses.replace(
                self._job(row), state=JobState.RUNNING, attempts=int(row["attempts"]) + 1
            )
            for row in rows
        ]

    def next_due_time(self) -> dt.datetime | None:
        row = self._db.execute(
            "SELECT MIN(not_before) AS due FROM jobs WHERE state IN (?, ?)",
            (JobState.QUEUED, JobState.WAITING),
        ).fetchone()
        return _time(row["due"]) if row["due"] else None

    def finish_job(self, job_id: int, state: JobState, summary: str, now: dt.datetime) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, summary = ?, updated_at = ? WHERE id = ?",
                (state, summary, _iso(now), job_id),
            )
            db.execute(
                "INSERT INTO job_events (job_id, at, text) VALUES (?,?,?)",
                (job_id, _iso(now), f"{state}: {summary}"),
            )

    def retry_job(
        self, job_id: int, not_before: dt.datetime, summary: str, now: dt.datetime
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, not_before = ?, summary = ?, updated_at = ?"
                " WHERE id = ?",
                (JobState.WAITING, _iso(not_before), summary, _iso(now), job_id),
            )
            db.execute(
                "INSERT INTO job_events (job_id, at, text) VALUES (?,?,?)",
                (job_id, _iso(now), f"retry at {_iso(not_before)}: {summary}"),
            )

    def add_event(self, job_id: int, text: str, now: dt.datetime) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO job_events (job_id, at, text) VALUES (?,?,?)",
                (job_id, _iso(now), text),
            )

    def record_decisions(self, job_id: int, decisions: Sequence[Decision]) -> None:
        """Record every candidate study of a job with the rule's decision.

        Counts of a study already recorded by an earlier attempt are kept.
        """
        with self._transaction() as db:
            for decision in decisions:
                candidate = decision.candidate
                state = StudyState.PENDING if decision.selected else StudyState.SKIPPED
                db.execute(
                    "INSERT INTO job_studies (job_id, source, study_instance_uid,"
                    " remote_patient_id, remote_issuer, study_date, modalities, description,"
                    " selected, reason, state, found) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (job_id, source, study_instance_uid) DO UPDATE SET"
                    " selected = excluded.selected, reason = excluded.reason,"
                    " found = excluded.found,"
                    " state = CASE WHEN job_studies.state IN ('stored', 'present')"
                    " THEN job_studies.state ELSE excluded.state END",
                    (
                        job_id,
                        candidate.source,
                        candidate.study_instance_uid,
                        candidate.patient.value,
                        candidate.patient.issuer,
                        candidate.study_date.isoformat() if candidate.study_date else None,
                        "/".join(candidate.modalities),
                        candidate.description,
                        int(decision.selected),
                        decision.reason,
                        state,
                        candidate.instance_count,
                    ),
                )

    def update_study(
        self,
        job_id: int,
        source: str,
        study_instance_uid: str,
        state: StudyState,
        *,
        received: int | None = None,
        stored: int | None = None,
        failed: int | None = None,
        reason: str | None = None,
    ) -> None:
        assignments = ["state = ?"]
        values: list[Any] = [state]
        for column, value in (
            ("received", received),
            ("stored", stored),
            ("failed", failed),
            ("reason", reason),
        ):
            if value is not None:
                assignments.append(f"{column} = ?")
                values.append(value)
        with self._transaction() as db:
            db.execute(
                f"UPDATE job_studies SET {', '.join(assignments)}"
                " WHERE job_id = ? AND source = ? AND study_instance_uid = ?",
                (*values, job_id, source, study_instance_uid),
            )

    def record_failed_instances(
        self,
        job_id: int,
        source: str,
        study_instance_uid: str,
        sop_instance_uids: Sequence[str],
        now: dt.datetime,
    ) -> None:
        """Record the instances a source listed in Failed SOP Instance UID List (B000, A702)."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO job_failed_instances (job_id, source, study_instance_uid,"
                " sop_instance_uid, reported_at) VALUES (?,?,?,?,?)",
                [(job_id, source, study_instance_uid, uid, _iso(now)) for uid in sop_instance_uids],
            )

    # Reading

    def failed_instances(self, job_id: int) -> list[tuple[str, str, str]]:
        """Return (source, Study Instance UID, SOP Instance UID) of the instances sources failed."""
        rows = self._db.execute(
            "SELECT source, study_instance_uid, sop_instance_uid FROM job_failed_instances"
            " WHERE job_id = ? ORDER BY rowid",
            (job_id,),
        ).fetchall()
        return [(row[0], row[1], row[2]) for row in rows]

    def get_job(self, job_id: int) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def list_jobs(self, limit: int = 50, states: Sequence[JobState] = ()) -> list[JobRecord]:
        query = "SELECT * FROM jobs"
        params: list[Any] = []
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
            params += list(states)
        query += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [self._job(row) for row in self._db.execute(query, params)]

    def studies(self, job_id: int) -> list[StudyRecord]:
        rows = self._db.execute(
            "SELECT * FROM job_studies WHERE job_id = ? ORDER BY selected DESC, study_date DESC",
            (job_id,),
        ).fetchall()
        return [
            StudyRecord(
                job_id=row["job_id"],
                source=row["source"],
                study_instance_uid=row["study_instance_uid"],
                remote_patient=PatientIdentifier(row["remote_patient_id"], row["remote_issuer"]),
                study_date=row["study_date"],
                modalities=row["modalities"],
                description=row["description"],
                selected=bool(row["selected"]),
                reason=row["reason"],
                state=StudyState(row["state"]),
                found=row["found"],
                received=row["received"],
                stored=row["stored"],
                failed=row["failed"],
            )
            for row in rows
        ]

    def events(self, job_id: int) -> list[tuple[dt.datetime, str]]:
        rows = self._db.execute(
            "SELECT at, text FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)
        ).fetchall()
        return [(_time(row["at"]), row["text"]) for row in rows]

    def _job(self, row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=row["id"],
            message_id=row["message_id"],
            created_at=_time(row["created_at"]),
            updated_at=_time(row["updated_at"]),
            state=JobState(row["state"]),
            not_before=_time(row["not_before"]),
            attempts=row["attempts"],
            route=row["route"],
            rule=row["rule"],
            destination=row["destination"],
            sources=tuple(json.loads(row["sources"])),
            patient=PatientIdentifier(row["patient_id"], row["patient_issuer"]),
            demographics=Demographics.from_dict(json.loads(row["demographics"])),
            order=OrderFacts.from_dict(json.loads(row["order_facts"])),
            summary=row["summary"],
        )


class AsyncStore:
    """Runs Store work on one dedicated thread and returns Deferreds."""

    def __init__(self, reactor: IReactorFromThreads, store: Store) -> None:
        self.store = store
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="fdqr-store")

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()
        self.store.close()

    def run(self, work: Callable[[Store], T]) -> defer.Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, work, self.store)
