"""MLLP framing and the listener protocol, with StringTransport and Clock."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL, crypto
from twisted.internet import defer, error, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from engine.hl7.ack import AckHeader
from engine.hl7.events import IdentifierPolicy, Unhandled
from engine.hl7.intake import Intake
from engine.hl7.mllp import (
    END_BLOCK,
    MAX_QUEUED_FRAMES,
    START_BLOCK,
    Frame,
    MLLPDecoder,
    MLLPFactory,
    MLLPProtocol,
    OversizeFrame,
    close_reason,
    frame,
)
from engine.jobs.planner import Plan
from engine.jobs.store import Store
from engine.model import DomainEvent
from engine.testing.certificates import certificate_authority, issue
from engine.testing.dicomgen import PatientSpec
from engine.testing.scenario import order_message
from tests.fakes import ImmediateStore

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
        self.pending: list[defer.Deferred[Sequence[bytes]]] = []
        self.oversize: list[int] = []

    def handle_message(self, content: bytes, peer: str) -> defer.Deferred[Sequence[bytes]]:
        self.received.append(content)
        answer: defer.Deferred[Sequence[bytes]] = defer.Deferred()
        self.pending.append(answer)
        return answer

    def reject_oversize(
        self, head: bytes, size: int, peer: str, limit: int | None = None
    ) -> Sequence[bytes]:
        self.oversize.append(size)
        return [b"MSH|AR"]


class PeerRecordingHandler(RecordingHandler):
    """A RecordingHandler that also records the peer of each message."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[str] = []

    def handle_message(self, content: bytes, peer: str) -> defer.Deferred[Sequence[bytes]]:
        self.peers.append(peer)
        return super().handle_message(content, peer)


def test_factory_reports_each_closed_connection() -> None:
    closed: list[bool] = []
    factory = MLLPFactory(RecordingHandler(), on_closed=lambda: closed.append(True))  # type: ignore[arg-type]
    connections = [factory.buildProtocol(None) for _ in range(2)]
    for connection in connections:
        connection.makeConnection(StringTransport())
    assert closed == []

    for connection in connections:
        connection.connectionLost(Failure(error.ConnectionDone()))  # type: ignore[no-untyped-call]

    assert closed == [True, True]


def test_factory_lists_senders_of_open_connections() -> None:
    factory = MLLPFactory(RecordingHandler())  # type: ignore[arg-type]
    first, second = factory.buildProtocol(None), factory.buildProtocol(None)
    first.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.6", 4100)))
    second.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.5", 4000)))

    second.connectionLost(Failure(error.ConnectionDone()))  # type: ignore[no-untyped-call]

    assert factory.senders() == ["10.0.0.6:4100"]


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
    handler.pending[0].callback([b"ACK1"])
    assert handler.received == [b"MSH|1", b"MSH|2"]
    handler.pending[1].callback([b"ACK2"])
    assert transport.value() == frame(b"ACK1") + frame(b"ACK2")
    assert transport.connected


def test_protocol_answers_before_closing_after_half_close() -> None:
    handler = RecordingHandler()
    protocol, transport = connect(handler)
    protocol.dataReceived(frame(b"MSH|1") + frame(b"MSH|2"))
    protocol.readConnectionLost()
    assert not transport.disconnecting
    handler.pending[0].callback([b"ACK1"])
    assert not transport.disconnecting
    handler.pending[1].callback([b"ACK2"])
    assert transport.value() == frame(b"ACK1") + frame(b"ACK2")
    assert transport.disconnecting


def test_protocol_half_close_when_idle_closes() -> None:
    protocol, transport = connect(RecordingHandler())
    protocol.readConnectionLost()
    assert transport.disconnecting


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
        handler.pending[index].callback([b"ACK"])
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


def test_protocol_writes_every_answer_in_order() -> None:
    handler = RecordingHandler()
    protocol, transport = connect(handler)
    protocol.dataReceived(frame(b"MSH|1") + frame(b"MSH|2"))
    handler.pending[0].callback([b"CA", b"AA"])
    assert transport.value() == frame(b"CA") + frame(b"AA")
    handler.pending[1].callback([])
    assert transport.value() == frame(b"CA") + frame(b"AA")
    assert handler.received == [b"MSH|1", b"MSH|2"]
    assert transport.connected


