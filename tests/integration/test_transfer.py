"""The retrieval pipeline against real Orthanc and DCMTK peers: transfer syntaxes, C-GET,
association limits, a destination that is down, and repair of incomplete transfers."""

from __future__ import annotations

import datetime as dt
import io
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import Verification

from engine import config
from engine.dimse.queries import move_study
from engine.dimse.scu import (
    AssociationTracker,
    DimseError,
    NodeAddress,
    NodeClient,
    RetryPolicy,
)
from engine.hl7.cli import interpreter_for
from engine.jobs.store import JobRecord, JobState, Store, StudyState
from engine.model import MessageOrigin
from engine.testing.adt import demographics_message
from engine.testing.dcmtk import QueryRetrieveSCP, StoreSCP
from engine.testing.dicomgen import (
    PatientSpec,
    SeriesSpec,
    StudySpec,
    build_study,
    encode,
    years_before,
)
from engine.testing.ports import free_port
from engine.testing.scenario import Placement, Scenario, order_message, prefetch_scenario
from engine.testing.sites import ENGINE_AE_TITLE, EngineProcess, Network
from tests.integration.conftest import (
    instance_by_uid,
    place_order,
    read_events,
    read_jobs,
    read_studies,
    send,
    wait_for_job,
)

pytestmark = pytest.mark.integration

TODAY = dt.date.today()
BASE = prefetch_scenario(TODAY)
LOCAL = BASE.local_patient
AT_A = BASE.remote_patient_of("a-ct-chest-1y")


def ct_study(key: str, count: int) -> StudySpec:
    return StudySpec(
        key,
        years_before(TODAY, 1),
        "CT CHEST",
        f"ACC-{key}"[:16],
        (SeriesSpec("CT_small.dcm", count, "CT", "AXIAL", "CHEST"),),
    )


COMPRESSED_MR = StudySpec(
    "t-mr-compressed",
    years_before(TODAY, 2),
    "MR BRAIN",
    "ACC-MR-COMP",
    (
        SeriesSpec("MR_small_jp2klossless.dcm", 6, "MR", "T2 J2K", "HEAD"),
        SeriesSpec("MR_small_RLE.dcm", 6, "MR", "PD RLE", "HEAD"),
        SeriesSpec("MR_small.dcm", 3, "MR", "T1", "HEAD"),
    ),
)


class Site:
    """A network with an engine, built for one test and stopped after it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.network = Network(folder)
        self.engine: EngineProcess | None = None
        self.config = folder / "engine" / "engine.yaml"
        self.store = folder / "engine" / "fdqr.sqlite"
        self.spool = folder / "engine" / "spool"
        self.logs = 0

    @property
    def source(self) -> Any:
        return self.network.sites["hospital_a"]

    @property
    def destination(self) -> Any:
        return self.network.sites["local_pacs"]

    def load(self, *studies: StudySpec) -> None:
        scenario = Scenario(
            TODAY, LOCAL, tuple(Placement("hospital_a", AT_A, s) for s in studies), (), (), ()
        )
        for placement in scenario.placements:
            for ds in build_study(placement.patient, placement.study):
                self.source.upload(encode(ds))

    def configure(self, change: Callable[[dict[str, Any]], None]) -> None:
        self.network.write_engine_config(self.config)
        settings = yaml.safe_load(self.config.read_text())
        settings["jobs"].update(retry_delay_seconds=1, max_retry_delay_seconds=2, max_attempts=30)
        change(settings)
        self.config.write_text(yaml.safe_dump(settings, sort_keys=False))

    def start_engine(self) -> None:
        self.logs += 1
        self.engine = EngineProcess(
            self.config,
            self.network.ports.mllp,
            self.folder / f"engine-{self.logs}.log",
            log_level=os.environ.get("FDQR_TEST_LOG", "INFO"),
        )
        self.engine.start()

    def order(self, control_id: str) -> int:
        message = order_message(LOCAL, control_id, f"ACC-{control_id}", dt.datetime.now())
        return place_order(self.network.ports.mllp, self.store, message, control_id)

    def events(self, job_id: int) -> list[str]:
        return read_events(self.store, job_id)

    def log(self) -> str:
        return "".join(
            (self.folder / f"engine-{n}.log").read_text(errors="replace")
            for n in range(1, self.logs + 1)
        )

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        self.network.stop()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    instance = Site(tmp_path)
    yield instance
    instance.stop()


def wait_for_state(store: Path, job_id: int, state: JobState, timeout: float = 90.0) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {job.id: job for job in read_jobs(store)}
        if job_id in jobs and jobs[job_id].state == state:
            return jobs[job_id]
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {state} within {timeout}s")


def spooled(spool: Path) -> list[Path]:
    return sorted(spool.glob("job-*/*/*.dcm"))


def wait_for_spooled(site: Site, count: int) -> None:
    """Wait until the engine's spool contains at least count objects."""
    deadline = time.monotonic() + 60
    while len(spooled(site.spool)) < count:
        assert time.monotonic() < deadline, site.log()[-3000:]
        time.sleep(0.05)


