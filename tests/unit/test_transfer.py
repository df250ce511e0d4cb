"""Parts of the retrieval pipeline on plain data: contexts, spool, send queue, timeouts, limits."""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom.pdu_primitives import A_ABORT, P_DATA
from pynetdicom.sop_class import CTImageStorage, MRImageStorage
from twisted.internet import defer

from engine.coercion import Stamp
from engine.dimse.contexts import (
    COMMON_SYNTAXES,
    MAX_CONTEXTS,
    retrieve_contexts,
    split_store_keys,
    store_contexts,
)
from engine.dimse.forward import Forwarder
from engine.dimse.queries import InstanceRef
from engine.dimse.scu import (
    AssociationTracker,
    NodeAddress,
    NodeClient,
    _outcome,
    make_interruptible,
)
from engine.dimse.status import Status
from engine.dimse.storesend import pause_reactor
from engine.dimse.transcode import TranscodeError, transcode
from engine.dimse.transport import BoundedPDataQueue
from engine.jobs.prefetch import study_counts
from engine.jobs.receiving import ExpectationRegistry
from engine.jobs.spool import Spool, SpoolFull
from engine.jobs.store import Store, StudyRecord, StudyState
from engine.jobs.transfer import (
    SourceNode,
    StudyReport,
    StudyTransfer,
    TransferSettings,
    _add_outcome,
    _repair_identifiers,
)
from engine.model import Demographics, PatientIdentifier, StudyCandidate
from tests.conftest import NOW
from tests.unit.test_jobs import new_job

GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"


