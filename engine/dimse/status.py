"""DIMSE status codes used by the engine, named as PS3.4 and PS3.7 name them."""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
    CANCEL = 0xFE00
    # C-MOVE / C-GET
    SUB_OPERATIONS_COMPLETE_WITH_FAILURES = 0xB000
    OUT_OF_RESOURCES_MATCHES = 0xA701
    OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # C-STORE
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    REFUSED_NOT_AUTHORIZED = 0x0124
    OUT_OF_RESOURCES = 0xA700
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


def is_pending(status: int) -> bool:
    return status in (Status.PENDING, Status.PENDING_WARNING)


def is_success_or_warning(status: int) -> bool:
    """Return True for success and the warning statuses (0x0001, 0xB000-0xBFFF)."""
    return status == Status.SUCCESS or status == 0x0001 or 0xB000 <= status <= 0xBFFF


def describe(status: int) -> str:
    try:
        return f"0x{status:04X} ({Status(status).name.lower().replace('_', ' ')})"
    except ValueError:
        return f"0x{status:04X}"
