"""Helpers for integration tests: a real network of Orthanc sites and `fdqr run`."""

from __future__ import annotations

import io
import time
from pathlib import Path

import hl7.client
from pydicom import dcmread
from pydicom.dataset import Dataset

from engine.jobs.store import JobRecord, Store, StudyRecord
from engine.testing.orthanc import OrthancServer


def send(port: int, message: bytes) -> list[str]:
    """Send one message with python-hl7's MLLP client; return the ACK segments."""
    with hl7.client.MLLPClient("127.0.0.1", port) as client:
        return ack_segments(client.send_message(message))


def ack_segments(raw: bytes) -> list[str]:
    return raw.strip(b"\x0b\x1c\r").decode().split("\r")


def read_jobs(store_path: Path) -> list[JobRecord]:
    store = Store(store_path)
    try:
        return list(reversed(store.list_jobs(100)))
    finally:
        store.close()


def read_events(store_path: Path, job_id: int) -> list[str]:
    """Return the texts of a job's events, oldest first."""
    store = Store(store_path)
    try:
        return [text for _, text in store.events(job_id)]
    finally:
        store.close()


def place_order(port: int, store_path: Path, message: bytes, control_id: str) -> int:
    """Send an order, check that it is accepted, and return the newest job's id."""
    assert send(port, message)[1] == f"MSA|AA|{control_id}"
    return max(job.id for job in read_jobs(store_path))


def read_studies(store_path: Path, job_id: int) -> list[StudyRecord]:
    store = Store(store_path)
    try:
        return store.studies(job_id)
    finally:
        store.close()


def wait_for_job(store_path: Path, job_id: int, timeout: float = 90.0) -> JobRecord:
    """Wait until a job reaches a final state; fail with its last state otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        jobs = {job.id: job for job in read_jobs(store_path)} if store_path.exists() else {}
        last = jobs.get(job_id)
        if last is not None and last.state.finished:
            return last
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish within {timeout}s; last seen: {last}")


def instances_of_study(server: OrthancServer, study_uid: str) -> list[Dataset]:
    """Download every instance of a study from an Orthanc server."""
    for study in server.studies():
        if study["MainDicomTags"]["StudyInstanceUID"] == study_uid:
            return [dcmread(io.BytesIO(server.instance_file(i))) for i in study["InstanceIds"]]
    return []


def instance_by_uid(server: OrthancServer, sop_instance_uid: str) -> Dataset:
    matches = server.post_json(
        "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}
    )
    assert len(matches) == 1, f"{sop_instance_uid} found {len(matches)} times at {server.name}"
    return dcmread(io.BytesIO(server.instance_file(matches[0])))
