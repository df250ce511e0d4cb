"""Blocking DICOM SCU operations against one node (C-ECHO, C-FIND, C-MOVE, C-STORE).

These run in the node's thread pool, never on the reactor thread. Every
association is tracked so that a stopping engine can abort the open ones.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from engine.dimse.status import Status, describe, is_pending, is_success_or_warning
from engine.dimse.transport import NoDelayAE

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RQ may carry at most 128 presentation contexts (odd ids 1-255).
MAX_CONTEXTS = 128
INTERRUPT_POLL_SECONDS = 0.2


class DimseError(Exception):
    """A failed operation. transient failures are worth retrying later."""

    def __init__(self, text: str, transient: bool = True) -> None:
        super().__init__(text)
        self.transient = transient


@dataclasses.dataclass(frozen=True)
class NodeAddress:
    name: str
    ae_title: str
    host: str
    port: int
    timeout_seconds: float = 30.0

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


@dataclasses.dataclass(frozen=True)
class MoveOutcome:
    status: int
    completed: int
    failed: int
    warning: int
    failed_instances: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class StoreOutcome:
    stored: tuple[Path, ...]
    failed: tuple[tuple[Path, str], ...]


class AssociationTracker:
    """The open associations of the engine, so they can be aborted on shutdown."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Association] = set()
        self.closed = False

    def add(self, association: Association) -> None:
        with self._lock:
            if self.closed:
                association.abort(block=False)
                raise DimseError("engine is stopping", transient=True)
            self._open.add(association)
        _make_interruptible(association, lambda: self.closed)

    def remove(self, association: Association) -> None:
        with self._lock:
            self._open.discard(association)

    def abort_all(self) -> None:
        """Abort every open association without blocking, and wake threads waiting on them."""
        with self._lock:
            self.closed = True
            associations = list(self._open)
        for association in associations:
            association.abort(block=False)


def _make_interruptible(association: Association, stopping: Callable[[], bool]) -> None:
    """Make a thread waiting for a DIMSE response notice an engine stop within a moment.

    pynetdicom waits on its message queue for the whole DIMSE timeout, and a
    sentinel put on the queue can be taken by the association's own thread.
    This replaces the blocking read with one that checks `stopping` every
    INTERRUPT_POLL_SECONDS; messages are still returned as soon as they arrive.
    """
    dimse = association.dimse
    original = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block:
            return original(block=False)
        timeout = dimse.dimse_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while not stopping():
            wait = INTERRUPT_POLL_SECONDS
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return None, None
            try:
                return dimse.msg_queue.get(block=True, timeout=wait)
            except queue.Empty:
                continue
        return None, None

    dimse.get_msg = get_msg  # type: ignore[method-assign]


