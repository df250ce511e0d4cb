"""The Storage SCP's own storage associations, against real clients on loopback.

pynetdicom and DCMTK's storescu send to the engine's StorageSCP; raw sockets
play peers that break the protocol. Associations that propose anything but
storage and Verification must still reach pynetdicom.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from engine.dicomfile import read_file_meta
from engine.dimse import storeassoc
from engine.dimse import upperlayer as ul
from engine.dimse.status import Status
from engine.dimse.storescp import Arrival, StorageSCP, Verdict
from engine.testing.orthanc import dcmtk_environment
from engine.testing.ports import free_port
from tests.pdus import request_bytes

AE_TITLE = "FDQR"


class Recorder:
    """An ArrivalHandler that keeps a copy of each object and returns a set verdict."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.arrivals: list[Arrival] = []
        self.copies: list[Path] = []
        self.verdict = Verdict(Status.SUCCESS)
        self.lock = threading.Lock()

    def __call__(self, arrival: Arrival) -> Verdict:
        copy = self.folder / f"copy-{len(self.copies)}.dcm"
        source = arrival.source
        copy.write_bytes(source if isinstance(source, bytes) else source.read_bytes())
        with self.lock:
            self.arrivals.append(arrival)
            self.copies.append(copy)
        return self.verdict


@pytest.fixture
def incoming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder where received objects wait for their handler."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def recorder(tmp_path: Path) -> Recorder:
    folder = tmp_path / "copies"
    folder.mkdir()
    return Recorder(folder)


def start_scp(
    recorder: Recorder, max_pdu_bytes: int = 262144, max_associations: int = 32
) -> StorageSCP:
    scp = StorageSCP(
        AE_TITLE,
        "127.0.0.1",
        free_port(),
        recorder,
        max_pdu_bytes=max_pdu_bytes,
        max_associations=max_associations,
    )
    scp.start()
    return scp


@pytest.fixture
def scp(recorder: Recorder, incoming: Path) -> Iterator[StorageSCP]:
    server = start_scp(recorder)
    yield server
    server.stop()


def ct_file() -> Path:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    return Path(path)


def dataset_bytes(path: Path) -> bytes:
    meta = read_file_meta(path)
    assert meta is not None
    return path.read_bytes()[meta.dataset_start :]


def client(max_pdu: int = 16382) -> AE:
    ae = AE(ae_title="HOSP_A")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    return ae


def test_pynetdicom_store_received_whole(scp: StorageSCP, recorder: Recorder) -> None:
    association = client().associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
    assert association.is_established
    status = association.send_c_store(dcmread(ct_file()))
    association.release()

    assert status.Status == Status.SUCCESS
    assert scp.storage_associations == 1
    assert len(recorder.arrivals) == 1
    arrival = recorder.arrivals[0]
    assert arrival.calling_ae_title == "HOSP_A"
    received = dcmread(recorder.copies[0])
    original = dcmread(ct_file())
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert received.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert received.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert received.PixelData == original.PixelData
    assert received.PatientID == original.PatientID


def test_small_pdus_reassembled(recorder: Recorder, incoming: Path) -> None:
    scp = start_scp(recorder, max_pdu_bytes=4096)
    try:
        ae = client()
        association = ae.associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
        status = association.send_c_store(ct_file())
        association.release()
    finally:
        scp.stop()

    assert status.Status == Status.SUCCESS
    # pynetdicom encodes the dataset again, so the datasets are compared, not their bytes.
    assert dcmread(recorder.copies[0]) == dcmread(ct_file())


def test_handler_verdict_returned(scp: StorageSCP, recorder: Recorder) -> None:
    recorder.verdict = Verdict(Status.OUT_OF_RESOURCES, "spool full")

    association = client().associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
    status = association.send_c_store(ct_file())
    association.release()

    assert status.Status == Status.OUT_OF_RESOURCES
    assert status.ErrorComment == "spool full"


def test_echo_on_storage_association(scp: StorageSCP) -> None:
    association = client().associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
    status = association.send_c_echo()
    association.release()

    assert status.Status == Status.SUCCESS
    assert scp.storage_associations == 1


