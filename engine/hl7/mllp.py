"""MLLP framing (0x0B, content, 0x1C 0x0D) as a Twisted protocol.

This module knows about frames and connections only. What a message means and
what its acknowledgement says is the business of the MessageHandler it is given.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReactorTime,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from engine.hl7.tls import rejected_certificate
from engine.tlsfiles import openssl_reasons

logger = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
DEFAULT_MAX_MESSAGE_BYTES = 10 * 1024 * 1024
# An oversize frame keeps this many of its first bytes so MSH can still be read.
OVERSIZE_HEAD_BYTES = 4096
# Frames read ahead of the one being processed before the transport is paused.
MAX_QUEUED_FRAMES = 8


def frame(content: bytes) -> bytes:
    return START_BLOCK + content + END_BLOCK


@dataclasses.dataclass(frozen=True)
class Frame:
    content: bytes


@dataclasses.dataclass(frozen=True)
class OversizeFrame:
    """A frame that passed the size limit: its first bytes, and how many were seen."""

    head: bytes
    size: int


Event = Frame | OversizeFrame


class MLLPDecoder:
    """Splits a byte stream into frames, skipping bytes outside frames.

    Memory stays bounded by max_message_bytes: an oversize frame is reported
    as soon as it passes the limit, and the rest of it is discarded.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self.skipped_bytes = 0
        self._buffer = bytearray()
        self._in_frame = False
        self._scan_from = 0
        self._discarding = False

    @property
    def unfinished_bytes(self) -> int:
        """Bytes of a frame that started but has not ended yet."""
        if not self._in_frame or self._discarding:
            return 0
        # The start byte, and what followed it.
        return len(self._buffer) + 1

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        view = memoryview(data)
        position = 0
        while position < len(view):
            if self._discarding:
                position = self._discard_until_end(view, position)
            elif not self._in_frame:
                position = self._skip_to_start(view, position)
            else:
                position = self._read_frame(view, position, events)
        return events

    def _skip_to_start(self, view: memoryview, position: int) -> int:
        start = bytes(view[position:]).find(START_BLOCK)
        if start == -1:
            self.skipped_bytes += len(view) - position
            return len(view)
        self.skipped_bytes += start
        self._in_frame = True
        self._buffer.clear()
        self._scan_from = 0
        return position + start + 1

    def _read_frame(self, view: memoryview, position: int, events: list[Event]) -> int:
        previous_length = len(self._buffer)
        self._buffer += view[position:]
        consumed = len(view)
        end = self._buffer.find(END_BLOCK, self._scan_from)
        restart = self._buffer.rfind(
            START_BLOCK, previous_length, end if end != -1 else len(self._buffer)
        )
        if restart != -1:
            # A new start block before the end: the sender gave up on the previous frame.
            self.skipped_bytes += restart + 1
            del self._buffer[: restart + 1]
            self._scan_from = 0
            end = self._buffer.find(END_BLOCK)
        if end == -1:
            if len(self._buffer) > self.max_message_bytes:
                events.append(
                    OversizeFrame(bytes(self._buffer[:OVERSIZE_HEAD_BYTES]), len(self._buffer))
                )
                self._buffer.clear()
                self._in_frame = False
                self._discarding = True
            else:
                self._scan_from = max(0, len(self._buffer) - len(END_BLOCK) + 1)
            return consumed

        content = bytes(self._buffer[:end])
        rest = bytes(self._buffer[end + len(END_BLOCK) :])
        self._buffer.clear()
        self._in_frame = False
        self._scan_from = 0
        if len(content) > self.max_message_bytes:
            events.append(OversizeFrame(content[:OVERSIZE_HEAD_BYTES], len(content)))
        else:
            events.append(Frame(content))
        # The bytes after the end block are read again from the outer loop.
        return consumed - len(rest)

    def _discard_until_end(self, view: memoryview, position: int) -> int:
        chunk = bytes(view[position:])
        end = chunk.find(END_BLOCK)
        if end == -1:
            # Keep a trailing 0x1C in case 0x0D arrives in the next read.
            self._discarding = not chunk.endswith(b"\x1c")
            return len(view)
        self._discarding = False
        return position + end + len(END_BLOCK)


