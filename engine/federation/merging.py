"""Turning site matches into the caller's rows: local identifiers, one character set, one row each.

A row contains the keys the caller asked for (zero length when the site had no
value), the unique keys of the query level and above, Retrieve AE Title set to the
engine, and the local patient identity: PatientID and IssuerOfPatientID are the
local ones and Other Patient IDs Sequence lists the site's identifier. Values
are re-encoded in the caller's character set; a character that set cannot
encode becomes `?`.
"""

from __future__ import annotations

import dataclasses
import logging

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

from engine.federation.levels import UNIQUE_KEYS, Level
from engine.model import Demographics, PatientIdentifier

logger = logging.getLogger(__name__)

TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR", "DA", "TM", "DT"})
_SKIPPED_KEYS = frozenset(
    {"SpecificCharacterSet", "QueryRetrieveLevel", "RetrieveAETitle", "OtherPatientIDsSequence"}
)
_PATIENT_KEYS = ("PatientID", "IssuerOfPatientID")


@dataclasses.dataclass(frozen=True)
class Origin:
    """The origin of a row: the site, the patient at that site, and the local patient."""

    site: str
    remote: PatientIdentifier
    local: PatientIdentifier


def build_row(
    query: Dataset,
    level: Level,
    answer: Dataset,
    origin: Origin,
    retrieve_ae_title: str,
    character_set: str,
) -> tuple[Dataset, int]:
    """Build the caller's row from a site's match; return it and the replaced character count."""
    row = Dataset()
    row.SpecificCharacterSet = _charset_value(character_set)
    row.QueryRetrieveLevel = level.name
    # pydicom reads the default repertoire leniently as Latin-1; the standard says ASCII.
    codecs = convert_encodings(character_set.split("\\")) if character_set else ["ascii"]
    replaced = 0

    for key in query:
        if key.keyword in _SKIPPED_KEYS or key.tag.is_private or key.tag.group == 0:
            continue
        if key.keyword in _PATIENT_KEYS:
            continue
        found = answer.get(key.tag)
        value, count = _converted(found, codecs) if found is not None else (None, 0)
        replaced += count
        row.add(DataElement(key.tag, key.VR, value if value is not None else _empty(key.VR)))

    # The unique keys of the query level and the levels above it, so each row can be retrieved.
    for above in (Level.STUDY, Level.SERIES, Level.IMAGE):
        keyword = UNIQUE_KEYS[above]
        if above <= level and keyword not in row:
            setattr(row, keyword, str(answer.get(keyword, "") or ""))
    _set_identity(row, query, origin)
    row.RetrieveAETitle = retrieve_ae_title
    return row, replaced


def localize(answer: Dataset, origin: Origin, record: Demographics | None = None) -> None:
    """Set the local identity on a site's match in place, before it is matched against the query.

    The name, birth date and sex of the local record, when there is one,
    replace the site's, so the caller's keys are matched against the local
    values and the row carries them.
    """
    answer.PatientID = origin.local.value
    answer.IssuerOfPatientID = origin.local.issuer
    answer.OtherPatientIDsSequence = _other_ids(origin)
    if record is None:
        return
    for keyword, value in (
        ("PatientName", record.name),
        ("PatientBirthDate", record.birth_date),
        ("PatientSex", record.sex),
    ):
        if value:
            setattr(answer, keyword, value)


def _other_ids(origin: Origin) -> Sequence:
    return other_ids([origin])


def other_ids(origins: list[Origin]) -> Sequence:
    """Return the Other Patient IDs Sequence of the sites' identifiers, each once."""
    items = Sequence()
    listed: set[PatientIdentifier] = set()
    for origin in origins:
        if origin.remote == origin.local or origin.remote in listed:
            continue
        listed.add(origin.remote)
        item = Dataset()
        item.PatientID = origin.remote.value
        item.IssuerOfPatientID = origin.remote.issuer
        item.TypeOfPatientID = "TEXT"
        items.append(item)
    return items


def _set_identity(row: Dataset, query: Dataset, origin: Origin) -> None:
    """Put the local patient identity on a row, and the site's identifier among the others.

    PatientID and IssuerOfPatientID are set even when the caller did not ask
    for them, so no row leaves without the identity it belongs to.
    """
    row.PatientID = origin.local.value
    row.IssuerOfPatientID = origin.local.issuer
    if "OtherPatientIDsSequence" in query:
        row.OtherPatientIDsSequence = _other_ids(origin)


def _empty(vr: str) -> object:
    return [] if vr == "SQ" else None


def _charset_value(character_set: str) -> str | list[str]:
    terms = character_set.split("\\") if character_set else []
    if not terms:
        return ""
    return terms[0] if len(terms) == 1 else terms


def _converted(element: DataElement, codecs: list[str]) -> tuple[object, int]:
    """Return an element's value as text the target character set can encode, and replacements."""
    if element.VR == "SQ":
        items = Sequence()
        replaced = 0
        for item in element.value or []:
            copy = Dataset()
            for inner in item:
                value, count = _converted(inner, codecs)
                replaced += count
                copy.add(DataElement(inner.tag, inner.VR, value))
            items.append(copy)
        return items, replaced
    if element.VR not in TEXT_VRS or element.value is None:
        return element.value, 0
    if element.VR == "PN":
        values = element.value if element.VM > 1 else [element.value]
        texts = [str(PersonName(value)) if value is not None else "" for value in values]
    else:
        values = element.value if element.VM > 1 else [element.value]
        texts = [str(value) for value in values]
    fitted = [_fit(text, codecs) for text in texts]
    replaced = sum(count for _, count in fitted)
    result = [text for text, _ in fitted]
    return (result if len(result) > 1 else result[0]), replaced


def _fit(text: str, codecs: list[str]) -> tuple[str, int]:
    """Replace the characters none of the codecs can encode with '?'."""
    if _encodable(text, codecs):
        return text, 0
    characters = [char if _encodable(char, codecs) else "?" for char in text]
    return "".join(characters), sum(1 for a, b in zip(characters, text, strict=True) if a != b)


def _encodable(text: str, codecs: list[str]) -> bool:
    for codec in codecs:
        try:
            text.encode(codec)
            return True
        except (UnicodeEncodeError, LookupError):
            continue
    return False


class Merger:
    """One row per entity: the first answer for a unique key is sent, later ones add a location."""

    def __init__(self, level: Level, max_rows: int) -> None:
        self.level = level
        self.max_rows = max_rows
        self.sites_by_key: dict[tuple[str, ...], list[Origin]] = {}
        self.duplicates = 0
        self.dropped_over_limit = 0
        # Unique keys that sites hold for more than one local patient.
        self.several_patients: set[tuple[str, ...]] = set()

    def key_of(self, row: Dataset, origin: Origin) -> tuple[str, ...]:
        if self.level is Level.PATIENT:
            return (origin.local.value, origin.local.issuer)
        return (str(row.get(UNIQUE_KEYS[self.level], "")),)

    def add(self, row: Dataset, origin: Origin) -> bool:
        """Record a row; return True when it is new and must be sent to the caller."""
        key = self.key_of(row, origin)
        known = self.sites_by_key.get(key)
        if known is not None:
            if origin not in known:
                if any(other.local != origin.local for other in known):
                    self.several_patients.add(key)
                known.append(origin)
            self.duplicates += 1
            return False
        if len(self.sites_by_key) >= self.max_rows:
            self.dropped_over_limit += 1
            return False
        self.sites_by_key[key] = [origin]
        return True

    @property
    def rows(self) -> int:
        return len(self.sites_by_key)
