"""DICOM Upper Layer PDUs and DIMSE command sets, encoded and decoded without pynetdicom.

engine/dimse/storeassoc.py serves the engine's storage associations (C-STORE
and C-ECHO only) on a plain blocking socket with these formats. PDUs are those
of DICOM PS3.8 section 9.3. Command sets are those of PS3.7 section 9.3 and
annex E (Implicit VR Little Endian, group 0000).
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
from collections.abc import Iterator

# PDU types (PS3.8 table 9-11).
ASSOCIATE_RQ = 0x01
ASSOCIATE_AC = 0x02
ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
RELEASE_RQ = 0x05
RELEASE_RP = 0x06
ABORT = 0x07

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
PROTOCOL_VERSION = 1

# Presentation context results (PS3.8 table 9-18).
CONTEXT_ACCEPTED = 0
CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# A-ASSOCIATE-RJ result, source and reason (PS3.8 table 9-21).
REJECTED_PERMANENT = 1
REJECTED_TRANSIENT = 2
SOURCE_SERVICE_USER = 1
SOURCE_PRESENTATION = 3
REASON_APPLICATION_CONTEXT_NOT_SUPPORTED = 2
REASON_CALLED_AE_TITLE_NOT_RECOGNIZED = 7
REASON_LOCAL_LIMIT_EXCEEDED = 2

# A-ABORT source and reason (PS3.8 table 9-26).
ABORT_SOURCE_USER = 0
ABORT_SOURCE_PROVIDER = 2
ABORT_REASON_NOT_SPECIFIED = 0
ABORT_REASON_UNRECOGNIZED_PDU = 1
ABORT_REASON_UNEXPECTED_PDU = 2
ABORT_REASON_INVALID_PARAMETER = 6

# Message control header bits of a PDV (PS3.8 annex E.2).
COMMAND_FRAGMENT = 0x01
LAST_FRAGMENT = 0x02

_PDU_HEADER = struct.Struct(">BxI")
_ITEM_HEADER = struct.Struct(">BxH")
PDU_HEADER_LENGTH = _PDU_HEADER.size
PDV_HEADER = struct.Struct(">IBB")


class ProtocolError(Exception):
    """A PDU or command set that breaks the standard, so the association is aborted."""

    def __init__(self, message: str, reason: int = ABORT_REASON_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AssociateRequest:
    called_ae_title: str
    calling_ae_title: str
    application_context: str
    contexts: tuple[ProposedContext, ...]
    # The maximum length of a P-DATA-TF PDU the requestor receives (0: no limit).
    max_pdu_length: int
    implementation_class_uid: str
    implementation_version_name: str


@dataclasses.dataclass(frozen=True)
class ContextResult:
    context_id: int
    result: int
    transfer_syntax: str


def pdu_header(data: bytes) -> tuple[int, int]:
    """Return the type and the length of the PDU whose first 6 bytes are `data`."""
    pdu_type, length = _PDU_HEADER.unpack(data)
    return pdu_type, length


def _text(value: bytes) -> str:
    return value.decode("ascii", errors="replace").strip(" \x00")


def _items(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    """Yield the (type, value) pairs of the items between offset and end."""
    while offset < end:
        if end - offset < _ITEM_HEADER.size:
            raise ProtocolError(f"truncated item header at byte {offset}")
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        offset += _ITEM_HEADER.size
        if offset + length > end:
            raise ProtocolError(f"item of type 0x{item_type:02X} runs past its PDU")
        yield item_type, data[offset : offset + length]
        offset += length


def parse_associate_request(body: bytes) -> AssociateRequest:
    """Decode the variable part of an A-ASSOCIATE-RQ (everything after its PDU header)."""
    if len(body) < 68:
        raise ProtocolError(f"A-ASSOCIATE-RQ of {len(body)} bytes is shorter than 68")
    called = _text(body[4:20])
    calling = _text(body[20:36])
    application_context = ""
    contexts: list[ProposedContext] = []
    max_pdu_length = 0
    implementation_class_uid = ""
    implementation_version_name = ""
    for item_type, value in _items(body, 68, len(body)):
        if item_type == 0x10:
            application_context = _text(value)
        elif item_type == 0x20:
            contexts.append(_proposed_context(value))
        elif item_type == 0x50:
            for sub_type, sub_value in _items(value, 0, len(value)):
                if sub_type == 0x51 and len(sub_value) == 4:
                    max_pdu_length = struct.unpack(">I", sub_value)[0]
                elif sub_type == 0x52:
                    implementation_class_uid = _text(sub_value)
                elif sub_type == 0x55:
                    implementation_version_name = _text(sub_value)
    return AssociateRequest(
        called,
        calling,
        application_context,
        tuple(contexts),
        max_pdu_length,
        implementation_class_uid,
        implementation_version_name,
    )


def _proposed_context(value: bytes) -> ProposedContext:
    if len(value) < 4:
        raise ProtocolError("truncated presentation context item")
    abstract_syntax = ""
    transfer_syntaxes: list[str] = []
    for sub_type, sub_value in _items(value, 4, len(value)):
        if sub_type == 0x30:
            abstract_syntax = _text(sub_value)
        elif sub_type == 0x40:
            transfer_syntaxes.append(_text(sub_value))
    return ProposedContext(value[0], abstract_syntax, tuple(transfer_syntaxes))


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM_HEADER.pack(item_type, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return _PDU_HEADER.pack(pdu_type, len(body)) + body


def _ae_field(ae_title: str) -> bytes:
    return ae_title.encode("ascii", errors="replace")[:16].ljust(16)


def encode_associate_accept(
    request: AssociateRequest,
    results: list[ContextResult],
    max_pdu_length: int,
    implementation_class_uid: str,
    implementation_version_name: str,
) -> bytes:
    """Encode the A-ASSOCIATE-AC for `request`, with one result per proposed context.

    The called and calling AE titles are sent back as the request gave them,
    as PS3.8 section 9.3.3 requires. The requestor does not test them.
    """
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for result in results:
        transfer_syntax = _item(0x40, result.transfer_syntax.encode())
        items.append(_item(0x21, bytes([result.context_id, 0, result.result, 0]) + transfer_syntax))
    user = [
        _item(0x51, struct.pack(">I", max_pdu_length)),
        _item(0x52, implementation_class_uid.encode()),
        _item(0x55, implementation_version_name.encode()[:16]),
    ]
    items.append(_item(0x50, b"".join(user)))
    fixed = (
        struct.pack(">HH", PROTOCOL_VERSION, 0)
        + _ae_field(request.called_ae_title)
        + _ae_field(request.calling_ae_title)
        + bytes(32)
    )
    return _pdu(ASSOCIATE_AC, fixed + b"".join(items))


def encode_associate_reject(result: int, source: int, reason: int) -> bytes:
    return _pdu(ASSOCIATE_RJ, bytes([0, result, source, reason]))


def encode_abort(source: int = ABORT_SOURCE_PROVIDER, reason: int = 0) -> bytes:
    return _pdu(ABORT, bytes([0, 0, source, reason]))


def encode_release_response() -> bytes:
    return _pdu(RELEASE_RP, bytes(4))


def encode_command_pdus(context_id: int, command: bytes, max_pdu_length: int) -> bytes:
    """Encode P-DATA-TF PDUs carrying a command set, one fragment each.

    max_pdu_length is the peer's maximum length of a PDU it receives (0: no limit).
    """
    room = len(command) if max_pdu_length == 0 else max(1, max_pdu_length - 6)
    pdus = bytearray()
    for start in range(0, len(command), room):
        fragment = command[start : start + room]
        control = COMMAND_FRAGMENT
        if start + room >= len(command):
            control |= LAST_FRAGMENT
        pdv = PDV_HEADER.pack(len(fragment) + 2, context_id, control)
        pdus += _pdu(P_DATA_TF, pdv + fragment)
    return bytes(pdus)


def pack_data_headers(buffer: bytearray, context_id: int, size: int, control: int) -> None:
    """Write the PDU and PDV headers of a P-DATA-TF with one PDV of `size` data bytes.

    The 12 header bytes go at the start of `buffer`, and the data follows them.
    """
    _PDU_HEADER.pack_into(buffer, 0, P_DATA_TF, size + PDV_HEADER.size)
    PDV_HEADER.pack_into(buffer, PDU_HEADER_LENGTH, size + 2, context_id, control)


# Command set elements (PS3.7 section E.1): (element number, value representation).
AFFECTED_SOP_CLASS_UID = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
PRIORITY = 0x0700
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000
MOVE_ORIGINATOR_AE_TITLE = 0x1030
MOVE_ORIGINATOR_MESSAGE_ID = 0x1031

NO_DATA_SET = 0x0101
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
RESPONSE_BIT = 0x8000

_ELEMENT_HEADER = struct.Struct("<HHI")
_US_ELEMENTS = {
    COMMAND_FIELD,
    MESSAGE_ID,
    MESSAGE_ID_BEING_RESPONDED_TO,
    PRIORITY,
    COMMAND_DATA_SET_TYPE,
    STATUS,
    MOVE_ORIGINATOR_MESSAGE_ID,
}
_UID_ELEMENTS = {AFFECTED_SOP_CLASS_UID, AFFECTED_SOP_INSTANCE_UID}


class Command:
    """A decoded command set: element number -> raw value bytes."""

    def __init__(self, elements: dict[int, bytes]) -> None:
        self._elements = elements

    def number(self, element: int) -> int | None:
        value = self._elements.get(element)
        if value is None or len(value) != 2:
            return None
        number: int = struct.unpack("<H", value)[0]
        return number

    def has(self, element: int) -> bool:
        """Return whether the element is present with a value."""
        return bool(self._elements.get(element))

    def text(self, element: int) -> str:
        return _text(self._elements.get(element, b""))

    @property
    def command_field(self) -> int | None:
        return self.number(COMMAND_FIELD)

    @property
    def has_data_set(self) -> bool:
        return self.number(COMMAND_DATA_SET_TYPE) != NO_DATA_SET


def decode_command(data: bytes) -> Command:
    """Decode a command set (Implicit VR Little Endian, group 0000 only)."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if len(data) - offset < _ELEMENT_HEADER.size:
            raise ProtocolError("truncated command set element")
        group, element, length = _ELEMENT_HEADER.unpack_from(data, offset)
        offset += _ELEMENT_HEADER.size
        if group != 0 or offset + length > len(data):
            raise ProtocolError(f"invalid command set element ({group:04X},{element:04X})")
        elements[element] = data[offset : offset + length]
        offset += length
    return Command(elements)