class MessageHandler(TypingProtocol):
    """What the MLLP listener calls for each complete frame."""

    def handle_message(self, content: bytes, peer: str) -> defer.Deferred[Sequence[bytes]]:
        """Process one message and fire with the acknowledgements to send back, in order.

        Usually one; none or two in enhanced acknowledgement mode, none for an ACK.
        """

    def reject_oversize(
        self, head: bytes, size: int, peer: str, limit: int | None = None
    ) -> Sequence[bytes]:
        """Return the rejections to send for an oversize message; none if MSH is unreadable."""


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class MLLPProtocol(protocol.Protocol):
    """One MLLP connection: frames in, acknowledgements out, one message at a time.

    A sender that closes its side after its last frame still gets every ACK:
    the connection closes once they are written.
    """

    def __init__(
        self,
        handler: MessageHandler,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        idle_timeout: float | None = None,
        clock: IReactorTime | None = None,
        on_closed: Callable[[], None] = lambda: None,
    ) -> None:
        self.handler = handler
        self.decoder = MLLPDecoder(max_message_bytes)
        # Called once when the connection has closed.
        self.on_closed = on_closed
        self.idle_timeout = idle_timeout
        self.peer = "unknown"
        # The peer with the subject of its TLS client certificate, if it gave one: the
        # sender recorded with each message and named in its log lines.
        self.sender = self.peer
        self._clock = clock
        self._idle_call: IDelayedCall | None = None
        # The connection's transport (ITCPTransport and IPushProducer); set in connectionMade.
        self._wire: Any = None
        self._queue: collections.deque[Event] = collections.deque()
        self._busy = False
        self._paused = False
        self._closing = False
        # The sender closed its side of the connection (a TCP half-close).
        self._input_ended = False

    def connectionMade(self) -> None:
        self._wire = self.transport
        self.peer = self.sender = _describe(self._wire.getPeer())
        logger.info("MLLP connection opened from %s", self.peer)
        self._reset_idle_timer()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._closing = True
        self.on_closed()
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        if self.decoder.unfinished_bytes:
            # The sender gets no ACK for it and sends it again, if it is an MLLP sender.
            logger.warning(
                "MLLP connection from %s closed in the middle of a frame; %d bytes of it discarded",
                self.peer,
                self.decoder.unfinished_bytes,
            )
        if self.decoder.skipped_bytes:
            logger.warning(
                "MLLP connection from %s closed; %d bytes outside frames skipped in total",
                self.peer,
                self.decoder.skipped_bytes,
            )
        elif reason.check(error.ConnectionDone, error.ConnectionLost) is None:  # type: ignore[no-untyped-call]
            # E.g. a TLS handshake that failed: no client certificate, an unknown CA.
            text = close_reason(reason)
            rejected = rejected_certificate(self._wire)
            if rejected is not None:
                text += f" ({rejected})"
            logger.warning("MLLP connection from %s closed: %s", self.peer, text)
        else:
            logger.info("MLLP connection from %s closed", self.peer)

    def handshakeCompleted(self) -> None:
        # Called for TLS connections only, by the TLS layer around this protocol.
        peer_certificate = self._wire.getPeerCertificate()
        if peer_certificate is None:
            logger.info("MLLP connection from %s: TLS, no client certificate", self.peer)
            return
        certificate = peer_certificate.to_cryptography()
        subject = certificate.subject.rfc4514_string() or "(empty name)"
        logger.info(
            "MLLP connection from %s: TLS, client certificate %s, issued by %s, serial %X",
            self.peer,
            subject,
            certificate.issuer.rfc4514_string() or "(empty name)",
            certificate.serial_number,
        )
        self.sender = f"{self.peer} (client certificate {subject})"

    def readConnectionLost(self) -> None:
        self._input_ended = True
        self._close_when_answered()

    def writeConnectionLost(self) -> None:
        self._closing = True
        self._wire.loseConnection()

    def _close_when_answered(self) -> None:
        if self._input_ended and not self._busy and not self._queue and not self._closing:
            self._closing = True
            self._wire.loseConnection()

    def _reset_idle_timer(self) -> None:
        if self.idle_timeout is None or self._closing:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.idle_timeout)
            return
        clock = self._clock
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self._idle_call = clock.callLater(self.idle_timeout, self._idle_timeout)

    def _idle_timeout(self) -> None:
        logger.info("MLLP connection from %s idle for %ss, closing", self.peer, self.idle_timeout)
        self._closing = True
        self._wire.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self._reset_idle_timer()
        if self._closing:
            return
        skipped_before = self.decoder.skipped_bytes
        try:
            events = self.decoder.feed(data)
        except Exception:
            logger.exception("MLLP framing failed on data from %s, closing", self.peer)
            self._wire.abortConnection()
            return
        skipped = self.decoder.skipped_bytes - skipped_before
        if skipped and skipped_before == 0:
            # Senders that end every frame with a line break would log once per
            # message; the first skip is logged here and the total at close.
            logger.warning("skipped %d bytes outside MLLP frames from %s", skipped, self.peer)
        self._queue.extend(events)
        if len(self._queue) > MAX_QUEUED_FRAMES and not self._paused:
            self._paused = True
            self._wire.pauseProducing()
        self._process_next()

    def _process_next(self) -> None:
        if self._busy or self._closing or not self._queue:
            if self._paused and not self._queue:
                self._paused = False
                self._wire.resumeProducing()
            self._close_when_answered()
            return
        event = self._queue.popleft()
        if isinstance(event, OversizeFrame):
            self._reject_oversize(event)
            return
        self._busy = True
        try:
            result = self.handler.handle_message(event.content, self.sender)
        except Exception:
            result = defer.fail()
        result.addCallbacks(self._send_ack, self._handler_failed)

    def _send_ack(self, acks: Sequence[bytes]) -> None:
        self._busy = False
        if not self._closing and acks:
            self._wire.write(b"".join(frame(ack) for ack in acks))
        self._process_next()

    def _handler_failed(self, failure: Failure) -> None:
        # The handler answers every message itself, so a failure here is a bug. No ACK
        # means the sender will resend, which is safer than acknowledging a lost message.
        logger.error(
            "message handling failed for %s, closing without ACK: %s",
            self.peer,
            failure.getTraceback(),
        )
        self._busy = False
        self._closing = True
        self._wire.loseConnection()

    def _reject_oversize(self, event: OversizeFrame) -> None:
        logger.warning(
            "message from %s exceeds %d bytes (%d seen), closing",
            self.peer,
            self.decoder.max_message_bytes,
            event.size,
        )
        acks = self.handler.reject_oversize(
            event.head, event.size, self.sender, self.decoder.max_message_bytes
        )
        if acks:
            self._wire.write(b"".join(frame(ack) for ack in acks))
        self._closing = True
        self._queue.clear()
        self._wire.loseConnection()


