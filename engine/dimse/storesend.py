"""C-STORE requests written straight to the socket of a pynetdicom association.

pynetdicom still opens, releases and aborts the association and decodes the
response. Only the request's PDUs bypass its DIMSE and DUL layers, which turn
every PDU into a primitive that the DUL thread takes from a queue it polls
each millisecond. Orthanc's default maximum PDU is 16 KB, so a 500 KB object
takes 33 PDUs. Here each PDU is one read from the file and one socket write.
"""

from __future__ import annotations

import os
import socket
import time
from io import BufferedReader
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from engine.dicomfile import FileMeta
from engine.dimse import upperlayer as ul
from engine.dimse.scu import DimseError

# Priority MEDIUM (PS3.7 section C.4.2.1.5).
PRIORITY_MEDIUM = 0x0000
# Any value other than 0101 means a data set follows (PS3.7 section E.1).
DATA_SET_PRESENT = 0x0000
# The PDU size when the peer sets no maximum (a maximum length of 0).
UNLIMITED_PDU_BYTES = 1 << 20


class SendFailed(DimseError):
    """The request could not be written, and the association was aborted."""


def accepted_context_id(association: Association, sop_class: str, transfer_syntax: str) -> int:
    """Return the id of the accepted context for the pair, or 0 when there is none."""
    for context in association.accepted_contexts:
        if (
            str(context.abstract_syntax) == sop_class
            and str(context.transfer_syntax[0]) == transfer_syntax
        ):
            return int(context.context_id or 0)
    return 0


def send_c_store(
    association: Association, path: Path, meta: FileMeta, context_id: int, message_id: int
) -> Dataset:
    """Send the dataset of `path` as a C-STORE-RQ and return the response's status dataset.

    Return an empty Dataset when no response came within the DIMSE timeout
    (pynetdicom's send_c_store does the same, after aborting the association).
    Raises SendFailed when the socket fails or the association ends while sending.
    """
    pause_reactor(association)
    try:
        _write_request(association, path, meta, context_id, message_id)
    except OSError as error:
        association.abort()
        raise SendFailed(f"sending object {meta.sop_instance_uid} failed: {error}") from error
    _, response = association.dimse.get_msg(block=True)

    if response is None:
        association._handle_no_response()
        return Dataset()
    if not isinstance(response, C_STORE) or response.MessageIDBeingRespondedTo != message_id:
        association.abort()
        raise SendFailed(f"unexpected response to the C-STORE of {meta.sop_instance_uid}")
    status: Dataset = association._check_received_status(response)
    return status


def pause_reactor(association: Association) -> None:
    """Stop the association's own thread, so that it does not take responses off the DIMSE queue.

    The thread stays paused, and stops polling, until pynetdicom resumes it:
    its release(), abort() and send_c_store() all do. pynetdicom's own
    send_c_store pauses it the same way for each request, which costs up to
    one polling interval (1 ms) per object.
    """
    association._reactor_checkpoint.clear()
    while not association._is_paused and association.is_alive():
        time.sleep(0.0001)


def _write_request(
    association: Association, path: Path, meta: FileMeta, context_id: int, message_id: int
) -> None:
    transport = association.dul.socket
    sock: socket.socket | None = transport.socket if transport is not None else None
    if sock is None or not association.is_established:
        raise OSError("the association has ended")
    max_length = association.acceptor.maximum_length or UNLIMITED_PDU_BYTES

    command = ul.encode_command(
        [
            (ul.AFFECTED_SOP_CLASS_UID, meta.sop_class_uid),
            (ul.COMMAND_FIELD, ul.C_STORE_RQ),
            (ul.MESSAGE_ID, message_id),
            (ul.PRIORITY, PRIORITY_MEDIUM),
            (ul.COMMAND_DATA_SET_TYPE, DATA_SET_PRESENT),
            (ul.AFFECTED_SOP_INSTANCE_UID, meta.sop_instance_uid),
        ]
    )
    previous_timeout = sock.gettimeout()
    # A destination that stops reading must not hold this thread for ever.
    sock.settimeout(association.dimse_timeout)
    try:
        sock.sendall(ul.encode_command_pdus(context_id, command, max_length))
        _write_data_set(association, sock, path, meta.dataset_start, context_id, max_length)
    finally:
        sock.settimeout(previous_timeout)


def _write_data_set(
    association: Association,
    sock: socket.socket,
    path: Path,
    start: int,
    context_id: int,
    max_length: int,
) -> None:
    """Send the file from `start` on as data set fragments, one PDV per PDU."""
    headers = ul.PDU_HEADER_LENGTH + ul.PDV_HEADER.size
    room = max_length - ul.PDV_HEADER.size
    buffer = bytearray(headers + room)
    view = memoryview(buffer)
    with open(path, "rb") as reader:
        remaining = os.fstat(reader.fileno()).st_size - start
        reader.seek(start)
        while True:
            size = min(room, remaining)
            _read_exact(reader, view[headers : headers + size])
            remaining -= size
            control = ul.LAST_FRAGMENT if remaining == 0 else 0
            ul.pack_data_headers(buffer, context_id, size, control)
            if not association.is_established:
                raise OSError("the association ended while sending")
            sock.sendall(view[: headers + size])
            if remaining == 0:
                return


def _read_exact(reader: BufferedReader, view: memoryview) -> None:
    while view:
        count = reader.readinto(view)
        if not count:
            raise OSError("the file is shorter than its size")
        view = view[count:]