def test_compressed_study_decompressed_for_storescp(site: Site) -> None:
    storescp = StoreSCP(site.folder / "storescp", ae_title="LOCAL_PACS")
    site.network.sites["local_pacs"] = storescp  # type: ignore[assignment]
    site.network.start()
    site.load(COMPRESSED_MR)
    site.configure(lambda s: s["nodes"]["local_pacs"].update(store_only=True))
    site.start_engine()

    job = wait_for_job(site.store, site.order("DEC1"))

    assert job.state == JobState.DONE, job.summary
    received = [dcmread(path) for path in storescp.files()]
    assert len(received) == COMPRESSED_MR.instance_count
    for instance in received:
        original = instance_by_uid(site.source, instance.SOPInstanceUID)
        assert not instance.file_meta.TransferSyntaxUID.is_compressed
        assert instance.PatientID == LOCAL.id
        assert instance.IssuerOfPatientID == "LOCAL"
        assert (instance.pixel_array == original.pixel_array).all()
    assert not spooled(site.spool)


def test_get_with_role_selection(site: Site) -> None:
    # The source does not know the engine's AE title, so a C-MOVE could not work.
    site.source.modalities.clear()
    site.network.start()
    site.load(ct_study("t-ct-get", 12), COMPRESSED_MR)
    site.configure(lambda s: s["nodes"]["hospital_a"].update(retrieve="get"))
    site.start_engine()

    job = wait_for_job(site.store, site.order("GET1"))

    assert job.state == JobState.DONE, job.summary
    assert site.destination.instance_count() == 12 + COMPRESSED_MR.instance_count
    stored = dcmread(
        io.BytesIO(site.destination.instance_file(site.destination.studies()[0]["InstanceIds"][0]))
    )
    assert stored.PatientID == LOCAL.id
    # The files pynetdicom received the objects into are removed.
    assert site.engine is not None
    assert list(site.engine.temp_dir.iterdir()) == []


def test_get_refused_falls_back_to_move(site: Site) -> None:
    engine_node = {
        "AET": ENGINE_AE_TITLE,
        "Host": "127.0.0.1",
        "Port": site.network.ports.dicom,
        "AllowGet": False,
    }
    site.source.extra_settings.update(
        DicomAlwaysAllowGet=False, DicomModalities={"fdqr": engine_node}
    )
    site.network.start()
    site.load(ct_study("t-ct-fallback", 10))
    site.configure(lambda s: s["nodes"]["hospital_a"].update(retrieve="auto"))
    site.start_engine()

    job_id = site.order("GET2")
    job = wait_for_job(site.store, job_id)

    assert job.state == JobState.DONE, job.summary
    assert site.destination.instance_count() == 10
    assert any("retrieving with C-MOVE instead" in text for text in site.events(job_id))


