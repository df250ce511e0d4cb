"""Reading the layout of an encoded DICOM file without decoding it.

scan_head finds where each top-level element of the dataset starts and ends,
up to the end of group 0020, in little endian files (explicit or implicit VR).
It never converts values, so it costs a fraction of a pydicom read. Anything it
cannot lay out (big endian, deflate, a truncated or odd encoding) returns None,
and the caller falls back to pydicom.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

PREAMBLE_BYTES = 128
# Enough for the head of most objects up to group 0020; a bigger head is read in
# doubling steps up to MAX_HEAD_BYTES.
HEAD_BYTES = 16 * 1024
MAX_HEAD_BYTES = 4 * 1024 * 1024
# Enough for the file meta information of almost every file.
META_BYTES = 4096
UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
LAST_SCANNED_GROUP = 0x0020

_TAG = struct.Struct("<HH")
_UINT16 = struct.Struct("<H")
_UINT32 = struct.Struct("<I")
T = TypeVar("T")


class Truncated(Exception):
    """The buffer ends inside an element."""


@dataclasses.dataclass(frozen=True)
class Span:
    """One top-level element: its tag and where its encoding starts and ends."""

    tag: int
    start: int
    value_start: int
    end: int

    @property
    def group(self) -> int:
        return self.tag >> 16


@dataclasses.dataclass(frozen=True)
class Head:
    """The encoded head of a DICOM file and the layout of its first groups.

    spans cover every top-level element from the start of the dataset up to
    group 0020 included; `rest` is the file offset where the first element
    after them starts (all of it is copied unchanged by a splice).
    """

    data: bytes
    meta_end: int
    transfer_syntax: UID
    implicit_vr: bool
    spans: tuple[Span, ...]
    rest: int

    def span(self, tag: int) -> Span | None:
        for span in self.spans:
            if span.tag == tag:
                return span
        return None

    def text(self, tag: int) -> str:
        """Return a short text value (UI, LO, CS ...) as ASCII, without padding."""
        span = self.span(tag)
        if span is None:
            return ""
        value = self.data[span.value_start : span.end]
        return value.decode("ascii", errors="replace").rstrip("\x00 ").strip()


def scan_head(source: Path | bytes) -> Head | None:
    """Lay out the head of a little endian DICOM file, or of a whole one in memory.

    Return None when it cannot. For a file in memory, Head.data is all of it.
    """
    if isinstance(source, bytes):
        try:
            return _scan(source, whole_file=True)
        except (Truncated, ValueError, struct.error):
            return None
    return _parse_start(source, HEAD_BYTES, _scan)


@dataclasses.dataclass(frozen=True)
class FileMeta:
    """The file meta information of a DICOM file, and where its dataset starts."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    dataset_start: int


def read_file_meta(path: Path) -> FileMeta | None:
    """Read the file meta information without pydicom; None when it cannot be laid out."""
    return _parse_start(path, META_BYTES, lambda data, _: _file_meta(data))


def _parse_start(
    path: Path, first_bytes: int, parse: Callable[[bytes, bool], T | None]
) -> T | None:
    """Return parse(data, whole_file) of the file's first bytes; None when it cannot.

    While parse raises Truncated, twice as many bytes are read, up to
    MAX_HEAD_BYTES. whole_file is True when data ends where the file does.
    """
    with open(path, "rb") as reader:
        data = reader.read(first_bytes)
        whole_file = len(data) < first_bytes
        while True:
            try:
                return parse(data, whole_file)
            except Truncated:
                if whole_file or len(data) >= MAX_HEAD_BYTES:
                    return None
                more = reader.read(len(data))
                whole_file = len(more) < len(data)
                data += more
            except (ValueError, struct.error):
                return None


def _file_meta(data: bytes) -> FileMeta | None:
    if data[PREAMBLE_BYTES : PREAMBLE_BYTES + 4] != b"DICM":
        return None
    end, values = _meta_values(data, PREAMBLE_BYTES + 4)
    sop_class, instance, syntax = (values.get(element, "") for element in (2, 3, 0x10))
    if not (sop_class and instance and syntax):
        return None
    return FileMeta(sop_class, instance, UID(syntax), end)


