"""HL7 intake on real sockets: python-hl7's mllp_send, concurrent senders, TLS, limits."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine.jobs.store import MessageRecord, Store
from engine.testing.certificates import certificate_authority, issue
from engine.testing.intake import INTAKE_PATIENT, write_intake_config
from engine.testing.ports import free_port
from engine.testing.scenario import order_message
from engine.testing.sites import EngineProcess

pytestmark = pytest.mark.integration

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
WHEN = dt.datetime(2026, 3, 14, 9, 0)
MAX_MESSAGE_BYTES = 2 * 1024 * 1024


def order(control_id: str, **options: object) -> bytes:
    return order_message(INTAKE_PATIENT, control_id, f"ACC-{control_id}", WHEN, **options)


class RunningEngine:
    def __init__(self, process: EngineProcess, port: int, store: Path) -> None:
        self.process = process
        self.port = port
        self.store = store

    def messages(self) -> int:
        return len(self.stored_messages())

    def stored_messages(self) -> list[MessageRecord]:
        store = Store(self.store)
        try:
            return store.list_messages(100_000)
        finally:
            store.close()

    def jobs_of(self, control_id: str) -> int:
        store = Store(self.store)
        try:
            [message] = store.list_messages(control_id=control_id)
            return len(store.message_jobs(message.id))
        finally:
            store.close()


def start_engine(folder: Path, mllp: dict[str, object], host: str = "127.0.0.1") -> RunningEngine:
    store = folder / "fdqr.sqlite"
    config, port = write_intake_config(folder, str(store), mllp)
    process = EngineProcess(config, port, folder / "engine.log", mllp_host=host)
    process.start()
    return RunningEngine(process, port, store)


def stop_engine(engine: RunningEngine) -> None:
    status = engine.process.stop()
    assert status == 0, engine.process.log_text()[-3000:]


# Intake in the engine process, and in two intake processes of its own (mllp.processes).
@pytest.fixture(scope="module", params=[0, 2], ids=["in-engine", "two-processes"])
def engine(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[RunningEngine]:
    running = start_engine(
        tmp_path_factory.mktemp("intake"),
        {
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "idle_timeout_seconds": 3,
            "processes": request.param,
        },
    )
    yield running
    stop_engine(running)


def exchange(connection: socket.socket, data: bytes, timeout: float = 30.0) -> bytes:
    """Send bytes and return the next frame, without its framing."""
    connection.sendall(data)
    return read_frame(connection, timeout)


def read_frame(connection: socket.socket, timeout: float = 30.0) -> bytes:
    """Return the next frame; bytes after it stay in the socket's receive buffer."""
    connection.settimeout(timeout)
    data = b""
    while not data.endswith(END_BLOCK):
        # One byte at a time, so a second frame that arrived with this one is left unread.
        chunk = connection.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} bytes: {data[:100]!r}")
        data += chunk
    return data.strip(START_BLOCK).removesuffix(END_BLOCK)


def msa(ack: bytes) -> str:
    return ack.decode().split("\r")[1]


def test_mllp_send_file_of_messages(engine: RunningEngine, tmp_path: Path) -> None:
    adt = (
        b"MSH|^~\\&|HIS|ADT|FDQR|LOCAL|20260314||ADT^A08|SEND-2|P|2.5\r"
        b"EVN|A08|20260314\rPID|1||INTAKE-1^^^LOCAL^MR||INTAKE^PATIENT||19700101|O\r"
    )
    unsupported = order("SEND-3").replace(b"ORM^O01", b"ORU^R01")
    messages = [order("SEND-1"), adt, unsupported]
    batch = tmp_path / "messages.hl7"
    batch.write_bytes(b"".join(START_BLOCK + message + END_BLOCK for message in messages))
    mllp_send = shutil.which("mllp_send", path=str(Path(sys.executable).parent))
    assert mllp_send is not None, "python-hl7's mllp_send is not installed"

    result = subprocess.run(
        [mllp_send, "-p", str(engine.port), "-f", str(batch), "127.0.0.1"],
        capture_output=True,
        timeout=60,
        check=True,
    )

    acks = [line.strip(b"\x0b\x1c\r") for line in result.stdout.split(b"\n") if line.strip()]
    assert [msa(ack) for ack in acks[:2]] == ["MSA|AA|SEND-1", "MSA|AA|SEND-2"]
    assert msa(acks[2]) == "MSA|AR|SEND-3"
    assert "|200^Unsupported message type^HL70357|" in acks[2].decode()
    assert engine.jobs_of("SEND-1") == 1
    assert engine.jobs_of("SEND-2") == 0