def test_several_objects_on_one_association(scp: StorageSCP, recorder: Recorder) -> None:
    ds = dcmread(ct_file())
    association = client().associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
    statuses = []
    for index in range(5):
        ds.SOPInstanceUID = f"1.2.3.4.{index}"
        statuses.append(association.send_c_store(ds).Status)
    association.release()

    assert statuses == [Status.SUCCESS] * 5
    uids = [dcmread(path).SOPInstanceUID for path in recorder.copies]
    assert uids == [f"1.2.3.4.{index}" for index in range(5)]


def test_small_object_kept_in_memory(scp: StorageSCP, recorder: Recorder, incoming: Path) -> None:
    association = client().associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
    association.send_c_store(ct_file())
    association.release()

    [arrival] = recorder.arrivals
    assert arrival.path is None
    assert arrival.data is not None
    assert arrival.size == len(arrival.data)
    assert list(incoming.iterdir()) == []


def test_large_object_spilled_to_file(
    scp: StorageSCP, recorder: Recorder, incoming: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storeassoc, "MEMORY_OBJECT_BYTES", 4096)

    association = client().associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
    status = association.send_c_store(ct_file())
    association.release()

    assert status.Status == Status.SUCCESS
    [arrival] = recorder.arrivals
    assert arrival.data is None
    assert arrival.path is not None
    assert arrival.path.parent == incoming
    assert dcmread(recorder.copies[0]) == dcmread(ct_file())
    # The temporary file is removed once the handler has returned.
    assert not arrival.path.exists()
    assert list(incoming.iterdir()) == []


def test_query_association_left_to_pynetdicom(scp: StorageSCP) -> None:
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    association = ae.associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
    assert association.is_established
    status = association.send_c_echo()
    association.release()

    assert status.Status == Status.SUCCESS
    assert scp.storage_associations == 0
    # The StorageSCP has no Q/R service here, so pynetdicom rejects that context.
    assert [str(c.abstract_syntax) for c in association.accepted_contexts] == [Verification]


def test_wrong_called_ae_title_rejected(scp: StorageSCP) -> None:
    association = client().associate("127.0.0.1", scp.port, ae_title="OTHER")

    assert association.is_rejected
    assert scp.storage_associations == 0


def test_association_limit_rejects_transiently(recorder: Recorder, incoming: Path) -> None:
    scp = start_scp(recorder, max_associations=1)
    try:
        first = client().associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
        first_established = first.is_established
        second = client().associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
        first.release()
        assert wait_for(lambda: scp.open_storage_associations == 0)
        third = client().associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
        third_established = third.is_established
        third.release()
    finally:
        scp.stop()

    assert first_established
    assert second.is_rejected
    assert second.acceptor.primitive.result == ul.REJECTED_TRANSIENT
    assert second.acceptor.primitive.diagnostic == ul.REASON_LOCAL_LIMIT_EXCEEDED
    assert third_established


def test_dcmtk_storescu_accepted(scp: StorageSCP, recorder: Recorder, tmp_path: Path) -> None:
    files = []
    ds = dcmread(ct_file())
    for index in range(3):
        ds.SOPInstanceUID = f"1.2.3.9.{index}"
        path = tmp_path / f"{index}.dcm"
        ds.save_as(path)
        files.append(str(path))

    result = subprocess.run(
        ["storescu", "-aec", AE_TITLE, "-aet", "HOSP_A", "127.0.0.1", str(scp.port), *files],
        capture_output=True,
        text=True,
        timeout=60,
        env=dcmtk_environment(),
    )

    assert result.returncode == 0, result.stderr
    assert scp.storage_associations == 1
    assert [dcmread(path).SOPInstanceUID for path in recorder.copies] == [
        f"1.2.3.9.{index}" for index in range(3)
    ]


# Peers that break the protocol, on raw sockets.


