"""The engine's side of its intake processes (mllp.processes; see engine.hl7.child).

The engine accepts each MLLP connection and passes it to the next child in
turn (SCM_RIGHTS over a socket pair per child), so the connections are spread
evenly: children sharing the listening socket would leave it to whichever
child woke first, and that took all of a burst of connections in a test.
While no child can take a connection, the engine process serves it. A child that
ends while the engine runs is started again, after a delay that doubles with
each quick end up to a limit, so a child that cannot start does not spin.
Connections wait in the socket's backlog in the meantime, and a sender
without an ACK sends its message again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, protocol, task
from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from engine.hl7.child import encode_event, read_patient_records
from engine.jobs.planner import PatientChange
from engine.model import MessageOrigin

logger = logging.getLogger(__name__)

# A child that ended is started again after FIRST_RESTART_SECONDS: a service
# manager that stops the whole group signals the children and the engine at
# once, and the engine's stop then cancels the start. The delay doubles while
# children end within STEADY_SECONDS of their start.
STEADY_SECONDS = 30.0
FIRST_RESTART_SECONDS = 1.0
MAX_RESTART_SECONDS = 30.0
# How long an accepted connection waits for a starting child before the engine serves it.
WAIT_FOR_CHILD_SECONDS = 3.0
# Each ready child is pinged this often. One that has not responded to a ping
# for UNANSWERED_SECONDS gets no new connection. One silent for
# KILL_SILENT_SECONDS (stopped, or stuck in a system call) is killed and
# started again.
PING_SECONDS = 1.0
UNANSWERED_SECONDS = 3.0
KILL_SILENT_SECONDS = 30.0
# How long a stopping engine waits for its children before it kills them.
STOP_WAIT_SECONDS = 10.0
# A line of the channel longer than this is a broken child; it is logged and dropped.
MAX_LINE_BYTES = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class IntakeEvents:
    """The engine's handlers of a child's events."""

    jobs_created: Callable[[], None]
    # An MSA-1 code (None: no acknowledgement sent) and how many messages got it.
    answered: Callable[[str | None, int], None]
    duplicates: Callable[[int], None]
    patient_records: Callable[[MessageOrigin, str, Sequence[PatientChange]], None]


@dataclasses.dataclass(frozen=True)
class ChildCommand:
    """The command line of a child: the engine's configuration, log level and address family."""

    config_path: Path
    log_level: str
    family: int
    # settings_digest of the engine's settings: a child whose engine.yaml now reads
    # differently refuses to run (its store path or local issuer could differ).
    settings: str

    def arguments(self, number: int, rules: str) -> list[str]:
        """Return the command line of child `number`; rules is the engine's rules digest."""
        return [
            sys.executable,
            "-m",
            "engine.hl7.child",
            "--config",
            str(self.config_path),
            "--log-level",
            self.log_level,
            "--number",
            str(number),
            "--connections-fd",
            "3",
            "--family",
            str(self.family),
            "--settings",
            self.settings,
            "--rules",
            rules,
        ]