def _scan(data: bytes, whole_file: bool) -> Head | None:
    if data[PREAMBLE_BYTES : PREAMBLE_BYTES + 4] != b"DICM":
        return None
    meta_end, transfer_syntax = _read_meta(data, PREAMBLE_BYTES + 4)
    if transfer_syntax == ImplicitVRLittleEndian:
        implicit = True
    elif transfer_syntax == ExplicitVRLittleEndian or transfer_syntax.is_encapsulated:
        implicit = False
    else:
        # Big endian and deflated datasets are left to pydicom.
        return None

    spans: list[Span] = []
    position = meta_end
    while True:
        if position == len(data) and whole_file:
            break
        if position + 8 > len(data):
            raise Truncated
        group, _ = _TAG.unpack_from(data, position)
        if group > LAST_SCANNED_GROUP:
            break
        span = _element(data, position, implicit)
        spans.append(span)
        position = span.end
    return Head(data, meta_end, UID(transfer_syntax), implicit, tuple(spans), position)


def _read_meta(data: bytes, position: int) -> tuple[int, UID]:
    """Return where the file meta information ends, and its Transfer Syntax UID."""
    end, values = _meta_values(data, position)
    transfer_syntax = values.get(0x0010, "")
    if not transfer_syntax:
        raise ValueError("no Transfer Syntax UID in the file meta information")
    return end, UID(transfer_syntax)


def _meta_values(data: bytes, position: int) -> tuple[int, dict[int, str]]:
    """Return where group 0002 ends, and its SOP class, instance and transfer syntax UIDs.

    The UIDs are keyed by element number: 0002, 0003 and 0010.
    """
    values: dict[int, str] = {}
    while True:
        if position + 8 > len(data):
            raise Truncated
        group, element = _TAG.unpack_from(data, position)
        if group != 0x0002:
            break
        span = _element(data, position, implicit=False)
        if element in (0x0002, 0x0003, 0x0010):
            values[element] = data[span.value_start : span.end].decode("ascii").rstrip("\x00 ")
        position = span.end
    return position, values


def _element(data: bytes, position: int, implicit: bool) -> Span:
    """Return the span of the element starting at `position`."""
    if position + 8 > len(data):
        raise Truncated
    group, element = _TAG.unpack_from(data, position)
    tag = group << 16 | element
    vr = b""
    if implicit or group == 0xFFFE:
        (length,) = _UINT32.unpack_from(data, position + 4)
        value_start = position + 8
    else:
        vr = data[position + 4 : position + 6]
        if vr in LONG_VRS:
            if position + 12 > len(data):
                raise Truncated
            (length,) = _UINT32.unpack_from(data, position + 8)
            value_start = position + 12
        elif vr.isalpha() and vr.isupper():
            (length,) = _UINT16.unpack_from(data, position + 6)
            value_start = position + 8
        else:
            raise ValueError(f"invalid VR {vr!r} in ({group:04X},{element:04X})")

    if length == UNDEFINED_LENGTH:
        # A sequence, or UN that holds one: its items are encoded in implicit VR.
        end = _skip_items(data, value_start, implicit or vr == b"UN")
    else:
        end = value_start + length
        if end > len(data):
            raise Truncated
    return Span(tag, position, value_start, end)


def _skip_items(data: bytes, position: int, implicit: bool) -> int:
    """Return the end of an undefined length value: its items and the sequence delimiter."""
    while True:
        if position + 8 > len(data):
            raise Truncated
        group, element = _TAG.unpack_from(data, position)
        tag = group << 16 | element
        (length,) = _UINT32.unpack_from(data, position + 4)
        if tag == SEQUENCE_DELIMITER:
            return position + 8
        if tag != ITEM:
            raise ValueError(f"unexpected ({group:04X},{element:04X}) in a sequence")
        position += 8
        if length != UNDEFINED_LENGTH:
            position += length
            continue
        while True:
            if position + 8 > len(data):
                raise Truncated
            group, element = _TAG.unpack_from(data, position)
            if group << 16 | element == ITEM_DELIMITER:
                position += 8
                break
            position = _element(data, position, implicit).end
