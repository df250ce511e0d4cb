"""C-STORE of spooled objects to a destination, while the rest of the study is still arriving.

A StoreSession sends files over one association at a time, proposing the
(SOP class, transfer syntax) pairs it has seen and opening a new association
when a file of another kind arrives. A Forwarder feeds spooled files to
several StoreSessions, each in its own thread of the destination's pool, and
removes each file from the spool once the destination confirmed it.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

from pydicom.filereader import read_file_meta_info
from pynetdicom.association import Association

from engine.dicomfile import FileMeta, read_file_meta
from engine.dimse.contexts import (
    MAX_CONTEXTS,
    UNCOMPRESSED,
    StorageKey,
    is_compressed,
    store_contexts,
)
from engine.dimse.scu import INTERRUPT_POLL_SECONDS, DimseError, NodeClient, _status_code
from engine.dimse.status import describe, is_success_or_warning
from engine.dimse.storesend import accepted_context_id, pause_reactor, send_c_store
from engine.dimse.transcode import TranscodeError, transcode

logger = logging.getLogger(__name__)
# The spool removes files with this suffix when the engine starts.
TRANSCODED_SUFFIX = ".transcoded.partial"


class StoreSession:
    """Stores files into one node over one association, renegotiated when needed."""

    def __init__(self, client: NodeClient, initial_keys: Sequence[StorageKey] = ()) -> None:
        self.client = client
        self._keys: list[StorageKey] = list(dict.fromkeys(initial_keys))
        self._stack: ExitStack | None = None
        self._association: Association | None = None
        self._accepted: set[StorageKey] = set()

    def __enter__(self) -> StoreSession:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(error)

    def close(self, error: BaseException | None = None) -> None:
        """Release the association, or abort it when closing because of `error`."""
        stack, self._stack, self._association = self._stack, None, None
        if stack is not None:
            if error is None:
                stack.close()
            else:
                stack.__exit__(type(error), error, error.__traceback__)

    def send(self, path: Path) -> str:
        """C-STORE one file; return '' when the node confirmed it, else the reason it failed.

        Raises DimseError when no association with the node can be opened.
        """
        try:
            meta = read_file_meta(path)
            if meta is not None:
                key = (meta.sop_class_uid, str(meta.transfer_syntax))
            else:
                # A file meta that engine/dicomfile.py cannot lay out: pydicom reads it.
                pydicom_meta = read_file_meta_info(path)
                key = (
                    str(pydicom_meta.MediaStorageSOPClassUID),
                    str(pydicom_meta.TransferSyntaxUID),
                )
        except Exception as error:
            return f"unreadable file: {error}"
        try:
            return self._send(path, key, meta)
        except DimseError as error:
            # An association the node closed while idle is opened again once.
            self.close(error)
            logger.info("C-STORE to %s interrupted (%s); reconnecting", self.client.node, error)
            return self._send(path, key, meta)

    def _send(self, path: Path, key: StorageKey, meta: FileMeta | None) -> str:
        association = self._association_for(key)
        if key in self._accepted:
            return self._store(association, path, meta)

        sop_class, syntax = key
        fallback = next((s for s in UNCOMPRESSED if (sop_class, s) in self._accepted), None)
        if fallback is None:
            return (
                f"{self.client.node} accepts SOP class {sop_class} neither in the stored "
                f"transfer syntax {syntax} nor uncompressed"
            )
        converted = path.with_name(path.name + TRANSCODED_SUFFIX)
        try:
            transcode(path, converted, fallback)
            return self._store(association, converted, read_file_meta(converted))
        except TranscodeError as error:
            kind = "decompress" if is_compressed(syntax) else "convert"
            return (
                f"{self.client.node} accepts {sop_class} only uncompressed; cannot {kind}: {error}"
            )
        finally:
            converted.unlink(missing_ok=True)

    def _store(self, association: Association, path: Path, meta: FileMeta | None) -> str:
        """C-STORE one file, written straight to the socket when its file meta was laid out."""
        message_id = self.client.next_message_id()
        context_id = 0
        if meta is not None:
            context_id = accepted_context_id(
                association, meta.sop_class_uid, str(meta.transfer_syntax)
            )
        if meta is not None and context_id:
            status = send_c_store(association, path, meta, context_id, message_id)
        else:
            # pynetdicom pauses its thread too, but may take a turn of its loop for a pause.
            pause_reactor(association)
            status = association.send_c_store(path, msg_id=message_id)
        code = _status_code(self.client.node, "C-STORE", status)
        if is_success_or_warning(code):
            return ""
        comment = str(status.get("ErrorComment", "") or "")
        return f"C-STORE status {describe(code)}" + (f": {comment}" if comment else "")

    def _association_for(self, key: StorageKey) -> Association:
        association = self._association
        if association is not None and association.is_established and key in self._keys:
            return association
        if key not in self._keys:
            self._keys.append(key)
            if len(store_contexts(self._keys)) > MAX_CONTEXTS:
                self._keys = [key]
        self.close()
        stack = ExitStack()
        association = stack.enter_context(self.client.associate(store_contexts(self._keys)))
        self._stack, self._association = stack, association
        self._accepted = {
            (str(context.abstract_syntax), str(context.transfer_syntax[0]))
            for context in association.accepted_contexts
        }
        return association


@dataclasses.dataclass
class ForwardOutcome:
    """What a Forwarder did: stored objects, refused ones, and why it stopped early."""

    stored: int = 0
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    error: DimseError | None = None
    skipped: int = 0
    # Files deleted unsent because the transfer was stopped (see Forwarder.withhold).
    withheld: int = 0


class Forwarder:
    """Sends spooled files to a destination as they are put, over `workers` associations.

    put() is safe from any thread. Each run_worker() call blocks one thread
    (of the destination's pool) until finish() was called and the queue is
    drained. A file leaves the spool (`confirm`) only after its C-STORE
    succeeded, or unsent after withhold(); when the destination cannot be
    reached, the workers stop sending and leave every remaining file in the
    spool.
    """

    def __init__(
        self,
        client: NodeClient,
        confirm: Callable[[Path], None],
        *,
        workers: int = 1,
        initial_keys: Sequence[StorageKey] = (),
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client = client
        self.confirm = confirm
        self.workers = workers
        self.initial_keys = list(initial_keys)
        self.stopping = stopping
        self.outcome = ForwardOutcome()
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._lock = threading.Lock()
        self._withheld = ""

    def put(self, path: Path) -> None:
        self._queue.put(path)

    def withhold(self, reason: str) -> None:
        """Send no more files: each one not yet sent is removed from the spool unsent.

        For files that must not reach the destination, such as objects stamped
        with a patient their identifier no longer belongs to.
        """
        with self._lock:
            self._withheld = reason

    def finish(self) -> None:
        """Tell every worker that no more files come."""
        for _ in range(self.workers):
            self._queue.put(None)

    def run_worker(self) -> None:
        with StoreSession(self.client, self.initial_keys) as session:
            while True:
                path = self._next()
                if path is None:
                    return
                if self._withheld:
                    self.confirm(path)
                    with self._lock:
                        self.outcome.withheld += 1
                    continue
                if self.outcome.error is not None:
                    self._count_skipped()
                    continue
                try:
                    problem = session.send(path)
                except DimseError as error:
                    self._stop_sending(error)
                    self._count_skipped()
                    continue
                self._record(path, problem)

    def _next(self) -> Path | None:
        while True:
            try:
                return self._queue.get(timeout=INTERRUPT_POLL_SECONDS)
            except queue.Empty:
                if self.stopping():
                    self._stop_sending(DimseError("engine is stopping"))
                    return None

    def _record(self, path: Path, problem: str) -> None:
        if problem:
            logger.warning("object %s not stored at %s: %s", path.stem, self.client.node, problem)
            with self._lock:
                self.outcome.failed.append((path, problem))
            return
        self.confirm(path)
        with self._lock:
            self.outcome.stored += 1

    def _count_skipped(self) -> None:
        with self._lock:
            self.outcome.skipped += 1

    def _stop_sending(self, error: DimseError) -> None:
        with self._lock:
            if self.outcome.error is None:
                logger.warning("forwarding to %s stopped: %s", self.client.node, error)
                self.outcome.error = error
