"""MLLP framing and the listener protocol, with StringTransport and Clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from engine.hl7.mllp import (
    END_BLOCK,
    START_BLOCK,
    Frame,
    MLLPDecoder,
    MLLPProtocol,
    OversizeFrame,
    frame,
)

MESSAGE = b"MSH|^~\\&|RIS|RAD|FDQR|LOCAL|20260101||ORM^O01|1|P|2.5\rPID|1||X^^^LOCAL\r"


def test_decoder_single_frame() -> None:
    decoder = MLLPDecoder()
    assert decoder.feed(frame(MESSAGE)) == [Frame(MESSAGE)]
    assert decoder.skipped_bytes == 0


def test_decoder_one_byte_at_a_time() -> None:
    decoder = MLLPDecoder()
    events = []
    for byte in frame(MESSAGE) + frame(b"MSH|second"):
        events += decoder.feed(bytes([byte]))
    assert events == [Frame(MESSAGE), Frame(b"MSH|second")]


def test_decoder_several_frames_in_one_read() -> None:
    decoder = MLLPDecoder()
    data = frame(b"MSH|a") + frame(b"MSH|b") + frame(b"MSH|c")
    assert decoder.feed(data) == [Frame(b"MSH|a"), Frame(b"MSH|b"), Frame(b"MSH|c")]


def test_decoder_end_block_split_across_reads() -> None:
    decoder = MLLPDecoder()
    assert decoder.feed(START_BLOCK + b"MSH|a\x1c") == []
    assert decoder.feed(b"\x0d") == [Frame(b"MSH|a")]


def test_decoder_skips_bytes_outside_frames() -> None:
    decoder = MLLPDecoder()
    noise = b"\x00\n\r\nlog line\n\xef\xbb\xbf"
    events = decoder.feed(noise + frame(b"MSH|a") + b"\r\n" + frame(b"MSH|b"))
    assert events == [Frame(b"MSH|a"), Frame(b"MSH|b")]
    assert decoder.skipped_bytes == len(noise) + 2


def test_decoder_restarted_frame_drops_partial() -> None:
    decoder = MLLPDecoder()
    events = decoder.feed(START_BLOCK + b"MSH|lost" + frame(b"MSH|kept"))
    assert events == [Frame(b"MSH|kept")]
    assert decoder.skipped_bytes == len(b"MSH|lost") + 1


def test_decoder_large_message() -> None:
    decoder = MLLPDecoder()
    body = b"MSH|^~\\&|" + b"x" * (1024 * 1024)
    data = frame(body)
    events = []
    for start in range(0, len(data), 4096):
        events += decoder.feed(data[start : start + 4096])
    assert events == [Frame(body)]


def test_decoder_oversize_frame_bounded() -> None:
    decoder = MLLPDecoder(max_message_bytes=1000)
    events = decoder.feed(START_BLOCK + b"MSH|" + b"y" * 5000)
    assert len(events) == 1
    assert isinstance(events[0], OversizeFrame)
    assert events[0].head.startswith(b"MSH|")
    assert len(decoder._buffer) == 0
    # The rest of the oversize frame is discarded; the next frame is read normally.
    assert decoder.feed(b"z" * 100 + END_BLOCK + frame(b"MSH|next")) == [Frame(b"MSH|next")]


class RecordingHandler:
    """A MessageHandler that answers each message when the test says so."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.pending: list[defer.Deferred[bytes]] = []
        self.oversize: list[int] = []

    def handle_message(self, content: bytes, peer: str) -> defer.Deferred[bytes]:
        self.received.append(content)
        answer: defer.Deferred[bytes] = defer.Deferred()
        self.pending.append(answer)
        return answer

    def reject_oversize(self, head: bytes, size: int, peer: str) -> bytes | None:
        self.oversize.append(size)
        return b"MSH|AR"


def connect(handler: RecordingHandler, **options: object) -> tuple[MLLPProtocol, StringTransport]:
    protocol = MLLPProtocol(handler, **options)  # type: ignore[arg-type]
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_protocol_answers_in_order() -> None:
    handler = RecordingHandler()
    protocol, transport = connect(handler)
    protocol.dataReceived(frame(b"MSH|1") + frame(b"MSH|2"))
    # One message outstanding per connection: the second waits for the first ACK.
    assert handler.received == [b"MSH|1"]
    handler.pending[0].callback(b"ACK1")
    assert handler.received == [b"MSH|1", b"MSH|2"]
    handler.pending[1].callback(b"ACK2")
    assert transport.value() == frame(b"ACK1") + frame(b"ACK2")
    assert transport.connected


def test_protocol_oversize_answers_ar_and_closes() -> None:
    handler = RecordingHandler()
    protocol, transport = connect(handler, max_message_bytes=100)
    protocol.dataReceived(START_BLOCK + b"MSH|" + b"x" * 500)
    assert handler.oversize == [504]
    assert transport.value() == frame(b"MSH|AR")
    assert transport.disconnecting


def test_protocol_idle_timeout_closes() -> None:
    clock = task.Clock()
    handler = RecordingHandler()
    protocol, transport = connect(handler, idle_timeout=30.0, clock=clock)
    clock.advance(20)
    protocol.dataReceived(b"\n")
    clock.advance(20)
    assert not transport.disconnecting
    clock.advance(11)
    assert transport.disconnecting
    protocol.connectionLost()
    assert clock.getDelayedCalls() == []


def test_protocol_handler_failure_closes_without_ack() -> None:
    handler = RecordingHandler()
    protocol, transport = connect(handler)
    protocol.dataReceived(frame(b"MSH|1"))
    handler.pending[0].errback(RuntimeError("store exploded"))
    assert transport.value() == b""
    assert transport.disconnecting


def test_protocol_pauses_when_many_frames_queued() -> None:
    handler = RecordingHandler()
    protocol, transport = connect(handler)
    protocol.dataReceived(b"".join(frame(b"MSH|%d" % i) for i in range(12)))
    assert transport.producerState == "paused"
    for index in range(12):
        handler.pending[index].callback(b"ACK")
    assert transport.producerState == "producing"
    assert transport.value().count(END_BLOCK) == 12


@settings(max_examples=300, deadline=None)
@given(
    contents=st.lists(
        st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b"")),
        min_size=1,
        max_size=5,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
)
def test_decoder_any_split_gives_same_frames(contents: list[bytes], cuts: list[int]) -> None:
    data = b"".join(frame(content) for content in contents)
    decoder = MLLPDecoder()
    events = []
    start = 0
    for cut in [*sorted({min(cut, len(data)) for cut in cuts}), len(data)]:
        events += decoder.feed(data[start:cut])
        start = cut
    assert events == [Frame(content) for content in contents]


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=400), max_size=30))
def test_decoder_random_bytes_never_raise_and_stay_bounded(chunks: list[bytes]) -> None:
    decoder = MLLPDecoder(max_message_bytes=1024)
    for chunk in chunks:
        for event in decoder.feed(chunk):
            if isinstance(event, Frame):
                assert len(event.content) <= 1024
            else:
                assert len(event.head) <= 1024
        assert len(decoder._buffer) <= 1024 + 400