class MLLPFactory(protocol.Factory):
    # Twisted would log "Starting factory <...MLLPFactory object at 0x...>" for each child.
    noisy = False

    def __init__(
        self,
        handler: MessageHandler,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        idle_timeout: float | None = None,
        clock: IReactorTime | None = None,
        on_closed: Callable[[], None] = lambda: None,
    ) -> None:
        self.handler = handler
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.clock = clock
        # Called each time a connection of this factory has closed.
        self.on_closed = on_closed
        # The connections open now.
        self.connections: set[MLLPProtocol] = set()

    def buildProtocol(self, addr: IAddress | None) -> MLLPProtocol:
        connection = MLLPProtocol(
            self.handler, self.max_message_bytes, self.idle_timeout, self.clock
        )

        def closed() -> None:
            self.connections.discard(connection)
            self.on_closed()

        connection.on_closed = closed
        self.connections.add(connection)
        return connection

    def senders(self) -> list[str]:
        """Return the sender of each open connection (its peer, and client certificate)."""
        return sorted(connection.sender for connection in self.connections)


def _describe(address: IAddress) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    # [::1]:4242, so the port stays apart from an IPv6 address.
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def close_reason(reason: Failure) -> str:
    """Return why a connection closed, giving OpenSSL errors as their reason texts only."""
    args = getattr(reason.value, "args", ())
    if type(reason.value).__module__.startswith("OpenSSL") and args:
        if not isinstance(args[0], list):
            # E.g. SysCallError(-1, 'Unexpected EOF'): the peer closed during the handshake.
            return "TLS failed: " + ", ".join(str(arg) for arg in args[1:] or args)
        texts = openssl_reasons(reason.value)
        if texts:
            hints = [_TLS_HINTS[text] for text in texts if text in _TLS_HINTS]
            return "TLS failed: " + "; ".join(texts) + "".join(f" ({hint})" for hint in hints)
    return reason.getErrorMessage()


# The usual meaning of OpenSSL's short reasons on an MLLP listener.
_TLS_HINTS = {
    "wrong version number": "not a TLS client: plain MLLP sent to the TLS port?",
    "http request": "an HTTP client, not MLLP over TLS",
    "unsupported protocol": "the client offers only TLS versions this listener refuses",
    "unexpected message": "the client offers only TLS versions this listener refuses?",
    "no shared cipher": "no cipher suite in common with the client",
}
