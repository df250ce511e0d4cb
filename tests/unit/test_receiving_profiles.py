"""The Storage SCP's receiver with a destination profile that rejects an object."""

from __future__ import annotations

from pathlib import Path

from engine.coercion import CoercionProfile, Stamp
from engine.dimse.status import Status
from engine.jobs.receiving import Expectation, ExpectationRegistry, Receiver
from engine.jobs.spool import Spool
from engine.model import Demographics
from tests.unit.test_receiving import (
    LOCAL,
    REMOTE,
    arrival,
    expectation,
    received_file,
)


def latin1_only_retrieval(
    tmp_path: Path, spool: Spool | None = None
) -> tuple[Receiver, Expectation]:
    """A receiver whose one retrieval stamps a name its Latin-1-only profile rejects."""
    registry = ExpectationRegistry("FDQR")
    receiver = Receiver(registry, fsync=False, spool=spool)
    profile = CoercionProfile(character_set="latin1", non_latin1="reject")
    wanted = expectation(tmp_path, "1.2.3")
    wanted.stamp = Stamp(LOCAL, REMOTE, Demographics("ŁUKASZ^ŻÓŁW", "19650312", "M"), profile)
    registry.expect(wanted)
    return receiver, wanted


def test_receiver_rejects_object_profile_forbids(tmp_path: Path) -> None:
    receiver, wanted = latin1_only_retrieval(tmp_path)

    verdict = receiver(arrival(received_file(tmp_path, "HA-1", "HOSP_A")))
    assert verdict.status == Status.PROCESSING_FAILURE
    assert verdict.comment == "rejected by the coercion profile"
    assert wanted.rejected == 1
    assert wanted.rejections == [
        "destination accepts only Latin-1: patient name has characters outside Latin-1"
    ]
    assert list(wanted.spool_dir.iterdir()) == []


def test_profile_rejection_frees_spool_space(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000, full_wait_seconds=0)
    receiver, _ = latin1_only_retrieval(tmp_path, spool)

    verdict = receiver(arrival(received_file(tmp_path, "HA-1", "HOSP_A")))

    assert verdict.status == Status.PROCESSING_FAILURE
    assert spool.used_bytes == 0
