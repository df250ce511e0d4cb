"""Audit records over a TCP or TLS connection to the audit repository (RFC 5425, RFC 6587).

Each syslog message goes as "LENGTH SP MESSAGE" (octet counting). The sink
connects at start and again after each lost connection, with a growing delay.
Records made while it is not connected wait in memory, up to a limit; beyond
it the oldest are dropped and counted. At stop, what waits is written before
the connection is closed, within a few seconds.

The protocol has no acknowledgement. A repository that accepts a connection
and closes it (a rejected client certificate after a TLS 1.3 handshake, a
load balancer without a server behind it) would swallow what was written.
So records written on a connection are kept until it has stayed up for
CONFIRM_SECONDS; when it ends before that, they wait again and are written
on the next connection, where the repository may get some of them twice.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints, protocol, ssl
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from engine.tlsfiles import load_ca_certificates, load_private_certificate

logger = logging.getLogger(__name__)

# Records kept while the repository cannot be reached; about 2 KB each.
MAX_WAITING = 10_000
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 60.0
# A problem of the connection is logged at most once in this many seconds.
PROBLEM_LOG_SECONDS = 60.0
# How long a stop waits for the records to be written.
CLOSE_SECONDS = 5.0
# How long a connection must stay up before the records written on it count as sent.
CONFIRM_SECONDS = 2.0


def tls_options(host: str, ca: Path, certificate: Path | None, private_key: Path | None) -> Any:
    """Return client TLS options for the connection to the audit repository.

    The repository must present a certificate for host that chains to a CA
    in ca. With certificate and private_key, the engine presents its own
    (mutual TLS, which IHE ATNA requires of a secure node). Raises TLSConfigError naming the file.
    """
    trust = ssl.trustRootFromCertificates(load_ca_certificates(ca))  # type: ignore[no-untyped-call]
    client = None
    if certificate is not None and private_key is not None:
        client = load_private_certificate(certificate, private_key)
    return ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)


def stream_endpoint(
    reactor: Any, kind: str, host: str, port: int, options: Any = None
) -> IStreamClientEndpoint:
    """Return the client endpoint for tcp: or tls: (with the options of tls_options)."""
    endpoint = endpoints.HostnameEndpoint(reactor, host, port)
    if kind == "tls":
        return endpoints.wrapClientTLS(options, endpoint)
    return endpoint


@implementer(IHandshakeListener)
class _SyslogStream(protocol.Protocol):
    def __init__(self, sink: StreamSink) -> None:
        self.sink = sink

    def connectionMade(self) -> None:
        if not self.sink.tls:
            self.sink._connected(self)

    def handshakeCompleted(self) -> None:
        # Over TLS, records go only once the repository's certificate was accepted.
        self.sink._connected(self)

    def dataReceived(self, data: bytes) -> None:
        # An audit repository sends nothing back; whatever comes is ignored.
        pass

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.sink._lost(self, reason)


class StreamSink:
    """Sends each message over one long-lived connection, from any thread."""

    def __init__(
        self,
        clock: IReactorTime,
        call_from_thread: Callable[..., None],
        endpoint: IStreamClientEndpoint,
        name: str,
        tls: bool = False,
        max_waiting: int = MAX_WAITING,
        on_dropped: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.clock = clock
        # reactor.callFromThread: runs a call on the reactor thread, in the order of calls.
        self.call_from_thread = call_from_thread
        self.endpoint = endpoint
        self.tls = tls
        # Metrics hook: called for each record dropped because too many waited.
        self.on_dropped = on_dropped
        self.max_waiting = max_waiting
        self.dropped = 0
        self._waiting: collections.deque[bytes] = collections.deque()
        # Written on the current connection, kept until it has stayed up CONFIRM_SECONDS.
        self._unconfirmed: list[bytes] = []
        self._confirm: Any = None
        self._stream: _SyslogStream | None = None
        self._connecting = False
        self._closing = False
        self._closed: defer.Deferred[None] | None = None
        self._retry_seconds = FIRST_RETRY_SECONDS
        self._retry: Any = None
        self._problem_logged_at: float | None = None

    def start(self) -> None:
        """Connect (call on the reactor thread)."""
        self._connect()

    def send(self, message: bytes) -> None:
        self.call_from_thread(self._send, message)

    def close(self) -> defer.Deferred[None]:
        """Write what waits, then close; fire when closed or after CLOSE_SECONDS.

        The close runs after every send made before it, also from other threads.
        """
        closed: defer.Deferred[None] = defer.Deferred()
        self.call_from_thread(self._close, closed)
        return closed

    # On the reactor thread

    def _close(self, closed: defer.Deferred[None]) -> None:
        self._closing = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._stream is None:
            if self._waiting:
                logger.warning(
                    "audit: %d records for %s not sent: not connected at stop",
                    len(self._waiting),
                    self.name,
                )
            closed.callback(None)
            return
        self._closed = closed
        transport = self._stream.transport
        assert transport is not None
        transport.loseConnection()
        timeout = self.clock.callLater(CLOSE_SECONDS, transport.abortConnection)  # type: ignore[attr-defined]
        closed.addBoth(lambda result: timeout.cancel() if timeout.active() else None)

    def _send(self, message: bytes) -> None:
        if self._stream is not None and self._stream.transport is not None:
            self._write(self._stream, message)
            return
        self._waiting.append(message)
        self._drop_beyond_limit()

    def _drop_beyond_limit(self) -> None:
        while len(self._waiting) > self.max_waiting:
            self._waiting.popleft()
            self.dropped += 1
            self.on_dropped()
            self._problem(f"{self.dropped} records dropped while not connected")

    def _write(self, stream: _SyslogStream, message: bytes) -> None:
        assert stream.transport is not None
        stream.transport.write(_frame(message))
        self._unconfirmed.append(message)
        if self._confirm is None or not self._confirm.active():
            self._confirm = self.clock.callLater(CONFIRM_SECONDS, self._confirmed)

    def _confirmed(self) -> None:
        """Count what was written on the connection as sent, now that it stayed up."""
        self._unconfirmed.clear()
        self._retry_seconds = FIRST_RETRY_SECONDS
        if self._problem_logged_at is not None:
            logger.info("audit: %s takes records again", self.name)
            self._problem_logged_at = None

    def _connect(self) -> None:
        if self._closing or self._connecting:
            return
        self._connecting = True
        factory = protocol.Factory.forProtocol(lambda: _SyslogStream(self))
        # No log line for each connection attempt.
        factory.noisy = False
        connected = self.endpoint.connect(factory)
        connected.addErrback(self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = False
        self._problem(f"cannot connect: {failure.getErrorMessage().rstrip('.')}")
        self._schedule_retry()

    def _connected(self, stream: _SyslogStream) -> None:
        self._connecting = False
        self._stream = stream
        assert stream.transport is not None
        while self._waiting:
            self._write(stream, self._waiting.popleft())
        if not self._unconfirmed:
            # Nothing to confirm: the connection counts as good when it stays up.
            self._confirm = self.clock.callLater(CONFIRM_SECONDS, self._confirmed)
        if self._closing:
            stream.transport.loseConnection()

    def _lost(self, stream: _SyslogStream, reason: Failure) -> None:
        if self._stream is stream:
            self._stream = None
        else:
            # A connection that failed its TLS handshake, for example.
            self._connecting = False
        if self._confirm is not None and self._confirm.active():
            self._confirm.cancel()
        if self._closing:
            # A close flushes what was written before the connection ends.
            self._unconfirmed.clear()
            if self._closed is not None and not self._closed.called:
                self._closed.callback(None)
            return
        # What the repository may not have taken waits again, before what came since.
        self._waiting.extendleft(reversed(self._unconfirmed))
        self._unconfirmed.clear()
        self._drop_beyond_limit()
        self._problem(f"connection lost: {reason.getErrorMessage().rstrip('.')}")
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._closing:
            return
        self._retry = self.clock.callLater(self._retry_seconds, self._connect)
        self._retry_seconds = min(self._retry_seconds * 2, MAX_RETRY_SECONDS)

    def _problem(self, text: str) -> None:
        now = self.clock.seconds()
        if self._problem_logged_at is not None and now - self._problem_logged_at < (
            PROBLEM_LOG_SECONDS
        ):
            return
        self._problem_logged_at = now
        logger.warning(
            "audit repository %s: %s; records waiting: %d",
            self.name,
            text,
            len(self._waiting),
        )


def _frame(message: bytes) -> bytes:
    """Frame a syslog message by octet counting (RFC 6587 3.4.1, RFC 5425 4.3)."""
    return str(len(message)).encode("ascii") + b" " + message