def test_protocol_serves_connections_independently() -> None:
    handler = RecordingHandler()
    first, first_transport = connect(handler)
    second, second_transport = connect(handler)
    first.dataReceived(frame(b"MSH|a"))
    second.dataReceived(frame(b"MSH|b"))
    # Both are in progress at once: a slow message on one connection does not block another.
    assert handler.received == [b"MSH|a", b"MSH|b"]
    handler.pending[1].callback([b"ACK-b"])
    assert second_transport.value() == frame(b"ACK-b")
    assert first_transport.value() == b""
    handler.pending[0].callback([b"ACK-a"])
    assert first_transport.value() == frame(b"ACK-a")


def test_protocol_logs_skipped_bytes_with_count(caplog: pytest.LogCaptureFixture) -> None:
    handler = RecordingHandler()
    protocol, transport = connect(handler)
    with caplog.at_level(logging.WARNING, logger="engine.hl7.mllp"):
        protocol.dataReceived(b"\xef\xbb\xbf\x00log text\r\n" + frame(b"MSH|1") + b"\r\n")
    assert handler.received == [b"MSH|1"]
    assert [record.getMessage() for record in caplog.records] == [
        "skipped 16 bytes outside MLLP frames from 192.168.1.1:54321"
    ]
    assert transport.connected
    assert not transport.disconnecting

    # Later skips on the same connection are counted, and the total is logged at close.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.hl7.mllp"):
        protocol.dataReceived(frame(b"MSH|2") + b"\r\n")
        protocol.dataReceived(frame(b"MSH|3") + b"\r\n")
        protocol.connectionLost()
    assert [record.getMessage() for record in caplog.records] == [
        "MLLP connection from 192.168.1.1:54321 closed; 20 bytes outside frames skipped in total"
    ]


def test_protocol_oversize_without_msh_closes_silently() -> None:
    class SilentHandler(RecordingHandler):
        def reject_oversize(
            self, head: bytes, size: int, peer: str, limit: int | None = None
        ) -> Sequence[bytes]:
            self.oversize.append(size)
            return []

    handler = SilentHandler()
    protocol, transport = connect(handler, max_message_bytes=100)
    protocol.dataReceived(START_BLOCK + b"\x00" * 200)
    assert handler.oversize == [200]
    assert transport.value() == b""
    assert transport.disconnecting


def test_protocol_ignores_data_after_oversize() -> None:
    handler = RecordingHandler()
    protocol, transport = connect(handler, max_message_bytes=100)
    protocol.dataReceived(START_BLOCK + b"MSH|" + b"x" * 200 + END_BLOCK + frame(b"MSH|2"))
    protocol.dataReceived(frame(b"MSH|3"))
    assert handler.received == []
    assert transport.value() == frame(b"MSH|AR")


INTAKE_POLICY = IdentifierPolicy("LOCAL", ("LOCAL",))
PATIENT = PatientSpec("L1", "LOCAL", "DOE^JANE", "19650312", "F")


def accept_all(event: DomainEvent | Unhandled) -> Plan:
    return Plan((), type(event).__name__)


@pytest.fixture(scope="module")
def memory_intake() -> Iterator[Intake]:
    fake = ImmediateStore(Store(":memory:"))
    yield Intake(fake, accept_all, INTAKE_POLICY)  # type: ignore[arg-type]
    fake.stop()


def acks_written(transport: StringTransport) -> list[list[str]]:
    """Return the segments of every framed ACK the protocol wrote."""
    frames = MLLPDecoder().feed(transport.value())
    assert all(isinstance(event, Frame) for event in frames)
    return [
        event.content.decode("latin-1").rstrip("\r").split("\r")
        for event in frames
        if isinstance(event, Frame)
    ]