def test_unknown_move_destination_is_configuration_error(site: Site) -> None:
    # dcmqrscp answers A801 for an AE title missing from its host table (Orthanc 1.10
    # answers C000 instead), and this one knows no move destination at all.
    source = QueryRetrieveSCP(site.folder / "dcmqrscp", "HOSP_A", {})
    source.start()
    try:
        for ds in build_study(AT_A, ct_study("t-ct-a801", 2)):
            source.upload(encode(ds))
        node = NodeAddress("hospital_a", "HOSP_A", "127.0.0.1", source.dicom_port, 30)
        client = NodeClient(node, ENGINE_AE_TITLE, AssociationTracker())
        with pytest.raises(DimseError) as raised:
            client.move(move_study(ct_study("t-ct-a801", 2).uid), ENGINE_AE_TITLE, 1)
    finally:
        source.stop()

    assert raised.value.transient is False
    assert f"does not know the move destination '{ENGINE_AE_TITLE}'" in str(raised.value)
    assert "known destinations of node hospital_a" in str(raised.value)


def three_patients(site: Site) -> list[tuple[PatientSpec, PatientSpec, StudySpec]]:
    """Load one study each for three patients at the source; write their identity table."""
    patients = []
    for n in (101, 102, 103):
        local = PatientSpec(f"L{n}", "LOCAL", "DOE^JOHN", "19700101", "M")
        remote = PatientSpec(f"HA-{n}", "HOSP_A", "DOE^JOHN", "19700101", "M")
        study = ct_study(f"t-ct-three-{n}", 8)
        for ds in build_study(remote, study):
            site.source.upload(encode(ds))
        patients.append((local, remote, study))
    references = [
        {
            "local": {"id": local.id, "issuer": "LOCAL"},
            "remote": [{"id": remote.id, "issuer": "HOSP_A"}],
        }
        for local, remote, _ in patients
    ]
    (site.folder / "identity.yaml").write_text(yaml.safe_dump({"cross_references": references}))
    return patients


def order_for(site: Site, patient: PatientSpec) -> int:
    control_id = f"ORD{patient.id}"
    message = order_message(patient, control_id, f"ACC{patient.id}", dt.datetime.now())
    return place_order(site.network.ports.mllp, site.store, message, control_id)


def dcmqrscp_destination(site: Site, max_associations: int) -> QueryRetrieveSCP:
    destination = QueryRetrieveSCP(
        site.folder / "dcmqrscp", "LOCAL_PACS", {}, max_associations=max_associations
    )
    site.network.sites["local_pacs"] = destination  # type: ignore[assignment]
    return destination


def test_association_limit_shared_by_three_jobs(site: Site) -> None:
    # dcmqrscp rejects a second association while one is open (and, in fork mode,
    # for a moment after it ended), so the engine's one association is retried.
    dcmqrscp_destination(site, max_associations=1)
    site.network.start()
    patients = three_patients(site)

    def one_association(settings: dict[str, Any]) -> None:
        settings["identity"]["table"] = str(site.folder / "identity.yaml")
        settings["jobs"].update(concurrency=3, max_attempts=1)
        settings["nodes"]["local_pacs"]["max_associations"] = 1
        settings["transfer"] = {
            "association_attempts": 10,
            "association_retry_seconds": 0.2,
            "destination_associations": 2,
        }

    site.configure(one_association)
    site.start_engine()

    ids = [order_for(site, local) for local, _, _ in patients]
    jobs = [wait_for_job(site.store, job_id, timeout=180) for job_id in ids]

    assert [job.state for job in jobs] == [JobState.DONE] * 3, [job.summary for job in jobs]
    store = Store(site.store)
    try:
        stored = [s.stored for job_id in ids for s in store.studies(job_id) if s.selected]
    finally:
        store.close()
    assert stored == [8, 8, 8]


