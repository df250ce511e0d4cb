"""Character sets for stamping: fitting a dataset's text to UTF-8 or to Latin-1 only.

A destination that accepts Unicode gets ISO_IR 192 when the stamped text does
not fit the object's own character set. A destination that accepts only
Latin-1 gets ISO_IR 100 (or stays on the default repertoire when all text is
ASCII); text outside Latin-1 is transliterated with anyascii or rejected.
"""

from __future__ import annotations

from collections.abc import Callable

from anyascii import anyascii
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

UTF8_CHARSET = "ISO_IR 192"
LATIN1_CHARSET = "ISO_IR 100"
DEFAULT_CHARSET = "ISO_IR 6"
# Value representations whose values are text in the dataset's character set.
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})


class TextRejected(Exception):
    """Text that the destination's character set cannot hold, with rejection configured."""


def charset_terms(ds: Dataset) -> list[str]:
    current = ds.get("SpecificCharacterSet", "")
    terms = [current] if isinstance(current, str) else [str(term) for term in current]
    return [term for term in terms if term] or [DEFAULT_CHARSET]


def fits(text: str, terms: list[str]) -> bool:
    """Return True if `text` can be written in a single-valued character set."""
    if text.isascii():
        return True
    if len(terms) != 1:
        return False
    # pydicom reads the default repertoire leniently as Latin-1; the standard says ASCII.
    codec = "ascii" if terms[0] == DEFAULT_CHARSET else python_encoding.get(terms[0])
    if codec is None:
        return False
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def switch_to_utf8_for(ds: Dataset, texts: list[str]) -> None:
    """Switch the dataset to UTF-8 when its character set cannot encode the new text."""
    terms = charset_terms(ds)
    if all(fits(text, terms) for text in texts):
        return
    # Decode every text element with the old character set first, so that all of
    # them are written again in the new one.
    ds.decode()
    ds.SpecificCharacterSet = UTF8_CHARSET


def is_latin1(text: str) -> bool:
    return all(ord(char) < 0x100 for char in text)


def transliterate(text: str) -> str:
    """Keep Latin-1 characters and spell every other one in ASCII (Ł -> L, Иван -> Ivan)."""
    return "".join(char if ord(char) < 0x100 else anyascii(char) for char in text)


def latin1_person_name(name: str, reject: bool) -> str:
    """Fit a PN value to Latin-1: only its alphabetic group, transliterated or rejected."""
    alphabetic = name.split("=")[0] or name
    if is_latin1(alphabetic):
        return alphabetic
    if reject:
        raise TextRejected("patient name has characters outside Latin-1")
    return transliterate(alphabetic)


def convert_to_latin1(ds: Dataset, reject: bool) -> None:
    """Re-encode every text element of a dataset in Latin-1 (ISO_IR 100).

    A dataset already in the default repertoire or ISO_IR 100 is left as it is;
    any other is decoded and each text value that does not fit is transliterated,
    or TextRejected is raised naming the element.
    """
    terms = charset_terms(ds)
    if len(terms) == 1 and terms[0] in (DEFAULT_CHARSET, LATIN1_CHARSET):
        return
    ds.decode()
    _walk_text(ds, lambda keyword, text: _fit_latin1(keyword, text, reject))
    ds.SpecificCharacterSet = LATIN1_CHARSET


def _fit_latin1(keyword: str, text: str, reject: bool) -> str:
    if is_latin1(text):
        return text
    if reject:
        raise TextRejected(f"{keyword or 'a text element'} has characters outside Latin-1")
    return transliterate(text)


def _walk_text(ds: Dataset, change: Callable[[str, str], str]) -> None:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _walk_text(item, change)
            continue
        if element.VR not in TEXT_VRS or element.value is None or element.value == "":
            continue
        keyword = element.keyword
        if element.VR == "PN":
            values = element.value if isinstance(element.value, MultiValue) else [element.value]
            fitted = [change(keyword, str(value).split("=")[0] or str(value)) for value in values]
            new: object = [PersonName(value) for value in fitted]
            element.value = new if len(fitted) > 1 else PersonName(fitted[0])
        elif isinstance(element.value, MultiValue):
            element.value = [change(keyword, str(value)) for value in element.value]
        elif isinstance(element.value, str):
            element.value = change(keyword, element.value)
