"""The durable store for messages and jobs (SQLite in WAL mode).

Store is synchronous and must be used from one thread at a time: the engine
runs it on a dedicated thread through AsyncStore, the CLI uses it directly.
Each public method is one transaction, except record_messages, which writes a
batch of messages in one transaction (group commit).

Several processes may write one store file: the engine, its intake processes
(mllp.processes) and the CLI. Each write transaction first takes an flock on a
file next to the store. Waiters then queue in the kernel instead of sleeping in
SQLite's busy handler, which retries after sleeps of up to 100 ms.

Every transaction commits at synchronous=NORMAL, which writes the WAL without
an fsync. A durable transaction (one that stores messages, before their ACK)
then calls fdatasync on the WAL file, after the write lock is released, so
other writers go on while the disk syncs. The commit is then on disk in the
WAL. A checkpoint may have copied it into the database file already. A
checkpoint at NORMAL syncs the database file before the WAL can be reused, so
the commit is on disk in either case. A commit is visible to the other
connections before its sync ends. After a power loss that erases it, its
sender has no ACK and sends the message again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from engine.identity.schema import IDENTITY_SCHEMA
from engine.model import Decision, Demographics, MessageOrigin, OrderFacts, PatientIdentifier

logger = logging.getLogger(__name__)
T = TypeVar("T")
# The result of storing one message: (message id, ACK to send, duplicate).
Recorded = tuple[int, bytes, bool]
# Whether a received message (second argument) is a resend of a stored one (first).
SameMessage = Callable[[bytes, bytes], bool]
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
CREATE TABLE IF NOT EXISTS worklist_steps (
    node TEXT NOT NULL,
    step_key TEXT NOT NULL,
    start TEXT,
    item TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    removed_at TEXT,
    PRIMARY KEY (node, step_key)
);
-- Serves every lookup by patient (its prefixes too). Stores written before it was
-- the only one also had jobs_by_patient, a prefix of it that only slowed inserts.
DROP INDEX IF EXISTS jobs_by_patient;
CREATE INDEX IF NOT EXISTS jobs_by_patient_time
    ON jobs (patient_id, patient_issuer, rule, destination, created_at);
-- The order numbers of each job ("placer:...", "filler:...", "accession:..."), so repeated
-- orders and cancels find their jobs by index instead of reading every job of a patient.
CREATE TABLE IF NOT EXISTS job_orders (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    key TEXT NOT NULL,
    PRIMARY KEY (key, job_id)
);
CREATE TABLE IF NOT EXISTS job_cancellations (
    job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
    at TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS job_suppressions (
    job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
    suppressed_by INTEGER NOT NULL REFERENCES jobs(id)
);
CREATE INDEX IF NOT EXISTS job_suppressions_by_job ON job_suppressions (suppressed_by);
CREATE TABLE IF NOT EXISTS message_replays (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages(id),
    replayed_at TEXT NOT NULL,
    outcome TEXT NOT NULL,
    job_ids TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_message ON jobs (message_id);
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
    # Held before anything was retrieved: a remote patient's demographics differ
    # from the local record. Only an operator requeues it (fdqr identity release).
    QUARANTINED = "quarantined"
    DEFERRED = "deferred"  # waiting for a source's quiet hours to end; no attempt used
    CANCELLED = "cancelled"  # its order was cancelled (ORC-1 CA or DC)
    SUPPRESSED = "suppressed"  # a repeated order, or within a rule's suppression window

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def pending(self) -> bool:
        """Waiting to run: queued, waiting for a retry, or deferred."""
        return self in _PENDING


_FINISHED = frozenset(
    {
        JobState.DONE,
        JobState.PARTIAL,
        JobState.FAILED,
        JobState.QUARANTINED,
        JobState.CANCELLED,
        JobState.SUPPRESSED,
    }
)
# Jobs and messages deleted per transaction when old ones are pruned: 50 jobs with
# their events hold the write lock about 10 ms on the benchmark machine.
PRUNE_BATCH = 50
# Rows from the cutoff on, one after the other in id order, that end a search for old rows.
RECENT_RUN = 1000
_PENDING = frozenset({JobState.QUEUED, JobState.WAITING, JobState.DEFERRED})
# Jobs that do not stop a later job for the same order, or the same patient and rule.
_NOT_COVERING = (JobState.FAILED, JobState.CANCELLED, JobState.SUPPRESSED)


class StudyState(enum.StrEnum):
    SKIPPED = "skipped"  # not selected by the rule
    PENDING = "pending"  # selected, not retrieved yet
    PRESENT = "present"  # the destination already has it
    RETRIEVING = "retrieving"
    STORED = "stored"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    QUARANTINED = "quarantined"  # selected, held with its job by the demographics check


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
    # With skip_repeated_orders, a job is stored as suppressed when its order (see
    # same_order) already has a job for the same patient, rule and destination. With
    # suppression_window, so is a job created within that span of such a job. Failed
    # and cancelled jobs do not count.
    skip_repeated_orders: bool = False
    suppression_window: dt.timedelta | None = None
    # Why the job starts when it does, kept in its event log.
    schedule_note: str = ""


def order_keys(order: OrderFacts) -> list[str]:
    """Return the keys that find the jobs that may be of the same order.

    They are its placer and filler order numbers and its accession number,
    without namespaces. same_order then decides.
    """
    pairs = (
        ("placer", order.placer_order_number),
        ("filler", order.filler_order_number),
        ("accession", order.accession_number),
    )
    return [f"{kind}:{value}" for kind, value in pairs if value]


def same_order(first: OrderFacts, second: OrderFacts) -> bool:
    """Return whether two orders are one: they share an order number or accession number.

    Order numbers count as shared when their namespaces (the placer or filler
    application) are equal or one is empty, so 1001^RIS and 1001^CARDIO are two
    orders. A job stored before namespaces were kept has none.
    """

    def shared(number: str, namespace: str, other_number: str, other_namespace: str) -> bool:
        if not number or number != other_number:
            return False
        return not namespace or not other_namespace or namespace == other_namespace

    return (
        shared(
            first.placer_order_number,
            first.placer_namespace,
            second.placer_order_number,
            second.placer_namespace,
        )
        or shared(
            first.filler_order_number,
            first.filler_namespace,
            second.filler_order_number,
            second.filler_namespace,
        )
        or bool(first.accession_number and first.accession_number == second.accession_number)
    )


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


class StoreError(Exception):
    """The store file cannot be opened or created."""


class ControlIdReused(Exception):
    """A message whose sender and control id are stored already, with other content."""

    def __init__(self, message_id: int, control_id: str) -> None:
        super().__init__(f"control id {control_id} is already used by message {message_id}")
        self.message_id = message_id
        self.control_id = control_id


@dataclasses.dataclass(frozen=True)
class ReplayRecord:
    """One replay of a stored message: when, what it did, and the jobs it created."""

    id: int
    message_id: int
    replayed_at: dt.datetime
    outcome: str
    job_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class MessageWrite:
    """One message to store, with its ACK, its jobs and its actions (see record_message)."""

    origin: MessageOrigin
    peer: str
    content: bytes
    ack: bytes
    outcome: str
    jobs: Sequence[NewJob]
    now: dt.datetime
    actions: Sequence[Action] = ()
    same_message: SameMessage | None = None


@dataclasses.dataclass(frozen=True)
class MessageRecord:
    id: int
    received_at: dt.datetime
    peer: str
    origin: MessageOrigin
    ack: bytes
    outcome: str


def _old_rows(
    db: sqlite3.Connection,
    table: str,
    time_column: str,
    cutoff: dt.datetime,
    limit: int,
    eligible: str,
    parameters: Sequence[object],
) -> list[int]:
    """Return up to `limit` ids of a table's rows from before cutoff that are eligible.

    Rows are read in id order, which is about the order of their times, so the
    scan ends after RECENT_RUN rows in a row from cutoff on. A few rows out of
    order (a clock set wrong for a while) do not end it. No index on the time
    is needed.
    """
    found: list[int] = []
    after = 0
    before = _iso(cutoff)
    recent = 0
    while True:
        rows = db.execute(
            f"SELECT id, {time_column} AS at, {eligible} AS eligible FROM {table}"
            " WHERE id > ? ORDER BY id LIMIT 500",
            (*parameters, after),
        ).fetchall()
        for row in rows:
            if row["at"] >= before:
                recent += 1
                if recent == RECENT_RUN:
                    return found
                continue
            recent = 0
            if row["eligible"]:
                found.append(int(row["id"]))
                if len(found) == limit:
                    return found
        if not rows:
            return found
        after = int(rows[-1]["id"])


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def _time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def _same_order_row(row: sqlite3.Row, order: OrderFacts) -> bool:
    return same_order(OrderFacts.from_dict(json.loads(row["order_facts"])), order)


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(str(job_id) for job_id in ids)


def _open_lock(path: Path | str) -> IO[bytes]:
    """Open the write lock file, creating it; an flock needs no write access to it."""
    lock = write_lock_file(path)
    try:
        return open(lock, "ab")
    except PermissionError:
        # Created by another user (e.g. a CLI run as root) and readable by this one.
        return open(lock, "rb")


def write_lock_file(path: Path | str) -> Path:
    """Return the file whose flock the store's writers take, e.g. fdqr.sqlite.write-lock."""
    path = Path(path)
    return path.with_name(path.name + ".write-lock")


