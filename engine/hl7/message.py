"""HL7 v2 message parsing: delimiters from MSH, segments, fields, escapes, charsets.

Fields are kept encoded after splitting and unescaped only when read, so an
escaped delimiter inside a value never shifts a field. Fields are looked up by
segment id, never by position in the message, so an extra segment (an EVN in an
ORM, a Z-segment) shifts nothing.
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime as dt
import re
from collections.abc import Iterator, Mapping

from engine.hl7.codes import AckCode, ErrorCode

# HL7 Table 0211 (MSH-18) names, plus common non-standard names seen in the field.
_CHARSETS = {
    "ASCII": "ascii",
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "ISO_IR 192": "utf-8",
    "ISO IR14": "shift_jis",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "CNS 11643-1992": "big5",
    "BIG-5": "big5",
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
    "LATIN1": "iso8859-1",
    "ISO-8859-1": "iso8859-1",
}

_SEGMENT_ID = re.compile(rb"^[A-Z][A-Z0-9]{2}$")


class HL7Error(Exception):
    """A message that cannot be accepted, with what its ACK and ERR segment need.

    ack is AR for a message that is rejected as such (syntax, unsupported type)
    and AE for one that is well formed but cannot be processed.
    """

    def __init__(
        self,
        text: str,
        code: ErrorCode = ErrorCode.SEGMENT_SEQUENCE_ERROR,
        location: tuple[str, int, int] = ("MSH", 1, 0),
        ack: AckCode = AckCode.APPLICATION_REJECT,
        log_text: str | None = None,
    ) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.location = location
        self.ack = ack
        # The text for the log, without field values the sender put where they do not
        # belong (a malformed message may carry a patient's name in any field).
        self.log_text = text if log_text is None else log_text


@dataclasses.dataclass(frozen=True)
class Delimiters:
    """The five HL7 delimiters read from MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent


def codec_for_charset(name: str) -> str | None:
    """Return the Python codec for an MSH-18 value, or None if it is unknown."""
    key = name.strip().upper()
    if key in _CHARSETS:
        return _CHARSETS[key]
    try:
        return codecs.lookup(name.strip()).name
    except LookupError:
        return None


@dataclasses.dataclass(frozen=True)
class CharsetDefaults:
    """The character set assumed when MSH-18 is empty: the sender's, else one default.

    by_sender is keyed by (MSH-3, MSH-4), first components; a facility of ""
    applies to every facility of that application.
    """

    default: str = "UNICODE UTF-8"
    by_sender: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)

    def for_sender(self, application: str, facility: str) -> str:
        return (
            self.by_sender.get((application, facility))
            or self.by_sender.get((application, ""))
            or self.default
        )


@dataclasses.dataclass
class Segment:
    """One segment, split into its encoded fields. fields[0] is the segment id."""

    fields: list[str]

    @property
    def id(self) -> str:
        return self.fields[0]

    def raw_field(self, number: int) -> str:
        """Return field `number` (1-based, as HL7 numbers them) still encoded."""
        index = number - 1 if self.id == "MSH" else number
        if self.id == "MSH" and number == 1:
            return "|"
        if index < len(self.fields):
            return self.fields[index]
        return ""


class Message:
    """A parsed HL7 v2 message with access by segment id and field path."""

    def __init__(self, segments: list[Segment], delimiters: Delimiters, charset: str) -> None:
        self.segments = segments
        self.delimiters = delimiters
        self.charset = charset
        # Segments by id, in message order: fields are read by id many times per message.
        self._by_id: dict[str, list[Segment]] = {}
        # Values already read by get(); the message does not change after parsing.
        self._values: dict[tuple[str, int, int, int, int], str] = {}
        for segment in segments:
            self._by_id.setdefault(segment.id, []).append(segment)

    def segment(self, segment_id: str, occurrence: int = 0) -> Segment | None:
        found = self._by_id.get(segment_id, [])
        return found[occurrence] if occurrence < len(found) else None

    def segments_of(self, segment_id: str) -> Iterator[Segment]:
        return iter(self._by_id.get(segment_id, []))

    def repetitions(self, segment_id: str, field: int) -> list[list[str]]:
        """Return each repetition of a field as its list of unescaped components."""
        segment = self.segment(segment_id)
        if segment is None:
            return []
        raw = segment.raw_field(field)
        if segment_id == "MSH" and field in (1, 2):
            return [[raw]]
        if raw == "":
            return []
        return [
            [self.unescape(component) for component in repetition.split(self.delimiters.component)]
            for repetition in raw.split(self.delimiters.repetition)
        ]

    def get(
        self,
        segment_id: str,
        field: int,
        component: int = 1,
        subcomponent: int = 0,
        repetition: int = 1,
    ) -> str:
        """Return one value, unescaped; components and repetitions are 1-based.

        An HL7 null (`""`) reads as an empty value.
        """
        key = (segment_id, field, component, subcomponent, repetition)
        value = self._values.get(key)
        if value is None:
            value = self._values[key] = self._read(
                segment_id, field, component, subcomponent, repetition
            )
        return value

    def _read(
        self, segment_id: str, field: int, component: int, subcomponent: int, repetition: int
    ) -> str:
        segment = self.segment(segment_id)
        if segment is None:
            return ""
        raw = segment.raw_field(field)
        if segment_id == "MSH" and field in (1, 2):
            return raw
        repetitions = raw.split(self.delimiters.repetition)
        if repetition > len(repetitions):
            return ""
        components = repetitions[repetition - 1].split(self.delimiters.component)
        if component > len(components):
            return ""
        value = components[component - 1]
        if subcomponent:
            parts = value.split(self.delimiters.subcomponent)
            value = parts[subcomponent - 1] if subcomponent <= len(parts) else ""
        value = self.unescape(value)
        return "" if value == '""' else value

    def unescape(self, value: str) -> str:
        if self.delimiters.escape not in value:
            return value
        return _unescape(value, self.delimiters, self.charset)

    @property
    def message_type(self) -> str:
        """Return MSH-9 as `TYPE^TRIGGER`, e.g. `ORM^O01`."""
        code = self.get("MSH", 9, 1)
        trigger = self.get("MSH", 9, 2)
        return f"{code}^{trigger}" if trigger else code

    @property
    def control_id(self) -> str:
        """Return MSH-10 whole: it is an ST field, so a component separator in it is data."""
        msh = self.segment("MSH")
        value = self.unescape(msh.raw_field(10)) if msh is not None else ""
        return "" if value == '""' else value