class IntakeProcesses:
    def __init__(
        self,
        reactor: Any,
        command: ChildCommand,
        count: int,
        events: IntakeEvents,
        serve_here: protocol.Factory,
        rules: Callable[[], str] = lambda: "",
    ) -> None:
        self.reactor = reactor
        self.command = command
        # The digest of the engine's current rules (RuleSetHolder.digest).
        self.rules = rules
        self._pings = task.LoopingCall(self._ping)
        self._pings.clock = reactor
        self.count = count
        self.events = events
        # Serves a connection in the engine process while no child can take it.
        self.serve_here = serve_here
        self.stopping = False
        self.children: dict[int, ChildProtocol] = {}
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, Any] = {}
        self._turn = 0
        # Accepted connections waiting for a child to be ready.
        self._waiting: list[socket.socket] = []
        self._wait_timer: Any = None

    def dispatch(self, connection: socket.socket) -> None:
        """Pass an accepted connection to the next ready child in turn.

        While children are starting and none is ready, the connection waits
        for one, up to WAIT_FOR_CHILD_SECONDS; without any child, or after
        that wait, the engine process serves it.
        """
        if self._pass(connection):
            return
        if self.children and not self.stopping:
            self._waiting.append(connection)
            if self._wait_timer is None:
                self._wait_timer = self.reactor.callLater(
                    WAIT_FOR_CHILD_SECONDS, self._serve_waiting
                )
            return
        self._serve_here(connection)

    def _pass(self, connection: socket.socket) -> bool:
        now = self.reactor.seconds()
        ready = [
            number
            for number in sorted(self.children)
            if self.children[number].ready and self.children[number].answering(now)
        ]
        for offset in range(len(ready)):
            child = self.children[ready[(self._turn + offset) % len(ready)]]
            if child.take(connection):
                self._turn = (self._turn + offset + 1) % len(ready)
                connection.close()
                return True
        return False

    def _serve_here(self, connection: socket.socket) -> None:
        logger.warning("no intake process can take a connection; the engine process serves it")
        try:
            self.reactor.adoptStreamConnection(
                connection.fileno(), self.command.family, self.serve_here
            )
        except OSError as problem:
            # Usually a peer that reset the connection while it waited.
            logger.info("a connection ended before the engine process took it: %s", problem)
        finally:
            connection.close()

    def _child_ready(self, child: ChildProtocol) -> None:
        self._flush_waiting()

    def _flush_waiting(self) -> None:
        """Pass the waiting connections on once no child is starting; serve them without any."""
        if not self._waiting:
            return
        if not self.children:
            self._serve_waiting()
            return
        if not all(child.ready for child in self.children.values()):
            # Connections that waited go out once all are ready, to spread them evenly.
            return
        waiting, self._waiting = self._waiting, []
        for connection in waiting:
            if not self._pass(connection):
                self._waiting.append(connection)
        if not self._waiting:
            self._cancel_wait_timer()

    def _serve_waiting(self) -> None:
        self._cancel_wait_timer()
        waiting, self._waiting = self._waiting, []
        for connection in waiting:
            if not self._pass(connection):
                self._serve_here(connection)

    def _cancel_wait_timer(self) -> None:
        if self._wait_timer is not None and self._wait_timer.active():
            self._wait_timer.cancel()
        self._wait_timer = None

    def start(self) -> None:
        for number in range(1, self.count + 1):
            self._spawn(number)
        self._pings.start(PING_SECONDS, now=False)

    def rules_reloaded(self) -> None:
        """Tell every child the engine's new rules digest; each loads the rules again."""
        if self.stopping:
            return
        line = encode_event("rules", digest=self.rules())
        for child in self.children.values():
            child.send(line)
        # A child waiting to start again may have refused the files the engine now runs.
        for number, call in list(self._restarts.items()):
            if call.active():
                call.cancel()
            self._delays.pop(number, None)
            self._spawn(number)

    def _ping(self) -> None:
        now = self.reactor.seconds()
        for child in list(self.children.values()):
            if not child.ready:
                continue
            if child.ping_sent is None:
                child.ping_sent = now
                child.send(encode_event("ping"))
            elif not child.answering(now) and not child.silence_logged:
                child.silence_logged = True
                logger.warning(
                    "intake process %d has not responded for %.0f s, with %s; new connections"
                    " go to the others, and it is killed at %.0f s",
                    child.number,
                    now - child.ping_sent,
                    _held_connections_text(child.open_connections),
                    KILL_SILENT_SECONDS,
                )
            if child.ping_sent is not None and now - child.ping_sent >= KILL_SILENT_SECONDS:
                logger.error(
                    "intake process %d has not responded for %.0f s; killing it",
                    child.number,
                    now - child.ping_sent,
                )
                child.ping_sent = None
                child.signal(signal.SIGKILL)

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        child = ChildProtocol(
            number, self.events, self._ended, self.reactor.seconds(), ours, self._child_ready
        )
        try:
            self.reactor.spawnProcess(
                child,
                sys.executable,
                self.command.arguments(number, self.rules()),
                env=os.environ.copy(),
                childFDs={0: "w", 1: "r", 2: 2, 3: theirs.fileno()},
            )
        except OSError as problem:
            ours.close()
            delay = self._next_delay(number, 0.0)
            logger.error(
                "starting intake process %d failed: %s; trying again in %.0f s",
                number,
                problem,
                delay,
            )
            self._restarts[number] = self.reactor.callLater(delay, self._spawn, number)
            return
        finally:
            theirs.close()
        self.children[number] = child

    def _next_delay(self, number: int, ran: float) -> float:
        if ran >= STEADY_SECONDS:
            self._delays.pop(number, None)
        delay = self._delays.get(number, FIRST_RESTART_SECONDS)
        self._delays[number] = min(delay * 2, MAX_RESTART_SECONDS)
        return delay

    def _ended(self, child: ChildProtocol, status: str) -> None:
        if self.children.get(child.number) is child:
            del self.children[child.number]
        if self.stopping:
            return
        ran = self.reactor.seconds() - child.started
        delay = self._next_delay(child.number, ran)
        logger.log(
            logging.WARNING if status == "exit status 0" else logging.ERROR,
            "intake process %d ended (%s) after %.0f s%s; starting it again in %.0f s",
            child.number,
            status,
            ran,
            _held_connections_note(
                child.open_connections, child.senders, child.passed_since_response
            ),
            delay,
        )
        self._restarts[child.number] = self.reactor.callLater(delay, self._spawn, child.number)
        # Connections that waited for this child go to the others, or to the engine.
        self._flush_waiting()

    def stop(self) -> defer.Deferred[None]:
        """Stop every child: SIGTERM, then SIGKILL after STOP_WAIT_SECONDS."""
        self.stopping = True
        if self._pings.running:
            self._pings.stop()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        self._cancel_wait_timer()
        for connection in self._waiting:
            # Nothing was read from it: its sender sends again to the next engine.
            connection.close()
        self._waiting = []
        children = list(self.children.values())
        for child in children:
            child.signal(signal.SIGTERM)
        ended: defer.Deferred[Any] = defer.DeferredList(
            [child.ended for child in children], consumeErrors=True
        )

        def kill() -> None:
            for child in children:
                if not child.ended.called:
                    logger.warning(
                        "intake process %d did not stop within %.0f s; killing it",
                        child.number,
                        STOP_WAIT_SECONDS,
                    )
                    child.signal(signal.SIGKILL)

        timer = self.reactor.callLater(STOP_WAIT_SECONDS, kill)

        def done(_: Any) -> None:
            if timer.active():
                timer.cancel()

        return ended.addBoth(done)


