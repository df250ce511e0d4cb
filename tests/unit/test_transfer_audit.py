"""Which study results of a job's attempt get a DICOM Instances Transferred record."""

from __future__ import annotations

import pytest

from engine.audit import Outcome
from engine.jobs.prefetch import StudyResult
from engine.jobs.store import StudyState
from engine.service import transfer_outcome


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (
            StudyResult(StudyState.STORED, received=10, stored=10, stored_in_attempt=10),
            Outcome.SUCCESS,
        ),
        # A retry found the study complete: nothing moved in this attempt.
        (StudyResult(StudyState.STORED, received=10, stored=10, stored_in_attempt=0), None),
        (
            StudyResult(StudyState.INCOMPLETE, received=10, stored=4, stored_in_attempt=4),
            Outcome.MINOR_FAILURE,
        ),
        # The destination is down: the objects wait in the spool.
        (StudyResult(StudyState.INCOMPLETE, received=10, stored=0, stored_in_attempt=0), None),
        (StudyResult(StudyState.FAILED, received=3), Outcome.SERIOUS_FAILURE),
        (StudyResult(StudyState.FAILED, received=0), None),
        (StudyResult(StudyState.PRESENT, stored=10), None),
    ],
)
def test_transfer_record_only_when_objects_moved(
    result: StudyResult, expected: Outcome | None
) -> None:
    assert transfer_outcome(result) is expected
