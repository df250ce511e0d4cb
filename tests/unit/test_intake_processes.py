"""Intake processes (mllp.processes): the engine's side and the child's, with Twisted fakes."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import error, protocol, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from engine.hl7.ack import AckHeader, build_ack, share_control_ids
from engine.hl7.child import (
    ConnectionReceiver,
    EngineLink,
    encode_event,
    patient_records_event,
    read_patient_records,
)
from engine.hl7.codes import AckCode
from engine.hl7.message import parse
from engine.hl7.processes import (
    ChildCommand,
    ChildProtocol,
    Dispatcher,
    IntakeEvents,
    IntakeProcesses,
)
from engine.jobs.planner import PatientChange
from engine.model import MessageOrigin, PatientIdentifier
from engine.testing.dicomgen import PatientSpec
from engine.testing.scenario import order_message

PATIENT = PatientSpec("L12345", "LOCAL", "DOE^JANE", "19650312", "F")
NOW_LOCAL = dt.datetime(2026, 3, 14, 9, 0, tzinfo=dt.UTC)

ORIGIN = MessageOrigin("HIS", "ADT", "ADT^A40", "M1")
CHANGES = [
    PatientChange(PatientIdentifier("L1", "LOCAL")),
    PatientChange(PatientIdentifier("L2", "LOCAL"), retired=True),
]


class Recorder:
    """IntakeEvents that record each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def events(self) -> IntakeEvents:
        return IntakeEvents(
            jobs_created=lambda: self.calls.append(("jobs",)),
            answered=lambda code, count: self.calls.append(("answered", code, count)),
            duplicates=lambda count: self.calls.append(("duplicates", count)),
            patient_records=lambda origin, peer, changes: self.calls.append(
                ("patient_records", origin, peer, list(changes))
            ),
        )


class ProcessTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def signalProcess(self, number: int) -> None:
        if self.pid == 0:
            raise error.ProcessExitedAlready()
        self.signals.append(number)