def test_mllp_send_loose_file_with_crlf(engine: RunningEngine, tmp_path: Path) -> None:
    batch = tmp_path / "loose.hl7"
    text = order("LOOSE-1") + order("LOOSE-2")
    batch.write_bytes(text.replace(b"\r", b"\r\n"))
    mllp_send = shutil.which("mllp_send", path=str(Path(sys.executable).parent))
    assert mllp_send is not None

    result = subprocess.run(
        [mllp_send, "--loose", "-p", str(engine.port), "-f", str(batch), "127.0.0.1"],
        capture_output=True,
        timeout=60,
        check=True,
    )

    acks = [line.strip(b"\x0b\x1c\r") for line in result.stdout.split(b"\n") if line.strip()]
    assert [msa(ack) for ack in acks] == ["MSA|AA|LOOSE-1", "MSA|AA|LOOSE-2"]


def test_concurrent_senders_each_answered_in_order(engine: RunningEngine) -> None:
    senders, per_sender = 6, 25
    answers: dict[int, list[str]] = {}
    failures: list[BaseException] = []

    def send(number: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", engine.port), timeout=30) as connection:
                answers[number] = [
                    msa(exchange(connection, frame_of(order(f"CC-{number}-{index}"))))
                    for index in range(per_sender)
                ]
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=send, args=(number,)) for number in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    for number in range(senders):
        assert answers[number] == [f"MSA|AA|CC-{number}-{index}" for index in range(per_sender)]


def test_noise_between_frames_and_one_byte_reads(engine: RunningEngine) -> None:
    with socket.create_connection(("127.0.0.1", engine.port), timeout=30) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = b"\xef\xbb\xbf\x00log text\r\n" + frame_of(order("NOISE-1")) + b"\r\n"
        for byte in data:
            connection.sendall(bytes([byte]))
        assert msa(read_frame(connection)) == "MSA|AA|NOISE-1"
        assert msa(exchange(connection, frame_of(order("NOISE-2")))) == "MSA|AA|NOISE-2"


def test_one_megabyte_message_accepted(engine: RunningEngine) -> None:
    note = b"NTE|1||" + b"x" * (1024 * 1024) + b"\r"
    with socket.create_connection(("127.0.0.1", engine.port), timeout=30) as connection:
        assert msa(exchange(connection, frame_of(order("BIG-1") + note))) == "MSA|AA|BIG-1"


def test_oversize_message_rejected_and_closed(engine: RunningEngine) -> None:
    note = b"NTE|1||" + b"x" * (MAX_MESSAGE_BYTES + 1000) + b"\r"
    messages_before = engine.messages()
    with socket.create_connection(("127.0.0.1", engine.port), timeout=30) as connection:
        ack = exchange(connection, frame_of(order("HUGE-1") + note))
        assert msa(ack) == "MSA|AR|HUGE-1"
        assert f"exceeds the size limit of {MAX_MESSAGE_BYTES} bytes" in ack.decode()
        connection.settimeout(30)
        assert connection.recv(100) == b""
    assert engine.messages() == messages_before
    assert engine.process.running


def test_half_closed_sender_still_gets_its_acks(engine: RunningEngine) -> None:
    with socket.create_connection(("127.0.0.1", engine.port), timeout=30) as connection:
        connection.sendall(frame_of(order("HALF-1")) + frame_of(order("HALF-2")))
        connection.shutdown(socket.SHUT_WR)
        assert msa(read_frame(connection)) == "MSA|AA|HALF-1"
        assert msa(read_frame(connection)) == "MSA|AA|HALF-2"
        assert connection.recv(100) == b""
    assert engine.jobs_of("HALF-2") == 1