class NodeClient:
    """SCU operations against one remote node, as the engine's AE title."""

    def __init__(
        self,
        node: NodeAddress,
        calling_ae_title: str,
        tracker: AssociationTracker,
        max_pdu_bytes: int = 262144,
    ) -> None:
        self.node = node
        self.tracker = tracker
        self.max_pdu_bytes = max_pdu_bytes
        self._ae = NoDelayAE(ae_title=calling_ae_title)
        self._ae.acse_timeout = node.timeout_seconds
        self._ae.dimse_timeout = node.timeout_seconds
        self._ae.network_timeout = node.timeout_seconds
        self._ae.connection_timeout = node.timeout_seconds
        self._message_ids = iter(range(1, 1 << 30))
        self._id_lock = threading.Lock()

    def next_message_id(self) -> int:
        with self._id_lock:
            return next(self._message_ids) % 0xFFFF + 1

    @contextmanager
    def associate(self, contexts: Sequence[PresentationContext]) -> Iterator[Association]:
        association = self._ae.associate(
            self.node.host,
            self.node.port,
            contexts=list(contexts),
            ae_title=self.node.ae_title,
            max_pdu=self.max_pdu_bytes,
        )
        if not association.is_established:
            state = "rejected" if association.is_rejected else "failed"
            raise DimseError(f"association with {self.node} {state}")
        self.tracker.add(association)
        try:
            yield association
        except BaseException:
            association.abort()
            raise
        else:
            if association.is_established:
                association.release()
        finally:
            self.tracker.remove(association)

    def echo(self) -> None:
        with self.associate([build_context(Verification)]) as association:
            status = association.send_c_echo()
            _check_final(self.node, "C-ECHO", status)

    def find(self, query: Dataset) -> list[Dataset]:
        """Run one Study Root C-FIND and return the matches."""
        context = build_context(StudyRootQueryRetrieveInformationModelFind)
        matches: list[Dataset] = []
        with self.associate([context]) as association:
            responses = association.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind, msg_id=self.next_message_id()
            )
            for status, identifier in responses:
                code = _status_code(self.node, "C-FIND", status)
                if is_pending(code):
                    if identifier is not None:
                        matches.append(identifier)
                    continue
                if code != Status.SUCCESS:
                    raise DimseError(f"C-FIND at {self.node} failed with status {describe(code)}")
        return matches

    def move(self, identifier: Dataset, destination_ae_title: str, message_id: int) -> MoveOutcome:
        """Run one Study Root C-MOVE to `destination_ae_title` and return its final counts."""
        context = build_context(StudyRootQueryRetrieveInformationModelMove)
        final: Dataset | None = None
        final_identifier: Dataset | None = None
        with self.associate([context]) as association:
            responses = association.send_c_move(
                identifier,
                destination_ae_title,
                StudyRootQueryRetrieveInformationModelMove,
                msg_id=message_id,
            )
            for status, response_identifier in responses:
                code = _status_code(self.node, "C-MOVE", status)
                if not is_pending(code):
                    final, final_identifier = status, response_identifier
        if final is None:
            raise DimseError(f"C-MOVE at {self.node} ended without a final response")

        code = int(final.Status)
        if code == Status.MOVE_DESTINATION_UNKNOWN:
            raise DimseError(
                f"{self.node} does not know the move destination '{destination_ae_title}': "
                f"add it with this engine's host and port to the node's configuration",
                transient=False,
            )
        failed_uids: tuple[str, ...] = ()
        if final_identifier is not None and "FailedSOPInstanceUIDList" in final_identifier:
            value = final_identifier.FailedSOPInstanceUIDList
            failed_uids = tuple(value) if isinstance(value, list | tuple) else (str(value),)
        return MoveOutcome(
            status=code,
            completed=int(final.get("NumberOfCompletedSuboperations", 0) or 0),
            failed=int(final.get("NumberOfFailedSuboperations", 0) or 0),
            warning=int(final.get("NumberOfWarningSuboperations", 0) or 0),
            failed_instances=failed_uids,
        )

    def store(self, paths: Sequence[Path]) -> StoreOutcome:
        """C-STORE DICOM files as they are encoded (no transcoding)."""
        by_syntax: dict[tuple[str, str], list[Path]] = {}
        unreadable: list[tuple[Path, str]] = []
        for path in paths:
            try:
                meta = read_file_meta_info(path)
                key = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            except Exception as error:
                unreadable.append((path, f"unreadable file: {error}"))
                continue
            by_syntax.setdefault(key, []).append(path)

        stored: list[Path] = []
        failed: list[tuple[Path, str]] = list(unreadable)
        keys = list(by_syntax)
        for start in range(0, len(keys), MAX_CONTEXTS):
            batch = keys[start : start + MAX_CONTEXTS]
            contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in batch]
            with self.associate(contexts) as association:
                accepted = {
                    (context.abstract_syntax, context.transfer_syntax[0])
                    for context in association.accepted_contexts
                }
                for key in batch:
                    for path in by_syntax[key]:
                        if key not in accepted:
                            failed.append(
                                (path, f"{self.node} does not accept {key[0]} in {key[1]}")
                            )
                            continue
                        status = association.send_c_store(path, msg_id=self.next_message_id())
                        code = _status_code(self.node, "C-STORE", status)
                        if is_success_or_warning(code):
                            stored.append(path)
                        else:
                            failed.append((path, f"C-STORE status {describe(code)}"))
        return StoreOutcome(tuple(stored), tuple(failed))


def _status_code(node: NodeAddress, operation: str, status: Dataset) -> int:
    # pynetdicom yields an empty status when the association was aborted or timed out.
    if status is None or "Status" not in status:
        raise DimseError(f"{operation} at {node}: no response (timeout or association aborted)")
    return int(status.Status)


def _check_final(node: NodeAddress, operation: str, status: Dataset) -> None:
    code = _status_code(node, operation, status)
    if code != Status.SUCCESS:
        raise DimseError(f"{operation} at {node} failed with status {describe(code)}")
