"""Building HL7 v2 acknowledgements (ACK) with MSA and ERR segments.

The ACK uses the delimiters and character set of the message it acknowledges, swaps
sender and receiver (MSH-3/4 with MSH-5/6) and echoes MSH-10 in MSA-2.

Original mode (MSH-15 and MSH-16 both empty) answers every message with one
application acknowledgement: AA, AE or AR. Enhanced mode sends an accept
(commit) acknowledgement CA, CE or CR when MSH-15 asks for it, then an
application acknowledgement AA, AE or AR when MSH-16 asks for it, either,
both or none (HL7 Table 0155: AL always, NE never, ER on error or reject
only, SU on success only).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import re
from collections.abc import Sequence

from engine.hl7.codes import AckCode, AckCondition, ErrorCode, Verdict
from engine.hl7.message import Delimiters, HL7Error, Message, escape

_sequence = itertools.count(1)


def share_control_ids(first: int, step: int) -> None:
    """Number this process's ACKs first, first + step, ...: one residue per process.

    The engine and its intake processes each take another residue modulo
    step, so ACKs built in the same second by two of them never share MSH-10.
    """
    global _sequence
    _sequence = itertools.count(first, step)


# The first HL7 version whose ERR segment has ERR-2 (location) and ERR-3 (code);
# earlier versions carry both in ERR-1, and the error text in MSA-3.
_ERR_LOCATION_VERSION = (2, 5)
_VERSION = re.compile(r"^(\d+)\.(\d+)")
# A field separator and 2 to 5 encoding characters, all ASCII punctuation.
_DELIMITERS = re.compile(r"[!-/:-@\[-`{-~]{3,6}")


@dataclasses.dataclass(frozen=True)
class AckError:
    """The content of one ERR segment."""

    code: ErrorCode
    text: str
    location: tuple[str, int, int] = ("", 0, 0)

    @classmethod
    def from_error(cls, error: HL7Error) -> AckError:
        return cls(error.code, error.text, error.location)


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
    accept_ack_type: str = ""
    application_ack_type: str = ""
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
            accept_ack_type=message.get("MSH", 15).strip().upper(),
            application_ack_type=message.get("MSH", 16).strip().upper(),
            charset_field=msh.raw_field(18),
            codec=message.charset,
        )

    @classmethod
    def from_raw(cls, data: bytes) -> AckHeader:
        """Read what can be read of MSH from a message that failed to parse.

        The acknowledgement mode is kept only when MSH-15 and MSH-16 hold valid
        Table 0155 values; otherwise the ACK uses original mode.
        """
        start = data.find(b"MSH")
        if start == -1 or len(data) < start + 8:
            return cls(delimiters=Delimiters())
        line = data[start:].replace(b"\n", b"\r").split(b"\r")[0]
        if len(line) < 8:
            # A bare "MSH" segment, or one too short to hold its delimiters.
            return cls(delimiters=Delimiters())
        separator = chr(line[3])
        text = line.decode("latin-1")
        fields = text.split(separator)
        encoding = fields[1] if len(fields) > 1 else ""
        if not _DELIMITERS.fullmatch(separator + encoding) or len(set(encoding)) < len(encoding):
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
        header = cls(
            delimiters=delimiters,
            sending_application=field(3),
            sending_facility=field(4),
            receiving_application=field(5),
            receiving_facility=field(6),
            trigger=message_type[1] if len(message_type) > 1 else "",
            control_id=field(10),
            processing_id=field(11) or "P",
            version=field(12) or "2.5",
            accept_ack_type=field(15).strip().upper(),
            application_ack_type=field(16).strip().upper(),
            codec="latin-1",
        )
        if header.invalid_ack_type() is not None:
            return dataclasses.replace(header, accept_ack_type="", application_ack_type="")
        return header

    @property
    def enhanced_mode(self) -> bool:
        return bool(self.accept_ack_type or self.application_ack_type)

    def invalid_ack_type(self) -> HL7Error | None:
        """Return the error for an MSH-15 or MSH-16 value outside Table 0155, if any."""
        for number, value in ((15, self.accept_ack_type), (16, self.application_ack_type)):
            if value and value not in AckCondition.__members__.values():
                return HL7Error(
                    f"MSH-{number} '{value}' is not an acknowledgement condition"
                    " (use AL, NE, ER or SU)",
                    ErrorCode.TABLE_VALUE_NOT_FOUND,
                    ("MSH", 1, number),
                    AckCode.APPLICATION_REJECT,
                    log_text=f"MSH-{number} is not an acknowledgement condition"
                    f" (a value of {len(value)} characters)",
                )
        return None

    def original_mode(self) -> AckHeader:
        return dataclasses.replace(self, accept_ack_type="", application_ack_type="")


def acknowledgements(
    header: AckHeader,
    verdict: Verdict,
    errors: Sequence[AckError] = (),
    now: dt.datetime | None = None,
) -> list[bytes]:
    """Build the acknowledgements a message requests, in the order they are sent.

    Original mode always returns one application acknowledgement. Enhanced
    mode returns the accept acknowledgement and then the application
    acknowledgement, each only when MSH-15 or MSH-16 requests it; an empty
    one of the two counts as AL. A message not accepted (CE or CR) is not
    processed, so no application acknowledgement follows its accept
    acknowledgement. It gets one only when MSH-15 requests no accept
    acknowledgement, so that the sender learns of the problem.
    """
    if not header.enhanced_mode:
        return [build_ack(header, verdict.application_code, errors, now)]
    answers = []
    if _wanted(header.accept_ack_type, verdict):
        answers.append(build_ack(header, verdict.commit_code, errors, now))
    if _wanted(header.application_ack_type, verdict) and (verdict is Verdict.ACCEPT or not answers):
        answers.append(build_ack(header, verdict.application_code, errors, now))
    return answers


def _wanted(condition: str, verdict: Verdict) -> bool:
    if condition in ("", AckCondition.ALWAYS):
        return True
    if condition == AckCondition.ERROR_OR_REJECT:
        return verdict is not Verdict.ACCEPT
    if condition == AckCondition.SUCCESS:
        return verdict is Verdict.ACCEPT
    return False


def verdict_of(error: HL7Error) -> Verdict:
    return Verdict.REJECT if error.ack == AckCode.APPLICATION_REJECT else Verdict.ERROR


def build_ack(
    header: AckHeader,
    code: AckCode,
    errors: Sequence[AckError] = (),
    now: dt.datetime | None = None,
) -> bytes:
    """Build one ACK message (without MLLP framing) for the given header."""
    d = header.delimiters
    now = now or dt.datetime.now().astimezone()
    timestamp = now.strftime("%Y%m%d%H%M%S%z")
    control_id = f"{now.strftime('%Y%m%d%H%M%S')}{next(_sequence):06d}"
    message_type = d.component.join(["ACK", header.trigger, "ACK"]) if header.trigger else "ACK"
    legacy_err = _version(header.version) < _ERR_LOCATION_VERSION

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
    if header.enhanced_mode and code.value.startswith("A"):
        # An application acknowledgement in enhanced mode is itself a message.
        # NE/NE in it means the sender sends no acknowledgement of it back.
        msh += ["", "", AckCondition.NEVER.value, AckCondition.NEVER.value]
    if header.charset_field:
        msh += [""] * (17 - len(msh)) + [header.charset_field]
    msa = ["MSA", code.value, header.control_id]
    if legacy_err and errors:
        msa.append(escape(errors[0].text, d))
    segments = [d.field.join(msh), d.field.join(msa)]

    for error in errors:
        segments.append(_legacy_err_segment(error, d) if legacy_err else _err_segment(error, d))

    text = "\r".join(segments) + "\r"
    return text.encode(header.codec, errors="replace")


def split_acks(data: bytes) -> list[bytes]:
    """Split stored acknowledgements (messages written one after the other) into messages."""
    return [part for part in re.split(rb"(?<=\r)(?=MSH)", data) if part]


def ack_code(ack: bytes) -> str:
    """Return MSA-1 of an encoded ACK, read with the field separator of its MSH; "" if none."""
    separator = ack[3:4]
    start = ack.find(b"\rMSA" + separator)
    if not separator or start < 0:
        return ""
    field = ack[start + 5 :].split(separator, 1)[0]
    return field.split(b"\r", 1)[0].decode("ascii", "replace")


def _version(text: str) -> tuple[int, int]:
    match = _VERSION.match(text)
    return (int(match.group(1)), int(match.group(2))) if match else _ERR_LOCATION_VERSION


def _err_segment(error: AckError, d: Delimiters) -> str:
    # ERR-2 location (ERL), ERR-3 code (CWE, Table 0357), ERR-4 severity, ERR-8 text.
    segment_id, sequence, field = error.location
    # Field 0 locates a whole segment, e.g. a missing one: ORC^1.
    parts = [segment_id, str(sequence), *([str(field)] if field else [])]
    location = d.component.join(parts) if segment_id else ""
    condition = d.component.join([str(error.code.value), error.code.text, "HL70357"])
    return d.field.join(["ERR", "", location, condition, "E", "", "", "", escape(error.text, d)])


def _legacy_err_segment(error: AckError, d: Delimiters) -> str:
    # ERR-1 (ELD, HL7 2.1 to 2.4): segment^sequence^field^code&text&HL70357.
    segment_id, sequence, field = error.location
    code = d.subcomponent.join([str(error.code.value), error.code.text, "HL70357"])
    location = ["", "", ""]
    if segment_id:
        location = [segment_id, str(sequence), str(field) if field else ""]
    return d.field.join(["ERR", d.component.join([*location, code])])