# Below this much free space, a failure to open the store names the free space: SQLite
# reports a full disk at open as "disk I/O error".
LOW_SPACE_BYTES = 1 << 20


def _space_note(path: Path | str) -> str:
    """Return a note on the free space of the store's disk when it is nearly full, or ""."""
    if str(path) == ":memory:":
        return ""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return ""
    if free >= LOW_SPACE_BYTES:
        return ""
    return f" (the disk has {free // 1024} KB free: free space there, then start again)"


class _Preview(Exception):
    """Raised to roll back the transaction of Store.preview_actions."""


class Store:
    """Messages, jobs, their studies and their event log, in one SQLite file."""

    def __init__(self, path: Path | str) -> None:
        """Open or create the store. Raises StoreError naming the path when that fails."""
        self.path = str(path)
        try:
            if str(path) != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            journal = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # Job bookkeeping commits at NORMAL: it survives a crash of the engine, and
            # after a power loss a job only repeats a step. Messages commit durably
            # (FULL, fsync before the ACK), which also syncs every earlier commit.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            # Statement journals stay in memory: a temporary file per transaction costs a
            # create and an unlink in the folder of temporary files.
            self._db.execute("PRAGMA temp_store=MEMORY")
            self._db.executescript(SCHEMA)
            self._db.executescript(IDENTITY_SCHEMA)
            # A file of its own: `fdqr run` holds the .lock file for as long as it runs.
            self._write_lock = None if str(path) == ":memory:" else _open_lock(path)
            # The WAL file a durable commit syncs. Without one (a file system that
            # cannot share memory keeps the rollback journal), such commits run at FULL.
            self._wal = Path(f"{path}-wal") if journal == "wal" and self._write_lock else None
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open the store {path}: {error}{_space_note(path)}") from error
        self._depth = 0
        self._reading = False

    def close(self) -> None:
        self._db.close()
        if self._write_lock is not None:
            self._write_lock.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run a block of another module's queries in one transaction, joining an open one."""
        with self._transaction() as db:
            yield db

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """Run a block of another module's reads in one transaction, joining an open one.

        The block reads one snapshot of the store. It takes no write lock, so it
        neither waits for the writers of other processes nor delays them. Blocks
        that write use transaction(): a write here would skip the write lock.
        """
        if self._depth:
            with self._joined() as db:
                yield db
            return
        self._db.execute("BEGIN")
        self._depth = 1
        self._reading = True
        try:
            yield self._db
        finally:
            self._depth = 0
            self._reading = False
            # Nothing to keep: a read transaction ends the same way either way.
            self._db.execute("ROLLBACK")

    @contextmanager
    def _joined(self) -> Iterator[sqlite3.Connection]:
        """Run a nested block inside the open transaction."""
        self._depth += 1
        try:
            yield self._db
        finally:
            self._depth -= 1

    @contextmanager
    def _savepoint(self, name: str) -> Iterator[None]:
        """Undo the block alone when it raises, keeping the rest of the open transaction."""
        self._db.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self._db.execute(f"ROLLBACK TO {name}")
            self._db.execute(f"RELEASE {name}")
            raise
        else:
            self._db.execute(f"RELEASE {name}")

    @contextmanager
    def _transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """Run a block in one transaction; a nested block joins the outer one.

        A durable transaction is on disk (fsync) when the block returns.
        """
        if self._depth:
            if self._reading:
                raise RuntimeError("a write transaction cannot run inside Store.reading()")
            with self._joined() as db:
                yield db
            return
        full = durable and self._wal is None
        if full:
            self._db.execute("PRAGMA synchronous=FULL")
        if self._write_lock is not None:
            fcntl.flock(self._write_lock.fileno(), fcntl.LOCK_EX)
        try:
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
            if self._write_lock is not None:
                fcntl.flock(self._write_lock.fileno(), fcntl.LOCK_UN)
            if full:
                self._db.execute("PRAGMA synchronous=NORMAL")
        if durable and self._wal is not None:
            self._sync_wal(self._wal)

    @staticmethod
    def _sync_wal(wal: Path) -> None:
        """Put every commit written to the WAL so far on disk."""
        # Opened each time: SQLite deletes the WAL when its last connection closes.
        fd = os.open(wal, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

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
        same_message: SameMessage | None = None,
    ) -> tuple[int, bytes, bool]:
        """Store a message, its ACK, its jobs and the effect of its actions at once.

        Returns (message id, ACK to send, duplicate). For a duplicate (same
        sending application, facility and control id) nothing is written and
        the stored ACK is returned. When same_message is given and says the
        stored message is a different one, ControlIdReused is raised instead,
        because acknowledging it would drop the new message unprocessed.
        """
        with self._transaction(durable=True) as db:
            # The insert comes before the duplicate check, so a new message (the usual
            # case) costs one statement. After each statement the store thread must take
            # the GIL back, and it waits while the reactor thread holds it.
            cursor = db.execute(
                "INSERT INTO messages (received_at, peer, sending_application, sending_facility,"
                " control_id, message_type, content, ack, outcome) VALUES (?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (sending_application, sending_facility, control_id) DO NOTHING",
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
            if cursor.rowcount == 0:
                row = db.execute(
                    "SELECT id, ack, content FROM messages WHERE sending_application = ? "
                    "AND sending_facility = ? AND control_id = ?",
                    (origin.sending_application, origin.sending_facility, origin.control_id),
                ).fetchone()
                if same_message is not None and not same_message(bytes(row["content"]), content):
                    raise ControlIdReused(int(row["id"]), origin.control_id)
                return int(row["id"]), bytes(row["ack"]), True
            message_id = int(cursor.lastrowid or 0)
            notes = [action(self, now) for action in actions]
            if notes:
                db.execute(
                    "UPDATE messages SET outcome = ? WHERE id = ?",
                    ("; ".join([outcome, *notes]), message_id),
                )
            for job in jobs:
                self._insert_job(db, message_id, job, now)
            return message_id, ack, False

    def record_messages(
        self, writes: Sequence[MessageWrite] | Callable[[], Sequence[MessageWrite]]
    ) -> list[Recorded | Exception]:
        """Store a batch of messages in one transaction, so one commit (fsync) covers all.

        writes is the batch, or a function that returns it once the write lock
        is held: messages that arrive while another process writes then join
        the batch instead of waiting for a commit of their own.

        Each message is written as record_message writes it, in order, so a
        duplicate of an earlier message of the same batch is found. A message
        whose writing raises is undone alone, and its exception takes its
        place in the result. A failed commit raises and keeps none of them.
        """
        with self._transaction(durable=True):
            if callable(writes):
                writes = writes()
            # The batch is first written without a savepoint per message, to save two
            # statements per message (see record_message). When a message fails, the
            # batch is written again with one savepoint per message.
            try:
                with self._savepoint("batch"):
                    return [self._record_write(write) for write in writes]
            except Exception:
                pass
            results: list[Recorded | Exception] = []
            for write in writes:
                try:
                    with self._savepoint("message"):
                        results.append(self._record_write(write))
                except Exception as error:
                    results.append(error)
            return results

    def _record_write(self, write: MessageWrite) -> Recorded:
        return self.record_message(
            write.origin,
            write.peer,
            write.content,
            write.ack,
            write.outcome,
            write.jobs,
            write.now,
            write.actions,
            write.same_message,
        )

    def list_messages(
        self,
        limit: int = 50,
        *,
        message_type: str | None = None,
        sending_application: str | None = None,
        control_id: str | None = None,
    ) -> list[MessageRecord]:
        """Return the most recent messages first, optionally filtered by header fields."""
        query = "SELECT * FROM messages"
        conditions: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("message_type", message_type),
            ("sending_application", sending_application),
            ("control_id", control_id),
        ):
            if value is not None:
                conditions.append(f"{column} = ?")
                params.append(value)
        if conditions:
            query += " WHERE " + " AND ".join(conditions)
        query += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [self._message(row) for row in self._db.execute(query, params)]

    def get_message(self, message_id: int) -> MessageRecord | None:
        row = self._db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        return self._message(row) if row else None

    def message_content(self, message_id: int) -> bytes | None:
        row = self._db.execute(
            "SELECT content FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        return bytes(row["content"]) if row else None

    def message_jobs(self, message_id: int) -> list[JobRecord]:
        """Return every job created for a message, on receipt and by replays, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE message_id = ? ORDER BY id", (message_id,)
        ).fetchall()
        return [self._job(row) for row in rows]

    def record_replay(
        self,
        message_id: int,
        outcome: str,
        jobs: Sequence[NewJob],
        now: dt.datetime,
        actions: Sequence[Action] = (),
    ) -> ReplayRecord:
        """Apply a new plan for a stored message: its actions and jobs, in one transaction.

        The duplicate check of record_message does not apply: a replay is an
        explicit request to process the message again. For the same reason the
        message's own earlier jobs do not make a new job a repeated order or put
        it within a suppression window. Jobs of other messages still do.
        """
        with self._transaction() as db:
            if self.get_message(message_id) is None:
                raise KeyError(f"message {message_id} not found")
            notes = [action(self, now) for action in actions]
            if notes:
                outcome = "; ".join([outcome, *notes])
            job_ids = [self._insert_job(db, message_id, job, now, replay=True) for job in jobs]
            for job_id in job_ids:
                db.execute(
                    "INSERT INTO job_events (job_id, at, text) VALUES (?,?,?)",
                    (job_id, _iso(now), f"created by a replay of message {message_id}"),
                )
            cursor = db.execute(
                "INSERT INTO message_replays (message_id, replayed_at, outcome, job_ids)"
                " VALUES (?,?,?,?)",
                (message_id, _iso(now), outcome, json.dumps(job_ids)),
            )
            return ReplayRecord(
                int(cursor.lastrowid or 0), message_id, now, outcome, tuple(job_ids)
            )

    def replays(self, message_id: int) -> list[ReplayRecord]:
        rows = self._db.execute(
            "SELECT * FROM message_replays WHERE message_id = ? ORDER BY id", (message_id,)
        ).fetchall()
        return [
            ReplayRecord(
                id=row["id"],
                message_id=row["message_id"],
                replayed_at=_time(row["replayed_at"]),
                outcome=row["outcome"],
                job_ids=tuple(json.loads(row["job_ids"])),
            )
            for row in rows
        ]

    def _message(self, row: sqlite3.Row) -> MessageRecord:
        return MessageRecord(
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

    # Jobs

    def add_job(self, job: NewJob, now: dt.datetime, message_id: int | None = None) -> int:
        with self._transaction() as db:
            return self._insert_job(db, message_id, job, now)

    def _insert_job(
        self,
        db: sqlite3.Connection,
        message_id: int | None,
        job: NewJob,
        now: dt.datetime,
        *,
        replay: bool = False,
    ) -> int:
        own_message = message_id if replay else None
        state, reason, suppressed_by = self._admission(db, job, now, own_message)
        cursor = db.execute(
            "INSERT INTO jobs (message_id, created_at, updated_at, state, not_before, route, rule,"
            " destination, sources, patient_id, patient_issuer, demographics, order_facts, summary)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                message_id,
                _iso(now),
                _iso(now),
                state.value,
                _iso(job.not_before),
                job.route,
                job.rule,
                job.destination,
                json.dumps(list(job.sources)),
                job.patient.value,
                job.patient.issuer,
                json.dumps(job.demographics.to_dict()),
                json.dumps(job.order.to_dict()),
                reason,
            ),
        )
        job_id = int(cursor.lastrowid or 0)
        keys = order_keys(job.order)
        if keys:
            db.execute(
                "INSERT OR IGNORE INTO job_orders (job_id, key) VALUES "
                + ",".join(["(?,?)"] * len(keys)),
                [value for key in keys for value in (job_id, key)],
            )
        text = f"queued by route {job.route}, rule {job.rule}"
        if job.schedule_note:
            text += f"; {job.schedule_note}"
        self._event(db, job_id, now, text)
        if suppressed_by is not None:
            db.execute(
                "INSERT INTO job_suppressions (job_id, suppressed_by) VALUES (?,?)",
                (job_id, suppressed_by),
            )
            self._event(db, job_id, now, f"{state}: {reason}")
            # The intake's line for the message counts this job as created.
            logger.info("job %d (rule %s) created as %s: %s", job_id, job.rule, state, reason)
        return job_id

    def _admission(
        self,
        db: sqlite3.Connection,
        job: NewJob,
        now: dt.datetime,
        ignored_message: int | None = None,
    ) -> tuple[JobState, str, int | None]:
        """Decide whether a new job is queued or suppressed, and by which earlier job.

        Jobs of ignored_message (the message a replay processes again) do not count.
        """
        if not job.skip_repeated_orders and job.suppression_window is None:
            return JobState.QUEUED, "", None
        covering = f"j.state NOT IN ({','.join('?' * len(_NOT_COVERING))})"
        same_patient = (
            "j.patient_id = ? AND j.patient_issuer = ? AND j.rule = ? AND j.destination = ?"
        )
        patient: tuple[object, ...] = (
            job.patient.value,
            job.patient.issuer,
            job.rule,
            job.destination,
        )
        if ignored_message is not None:
            same_patient += " AND j.message_id IS NOT ?"
            patient = (*patient, ignored_message)
        keys = order_keys(job.order)
        if job.skip_repeated_orders and keys:
            # CROSS JOIN keeps job_orders the outer loop: SQLite would otherwise scan every
            # job of the patient through jobs_by_patient_time.
            rows = db.execute(
                "SELECT DISTINCT j.id, j.order_facts FROM job_orders o CROSS JOIN jobs j"
                f" ON j.id = o.job_id WHERE o.key IN ({','.join('?' * len(keys))})"
                f" AND {same_patient} AND {covering} ORDER BY j.id",
                (*keys, *patient, *_NOT_COVERING),
            ).fetchall()
            row = next((row for row in rows if _same_order_row(row, job.order)), None)
            if row is not None:
                return (
                    JobState.SUPPRESSED,
                    f"repeated order: job {row['id']} already covers this order",
                    int(row["id"]),
                )
        if job.suppression_window is not None:
            since = now - job.suppression_window
            row = db.execute(
                f"SELECT j.id, j.created_at FROM jobs j WHERE {same_patient} AND {covering}"
                " AND j.created_at >= ? ORDER BY j.created_at DESC, j.id DESC LIMIT 1",
                (*patient, *_NOT_COVERING, _iso(since)),
            ).fetchone()
            if row is not None:
                created = _time(row["created_at"])
                return (
                    JobState.SUPPRESSED,
                    f"job {row['id']} for the same patient and rule was created at"
                    f" {created:%Y-%m-%d %H:%M:%S} UTC, within the suppression window",
                    int(row["id"]),
                )
        return JobState.QUEUED, "", None

    @staticmethod
    def _event(db: sqlite3.Connection, job_id: int, now: dt.datetime, text: str) -> None:
        db.execute(
            "INSERT INTO job_events (job_id, at, text) VALUES (?,?,?)", (job_id, _iso(now), text)
        )

    # Cancels and deferrals

    def cancel_order(
        self,
        patient: PatientIdentifier | Sequence[PatientIdentifier],
        order: OrderFacts,
        reason: str,
        now: dt.datetime,
        *,
        replaced: bool = False,
    ) -> str:
        """Cancel the unfinished jobs of an order; return a note for the message's outcome.

        patient is the ID the jobs were filed under, or several IDs of one patient
        (its IDs before and after merges).

        Pending and suppressed jobs of the order are cancelled at once, and so are
        the suppressed repeats of its jobs: jobs of an order that shares an
        order or accession number with them, which the cancel may not name. A
        running job gets a cancel request that the pipeline checks before each
        retrieve. A job of another order that a cancelled job suppressed (a
        suppression window) is queued again, since nothing fetches its priors any
        more.

        replaced is for a changed order (ORC-1 XO) whose new jobs follow in the
        same transaction: a running job is left to finish.
        """
        patients = [patient] if isinstance(patient, PatientIdentifier) else list(patient)
        with self._transaction() as db:
            keys = order_keys(order)
            # An order without numbers cannot be matched to any job (SQLite reads IN () as false).
            candidates = db.execute(
                "SELECT DISTINCT j.id, j.state, j.order_facts FROM job_orders o CROSS JOIN jobs j"
                " ON j.id = o.job_id"
                f" WHERE o.key IN ({','.join('?' * len(keys))})"
                " AND (j.patient_id, j.patient_issuer) IN"
                f" (VALUES {','.join(['(?,?)'] * len(patients))}) ORDER BY j.id",
                (*keys, *(value for p in patients for value in (p.value, p.issuer))),
            ).fetchall()
            matching = [row for row in candidates if _same_order_row(row, order)]
            cancelled: list[int] = []
            requested: list[int] = []
            running: list[int] = []
            revived: list[int] = []
            for row in matching:
                job_id, state = int(row["id"]), JobState(row["state"])
                if state.pending or state == JobState.SUPPRESSED:
                    db.execute(
                        "UPDATE jobs SET state = ?, summary = ?, updated_at = ? WHERE id = ?",
                        (JobState.CANCELLED, reason, _iso(now), job_id),
                    )
                    self._event(db, job_id, now, f"cancelled: {reason}")
                    cancelled.append(job_id)
                elif state == JobState.RUNNING and replaced:
                    running.append(job_id)
                elif state == JobState.RUNNING:
                    db.execute(
                        "INSERT OR IGNORE INTO job_cancellations (job_id, at, reason)"
                        " VALUES (?,?,?)",
                        (job_id, _iso(now), reason),
                    )
                    self._event(db, job_id, now, f"cancel requested: {reason}")
                    requested.append(job_id)
                elif state.finished and state != JobState.CANCELLED and not replaced:
                    # Kept, so a replay of the order's message can name the cancel.
                    db.execute(
                        "INSERT OR IGNORE INTO job_cancellations (job_id, at, reason)"
                        " VALUES (?,?,?)",
                        (job_id, _iso(now), reason),
                    )
                    self._event(db, job_id, now, f"order cancelled after the job ended: {reason}")
            for row in matching:
                cancelled += self._cancel_repeats(db, row, reason, now)
            for job_id in cancelled:
                revived += self._revive_suppressed(db, job_id, now)

        if not matching:
            return "no job for this order"
        parts = []
        if cancelled:
            parts.append(f"cancelled job(s) {_ids(cancelled)}")
        if requested:
            parts.append(f"cancel requested for running job(s) {_ids(requested)}")
        if running:
            parts.append(f"running job(s) {_ids(running)} continue")
        if revived:
            parts.append(f"requeued suppressed job(s) {_ids(revived)}")
        finished = _ids([int(row["id"]) for row in matching])
        return "; ".join(parts) or f"job(s) {finished} already finished"

    def preview_actions(self, actions: Sequence[Action], now: dt.datetime) -> list[str]:
        """Run a plan's actions in a transaction that is rolled back; return their notes."""
        if self._depth:
            raise RuntimeError("preview_actions cannot run inside another transaction")
        notes: list[str] = []
        with contextlib.suppress(_Preview), self._transaction():
            notes = [action(self, now) for action in actions]
            raise _Preview
        return notes

    def has_message(self, origin: MessageOrigin) -> bool:
        """Tell whether a message of this sender with this control id is stored."""
        row = self._db.execute(
            "SELECT 1 FROM messages WHERE sending_application = ? AND sending_facility = ?"
            " AND control_id = ?",
            (origin.sending_application, origin.sending_facility, origin.control_id),
        ).fetchone()
        return row is not None

    def cancelled_jobs(self, patient: PatientIdentifier, order: OrderFacts) -> list[JobRecord]:
        """Return the patient's jobs of the same order (see same_order) whose order was
        cancelled: cancelled jobs, and jobs that had ended when the cancel came."""
        keys = order_keys(order)
        if not keys:
            return []
        rows = self._db.execute(
            "SELECT DISTINCT j.* FROM job_orders o CROSS JOIN jobs j ON j.id = o.job_id"
            f" WHERE o.key IN ({','.join('?' * len(keys))})"
            " AND j.patient_id = ? AND j.patient_issuer = ? AND (j.state = ? OR EXISTS"
            " (SELECT 1 FROM job_cancellations c WHERE c.job_id = j.id)) ORDER BY j.id",
            (*keys, patient.value, patient.issuer, JobState.CANCELLED),
        ).fetchall()
        return [self._job(row) for row in rows if _same_order_row(row, order)]

    def job_states(self, job_ids: Sequence[int]) -> dict[int, JobState]:
        """Return the state of each of the jobs that exists."""
        states: dict[int, JobState] = {}
        for start in range(0, len(job_ids), 500):
            chunk = list(job_ids[start : start + 500])
            rows = self._db.execute(
                f"SELECT id, state FROM jobs WHERE id IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            states.update({row["id"]: JobState(row["state"]) for row in rows})
        return states

    def cancel_job(self, job_id: int, reason: str, now: dt.datetime) -> str | None:
        """Cancel one job, as cancel_order cancels an order's jobs; return what was done.

        Returns None when the job does not exist. A finished job is left as it is,
        except a quarantined one, which waits for a person and can be cancelled.
        """
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            state = JobState(row["state"])
            if state.finished and state != JobState.QUARANTINED:
                return f"job {job_id} is {state.value} already; nothing to cancel"
            if state == JobState.RUNNING:
                db.execute(
                    "INSERT OR IGNORE INTO job_cancellations (job_id, at, reason) VALUES (?,?,?)",
                    (job_id, _iso(now), reason),
                )
                self._event(db, job_id, now, f"cancel requested: {reason}")
                return f"job {job_id} is running: its retrieve stops within seconds"
            db.execute(
                "UPDATE jobs SET state = ?, summary = ?, updated_at = ? WHERE id = ?",
                (JobState.CANCELLED, reason, _iso(now), job_id),
            )
            self._event(db, job_id, now, f"cancelled: {reason}")
            revived = self._revive_suppressed(db, job_id, now)
        requeued = f"; requeued suppressed job {revived[0]}" if revived else ""
        return f"job {job_id} cancelled{requeued}"

    def _cancel_repeats(
        self, db: sqlite3.Connection, covering: sqlite3.Row, reason: str, now: dt.datetime
    ) -> list[int]:
        """Cancel the suppressed jobs that repeat the order of a job (row with id and
        order_facts); return their ids."""
        order = OrderFacts.from_dict(json.loads(covering["order_facts"]))
        rows = db.execute(
            "SELECT j.id, j.order_facts FROM job_suppressions s JOIN jobs j ON j.id = s.job_id"
            " WHERE s.suppressed_by = ? AND j.state = ? ORDER BY j.id",
            (covering["id"], JobState.SUPPRESSED),
        ).fetchall()
        repeats = [int(row["id"]) for row in rows if _same_order_row(row, order)]
        for job_id in repeats:
            db.execute(
                "UPDATE jobs SET state = ?, summary = ?, updated_at = ? WHERE id = ?",
                (JobState.CANCELLED, reason, _iso(now), job_id),
            )
            db.execute("DELETE FROM job_suppressions WHERE job_id = ?", (job_id,))
            self._event(
                db, job_id, now, f"cancelled: {reason} (a repeat of job {covering['id']}'s order)"
            )
        return repeats

    def _revive_suppressed(
        self, db: sqlite3.Connection, job_id: int, now: dt.datetime
    ) -> list[int]:
        rows = db.execute(
            "SELECT s.job_id FROM job_suppressions s JOIN jobs j ON j.id = s.job_id"
            " WHERE s.suppressed_by = ? AND j.state = ? ORDER BY s.job_id",
            (job_id, JobState.SUPPRESSED),
        ).fetchall()
        if not rows:
            return []
        revived, *others = [int(row["job_id"]) for row in rows]
        db.execute(
            "UPDATE jobs SET state = ?, summary = '', updated_at = ? WHERE id = ?",
            (JobState.QUEUED, _iso(now), revived),
        )
        db.execute("DELETE FROM job_suppressions WHERE job_id = ?", (revived,))
        self._event(db, revived, now, f"requeued: job {job_id} that suppressed it was cancelled")
        for other in others:
            db.execute(
                "UPDATE job_suppressions SET suppressed_by = ? WHERE job_id = ?", (revived, other)
            )
        return [revived]

    def cancellations(self, job_ids: Sequence[int]) -> dict[int, str]:
        """Return the reason of each cancel requested for the running jobs among job_ids."""
        if not job_ids:
            return {}
        rows = self._db.execute(
            "SELECT job_id, reason FROM job_cancellations"
            f" WHERE job_id IN ({','.join('?' * len(job_ids))})",
            list(job_ids),
        ).fetchall()
        return {int(row["job_id"]): str(row["reason"]) for row in rows}

    def cancellation(self, job_id: int) -> str | None:
        """Return the reason a cancel was requested for a running job, or None."""
        row = self._db.execute(
            "SELECT reason FROM job_cancellations WHERE job_id = ?", (job_id,)
        ).fetchone()
        return str(row["reason"]) if row else None

    def defer_job(self, job_id: int, until: dt.datetime, summary: str, now: dt.datetime) -> None:
        """Put a claimed job back until `until` without counting the attempt."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, not_before = ?, summary = ?, updated_at = ?,"
                " attempts = MAX(attempts - 1, 0) WHERE id = ?",
                (JobState.DEFERRED, _iso(until), summary, _iso(now), job_id),
            )
            self._event(db, job_id, now, f"deferred until {_iso(until)}: {summary}")

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
        """Mark up to `limit` due jobs as running and return them, longest due first."""
        with self._transaction() as db:
            # One query per state reads jobs_by_state in order; a single IN query would
            # sort every due job on each claim.
            rows = []
            for state in (JobState.QUEUED, JobState.WAITING, JobState.DEFERRED):
                rows += db.execute(
                    "SELECT * FROM jobs WHERE state = ? AND not_before <= ?"
                    " ORDER BY not_before, id LIMIT ?",
                    (state, _iso(now), limit),
                ).fetchall()
            rows = sorted(rows, key=lambda row: (row["not_before"], row["id"]))[:limit]
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

    def prune(self, cutoff: dt.datetime, limit: int = PRUNE_BATCH) -> tuple[int, int]:
        """Delete up to `limit` old jobs and `limit` old messages; return how many of each.

        A job goes when it is finished and was created and last changed before
        cutoff, with its studies, events and order numbers. Quarantined jobs
        stay: they wait for an operator. A message goes when it was received
        before cutoff and none of its jobs is left. Call again until both
        counts are below `limit`.
        """
        states = [state.value for state in _FINISHED if state is not JobState.QUARANTINED]
        eligible_job = f"state IN ({','.join('?' * len(states))}) AND updated_at < ?"
        with self._transaction() as db:
            jobs = _old_rows(
                db, "jobs", "created_at", cutoff, limit, eligible_job, (*states, _iso(cutoff))
            )
            if jobs:
                ids = ",".join("?" * len(jobs))
                for statement in (
                    f"DELETE FROM job_events WHERE job_id IN ({ids})",
                    f"DELETE FROM job_studies WHERE job_id IN ({ids})",
                    f"DELETE FROM job_orders WHERE job_id IN ({ids})",
                    f"DELETE FROM job_cancellations WHERE job_id IN ({ids})",
                    f"DELETE FROM job_failed_instances WHERE job_id IN ({ids})",
                    f"DELETE FROM identity_accepted WHERE job_id IN ({ids})",
                    f"DELETE FROM job_suppressions WHERE job_id IN ({ids})",
                ):
                    db.execute(statement, jobs)
                db.execute(f"DELETE FROM job_suppressions WHERE suppressed_by IN ({ids})", jobs)
                db.execute(f"DELETE FROM jobs WHERE id IN ({ids})", jobs)
            messages = _old_rows(
                db,
                "messages",
                "received_at",
                cutoff,
                limit,
                "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.message_id = messages.id)",
                (),
            )
            if messages:
                ids = ",".join("?" * len(messages))
                db.execute(f"DELETE FROM message_replays WHERE message_id IN ({ids})", messages)
                db.execute(f"DELETE FROM messages WHERE id IN ({ids})", messages)
        return len(jobs), len(messages)

    def job_counts(self) -> dict[str, int]:
        """Return the number of jobs in each state that has any."""
        rows = self._db.execute("SELECT state, COUNT(*) AS count FROM jobs GROUP BY state")
        return {str(row["state"]): int(row["count"]) for row in rows}

    def next_due_time(self) -> dt.datetime | None:
        row = self._db.execute(
            "SELECT MIN(not_before) AS due FROM jobs WHERE state IN (?, ?, ?)",
            (JobState.QUEUED, JobState.WAITING, JobState.DEFERRED),
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
        self,
        job_id: int,
        not_before: dt.datetime,
        summary: str,
        now: dt.datetime,
        count_attempt: bool = True,
    ) -> None:
        """Put a claimed job back to wait until not_before; without count_attempt, the
        attempt that ended is not counted (it was interrupted, e.g. by a shutdown)."""
        refund = 0 if count_attempt else 1
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, not_before = ?, summary = ?, updated_at = ?,"
                " attempts = MAX(attempts - ?, 0) WHERE id = ?",
                (JobState.WAITING, _iso(not_before), summary, _iso(now), refund, job_id),
            )
            # A delay, not a time: the event log is shown in the engine's time zone.
            delay = max(0, round((not_before - now).total_seconds()))
            when = f"retry in {delay} s" if delay else "retry when the engine claims it again"
            db.execute(
                "INSERT INTO job_events (job_id, at, text) VALUES (?,?,?)",
                (job_id, _iso(now), f"{when}: {summary}"),
            )

    def requeue_job(self, job_id: int, note: str, now: dt.datetime) -> bool:
        """Queue a finished or quarantined job for a new attempt now; False if it is not one."""
        with self._transaction() as db:
            finished = [state.value for state in JobState if state.finished]
            before = db.execute(
                "SELECT state, summary FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            # The summary of the attempt that ended no longer describes the job.
            summary = f"{note} (was {before['state']}: {before['summary']})" if before else note
            cursor = db.execute(
                "UPDATE jobs SET state = ?, not_before = ?, attempts = 0, updated_at = ?,"
                f" summary = ? WHERE id = ? AND state IN ({','.join('?' * len(finished))})",
                (JobState.QUEUED, _iso(now), _iso(now), summary, job_id, *finished),
            )
            if cursor.rowcount == 0:
                return False
            # A cancel requested while an earlier attempt ran is spent; left in place
            # it would cancel the new attempt at once.
            db.execute("DELETE FROM job_cancellations WHERE job_id = ?", (job_id,))
            # The new attempts count afresh, as for a new job.
            db.execute(
                "UPDATE job_studies SET received = 0, stored = 0, failed = 0 WHERE job_id = ?",
                (job_id,),
            )
            db.execute(
                "INSERT INTO job_events (job_id, at, text) VALUES (?,?,?)",
                (job_id, _iso(now), note),
            )
            return True

    def add_events(self, events: Sequence[tuple[int, str, dt.datetime]]) -> None:
        """Add events to the logs of jobs, all in one transaction."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO job_events (job_id, at, text) VALUES (?,?,?)",
                [(job_id, _iso(now), text) for job_id, text, now in events],
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


# Maximum messages in one group commit; a longer queue is written in several.
MAX_BATCH_MESSAGES = 500


class AsyncStore:
    """Runs Store work on one dedicated thread and returns Deferreds.

    record_message batches the messages that arrive while the thread is busy
    into one transaction (group commit): each Deferred fires only after the
    commit of its batch, so an ACK sent from it is never ahead of the disk.
    note collects job events and writes them with the next store work, in
    order, in one transaction.
    """

    def __init__(self, reactor: IReactorFromThreads, store: Store) -> None:
        self.store = store
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="fdqr-store")
        self._lock = threading.Lock()
        self._pending: list[tuple[MessageWrite, defer.Deferred[Recorded]]] = []
        self._batch_queued = False
        self._events: list[tuple[int, str, dt.datetime]] = []

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()
        self.store.close()

    def run(self, work: Callable[[Store], T]) -> defer.Deferred[T]:
        events = self._take_events()
        if not events:
            return deferToThreadPool(self._reactor, self._pool, work, self.store)

        def after_events(store: Store) -> T:
            store.add_events(events)
            return work(store)

        return deferToThreadPool(self._reactor, self._pool, after_events, self.store)

    def note(self, job_id: int, text: str, now: dt.datetime) -> None:
        """Add an event to a job's log without waiting (call on the reactor thread).

        The events are written before any store work requested later, and on
        the next reactor turn at the latest, many of them in one transaction.
        """
        self._events.append((job_id, text, now))
        if len(self._events) == 1:
            self._reactor.callLater(0, self._flush_events)  # type: ignore[attr-defined]

    def _take_events(self) -> list[tuple[int, str, dt.datetime]]:
        events, self._events = self._events, []
        return events

    def _flush_events(self) -> None:
        events = self._take_events()
        if not events:
            return
        written = deferToThreadPool(
            self._reactor, self._pool, lambda store: store.add_events(events), self.store
        )
        written.addErrback(
            lambda failure: logger.error(
                "writing %d job events failed: %s", len(events), failure.getErrorMessage()
            )
        )

    def record_message(self, write: MessageWrite) -> defer.Deferred[Recorded]:
        """Store one message in the next group commit; fire after that commit."""
        result: defer.Deferred[Recorded] = defer.Deferred()
        with self._lock:
            self._pending.append((write, result))
            queue_batch = not self._batch_queued
            self._batch_queued = True
        if queue_batch:
            self._pool.callInThread(self._write_batch)
        return result

    def _write_batch(self) -> None:
        # Runs on the store thread. Queued behind any run() work already waiting,
        # and queued again at the back when more messages arrived, so a steady
        # stream of messages cannot starve the other users of the store.
        batch: list[tuple[MessageWrite, defer.Deferred[Recorded]]] = []

        def take() -> list[MessageWrite]:
            # Called once the write lock is held, so the batch has every message
            # that arrived while another process wrote.
            with self._lock:
                batch.extend(self._pending[:MAX_BATCH_MESSAGES])
                del self._pending[:MAX_BATCH_MESSAGES]
            return [write for write, _ in batch]

        outcomes: list[Recorded | Exception]
        try:
            outcomes = self.store.record_messages(take)
        except Exception as error:
            if not batch:
                take()
            outcomes = [error] * len(batch)
        self._reactor.callFromThread(_fire, [result for _, result in batch], outcomes)
        with self._lock:
            queue_batch = bool(self._pending)
            self._batch_queued = queue_batch
        if queue_batch:
            self._pool.callInThread(self._write_batch)


def _fire(results: list[defer.Deferred[Recorded]], outcomes: list[Recorded | Exception]) -> None:
    for result, outcome in zip(results, outcomes, strict=True):
        if isinstance(outcome, Exception):
            result.errback(outcome)
        else:
            result.callback(outcome)
