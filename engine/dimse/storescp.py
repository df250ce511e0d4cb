"""The engine's Storage SCP: receives the objects that sources send on C-MOVE.

Each object arrives as a file (pynetdicom's chunked receive), so memory stays
flat whatever its size. What happens to it is decided by the ArrivalHandler
given to the SCP, which runs in pynetdicom's association thread and returns
the C-STORE status.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.sop_class import Verification

from engine.dimse import storeassoc
from engine.dimse import upperlayer as ul
from engine.dimse.status import Status
from engine.dimse.transport import NoDelayAE, NoDelayServer, start_server

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Arrival:
    """One received object and who sent it.

    The object is a DICOM file: in memory (data) when it was small enough,
    otherwise in a temporary file (path) that is removed after the handler.
    """

    path: Path | None
    calling_ae_title: str
    move_originator_ae_title: str
    move_originator_message_id: int | None
    data: bytes | None = None

    @property
    def source(self) -> Path | bytes:
        """The object, as the functions of engine/coercion.py take it."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path

    @property
    def size(self) -> int:
        """The object's size in bytes; 0 when its file cannot be read."""
        if self.data is not None:
            return len(self.data)
        try:
            return os.stat(self.path).st_size if self.path is not None else 0
        except OSError:
            return 0


@dataclasses.dataclass(frozen=True)
class Verdict:
    status: int
    comment: str = ""


class ArrivalHandler(Protocol):
    def __call__(self, arrival: Arrival) -> Verdict: ...


def configure_pynetdicom() -> None:
    """Set pynetdicom's process-wide options the engine relies on."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    # Query and response identifiers carry patient names and birth dates.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class StorageSCP:
    """A server accepting every storage SOP class in any transfer syntax.

    Storage associations are served by engine/dimse/storeassoc.py, and every
    other association (the services added with add_service) by pynetdicom.
    """

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        handler: ArrivalHandler,
        max_pdu_bytes: int = 262144,
        max_associations: int = 32,
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.handler = handler
        self._ae = NoDelayAE(ae_title=ae_title)
        self._ae.maximum_pdu_size = max_pdu_bytes
        self._ae.maximum_associations = max_associations
        self._ae.require_called_aet = True
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            self._ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._ae.add_supported_context(Verification)
        self._server: NoDelayServer | None = None
        self._extra_handlers: list[tuple[Any, Callable[..., Any]]] = []
        self._storage_settings = storeassoc.Settings(
            max_pdu_length=max_pdu_bytes,
            implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID,
            implementation_version_name=PYNETDICOM_IMPLEMENTATION_VERSION,
            network_timeout=float(self._ae.network_timeout or 60),
        )
        self._associations: set[storeassoc.StorageAssociation] = set()
        self._lock = threading.Lock()
        # Storage associations served by storeassoc rather than pynetdicom.
        self.storage_associations = 0

    def add_service(
        self, configure: Callable[[NoDelayAE], None], handlers: list[tuple[Any, Callable[..., Any]]]
    ) -> None:
        """Serve more services on the same AE (the federated Q/R SCP); call before start().

        `configure` adds the presentation contexts to the AE; `handlers` are
        (pynetdicom event, handler) pairs bound when the server starts.
        """
        configure(self._ae)
        self._extra_handlers.extend(handlers)

    def start(self) -> None:
        self._server = start_server(
            self._ae,
            (self.host, self.port),
            divert=self._divert,
            evt_handlers=[(evt.EVT_C_STORE, self._on_c_store), *self._extra_handlers],
        )
        logger.info("Storage SCP %s listening on %s:%d", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            with self._lock:
                associations = list(self._associations)
            for association in associations:
                association.abort()
            logger.info("Storage SCP %s stopped", self.ae_title)

    @property
    def open_storage_associations(self) -> int:
        with self._lock:
            return len(self._associations)

    @property
    def listening_port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def _divert(self, sock: socket.socket, address: tuple[str, int]) -> bool:
        """Serve a storage association here; return False to leave the connection to pynetdicom.

        Requests that pynetdicom would reject (a wrong called AE title or
        application context) go to pynetdicom, so its rejections stay the same.
        """
        request = storeassoc.peek_request(sock, float(self._ae.acse_timeout or 30))
        if (
            request is None
            or not storeassoc.serves_only_storage(request)
            or request.called_ae_title != self.ae_title
            or request.application_context != ul.APPLICATION_CONTEXT
        ):
            return False
        association = storeassoc.StorageAssociation(
            sock, address, request, self._storage_settings, self._store
        )
        with self._lock:
            server = self._server
            active = len(self._associations)
            if server is not None:
                active += len(server.active_associations)
            # NOTE: pynetdicom's own limit counts only its associations, so Q/R
            # associations may still be accepted while storage ones use the limit.
            admitted = server is not None and active < self._ae.maximum_associations
            if admitted:
                self._associations.add(association)
                self.storage_associations += 1
        if not admitted:
            association.reject(
                ul.REJECTED_TRANSIENT, ul.SOURCE_PRESENTATION, ul.REASON_LOCAL_LIMIT_EXCEEDED
            )
            return True
        try:
            association.serve()
        finally:
            with self._lock:
                self._associations.discard(association)
        return True

    def _store(self, request: storeassoc.StoreRequest) -> tuple[int, str]:
        arrival = Arrival(
            path=request.path,
            calling_ae_title=request.calling_ae_title,
            move_originator_ae_title=request.move_originator_ae_title,
            move_originator_message_id=request.move_originator_message_id,
            data=request.data,
        )
        verdict = self._handle(arrival, request.sop_instance_uid)
        return verdict.status, verdict.comment

    def _on_c_store(self, event: Any) -> Dataset:
        arrival = arrival_from_event(event)
        verdict = self._handle(arrival, str(event.request.AffectedSOPInstanceUID))
        return status_dataset(verdict)

    def _handle(self, arrival: Arrival, sop_instance_uid: str) -> Verdict:
        try:
            return self.handler(arrival)
        except Exception as error:
            logger.exception(
                "handling object %s from %s failed", sop_instance_uid, arrival.calling_ae_title
            )
            return Verdict(Status.PROCESSING_FAILURE, f"internal error: {type(error).__name__}")


def arrival_from_event(event: Any) -> Arrival:
    """Describe a C-STORE request of pynetdicom's EVT_C_STORE, received in chunked mode.

    The sender is the association's peer: the requestor on the Storage SCP,
    the acceptor on a C-GET association the engine opened.
    """
    request = event.request
    association = event.assoc
    peer = association.acceptor if association.is_requestor else association.requestor
    return Arrival(
        path=Path(event.dataset_path),
        calling_ae_title=str(peer.ae_title).strip(),
        move_originator_ae_title=str(request.MoveOriginatorApplicationEntityTitle or "").strip(),
        move_originator_message_id=request.MoveOriginatorMessageID,
    )


def status_dataset(verdict: Verdict) -> Dataset:
    status = Dataset()
    status.Status = int(verdict.status)
    if verdict.comment:
        # Error Comment is LO: at most 64 characters.
        status.ErrorComment = verdict.comment[:64]
    return status