def test_transient_rejection_backs_off_and_retries(site: Site) -> None:
    destination = dcmqrscp_destination(site, max_associations=1)
    site.network.start()
    [(local, _, _), *_] = three_patients(site)

    def retries(settings: dict[str, Any]) -> None:
        settings["identity"]["table"] = str(site.folder / "identity.yaml")
        settings["transfer"] = {"association_attempts": 8, "association_retry_seconds": 0.5}

    site.configure(retries)
    site.start_engine()

    # Another AE keeps the only association open for two seconds.
    ae = AE(ae_title="OTHER")
    held = ae.associate(
        "127.0.0.1", destination.dicom_port, [build_context(Verification)], "LOCAL_PACS"
    )
    assert held.is_established
    timer = threading.Timer(2.0, held.release)
    timer.start()
    try:
        job_id = order_for(site, local)
        job = wait_for_job(site.store, job_id, timeout=120)
    finally:
        timer.cancel()
        if held.is_established:
            held.release()

    assert job.state == JobState.DONE, job.summary
    assert job.attempts == 1
    assert "association with local_pacs" in site.log()
    assert "rejected" in site.log()


def test_stop_frees_frozen_peer_threads(tmp_path: Path) -> None:
    """An engine stop frees the threads of associations with frozen peers:
    one waiting for a response, one releasing, one being requested."""
    # storescp serves one association at a time: a peer for each.
    peers = [StoreSCP(tmp_path / name) for name in ("waiting", "releasing", "requesting")]
    tracker = AssociationTracker()
    clients = [
        NodeClient(
            NodeAddress(f"frozen-{n}", peer.ae_title, peer.host, peer.dicom_port, 60),
            ENGINE_AE_TITLE,
            tracker,
        )
        for n, peer in enumerate(peers)
    ]
    established = threading.Barrier(3)
    leave = threading.Event()
    outcomes: dict[str, str] = {}

    def waiting_for_response() -> None:
        with clients[0].associate([build_context(Verification)]) as association:
            established.wait()
            leave.wait()
            status = association.send_c_echo()
            outcomes["echo"] = "answered" if "Status" in status else "no answer"

    def releasing() -> None:
        with clients[1].associate([build_context(Verification)]):
            established.wait()
            leave.wait()
        outcomes["release"] = "left"

    def requesting() -> None:
        try:
            clients[2].echo()
        except DimseError as error:
            outcomes["request"] = str(error)

    threads = [
        threading.Thread(target=waiting_for_response),
        threading.Thread(target=releasing),
        threading.Thread(target=requesting),
    ]
    try:
        for peer in peers:
            peer.start()
        peers[2].pause()
        for thread in threads:
            thread.start()
        established.wait(timeout=30)
        for peer in peers[:2]:
            peer.pause()
        leave.set()
        time.sleep(0.5)
        stopping = time.monotonic()
        tracker.abort_all()
        for thread in threads:
            thread.join(timeout=40)
        took = time.monotonic() - stopping
    finally:
        for peer in peers:
            if peer.running:
                peer.resume()
            peer.stop()

    assert not any(thread.is_alive() for thread in threads)
    assert outcomes["echo"] == "no answer"
    assert outcomes["release"] == "left"
    assert outcomes["request"] == "engine is stopping"
    assert took < 6


def test_request_aborted_by_peer_is_retried() -> None:
    """A node that aborts a request instead of rejecting it (as some do at their
    association limit) gets the request again. A refused connection is not retried."""
    peer = AE(ae_title="BUSY")
    peer.add_supported_context(Verification)
    requests: list[int] = []

    def abort_first(event: Any) -> None:
        requests.append(1)
        if len(requests) == 1:
            event.assoc.abort()

    server = peer.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_REQUESTED, abort_first)]
    )
    retry = RetryPolicy(attempts=3, first_delay_seconds=0.05)
    try:
        node = NodeAddress("busy", "BUSY", "127.0.0.1", server.server_address[1], 10)
        NodeClient(node, ENGINE_AE_TITLE, AssociationTracker(), retry=retry).echo()
    finally:
        server.shutdown()
    assert len(requests) == 2

    down = NodeAddress("down", "DOWN", "127.0.0.1", free_port(), 10)
    started = time.monotonic()
    with pytest.raises(DimseError, match="failed \\(refused, timed out or aborted\\)"):
        NodeClient(down, ENGINE_AE_TITLE, AssociationTracker(), retry=retry).echo()
    assert time.monotonic() - started < 5


