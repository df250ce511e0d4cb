"""The engine's Storage SCP: receives the objects that sources send on C-MOVE.

Each object arrives as a file (pynetdicom's chunked receive), so memory stays
flat whatever its size. What happens to it is decided by the ArrivalHandler
given to the SCP, which runs in pynetdicom's association thread and returns
the C-STORE status.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

from engine.dimse.status import Status
from engine.dimse.transport import NoDelayAE, NoDelayServer, start_server

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Arrival:
    """One received object, in a temporary DICOM file, and who sent it."""

    path: Path
    calling_ae_title: str
    move_originator_ae_title: str
    move_originator_message_id: int | None


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
    """A pynetdicom server accepting every storage SOP class in any transfer syntax."""

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
            evt_handlers=[(evt.EVT_C_STORE, self._on_c_store), *self._extra_handlers],
        )
        logger.info("Storage SCP %s listening on %s:%d", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            logger.info("Storage SCP %s stopped", self.ae_title)

    @property
    def listening_port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def _on_c_store(self, event: Any) -> Dataset:
        arrival = arrival_from_event(event)
        try:
            verdict = self.handler(arrival)
        except Exception as error:
            logger.exception(
                "handling object %s from %s failed",
                event.request.AffectedSOPInstanceUID,
                arrival.calling_ae_title,
            )
            verdict = Verdict(Status.PROCESSING_FAILURE, f"internal error: {type(error).__name__}")
        return status_dataset(verdict)


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