_control_ids = itertools.count(1)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    count=st.integers(min_value=1, max_value=4),
    cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=40),
    noise=st.sampled_from([b"", b"\r\n", b"\x00", b"\n", b"\xef\xbb\xbf", b"log line\n"]),
)
def test_protocol_random_splits_answer_every_message(
    memory_intake: Intake, count: int, cuts: list[int], noise: bytes
) -> None:
    control_ids = [f"SPLIT{next(_control_ids)}" for _ in range(count)]
    when = dt.datetime(2026, 3, 14)
    data = b"".join(
        noise + frame(order_message(PATIENT, control_id, "ACC", when)) for control_id in control_ids
    )
    protocol = MLLPProtocol(memory_intake)
    transport = StringTransport()
    protocol.makeConnection(transport)
    start = 0
    for cut in [*sorted({min(cut, len(data)) for cut in cuts}), len(data)]:
        protocol.dataReceived(data[start:cut])
        start = cut
    answers = acks_written(transport)
    assert [segments[1] for segments in answers] == [f"MSA|AA|{c}" for c in control_ids]
    assert protocol.decoder.skipped_bytes == len(noise) * count
    assert transport.connected
    assert not transport.disconnecting


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=300),
            st.binary(max_size=300).map(lambda body: START_BLOCK + b"MSH|^~\\&|" + body),
            st.sampled_from([START_BLOCK, END_BLOCK, b"\x1c", b"\r"]),
        ),
        max_size=30,
    )
)
def test_protocol_random_bytes_answer_or_skip(memory_intake: Intake, chunks: list[bytes]) -> None:
    limit = 1024
    protocol = MLLPProtocol(memory_intake, max_message_bytes=limit)
    transport = StringTransport()
    protocol.makeConnection(transport)
    reference = MLLPDecoder(limit)
    expected_answers = 0
    for chunk in chunks:
        protocol.dataReceived(chunk)
        assert len(protocol.decoder._buffer) <= limit + len(chunk)
        assert len(protocol._queue) <= MAX_QUEUED_FRAMES + len(chunk)
        if transport.disconnecting:
            break
        for event in reference.feed(chunk):
            if isinstance(event, Frame) and _answered_in_original_mode(event.content):
                expected_answers += 1

    answers = acks_written(transport)
    if not transport.disconnecting:
        assert len(answers) == expected_answers
    for segments in answers:
        assert segments[0].startswith("MSH")
        msa = segments[1]
        assert msa.startswith("MSA")
        assert msa.split(msa[3])[1] in ("AA", "AE", "AR")
    assert not protocol._busy


def _answered_in_original_mode(content: bytes) -> bool:
    header = AckHeader.from_raw(content)
    fields = content.split(b"\r")[0].split(b"|")
    message_code = (
        fields[8].split(b"^")[0] if len(fields) > 8 and content.startswith(b"MSH|") else b""
    )
    return not header.enhanced_mode and message_code != b"ACK"


def converse(intake: Intake, data: bytes) -> tuple[list[list[str]], StringTransport]:
    protocol = MLLPProtocol(intake, max_message_bytes=4096)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    return acks_written(transport), transport


def listener_order(control_id: str) -> bytes:
    return order_message(PATIENT, control_id, "ACC", dt.datetime(2026, 3, 14))


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"not HL7 at all", [("MSA|AR|", "|100^Segment sequence error^HL70357|")]),
        (
            listener_order(""),
            [("MSA|AE|", "|MSH^1^10|101^Required field missing^HL70357|")],
        ),
        (
            listener_order("T200").replace(b"ORM^O01", b"ORU^R01"),
            [("MSA|AR|T200", "|MSH^1^9|200^Unsupported message type^HL70357|")],
        ),
        (
            listener_order("T102").replace(b"DOE^JANE", b"DOE^\xff"),
            [("MSA|AE|T102", "|MSH^1^18|102^Data type error^HL70357|")],
        ),
        (
            listener_order("T103").replace(b"UNICODE UTF-8", b"EBCDIC-KLINGON"),
            [("MSA|AE|T103", "|MSH^1^18|103^Table value not found^HL70357|")],
        ),
        (
            listener_order("TENH").replace(b"|P|2.5.1||||||", b"|P|2.5.1|||AL|AL||"),
            [("MSA|CA|TENH", ""), ("MSA|AA|TENH", "")],
        ),
        (b"MSH|^~\\&|RIS|RAD|FDQR|LOCAL|2026||ACK^O01^ACK|A1|P|2.5\rMSA|AA|X\r", []),
    ],
    ids=["unparsable", "no-control-id", "unsupported", "undecodable", "charset", "enhanced", "ack"],
)
def test_listener_answers_each_case(
    memory_intake: Intake, message: bytes, expected: list[tuple[str, str]]
) -> None:
    answers, transport = converse(memory_intake, frame(message) + frame(listener_order("NEXT")))
    assert len(answers) == len(expected) + 1
    for segments, (msa, err) in zip(answers, expected, strict=False):
        assert segments[1] == msa
        if err:
            assert err in segments[2]
    # The connection stays usable after every case.
    assert answers[-1][1] == "MSA|AA|NEXT"
    assert not transport.disconnecting


def test_listener_oversize_answers_ar_and_closes(memory_intake: Intake) -> None:
    big = listener_order("BIG") + b"NTE|1||" + b"x" * 5000 + b"\r"
    answers, transport = converse(memory_intake, frame(big) + frame(listener_order("AFTER")))
    assert [segments[1] for segments in answers] == ["MSA|AR|BIG"]
    assert "exceeds the size limit" in answers[0][2]
    assert transport.disconnecting