def test_request_closed_at_once_is_retried() -> None:
    """A node that closes each connection as soon as it accepts it gets the request again."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def close_each() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            connection.close()

    threading.Thread(target=close_each, daemon=True).start()
    retry = RetryPolicy(attempts=3, first_delay_seconds=0.05)
    node = NodeAddress("closing", "CLOSING", "127.0.0.1", listener.getsockname()[1], 10)
    try:
        with pytest.raises(DimseError, match="closed by the node before it responded\\) 3 times"):
            NodeClient(node, ENGINE_AE_TITLE, AssociationTracker(), retry=retry).echo()
    finally:
        listener.close()
    assert len(accepted) == 3


def test_destination_down_spool_bounded_then_repaired(site: Site) -> None:
    study = ct_study("t-ct-down", 60)
    site.network.start()
    site.load(study)
    site.destination.stop()

    def small_spool(settings: dict[str, Any]) -> None:
        # CT_small instances are about 40 KB, so 1 MiB has room for about 26 of 60.
        settings["spool"].update(max_bytes=1024 * 1024, full_wait_seconds=0.3)

    site.configure(small_spool)
    site.start_engine()
    job_id = site.order("DOWN1")

    waiting = wait_for_state(site.store, job_id, JobState.WAITING)
    assert "not complete" in waiting.summary
    waiting_files = spooled(site.spool)
    assert 0 < len(waiting_files) < 60
    assert sum(path.stat().st_size for path in waiting_files) <= 1024 * 1024 + 50_000
    # Orthanc 1.10 ends a C-MOVE at the first refused sub-operation (status C000).
    assert any("objects refused (spool full" in text for text in site.events(job_id))

    site.destination.start()
    job = wait_for_job(site.store, job_id, timeout=180)

    assert job.state == JobState.DONE, job.summary
    assert job.attempts >= 2
    assert site.destination.instance_count() == 60
    assert not spooled(site.spool)
    events = site.events(job_id)
    assert any("objects wait in the spool; storing them" in text for text in events)
    [refetch] = [text for text in events if "; fetching " in text][:1]
    present, missing = (
        int(part.split()[-1])
        for part in refetch.split(": destination has ")[1].split("; fetching ")
    )
    assert present + missing == 60
    assert present == len(waiting_files)


# A patient the identity table does not know: hospital A's ID is learned from an ADT.
LEARNED = PatientSpec("L-MOVE-1", "LOCAL", "MOVE^ALICE", "19800101", "F")
LEARNED_AT_A = PatientSpec("HA-MOVE-1", "HOSP_A", "MOVE^ALICE", "19800101", "F")
NEW_OWNER = PatientSpec("L-MOVE-2", "LOCAL", "OWNER^BOB", "19700101", "M")
MOVED = "identifier HA-MOVE-1^^^HOSP_A was moved to patient L-MOVE-2^^^LOCAL"


def start_with_learned_patient(site: Site, study: StudySpec, spool_bytes: int) -> int:
    """Load the study of LEARNED at hospital A, stop the destination, and order it.

    Returns the job id. The spool takes spool_bytes, and the receiver waits up to
    5 s for room before it rejects an object.
    """
    site.network.start()
    for dataset in build_study(LEARNED_AT_A, study):
        site.source.upload(encode(dataset))
    site.destination.stop()

    def small_spool(settings: dict[str, Any]) -> None:
        settings["spool"].update(max_bytes=spool_bytes, full_wait_seconds=5)

    site.configure(small_spool)
    site.start_engine()
    port = site.network.ports.mllp
    learn = demographics_message(
        LEARNED, "MOVE-A08-1", dt.datetime.now(), "A08", ["HA-MOVE-1^^^HOSP_A"]
    )
    assert send(port, learn)[1] == "MSA|AA|MOVE-A08-1"
    message = order_message(LEARNED, "MOVE-ORM", "ACC-MOVE", dt.datetime.now())
    return place_order(port, site.store, message, "MOVE-ORM")


def move_identifier(site: Site) -> None:
    """Send the ADT^A08 that gives hospital A's ID to another local patient."""
    move = demographics_message(
        NEW_OWNER, "MOVE-A08-2", dt.datetime.now(), "A08", ["HA-MOVE-1^^^HOSP_A"]
    )
    assert send(site.network.ports.mllp, move)[1] == "MSA|AA|MOVE-A08-2"


