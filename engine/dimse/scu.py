"""Blocking DICOM SCU operations against one node (C-ECHO, C-FIND, C-MOVE, C-GET, C-STORE).

These run in the node's thread pool, never on the reactor thread. Every
association is tracked so that a stopping engine can abort the open ones, and
counted against the node's maximum, whichever job or service opens it.
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
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from engine.dimse.contexts import retrieve_contexts, split_store_keys
from engine.dimse.status import Status, describe, is_pending
from engine.dimse.storescp import ArrivalHandler, arrival_from_event, status_dataset
from engine.dimse.transport import NoDelayAE

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RQ may carry at most 128 presentation contexts (odd ids 1-255).
MAX_CONTEXTS = 128
INTERRUPT_POLL_SECONDS = 0.2
# A-ASSOCIATE-RJ result values (PS3.8 9.3.4).
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02


class DimseError(Exception):
    """A failed operation. transient failures are worth retrying later."""

    def __init__(self, text: str, transient: bool = True) -> None:
        super().__init__(text)
        self.transient = transient


class RetrieveNotSupported(DimseError):
    """The node refused C-GET: no C-GET context, or no SCP role for the storage classes."""


class DeadlineExceeded(DimseError):
    """An operation ran past the deadline its caller set; its association was aborted."""


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


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often a transient association rejection is retried, and after which delays."""

    attempts: int = 4
    first_delay_seconds: float = 1.0
    max_delay_seconds: float = 30.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_delay_seconds, self.first_delay_seconds * 2 ** (attempt - 1)))


class AssociationTracker:
    """The open associations of the engine, so they can be aborted on shutdown."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Association] = set()
        self._negotiating: set[Association] = set()
        self.closed = False

    def negotiating(self, association: Association) -> None:
        """Track an association whose negotiation is starting (NoDelayAE.on_request)."""
        with self._lock:
            self._negotiating.add(association)
            closed = self.closed
        if closed:
            _give_up_negotiation(association)

    def negotiated(self, association: Association) -> None:
        with self._lock:
            self._negotiating.discard(association)

    def add(self, association: Association, deadline: float | None = None) -> None:
        """Track an association; past `deadline` (time.monotonic()) its DIMSE waits end."""
        with self._lock:
            if self.closed:
                association.abort(block=False)
                raise DimseError("engine is stopping", transient=True)
            self._open.add(association)

        def stopping() -> bool:
            return self.closed or (deadline is not None and time.monotonic() > deadline)

        make_interruptible(association, stopping)

    def remove(self, association: Association) -> None:
        with self._lock:
            self._open.discard(association)

    @property
    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def abort_all(self) -> None:
        """Abort every open association without blocking, and wake threads waiting on them."""
        with self._lock:
            self.closed = True
            associations = list(self._open)
            negotiating = list(self._negotiating)
        for association in associations:
            association.abort(block=False)
        for association in negotiating:
            _give_up_negotiation(association)


def _give_up_negotiation(association: Association) -> None:
    # The requesting thread waits for A-ASSOCIATE-AC on this queue; None reads as
    # "no answer", so it aborts at once instead of at the ACSE timeout.
    association.dul.to_user_queue.put(None)  # type: ignore[arg-type]


def make_interruptible(association: Association, stopping: Callable[[], bool]) -> None:
    """Make a thread waiting on a peer notice an engine stop within a moment.

    pynetdicom waits on its queues for the whole DIMSE or ACSE timeout (a
    DIMSE response, or A-RELEASE-RP after A-RELEASE-RQ), and a sentinel put on
    a queue can be taken by the association's own thread. This replaces both
    blocking reads with ones that check `stopping` every INTERRUPT_POLL_SECONDS;
    messages are still returned as soon as they arrive. A timeout counts from
    the start of each wait, so the DIMSE timeout restarts with every response,
    pending ones included.
    """
    dimse = association.dimse
    dul = association.dul
    read_message = dimse.get_msg
    read_primitive = dul.receive_pdu

    def next_message(seconds: float) -> Any:
        try:
            return dimse.msg_queue.get(block=True, timeout=seconds)
        except queue.Empty:
            return None

    def get_msg(block: bool = False) -> Any:
        if not block:
            return read_message(block=False)
        message = _read_in_slices(next_message, dimse.dimse_timeout, stopping)
        return (None, None) if message is None else message

    def receive_pdu(wait: bool = False, timeout: float | None = None) -> Any:
        if not wait:
            return read_primitive(wait=False)
        # pynetdicom's own read, in slices: it alone triggers the ACSE events.
        return _read_in_slices(
            lambda seconds: read_primitive(wait=True, timeout=seconds), timeout, stopping
        )

    dimse.get_msg = get_msg  # type: ignore[method-assign]
    dul.receive_pdu = receive_pdu  # type: ignore[method-assign]


class _RequestWatch:
    """Event handlers that tell how an association request ended without a response.

    Some nodes at their association limit close the connection, at once or
    after reading the request, or abort, instead of rejecting. This
    distinguishes that from a refused connection (never opened) and an ACSE
    timeout (open for the whole timeout, nothing received).
    """

    def __init__(self, acse_timeout: float) -> None:
        self._acse_timeout = acse_timeout
        self._opened_at: float | None = None
        self._aborted = False

    @property
    def handlers(self) -> list[tuple[Any, Callable[[Any], None]]]:
        return [(evt.EVT_CONN_OPEN, self._opened), (evt.EVT_ACSE_RECV, self._received)]

    def _opened(self, event: Any) -> None:
        self._opened_at = time.monotonic()

    def _received(self, event: Any) -> None:
        if isinstance(event.primitive, (A_ABORT, A_P_ABORT)):
            self._aborted = True

    @property
    def ended_by_peer(self) -> bool:
        if self._aborted:
            return True
        opened = self._opened_at
        return opened is not None and time.monotonic() - opened < self._acse_timeout


def _read_in_slices(
    read: Callable[[float], Any], timeout: float | None, stopping: Callable[[], bool]
) -> Any:
    """Call read(seconds) until it returns an item; None after `timeout` or once stopping."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not stopping():
        seconds = INTERRUPT_POLL_SECONDS
        if deadline is not None:
            seconds = min(seconds, deadline - time.monotonic())
            if seconds <= 0:
                return None
        item = read(seconds)
        if item is not None:
            return item
    return None


