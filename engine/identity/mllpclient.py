"""One HL7 v2 request and its response over MLLP, as a Twisted client.

Each exchange opens a connection, sends one framed message, reads one framed
response (at most max_response_bytes) and closes. The whole exchange, connect
included, is bounded by a timeout on the injected clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from engine.hl7.mllp import Frame, MLLPDecoder, OversizeFrame, frame


class ExchangeError(Exception):
    """An exchange that produced no response: refused, closed, timed out or oversize."""


class _Exchange(protocol.Protocol):
    def __init__(self, request: bytes, max_response_bytes: int) -> None:
        self.request = request
        self.decoder = MLLPDecoder(max_response_bytes)
        self.response: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(frame(self.request))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.response.called:
            return
        for event in self.decoder.feed(data):
            if isinstance(event, Frame):
                self._finish(event.content)
                return
            if isinstance(event, OversizeFrame):
                self._fail(
                    f"response of {event.size} bytes or more exceeds the"
                    f" {self.decoder.max_message_bytes} byte limit"
                )
                return

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.response.called:
            self.response.errback(
                ExchangeError(f"connection closed before a response: {reason.getErrorMessage()}")
            )

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _finish(self, content: bytes) -> None:
        self.response.callback(content)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _fail(self, text: str) -> None:
        self.response.errback(ExchangeError(text))
        self.abort()


def exchange(
    reactor: Any,
    endpoint: str,
    request: bytes,
    timeout_seconds: float,
    max_response_bytes: int,
) -> defer.Deferred[bytes]:
    """Send `request` to a Twisted client endpoint string and fire with the response body.

    Fails with ExchangeError when the connection is refused or closed early,
    the response is too large, or no response arrives within the timeout.
    """
    clock: IReactorTime = reactor
    result: defer.Deferred[bytes] = defer.Deferred()
    session = _Exchange(request, max_response_bytes)
    try:
        client = endpoints.clientFromString(reactor, endpoint)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, KeyError) as error:
        return defer.fail(ExchangeError(f"invalid endpoint '{endpoint}': {error}"))
    connecting: defer.Deferred[Any] = endpoints.connectProtocol(  # type: ignore[no-untyped-call]
        client, session
    )

    def connect_failed(failure: Failure) -> None:
        if not result.called:
            result.errback(ExchangeError(f"connection failed: {failure.getErrorMessage()}"))

    def timed_out() -> None:
        if result.called:
            return
        result.errback(ExchangeError(f"no response within {timeout_seconds:g} s"))
        connecting.cancel()
        session.abort()

    connecting.addErrback(connect_failed)
    session.response.addCallbacks(
        lambda content: None if result.called else result.callback(content),
        lambda failure: None if result.called else result.errback(failure),
    )
    timer = clock.callLater(timeout_seconds, timed_out)

    def cancel_timer(value: Any) -> Any:
        if timer.active():
            timer.cancel()
        return value

    return result.addBoth(cancel_timer)