def test_retrieval_stopped_when_identifier_moves_during_it(site: Site) -> None:
    # 60 objects of about 40 KB and room for about 26: the retrieve waits on a full spool
    # while the destination is down, and the ADT arrives during that wait.
    job_id = start_with_learned_patient(site, ct_study("t-ct-move", 60), 1024 * 1024)
    wait_for_spooled(site, 5)
    move_identifier(site)

    job = wait_for_job(site.store, job_id)

    assert job.state == JobState.FAILED, job.summary
    assert job.attempts == 1
    assert not spooled(site.spool)
    [study] = [s for s in read_studies(site.store, job_id) if s.selected]
    assert study.state == StudyState.FAILED
    assert study.reason.startswith(f"retrieval stopped: {MOVED}; "), study.reason
    assert 5 <= int(study.reason.split("; ")[1].split()[0]) < 60
    events = site.events(job_id)
    assert f"retrieval of study {study.study_instance_uid} from hospital_a stopped: {MOVED}" in (
        site.log()
    )
    assert any(
        text.startswith(f"study {study.study_instance_uid}: retrieval stopped") for text in events
    )
    # Nothing of it reaches the destination when it is back.
    site.destination.start()
    assert site.destination.instance_count() == 0


def test_move_written_by_other_process_stops_retrieval(site: Site) -> None:
    # The move reaches the store without the ADT passing through this engine's
    # intake, as from an intake process that ended before it reported the ADT.
    # The engine's periodic check must find it.
    job_id = start_with_learned_patient(site, ct_study("t-ct-move-4", 60), 1024 * 1024)
    wait_for_spooled(site, 5)
    move = demographics_message(
        NEW_OWNER, "MOVE-A08-3", dt.datetime.now(), "A08", ["HA-MOVE-1^^^HOSP_A"]
    )
    now = dt.datetime.now(dt.UTC)
    interpreter = interpreter_for(config.load(site.config), now)
    plan = interpreter.plan(interpreter.parse(move))
    store = Store(site.store)
    try:
        origin = MessageOrigin("HIS", "HOSPITAL", "ADT^A08", "MOVE-A08-3")
        store.record_message(origin, "test", move, b"", plan.outcome, plan.jobs, now, plan.actions)
    finally:
        store.close()

    job = wait_for_job(site.store, job_id)

    assert job.state == JobState.FAILED, job.summary
    [study] = [s for s in read_studies(site.store, job_id) if s.selected]
    assert study.reason.startswith(f"retrieval stopped: {MOVED}; "), study.reason
    assert not spooled(site.spool)
    site.destination.start()
    assert site.destination.instance_count() == 0


