"""Matching received objects to retrievals, and the checks before an object is spooled."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from engine.coercion import Stamp
from engine.dimse.status import Status
from engine.dimse.storescp import Arrival
from engine.jobs.receiving import NO_JOB, Expectation, ExpectationRegistry, Receiver
from engine.model import Demographics, PatientIdentifier

LOCAL = PatientIdentifier("L1", "LOCAL")
REMOTE = PatientIdentifier("HA-1", "HOSP_A")


def expectation(
    tmp_path: Path,
    study: str,
    message_id: int = 7,
    remote: PatientIdentifier = REMOTE,
    job_id: int = 1,
) -> Expectation:
    return Expectation(
        job_id=job_id,
        source="hospital_a",
        source_ae_title="HOSP_A",
        study_instance_uid=study,
        remote=remote,
        stamp=Stamp(LOCAL, remote, Demographics("DOE^JANE", "19650312", "F")),
        spool_dir=tmp_path / "spool" / f"job-{job_id}" / study,
        message_id=message_id,
    )


def received_file(tmp_path: Path, patient_id: str, issuer: str = "", study: str = "1.2.3") -> Path:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = dcmread(path)
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study
    if issuer:
        ds.IssuerOfPatientID = issuer
    target = tmp_path / f"received-{patient_id}-{issuer}.dcm"
    ds.save_as(target)
    return target


def arrival(path: Path, caller: str = "HOSP_A", message_id: int | None = 7) -> Arrival:
    return Arrival(path, caller, "FDQR" if message_id else "", message_id)


def test_registry_matches_by_study(tmp_path: Path) -> None:
    registry = ExpectationRegistry("FDQR")
    wanted = expectation(tmp_path, "1.2.3")
    registry.expect(wanted)
    registry.expect(expectation(tmp_path, "4.5.6"))
    assert registry.match("1.2.3", "ANY", "", None) is wanted
    assert registry.match("9.9.9", "HOSP_A", "FDQR", 7) is None
    registry.forget(wanted)
    assert registry.match("1.2.3", "HOSP_A", "", None) is None


def test_registry_refuses_ambiguous_patients(tmp_path: Path) -> None:
    registry = ExpectationRegistry("FDQR")
    first = expectation(tmp_path, "1.2.3", message_id=7)
    other = expectation(
        tmp_path, "1.2.3", message_id=8, remote=PatientIdentifier("HA-2", "HOSP_A"), job_id=2
    )
    registry.expect(first)
    registry.expect(other)
    # Without the move request to tell them apart, two patients fit: no match.
    assert registry.match("1.2.3", "HOSP_A", "", None) is None
    assert registry.match("1.2.3", "HOSP_A", "FDQR", 8) is other
    assert registry.match("1.2.3", "HOSP_A", "FDQR", 7) is first


@pytest.fixture
def receiver_and_registry() -> tuple[Receiver, ExpectationRegistry]:
    registry = ExpectationRegistry("FDQR")
    return Receiver(registry, fsync=False), registry


@pytest.mark.parametrize("in_memory", [False, True])
def test_receiver_spools_stamped_object(
    tmp_path: Path, receiver_and_registry: tuple[Receiver, ExpectationRegistry], in_memory: bool
) -> None:
    """The object arrives in a file, or whole in memory (the engine's storage associations)."""
    receiver, registry = receiver_and_registry
    wanted = expectation(tmp_path, "1.2.3")
    registry.expect(wanted)
    path = received_file(tmp_path, "HA-1", "HOSP_A")
    if in_memory:
        received = Arrival(None, "HOSP_A", "FDQR", 7, data=path.read_bytes())
    else:
        received = arrival(path)

    verdict = receiver(received)

    assert verdict.status == Status.SUCCESS
    [spooled] = list(wanted.spool_dir.glob("*.dcm"))
    stamped = dcmread(spooled)
    assert stamped.PatientID == "L1"
    assert stamped.IssuerOfPatientID == "LOCAL"
    assert stamped.PixelData == dcmread(path).PixelData
    assert wanted.received == 1


def test_receiver_rejects_other_patient(
    tmp_path: Path, receiver_and_registry: tuple[Receiver, ExpectationRegistry]
) -> None:
    receiver, registry = receiver_and_registry
    wanted = expectation(tmp_path, "1.2.3")
    registry.expect(wanted)
    verdict = receiver(arrival(received_file(tmp_path, "HA-999")))
    assert verdict.status == Status.REFUSED_NOT_AUTHORIZED
    assert verdict.comment == "patient ID differs from the requested patient"
    assert wanted.rejected == 1
    assert not wanted.spool_dir.exists()


@pytest.mark.parametrize(("job_id", "owner"), [(3, "job 3"), (NO_JOB, "federated retrieve")])
def test_rejection_log_names_owner(
    tmp_path: Path,
    receiver_and_registry: tuple[Receiver, ExpectationRegistry],
    caplog: pytest.LogCaptureFixture,
    job_id: int,
    owner: str,
) -> None:
    receiver, registry = receiver_and_registry
    registry.expect(expectation(tmp_path, "1.2.3", job_id=job_id))
    receiver(arrival(received_file(tmp_path, "HA-999")))
    assert f"{owner}: rejected object" in caplog.text


def test_receiver_rejects_other_issuer(
    tmp_path: Path, receiver_and_registry: tuple[Receiver, ExpectationRegistry]
) -> None:
    receiver, registry = receiver_and_registry
    wanted = expectation(tmp_path, "1.2.3")
    registry.expect(wanted)
    verdict = receiver(arrival(received_file(tmp_path, "HA-1", "HOSP_B")))
    assert verdict.status == Status.REFUSED_NOT_AUTHORIZED
    assert wanted.received == 0


def test_receiver_rejects_unexpected_study(
    tmp_path: Path, receiver_and_registry: tuple[Receiver, ExpectationRegistry]
) -> None:
    receiver, registry = receiver_and_registry
    verdict = receiver(arrival(received_file(tmp_path, "HA-1", study="7.7.7")))
    assert verdict.status == Status.REFUSED_NOT_AUTHORIZED
    assert registry.unmatched == 1


def test_receiver_rejects_unreadable(
    tmp_path: Path, receiver_and_registry: tuple[Receiver, ExpectationRegistry]
) -> None:
    receiver, _ = receiver_and_registry
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    assert receiver(arrival(junk)).status == Status.CANNOT_UNDERSTAND


def file_of_person(tmp_path: Path, birth_date: str, sex: str) -> Path:
    path = received_file(tmp_path, "HA-1", "HOSP_A")
    ds = dcmread(path)
    ds.PatientBirthDate, ds.PatientSex = birth_date, sex
    target = tmp_path / f"person-{birth_date}-{sex}.dcm"
    ds.save_as(target)
    return target


@pytest.mark.parametrize(
    ("birth_date", "sex", "comment"),
    [
        ("19450707", "F", "patient birth date differs from the requested patient's"),
        ("19650312", "M", "patient sex differs from the requested patient's"),
        ("19650312", "F", ""),
        ("", "", ""),
    ],
)
def test_receiver_rejects_other_person_same_id(
    tmp_path: Path,
    receiver_and_registry: tuple[Receiver, ExpectationRegistry],
    birth_date: str,
    sex: str,
    comment: str,
) -> None:
    # The source's C-FIND response for the study gave 1965-03-12, F.
    receiver, registry = receiver_and_registry
    wanted = expectation(tmp_path, "1.2.3")
    wanted.demographics = Demographics("DOE^JANE", "1965-03-12", "f")
    registry.expect(wanted)
    verdict = receiver(arrival(file_of_person(tmp_path, birth_date, sex)))
    if comment:
        assert verdict.status == Status.REFUSED_NOT_AUTHORIZED
        assert verdict.comment == comment
        assert wanted.rejected == 1
    else:
        assert verdict.status == Status.SUCCESS
        assert wanted.received == 1


def test_stopped_retrieval_rejects_further_objects(
    tmp_path: Path, receiver_and_registry: tuple[Receiver, ExpectationRegistry]
) -> None:
    receiver, registry = receiver_and_registry
    running = expectation(tmp_path, "1.2.3")
    reasons: list[str] = []
    running.on_stopped = reasons.append
    registry.expect(running)
    assert receiver(arrival(received_file(tmp_path, "HA-1"))).status == Status.SUCCESS

    moved = "identifier HA-1^^^HOSP_A was moved to patient L2^^^LOCAL"
    registry.stop(running, moved)
    registry.stop(running, "a second reason")
    verdict = receiver(arrival(received_file(tmp_path, "HA-1")))

    assert verdict.status == Status.REFUSED_NOT_AUTHORIZED
    assert verdict.comment == f"retrieval stopped: {moved}"
    assert reasons == [moved]
    assert (running.received, running.rejected, running.rejected_again_on_retry) == (1, 1, 1)
    assert registry.active() == []


def test_watched_retrieval_stoppable_but_not_matched(tmp_path: Path) -> None:
    registry = ExpectationRegistry("FDQR")
    sending = expectation(tmp_path, "1.2.3")
    registry.watch(sending)
    assert registry.active() == [sending]
    assert registry.match("1.2.3", "HOSP_A", "FDQR", 7) is None
    registry.stop(sending, "identifier moved")
    assert sending.stopped == "identifier moved"
    assert registry.active() == []
    registry.unwatch(sending)
    registry.unwatch(sending)
