"""Audit records over TCP and TLS: framing, waiting while disconnected, retries and stop."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from twisted.internet import defer, error, protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from engine.auditstream import StreamSink


class FakeEndpoint:
    """Records each connection attempt; the test decides how it ends."""

    def __init__(self) -> None:
        self.attempts: list[tuple[protocol.Factory, defer.Deferred[Any]]] = []

    def connect(self, factory: protocol.Factory) -> defer.Deferred[Any]:
        attempt: defer.Deferred[Any] = defer.Deferred()
        self.attempts.append((factory, attempt))
        return attempt

    def accept(self, handshake: bool = False) -> tuple[Any, StringTransport]:
        """Let the last attempt connect; over TLS, also complete the handshake."""
        factory, attempt = self.attempts[-1]
        stream = factory.buildProtocol(None)
        transport = StringTransport()
        stream.makeConnection(transport)
        attempt.callback(stream)
        if handshake:
            stream.handshakeCompleted()
        return stream, transport

    def fail_to_connect(self) -> None:
        self.attempts[-1][1].errback(Failure(error.ConnectionRefusedError()))


def now(function: Any, *args: Any) -> None:
    """call_from_thread for tests: the call runs at once, as on the reactor thread."""
    function(*args)


def sink(
    clock: Clock, endpoint: FakeEndpoint, tls: bool = False, max_waiting: int = 100
) -> StreamSink:
    stream = StreamSink(
        clock,
        now,
        endpoint,
        "tls:127.0.0.1:6514",
        tls=tls,
        max_waiting=max_waiting,  # type: ignore[arg-type]
    )
    stream.start()
    return stream


def test_messages_framed_and_queued_until_connected() -> None:
    clock, endpoint = Clock(), FakeEndpoint()
    stream = sink(clock, endpoint)
    stream.send(b"<85>1 first")
    _, transport = endpoint.accept()
    stream.send("<85>1 é".encode())
    assert transport.value() == b"11 <85>1 first" + b"8 <85>1 \xc3\xa9"


def test_tls_sends_only_after_the_handshake() -> None:
    clock, endpoint = Clock(), FakeEndpoint()
    stream = sink(clock, endpoint, tls=True)
    factory, attempt = endpoint.attempts[-1]
    connection = factory.buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)
    attempt.callback(connection)
    stream.send(b"record")
    assert transport.value() == b""
    connection.handshakeCompleted()
    assert transport.value() == b"6 record"


def test_refused_connection_retried_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, endpoint = Clock(), FakeEndpoint()
    with caplog.at_level(logging.WARNING, logger="engine.auditstream"):
        stream = sink(clock, endpoint)
        stream.send(b"waiting")
        endpoint.fail_to_connect()
        clock.advance(1)
        assert len(endpoint.attempts) == 2
        endpoint.fail_to_connect()
        clock.advance(1.5)
        assert len(endpoint.attempts) == 2
        clock.advance(0.5)
        assert len(endpoint.attempts) == 3
        _, transport = endpoint.accept()
    assert transport.value() == b"7 waiting"
    assert [record.getMessage() for record in caplog.records] == [
        "audit repository tls:127.0.0.1:6514: cannot connect: Connection was refused by other"
        " side; records waiting: 1"
    ]


def test_lost_connection_reconnects_and_sends_what_waited() -> None:
    clock, endpoint = Clock(), FakeEndpoint()
    stream = sink(clock, endpoint)
    connection, _ = endpoint.accept()
    connection.connectionLost(Failure(error.ConnectionLost()))
    stream.send(b"after loss")
    clock.advance(1)
    _, transport = endpoint.accept()
    assert transport.value() == b"10 after loss"


def test_oldest_records_dropped_beyond_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    clock, endpoint = Clock(), FakeEndpoint()
    stream = sink(clock, endpoint, max_waiting=2)
    with caplog.at_level(logging.WARNING, logger="engine.auditstream"):
        for text in (b"a", b"b", b"c"):
            stream.send(text)
    _, transport = endpoint.accept()
    assert transport.value() == b"1 b1 c"
    assert stream.dropped == 1
    assert "1 records dropped while not connected; records waiting: 2" in caplog.text


def test_close_writes_what_waits_then_fires_when_closed() -> None:
    clock, endpoint = Clock(), FakeEndpoint()
    stream = sink(clock, endpoint)
    connection, transport = endpoint.accept()
    stream.send(b"stop record")
    closed = stream.close()
    assert transport.value() == b"11 stop record"
    assert transport.disconnecting
    assert not closed.called
    connection.connectionLost(Failure(error.ConnectionDone()))
    assert closed.called
    clock.advance(60)
    assert len(endpoint.attempts) == 1


def test_close_while_not_connected_stops_retrying(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, endpoint = Clock(), FakeEndpoint()
    stream = sink(clock, endpoint)
    endpoint.fail_to_connect()
    stream.send(b"never sent")
    with caplog.at_level(logging.WARNING, logger="engine.auditstream"):
        closed = stream.close()
    assert closed.called
    assert "1 records for tls:127.0.0.1:6514 not sent: not connected at stop" in caplog.text
    clock.advance(120)
    assert len(endpoint.attempts) == 1


def test_records_of_short_connection_written_again() -> None:
    # A repository that rejects the client certificate after a TLS 1.3 handshake.
    clock, endpoint = Clock(), FakeEndpoint()
    stream = sink(clock, endpoint)
    stream.send(b"start")
    connection, first = endpoint.accept()
    stream.send(b"adt")
    connection.connectionLost(Failure(error.ConnectionLost()))
    assert first.value() == b"5 start3 adt"

    clock.advance(1)
    connection, second = endpoint.accept()
    connection.connectionLost(Failure(error.ConnectionLost()))
    # The delay grows: the short connection did not count as a good one.
    clock.advance(1.9)
    assert len(endpoint.attempts) == 2
    clock.advance(0.1)
    _, third = endpoint.accept()
    assert second.value() == third.value() == b"5 start3 adt"


def test_records_count_as_sent_once_connection_stays_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, endpoint = Clock(), FakeEndpoint()
    with caplog.at_level(logging.INFO, logger="engine.auditstream"):
        stream = sink(clock, endpoint)
        endpoint.fail_to_connect()
        clock.advance(1)
        connection, _ = endpoint.accept()
        stream.send(b"kept")
        clock.advance(2)
        connection.connectionLost(Failure(error.ConnectionLost()))
        clock.advance(1)
        _, transport = endpoint.accept()
    assert transport.value() == b""
    messages = [record.getMessage() for record in caplog.records]
    assert messages[1] == "audit: tls:127.0.0.1:6514 takes records again"
    assert len(messages) == 3
