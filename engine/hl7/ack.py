"""Building HL7 v2 acknowledgements (ACK) with MSA and ERR segments.

The ACK uses the delimiters and character set of the message it answers, swaps
sender and receiver (MSH-3/4 with MSH-5/6) and echoes MSH-10 in MSA-2.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools

from engine.hl7.codes import AckCode, ErrorCode
from engine.hl7.message import Delimiters, Message, escape

_sequence = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class AckError:
    """The content of one ERR segment."""

    code: ErrorCode
    text: str
    location: tuple[str, int, int] = ("", 0, 0)


@dataclasses.dataclass(frozen=True)
class AckHeader:
    """The MSH fields of the original message that the ACK needs, still encoded."""

    delimiters: Delimiters
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    trigger: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = "2.5"
    charset_field: str = ""
    codec: str = "utf-8"

    @classmethod
    def from_message(cls, message: Message) -> AckHeader:
        msh = message.segment("MSH")
        assert msh is not None
        return cls(
            delimiters=message.delimiters,
            sending_application=msh.raw_field(3),
            sending_facility=msh.raw_field(4),
            receiving_application=msh.raw_field(5),
            receiving_facility=msh.raw_field(6),
            trigger=message.get("MSH", 9, 2),
            control_id=msh.raw_field(10),
            processing_id=msh.raw_field(11) or "P",
            version=msh.raw_field(12) or "2.5",
            charset_field=msh.raw_field(18),
            codec=message.charset,
        )

    @classmethod
    def from_raw(cls, data: bytes) -> AckHeader:
        """Read what can be read of MSH from a message that failed to parse."""
        start = data.find(b"MSH")
        if start == -1 or len(data) < start + 8:
            return cls(delimiters=Delimiters())
        line = data[start:].replace(b"\n", b"\r").split(b"\r")[0]
        separator = chr(line[3])
        text = line.decode("latin-1")
        fields = text.split(separator)
        encoding = fields[1] if len(fields) > 1 else ""
        if len(encoding) < 2 or separator.isalnum() or separator in encoding:
            return cls(delimiters=Delimiters())
        delimiters = Delimiters(
            field=separator,
            component=encoding[0],
            repetition=encoding[1],
            escape=encoding[2] if len(encoding) > 2 else "\\",
            subcomponent=encoding[3] if len(encoding) > 3 else "&",
        )

        def field(number: int) -> str:
            index = number - 1
            return fields[index] if index < len(fields) else ""

        message_type = field(9).split(delimiters.component)
        return cls(
            delimiters=delimiters,
            sending_application=field(3),
            sending_facility=field(4),
            receiving_application=field(5),
            receiving_facility=field(6),
            trigger=message_type[1] if len(message_type) > 1 else "",
            control_id=field(10),
            processing_id=field(11) or "P",
            version=field(12) or "2.5",
            codec="latin-1",
        )


def build_ack(
    header: AckHeader,
    code: AckCode,
    errors: list[AckError] | None = None,
    now: dt.datetime | None = None,
) -> bytes:
    """Build the ACK message body (without MLLP framing) for the given header."""
    d = header.delimiters
    now = now or dt.datetime.now().astimezone()
    timestamp = now.strftime("%Y%m%d%H%M%S%z")
    control_id = f"{now.strftime('%Y%m%d%H%M%S')}{next(_sequence):06d}"
    message_type = d.component.join(["ACK", header.trigger, "ACK"]) if header.trigger else "ACK"

    msh = [
        "MSH",
        d.encoding_characters,
        header.receiving_application,
        header.receiving_facility,
        header.sending_application,
        header.sending_facility,
        timestamp,
        "",
        message_type,
        control_id,
        header.processing_id,
        header.version,
    ]
    if header.charset_field:
        msh += ["", "", "", "", "", header.charset_field]
    segments = [d.field.join(msh), d.field.join(["MSA", code.value, header.control_id])]

    for error in errors or []:
        segments.append(_err_segment(error, d))

    text = "\r".join(segments) + "\r"
    return text.encode(header.codec, errors="replace")


def _err_segment(error: AckError, d: Delimiters) -> str:
    segment_id, sequence, field = error.location
    location = d.component.join([segment_id, str(sequence), str(field)]) if segment_id else ""
    condition = d.component.join([str(error.code.value), error.code.text, "HL70357"])
    return d.field.join(["ERR", "", location, condition, "E", "", "", "", escape(error.text, d)])