def split_segments(data: bytes, field_separator: bytes) -> list[bytes]:
    """Split at CR, CRLF, or at an LF that starts a new segment.

    A bare LF that is not followed by a segment id and the field separator is
    part of the field text.
    """
    segments: list[bytes] = []
    # A line break at the very end terminates the last segment.
    data = data.rstrip(b"\r\n")
    for chunk in data.replace(b"\r\n", b"\r").split(b"\r"):
        start = 0
        for index in _segment_starts_after_lf(chunk, field_separator):
            segments.append(chunk[start : index - 1])
            start = index
        segments.append(chunk[start:])
    return [segment for segment in segments if segment.strip(b"\n \t\x00")]


def _segment_starts_after_lf(chunk: bytes, field_separator: bytes) -> Iterator[int]:
    position = chunk.find(b"\n")
    while position != -1:
        start = position + 1
        if _SEGMENT_ID.match(chunk[start : start + 3]) and chunk[start + 3 : start + 4] in (
            field_separator,
            b"",
        ):
            yield start
        position = chunk.find(b"\n", start)


def parse(data: bytes, default_charset: str | CharsetDefaults = "utf-8") -> Message:
    """Parse one HL7 v2 message from bytes.

    default_charset applies when MSH-18 is empty: one name, or defaults per
    sender. Raises HL7Error with an HL7 Table 0357 code and the location of
    the first problem found.
    """
    data = data.lstrip(b"\r\n \t\x00")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    if not data.startswith(b"MSH") or len(data) < 8:
        raise HL7Error(
            "message does not start with an MSH segment", ErrorCode.SEGMENT_SEQUENCE_ERROR
        )

    field_separator = data[3:4]
    delimiters = _read_delimiters(data, field_separator)
    raw_segments = split_segments(data, field_separator)
    charset_name = _raw_msh_field(raw_segments[0], field_separator, 18)
    if isinstance(default_charset, CharsetDefaults):
        component = delimiters.component
        default_charset = default_charset.for_sender(
            _raw_msh_field(raw_segments[0], field_separator, 3).split(component)[0],
            _raw_msh_field(raw_segments[0], field_separator, 4).split(component)[0],
        )
    codec = _codec_for(charset_name, default_charset, delimiters.repetition)

    segments: list[Segment] = []
    for number, raw in enumerate(raw_segments, start=1):
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError as error:
            source = (
                f"MSH-18 '{charset_name}'"
                if charset_name
                else "MSH-18 is empty, so the sender's default character set applies"
            )
            raise HL7Error(
                f"segment {number} cannot be decoded as {codec} ({source}):"
                f" invalid byte at offset {error.start}",
                ErrorCode.DATA_TYPE_ERROR,
                ("MSH", 1, 18),
                AckCode.APPLICATION_ERROR,
                log_text=f"segment {number} cannot be decoded as {codec}: invalid byte at"
                f" offset {error.start}",
            ) from None
        fields = text.split(delimiters.field)
        if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", fields[0]):
            raise HL7Error(
                f"segment {number} has an invalid segment id",
                ErrorCode.SEGMENT_SEQUENCE_ERROR,
                (fields[0][:3], number, 0),
            )
        segments.append(Segment(fields))
    return Message(segments, delimiters, codec)


