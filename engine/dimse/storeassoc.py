"""Storage associations served on a plain blocking socket, without pynetdicom.

A source that serves a C-MOVE opens an association that proposes storage SOP
classes only, and sends every object of the study over it. pynetdicom spends
a state machine step, a queue hand-over and a polling wake-up on each PDU,
which made the engine's retrieve about half as fast as Orthanc's own C-MOVE.
Here one thread reads each PDU header, then copies the data of each PDV
straight into the object, in memory or in a temporary file.

The Storage SCP's server looks at each A-ASSOCIATE-RQ before pynetdicom reads
it (see StorageSCP._divert). An association whose contexts are all storage or
Verification is served here, and any other one (the federated Q/R SCP's
C-FIND, C-MOVE and C-GET) by pynetdicom as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.dsutils import create_file_meta
from pynetdicom.sop_class import Verification

from engine.dimse import upperlayer as ul
from engine.dimse.status import Status

logger = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = frozenset(
    str(context.abstract_syntax) for context in AllStoragePresentationContexts
)
SERVED_SOP_CLASSES = STORAGE_SOP_CLASSES | {str(Verification)}
TRANSFER_SYNTAX_ORDER = tuple(str(uid) for uid in ALL_TRANSFER_SYNTAXES)

# The elements a C-STORE-RQ must carry (PS3.7 table 9.3-1).
STORE_REQUIRED_ELEMENTS = {
    "Affected SOP Class UID": ul.AFFECTED_SOP_CLASS_UID,
    "Message ID": ul.MESSAGE_ID,
    "Affected SOP Instance UID": ul.AFFECTED_SOP_INSTANCE_UID,
}
# Status 0211: unrecognized operation (PS3.7 section C.4).
UNRECOGNIZED_OPERATION = 0x0211
# Objects up to this size are received into memory, larger ones into a temporary
# file. At most one such object per association is in memory at a time.
MEMORY_OBJECT_BYTES = 4 * 1024 * 1024
# Data of a PDV is read in pieces of at most this size.
READ_CHUNK_BYTES = 1024 * 1024
# Command sets take a few hundred bytes, and A-RELEASE-RQ and A-ABORT take 4.
MAX_COMMAND_BYTES = 65536
MAX_CONTROL_PDU_BYTES = 64
# The largest A-ASSOCIATE-RQ read ahead of pynetdicom: 128 contexts, each with
# a few transfer syntaxes, stay below 64 KB.
MAX_REQUEST_BYTES = 65536


@dataclasses.dataclass(frozen=True)
class StoreRequest:
    """One C-STORE-RQ, its data set written as a DICOM file to memory (data) or to path."""

    path: Path | None
    data: bytes | None
    calling_ae_title: str
    sop_class_uid: str
    sop_instance_uid: str
    move_originator_ae_title: str
    move_originator_message_id: int | None


@dataclasses.dataclass(frozen=True)
class Settings:
    max_pdu_length: int
    implementation_class_uid: str
    implementation_version_name: str
    # Seconds a connection may stay silent before it is aborted.
    network_timeout: float


def serves_only_storage(request: ul.AssociateRequest) -> bool:
    """Return whether every proposed context is a storage SOP class or Verification."""
    return bool(request.contexts) and all(
        context.abstract_syntax in SERVED_SOP_CLASSES for context in request.contexts
    )


def negotiate(request: ul.AssociateRequest) -> list[ul.ContextResult]:
    """Accept each served context with a transfer syntax chosen as pynetdicom 3.0 chooses it.

    That is the first of pynetdicom's ALL_TRANSFER_SYNTAXES (uncompressed
    ones first) that the requestor proposes, whatever the requestor's order.
    A rejected context repeats the first proposed syntax, as pynetdicom does.
    """
    results = []
    for context in request.contexts:
        proposed = context.transfer_syntaxes
        served = context.abstract_syntax in SERVED_SOP_CLASSES
        chosen = next((ts for ts in TRANSFER_SYNTAX_ORDER if ts in proposed), None)
        if served and chosen is not None:
            results.append(ul.ContextResult(context.context_id, ul.CONTEXT_ACCEPTED, chosen))
            continue
        if served:
            result = ul.CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED
        else:
            result = ul.CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED
        results.append(
            ul.ContextResult(context.context_id, result, proposed[0] if proposed else "")
        )
    return results


def peek_request(sock: socket.socket, timeout: float) -> ul.AssociateRequest | None:
    """Read the A-ASSOCIATE-RQ at the head of `sock` without consuming it.

    Return None when the connection does not start with a well-formed request
    within `timeout` seconds. pynetdicom then reads the request and responds.
    """
    deadline = time.monotonic() + timeout
    needed = ul.PDU_HEADER_LENGTH
    data = b""
    try:
        previous_timeout = sock.gettimeout()
        sock.settimeout(timeout)
    except OSError:
        return None
    try:
        while True:
            data = sock.recv(needed, socket.MSG_PEEK)
            if not data:
                return None
            if len(data) >= ul.PDU_HEADER_LENGTH:
                pdu_type, length = ul.pdu_header(data[: ul.PDU_HEADER_LENGTH])
                if pdu_type != ul.ASSOCIATE_RQ or length > MAX_REQUEST_BYTES:
                    return None
                needed = ul.PDU_HEADER_LENGTH + length
                if len(data) >= needed:
                    break
            if time.monotonic() > deadline:
                return None
            # The rest of the request is still on its way.
            time.sleep(0.002)
        return ul.parse_associate_request(data[ul.PDU_HEADER_LENGTH : needed])
    except (OSError, ValueError, ul.ProtocolError):
        # ValueError: a TLS socket, which cannot peek.
        return None
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous_timeout)


class StorageAssociation:
    """One accepted storage association, served in the thread that calls serve()."""

    def __init__(
        self,
        sock: socket.socket,
        address: tuple[str, int],
        request: ul.AssociateRequest,
        settings: Settings,
        store: Callable[[StoreRequest], tuple[int, str]],
    ) -> None:
        self.sock = sock
        self.address = address
        self.request = request
        self.settings = settings
        self.store = store
        self.pdus = ul.PDUSocket(sock)
        self.accepted: dict[int, ul.ContextResult] = {}
        self._aborted = threading.Event()
        # The command set being received, and the object being written.
        self._command = bytearray()
        self._data_file: _DataFile | None = None
        # Reused for the data of every PDV.
        self._buffer = bytearray()

    @property
    def peer(self) -> str:
        return f"{self.request.calling_ae_title} ({self.address[0]})"

    def accept(self) -> None:
        """Consume the peeked request and send the A-ASSOCIATE-AC."""
        self._consume_request()
        results = negotiate(self.request)
        self.accepted = {r.context_id: r for r in results if r.result == ul.CONTEXT_ACCEPTED}
        self.pdus.send(
            ul.encode_associate_accept(
                self.request,
                results,
                self.settings.max_pdu_length,
                self.settings.implementation_class_uid,
                self.settings.implementation_version_name,
            )
        )

    def reject(self, result: int, source: int, reason: int) -> None:
        """Consume the peeked request, send an A-ASSOCIATE-RJ and close the connection."""
        logger.warning("rejected association from %s: reason %d", self.peer, reason)
        try:
            self.sock.settimeout(self.settings.network_timeout)
            self._consume_request()
            self.pdus.send(ul.encode_associate_reject(result, source, reason))
        except OSError as error:
            logger.warning("rejecting association from %s failed: %s", self.peer, error)
        finally:
            self.sock.close()

    def _consume_request(self) -> None:
        """Read the A-ASSOCIATE-RQ that peek_request left on the socket."""
        _, length = self.pdus.read_header()
        self.pdus.read_bytes(length)

    def abort(self) -> None:
        """End the association from another thread (the engine stops).

        The A-ABORT is sent only when it fits in the socket buffer at once and
        no PDU is being sent, so a peer that does not read cannot delay the stop.
        """
        self._aborted.set()
        if self.pdus.lock.acquire(blocking=False):
            try:
                with contextlib.suppress(OSError):
                    self.sock.send(ul.encode_abort(ul.ABORT_SOURCE_USER), socket.MSG_DONTWAIT)
            finally:
                self.pdus.lock.release()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def serve(self) -> None:
        """Receive PDUs until the peer releases or aborts, or the connection ends."""
        self.sock.settimeout(self.settings.network_timeout)
        try:
            self.accept()
            while self._next_pdu():
                pass
        except ul.ProtocolError as error:
            logger.warning("aborting association from %s: %s", self.peer, error)
            self._send_abort(error.reason)
        except TimeoutError:
            logger.warning(
                "aborting association from %s: silent for %ss",
                self.peer,
                self.settings.network_timeout,
            )
            self._send_abort(ul.ABORT_REASON_NOT_SPECIFIED)
        except (ConnectionError, OSError) as error:
            if not self._aborted.is_set():
                logger.warning("association from %s ended: %s", self.peer, error)
        except Exception:
            logger.exception("aborting association from %s: internal error", self.peer)
            self._send_abort(ul.ABORT_REASON_NOT_SPECIFIED)
        finally:
            self._discard_data()
            self.sock.close()

    def _send_abort(self, reason: int) -> None:
        with contextlib.suppress(OSError):
            self.pdus.send(ul.encode_abort(ul.ABORT_SOURCE_PROVIDER, reason))

    def _next_pdu(self) -> bool:
        """Handle one PDU; return False when the association has ended."""
        pdu_type, length = self.pdus.read_header()
        if pdu_type == ul.P_DATA_TF:
            self._receive_data(length)
            return True
        if pdu_type in (ul.RELEASE_RQ, ul.ABORT) and length > MAX_CONTROL_PDU_BYTES:
            raise ul.ProtocolError(f"PDU of type 0x{pdu_type:02X} has a length of {length}")
        if pdu_type == ul.RELEASE_RQ:
            self.pdus.read_bytes(length)
            if self._data_file is not None or self._command:
                logger.warning("%s released the association in the middle of a message", self.peer)
            self.pdus.send(ul.encode_release_response())
            return False
        if pdu_type == ul.ABORT:
            self.pdus.read_bytes(length)
            if self._data_file is not None:
                logger.warning("%s aborted the association while sending an object", self.peer)
            return False
        raise ul.ProtocolError(
            f"unexpected PDU of type 0x{pdu_type:02X} on an established association",
            ul.ABORT_REASON_UNEXPECTED_PDU,
        )

    def _receive_data(self, length: int) -> None:
        """Read the PDVs of one P-DATA-TF of `length` bytes."""
        limit = self.settings.max_pdu_length
        if limit and length > limit:
            raise ul.ProtocolError(f"P-DATA-TF of {length} bytes exceeds the maximum of {limit}")
        header = bytearray(ul.PDV_HEADER.size)
        remaining = length
        while remaining:
            if remaining < ul.PDV_HEADER.size:
                raise ul.ProtocolError("truncated PDV item")
            self.pdus.read_exact(memoryview(header))
            item_length, context_id, control = ul.PDV_HEADER.unpack(header)
            data_length = item_length - 2
            if data_length < 0 or item_length + 4 > remaining:
                raise ul.ProtocolError(f"PDV item length {item_length} does not fit its PDU")
            remaining -= item_length + 4
            if context_id not in self.accepted:
                raise ul.ProtocolError(f"PDV on presentation context {context_id}, not accepted")
            if control & ul.COMMAND_FRAGMENT:
                if len(self._command) + data_length > MAX_COMMAND_BYTES:
                    raise ul.ProtocolError(f"command set longer than {MAX_COMMAND_BYTES} bytes")
                self._command += self.pdus.read_bytes(data_length)
                if control & ul.LAST_FRAGMENT:
                    self._on_command(context_id)
            else:
                self._on_data(context_id, data_length, bool(control & ul.LAST_FRAGMENT))

    def _on_command(self, context_id: int) -> None:
        if self._data_file is not None:
            raise ul.ProtocolError("command set received before the last data set fragment")
        command = ul.decode_command(bytes(self._command))
        self._command.clear()
        field = command.command_field
        if field == ul.C_STORE_RQ:
            missing = [
                name
                for name, element in STORE_REQUIRED_ELEMENTS.items()
                if not command.has(element)
            ]
            if missing:
                raise ul.ProtocolError(f"C-STORE-RQ without {', '.join(missing)}")
        if field == ul.C_STORE_RQ and command.has_data_set:
            self._data_file = _DataFile.create(
                context_id, command, self.accepted[context_id].transfer_syntax
            )
        elif field == ul.C_ECHO_RQ:
            self._respond(context_id, command, ul.C_ECHO_RQ, Status.SUCCESS, "")
        elif field is not None and command.has_data_set:
            # Its data set is read and dropped before the response goes out.
            self._data_file = _DataFile.discard(context_id, command)
        else:
            self._respond(
                context_id, command, field or 0, UNRECOGNIZED_OPERATION, "operation not supported"
            )

    def _on_data(self, context_id: int, length: int, last: bool) -> None:
        data_file = self._data_file
        if data_file is None:
            raise ul.ProtocolError("data set fragment without a command set before it")
        if context_id != data_file.context_id:
            raise ul.ProtocolError(
                f"data set on context {context_id}, its command on {data_file.context_id}"
            )
        self._read_data(data_file, length)
        if last:
            self._data_file = None
            self._complete(context_id, data_file)

    def _read_data(self, data_file: _DataFile, length: int) -> None:
        """Copy `length` bytes of data set into the object being received."""
        # Read in pieces, so that memory stays bounded whatever PDU length the peer uses.
        remaining = length
        while remaining:
            size = min(remaining, READ_CHUNK_BYTES)
            if len(self._buffer) < size:
                self._buffer = bytearray(size)
            view = memoryview(self._buffer)[:size]
            self.pdus.read_exact(view)
            try:
                data_file.write(view)
            except OSError as error:
                # The rest of the object is read and dropped, and the failure is the response.
                logger.error(
                    "object %s from %s not received: %s",
                    data_file.command.text(ul.AFFECTED_SOP_INSTANCE_UID),
                    self.peer,
                    error,
                )
                data_file.fail()
            remaining -= size

    def _complete(self, context_id: int, data_file: _DataFile) -> None:
        """Store the object whose last fragment has arrived, and send the C-STORE-RSP."""
        command = data_file.command
        field = command.command_field or 0
        if data_file.discarded:
            self._respond(
                context_id, command, field, UNRECOGNIZED_OPERATION, "operation not supported"
            )
            return
        if data_file.failed:
            self._respond(
                context_id, command, field, Status.OUT_OF_RESOURCES, "object could not be received"
            )
            return
        data_file.close()
        try:
            status, comment = self.store(
                StoreRequest(
                    path=data_file.path,
                    data=data_file.data,
                    calling_ae_title=self.request.calling_ae_title,
                    sop_class_uid=command.text(ul.AFFECTED_SOP_CLASS_UID),
                    sop_instance_uid=command.text(ul.AFFECTED_SOP_INSTANCE_UID),
                    move_originator_ae_title=command.text(ul.MOVE_ORIGINATOR_AE_TITLE),
                    move_originator_message_id=command.number(ul.MOVE_ORIGINATOR_MESSAGE_ID),
                )
            )
        finally:
            data_file.remove()
        self._respond(context_id, command, field, status, comment)

    def _respond(
        self, context_id: int, command: ul.Command, field: int, status: int, comment: str
    ) -> None:
        elements: list[tuple[int, int | str]] = [
            (ul.AFFECTED_SOP_CLASS_UID, command.text(ul.AFFECTED_SOP_CLASS_UID)),
            (ul.COMMAND_FIELD, field | ul.RESPONSE_BIT),
            (ul.MESSAGE_ID_BEING_RESPONDED_TO, command.number(ul.MESSAGE_ID) or 0),
            (ul.COMMAND_DATA_SET_TYPE, ul.NO_DATA_SET),
            (ul.STATUS, status),
        ]
        if comment:
            # Error Comment is LO: at most 64 characters.
            elements.append((ul.ERROR_COMMENT, comment[:64]))
        instance = command.text(ul.AFFECTED_SOP_INSTANCE_UID)
        if instance:
            elements.append((ul.AFFECTED_SOP_INSTANCE_UID, instance))
        self.pdus.send(
            ul.encode_command_pdus(
                context_id, ul.encode_command(elements), self.request.max_pdu_length
            )
        )

    def _discard_data(self) -> None:
        if self._data_file is not None:
            self._data_file.remove()
            self._data_file = None


class _DataFile:
    """The data set of one C-STORE-RQ, written as a DICOM file as it arrives.

    The file stays in memory up to MEMORY_OBJECT_BYTES, and moves to a
    temporary file when it grows past that. A discarded data set (of a request
    the engine does not serve) is read and dropped.
    """

    def __init__(self, context_id: int, command: ul.Command, discarded: bool) -> None:
        self.context_id = context_id
        self.command = command
        self.discarded = discarded
        self._memory: bytearray | None = None if discarded else bytearray()
        self._fd: int | None = None
        self.path: Path | None = None
        # Writing it failed (a full disk); the rest is read and dropped.
        self.failed = False

    @classmethod
    def create(cls, context_id: int, command: ul.Command, transfer_syntax: str) -> _DataFile:
        meta = DicomBytesIO()
        meta.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(
            meta,
            create_file_meta(
                sop_class_uid=UID(command.text(ul.AFFECTED_SOP_CLASS_UID)),
                sop_instance_uid=UID(command.text(ul.AFFECTED_SOP_INSTANCE_UID)),
                transfer_syntax=UID(transfer_syntax),
            ),
        )
        data_file = cls(context_id, command, discarded=False)
        data_file.write(memoryview(meta.getvalue()))
        return data_file

    @classmethod
    def discard(cls, context_id: int, command: ul.Command) -> _DataFile:
        return cls(context_id, command, discarded=True)

    @property
    def data(self) -> bytes | None:
        """The whole file when it stayed in memory."""
        return bytes(self._memory) if self._memory is not None else None

    def write(self, view: memoryview) -> None:
        if self._memory is not None:
            if len(self._memory) + len(view) <= MEMORY_OBJECT_BYTES:
                self._memory += view
                return
            self._move_to_disk()
        if self._fd is None:
            return
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _move_to_disk(self) -> None:
        assert self._memory is not None
        fd, name = tempfile.mkstemp(suffix=".dcm")
        self._fd, self.path = fd, Path(name)
        memory, self._memory = memoryview(self._memory), None
        self.write(memory)

    def fail(self) -> None:
        self.failed = True
        self.remove()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Drop what was received, in memory or on disk; later writes are dropped too."""
        self._memory = None
        self.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
