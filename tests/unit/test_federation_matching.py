"""PS3.4 C.2.2.2 matching, as applied again to every site answer."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from engine.federation.matching import is_universal, matches, universal_uid_keys


def dataset(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("key", "query", "value", "expected"),
    [
        # Universal matching: zero length, or only '*' on a non-date VR.
        ("PatientName", "", "DOE^JANE", True),
        ("StudyDescription", "*", "", True),
        ("StudyDescription", "*", "CT HEAD", True),
        # Single value matching; PN is case-insensitive.
        ("AccessionNumber", "A1", "A1", True),
        ("AccessionNumber", "A1", "a1", False),
        ("AccessionNumber", "A1", "A12", False),
        ("PatientName", "doe^jane", "DOE^JANE", True),
        ("PatientName", "DOE^JANE", "DOE^JANE^^^", True),
        ("PatientName", "DOE^JANE", "DOE^JOHN", False),
        # Wildcards on VRs that allow them; '?' is one character.
        ("PatientName", "DO*", "DOE^JANE", True),
        ("PatientName", "D?E*", "DOE^JANE", True),
        ("PatientName", "D?E*", "DOVE^JANE", False),
        ("StudyDescription", "CT*", "MR BRAIN", False),
        ("StudyDescription", "*HEAD*", "CT HEAD WITHOUT", True),
        # A literal dot or bracket is not a pattern.
        ("StudyDescription", "C.T", "CXT", False),
        # Present but empty matches only universal and '*'.
        ("StudyDescription", "CT", "", False),
        # Date ranges.
        ("StudyDate", "20200101-20201231", "20200615", True),
        ("StudyDate", "20200101-20201231", "20210101", False),
        ("StudyDate", "-20200101", "20191231", True),
        ("StudyDate", "20200101-", "20191231", False),
        ("StudyDate", "20200101", "20200101", True),
        ("StudyDate", "20200101", "20200102", False),
        ("StudyDate", "2020.01.01-", "20200101", True),
        # Time ranges compare at the precision of the key.
        ("StudyTime", "0800-1015", "101530", True),
        ("StudyTime", "0800-1015", "101600", False),
        ("StudyTime", "1015", "101530.123", True),
        ("StudyTime", "10:15-", "101600", True),
        # Numbers compare as numbers.
        ("SeriesNumber", "2", "2", True),
        ("SeriesNumber", "2", "3", False),
        # Empty value matching.
        ("AccessionNumber", '""', "", True),
        ("AccessionNumber", '""', "A1", False),
    ],
)
def test_matching_single_key(key: str, query: str, value: str, expected: bool) -> None:
    assert matches(dataset(**{key: query}), dataset(**{key: value})) is expected


def test_matching_uid_list() -> None:
    query = dataset(StudyInstanceUID=["1.2.3", "1.2.4"])
    assert matches(query, dataset(StudyInstanceUID="1.2.4"))
    assert not matches(query, dataset(StudyInstanceUID="1.2.5"))


def test_matching_star_on_uid_becomes_universal() -> None:
    query = dataset(StudyInstanceUID="*")
    universal_uid_keys(query)
    assert query.StudyInstanceUID == ""
    assert matches(query, dataset(StudyInstanceUID="1.2.3"))


def test_matching_multi_valued_attribute() -> None:
    query = dataset(ModalitiesInStudy="CT")
    assert matches(query, dataset(ModalitiesInStudy=["CT", "SR"]))
    assert not matches(query, dataset(ModalitiesInStudy=["MR", "SR"]))
    assert matches(dataset(ModalitiesInStudy=["MR", "CT"]), dataset(ModalitiesInStudy="CT"))


def test_matching_absent_attribute_not_refuted() -> None:
    assert matches(dataset(StudyDescription="CT*"), dataset(StudyDate="20200101"))


def test_matching_every_key_must_match() -> None:
    query = dataset(StudyDescription="CT*", StudyDate="2020-")
    assert matches(query, dataset(StudyDescription="CT HEAD", StudyDate="20210101"))
    assert not matches(query, dataset(StudyDescription="CT HEAD", StudyDate="20190101"))


def _other_ids(*pairs: tuple[str, str]) -> Sequence:
    items = Sequence()
    for patient_id, issuer in pairs:
        items.append(dataset(PatientID=patient_id, IssuerOfPatientID=issuer))
    return items


def test_matching_sequence_item() -> None:
    query = dataset(OtherPatientIDsSequence=_other_ids(("HA-1", "HOSP_A")))
    answer = dataset(OtherPatientIDsSequence=_other_ids(("HB-2", "HOSP_B"), ("HA-1", "HOSP_A")))
    assert matches(query, answer)
    other = dataset(OtherPatientIDsSequence=_other_ids(("HA-1", "HOSP_B")))
    assert not matches(query, other)


def test_matching_empty_sequence_universal() -> None:
    query = dataset(OtherPatientIDsSequence=_other_ids(("", "")))
    assert is_universal(query["OtherPatientIDsSequence"])
    assert matches(query, dataset(OtherPatientIDsSequence=Sequence()))


def test_matching_ignores_response_attributes() -> None:
    query = dataset(QueryRetrieveLevel="STUDY", RetrieveAETitle="X", SpecificCharacterSet="")
    assert matches(query, dataset(QueryRetrieveLevel="SERIES", RetrieveAETitle="Y"))