def test_duplicate_answered_with_stored_ack(engine: RunningEngine) -> None:
    with socket.create_connection(("127.0.0.1", engine.port), timeout=30) as connection:
        first = exchange(connection, frame_of(order("DUP-1")))
        second = exchange(connection, frame_of(order("DUP-1")))
    assert second == first
    assert engine.jobs_of("DUP-1") == 1


def test_enhanced_mode_commit_then_application_ack(engine: RunningEngine) -> None:
    text = order("ENH-1").replace(b"|P|2.5.1||||||", b"|P|2.5.1|||AL|AL||")
    with socket.create_connection(("127.0.0.1", engine.port), timeout=30) as connection:
        commit = exchange(connection, frame_of(text))
        application = read_frame(connection)
    assert msa(commit) == "MSA|CA|ENH-1"
    assert msa(application) == "MSA|AA|ENH-1"


def test_idle_connection_closed(engine: RunningEngine) -> None:
    with socket.create_connection(("127.0.0.1", engine.port), timeout=30) as connection:
        started = time.monotonic()
        connection.settimeout(30)
        assert connection.recv(100) == b""
        assert time.monotonic() - started >= 2.5


def frame_of(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK


def test_mllp_over_tls(tmp_path: Path) -> None:
    authority = certificate_authority(tmp_path / "pki")
    server = issue(tmp_path / "pki", authority, "engine", server=True)
    listen = (
        f"ssl:{{port}}:interface=127.0.0.1:privateKey={server.key_path}"
        f":certKey={server.certificate_path}"
    )
    engine = start_engine(tmp_path / "engine", {"listen": listen})
    try:
        context = ssl.create_default_context(cafile=str(authority.certificate_path))
        with (
            socket.create_connection(("127.0.0.1", engine.port), timeout=30) as plain,
            context.wrap_socket(plain, server_hostname="localhost") as connection,
        ):
            assert connection.version() in ("TLSv1.2", "TLSv1.3")
            assert msa(exchange(connection, frame_of(order("TLS-1")))) == "MSA|AA|TLS-1"
            assert msa(exchange(connection, frame_of(order("TLS-2")))) == "MSA|AA|TLS-2"

        # A client that does not trust the certificate gets no connection.
        with (
            socket.create_connection(("127.0.0.1", engine.port), timeout=30) as plain,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            ssl.create_default_context().wrap_socket(plain, server_hostname="localhost")
        assert engine.messages() == 2
    finally:
        stop_engine(engine)


@pytest.mark.parametrize("processes", [0, 2], ids=["in-engine", "two-processes"])
def test_mllp_tls_requires_client_certificate(tmp_path: Path, processes: int) -> None:
    pki = tmp_path / "pki"
    authority = certificate_authority(pki)
    server = issue(pki, authority, "engine", server=True)
    client = issue(pki, authority, "ris", server=False)
    stranger = issue(
        pki, certificate_authority(pki / "other", "other CA"), "intruder", server=False
    )
    expired = issue(pki, authority, "old-ris", server=False, expired=True)
    tls = {
        "certificate": str(server.certificate_path),
        "private_key": str(server.key_path),
        "client_ca": str(authority.certificate_path),
    }
    engine = start_engine(tmp_path / "engine", {"tls": tls, "processes": processes})
    try:
        context = ssl.create_default_context(cafile=str(authority.certificate_path))
        context.load_cert_chain(str(client.certificate_path), str(client.key_path))
        with (
            socket.create_connection(("127.0.0.1", engine.port), timeout=30) as plain,
            context.wrap_socket(plain, server_hostname="localhost") as connection,
        ):
            assert msa(exchange(connection, frame_of(order("MTLS-1")))) == "MSA|AA|MTLS-1"

        for certificate in (None, stranger, expired):
            refused = ssl.create_default_context(cafile=str(authority.certificate_path))
            if certificate is not None:
                refused.load_cert_chain(
                    str(certificate.certificate_path), str(certificate.key_path)
                )
            with (
                socket.create_connection(("127.0.0.1", engine.port), timeout=30) as plain,
                pytest.raises((ssl.SSLError, ConnectionError)),
                refused.wrap_socket(plain, server_hostname="localhost") as connection,
            ):
                # With TLS 1.3 the server checks the client certificate after the
                # client's handshake ends, so the rejection arrives on first use.
                exchange(connection, frame_of(order("MTLS-X")))
        assert engine.messages() == 1
        assert engine.process.running
    finally:
        stop_engine(engine)
    [stored] = engine.stored_messages()
    # The sender of each message is recorded with its certificate.
    assert stored.peer.endswith(" (client certificate CN=ris)")
    log = engine.process.log_text()
    # Who connected, by certificate; why the others were refused, in OpenSSL's words only.
    assert "TLS, client certificate CN=ris, issued by CN=fdqr test CA, serial " in log
    rejections = [line for line in log.splitlines() if "closed: TLS failed: " in line]
    assert len(rejections) == 3, log[-3000:]
    assert rejections[0].endswith("TLS failed: peer did not return a certificate")
    assert (
        "TLS failed: certificate verify failed (client certificate CN=intruder, issued by"
        " CN=other CA, serial "
    ) in rejections[1]
    assert rejections[1].endswith(
        ": unable to get local issuer certificate (not signed by a CA in client_ca))"
    )
    assert "(client certificate CN=old-ris, issued by CN=fdqr test CA, serial " in rejections[2]
    assert ": certificate has expired (valid from " in rejections[2]
    assert "SSL routines" not in log


def test_ipv6_listener_with_intake_processes(tmp_path: Path) -> None:
    engine = start_engine(
        tmp_path / "engine", {"listen": "tcp6:{port}:interface=\\:\\:1", "processes": 2}, "::1"
    )
    try:
        with socket.create_connection(("::1", engine.port), timeout=30) as connection:
            assert msa(exchange(connection, frame_of(order("V6-1")))) == "MSA|AA|V6-1"
        [message] = engine.stored_messages()
        assert message.peer.startswith("[::1]:")
    finally:
        stop_engine(engine)


def test_memory_store_engine_accepts_orders(tmp_path: Path) -> None:
    config, port = write_intake_config(tmp_path, ":memory:")
    process = EngineProcess(config, port, tmp_path / "engine.log")
    process.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            assert msa(exchange(connection, frame_of(order("MEM-1")))) == "MSA|AA|MEM-1"
            assert msa(exchange(connection, frame_of(order("MEM-1")))) == "MSA|AA|MEM-1"
    finally:
        assert process.stop() == 0, process.log_text()[-3000:]
    assert not (tmp_path / ":memory:").exists()
    assert "duplicate message MEM-1" in process.log_text()


def metric_samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_web_metrics_and_api(tmp_path: Path) -> None:
    config, port = write_intake_config(tmp_path, str(tmp_path / "fdqr.sqlite"))
    settings = yaml.safe_load(config.read_text())
    settings["web"]["refresh_seconds"] = 0.2
    config.write_text(yaml.safe_dump(settings))
    web_port = int(settings["web"]["listen"].split(":")[1])
    process = EngineProcess(config, port, tmp_path / "engine.log")
    process.start()
    try:
        health = f"http://127.0.0.1:{web_port}/health"
        with urllib.request.urlopen(health, timeout=10) as response:
            assert response.status == 200
            assert response.read() == b"ok\n"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            for control_id in ("MET-1", "MET-2", "MET-1"):
                assert msa(exchange(connection, frame_of(order(control_id)))).startswith("MSA|AA")
            no_control_id = order("MET-3").replace(b"|MET-3|P|", b"||P|")
            assert msa(exchange(connection, frame_of(no_control_id))).startswith("MSA|AE")

        deadline = time.monotonic() + 20
        samples = metric_samples(web_port)
        # The two orders' jobs end at the identity step; their count is read every 0.2 s.
        while samples[("fdqr_jobs_finished_total", (("state", "done"),))] < 2:
            assert time.monotonic() < deadline, samples
            time.sleep(0.2)
            samples = metric_samples(web_port)
        while samples[("fdqr_jobs", (("state", "done"),))] < 2:
            assert time.monotonic() < deadline, samples
            time.sleep(0.2)
            samples = metric_samples(web_port)

        status, text = http_get(web_port, "/api/jobs?state=done")
        jobs = json.loads(text)["jobs"]
        status_detail, detail = http_get(web_port, f"/api/jobs/{jobs[0]['id']}")
        status_missing, missing = http_get(web_port, "/api/jobs/999")
        status_bad, bad = http_get(web_port, "/api/jobs?limit=x")
        status_messages, messages = http_get(web_port, "/api/messages")
        status_page, page = http_get(web_port, "/")
    finally:
        assert process.stop() == 0, process.log_text()[-3000:]
    assert samples[("fdqr_hl7_messages_total", (("ack", "AA"),))] == 3
    assert samples[("fdqr_hl7_messages_total", (("ack", "AE"),))] == 1
    assert samples[("fdqr_hl7_duplicates_total", ())] == 1
    assert samples[("fdqr_jobs", (("state", "queued"),))] == 0
    assert samples[("process_resident_memory_bytes", ())] > 0

    assert status == 200
    assert len(jobs) == 2
    assert status_detail == 200
    assert "nothing to fetch" in json.loads(detail)["summary"]
    assert status_missing == 404
    assert json.loads(missing)["error"] == "job 999 not found"
    assert status_bad == 400
    assert json.loads(bad)["error"] == "invalid limit 'x': expected a whole number"
    assert status_messages == 200
    # The message without MSH-10 was rejected, so it is not stored.
    assert [item["control_id"] for item in json.loads(messages)["messages"]] == ["MET-2", "MET-1"]
    assert status_page == 200
    assert "<td>done</td><td>2</td>" in page
    for text in (detail, messages, page):
        assert "INTAKE^PATIENT" not in text
        assert "19700101" not in text


def config_copy(source: Path, target: Path, **changes: object) -> tuple[Path, int]:
    """Copy an engine.yaml with new listener ports, then apply changes; return it and the MLLP port."""
    settings = yaml.safe_load(source.read_text())
    mllp_port = free_port()
    settings["mllp"]["listen"] = f"tcp:{mllp_port}:interface=127.0.0.1"
    settings["dicom"]["port"] = free_port()
    settings["web"]["listen"] = f"tcp:{free_port()}:interface=127.0.0.1"
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        settings[section][key] = value
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(settings))
    return target, mllp_port


def run_until_exit(config: Path) -> subprocess.CompletedProcess[str]:
    """Run `fdqr run` with a configuration it must refuse, and return how it ended."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_second_engine_on_same_store_refused(tmp_path: Path) -> None:
    first = start_engine(tmp_path / "first", {})
    first_pid = first.process.pid
    config, port = config_copy(tmp_path / "first" / "engine.yaml", tmp_path / "second" / "e.yaml")
    second = EngineProcess(config, port, tmp_path / "second" / "engine.log")
    try:
        with pytest.raises(RuntimeError, match="exited with status 1"):
            second.start()
        with socket.create_connection(("127.0.0.1", first.port), timeout=30) as connection:
            assert msa(exchange(connection, frame_of(order("LOCK-1")))) == "MSA|AA|LOCK-1"
        # kill -9 leaves the lock file, but the kernel released the lock.
        first.process.send_signal(signal.SIGKILL)
        first.process.stop()
    finally:
        if first.process.running:
            stop_engine(first)
    log = (tmp_path / "second" / "engine.log").read_text()
    assert (
        f"engine failed to start: the store {first.store} is in use by another fdqr engine"
        f" (process {first_pid}, lock file {first.store}.lock)"
    ) in log
    third = EngineProcess(config, port, tmp_path / "second" / "engine-after.log")
    third.start()
    assert third.stop() == 0, third.log_text()[-3000:]


def test_listener_conflicts_named(tmp_path: Path) -> None:
    first = start_engine(tmp_path / "first", {})
    first_settings = yaml.safe_load((tmp_path / "first" / "engine.yaml").read_text())
    dicom_port = first_settings["dicom"]["port"]
    own_data = {
        "store__path": str(tmp_path / "other" / "fdqr.sqlite"),
        "spool__path": str(tmp_path / "other" / "spool"),
    }
    try:
        config, port = config_copy(
            tmp_path / "first" / "engine.yaml", tmp_path / "dicom" / "e.yaml", **own_data
        )
        settings = yaml.safe_load(config.read_text())
        settings["dicom"]["port"] = dicom_port
        config.write_text(yaml.safe_dump(settings))
        dicom = EngineProcess(config, port, tmp_path / "dicom" / "engine.log")
        with pytest.raises(RuntimeError, match="exited with status 1"):
            dicom.start()

        config, _ = config_copy(
            tmp_path / "first" / "engine.yaml",
            tmp_path / "mllp" / "e.yaml",
            mllp__listen=f"tcp:{first.port}:interface=127.0.0.1",
            **own_data,
        )
        mllp = run_until_exit(config)
    finally:
        stop_engine(first)
    assert (
        f"engine failed to start: the DICOM listener on 127.0.0.1:{dicom_port}"
        " (dicom.host, dicom.port) failed: Address already in use"
    ) in (tmp_path / "dicom" / "engine.log").read_text()
    assert mllp.returncode == 1
    assert (
        f"engine failed to start: the listener tcp:{first.port}:interface=127.0.0.1"
        " (mllp.listen) failed: Address already in use"
    ) in mllp.stderr


def test_unopenable_audit_file_stops_start(tmp_path: Path) -> None:
    # /proc accepts no new folders, even for root, and passes the configuration check.
    unusable = Path("/proc") / f"fdqr-{uuid.uuid4().hex}" / "audit.log"
    config, _ = write_intake_config(tmp_path, str(tmp_path / "fdqr.sqlite"))
    settings = yaml.safe_load(config.read_text())
    settings["audit"]["file"] = str(unusable)
    config.write_text(yaml.safe_dump(settings))

    run = run_until_exit(config)
    assert run.returncode == 1
    assert f"engine failed to start: the audit file {unusable} (audit.file) cannot be opened:" in (
        run.stderr
    )


def test_spool_inside_running_engines_spool_refused(tmp_path: Path) -> None:
    first = start_engine(tmp_path / "first", {})
    first_pid = first.process.pid
    first_spool = tmp_path / "first" / "spool"
    config, _ = config_copy(
        tmp_path / "first" / "engine.yaml",
        tmp_path / "second" / "e.yaml",
        store__path=str(tmp_path / "second" / "fdqr.sqlite"),
        spool__path=str(first_spool / "second"),
    )
    try:
        run = run_until_exit(config)
    finally:
        stop_engine(first)
    assert run.returncode == 1
    assert (
        f"engine failed to start: the spool {first_spool / 'second'} is inside the spool"
        f" {first_spool} of another fdqr engine (process {first_pid}"
    ) in run.stderr


def test_sighup_during_start_keeps_engine(tmp_path: Path) -> None:
    # A reload or log rotation right after a start must not end the engine: a
    # service manager counts death by SIGHUP as a clean exit and would not restart it.
    config, port = write_intake_config(tmp_path, str(tmp_path / "fdqr.sqlite"))
    log = tmp_path / "engine.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "run", "--config", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.3)
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while "engine started" not in log.read_text():
                assert process.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "the engine did not start"
                time.sleep(0.1)
            with socket.create_connection(("127.0.0.1", port)) as connection:
                answer = exchange(connection, START_BLOCK + order("AFTER-HUP") + END_BLOCK)
            assert msa(answer) == "MSA|AA|AFTER-HUP"
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