def open_raw(scp: StorageSCP) -> socket.socket:
    """Open a storage association by hand; return its socket after the A-ASSOCIATE-AC."""
    sock = socket.create_connection(("127.0.0.1", scp.port), timeout=5)
    sock.sendall(request_bytes([(CTImageStorage, ["1.2.840.10008.1.2.1"])]))
    pdus = ul.PDUSocket(sock)
    pdu_type, length = pdus.read_header()
    pdus.read_bytes(length)
    assert pdu_type == ul.ASSOCIATE_AC
    return sock


def store_command(message_id: int = 1) -> bytes:
    return ul.encode_command(
        [
            (ul.AFFECTED_SOP_CLASS_UID, CTImageStorage),
            (ul.COMMAND_FIELD, ul.C_STORE_RQ),
            (ul.MESSAGE_ID, message_id),
            (ul.PRIORITY, 0),
            (ul.COMMAND_DATA_SET_TYPE, 0),
            (ul.AFFECTED_SOP_INSTANCE_UID, "1.2.3.77"),
        ]
    )


def data_pdu(data: bytes, last: bool) -> bytes:
    buffer = bytearray(12 + len(data))
    ul.pack_data_headers(buffer, 1, len(data), ul.LAST_FRAGMENT if last else 0)
    buffer[12:] = data
    return bytes(buffer)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionError, TimeoutError):
            return received
        if not chunk:
            return received
        received += chunk


