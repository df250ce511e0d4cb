"""HL7 intake benchmark: concurrent MLLP senders against a real `fdqr run`.

Runs the engine with its store on disk (WAL, every commit that stores
messages synced before their ACKs) and then with the store in memory as the
reference, --repeat times each, alternating. By default the engine runs its
intake in --processes 2 intake processes (mllp.processes), and the reference
store is then a file in /dev/shm, since those processes share one store file;
with --processes 0 the intake runs in the engine process and the reference
store is ":memory:". For each run it measures:

- throughput: --senders connections send --messages ORM^O01 orders in total,
  each connection waiting for the ACK before its next message, as MLLP requires;
- latency: the same senders paced at --rate messages/s in total for
  --paced-seconds, reporting p50 and p99 time from the write of a message to
  the arrival of its ACK.

Every order creates one job, as a CT order does with the shipped routes and
rules. Its patient is absent from the identity table, so the worker finishes
each job without network traffic. --no-jobs sends orders that no rule
applies to. After each durable run the store is checked to contain every
acknowledged message. The last line of output is JSON with the medians over
the runs: {"durable_msgs_per_s", "memory_msgs_per_s", "ratio", "p99_ack_ms"}.

    .venv/bin/python bench/hl7_ingest.py [--senders 8] [--messages 20000] [--repeat 3]
        [--processes 2]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.testing.intake import INTAKE_PATIENT, write_intake_config
from engine.testing.scenario import order_message
from engine.testing.sites import EngineProcess

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"


@dataclasses.dataclass
class Run:
    """The figures of one phase."""

    messages: int
    seconds: float
    latencies: list[float]

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


class SenderError(Exception):
    pass


def send_all(port: int, frames: list[list[tuple[str, bytes]]], interval: float | None) -> Run:
    """Send each list of (control id, frame) on its own connection, one thread each.

    interval paces each connection, and the connections start evenly spread
    over one interval, so paced messages arrive one at a time rather than in
    bursts of one per connection. None sends each message as soon as the
    previous ACK arrived.
    """
    latencies: list[float] = []
    errors: list[BaseException] = []
    threads = [
        threading.Thread(
            target=_sender,
            args=(port, batch, interval, number / len(frames), latencies, errors),
        )
        for number, batch in enumerate(frames)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return Run(sum(len(batch) for batch in frames), seconds, latencies)


def _sender(
    port: int,
    batch: list[tuple[str, bytes]],
    interval: float | None,
    phase: float,
    latencies: list[float],
    errors: list[BaseException],
) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # phase is this connection's share of one interval, from 0 to 1.
            next_send = time.perf_counter() + phase * (interval or 0)
            for control_id, frame in batch:
                if interval is not None:
                    next_send += interval
                    delay = next_send - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                sent = time.perf_counter()
                connection.sendall(frame)
                answer = _read_frame(connection)
                latencies.append(time.perf_counter() - sent)
                if b"\rMSA|AA|" + control_id.encode() + b"\r" not in answer:
                    raise SenderError(f"unexpected response to {control_id}: {answer[:200]!r}")
    except BaseException as error:
        errors.append(error)


def _read_frame(connection: socket.socket) -> bytes:
    data = b""
    while not data.endswith(END_BLOCK):
        chunk = connection.recv(65536)
        if not chunk:
            raise SenderError("connection closed before the ACK arrived")
        data += chunk
    return data


def build_frames(
    prefix: str, senders: int, per_sender: int, modality: str
) -> list[list[tuple[str, bytes]]]:
    when = dt.datetime(2026, 3, 14, 9, 0)
    batches = []
    for sender in range(senders):
        batch = []
        for index in range(per_sender):
            control_id = f"{prefix}-{sender}-{index}"
            message = order_message(INTAKE_PATIENT, control_id, control_id, when, modality=modality)
            batch.append((control_id, START_BLOCK + message + END_BLOCK))
        batches.append(batch)
    return batches


def measure(folder: Path, store: str, options: argparse.Namespace, label: str) -> tuple[Run, Run]:
    config, port = write_intake_config(folder, store, {"processes": options.processes})
    engine = EngineProcess(config, port, folder / "engine.log", options.log_level)
    engine.start()
    try:
        modality = "XX" if options.no_jobs else "CT"
        per_sender = options.messages // options.senders
        frames = build_frames(f"{label}T", options.senders, per_sender, modality)
        throughput = send_all(port, frames, None)
        paced_per_sender = int(options.rate * options.paced_seconds) // options.senders
        frames = build_frames(f"{label}P", options.senders, paced_per_sender, modality)
        paced = send_all(port, frames, options.senders / options.rate)
    finally:
        status = engine.stop()
    if status != 0:
        raise SystemExit(f"fdqr run exited with status {status}; see {folder / 'engine.log'}")
    return throughput, paced


@contextlib.contextmanager
def memory_store(options: argparse.Namespace) -> Iterator[str]:
    """Yield the reference run's store: in memory, or a file in RAM for intake processes.

    Intake processes share the engine's store file, which ":memory:" is not. So
    with --processes the reference store is a file in /dev/shm (tmpfs): the same
    processes and SQLite work, with writes and syncs that never reach a disk.
    """
    if not options.processes:
        yield ":memory:"
        return
    with tempfile.TemporaryDirectory(prefix="fdqr-bench-", dir="/dev/shm") as folder:
        yield str(Path(folder) / "fdqr.sqlite")


def stored_messages(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])


def report(label: str, throughput: Run, paced: Run, rate: float) -> None:
    print(
        f"{label}: {throughput.per_second:,.0f} msgs/s ({throughput.messages} messages in"
        f" {throughput.seconds:.2f} s); ACK p50 {throughput.percentile(0.5):.1f} ms,"
        f" p99 {throughput.percentile(0.99):.1f} ms at full speed;"
        f" at {rate:.0f} msgs/s p50 {paced.percentile(0.5):.1f} ms,"
        f" p99 {paced.percentile(0.99):.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--senders", type=int, default=8, help="concurrent MLLP connections")
    parser.add_argument(
        "--messages", type=int, default=20000, help="messages in the throughput run"
    )
    parser.add_argument("--rate", type=float, default=200, help="messages/s in the latency run")
    parser.add_argument("--paced-seconds", type=float, default=10, help="length of the latency run")
    parser.add_argument("--log-level", default="INFO", help="log level of fdqr run")
    parser.add_argument(
        "--no-jobs",
        action="store_true",
        help="send orders no rule applies to, so no jobs are created or run",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="alternate durable and in-memory runs this many times and report medians",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="mllp.processes of the engine (0: intake in the engine process)",
    )
    parser.add_argument("--keep", type=Path, help="keep the engine folders and logs here")
    options = parser.parse_args(argv)

    durable_runs: list[tuple[Run, Run]] = []
    memory_runs: list[tuple[Run, Run]] = []
    with tempfile.TemporaryDirectory(prefix="fdqr-bench-") as temporary:
        root = options.keep or Path(temporary)
        for attempt in range(1, options.repeat + 1):
            folder = root / f"durable-{attempt}"
            durable_store = folder / "fdqr.sqlite"
            durable_runs.append(measure(folder, str(durable_store), options, f"D{attempt}"))
            expected = sum(run.messages for run in durable_runs[-1])
            found = stored_messages(durable_store)
            if found != expected:
                raise SystemExit(
                    f"store contains {found} messages but {expected} were acknowledged"
                )
            with memory_store(options) as store:
                memory_runs.append(
                    measure(root / f"memory-{attempt}", store, options, f"M{attempt}")
                )

    for (durable, durable_paced), (memory, memory_paced) in zip(
        durable_runs, memory_runs, strict=True
    ):
        report("durable (SQLite WAL, fsync)", durable, durable_paced, options.rate)
        report("in-memory store (reference)", memory, memory_paced, options.rate)
    durable_rate = statistics.median(run.per_second for run, _ in durable_runs)
    memory_rate = statistics.median(run.per_second for run, _ in memory_runs)
    p99 = statistics.median(paced.percentile(0.99) for _, paced in durable_runs)
    ratio = durable_rate / memory_rate
    print(
        f"median of {options.repeat} run(s): durable {durable_rate:,.0f} msgs/s, in-memory"
        f" {memory_rate:,.0f} msgs/s, ratio {ratio:.2f}, ACK p99 {p99:.1f} ms at"
        f" {options.rate:.0f} msgs/s; every acknowledged message was found in the store"
    )
    result: dict[str, Any] = {
        "durable_msgs_per_s": round(durable_rate, 1),
        "memory_msgs_per_s": round(memory_rate, 1),
        "ratio": round(ratio, 3),
        "p99_ack_ms": round(p99, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
