"""C-STORE requests written straight to the socket of a pynetdicom association.

pynetdicom still opens, releases and aborts the association and decodes the
response. Only the request's PDUs bypass its DIMSE and DUL layers, which turn
every PDU into a primitive that the DUL thread takes from a queue it polls
each millisecond. Orthanc's default maximum PDU is 16 KB, so a 500 KB object
takes 33 PDUs. Here each PDU is one read from the file and one socket write.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from contextlib import AbstractContextManager
from io import BufferedReader
from pathlib import Path
from typing import Any

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
# The data put in one PDU is capped at 1 MB whatever the peer accepts, so memory stays bounded.
MAX_PDU_DATA_BYTES = 1 << 20


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
        try:
            _write_request(association, path, meta, context_id, message_id)
        except OSError as error:
            association.abort()
            raise SendFailed(f"sending object {meta.sop_instance_uid} failed: {error}") from error
        _, response = association.dimse.get_msg(block=True)
    finally:
        # Once resumed, the thread sends the A-RELEASE-RP a peer requests, and handles its A-ABORT.
        association._reactor_checkpoint.set()

    if response is None:
        association._handle_no_response()
        return Dataset()
    if not isinstance(response, C_STORE) or response.MessageIDBeingRespondedTo != message_id:
        association.abort()
        raise SendFailed(f"unexpected response to the C-STORE of {meta.sop_instance_uid}")
    status: Dataset = association._check_received_status(response)
    return status


def pause_reactor(association: Association) -> None:
    """Stop the association's own thread, so that it does not take the response off the queue.

    pynetdicom's own send_c_store waits for `_is_paused` alone. But its thread
    sets that flag on every turn of its loop, also when it then goes on. A
    response it takes off the queue in that turn is lost, and the request waits
    for the whole DIMSE timeout. So this wait ends only when the thread is
    blocked on the cleared checkpoint.
    """
    checkpoint = association._reactor_checkpoint
    checkpoint.clear()
    while association.is_alive() and not (association._is_paused and _waited_on(checkpoint)):
        time.sleep(0.0001)


def _waited_on(event: threading.Event) -> bool:
    """Tell whether a thread is blocked in event.wait() (CPython's Condition keeps waiters)."""
    waiters = getattr(getattr(event, "_cond", None), "_waiters", None)
    # Without that detail, the flag alone decides, as in pynetdicom.
    return bool(waiters) if waiters is not None else True


def _write_request(
    association: Association, path: Path, meta: FileMeta, context_id: int, message_id: int
) -> None:
    transport = association.dul.socket
    sock: socket.socket | None = transport.socket if transport is not None else None
    if transport is None or sock is None or not association.is_established:
        raise OSError("the association has ended")
    max_length = association.acceptor.maximum_length or UNLIMITED_PDU_BYTES
    if max_length <= ul.PDV_HEADER.size:
        raise OSError(
            f"the peer's maximum PDU length of {max_length} bytes leaves no room for data"
        )
    # Held for each whole PDU, so that an A-ABORT the DUL thread sends goes between PDUs.
    lock = getattr(transport, "write_lock", None) or contextlib.nullcontext()

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
        with lock:
            sock.sendall(ul.encode_command_pdus(context_id, command, max_length))
        _write_data_set(association, sock, lock, path, meta.dataset_start, context_id, max_length)
    finally:
        sock.settimeout(previous_timeout)


def _write_data_set(
    association: Association,
    sock: socket.socket,
    lock: AbstractContextManager[Any],
    path: Path,
    start: int,
    context_id: int,
    max_length: int,
) -> None:
    """Send the file from `start` on as data set fragments, one PDV per PDU."""
    headers = ul.PDU_HEADER_LENGTH + ul.PDV_HEADER.size
    with open(path, "rb") as reader:
        remaining = os.fstat(reader.fileno()).st_size - start
        reader.seek(start)
        # PS3.8 bounds a PDU's length from above only, so smaller PDUs are valid.
        room = min(max_length - ul.PDV_HEADER.size, MAX_PDU_DATA_BYTES, max(remaining, 1))
        buffer = bytearray(headers + room)
        view = memoryview(buffer)
        while True:
            size = min(room, remaining)
            _read_exact(reader, view[headers : headers + size])
            remaining -= size
            control = ul.LAST_FRAGMENT if remaining == 0 else 0
            ul.pack_data_headers(buffer, context_id, size, control)
            if not association.is_established:
                raise OSError("the association ended while sending")
            with lock:
                sock.sendall(view[: headers + size])
            if remaining == 0:
                return


def _read_exact(reader: BufferedReader, view: memoryview) -> None:
    while view:
        count = reader.readinto(view)
        if not count:
            raise OSError("the file is shorter than its size")
        view = view[count:]
