"""`fdqr identity`: listing learned identifiers and merges, releasing quarantined jobs."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from engine.cli import main
from engine.identity import records
from engine.jobs.store import JobState, Store, StudyState
from engine.model import Decision, Demographics, PatientIdentifier, StudyCandidate
from engine.rules.timing import LocalZone
from tests.conftest import NOW, shipped_layout
from tests.unit.test_jobs import new_job

REMOTE = PatientIdentifier("HB-1", "HOSP_B")


def quarantined_job(tmp_path: Path) -> tuple[Path, int]:
    config = shipped_layout(tmp_path)

    store = Store(tmp_path / "fdqr.sqlite")
    job_id = store.add_job(new_job(), NOW)
    candidate = StudyCandidate("hospital_b", "1.2.3", REMOTE)
    store.record_decisions(job_id, [Decision(candidate, True, "rank 1")])
    store.update_study(job_id, "hospital_b", "1.2.3", StudyState.QUARANTINED, reason="held")
    store.finish_job(job_id, JobState.QUARANTINED, "quarantined", NOW)
    records.learn(store, PatientIdentifier("L1", "LOCAL"), REMOTE, NOW, "ADT1")
    records.merge(
        store, PatientIdentifier("L1", "LOCAL"), PatientIdentifier("L0", "LOCAL"), NOW, "A40"
    )
    store.close()
    return config, job_id


def test_release_accept_requeues_and_records(tmp_path: Path) -> None:
    config, job_id = quarantined_job(tmp_path)
    result = CliRunner().invoke(
        main, ["identity", "--config", str(config), "release", str(job_id), "--accept"]
    )
    assert result.exit_code == 0, result.output
    assert "remote patients accepted: HB-1^^^HOSP_B" in result.output

    store = Store(tmp_path / "fdqr.sqlite")
    job = store.get_job(job_id)
    assert job is not None
    assert job.state == JobState.QUEUED
    assert records.accepted_remote_patients(store, job_id) == {REMOTE}
    store.close()


def test_release_rejects_job_not_quarantined(tmp_path: Path) -> None:
    config, job_id = quarantined_job(tmp_path)
    runner = CliRunner()
    assert (
        runner.invoke(main, ["identity", "--config", str(config), "release", str(job_id)]).exit_code
        == 0
    )
    again = runner.invoke(main, ["identity", "--config", str(config), "release", str(job_id)])
    assert again.exit_code == 1
    assert f"job {job_id} is queued, not quarantined" in again.output


def test_learned_and_merges_listed(tmp_path: Path) -> None:
    config, _ = quarantined_job(tmp_path)
    runner = CliRunner()
    learned = runner.invoke(main, ["identity", "--config", str(config), "learned"])
    assert learned.exit_code == 0, learned.output
    assert "L1^^^LOCAL  HB-1^^^HOSP_B" in learned.output
    # Shown in the engine's time zone, with its name (the system's here).
    assert LocalZone().shown(NOW) in learned.output
    merged = runner.invoke(main, ["identity", "--config", str(config), "merges"])
    assert "L0^^^LOCAL  L1^^^LOCAL" in merged.output
    assert LocalZone().shown(NOW) in merged.output


def test_config_after_subcommand(tmp_path: Path) -> None:
    config, job_id = quarantined_job(tmp_path)
    runner = CliRunner()
    learned = runner.invoke(main, ["identity", "learned", "--config", str(config)])
    assert learned.exit_code == 0, learned.output
    assert "L1^^^LOCAL  HB-1^^^HOSP_B" in learned.output
    job = runner.invoke(main, ["jobs", "show", str(job_id), "--config", str(config)])
    assert job.exit_code == 0, job.output
    assert job.output.startswith(f"job {job_id}: quarantined")


def test_patient_shows_record_merges_and_learned(tmp_path: Path) -> None:
    config, _ = quarantined_job(tmp_path)
    store = Store(tmp_path / "fdqr.sqlite")
    local = PatientIdentifier("L1", "LOCAL")
    records.save_demographics(store, local, Demographics("DOE^JANE", "19650312", "F"), NOW, "A08")
    store.close()
    local_time = LocalZone().shown(NOW)

    result = CliRunner().invoke(main, ["identity", "--config", str(config), "patient", "L1"])

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "patient L1^^^LOCAL",
        f"  record: name ***, birth date ***, sex F; updated {local_time} by message A08",
        "  merged into it: L0^^^LOCAL",
        f"  learned HB-1^^^HOSP_B at {local_time} from message ADT1",
    ]


def test_patient_unredacted_and_merged_away(tmp_path: Path) -> None:
    config, _ = quarantined_job(tmp_path)
    store = Store(tmp_path / "fdqr.sqlite")
    records.save_demographics(
        store, PatientIdentifier("L0", "LOCAL"), Demographics("DOE^JANE", "", ""), NOW, "A04"
    )
    store.close()
    arguments = ["identity", "--config", str(config), "patient", "L0", "--unredacted"]

    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].startswith("  record: name DOE^JANE, birth date -, sex -; updated ")
    assert lines[2] == "  merged: L0^^^LOCAL -> L1^^^LOCAL; orders of this ID run as L1^^^LOCAL"
    assert lines[3] == "  learned identifiers: none"


def test_patient_id_with_issuer_rejected(tmp_path: Path) -> None:
    config, _ = quarantined_job(tmp_path)
    arguments = ["identity", "--config", str(config), "patient", "L1^^^LOCAL"]

    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 2
    assert "'L1^^^LOCAL' is not a local patient ID: give the ID alone" in result.output