def _peer_of(connection: socket.socket) -> str:
    """Return a connection's peer as the intake processes write it, e.g. [::1]:4242."""
    try:
        address = connection.getpeername()
    except OSError:
        return "(a peer already gone)"
    if not isinstance(address, tuple) or len(address) < 2:
        # A Unix socket (in tests) has no host and port.
        return str(address) or "(unnamed peer)"
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _held_connections_text(connections: int) -> str:
    plural = "s" if connections != 1 else ""
    return f"{connections} open connection{plural}"


def _held_connections_note(
    connections: int, senders: Sequence[str] = (), passed: Sequence[str] = ()
) -> str:
    """Return the log text on the connections a child held when it ended.

    senders are those of its last ping response; passed are the peers of the
    connections passed to it since, which may have closed meanwhile.
    """
    if connections == 0:
        return ", with no connection open"
    origins = []
    if senders:
        origins.append(f"from {', '.join(senders)} at its last ping response")
    if passed:
        since = " since" if senders else ""
        origins.append(f"passed to it{since}: {', '.join(passed)}")
    if origins:
        return (
            f"; its {_held_connections_text(connections)} closed with it ({'; '.join(origins)}),"
            " and their senders send again what was not acknowledged"
        )
    # An MLLP sender sends a message again until it gets an ACK, so one in progress is not lost.
    return (
        f"; its {_held_connections_text(connections)} closed with it, and their senders"
        " send again what was not acknowledged"
    )


