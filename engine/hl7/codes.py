"""HL7 v2 acknowledgement codes (Table 0008) and error codes (Table 0357)."""

from __future__ import annotations

import enum


class AckCode(enum.StrEnum):
    """MSA-1 acknowledgement codes, HL7 Table 0008."""

    APPLICATION_ACCEPT = "AA"
    APPLICATION_ERROR = "AE"
    APPLICATION_REJECT = "AR"
    COMMIT_ACCEPT = "CA"
    COMMIT_ERROR = "CE"
    COMMIT_REJECT = "CR"


class ErrorCode(enum.IntEnum):
    """ERR-3 message error condition codes, HL7 Table 0357."""

    MESSAGE_ACCEPTED = 0
    SEGMENT_SEQUENCE_ERROR = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE_ERROR = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT_CODE = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION_ID = 203
    UNKNOWN_KEY_IDENTIFIER = 204
    DUPLICATE_KEY_IDENTIFIER = 205
    APPLICATION_RECORD_LOCKED = 206
    APPLICATION_INTERNAL_ERROR = 207

    @property
    def text(self) -> str:
        return self.name.replace("_", " ").capitalize()


class AckCondition(enum.StrEnum):
    """MSH-15 and MSH-16 values, HL7 Table 0155: when an acknowledgement is sent."""

    ALWAYS = "AL"
    NEVER = "NE"
    ERROR_OR_REJECT = "ER"
    SUCCESS = "SU"


class Verdict(enum.Enum):
    """What the engine decided about a message, before the acknowledgement mode applies."""

    ACCEPT = "accept"
    ERROR = "error"
    REJECT = "reject"

    @property
    def application_code(self) -> AckCode:
        return _APPLICATION_CODES[self]

    @property
    def commit_code(self) -> AckCode:
        return _COMMIT_CODES[self]


_APPLICATION_CODES = {
    Verdict.ACCEPT: AckCode.APPLICATION_ACCEPT,
    Verdict.ERROR: AckCode.APPLICATION_ERROR,
    Verdict.REJECT: AckCode.APPLICATION_REJECT,
}
_COMMIT_CODES = {
    Verdict.ACCEPT: AckCode.COMMIT_ACCEPT,
    Verdict.ERROR: AckCode.COMMIT_ERROR,
    Verdict.REJECT: AckCode.COMMIT_REJECT,
}