def _read_delimiters(data: bytes, field_separator: bytes) -> Delimiters:
    end = data.find(field_separator, 4)
    encoding = data[4:end] if end != -1 else b""
    if field_separator in (b"\r", b"\n") or len(encoding) < 2 or not encoding.isascii():
        raise HL7Error(
            "MSH-1 or MSH-2 does not contain valid delimiters",
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
            ("MSH", 1, 2),
        )
    chars = encoding.decode("ascii")
    if not re.fullmatch(r"[!-/:-@\[-`{-~]{2,5}", chars) or field_separator.isalnum():
        raise HL7Error(
            "MSH-2 must hold 2 to 5 delimiter characters",
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
            ("MSH", 1, 2),
        )
    if len(set(chars + field_separator.decode("ascii"))) != len(chars) + 1:
        raise HL7Error("MSH-2 repeats a delimiter", ErrorCode.SEGMENT_SEQUENCE_ERROR, ("MSH", 1, 2))
    return Delimiters(
        field=field_separator.decode("ascii"),
        component=chars[0],
        repetition=chars[1],
        escape=chars[2] if len(chars) > 2 else "\\",
        subcomponent=chars[3] if len(chars) > 3 else "&",
    )


def _raw_msh_field(msh: bytes, field_separator: bytes, number: int) -> str:
    parts = msh.split(field_separator)
    index = number - 1
    if index >= len(parts):
        return ""
    value = parts[index]
    return value.decode("ascii", errors="replace").strip()


def _codec_for(charset_name: str, default_charset: str, repetition: str) -> str:
    if not charset_name:
        return codec_for_charset(default_charset) or "utf-8"
    # MSH-18 may repeat (a default and alternate sets); the first one applies.
    first = charset_name.split(repetition)[0]
    codec = codec_for_charset(first)
    if codec is None:
        raise HL7Error(
            f"unsupported character set in MSH-18: '{first}'",
            ErrorCode.TABLE_VALUE_NOT_FOUND,
            ("MSH", 1, 18),
            AckCode.APPLICATION_ERROR,
            log_text=(
                f"unsupported character set in MSH-18: '{first}'"
                # Spelled like a character set name, so no patient data: safe to log.
                if re.fullmatch(r"[A-Za-z0-9 _/.:-]{1,32}", first)
                else f"unsupported character set in MSH-18 (a value of {len(first)} characters)"
            ),
        )
    return codec


_ESCAPE_NAMES = {
    "F": "field",
    "S": "component",
    "T": "subcomponent",
    "R": "repetition",
    "E": "escape",
}


def _unescape(value: str, delimiters: Delimiters, codec: str) -> str:
    escape = delimiters.escape
    result: list[str] = []
    position = 0
    while position < len(value):
        start = value.find(escape, position)
        if start == -1:
            result.append(value[position:])
            break
        end = value.find(escape, start + 1)
        if end == -1:
            result.append(value[position:])
            break
        result.append(value[position:start])
        result.append(_expand_escape(value[start + 1 : end], delimiters, codec, escape))
        position = end + 1
    return "".join(result)


def _expand_escape(sequence: str, delimiters: Delimiters, codec: str, escape: str) -> str:
    if sequence in _ESCAPE_NAMES:
        return str(getattr(delimiters, _ESCAPE_NAMES[sequence]))
    if sequence.startswith("X") and len(sequence) > 1:
        try:
            return bytes.fromhex(sequence[1:]).decode(codec)
        except (ValueError, UnicodeDecodeError):
            return escape + sequence + escape
    if sequence == ".br":
        return "\n"
    if sequence in ("H", "N"):
        return ""
    return escape + sequence + escape


def escape(value: str, delimiters: Delimiters) -> str:
    """Escape delimiters in a value written into a message."""
    replacements = [
        (delimiters.escape, "E"),
        (delimiters.field, "F"),
        (delimiters.component, "S"),
        (delimiters.subcomponent, "T"),
        (delimiters.repetition, "R"),
    ]
    result = []
    for char in value:
        if char in "\r\n":
            # A line break would end the segment; HL7 writes it as a hex escape.
            result.append(f"{delimiters.escape}X{ord(char):02X}{delimiters.escape}")
            continue
        for delimiter, name in replacements:
            if char == delimiter:
                result.append(f"{delimiters.escape}{name}{delimiters.escape}")
                break
        else:
            result.append(char)
    return "".join(result)


_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?$")


def parse_timestamp(value: str) -> dt.datetime | None:
    """Parse an HL7 TS/DTM value (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]); None if invalid."""
    match = _TS.match(value.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        tzinfo = None
        if offset:
            sign = 1 if offset[0] == "+" else -1
            tzinfo = dt.timezone(
                sign * dt.timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
            )
        return dt.datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")[:6]),
            tzinfo=tzinfo,
        )
    except ValueError:
        return None


def same_message(stored: bytes, received: bytes) -> bool:
    """Tell whether received is a resend of stored: equal except for MSH-7 and line breaks.

    Senders may stamp a new MSH-7 (date/time of message) on a resend, and
    may end segments with CRLF one time and CR the next.
    """
    return _comparable(stored) == _comparable(received)


def _comparable(data: bytes) -> bytes:
    data = data.strip(b"\r\n \t\x00").replace(b"\r\n", b"\r")
    if not data.startswith(b"MSH") or len(data) < 4:
        return data
    separator = data[3:4]
    first, line_break, rest = data.partition(b"\r")
    fields = first.split(separator)
    if len(fields) > 6:
        # fields[6] is MSH-7, because MSH-1 is the separator itself.
        fields[6] = b""
    return separator.join(fields) + line_break + rest