class ChildProtocol(protocol.ProcessProtocol):
    """One child: reads its event lines and reports its end."""

    def __init__(
        self,
        number: int,
        events: IntakeEvents,
        on_ended: Callable[[ChildProtocol, str], None],
        started: float,
        connections: socket.socket,
        on_ready: Callable[[ChildProtocol], None] = lambda child: None,
    ) -> None:
        self.number = number
        self.events = events
        self.on_ended = on_ended
        self.started = started
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._buffer = b""
        # The engine's end of the socket pair that passes connections to the child.
        self.connections = connections
        # Set by the child's "ready" event; no connection is passed to it before.
        self.ready = False
        self.on_ready = on_ready
        # When the ping still without a response was sent.
        self.ping_sent: float | None = None
        # Connections passed to the child that it has not reported closed.
        self.open_connections = 0
        # Whether its silence (no response to a ping) is logged already.
        self.silence_logged = False
        # The senders of its open connections, as of its last ping response, and the
        # peers of the connections passed to it since.
        self.senders: list[str] = []
        self.passed_since_response: list[str] = []

    def answering(self, now: float) -> bool:
        """Return False while a ping waits for a response longer than UNANSWERED_SECONDS."""
        return self.ping_sent is None or now - self.ping_sent < UNANSWERED_SECONDS

    def send(self, line: bytes) -> None:
        """Write an event to the child's standard input."""
        if self.transport is not None and not self.ended.called:
            self.transport.write(line)

    def take(self, connection: socket.socket) -> bool:
        """Pass a connection to the child; False when it cannot take it now."""
        if self.ended.called:
            return False
        try:
            socket.send_fds(self.connections, [b"c"], [connection.fileno()])
        except OSError as problem:
            logger.warning(
                "passing a connection to intake process %d failed: %s", self.number, problem
            )
            return False
        self.open_connections += 1
        self.passed_since_response.append(_peer_of(connection))
        return True

    def signal(self, number: int) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(error.ProcessExitedAlready):
            self.transport.signalProcess(number)

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._dispatch(line)
        if len(self._buffer) > MAX_LINE_BYTES:
            logger.error(
                "intake process %d sent a line of over %d bytes; dropped it",
                self.number,
                MAX_LINE_BYTES,
            )
            self._buffer = b""

    def _dispatch(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            kind = event["kind"]
            if kind == "counts":
                self._counts(event)
            elif kind == "ready":
                self.ready = True
                self.on_ready(self)
            elif kind == "pong":
                self.senders = [str(sender) for sender in event["senders"]]
                self.passed_since_response = []
                if self.silence_logged:
                    logger.info("intake process %d responds again", self.number)
                self.ping_sent = None
                self.silence_logged = False
            elif kind == "patient_records":
                self.events.patient_records(*read_patient_records(event))
            else:
                raise KeyError(kind)
        except (ValueError, KeyError, TypeError) as problem:
            logger.error(
                "intake process %d sent an event that cannot be read (%s: %s); ignored it",
                self.number,
                type(problem).__name__,
                problem,
            )
        except Exception:
            logger.exception("handling an event of intake process %d failed", self.number)

    def _counts(self, event: dict[str, Any]) -> None:
        for code, count in dict(event["answered"]).items():
            self.events.answered(str(code), int(count))
        if event["unanswered"]:
            self.events.answered(None, int(event["unanswered"]))
        if event["duplicates"]:
            self.events.duplicates(int(event["duplicates"]))
        if event["jobs"]:
            self.events.jobs_created()
        self.open_connections = max(0, self.open_connections - int(event["closed"]))

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = getattr(value, "exitCode", None)
        number = getattr(value, "signal", None)
        status = f"signal {number}" if number is not None else f"exit status {code}"
        self.connections.close()
        self.on_ended(self, status)
        self.ended.callback(None)


@implementer(IReadDescriptor)
class Dispatcher:
    """Accepts connections on the MLLP listening socket and dispatches them."""

    def __init__(self, listening: socket.socket, processes: IntakeProcesses) -> None:
        self.listening = listening
        self.processes = processes

    def fileno(self) -> int:
        return self.listening.fileno()

    def doRead(self) -> None:
        # A burst of connections is taken in one turn, up to a bound.
        for _ in range(64):
            try:
                connection, _address = self.listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as problem:
                # Out of file descriptors and the like: the connection waits in the backlog.
                logger.error("accepting an MLLP connection failed: %s", problem)
                return
            try:
                self.processes.dispatch(connection)
            except Exception:
                # An exception here would make the reactor drop this reader, and with it
                # every later connection.
                logger.exception("passing an MLLP connection on failed; it was closed")
                connection.close()

    def connectionLost(self, reason: Failure) -> None:
        """Leave the listening socket open: the engine's port closes it."""

    def logPrefix(self) -> str:
        return "mllp-dispatcher"
