"""The C-FINDs sent to one site: one relational query, or level by level."""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.dataset import Dataset

from engine.federation.levels import Level, Model
from engine.federation.sitefind import SitePlan, _answers


class FakeFinder:
    """Records every query and returns canned matches by level."""

    def __init__(self, matches: dict[str, list[dict[str, str]]]) -> None:
        self.matches = matches
        self.queries: list[tuple[Model, Dataset]] = []

    def find(self, model: Model, query: Dataset) -> Iterator[Dataset]:
        self.queries.append((model, query))
        for values in self.matches.get(str(query.QueryRetrieveLevel), []):
            match = Dataset()
            for keyword, value in values.items():
                setattr(match, keyword, value)
            yield match


def keys(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_sitefind_relational_one_query() -> None:
    finder = FakeFinder({"SERIES": [{"SeriesInstanceUID": "1.1.1", "StudyInstanceUID": "1.1"}]})
    plan = SitePlan(
        "a", Level.SERIES, keys(PatientID="HA-1", StudyDate="2020-", Modality="CT"), True
    )
    found = list(_answers(finder, plan))  # type: ignore[arg-type]
    [(model, query)] = finder.queries
    assert model is Model.STUDY_ROOT
    assert query.QueryRetrieveLevel == "SERIES"
    assert (query.PatientID, query.StudyDate, query.Modality) == ("HA-1", "2020-", "CT")
    assert "StudyInstanceUID" in query
    assert "IssuerOfPatientID" in query
    assert [match.SeriesInstanceUID for match in found] == ["1.1.1"]


def test_sitefind_level_by_level_descent() -> None:
    finder = FakeFinder(
        {
            "STUDY": [
                {"StudyInstanceUID": "1.1", "PatientID": "HA-1", "StudyDate": "20200101"},
                {"StudyInstanceUID": "1.2", "PatientID": "HA-1", "StudyDate": "20210101"},
            ],
            "SERIES": [{"SeriesInstanceUID": "9.9", "Modality": "CT"}],
        }
    )
    plan = SitePlan(
        "a", Level.SERIES, keys(PatientID="HA-1", StudyDate="2020-", Modality="CT"), False
    )
    found = list(_answers(finder, plan))  # type: ignore[arg-type]

    levels = [str(query.QueryRetrieveLevel) for _, query in finder.queries]
    assert levels == ["STUDY", "SERIES", "SERIES"]
    study_query = finder.queries[0][1]
    assert (study_query.PatientID, study_query.StudyDate) == ("HA-1", "2020-")
    assert "Modality" not in study_query
    series_queries = [query for _, query in finder.queries[1:]]
    assert [query.StudyInstanceUID for query in series_queries] == ["1.1", "1.2"]
    assert all(query.Modality == "CT" and "PatientID" not in query for query in series_queries)
    # Each series match carries its study's attributes, the patient ID among them.
    assert [(m.StudyInstanceUID, m.PatientID, m.StudyDate) for m in found] == [
        ("1.1", "HA-1", "20200101"),
        ("1.2", "HA-1", "20210101"),
    ]


def test_sitefind_patient_level_patient_root() -> None:
    finder = FakeFinder({"PATIENT": [{"PatientID": "HA-1"}]})
    plan = SitePlan("a", Level.PATIENT, keys(PatientID="HA-1", PatientName=""), False)
    assert len(list(_answers(finder, plan))) == 1  # type: ignore[arg-type]
    [(model, query)] = finder.queries
    assert model is Model.PATIENT_ROOT
    assert query.QueryRetrieveLevel == "PATIENT"