class ProcessReactor(task.Clock):
    """spawnProcess and adoptStreamConnection on a Clock; children keep their socket end."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[ChildProtocol, list[str], socket.socket]] = []
        self.adopted: list[tuple[int, int, Any]] = []

    def spawnProcess(
        self, child: ChildProtocol, executable: str, args: list[str], **options: Any
    ) -> ProcessTransport:
        theirs = socket.socket(fileno=os.dup(options["childFDs"][3]))
        self.spawned.append((child, args, theirs))
        transport = ProcessTransport(1000 + len(self.spawned))
        child.makeConnection(transport)  # type: ignore[arg-type]
        return transport

    def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
        self.adopted.append((os.fstat(fd).st_ino, family, factory))


def ended(child: ChildProtocol, status: int | None = None, number: int | None = None) -> None:
    child.processEnded(Failure(error.ProcessTerminated(status, number)))  # type: ignore[no-untyped-call]


SocketPairs = Callable[[int], list[tuple[socket.socket, socket.socket]]]


@pytest.fixture
def socket_pairs() -> Iterator[SocketPairs]:
    """Make connected socket pairs; all of them are closed after the test."""
    made: list[tuple[socket.socket, socket.socket]] = []

    def make(count: int) -> list[tuple[socket.socket, socket.socket]]:
        pairs = [socket.socketpair() for _ in range(count)]
        made.extend(pairs)
        return pairs

    yield make
    for ours, peer in made:
        ours.close()
        peer.close()


@pytest.fixture
def reactor() -> Iterator[ProcessReactor]:
    fake = ProcessReactor()
    yield fake
    for child, _, theirs in fake.spawned:
        theirs.close()
        child.connections.close()


def ready(reactor: ProcessReactor) -> None:
    for child, _, _ in reactor.spawned:
        child.outReceived(encode_event("ready"))


def processes(reactor: ProcessReactor, recorder: Recorder, count: int = 2) -> IntakeProcesses:
    command = ChildCommand(Path("/etc/fdqr/engine.yaml"), "INFO", socket.AF_INET, "d1")
    return IntakeProcesses(
        reactor, command, count, recorder.events(), protocol.Factory(), rules=lambda: "r1"
    )


def test_children_started_with_engine_config(reactor: ProcessReactor) -> None:
    processes(reactor, Recorder()).start()

    args = [arguments for _, arguments, _ in reactor.spawned]
    assert [argument[argument.index("--number") + 1] for argument in args] == ["1", "2"]
    assert all(argument[1:3] == ["-m", "engine.hl7.child"] for argument in args)
    assert all("/etc/fdqr/engine.yaml" in argument for argument in args)
    assert all(argument[-4:] == ["--settings", "d1", "--rules", "r1"] for argument in args)


def test_child_spawn_failure_retried(
    reactor: ProcessReactor, caplog: pytest.LogCaptureFixture
) -> None:
    spawn = reactor.spawnProcess
    failures = [OSError(24, "Too many open files")]

    def failing(*args: Any, **options: Any) -> Any:
        if failures:
            raise failures.pop()
        return spawn(*args, **options)

    reactor.spawnProcess = failing  # type: ignore[method-assign]
    intake = processes(reactor, Recorder(), count=1)
    intake.start()
    assert intake.children == {}
    reactor.advance(1)

    assert sorted(intake.children) == [1]
    assert (
        "starting intake process 1 failed: [Errno 24] Too many open files; trying again in 1 s"
        in (caplog.text)
    )


def test_events_split_over_reads(reactor: ProcessReactor) -> None:
    recorder = Recorder()
    processes(reactor, recorder).start()
    child = reactor.spawned[0][0]
    stream = encode_event(
        "counts", answered={"AA": 3, "AE": 1}, unanswered=2, duplicates=1, jobs=3, closed=0
    ) + patient_records_event(ORIGIN, "10.0.0.5:4000", CHANGES)

    for start in range(0, len(stream), 7):
        child.outReceived(stream[start : start + 7])

    assert recorder.calls == [
        ("answered", "AA", 3),
        ("answered", "AE", 1),
        ("answered", None, 2),
        ("duplicates", 1),
        ("jobs",),
        ("patient_records", ORIGIN, "10.0.0.5:4000", CHANGES),
    ]


def test_unreadable_event_logged_and_skipped(
    reactor: ProcessReactor, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    processes(reactor, recorder).start()
    child = reactor.spawned[0][0]

    child.outReceived(b'not json\n{"kind": "restart"}\n{"kind": "patient_records"}\n')
    child.outReceived(
        encode_event("counts", answered={}, unanswered=0, duplicates=0, jobs=1, closed=0)
    )

    assert recorder.calls == [("jobs",)]
    problems = [record.getMessage() for record in caplog.records]
    assert len(problems) == 3
    assert all("intake process 1 sent an event that cannot be read" in text for text in problems)


def test_failing_event_handler_logged(
    reactor: ProcessReactor, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("worker gone")

    command = ChildCommand(Path("engine.yaml"), "INFO", socket.AF_INET, "d1")
    events = IntakeEvents(broken, lambda code, count: None, lambda count: None, print)
    IntakeProcesses(reactor, command, 1, events, protocol.Factory()).start()

    reactor.spawned[0][0].outReceived(
        encode_event("counts", answered={}, unanswered=0, duplicates=0, jobs=1, closed=0)
    )

    assert "handling an event of intake process 1 failed" in caplog.text


def test_ended_child_restart_delay_grows(
    reactor: ProcessReactor, caplog: pytest.LogCaptureFixture
) -> None:
    intake = processes(reactor, Recorder())
    intake.start()
    first = reactor.spawned[0][0]

    ended(first, number=signal.SIGKILL)
    assert sorted(intake.children) == [2]
    reactor.advance(0.9)
    assert len(reactor.spawned) == 2
    reactor.advance(0.1)
    assert len(reactor.spawned) == 3
    assert sorted(intake.children) == [1, 2]
    # It ended again at once: the next start waits twice as long.
    ended(reactor.spawned[2][0], status=1)
    reactor.advance(1.9)
    assert len(reactor.spawned) == 3
    reactor.advance(0.1)
    assert len(reactor.spawned) == 4
    # After a steady run the delay is back to its first value.
    reactor.advance(60)
    ended(reactor.spawned[3][0], status=1)
    reactor.advance(1)
    assert len(reactor.spawned) == 5

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors[0] == (
        "intake process 1 ended (signal 9) after 0 s, with no connection open;"
        " starting it again in 1 s"
    )
    assert errors[1] == (
        "intake process 1 ended (exit status 1) after 0 s, with no connection open;"
        " starting it again in 2 s"
    )


def child_holding(
    reactor: ProcessReactor, socket_pairs: SocketPairs, connections: int
) -> tuple[IntakeProcesses, ChildProtocol]:
    """Start one ready child and pass it this many connections."""
    intake = processes(reactor, Recorder(), count=1)
    intake.start()
    ready(reactor)
    for ours, _ in socket_pairs(connections):
        intake.dispatch(ours)
    return intake, reactor.spawned[0][0]


def test_ended_child_names_connections_it_held(
    reactor: ProcessReactor, socket_pairs: SocketPairs, caplog: pytest.LogCaptureFixture
) -> None:
    _, child = child_holding(reactor, socket_pairs, 3)
    child.outReceived(
        encode_event("counts", answered={}, unanswered=0, duplicates=0, jobs=0, closed=1)
    )

    ended(child, number=signal.SIGKILL)

    # Socket pairs have no address, and a connection passed to it may have closed since.
    assert caplog.records[-1].getMessage() == (
        "intake process 1 ended (signal 9) after 0 s; its 2 open connections closed with it"
        " (passed to it: (unnamed peer), (unnamed peer), (unnamed peer)), and their senders"
        " send again what was not acknowledged; starting it again in 1 s"
    )


def test_ended_child_names_senders_of_last_response(
    reactor: ProcessReactor, socket_pairs: SocketPairs, caplog: pytest.LogCaptureFixture
) -> None:
    intake, child = child_holding(reactor, socket_pairs, 2)
    child.outReceived(encode_event("pong", senders=["10.0.0.5:4000", "10.0.0.6:4100"]))
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as late:
        late_port = late.getsockname()[1]
        accepted, _ = listener.accept()
        with accepted:
            intake.dispatch(accepted)

            ended(child, number=signal.SIGKILL)

    assert caplog.records[-1].getMessage() == (
        "intake process 1 ended (signal 9) after 0 s; its 3 open connections closed with it"
        " (from 10.0.0.5:4000, 10.0.0.6:4100 at its last ping response; passed to it since:"
        f" 127.0.0.1:{late_port}), and their senders send again what was not"
        " acknowledged; starting it again in 1 s"
    )


def test_stop_terminates_then_kills(
    reactor: ProcessReactor,
) -> None:
    intake = processes(reactor, Recorder())
    intake.start()
    first, second = (child for child, _, _ in reactor.spawned)
    ended(first, status=1)  # its start again is pending

    stopped = intake.stop()
    assert second.transport.signals == [signal.SIGTERM]  # type: ignore[union-attr]
    reactor.advance(10)
    assert second.transport.signals == [signal.SIGTERM, signal.SIGKILL]  # type: ignore[union-attr]
    assert not stopped.called
    ended(second, number=signal.SIGKILL)
    assert stopped.called
    reactor.advance(60)
    assert len(reactor.spawned) == 2


def received_inode(theirs: socket.socket) -> int:
    _, fds, _, _ = socket.recv_fds(theirs, 16, 1)
    [fd] = fds
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def test_connections_passed_in_turn(reactor: ProcessReactor, socket_pairs: SocketPairs) -> None:
    intake = processes(reactor, Recorder())
    intake.start()
    ready(reactor)
    connections = socket_pairs(4)
    inodes = [os.fstat(ours.fileno()).st_ino for ours, _ in connections]
    for ours, _ in connections:
        intake.dispatch(ours)
        assert ours.fileno() == -1  # the engine's copy is closed
    first, second = (theirs for _, _, theirs in reactor.spawned)
    got = [received_inode(first), received_inode(second)]
    got += [received_inode(first), received_inode(second)]
    assert got == inodes
    assert reactor.adopted == []


def test_untaken_connection_served_by_engine(
    reactor: ProcessReactor, caplog: pytest.LogCaptureFixture
) -> None:
    intake = processes(reactor, Recorder())
    intake.start()
    ready(reactor)
    first, second = (child for child, _, _ in reactor.spawned)
    ended(first, status=1)
    second.connections.close()  # as when the child's end is gone
    ours, peer = socket.socketpair()
    try:
        inode = os.fstat(ours.fileno()).st_ino
        intake.dispatch(ours)
        reactor.advance(10)
        assert reactor.adopted == [(inode, socket.AF_INET, intake.serve_here)]
        assert ours.fileno() == -1
    finally:
        ours.close()
        peer.close()
    assert "passing a connection to intake process 2 failed" in caplog.text
    assert "no intake process can take a connection; the engine process serves it" in caplog.text


def test_connection_waits_for_starting_children(reactor: ProcessReactor) -> None:
    intake = processes(reactor, Recorder())
    intake.start()
    ours, peer = socket.socketpair()
    try:
        inode = os.fstat(ours.fileno()).st_ino
        intake.dispatch(ours)
        assert ours.fileno() != -1  # held until a child is ready

        first, second = reactor.spawned
        second[0].outReceived(encode_event("ready"))
        # It waits until every starting child is ready, so that waiting ones spread evenly.
        assert ours.fileno() != -1
        first[0].outReceived(encode_event("ready"))

        assert received_inode(first[2]) == inode
        assert ours.fileno() == -1
        reactor.advance(60)
        assert reactor.adopted == []
    finally:
        ours.close()
        peer.close()


def test_connection_wait_ends_in_engine(
    reactor: ProcessReactor,
) -> None:
    intake = processes(reactor, Recorder())
    intake.start()
    ours, peer = socket.socketpair()
    try:
        inode = os.fstat(ours.fileno()).st_ino
        intake.dispatch(ours)
        reactor.advance(2.9)
        assert reactor.adopted == []
        reactor.advance(0.1)
        assert reactor.adopted == [(inode, socket.AF_INET, intake.serve_here)]
    finally:
        ours.close()
        peer.close()


def test_connection_waiting_for_ended_child_served(reactor: ProcessReactor) -> None:
    intake = processes(reactor, Recorder(), count=1)
    intake.start()
    ours, peer = socket.socketpair()
    try:
        inode = os.fstat(ours.fileno()).st_ino
        intake.dispatch(ours)
        assert reactor.adopted == []

        # It refused to start (e.g. changed settings) before it was ready.
        ended(reactor.spawned[0][0], status=2)

        assert reactor.adopted == [(inode, socket.AF_INET, intake.serve_here)]
        reactor.advance(60)
        assert len(reactor.adopted) == 1
    finally:
        ours.close()
        peer.close()


def test_waiting_connections_closed_at_stop(reactor: ProcessReactor) -> None:
    intake = processes(reactor, Recorder())
    intake.start()
    ours, peer = socket.socketpair()
    try:
        intake.dispatch(ours)
        intake.stop()
        assert ours.fileno() == -1
        peer.settimeout(5)
        assert peer.recv(10) == b""
        reactor.advance(60)
        assert reactor.adopted == []
    finally:
        ours.close()
        peer.close()


# The child's side.


def test_patient_records_event_round_trip() -> None:
    line = patient_records_event(ORIGIN, "10.0.0.5:4000", CHANGES)

    assert read_patient_records(json.loads(line)) == (ORIGIN, "10.0.0.5:4000", CHANGES)


def test_link_counts_one_line_per_turn() -> None:
    clock = task.Clock()
    link = EngineLink(clock, on_lost=lambda: None)
    transport = StringTransport()
    link.makeConnection(transport)
    ack = b"MSH|^~\\&|FDQR|LOCAL|RIS|RAD|20260314||ACK^O01|A1|P|2.5\rMSA|%s|C1\r"

    link.answered([ack % b"AA"])
    link.answered([ack % b"AA"])
    link.answered([ack % b"AE"])
    link.answered([])
    link.duplicate()
    link.jobs_created()
    link.jobs_created()
    assert transport.value() == b""
    clock.advance(0)
    link.jobs_created()
    clock.advance(0)

    first, second = transport.value().splitlines()
    assert json.loads(first) == {
        "kind": "counts",
        "answered": {"AA": 2, "AE": 1},
        "unanswered": 1,
        "duplicates": 1,
        "jobs": 2,
        "closed": 0,
    }
    assert json.loads(second)["jobs"] == 1


def test_link_end_stops_child() -> None:
    lost: list[bool] = []
    link = EngineLink(task.Clock(), on_lost=lambda: lost.append(True))
    link.makeConnection(StringTransport())

    link.connectionLost(Failure(error.ConnectionDone()))  # type: ignore[no-untyped-call]

    assert lost == [True]


class AdoptingReactor:
    running = True

    def __init__(self) -> None:
        self.adopted: list[tuple[int, int, Any]] = []
        self.stopped = False

    def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
        self.adopted.append((os.fstat(fd).st_ino, family, factory))

    def stop(self) -> None:
        self.stopped = True


def test_receiver_adopts_passed_connections(socket_pairs: SocketPairs) -> None:
    reactor = AdoptingReactor()
    factory = protocol.Factory()
    engine_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child_end.setblocking(False)
    lost: list[bool] = []
    receiver = ConnectionReceiver(
        reactor, child_end, socket.AF_INET, factory, lambda: lost.append(True)
    )
    connections = socket_pairs(2)
    try:
        for ours, _ in connections:
            socket.send_fds(engine_end, [b"c"], [ours.fileno()])
        assert receiver.doRead() is None
        expected = [os.fstat(ours.fileno()).st_ino for ours, _ in connections]
        assert reactor.adopted == [(inode, socket.AF_INET, factory) for inode in expected]

        engine_end.close()
        ending = receiver.doRead()
        assert ending is not None and ending.check(error.ConnectionDone)
        receiver.connectionLost(ending)
        assert lost == [True]
    finally:
        engine_end.close()
        child_end.close()


class AdoptFailingReactor(ProcessReactor):
    def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
        raise OSError(107, "Transport endpoint is not connected")


def test_connection_not_taken_counts_as_closed(socket_pairs: SocketPairs) -> None:
    engine_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child_end.setblocking(False)
    not_taken: list[bool] = []
    receiver = ConnectionReceiver(
        AdoptFailingReactor(),
        child_end,
        socket.AF_INET,
        protocol.Factory(),
        lambda: None,
        lambda: not_taken.append(True),
    )
    try:
        [(ours, _)] = socket_pairs(1)
        socket.send_fds(engine_end, [b"c"], [ours.fileno()])
        assert receiver.doRead() is None
        assert not_taken == [True]
    finally:
        engine_end.close()
        child_end.close()


def test_closed_connections_counted_for_engine() -> None:
    clock = task.Clock()
    link = EngineLink(clock, on_lost=lambda: None)
    transport = StringTransport()
    link.makeConnection(transport)
    link.closed()
    link.closed()
    clock.advance(0)

    assert json.loads(transport.value())["closed"] == 2


def test_silent_child_skipped_then_killed(
    reactor: ProcessReactor, caplog: pytest.LogCaptureFixture, socket_pairs: SocketPairs
) -> None:
    intake = processes(reactor, Recorder())
    intake.start()
    ready(reactor)
    (first, _, _), (second, _, second_end) = reactor.spawned
    reactor.advance(1)
    assert first.transport.written.endswith(b'{"kind":"ping"}\n')  # type: ignore[union-attr]
    second.outReceived(encode_event("pong", senders=[]))
    reactor.advance(3)
    second.outReceived(encode_event("pong", senders=[]))

    # The first has not responded for 3 s, so new connections go to the second only.
    connections = socket_pairs(2)
    inodes = [os.fstat(ours.fileno()).st_ino for ours, _ in connections]
    for ours, _ in connections:
        intake.dispatch(ours)
    assert [received_inode(second_end), received_inode(second_end)] == inodes

    reactor.advance(26)
    assert first.transport.signals == []  # type: ignore[union-attr]
    reactor.advance(1)
    assert first.transport.signals == [signal.SIGKILL]  # type: ignore[union-attr]
    assert second.transport.signals == []  # type: ignore[union-attr]
    assert "intake process 1 has not responded for 30 s; killing it" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "intake process 1 has not responded for 3 s, with 0 open connections; new connections"
        " go to the others, and it is killed at 30 s"
    ]


def test_rules_reload_sent_to_children(reactor: ProcessReactor) -> None:
    digests = iter(["r1", "r1", "r2"])
    command = ChildCommand(Path("engine.yaml"), "INFO", socket.AF_INET, "d1")
    intake = IntakeProcesses(
        reactor, command, 2, Recorder().events(), protocol.Factory(), rules=lambda: next(digests)
    )
    intake.start()

    intake.rules_reloaded()

    for child, _, _ in reactor.spawned:
        assert json.loads(child.transport.written) == {"kind": "rules", "digest": "r2"}  # type: ignore[union-attr]


def test_link_answers_pings_and_takes_rules() -> None:
    rules: list[str] = []
    link = EngineLink(task.Clock(), on_lost=lambda: None, on_rules=rules.append)
    link.senders = lambda: ["10.0.0.5:4000"]
    transport = StringTransport()
    link.makeConnection(transport)

    link.dataReceived(b'{"kind":"ping"}\n{"kind":"rul')
    link.dataReceived(b'es","digest":"abc"}\nnot json\n')

    assert transport.value() == b'{"kind":"pong","senders":["10.0.0.5:4000"]}\n'
    assert rules == ["abc"]


def test_rules_reload_starts_waiting_child_at_once(reactor: ProcessReactor) -> None:
    intake = processes(reactor, Recorder())
    intake.start()
    # It refused the rule files, which the engine had not loaded yet.
    ended(reactor.spawned[0][0], status=2)
    assert len(reactor.spawned) == 2

    intake.rules_reloaded()

    assert len(reactor.spawned) == 3
    assert sorted(intake.children) == [1, 2]
    reactor.advance(60)
    assert len(reactor.spawned) == 3


def test_ack_control_ids_differ_between_processes() -> None:
    header = AckHeader.from_message(parse(order_message(PATIENT, "C1", "A1", NOW_LOCAL)))
    control_ids = []
    try:
        # The engine (residue 0) and intake processes 1 and 2, in the same second.
        for first in (3, 1, 2):
            share_control_ids(first, 3)
            for _ in range(4):
                ack = build_ack(header, AckCode.APPLICATION_ACCEPT, now=NOW_LOCAL)
                control_ids.append(ack.split(b"\r")[0].split(b"|")[9])
    finally:
        share_control_ids(1, 1)

    assert len(set(control_ids)) == 12


def test_reset_connection_served_here_logged(
    reactor: ProcessReactor, caplog: pytest.LogCaptureFixture
) -> None:
    def reset(fd: int, family: int, factory: Any) -> None:
        raise OSError(107, "Transport endpoint is not connected")

    caplog.set_level(logging.INFO)
    intake = processes(reactor, Recorder(), count=1)
    reactor.adoptStreamConnection = reset  # type: ignore[method-assign]
    ours, peer = socket.socketpair()
    peer.close()
    try:
        # No child runs (none was started), so the engine takes it.
        intake.dispatch(ours)
        assert ours.fileno() == -1
    finally:
        ours.close()
    assert "a connection ended before the engine process took it" in caplog.text


def test_dispatcher_keeps_accepting_after_failure(caplog: pytest.LogCaptureFixture) -> None:
    class Failing:
        def __init__(self) -> None:
            self.calls = 0

        def dispatch(self, connection: socket.socket) -> None:
            self.calls += 1
            raise RuntimeError("broken")

    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    failing = Failing()
    dispatcher = Dispatcher(listening, failing)  # type: ignore[arg-type]
    clients = [socket.create_connection(listening.getsockname()) for _ in range(2)]
    try:
        time.sleep(0.1)
        assert dispatcher.doRead() is None
        assert failing.calls == 2
        for client in clients:
            client.settimeout(5)
            assert client.recv(10) == b""
    finally:
        listening.close()
        for client in clients:
            client.close()
    assert "passing an MLLP connection on failed; it was closed" in caplog.text