def encode_command(elements: list[tuple[int, int | str]]) -> bytes:
    """Encode a command set with its group length; values are US numbers or text.

    UIDs are padded with NUL and other text with a space to an even length, as
    PS3.5 section 6.2 requires.
    """
    encoded = bytearray()
    for element, value in elements:
        if isinstance(value, int):
            raw = struct.pack("<H", value) if element in _US_ELEMENTS else struct.pack("<I", value)
        else:
            raw = value.encode("ascii", errors="replace")
            if len(raw) % 2:
                raw += b"\x00" if element in _UID_ELEMENTS else b" "
        encoded += _ELEMENT_HEADER.pack(0, element, len(raw)) + raw
    group_length = _ELEMENT_HEADER.pack(0, 0, 4) + struct.pack("<I", len(encoded))
    return group_length + bytes(encoded)


class PDUSocket:
    """Blocking reads and writes of PDUs on a connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._header = bytearray(PDU_HEADER_LENGTH)
        # Held while a PDU is written, so that another thread's A-ABORT goes between PDUs.
        self.lock = threading.Lock()

    def read_exact(self, view: memoryview) -> None:
        """Fill `view` from the socket; raise ConnectionError when the peer closes first."""
        while view:
            received = self.sock.recv_into(view)
            if received == 0:
                raise ConnectionError("the peer closed the connection")
            view = view[received:]

    def read_header(self) -> tuple[int, int]:
        self.read_exact(memoryview(self._header))
        return pdu_header(bytes(self._header))

    def read_bytes(self, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_exact(memoryview(buffer))
        return bytes(buffer)

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)
