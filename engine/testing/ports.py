"""Free loopback ports, waiting for a listener, and pausing and stopping child processes."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time

# Ports free_port has returned in this process. The kernel may hand the same
# ephemeral port to two probes in a row, and a test that picks its ports before
# starting anything would then give one port to two listeners.
_returned_ports: set[int] = set()
_returned_lock = threading.Lock()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago and not returned before."""
    with _returned_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
            if port not in _returned_ports:
                _returned_ports.add(port)
                return port


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts connections on host:port; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing is listening on {host}:{port} after {timeout}s"
                ) from None
            time.sleep(0.05)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """Terminate a child process, kill it if it does not end in time; return its status."""
    process.terminate()
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


class PausableProcess:
    """A test peer whose child process can be frozen, as a stuck PACS is."""

    _process: subprocess.Popen[bytes] | None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def pause(self) -> None:
        """Stop the process with SIGSTOP: it stops reading, responding and closing connections."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)