def test_job_waiting_for_study_stops_when_identifier_moves(site: Site) -> None:
    # A second order of the patient selects the same study and waits for the first job.
    first = start_with_learned_patient(site, ct_study("t-ct-move-3", 60), 1024 * 1024)
    message = order_message(LEARNED, "MOVE-ORM2", "ACC-MOVE2", dt.datetime.now())
    second = place_order(site.network.ports.mllp, site.store, message, "MOVE-ORM2")
    wait_for_spooled(site, 5)
    move_identifier(site)

    for job_id in (first, second):
        job = wait_for_job(site.store, job_id)
        assert job.state == JobState.FAILED, job.summary
        [study] = [s for s in read_studies(site.store, job_id) if s.selected]
        assert study.reason.startswith(f"retrieval stopped: {MOVED}; "), study.reason
    [waiting] = [s for s in read_studies(site.store, second) if s.selected]
    assert waiting.received == 0
    assert not spooled(site.spool)


def test_spooled_objects_deleted_when_identifier_moved_between_attempts(site: Site) -> None:
    job_id = start_with_learned_patient(site, ct_study("t-ct-move-2", 10), 10 * 1024 * 1024)
    waiting = wait_for_state(site.store, job_id, JobState.WAITING)
    assert "not complete" in waiting.summary
    assert len(spooled(site.spool)) == 10
    move_identifier(site)
    site.destination.start()

    job = wait_for_job(site.store, job_id)

    assert job.attempts >= 2
    assert "spooled objects of 1 study deleted unsent" in job.summary, job.summary
    assert not spooled(site.spool)
    assert site.destination.instance_count() == 0
    [study] = [s for s in read_studies(site.store, job_id) if s.selected]
    assert (study.state, study.reason) == (
        StudyState.FAILED,
        f"not fetched: {MOVED}; 10 spooled objects deleted unsent",
    )


def test_cancel_stops_retrieval_in_progress(site: Site) -> None:
    # As above: the retrieve waits on a full spool while the destination is down.
    site.network.start()
    site.load(ct_study("t-ct-stop", 60))
    site.destination.stop()

    def small_spool(settings: dict[str, Any]) -> None:
        settings["spool"].update(max_bytes=1024 * 1024, full_wait_seconds=5)

    site.configure(small_spool)
    site.start_engine()
    job_id = site.order("STOP1")
    wait_for_spooled(site, 5)
    cancel = order_message(LOCAL, "STOP2", "ACC-STOP1", dt.datetime.now(), order_control="CA")
    assert send(site.network.ports.mllp, cancel)[1] == "MSA|AA|STOP2"

    job = wait_for_job(site.store, job_id, timeout=60)

    assert job.state == JobState.CANCELLED, job.summary
    assert "(a retrieve stopped, after 1 study)" in job.summary
    assert job.attempts == 1
    assert not spooled(site.spool)
    [study] = [s for s in read_studies(site.store, job_id) if s.selected]
    assert study.reason.startswith("retrieval stopped: its job was cancelled ("), study.reason
    assert "check them" not in study.reason


def test_spooled_objects_of_cancelled_job_deleted(site: Site) -> None:
    site.network.start()
    site.load(ct_study("t-ct-cancel", 10))
    site.destination.stop()
    site.configure(lambda settings: None)
    site.start_engine()
    job_id = site.order("SWEEP1")
    wait_for_state(site.store, job_id, JobState.WAITING)
    assert len(spooled(site.spool)) == 10

    cancel = order_message(LOCAL, "SWEEP2", "ACC-SWEEP1", dt.datetime.now(), order_control="CA")
    assert send(site.network.ports.mllp, cancel)[1] == "MSA|AA|SWEEP2"
    assert wait_for_job(site.store, job_id).state == JobState.CANCELLED
    assert site.engine is not None
    site.engine.stop()
    site.start_engine()

    deadline = time.monotonic() + 30
    while spooled(site.spool):
        assert time.monotonic() < deadline, site.log()[-3000:]
        time.sleep(0.2)
    assert f"spool: deleted 10 objects of job {job_id}, which is cancelled" in site.log()


