"""Comparing a remote patient's demographics (from the source's C-FIND) with the local record.

exact compares values as they are, apart from PN padding and trailing empty
components. normalised ignores letter case, accents and punctuation, compares
only family and given name, in either order, in the first component group
both names have (alphabetic, ideographic or phonetic), and reads birth dates
by their digits. An attribute empty in the local record is not compared.
"""

from __future__ import annotations

import unicodedata

from engine.identity.settings import CheckSettings
from engine.model import Demographics

LABELS = {"name": "name", "birth_date": "birth date", "sex": "sex"}


def differences(local: Demographics, remote: Demographics, settings: CheckSettings) -> list[str]:
    """Return what differs, e.g. ['birth date differs'], in words without the values."""
    if settings.strictness == "off":
        return []
    found: list[str] = []
    for attribute in settings.attributes:
        ours = str(getattr(local, attribute)).strip()
        theirs = str(getattr(remote, attribute)).strip()
        if not ours:
            continue
        if not theirs:
            if settings.when_missing == "quarantine":
                found.append(f"{LABELS[attribute]} not returned by the source")
            continue
        if not same_value(attribute, ours, theirs, settings.strictness == "exact"):
            found.append(f"{LABELS[attribute]} differs")
    return found


def same_value(attribute: str, ours: str, theirs: str, exact: bool) -> bool:
    """Return whether two values of a Demographics attribute name the same person."""
    if attribute == "name":
        if exact:
            return _exact_name(ours) == _exact_name(theirs)
        return _same_name(ours, theirs)
    if exact:
        return ours == theirs
    if attribute == "birth_date":
        return _digits(ours)[:8] == _digits(theirs)[:8]
    return ours.upper() == theirs.upper()


def _exact_name(name: str) -> str:
    groups = [
        "^".join(part.strip() for part in group.split("^")).rstrip("^") for group in name.split("=")
    ]
    return "=".join(groups).rstrip("=")


def _same_name(ours: str, theirs: str) -> bool:
    """Compare two names by the first component group both have (alphabetic, ideographic,
    phonetic); without one in common, by the alphabetic group."""
    mine, other = _name_keys(ours), _name_keys(theirs)
    for first, second in zip(mine, other, strict=True):
        if first and second:
            return first == second
    return mine[0] == other[0]


def _name_keys(name: str) -> list[tuple[str, ...]]:
    """Return the family and given name of each component group, folded and in any order."""
    groups = [*name.split("="), "", ""][:3]
    keys = []
    for group in groups:
        parts = [*group.split("^"), ""]
        family, given = _fold(parts[0]), _fold(parts[1])
        keys.append(tuple(sorted(part for part in (family, given) if part)))
    return keys


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    letters = (char for char in decomposed if not unicodedata.combining(char))
    return "".join(char for char in "".join(letters).casefold() if char.isalnum())


def _digits(text: str) -> str:
    return "".join(char for char in text if char.isdigit())