def wait_for(condition: object, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_abort_mid_object_leaves_nothing(
    scp: StorageSCP, recorder: Recorder, incoming: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storeassoc, "MEMORY_OBJECT_BYTES", 500)
    sock = open_raw(scp)
    sock.sendall(ul.encode_command_pdus(1, store_command(), 0))
    sock.sendall(data_pdu(dataset_bytes(ct_file())[:1000], last=False))
    assert wait_for(lambda: len(list(incoming.iterdir())) == 1)
    sock.sendall(ul.encode_abort(0, 0))

    assert wait_for(lambda: list(incoming.iterdir()) == [])
    sock.close()
    assert recorder.arrivals == []


def test_unknown_pdu_aborted(scp: StorageSCP, recorder: Recorder) -> None:
    sock = open_raw(scp)
    sock.sendall(bytes([0x09, 0, 0, 0, 0, 2, 0, 0]))
    received = read_until_closed(sock)
    sock.close()

    assert received[:1] == bytes([ul.ABORT])
    assert received[9] == ul.ABORT_REASON_UNEXPECTED_PDU
    # The server goes on serving.
    association = client().associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
    status = association.send_c_store(ct_file())
    association.release()
    assert status.Status == Status.SUCCESS


def test_data_without_command_aborted(scp: StorageSCP, recorder: Recorder) -> None:
    sock = open_raw(scp)
    sock.sendall(data_pdu(b"\x00" * 16, last=True))
    received = read_until_closed(sock)
    sock.close()

    assert received[:1] == bytes([ul.ABORT])
    assert recorder.arrivals == []


def test_pdv_on_unaccepted_context_aborted(scp: StorageSCP) -> None:
    sock = open_raw(scp)
    command = store_command()
    pdv = ul.PDV_HEADER.pack(len(command) + 2, 7, ul.COMMAND_FRAGMENT | ul.LAST_FRAGMENT)
    body = pdv + command
    sock.sendall(struct_pdu(ul.P_DATA_TF, body))
    received = read_until_closed(sock)
    sock.close()

    assert received[:1] == bytes([ul.ABORT])


def test_oversized_pdu_aborted(recorder: Recorder, incoming: Path) -> None:
    scp = start_scp(recorder, max_pdu_bytes=4096)
    try:
        sock = open_raw(scp)
        sock.sendall(ul.encode_command_pdus(1, store_command(), 0))
        sock.sendall(data_pdu(b"\x00" * 8192, last=True))
        received = read_until_closed(sock)
        sock.close()
    finally:
        scp.stop()

    assert received[:1] == bytes([ul.ABORT])
    assert recorder.arrivals == []


def test_unsupported_command_answered(scp: StorageSCP) -> None:
    sock = open_raw(scp)
    command = ul.encode_command(
        [
            (ul.AFFECTED_SOP_CLASS_UID, CTImageStorage),
            (ul.COMMAND_FIELD, 0x0020),
            (ul.MESSAGE_ID, 9),
            (ul.COMMAND_DATA_SET_TYPE, 0),
        ]
    )
    sock.sendall(ul.encode_command_pdus(1, command, 0))
    sock.sendall(data_pdu(b"\x08\x00\x52\x00\x06\x00STUDY ", last=True))
    pdus = ul.PDUSocket(sock)
    pdu_type, length = pdus.read_header()
    body = pdus.read_bytes(length)
    sock.close()

    assert pdu_type == ul.P_DATA_TF
    response = ul.decode_command(body[6:])
    assert response.command_field == 0x8020
    assert response.number(ul.MESSAGE_ID_BEING_RESPONDED_TO) == 9
    assert response.number(ul.STATUS) == 0x0211


def test_stop_aborts_open_association(recorder: Recorder, incoming: Path) -> None:
    scp = start_scp(recorder)
    sock = open_raw(scp)
    assert wait_for(lambda: scp.storage_associations == 1)

    scp.stop()
    received = read_until_closed(sock)
    sock.close()

    assert received[:1] == bytes([ul.ABORT])


def struct_pdu(pdu_type: int, body: bytes) -> bytes:
    return bytes([pdu_type, 0]) + len(body).to_bytes(4, "big") + body


def read_response(sock: socket.socket) -> ul.Command:
    pdus = ul.PDUSocket(sock)
    pdu_type, length = pdus.read_header()
    body = pdus.read_bytes(length)
    assert pdu_type == ul.P_DATA_TF
    return ul.decode_command(body[6:])


@pytest.mark.parametrize("message_id", [32, 0x2000, 0xFFFF])
def test_message_ids_of_padding_bytes_accepted(
    scp: StorageSCP, recorder: Recorder, message_id: int
) -> None:
    """Message IDs whose bytes are spaces or NULs are values, not padding."""
    sock = open_raw(scp)
    sock.sendall(ul.encode_command_pdus(1, store_command(message_id), 0))
    sock.sendall(data_pdu(dataset_bytes(ct_file()), last=True))
    response = read_response(sock)
    sock.close()

    assert response.number(ul.MESSAGE_ID_BEING_RESPONDED_TO) == message_id
    assert response.number(ul.STATUS) == Status.SUCCESS
    assert len(recorder.arrivals) == 1


def test_store_without_instance_uid_aborted(scp: StorageSCP, recorder: Recorder) -> None:
    sock = open_raw(scp)
    command = ul.encode_command(
        [
            (ul.AFFECTED_SOP_CLASS_UID, CTImageStorage),
            (ul.COMMAND_FIELD, ul.C_STORE_RQ),
            (ul.MESSAGE_ID, 1),
            (ul.COMMAND_DATA_SET_TYPE, 0),
        ]
    )
    sock.sendall(ul.encode_command_pdus(1, command, 0))
    received = read_until_closed(sock)
    sock.close()

    assert received[:1] == bytes([ul.ABORT])
    assert recorder.arrivals == []


def test_disk_failure_answered_out_of_resources(
    scp: StorageSCP, recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storeassoc, "MEMORY_OBJECT_BYTES", 4096)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    small = Dataset()
    small.SOPClassUID = CTImageStorage
    small.SOPInstanceUID = "1.2.3.88"
    small.PatientID = "HA-1"
    small.file_meta = FileMetaDataset()
    small.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    association = client().associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
    large_status = association.send_c_store(dcmread(ct_file()))
    small_status = association.send_c_store(small)
    association.release()

    assert large_status.Status == Status.OUT_OF_RESOURCES
    assert large_status.ErrorComment == "object could not be received"
    # The association goes on: an object small enough for memory is stored.
    assert small_status.Status == Status.SUCCESS
    assert [arrival.data is not None for arrival in recorder.arrivals] == [True]
