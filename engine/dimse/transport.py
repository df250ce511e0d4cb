"""pynetdicom application entities with TCP_NODELAY on every association socket.

DIMSE exchanges many small PDUs (responses, command sets); with Nagle's
algorithm on, each small write after a large one can wait for the peer's
delayed ACK, which on Linux costs about 40 ms per C-STORE.

Associations the engine requests also get a bounded queue of outgoing P-DATA
primitives: pynetdicom 3.0 splits a whole object into PDUs before its DUL
thread sends the first one, so an object sent from a file would otherwise sit
in memory whole (a 1 GB Enhanced MR would take 1 GB).
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AddressInformation, AssociationSocket, ThreadedAssociationServer

# Outgoing P-DATA primitives queued per association: with the peer's maximum PDU
# length of 16 KB to 1 MB, at most 16 such PDUs wait in memory.
MAX_QUEUED_PDUS = 16


def set_no_delay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class BoundedPDataQueue(queue.Queue[Any]):
    """The DUL's queue of primitives to send, where a P-DATA waits while `limit` are queued.

    Only the thread that sends DIMSE messages waits here; the DUL thread only
    takes from this queue. A-ASSOCIATE, A-RELEASE and A-ABORT primitives never
    wait, and P-DATA stops waiting once the DUL thread has ended, so an abort
    always gets through.
    """

    def __init__(self, dul: DULServiceProvider, limit: int = MAX_QUEUED_PDUS) -> None:
        super().__init__()
        self._dul = dul
        self._limit = limit

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if isinstance(item, P_DATA):
            with self.not_full:
                while self._qsize() >= self._limit and self._dul_running():
                    self.not_full.wait(0.05)
        super().put(item, block, timeout)

    def _dul_running(self) -> bool:
        return not self._dul._kill_thread and (self._dul.is_alive() or not self._dul.ident)


class NoDelayAE(AE):
    """An AE whose requested associations use TCP_NODELAY and a bounded send queue.

    on_request, when set, sees each association before its A-ASSOCIATE-RQ is sent,
    so a stopping engine can end a negotiation that waits on a peer.
    """

    on_request: Callable[[Association], None] | None = None

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: Any
    ) -> AssociationSocket:
        if self.on_request is not None:
            self.on_request(assoc)
        association_socket = super()._create_socket(assoc, address, tls_args)
        if association_socket.socket is not None:
            set_no_delay(association_socket.socket)
        # storesend.py writes PDUs to this socket from another thread, so the DUL
        # thread's own writes (an A-ABORT) take the same lock for each PDU.
        lock = threading.Lock()
        send = association_socket.send

        def send_whole_pdu(data: bytes) -> None:
            with lock:
                send(data)

        association_socket.write_lock = lock  # type: ignore[attr-defined]
        association_socket.send = send_whole_pdu  # type: ignore[method-assign, assignment]
        # The DUL thread has not started yet, so nothing is in the old queue.
        assoc.dul.to_provider_queue = BoundedPDataQueue(assoc.dul)
        return association_socket


class NoDelayServer(ThreadedAssociationServer):
    """An association server whose accepted connections use TCP_NODELAY.

    divert, when set, gets each connection first, in the connection's own
    thread. When it returns True it has served the connection, otherwise
    pynetdicom serves it.
    """

    divert: Callable[[socket.socket, tuple[str, int]], bool] | None = None
    # A connection's thread may serve a whole association (see divert), and
    # must not keep a stopping process alive.
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client_socket, address = super().get_request()
        set_no_delay(client_socket)
        return client_socket, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        divert = self.divert
        is_socket = isinstance(request, socket.socket)
        if divert is not None and is_socket and divert(request, client_address):
            return
        super().finish_request(request, client_address)


def start_server(
    ae: AE,
    address: tuple[str, int],
    divert: Callable[[socket.socket, tuple[str, int]], bool] | None = None,
    **kwargs: Any,
) -> NoDelayServer:
    """Start a non-blocking association server, as AE.start_server(block=False) does."""
    server = ae.make_server(address, server_class=NoDelayServer, **kwargs)
    assert isinstance(server, NoDelayServer)
    server.divert = divert
    thread = threading.Thread(
        target=server.serve_forever, name=f"fdqr-scp-{address[1]}", daemon=True
    )
    thread.start()
    # AE.shutdown() and server.shutdown() expect the server in this list.
    ae._servers.append(server)
    return server