class NodeClient:
    """SCU operations against one remote node, as the engine's AE title.

    At most `max_associations` associations with the node are open at once
    through this client, whichever thread opens them; the others wait for a
    free slot. A transient rejection (A-ASSOCIATE-RJ result 2, e.g. the peer's
    association limit) is retried after the delays of `retry`.
    """

    def __init__(
        self,
        node: NodeAddress,
        calling_ae_title: str,
        tracker: AssociationTracker,
        max_pdu_bytes: int = 262144,
        *,
        max_associations: int | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.node = node
        self.tracker = tracker
        self.max_pdu_bytes = max_pdu_bytes
        self.retry = retry or RetryPolicy()
        self._ae = NoDelayAE(ae_title=calling_ae_title)
        self._ae.on_request = tracker.negotiating
        self._ae.acse_timeout = node.timeout_seconds
        self._ae.dimse_timeout = node.timeout_seconds
        self._ae.network_timeout = node.timeout_seconds
        self._ae.connection_timeout = node.timeout_seconds
        self._ae.maximum_associations = 1024
        self._slots = threading.BoundedSemaphore(max_associations) if max_associations else None
        self._message_ids = iter(range(1, 1 << 30))
        self._id_lock = threading.Lock()

    def next_message_id(self) -> int:
        with self._id_lock:
            return next(self._message_ids) % 0xFFFF + 1

    @contextmanager
    def associate(
        self,
        contexts: Sequence[PresentationContext],
        *,
        ext_neg: Sequence[Any] = (),
        evt_handlers: Sequence[Any] = (),
        deadline: float | None = None,
    ) -> Iterator[Association]:
        """Open an association, release it after the block, abort it if the block raises."""
        self._acquire_slot(deadline)
        try:
            association = self._open(contexts, ext_neg, evt_handlers, deadline)
            self.tracker.add(association, deadline)
            try:
                yield association
            except BaseException:
                association.abort()
                raise
            else:
                # A stopping engine has already aborted it: a release would wait on the peer.
                if association.is_established and not self.tracker.closed:
                    association.release()
            finally:
                self.tracker.remove(association)
        finally:
            if self._slots is not None:
                self._slots.release()

    def _acquire_slot(self, deadline: float | None) -> None:
        if self._slots is None:
            return
        while not self._slots.acquire(timeout=INTERRUPT_POLL_SECONDS):
            if self.tracker.closed:
                raise DimseError("engine is stopping", transient=True)
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(f"no free association with {self.node} before the deadline")

    def _open(
        self,
        contexts: Sequence[PresentationContext],
        ext_neg: Sequence[Any],
        evt_handlers: Sequence[Any],
        deadline: float | None,
    ) -> Association:
        attempt = 1
        while True:
            if self.tracker.closed:
                raise DimseError("engine is stopping", transient=True)
            watch = _RequestWatch(self.node.timeout_seconds)
            association = self._ae.associate(
                self.node.host,
                self.node.port,
                contexts=list(contexts),
                ae_title=self.node.ae_title,
                max_pdu=self.max_pdu_bytes,
                ext_neg=list(ext_neg) or None,
                evt_handlers=[*evt_handlers, *watch.handlers],
            )
            self.tracker.negotiated(association)
            if association.is_established:
                return association
            if association.is_rejected:
                result, reason = _rejection(association)
                if result != REJECTED_TRANSIENT:
                    raise DimseError(
                        f"association with {self.node} rejected permanently ({reason}): check"
                        f" that the node knows the AE title '{self._ae.ae_title}'",
                        transient=False,
                    )
            elif self.tracker.closed:
                raise DimseError("engine is stopping", transient=True)
            elif watch.ended_by_peer:
                reason = "closed by the node before it responded"
            else:
                raise DimseError(
                    f"association with {self.node} failed (refused, timed out or aborted)"
                )

            delay = self.retry.delay(attempt)
            past_deadline = deadline is not None and time.monotonic() + delay > deadline
            if attempt >= self.retry.attempts or past_deadline or self.tracker.closed:
                raise DimseError(
                    f"association with {self.node} rejected ({reason}) {attempt} times"
                )
            logger.info(
                "association with %s rejected (%s); attempt %d of %d in %.1fs",
                self.node,
                reason,
                attempt + 1,
                self.retry.attempts,
                delay,
            )
            _sleep_unless(delay, lambda: self.tracker.closed)
            attempt += 1

    def echo(self) -> None:
        with self.associate([build_context(Verification)]) as association:
            status = association.send_c_echo()
            _check_final(self.node, "C-ECHO", status)

    def find(
        self,
        query: Dataset,
        model: str = StudyRootQueryRetrieveInformationModelFind,
        operation: str = "C-FIND",
    ) -> list[Dataset]:
        """Run one C-FIND (Study Root unless another information model is given)
        and return the matches."""
        matches: list[Dataset] = []
        with self.associate([build_context(model)]) as association:
            responses = association.send_c_find(query, model, msg_id=self.next_message_id())
            for status, identifier in responses:
                code = _status_code(self.node, operation, status)
                if is_pending(code):
                    if identifier is not None:
                        matches.append(identifier)
                    continue
                if code != Status.SUCCESS:
                    raise DimseError(
                        f"{operation} at {self.node} failed with status {describe(code)}"
                    )
        return matches

    def move(
        self,
        identifier: Dataset,
        destination_ae_title: str,
        message_id: int,
        deadline: float | None = None,
    ) -> MoveOutcome:
        """Run one Study Root C-MOVE to `destination_ae_title` and return its final counts.

        A801 (move destination unknown) raises a DimseError that is not
        transient: the node's configuration must change first.
        """
        context = build_context(StudyRootQueryRetrieveInformationModelMove)
        with self.associate([context], deadline=deadline) as association:
            responses = association.send_c_move(
                identifier,
                destination_ae_title,
                StudyRootQueryRetrieveInformationModelMove,
                msg_id=message_id,
            )
            final, final_identifier = self._final_response("C-MOVE", responses, deadline)

        code = int(final.Status)
        if code == Status.MOVE_DESTINATION_UNKNOWN:
            raise DimseError(
                f"{self.node} does not know the move destination '{destination_ae_title}': "
                f"add AE title '{destination_ae_title}' with this engine's host and DICOM port "
                f"to the known destinations of node {self.node.name}",
                transient=False,
            )
        return _outcome(final, final_identifier)

    def get(
        self,
        identifier: Dataset,
        sop_classes: Sequence[str],
        message_id: int,
        on_store: ArrivalHandler,
        deadline: float | None = None,
    ) -> MoveOutcome:
        """Run one Study Root C-GET; each object arrives on this association, for `on_store`.

        The association proposes every storage class of the study with an SCP
        role selection item. Raises RetrieveNotSupported when the node accepts
        no C-GET context, grants the SCP role for none of the classes, or
        refuses the request itself.
        """
        model = StudyRootQueryRetrieveInformationModelGet
        try:
            contexts, roles = retrieve_contexts(model, sop_classes)
        except ValueError as error:
            raise RetrieveNotSupported(f"C-GET from {self.node}: {error}") from error

        stores = 0

        def handle_store(event: Any) -> Dataset:
            nonlocal stores
            stores += 1
            arrival = arrival_from_event(event)
            try:
                return status_dataset(on_store(arrival))
            finally:
                # pynetdicom 3.0 removes the received file after a C-STORE on
                # an association it accepted, but not on one it requested.
                if arrival.path is not None:
                    arrival.path.unlink(missing_ok=True)

        with self.associate(
            contexts,
            ext_neg=roles,
            evt_handlers=[(evt.EVT_C_STORE, handle_store)],
            deadline=deadline,
        ) as association:
            accepted = association.accepted_contexts
            if not any(context.abstract_syntax == model for context in accepted):
                raise RetrieveNotSupported(f"{self.node} does not accept C-GET")
            granted = {str(c.abstract_syntax) for c in accepted if c.as_scp}
            if not granted:
                raise RetrieveNotSupported(
                    f"{self.node} accepts C-GET but grants the storage SCP role for no class"
                )
            responses = association.send_c_get(identifier, model, msg_id=message_id)
            try:
                final, final_identifier = self._final_response("C-GET", responses, deadline)
            except DeadlineExceeded:
                raise
            except DimseError as error:
                # Orthanc 1.10 aborts the association when C-GET is not allowed for
                # the caller: an abort before any object arrived is a refusal.
                if stores or self.tracker.closed:
                    raise
                raise RetrieveNotSupported(
                    f"{self.node} ended the C-GET at once ({error})"
                ) from None

        code = int(final.Status)
        if code in (Status.REFUSED_NOT_AUTHORIZED, Status.SOP_CLASS_NOT_SUPPORTED):
            raise RetrieveNotSupported(f"{self.node} rejected C-GET with status {describe(code)}")
        return _outcome(final, final_identifier)

    def _final_response(
        self,
        operation: str,
        responses: Iterator[tuple[Dataset, Dataset | None]],
        deadline: float | None,
    ) -> tuple[Dataset, Dataset | None]:
        final: Dataset | None = None
        final_identifier: Dataset | None = None
        try:
            for status, response_identifier in responses:
                code = _status_code(self.node, operation, status)
                if not is_pending(code):
                    final, final_identifier = status, response_identifier
        except DimseError:
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"{operation} at {self.node} exceeded the study deadline; association aborted"
                ) from None
            raise
        if final is None:
            raise DimseError(f"{operation} at {self.node} ended without a final response")
        return final, final_identifier

    def store(self, paths: Sequence[Path]) -> StoreOutcome:
        """C-STORE DICOM files, each in its stored transfer syntax when the node accepts it.

        Files are grouped by (SOP class, transfer syntax); groups whose
        presentation contexts exceed one association go over further
        associations. A compressed file the node accepts only uncompressed is
        decompressed first (see engine.dimse.forward.StoreSession).
        """
        from engine.dimse.forward import StoreSession

        by_key: dict[tuple[str, str], list[Path]] = {}
        failed: list[tuple[Path, str]] = []
        for path in paths:
            try:
                meta = read_file_meta_info(path)
                key = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            except Exception as error:
                failed.append((path, f"unreadable file: {error}"))
                continue
            by_key.setdefault(key, []).append(path)

        stored: list[Path] = []
        for group in split_store_keys(list(by_key)):
            with StoreSession(self, initial_keys=group) as session:
                for key in group:
                    for path in by_key[key]:
                        problem = session.send(path)
                        if problem:
                            failed.append((path, problem))
                        else:
                            stored.append(path)
        return StoreOutcome(tuple(stored), tuple(failed))


