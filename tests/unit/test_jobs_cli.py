"""`fdqr jobs cancel` and `fdqr jobs requeue`: acting on one job by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from engine.cli import main
from engine.identity import records
from engine.jobs.store import JobState, Store, StudyState
from engine.model import Decision, PatientIdentifier, StudyCandidate
from tests.conftest import NOW, shipped_layout
from tests.unit.test_jobs import PATIENT, new_job, order_job


def layout(tmp_path: Path) -> Path:
    return shipped_layout(tmp_path)


def jobs(config: Path, *arguments: str) -> Result:
    return CliRunner().invoke(main, ["jobs", "--config", str(config), *arguments])


def state_of(tmp_path: Path, job_id: int) -> JobState:
    store = Store(tmp_path / "fdqr.sqlite")
    try:
        job = store.get_job(job_id)
        assert job is not None
        return job.state
    finally:
        store.close()


def test_cancel_queued_job(tmp_path: Path) -> None:
    config = layout(tmp_path)
    store = Store(tmp_path / "fdqr.sqlite")
    job_id = store.add_job(new_job(), NOW)
    store.close()
    result = jobs(config, "cancel", str(job_id), "--reason", "patient transferred")
    assert result.exit_code == 0, result.output
    assert result.output == f"job {job_id} cancelled\n"
    assert state_of(tmp_path, job_id) == JobState.CANCELLED
    store = Store(tmp_path / "fdqr.sqlite")
    assert store.events(job_id)[-1][1] == "cancelled: patient transferred"
    store.close()


def test_cancel_requeues_suppressed_job(tmp_path: Path) -> None:
    config = layout(tmp_path)
    store = Store(tmp_path / "fdqr.sqlite")
    first = store.add_job(order_job("1001", "RIS", "ACC-1"), NOW)
    repeated = store.add_job(order_job("1001", "RIS", "ACC-2"), NOW)
    store.close()
    assert state_of(tmp_path, repeated) == JobState.SUPPRESSED
    result = jobs(config, "cancel", str(first))
    assert result.exit_code == 0, result.output
    assert result.output == f"job {first} cancelled; requeued suppressed job {repeated}\n"
    assert state_of(tmp_path, repeated) == JobState.QUEUED


def test_cancel_running_job_requests_stop(tmp_path: Path) -> None:
    config = layout(tmp_path)
    store = Store(tmp_path / "fdqr.sqlite")
    job_id = store.add_job(new_job(), NOW)
    [claimed] = store.claim_due(NOW, 1)
    store.close()
    result = jobs(config, "cancel", str(claimed.id))
    assert result.exit_code == 0, result.output
    assert result.output == f"job {job_id} is running: its retrieve stops within seconds\n"
    assert state_of(tmp_path, job_id) == JobState.RUNNING
    store = Store(tmp_path / "fdqr.sqlite")
    assert store.cancellation(job_id) == "cancelled by an operator"
    store.close()


def test_cancel_finished_or_unknown_job_fails(tmp_path: Path) -> None:
    config = layout(tmp_path)
    store = Store(tmp_path / "fdqr.sqlite")
    job_id = store.add_job(new_job(), NOW)
    store.finish_job(job_id, JobState.DONE, "1 study stored", NOW)
    store.close()
    finished = jobs(config, "cancel", str(job_id))
    assert finished.exit_code == 1
    assert f"job {job_id} is done already; nothing to cancel" in finished.output
    assert state_of(tmp_path, job_id) == JobState.DONE
    unknown = jobs(config, "cancel", "99")
    assert unknown.exit_code == 1
    assert "job 99 not found" in unknown.output


def test_requeue_failed_job(tmp_path: Path) -> None:
    config = layout(tmp_path)
    store = Store(tmp_path / "fdqr.sqlite")
    job_id = store.add_job(new_job(), NOW)
    store.finish_job(job_id, JobState.FAILED, "destination not reachable", NOW)
    store.close()
    result = jobs(config, "requeue", str(job_id))
    assert result.exit_code == 0, result.output
    assert result.output == f"job {job_id} queued (was failed)\n"
    assert state_of(tmp_path, job_id) == JobState.QUEUED
    store = Store(tmp_path / "fdqr.sqlite")
    requeued = store.get_job(job_id)
    store.close()
    assert requeued is not None
    assert requeued.summary == (
        "queued again by an operator (was failed: destination not reachable)"
    )
    again = jobs(config, "requeue", str(job_id))
    assert again.exit_code == 1
    assert f"job {job_id} is queued; only a finished job can be queued again" in again.output
    unknown = jobs(config, "requeue", "99")
    assert unknown.exit_code == 1
    assert "job 99 not found" in unknown.output


def test_requeue_after_cancel_while_running(tmp_path: Path) -> None:
    config = layout(tmp_path)
    store = Store(tmp_path / "fdqr.sqlite")
    job_id = store.add_job(new_job(), NOW)
    store.claim_due(NOW, 1)
    store.close()
    assert jobs(config, "cancel", str(job_id)).exit_code == 0
    # The worker saw the request and ended the attempt as cancelled.
    store = Store(tmp_path / "fdqr.sqlite")
    store.finish_job(job_id, JobState.CANCELLED, "cancelled by an operator (after 1 study)", NOW)
    store.close()
    refused = jobs(config, "requeue", str(job_id))
    assert refused.exit_code == 1
    assert refused.output == (
        f"job {job_id} was not queued: it was cancelled (cancelled by an operator"
        " (after 1 study)). Queue it anyway with --force.\n"
    )
    result = jobs(config, "requeue", str(job_id), "--force")
    assert result.exit_code == 0, result.output
    store = Store(tmp_path / "fdqr.sqlite")
    assert store.cancellation(job_id) is None
    store.close()
    assert state_of(tmp_path, job_id) == JobState.QUEUED


def test_requeue_after_order_cancel_needs_force(tmp_path: Path) -> None:
    config = layout(tmp_path)
    store = Store(tmp_path / "fdqr.sqlite")
    new = order_job("1001", "RIS", "ACC-1")
    job_id = store.add_job(new, NOW)
    store.claim_due(NOW, 1)
    store.finish_job(job_id, JobState.DONE, "1 study stored", NOW)
    store.cancel_order(PATIENT, new.order, "order cancelled (ORC-1 CA) by message C1", NOW)
    store.close()

    result = jobs(config, "requeue", str(job_id))

    assert result.exit_code == 1
    assert result.output == (
        f"job {job_id} was not queued: its order was cancelled after it ended"
        " (done: 1 study stored). Queue it anyway with --force.\n"
    )


def test_job_id_out_of_range_rejected(tmp_path: Path) -> None:
    config = layout(tmp_path)
    Store(tmp_path / "fdqr.sqlite").close()
    for command in ("show", "cancel", "requeue"):
        result = jobs(config, command, "9223372036854775808")
        assert result.exit_code == 2
        assert "is not in the range 1<=x<=9223372036854775807" in result.output


def test_job_id_not_a_number_rejected(tmp_path: Path) -> None:
    config = layout(tmp_path)

    result = jobs(config, "show", "abc")

    assert result.exit_code == 2
    assert "Invalid value for 'JOB_ID': 'abc' is not a valid whole number." in result.output


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_listing_limit_below_one_rejected(tmp_path: Path, limit: str) -> None:
    config = layout(tmp_path)

    result = jobs(config, "--limit", limit)

    assert result.exit_code == 2
    assert f"Invalid value for '--limit': {limit} is not in the range" in result.output


def test_cancel_quarantined_job(tmp_path: Path) -> None:
    config = layout(tmp_path)
    store = Store(tmp_path / "fdqr.sqlite")
    job_id = store.add_job(new_job(), NOW)
    store.finish_job(job_id, JobState.QUARANTINED, "demographics differ", NOW)
    store.close()
    result = jobs(config, "cancel", str(job_id), "--reason", "order withdrawn")
    assert result.exit_code == 0, result.output
    assert state_of(tmp_path, job_id) == JobState.CANCELLED


def test_list_and_show_name_merge_of_job_patient(tmp_path: Path) -> None:
    config = layout(tmp_path)
    store = Store(tmp_path / "fdqr.sqlite")
    job_id = store.add_job(new_job(), NOW)
    surviving = PatientIdentifier("L9", PATIENT.issuer)
    records.merge(store, surviving, PATIENT, NOW, "A40-1")
    store.close()
    merged = f"{PATIENT} (merged into {surviving})"

    listed = jobs(config)
    shown = jobs(config, "show", str(job_id))

    assert listed.exit_code == 0, listed.output
    assert merged in listed.output
    assert f"  patient {merged}, route ris, rule ct" in shown.output


def test_missing_configuration_names_the_ways_to_give_one(tmp_path: Path) -> None:
    result = jobs(tmp_path / "nowhere.yaml")
    assert result.exit_code == 2
    assert "nowhere.yaml: configuration file not found; give one with --config FILE" in (
        result.output
    )


def test_requeue_counts_attempts_afresh(tmp_path: Path) -> None:
    config = layout(tmp_path)
    store = Store(tmp_path / "fdqr.sqlite")
    job_id = store.add_job(new_job(), NOW)
    candidate = StudyCandidate("a", "1.2.3", PatientIdentifier("HA-1", "HOSP_A"))
    store.record_decisions(job_id, [Decision(candidate, True, "rank 1")])
    store.update_study(job_id, "a", "1.2.3", StudyState.STORED, received=100, stored=100)
    store.finish_job(job_id, JobState.DONE, "1 study stored (100 instances)", NOW)
    store.close()
    assert jobs(config, "requeue", str(job_id)).exit_code == 0
    store = Store(tmp_path / "fdqr.sqlite")
    [study] = store.studies(job_id)
    store.close()
    assert (study.received, study.stored) == (0, 0)
