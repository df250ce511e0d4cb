"""Attribute matching as PS3.4 C.2.2.2 defines it, applied to answers on our side.

Sites differ: some ignore keys they do not support, some match names case
sensitively, and a site queried level by level returns more than was asked.
Every answer is therefore matched again against the caller's identifier:

- universal matching: a zero-length key, or a key that is only `*` on a
  non-date VR (a `*` on a UI key is turned into universal matching before the
  query is sent, see universal_uid_keys);
- single value matching, case-insensitive for PN (the standard allows it);
- wildcard matching with `*` and `?` on every VR except DA, TM, DT, UI, SQ
  and the binary and numeric VRs;
- range matching on DA, TM and DT (`a-b`, `-b`, `a-`), each key on its own;
- list of UID matching on UI keys with several values;
- sequence matching: an answer item must match every non-empty key of the
  query's item;
- empty value matching with `""`.

An answer without the attribute at all cannot be refuted and matches; an
answer with the attribute present but empty matches only universal, wildcard
`*` and empty value matching, as it would at a conformant SCP.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from engine.federation.levels import RESPONSE_ATTRIBUTES

WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
NUMERIC_VRS = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"})
EMPTY_VALUE = '""'


def values_of(element: DataElement) -> list[str]:
    """Return an element's values as stripped strings; [] when it is empty."""
    value = element.value
    if value is None or value == "":
        return []
    items: Iterable[object] = value if isinstance(value, MultiValue | list | tuple) else [value]
    return [text for text in (str(item).strip() for item in items) if text]


def is_universal(element: DataElement) -> bool:
    """Return True when a query key matches every value (C.2.2.2.3)."""
    if element.VR == "SQ":
        items = element.value or []
        return not items or all(_item_is_universal(item) for item in items)
    values = values_of(element)
    if not values:
        return True
    return element.VR not in RANGE_VRS and values == ["*"]


def _item_is_universal(item: Dataset) -> bool:
    return all(is_universal(element) for element in item)


def universal_uid_keys(identifier: Dataset) -> None:
    """Turn `*` on UI keys into universal matching, in place (wildcards are invalid on UI)."""
    for element in identifier:
        if element.VR == "UI" and values_of(element) == ["*"]:
            element.value = ""
        elif element.VR == "SQ":
            for item in element.value or []:
                universal_uid_keys(item)


def matches(query: Dataset, answer: Dataset) -> bool:
    """Return True when `answer` matches every matching key of `query`."""
    for element in query:
        if element.keyword in RESPONSE_ATTRIBUTES or element.tag.group in (0x0000, 0x0002):
            continue
        if element.tag.is_private or is_universal(element):
            continue
        if element.tag not in answer:
            continue
        if not _element_matches(element, answer[element.tag]):
            return False
    return True


def _element_matches(key: DataElement, candidate: DataElement) -> bool:
    if key.VR == "SQ":
        return _sequence_matches(key, candidate)
    wanted = values_of(key)
    found = values_of(candidate)
    if wanted == [EMPTY_VALUE]:
        return not found
    if not found:
        return key.VR in WILDCARD_VRS and wanted == ["*"]
    # Several query values: list of UID matching, and for multi-valued
    # attributes such as ModalitiesInStudy, any value may match.
    return any(_value_matches(key.VR, one, value) for one in wanted for value in found)


def _value_matches(vr: str, wanted: str, found: str) -> bool:
    if vr in RANGE_VRS:
        return _range_matches(vr, wanted, found)
    if vr in NUMERIC_VRS:
        return _numbers_equal(wanted, found)
    if vr == "PN":
        return (
            _pattern(wanted.rstrip("^"), wildcards=True, ignore_case=True).fullmatch(
                found.rstrip("^")
            )
            is not None
        )
    return (
        _pattern(wanted, wildcards=vr in WILDCARD_VRS, ignore_case=False).fullmatch(found)
        is not None
    )


def _pattern(value: str, wildcards: bool, ignore_case: bool) -> re.Pattern[str]:
    if wildcards:
        text = "".join(
            ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in value
        )
    else:
        text = re.escape(value)
    return re.compile(text, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)


def _numbers_equal(wanted: str, found: str) -> bool:
    try:
        return float(wanted) == float(found)
    except ValueError:
        return wanted == found


def _normalize(vr: str, value: str) -> str:
    text = value.strip()
    if vr == "DT":
        # A UTC offset does not take part in the comparison.
        text = re.sub(r"[+-]\d{4}$", "", text) if len(text) > 8 else text
    # Dates and times written in the old ACR-NEMA forms (1993.03.12, 10:15:00).
    return text.replace(".", "") if vr == "DA" else text.replace(":", "")


def _range_matches(vr: str, wanted: str, found: str) -> bool:
    value = _normalize(vr, found)
    bounds = _split_range(vr, wanted)
    if bounds is None:
        exact = _normalize(vr, wanted)
        # A time or date-time key matches every value it is a prefix of (1015 matches 101530).
        return value[: len(exact)] == exact if vr != "DA" else value == exact
    low, high = bounds
    if low and value[: len(low)] < low:
        return False
    return not (high and value[: len(high)] > high)


def _split_range(vr: str, wanted: str) -> tuple[str, str] | None:
    if "-" not in wanted:
        return None
    if vr == "DT":
        # A DT may end in a negative UTC offset: split on the dash between two values.
        parts = re.fullmatch(r"([0-9.+]*(?:-\d{4})?)-([0-9.+]*(?:-\d{4})?)", wanted.strip())
        if parts is None:
            return None
        return _normalize(vr, parts.group(1)), _normalize(vr, parts.group(2))
    low, _, high = wanted.partition("-")
    return _normalize(vr, low), _normalize(vr, high)


def _sequence_matches(key: DataElement, candidate: DataElement) -> bool:
    wanted_items = [item for item in key.value or [] if not _item_is_universal(item)]
    found_items = list(candidate.value or [])
    if not wanted_items:
        return True
    # One item in the query (C.2.2.2.6); any answer item that matches it is enough.
    wanted = wanted_items[0]
    return any(matches(wanted, item) for item in found_items)
