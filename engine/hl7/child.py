"""An intake process: it reads, plans and stores HL7 messages and acknowledges them.

`fdqr run` starts mllp.processes of these with `python -m engine.hl7.child`.
The engine accepts MLLP connections and passes each to one child over a
socket pair (descriptor 3 in the child). The child serves the connection to
its end. It stores messages and jobs in the engine's store file with its own
SQLite connection, so its work does not wait for the engine process's GIL.

The child writes events for the engine to its channel (its standard output at
start), one JSON line each: it is ready, jobs were created, a message changed
patient records, and the counts behind the metrics. It stops when its
standard input ends, which is when the engine process is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import error, protocol, stdio
from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from engine.hl7.ack import ack_code, share_control_ids
from engine.hl7.intake import Intake, ignore_reason
from engine.hl7.mllp import MLLPFactory
from engine.hl7.tls import wrap
from engine.jobs.planner import PatientChange
from engine.jobs.store import AsyncStore, Store, StoreError
from engine.logsetup import setup_logging
from engine.model import MessageOrigin, PatientIdentifier

# By name: run with python -m, the module is __main__.
logger = logging.getLogger("engine.hl7.child")

# At most this many senders go with a ping response, to keep its line short.
MAX_SENDERS_LISTED = 20


def encode_event(kind: str, **fields: Any) -> bytes:
    """Return one line of the channel from a child to the engine."""
    return json.dumps({"kind": kind, **fields}, separators=(",", ":")).encode() + b"\n"


def patient_records_event(
    origin: MessageOrigin, peer: str, changes: Sequence[PatientChange]
) -> bytes:
    return encode_event(
        "patient_records",
        origin=dataclasses.asdict(origin),
        peer=peer,
        changes=[
            {
                "value": change.patient.value,
                "issuer": change.patient.issuer,
                "retired": change.retired,
            }
            for change in changes
        ],
    )


def read_patient_records(
    event: dict[str, Any],
) -> tuple[MessageOrigin, str, list[PatientChange]]:
    """Return what patient_records_event encoded. Raises KeyError or TypeError if malformed."""
    changes = [
        PatientChange(PatientIdentifier(item["value"], item["issuer"]), bool(item["retired"]))
        for item in event["changes"]
    ]
    return MessageOrigin(**event["origin"]), str(event["peer"]), changes


class EngineLink(protocol.Protocol):
    """The child's end of the link to the engine: events out, end of input means stop.

    Counts (acknowledgements by code, duplicates, messages that created jobs,
    connections closed) are summed over a reactor turn and sent as one line
    at its end.
    """

    def __init__(
        self,
        reactor: Any,
        on_lost: Callable[[], None],
        on_rules: Callable[[str], None] = lambda digest: None,
        senders: Callable[[], list[str]] = lambda: [],
    ) -> None:
        self.reactor = reactor
        self.on_lost = on_lost
        # The senders of the open connections, sent with each ping response.
        self.senders = senders
        # Called with the engine's new rules digest after the engine reloaded its rules.
        self.on_rules = on_rules
        self._input = b""
        self._answered: dict[str, int] = {}
        self._unanswered = 0
        self._duplicates = 0
        self._jobs = 0
        self._closed = 0
        self._flush_queued = False

    def send(self, line: bytes) -> None:
        if self.transport is not None:
            self.transport.write(line)

    def answered(self, acks: Sequence[bytes]) -> None:
        if acks:
            code = ack_code(acks[0])
            self._answered[code] = self._answered.get(code, 0) + 1
        else:
            self._unanswered += 1
        self._queue_flush()

    def duplicate(self) -> None:
        self._duplicates += 1
        self._queue_flush()

    def jobs_created(self) -> None:
        self._jobs += 1
        self._queue_flush()

    def closed(self) -> None:
        """Count a connection passed by the engine that has closed."""
        self._closed += 1
        self._queue_flush()

    def _queue_flush(self) -> None:
        if not self._flush_queued:
            self._flush_queued = True
            self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._flush_queued = False
        self.send(
            encode_event(
                "counts",
                answered=self._answered,
                unanswered=self._unanswered,
                duplicates=self._duplicates,
                jobs=self._jobs,
                closed=self._closed,
            )
        )
        self._answered = {}
        self._unanswered = self._duplicates = self._jobs = self._closed = 0

    def dataReceived(self, data: bytes) -> None:
        """Reply to the engine's pings and take its rules reloads, one JSON line each."""
        self._input += data
        *lines, self._input = self._input.split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
                kind = event["kind"]
                if kind == "ping":
                    self.send(encode_event("pong", senders=self.senders()[:MAX_SENDERS_LISTED]))
                elif kind == "rules":
                    self.on_rules(str(event["digest"]))
                else:
                    raise KeyError(kind)
            except (ValueError, KeyError, TypeError) as problem:
                logger.error(
                    "the engine sent an event that cannot be read (%s: %s); ignored it",
                    type(problem).__name__,
                    problem,
                )

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.on_lost()