def test_protocol_logs_why_connection_failed(caplog: pytest.LogCaptureFixture) -> None:
    protocol, _ = connect(RecordingHandler())
    rejected = Failure(SSL.Error([("SSL routines", "", "peer did not return a certificate")]))

    with caplog.at_level(logging.INFO, logger="engine.hl7.mllp"):
        protocol.connectionLost(rejected)

    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "MLLP connection from 192.168.1.1:54321 closed: TLS failed: peer did not return a"
        " certificate"
    )


@pytest.mark.parametrize(
    ("reason", "text"),
    [
        (
            SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca"), ("x", "y", "bad mac")]),
            "TLS failed: tlsv1 alert unknown ca; bad mac",
        ),
        (SSL.SysCallError(-1, "Unexpected EOF"), "TLS failed: Unexpected EOF"),
        (
            SSL.Error([("SSL routines", "", "wrong version number")]),
            "TLS failed: wrong version number (not a TLS client: plain MLLP sent to the TLS port?)",
        ),
        (SSL.Error([]), "[]"),
        (error.ConnectionLost("reset by peer"), "Connection to the other side was lost"),
    ],
)
def test_close_reason_texts(reason: Exception, text: str) -> None:
    assert text in close_reason(Failure(reason))
    assert "SSL routines" not in close_reason(Failure(reason))


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (IPv4Address("TCP", "10.1.2.3", 2575), "10.1.2.3:2575"),
        (IPv6Address("TCP", "::1", 2575), "[::1]:2575"),
        (IPv6Address("TCP", "fe80::1%eth0", 2575), "[fe80::1%eth0]:2575"),
    ],
)
def test_peer_text_keeps_ipv6_address_apart_from_port(address: IAddress, text: str) -> None:
    protocol = MLLPProtocol(RecordingHandler())
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    assert protocol.peer == text


def test_protocol_logs_client_certificate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    authority = certificate_authority(tmp_path)
    client = issue(tmp_path, authority, "ris.example", server=False)
    certificate = crypto.load_certificate(crypto.FILETYPE_PEM, client.certificate_path.read_bytes())
    protocol, transport = connect(RecordingHandler())
    transport.getPeerCertificate = lambda: certificate  # type: ignore[attr-defined]

    with caplog.at_level(logging.INFO, logger="engine.hl7.mllp"):
        protocol.handshakeCompleted()
        transport.getPeerCertificate = lambda: None  # type: ignore[attr-defined]
        protocol.handshakeCompleted()

    assert [record.getMessage() for record in caplog.records] == [
        "MLLP connection from 192.168.1.1:54321: TLS, client certificate CN=ris.example,"
        f" issued by CN=fdqr test CA, serial {certificate.to_cryptography().serial_number:X}",
        "MLLP connection from 192.168.1.1:54321: TLS, no client certificate",
    ]


def test_client_certificate_named_with_messages(tmp_path: Path) -> None:
    authority = certificate_authority(tmp_path)
    client = issue(tmp_path, authority, "ris.example", server=False)
    certificate = crypto.load_certificate(crypto.FILETYPE_PEM, client.certificate_path.read_bytes())
    handler = PeerRecordingHandler()
    protocol, transport = connect(handler)
    transport.getPeerCertificate = lambda: certificate  # type: ignore[attr-defined]

    protocol.handshakeCompleted()
    protocol.dataReceived(frame(b"MSH|^~\\&|RIS|RAD"))

    assert handler.peers == ["192.168.1.1:54321 (client certificate CN=ris.example)"]


def test_protocol_logs_unfinished_frame_at_close(caplog: pytest.LogCaptureFixture) -> None:
    protocol, _ = connect(RecordingHandler())
    protocol.dataReceived(START_BLOCK + b"MSH|^~\\&|RIS")

    with caplog.at_level(logging.INFO, logger="engine.hl7.mllp"):
        protocol.connectionLost(Failure(error.ConnectionDone()))

    assert [(record.levelno, record.getMessage()) for record in caplog.records] == [
        (
            logging.WARNING,
            "MLLP connection from 192.168.1.1:54321 closed in the middle of a frame; 13 bytes"
            " of it discarded",
        ),
        (logging.INFO, "MLLP connection from 192.168.1.1:54321 closed"),
    ]


def test_protocol_logs_plain_close_at_info(caplog: pytest.LogCaptureFixture) -> None:
    protocol, _ = connect(RecordingHandler())

    with caplog.at_level(logging.INFO, logger="engine.hl7.mllp"):
        protocol.connectionLost(Failure(error.ConnectionDone()))

    [record] = caplog.records
    assert record.levelno == logging.INFO
