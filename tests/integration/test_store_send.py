"""C-STORE requests written by engine/dimse/storesend.py, against real Storage SCPs on loopback."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt

from engine.dicomfile import read_file_meta
from engine.dimse.forward import StoreSession
from engine.dimse.scu import AssociationTracker, NodeAddress, NodeClient
from engine.dimse.status import Status
from engine.testing.dcmtk import StoreSCP
from engine.testing.ports import free_port

pytestmark = pytest.mark.integration


def copies(folder: Path, name: str, count: int, branch: int = 1) -> list[Path]:
    """Write `count` copies of a pydicom test file with distinct SOP Instance UIDs."""
    source = get_testdata_file(name)
    assert source is not None
    ds = dcmread(source)
    paths = []
    for index in range(count):
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.7.{branch}.{index}"
        path = folder / f"{name}-{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    meta = read_file_meta(path)
    assert meta is not None
    return path.read_bytes()[meta.dataset_start :]


def client_for(ae_title: str, port: int) -> NodeClient:
    node = NodeAddress("destination", ae_title, "127.0.0.1", port, timeout_seconds=10)
    return NodeClient(node, "FDQR", AssociationTracker())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    # A small maximum PDU makes each object many P-DATA-TF PDUs.
    scp = StoreSCP(tmp_path / "storescp", max_pdu=4096, bit_preserving=True)
    scp.start()
    yield scp
    scp.stop()


def test_objects_arrive_byte_for_byte(tmp_path: Path, storescp: StoreSCP) -> None:
    files = copies(tmp_path, "CT_small.dcm", 3) + copies(tmp_path, "MR_small_RLE.dcm", 2, branch=2)

    with StoreSession(client_for(storescp.ae_title, storescp.dicom_port)) as session:
        problems = [session.send(path) for path in files]

    assert problems == [""] * 5
    received = {dcmread(path).SOPInstanceUID: path for path in storescp.files()}
    assert len(received) == 5
    for path in files:
        sent = dcmread(path)
        arrived = received[sent.SOPInstanceUID]
        assert dataset_bytes(arrived) == dataset_bytes(path)
        assert dcmread(arrived).file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID


class PynetdicomSCP:
    """A pynetdicom Storage SCP that returns one status for every C-STORE.

    after_store, when set, runs on the association after each object, from
    another thread a moment after the response.
    """

    def __init__(
        self,
        status: int = Status.SUCCESS,
        comment: str = "",
        max_pdu: int = 16382,
        after_store: str = "",
    ) -> None:
        self.status = status
        self.comment = comment
        self.after_store = after_store
        self.port = free_port()
        self.instances: list[str] = []
        self.datasets: list[bytes] = []
        self._ae = AE(ae_title="PYNETDICOM")
        self._ae.supported_contexts = AllStoragePresentationContexts
        self._ae.maximum_pdu_size = max_pdu
        self._server: Any = None
        self._lock = threading.Lock()

    def _on_store(self, event: Any) -> Dataset:
        with self._lock:
            self.instances.append(str(event.request.AffectedSOPInstanceUID))
            self.datasets.append(bytes(event.request.DataSet.getvalue()))
        if self.after_store:
            action = getattr(event.assoc, self.after_store)
            threading.Timer(0.2, action).start()
        status = Dataset()
        status.Status = self.status
        if self.comment:
            status.ErrorComment = self.comment
        return status

    def start(self) -> None:
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def stop(self) -> None:
        self._server.shutdown()


def test_failure_status_reported(tmp_path: Path) -> None:
    files = copies(tmp_path, "CT_small.dcm", 2)
    scp = PynetdicomSCP(Status.OUT_OF_RESOURCES, "disk full")
    scp.start()
    try:
        with StoreSession(client_for("PYNETDICOM", scp.port)) as session:
            problems = [session.send(path) for path in files]
    finally:
        scp.stop()

    assert scp.instances == [dcmread(path).SOPInstanceUID for path in files]
    assert all(problem.startswith("C-STORE status 0xA700") for problem in problems), problems
    assert all(problem.endswith(": disk full") for problem in problems)


@pytest.mark.parametrize("max_pdu", [0, 0x7FFFFFFF])
def test_large_peer_pdu_bounded(tmp_path: Path, max_pdu: int) -> None:
    """A destination without a maximum PDU length, or a huge one, costs no large buffer."""
    files = copies(tmp_path, "CT_small.dcm", 2)
    scp = PynetdicomSCP(max_pdu=max_pdu)
    scp.start()
    tracemalloc.start()
    try:
        with StoreSession(client_for("PYNETDICOM", scp.port)) as session:
            problems = [session.send(path) for path in files]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        scp.stop()

    assert problems == ["", ""]
    assert scp.datasets == [dataset_bytes(path) for path in files]
    # pynetdicom's SCP thread keeps each whole object in memory (39 KB here).
    assert peak < 8_000_000


@pytest.mark.parametrize("ending", ["release", "abort"])
def test_association_ended_by_peer_reopened(tmp_path: Path, ending: str) -> None:
    files = copies(tmp_path, "CT_small.dcm", 2)
    scp = PynetdicomSCP(after_store=ending)
    scp.start()
    try:
        with StoreSession(client_for("PYNETDICOM", scp.port)) as session:
            first = session.send(files[0])
            time.sleep(1.0)
            started = time.monotonic()
            second = session.send(files[1])
            seconds = time.monotonic() - started
    finally:
        scp.stop()

    assert first == ""
    assert second == ""
    # Well within the DIMSE timeout (10 s) that a dead association would cost.
    assert seconds < 3
    assert scp.instances == [dcmread(path).SOPInstanceUID for path in files]