@implementer(IReadDescriptor)
class ConnectionReceiver:
    """Takes the connections the engine passes and hands them to the MLLP factory."""

    def __init__(
        self,
        reactor: Any,
        connections: socket.socket,
        family: int,
        factory: Any,
        on_lost: Callable[[], None],
        on_not_taken: Callable[[], None] = lambda: None,
    ) -> None:
        self.reactor = reactor
        self.connections = connections
        self.family = family
        self.factory = factory
        self.on_lost = on_lost
        # Called for each connection passed that could not be taken (it counts as closed).
        self.on_not_taken = on_not_taken

    def fileno(self) -> int:
        return self.connections.fileno()

    def doRead(self) -> Failure | None:
        while True:
            try:
                data, fds, _flags, _address = socket.recv_fds(self.connections, 16, 1)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as problem:
                return Failure(problem)  # type: ignore[no-untyped-call]
            if not data and not fds:
                return Failure(error.ConnectionDone())  # type: ignore[no-untyped-call]
            for fd in fds:
                try:
                    self.reactor.adoptStreamConnection(fd, self.family, self.factory)
                except OSError as problem:
                    # Usually a peer that reset the connection before it was taken.
                    logger.info("a connection ended before this process took it: %s", problem)
                    self.on_not_taken()
                finally:
                    os.close(fd)

    def connectionLost(self, reason: Failure) -> None:
        self.connections.close()
        self.on_lost()

    def logPrefix(self) -> str:
        return "intake"


