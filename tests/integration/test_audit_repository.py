"""Audit records sent by `fdqr run` to an audit repository over mutual TLS (RFC 5425)."""

from __future__ import annotations

import socket
import ssl
import threading
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import yaml

from engine.audit import event_code
from engine.testing.certificates import Issued, certificate_authority, issue
from engine.testing.intake import write_intake_config
from engine.testing.sites import EngineProcess
from tests.conftest import audit_message

pytestmark = pytest.mark.integration


class TLSRepository:
    """A syslog receiver on loopback that requires a client certificate of its CA.

    It reads octet-counted messages (LENGTH SP MESSAGE) from each connection.
    """

    def __init__(self, certificate: Path, key: Path, client_ca: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certificate, key)
        self.context.load_verify_locations(client_ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.messages: list[bytes] = []
        self.handshake_errors: list[str] = []
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(connection, server_side=True) as stream:
                    self._read(stream)
            except ssl.SSLError as error:
                self.handshake_errors.append(str(error))
            self.closed.set()

    def _read(self, stream: ssl.SSLSocket) -> None:
        buffer = b""
        while True:
            data = stream.recv(65536)
            if not data:
                return
            buffer += data
            while b" " in buffer:
                length_text, _, rest = buffer.partition(b" ")
                length = int(length_text)
                if len(rest) < length:
                    break
                self.messages.append(rest[:length])
                buffer = rest[length:]

    def records(self) -> list[ElementTree.Element]:
        return [audit_message(message) for message in list(self.messages)]

    def stop(self) -> None:
        self.listener.close()


def engine_with_audit(
    tmp_path: Path, repository: TLSRepository, authority: Issued, client: Issued
) -> EngineProcess:
    """An engine that sends its audit records to the repository over mutual TLS."""
    config, port = write_intake_config(
        tmp_path / "engine", str(tmp_path / "engine" / "fdqr.sqlite")
    )
    settings = yaml.safe_load(config.read_text())
    settings["audit"] = {
        "syslog": f"tls:127.0.0.1:{repository.port}",
        "tls": {
            "ca": str(authority.certificate_path),
            "certificate": str(client.certificate_path),
            "private_key": str(client.key_path),
        },
    }
    config.write_text(yaml.safe_dump(settings))
    return EngineProcess(config, port, tmp_path / "engine.log")


def test_records_reach_repository_over_mutual_tls(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    authority = certificate_authority(pki)
    server = issue(pki, authority, "repository", server=True)
    client = issue(pki, authority, "fdqr", server=False)
    repository = TLSRepository(server.certificate_path, server.key_path, authority.certificate_path)
    engine = engine_with_audit(tmp_path, repository, authority, client)
    try:
        engine.start()
        assert engine.stop() == 0, engine.log_text()[-3000:]
        assert repository.closed.wait(10)
    finally:
        repository.stop()

    assert repository.handshake_errors == []
    assert [event_code(record, "EventTypeCode") for record in repository.records()] == [
        "110120",
        "110121",
    ]


def test_repository_with_unknown_certificate_gets_no_records(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    authority = certificate_authority(pki / "ours", "our CA")
    other = certificate_authority(pki / "theirs", "another CA")
    server = issue(pki / "theirs", other, "repository", server=True)
    client = issue(pki / "ours", authority, "fdqr", server=False)
    repository = TLSRepository(server.certificate_path, server.key_path, authority.certificate_path)
    engine = engine_with_audit(tmp_path, repository, authority, client)
    try:
        engine.start()
        assert repository.closed.wait(10)
        assert engine.stop() == 0, engine.log_text()[-3000:]
    finally:
        repository.stop()

    assert repository.messages == []
    log = engine.log_text()
    assert f"audit repository tls:127.0.0.1:{repository.port}: connection lost:" in log
    assert (
        f"audit: 2 records for tls:127.0.0.1:{repository.port} not sent: not connected at stop"
        in log
    )
