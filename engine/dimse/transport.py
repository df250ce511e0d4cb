"""pynetdicom application entities with TCP_NODELAY on every association socket.

DIMSE exchanges many small PDUs (responses, command sets); with Nagle's
algorithm on, each small write after a large one can wait for the peer's
delayed ACK, which on Linux costs about 40 ms per C-STORE.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AddressInformation, AssociationSocket, ThreadedAssociationServer


def set_no_delay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NoDelayAE(AE):
    """An AE whose requested associations use TCP_NODELAY."""

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: Any
    ) -> AssociationSocket:
        association_socket = super()._create_socket(assoc, address, tls_args)
        if association_socket.socket is not None:
            set_no_delay(association_socket.socket)
        return association_socket


class NoDelayServer(ThreadedAssociationServer):
    """An association server whose accepted connections use TCP_NODELAY."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client_socket, address = super().get_request()
        set_no_delay(client_socket)
        return client_socket, address


def start_server(ae: AE, address: tuple[str, int], **kwargs: Any) -> NoDelayServer:
    """Start a non-blocking association server, as AE.start_server(block=False) does."""
    server = ae.make_server(address, server_class=NoDelayServer, **kwargs)
    assert isinstance(server, NoDelayServer)
    thread = threading.Thread(
        target=server.serve_forever, name=f"fdqr-scp-{address[1]}", daemon=True
    )
    thread.start()
    # AE.shutdown() and server.shutdown() expect the server in this list.
    ae._servers.append(server)
    return server