def main(argv: Sequence[str] | None = None) -> int:
    # The engine reloads the rules and stops its children itself: a SIGHUP from a
    # log rotation or Ctrl-C in a terminal must not end a child, even while it starts.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="python -m engine.hl7.child")
    parser.add_argument("--config", required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--number", type=int, default=1)
    parser.add_argument("--connections-fd", type=int, default=3)
    parser.add_argument("--family", type=int, required=True)
    parser.add_argument("--settings", required=True, help="the engine's settings_digest")
    parser.add_argument("--rules", required=True, help="the digest of the engine's rules")
    args = parser.parse_args(argv)

    # The channel keeps the pipe; anything printed by mistake goes to the log.
    channel = os.dup(1)
    os.dup2(2, 1)
    setup_logging(args.log_level, f"[intake {args.number}] ")

    from twisted.internet import reactor as default_reactor

    reactor: Any = default_reactor
    config = _load_config(args.config, args.number, args.settings, args.rules)
    if config is None:
        return 2
    try:
        db = AsyncStore(reactor, Store(config.store_path))
    except StoreError as problem:
        logger.error("intake process %d cannot start: %s", args.number, problem)
        return 1
    return _serve(reactor, config, db, args, channel)


def _load_config(path: str, number: int, expected_settings: str, expected_rules: str) -> Any:
    """Return the configuration, or None (logged) when it is not the engine's."""
    from pathlib import Path

    from engine.config import load, rule_files, settings_digest
    from engine.configfile import ConfigError
    from engine.rules.reload import content_digest

    try:
        config = load(Path(path))
    except ConfigError as error:
        logger.error(
            "intake process %d cannot start: the configuration is invalid, %d problem(s)",
            number,
            len(error.problems),
        )
        for problem in error.problems:
            logger.error("  %s", problem)
        return None
    if settings_digest(config.settings, config.identity_table) != expected_settings:
        logger.error(
            "intake process %d cannot start: %s or its identity table changed since the"
            " engine started; restart the engine to use the new settings",
            number,
            config.path,
        )
        return None
    if content_digest(rule_files(config.path, config.settings)) != expected_rules:
        reload = "SIGHUP"
        if config.settings.rules_reload_seconds > 0:
            reload += f" or within {config.settings.rules_reload_seconds:g} s"
        logger.error(
            "intake process %d cannot start: the route and rule files differ from the rules"
            " the engine runs; the engine serves its connections until it loads them (%s)",
            number,
            reload,
        )
        return None
    return config


def _serve(
    reactor: Any, config: Any, db: AsyncStore, args: argparse.Namespace, channel: int
) -> int:
    from engine.config import mllp_tls_options
    from engine.hl7.wiring import engine_planner, engine_rules, identifier_policy

    settings = config.settings
    # The engine numbers its ACKs with residue 0; child N takes residue N.
    share_control_ids(args.number, settings.mllp.processes + 1)
    rules = engine_rules(config)
    exit_status = 0
    stopping = _Stopping(reactor)

    def engine_reloaded(digest: str) -> None:
        nonlocal exit_status
        rules.reload("the engine reloaded its rules")
        if rules.digest != digest:
            # The files changed again since the engine read them, or they are invalid here.
            logger.error(
                "intake process %d: the route and rule files differ from the rules the"
                " engine runs; stopping, to start again with the engine's",
                args.number,
            )
            exit_status = 3
            stopping.stop()

    def now() -> dt.datetime:
        return dt.datetime.fromtimestamp(reactor.seconds(), dt.UTC)

    link = EngineLink(reactor, on_lost=stopping.engine_gone, on_rules=engine_reloaded)
    intake = Intake(
        db,
        engine_planner(config, rules.current, now),
        identifier_policy(settings),
        charsets=settings.mllp.charsets(),
        now=now,
        on_jobs_created=link.jobs_created,
        ignored=lambda origin: ignore_reason(rules.current(), origin),
        on_answered=link.answered,
        on_duplicate=link.duplicate,
        on_patient_records=lambda origin, peer, changes: link.send(
            patient_records_event(origin, peer, changes)
        ),
        processing_ids=settings.mllp.processing_ids,
    )
    mllp_factory = MLLPFactory(
        intake,
        max_message_bytes=settings.mllp.max_message_bytes,
        idle_timeout=settings.mllp.idle_timeout_seconds,
        on_closed=link.closed,
    )
    link.senders = mllp_factory.senders
    factory: Any = mllp_factory
    if settings.mllp.tls is not None:
        factory = wrap(factory, mllp_tls_options(config.path, settings.mllp.tls))

    db.start()
    # POSIX StandardIO takes the descriptors; mypy reads the Windows signature.
    standard_io: Any = stdio.StandardIO
    standard_io(link, stdin=0, stdout=channel, reactor=reactor)
    connections = socket.socket(fileno=args.connections_fd)
    connections.setblocking(False)
    receiver = ConnectionReceiver(
        reactor, connections, args.family, factory, stopping.engine_gone, link.closed
    )
    reactor.addReader(receiver)
    link.send(encode_event("ready"))

    def stop() -> None:
        reactor.removeReader(receiver)
        db.stop()

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    # The reactor installs its own SIGINT handler when it runs; the engine stops the child.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    logger.info("intake process %d started (process id %d)", args.number, os.getpid())
    reactor.run()
    logger.info("intake process %d stopped", args.number)
    return exit_status


class _Stopping:
    """Stops the child's reactor once, whichever of its causes comes first."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.requested = False

    def engine_gone(self) -> None:
        if not self.requested:
            logger.info("the engine process closed the link; intake process stopping")
        self.stop()

    def stop(self) -> None:
        if self.requested:
            return
        self.requested = True
        self.reactor.callWhenRunning(self._stop_reactor)

    def _stop_reactor(self) -> None:
        # A SIGTERM from the engine may have stopped it already.
        with contextlib.suppress(error.ReactorNotRunning):
            self.reactor.stop()


if __name__ == "__main__":
    raise SystemExit(main())