def _outcome(final: Dataset, final_identifier: Dataset | None) -> MoveOutcome:
    failed_uids: tuple[str, ...] = ()
    if final_identifier is not None and "FailedSOPInstanceUIDList" in final_identifier:
        value = final_identifier.FailedSOPInstanceUIDList
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            failed_uids = tuple(str(uid) for uid in value if str(uid))
        elif str(value):
            failed_uids = (str(value),)
    return MoveOutcome(
        status=int(final.Status),
        completed=int(final.get("NumberOfCompletedSuboperations", 0) or 0),
        failed=int(final.get("NumberOfFailedSuboperations", 0) or 0),
        warning=int(final.get("NumberOfWarningSuboperations", 0) or 0),
        failed_instances=failed_uids,
    )


def _rejection(association: Association) -> tuple[int, str]:
    primitive = association.acceptor.primitive
    if primitive is None:
        return REJECTED_PERMANENT, "no reason given"
    result = int(primitive.result or REJECTED_PERMANENT)
    return result, f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}"


def _sleep_unless(seconds: float, stopping: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while not stopping():
        remaining = end - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(remaining, INTERRUPT_POLL_SECONDS))


def _status_code(node: NodeAddress, operation: str, status: Dataset) -> int:
    # pynetdicom yields an empty status when the association was aborted or timed out.
    if status is None or "Status" not in status:
        raise DimseError(f"{operation} at {node}: no response (timeout or association aborted)")
    return int(status.Status)


def _check_final(node: NodeAddress, operation: str, status: Dataset) -> None:
    code = _status_code(node, operation, status)
    if code != Status.SUCCESS:
        raise DimseError(f"{operation} at {node} failed with status {describe(code)}")