def test_missing_instances_fetched_again(site: Site) -> None:
    study = ct_study("t-ct-repair", 30)
    site.network.start()
    site.load(study)
    site.configure(lambda s: None)
    site.start_engine()
    assert wait_for_job(site.store, site.order("REP1")).state == JobState.DONE
    # The job's and the study's folders went with the last object.
    assert list(site.spool.iterdir()) == []

    # The destination loses ten instances; the next order must fetch only those.
    [stored] = site.destination.studies()
    for instance_id in stored["InstanceIds"][:10]:
        site.destination._request("DELETE", f"/instances/{instance_id}")
    assert site.destination.instance_count() == 20

    job_id = site.order("REP2")
    job = wait_for_job(site.store, job_id)

    assert job.state == JobState.DONE, job.summary
    assert site.destination.instance_count() == 30
    assert any(": destination has 20; fetching 10" in text for text in site.events(job_id))
    store = Store(site.store)
    try:
        [record] = [s for s in store.studies(job_id) if s.selected]
    finally:
        store.close()
    assert record.received == 10


def start_with_mixed_study(site: Site, stranger: PatientSpec, key: str, accession: str) -> None:
    """Start the source with a study of 3 objects of our patient, then 2 of stranger.

    Both series share one Study Instance UID, and the stranger's are loaded last.
    Then start the engine.
    """
    study = StudySpec(
        key,
        years_before(TODAY, 1),
        "CT CHEST",
        accession,
        (
            SeriesSpec("CT_small.dcm", 3, "CT", "AXIAL", "CHEST"),
            SeriesSpec("CT_small.dcm", 2, "CT", "OTHER PERSON", "CHEST"),
        ),
    )
    site.network.start()
    for patient, series_number in ((AT_A, 1), (stranger, 2)):
        for ds in build_study(patient, study):
            if ds.SeriesNumber == series_number:
                site.source.upload(encode(ds))
    site.configure(lambda s: None)
    site.start_engine()


def test_objects_of_another_patient_refused(site: Site) -> None:
    # The source keeps two objects of another patient under the study's UID, and its
    # C-MOVE of the study sends them too.
    stranger = PatientSpec("HA-STRANGER", AT_A.issuer, "ROE^RICHARD", "19580101", "M")
    start_with_mixed_study(site, stranger, "t-ct-mixed", "ACC-MIXED")

    job_id = site.order("MIX1")
    job = wait_for_job(site.store, job_id)

    assert job.state == JobState.DONE, job.summary
    assert job.summary.endswith("objects refused in 1 study (see the job's log)"), job.summary
    [record] = read_studies(site.store, job_id)
    assert record.reason.startswith("1 objects refused (patient ID differs"), record.reason
    assert site.destination.instance_count() == 3
    events = site.events(job_id)
    # Orthanc 1.10 ends a C-MOVE at the first refused sub-operation, so one is refused.
    assert any("object(s) from hospital_a (patient ID differs" in text for text in events), (
        "\n".join(events)
    )


def test_objects_of_another_person_under_same_id_refused(site: Site) -> None:
    # The source files two objects of another person under our patient's ID and study UID.
    # They are loaded last, so the source's C-FIND response shows our patient's attributes.
    stranger = PatientSpec(AT_A.id, AT_A.issuer, "GREEN^BOB", "19450707", "M")
    start_with_mixed_study(site, stranger, "t-ct-same-id", "ACC-SAME-ID")

    job = wait_for_job(site.store, site.order("SAMEID1"))

    # The study cannot be complete without the refused objects, and a retry would refuse
    # them again, so the job ends at once, failed: no study is complete.
    assert job.state == JobState.FAILED, job.summary
    assert job.attempts == 1, job.summary
    assert site.destination.instance_count() == 3, job.summary
    assert "objects refused in 1 study" in job.summary, job.summary
    events = "\n".join(site.events(job.id))
    assert "birth date differs from the requested patient's" in events, events