def test_store_contexts_offer_stored_syntax_first() -> None:
    contexts = store_contexts(
        [(CTImageStorage, JPEG2000Lossless), (CTImageStorage, ExplicitVRLittleEndian)]
    )
    assert [(c.abstract_syntax, c.transfer_syntax) for c in contexts] == [
        (CTImageStorage, [JPEG2000Lossless]),
        (CTImageStorage, [ExplicitVRLittleEndian]),
        (CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]


def test_split_store_keys_fits_context_limit() -> None:
    keys = [(f"1.2.3.{n}", JPEG2000Lossless) for n in range(100)]
    groups = split_store_keys(keys)
    assert [key for group in groups for key in group] == keys
    assert len(groups) == 2
    for group in groups:
        assert len(store_contexts(group)) <= MAX_CONTEXTS


def test_retrieve_contexts_roles_per_class() -> None:
    contexts, roles = retrieve_contexts(GET_MODEL, [CTImageStorage, MRImageStorage])
    assert contexts[0].abstract_syntax == GET_MODEL
    assert len(contexts) == 1 + 2 * len(COMMON_SYNTAXES)
    assert all(len(c.transfer_syntax) == 1 for c in contexts[1:])
    assert [(r.sop_class_uid, r.scp_role) for r in roles] == [
        (CTImageStorage, True),
        (MRImageStorage, True),
    ]


def test_retrieve_contexts_many_classes_share_one_each() -> None:
    classes = [f"1.2.3.{n}" for n in range(20)]
    contexts, roles = retrieve_contexts(GET_MODEL, classes)
    assert len(roles) == 20
    assert len(contexts) == 21
    assert contexts[1].transfer_syntax == list(COMMON_SYNTAXES)
    with pytest.raises(ValueError, match="128 storage SOP classes"):
        retrieve_contexts(GET_MODEL, [f"1.2.3.{n}" for n in range(128)])


def test_spool_reserve_waits_then_refuses(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100, full_wait_seconds=0)
    spool.reserve(60)
    with pytest.raises(SpoolFull, match="60 of 100 bytes"):
        spool.reserve(60)
    spool.release(60)
    spool.reserve(60)
    assert spool.used_bytes == 60


def test_spool_reserve_wakes_on_release(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100, full_wait_seconds=30)
    spool.reserve(80)
    threading.Timer(0.2, spool.release, args=(80,)).start()
    started = time.monotonic()
    spool.reserve(80)
    assert time.monotonic() - started < 10
    assert spool.used_bytes == 80


def test_withheld_files_leave_spool_unsent(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    study = spool.study_dir(1, "1.2.3")
    study.mkdir(parents=True)
    forwarder = Forwarder(
        NodeClient(NodeAddress("local", "LOCAL", "127.0.0.1", 9, 1), "FDQR", AssociationTracker()),
        spool.confirm,
        workers=1,
    )
    for name in ("a", "b"):
        path = study / f"{name}.dcm"
        spool.reserve(10)
        path.write_bytes(b"x" * 10)
        forwarder.put(path)
    forwarder.withhold("identifier moved")
    forwarder.finish()

    # No association is opened: port 9 has no DICOM node, and nothing is sent there.
    forwarder.run_worker()

    assert spool.pending(study) == []
    assert spool.used_bytes == 0
    assert (forwarder.outcome.stored, forwarder.outcome.withheld) == (0, 2)
    assert forwarder.outcome.error is None


def test_spool_open_counts_and_drops_partials(tmp_path: Path) -> None:
    study = tmp_path / "job-1" / "1.2.3"
    study.mkdir(parents=True)
    (study / "a.dcm").write_bytes(b"x" * 10)
    (study / "b.dcm.partial").write_bytes(b"x" * 99)
    spool = Spool(tmp_path, max_bytes=1000)
    spool.open()
    assert spool.used_bytes == 10
    assert not (study / "b.dcm.partial").exists()
    assert spool.pending(study) == [study / "a.dcm"]
    spool.confirm(study / "a.dcm")
    assert spool.used_bytes == 0
    spool.remove_if_empty(study)
    assert not (tmp_path / "job-1").exists()


def test_spool_open_deletes_federated_retrieves(tmp_path: Path) -> None:
    # A crash left a federated retrieve's objects; no caller waits for them any more.
    left = tmp_path / "federation" / "retrieve-8" / "1.2.3"
    left.mkdir(parents=True)
    (left / "a.dcm").write_bytes(b"x" * 10)
    spool = Spool(tmp_path, max_bytes=1000)
    spool.open()
    assert not (tmp_path / "federation").exists()
    assert spool.used_bytes == 0


class FakeDUL:
    def __init__(self) -> None:
        self._kill_thread = False
        self.ident = 1

    def is_alive(self) -> bool:
        return not self._kill_thread


def test_send_queue_holds_p_data_until_taken() -> None:
    dul = FakeDUL()
    pending = BoundedPDataQueue(dul, limit=2)  # type: ignore[arg-type]
    pending.put(P_DATA())
    pending.put(P_DATA())
    third = threading.Thread(target=pending.put, args=(P_DATA(),))
    third.start()
    third.join(0.3)
    assert third.is_alive()
    pending.put(A_ABORT())  # never waits, even with the queue full
    pending.get()
    pending.get()
    third.join(5)
    assert not third.is_alive()
    assert pending.qsize() == 2


def test_send_queue_stops_waiting_when_dul_ends() -> None:
    dul = FakeDUL()
    pending = BoundedPDataQueue(dul, limit=1)  # type: ignore[arg-type]
    pending.put(P_DATA())
    blocked = threading.Thread(target=pending.put, args=(P_DATA(),))
    blocked.start()
    dul._kill_thread = True
    blocked.join(5)
    assert not blocked.is_alive()


class FakeDimse:
    def __init__(self, timeout: float) -> None:
        self.dimse_timeout = timeout
        self.msg_queue: queue.Queue[Any] = queue.Queue()

    def get_msg(self, block: bool = False) -> Any:
        return None, None


class FakeDul:
    def __init__(self) -> None:
        self.to_user_queue: queue.Queue[Any] = queue.Queue()

    def receive_pdu(self, wait: bool = False, timeout: float | None = None) -> Any:
        try:
            return self.to_user_queue.get(block=wait, timeout=timeout)
        except queue.Empty:
            return None


class FakeAssociation:
    def __init__(self, timeout: float) -> None:
        self.dimse = FakeDimse(timeout)
        self.dul = FakeDul()


def test_dimse_timeout_restarts_on_each_response() -> None:
    association = FakeAssociation(timeout=0.6)
    make_interruptible(association, lambda: False)  # type: ignore[arg-type]

    def respond() -> None:
        for n in range(5):
            time.sleep(0.3)
            association.dimse.msg_queue.put((1, n))

    threading.Thread(target=respond).start()
    # 1.5 s in all, longer than the timeout, but never 0.6 s without a response.
    assert [association.dimse.get_msg(block=True) for _ in range(5)] == [(1, n) for n in range(5)]
    assert association.dimse.get_msg(block=True) == (None, None)


def test_dimse_wait_ends_when_stopping() -> None:
    association = FakeAssociation(timeout=60)
    stopping = threading.Event()
    make_interruptible(association, stopping.is_set)  # type: ignore[arg-type]
    threading.Timer(0.2, stopping.set).start()
    started = time.monotonic()
    assert association.dimse.get_msg(block=True) == (None, None)
    assert time.monotonic() - started < 5


def test_release_wait_ends_when_stopping() -> None:
    association = FakeAssociation(timeout=60)
    stopping = threading.Event()
    make_interruptible(association, stopping.is_set)  # type: ignore[arg-type]
    association.dul.to_user_queue.put("A-RELEASE-RP")
    assert association.dul.receive_pdu(wait=True, timeout=60) == "A-RELEASE-RP"
    threading.Timer(0.2, stopping.set).start()
    started = time.monotonic()
    assert association.dul.receive_pdu(wait=True, timeout=60) is None
    assert time.monotonic() - started < 5


def test_release_wait_keeps_its_timeout() -> None:
    association = FakeAssociation(timeout=60)
    make_interruptible(association, lambda: False)  # type: ignore[arg-type]
    started = time.monotonic()
    assert association.dul.receive_pdu(wait=True, timeout=0.5) is None
    assert 0.4 < time.monotonic() - started < 5


class CountingClient(NodeClient):
    """A NodeClient whose associations are fakes, counting how many are open at once."""

    def __init__(self, limit: int) -> None:
        node = NodeAddress("pacs", "PACS", "127.0.0.1", 104)
        super().__init__(node, "FDQR", AssociationTracker(), max_associations=limit)
        self.open_now = 0
        self.most = 0
        self.lock = threading.Lock()

    def _open(self, *args: Any) -> Any:
        with self.lock:
            self.open_now += 1
            self.most = max(self.most, self.open_now)
        return FakeOpen(self)


class FakeOpen:
    is_established = True

    def __init__(self, client: CountingClient) -> None:
        self.client = client
        self.dimse = FakeDimse(1)
        self.dul = FakeDul()

    def release(self) -> None:
        with self.client.lock:
            self.client.open_now -= 1

    def abort(self, block: bool = True) -> None:
        self.release()


def test_node_client_limits_open_associations() -> None:
    client = CountingClient(limit=2)

    def use() -> None:
        with client.associate([]):
            time.sleep(0.05)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert client.most == 2
    assert client.open_now == 0


def test_failed_instances_read_from_final_response() -> None:
    final = Dataset()
    final.Status = Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    final.NumberOfCompletedSuboperations = 8
    final.NumberOfFailedSuboperations = 2
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = ["1.2.3.1", "1.2.3.2"]
    outcome = _outcome(final, identifier)
    assert outcome.failed_instances == ("1.2.3.1", "1.2.3.2")
    assert (outcome.completed, outcome.failed) == (8, 2)

    report = StudyReport()
    _add_outcome(report, outcome)
    assert report.failed_instances == ["1.2.3.1", "1.2.3.2"]
    assert report.failed == 2
    assert not report.transient  # B000 is a warning: the repair pass decides


def test_out_of_resources_is_transient() -> None:
    final = Dataset()
    final.Status = Status.OUT_OF_RESOURCES_SUB_OPERATIONS
    report = StudyReport()
    _add_outcome(report, _outcome(final, None))
    assert report.transient
    assert "0xA702" in report.problem


def test_repair_identifiers_per_series() -> None:
    missing = [InstanceRef("9.1", f"9.1.{n}", CTImageStorage) for n in range(250)]
    missing.append(InstanceRef("9.2", "9.2.1", CTImageStorage))
    identifiers = _repair_identifiers("9", missing)
    assert [i.QueryRetrieveLevel for i in identifiers] == ["IMAGE"] * 3
    assert [i.SeriesInstanceUID for i in identifiers] == ["9.1", "9.1", "9.2"]
    assert [i["SOPInstanceUID"].VM for i in identifiers] == [200, 50, 1]


def test_transcode_decompresses_rle(tmp_path: Path) -> None:
    source = get_testdata_file("MR_small_RLE.dcm")
    assert source is not None
    target = tmp_path / "out.dcm"
    transcode(Path(source), target, ExplicitVRLittleEndian)
    original, decoded = dcmread(source), dcmread(target)
    assert decoded.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert decoded.SOPInstanceUID == original.SOPInstanceUID
    assert (decoded.pixel_array == original.pixel_array).all()


def test_transcode_refuses_compressed_target(tmp_path: Path) -> None:
    source = get_testdata_file("CT_small.dcm")
    assert source is not None
    with pytest.raises(TranscodeError, match="compressed transfer syntax"):
        transcode(Path(source), tmp_path / "out.dcm", JPEG2000Lossless)


class AnsweringPools:
    """Node pools that return the same C-FIND responses to every query, at once."""

    def __init__(self, answers: list[Dataset]) -> None:
        self.answers = answers
        self.queries: list[Dataset] = []

    def run(self, node: str, function: Any, query: Dataset) -> defer.Deferred[list[Dataset]]:
        self.queries.append(query)
        return defer.succeed(self.answers)


def _study_transfer(tmp_path: Path, pools: AnsweringPools) -> StudyTransfer:
    return StudyTransfer(
        pools=pools,  # type: ignore[arg-type]
        clients={"local": SimpleNamespace(find=None)},  # type: ignore[dict-item]
        sources={
            "hospital_a": SourceNode("hospital_a", "HOSP_A", issuer="HOSP_A"),
            "hospital_b": SourceNode("hospital_b", "HOSP_B", issuer="HOSP_B"),
        },
        registry=ExpectationRegistry("FDQR"),
        receiver=None,
        spool=Spool(tmp_path, 1 << 30),
        engine_ae_title="FDQR",
        settings=TransferSettings(),
    )


def _held_study(patient_id: str | list[str], issuer: str, instances: str) -> Dataset:
    """Return the destination's C-FIND response for study 1.2.3."""
    response = Dataset()
    response.StudyInstanceUID = "1.2.3"
    response.PatientID = patient_id
    response.IssuerOfPatientID = issuer
    response.NumberOfStudyRelatedInstances = instances
    return response


def _fetch_study(
    tmp_path: Path, pools: AnsweringPools
) -> tuple[StudyReport, list[tuple[str, int]]]:
    """Fetch study 1.2.3 (30 instances at hospital_a) for local patient L1; return the
    report and the notes."""
    transfer = _study_transfer(tmp_path, pools)
    store = Store(":memory:")
    job = store.get_job(store.add_job(new_job(), NOW))
    assert job is not None
    local = PatientIdentifier("L1", "LOCAL")
    remote = PatientIdentifier("HA-1", "HOSP_A")
    candidate = StudyCandidate("hospital_a", "1.2.3", remote, instance_count=30)
    notes: list[tuple[str, int]] = []

    def note(text: str, level: int = logging.INFO) -> defer.Deferred[None]:
        notes.append((text, level))
        return defer.succeed(None)

    reports: list[StudyReport] = []
    transfer.fetch(job, candidate, Stamp(local, remote, Demographics()), note).addCallback(
        reports.append
    )
    [report] = reports
    return report, notes


@pytest.mark.parametrize(
    ("held_by", "issuer", "shown"),
    [
        ("L99999", "", "L99999"),
        (["L1", "L99999"], "", "L1\\L99999"),
        # The same value in another domain is another patient.
        ("L1", "HOSP_B", "L1 of issuer HOSP_B"),
    ],
)
def test_study_held_under_other_patient_fails(
    tmp_path: Path, held_by: str | list[str], issuer: str, shown: str
) -> None:
    # Counted as present before, yet the destination's 10 instances belong to another
    # patient ID (or to a PatientID of two values, which is not L1 either).
    pools = AnsweringPools([_held_study(held_by, issuer, "10")])
    report, notes = _fetch_study(tmp_path, pools)
    assert report.state == StudyState.FAILED
    assert f"under patient ID {shown}, not L1 of issuer LOCAL" in report.problem
    assert not report.transient
    assert pools.queries[0].PatientID == ""
    assert pools.queries[0].IssuerOfPatientID == ""
    assert notes[-1][1] == logging.WARNING
    assert len(pools.queries) == 1


# An archive may return no IssuerOfPatientID or replace it with its own name.
@pytest.mark.parametrize("issuer", ["LOCAL", "", "ARCHIVE_OWN"])
def test_study_held_under_same_patient_present(tmp_path: Path, issuer: str) -> None:
    report, _ = _fetch_study(tmp_path, AnsweringPools([_held_study("L1", issuer, "30")]))
    assert report.state == StudyState.PRESENT
    assert "under patient ID" not in report.problem


def _earlier(received: int, stored: int) -> StudyRecord:
    remote = PatientIdentifier("HA-1", "HOSP_A")
    return StudyRecord(
        1, "hospital_a", "1.2.3", remote, None, "CT", "", True, "", StudyState.PENDING, 100,
        received, stored, 0,
    )  # fmt: skip


def test_study_counts_add_up_over_attempts() -> None:
    report = StudyReport(StudyState.STORED, received=40, stored=40)
    assert study_counts(report, _earlier(60, 60)) == (100, 100)
    assert study_counts(report, None) == (40, 40)


def test_study_counts_after_crash_use_confirmed() -> None:
    # The attempt the engine was killed in saved nothing. This one stored the 53
    # objects left in the spool, and the destination confirms all 100.
    report = StudyReport(StudyState.STORED, received=0, stored=53, confirmed=100)
    assert study_counts(report, None) == (53, 100)
    # A confirmed count below what the job stored (another system deleted some) keeps
    # the job's own count.
    lower = StudyReport(StudyState.STORED, received=100, stored=100, confirmed=90)
    assert study_counts(lower, None) == (100, 100)


class LoopingAssociation:
    """The turn of pynetdicom's association loop, with the GIL slowing it between steps."""

    def __init__(self) -> None:
        self._reactor_checkpoint = threading.Event()
        self._reactor_checkpoint.set()
        self._is_paused = False
        self.turns = 0
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def is_alive(self) -> bool:
        return self.running

    def _loop(self) -> None:
        while self.running:
            time.sleep(0.001)
            self._is_paused = True
            self._reactor_checkpoint.wait()
            time.sleep(0.0005)
            self._is_paused = False
            self.turns += 1


def test_pause_waits_until_association_thread_is_blocked() -> None:
    association = LoopingAssociation()
    # The pause comes at every point of the thread's loop. Without waiting for the thread
    # to block, about half of these pauses end while it is still turning.
    delays = random.Random(7)
    try:
        for _ in range(40):
            pause_reactor(association)  # type: ignore[arg-type]
            turns = association.turns
            time.sleep(0.003)
            # A thread that only passed the checkpoint would take the response off the queue.
            assert association.turns == turns
            association._reactor_checkpoint.set()
            time.sleep(delays.uniform(0, 0.002))
    finally:
        association.running = False
        association._reactor_checkpoint.set()
        association.thread.join(timeout=5)
