"""free_port within one process: a port the kernel offers twice is returned once."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from engine.testing import ports


class _Probe:
    """A socket whose bound port comes from a fixed sequence."""

    def __init__(self, offered: list[int]) -> None:
        self._offered = offered
        self._port = 0

    def __enter__(self) -> _Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        self._port = self._offered.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self._port)


def test_free_port_skips_a_repeated_port(monkeypatch: pytest.MonkeyPatch) -> None:
    offered = [40001, 40001, 40001, 40002]

    def make_probe(*args: Any) -> _Probe:
        return _Probe(offered)

    monkeypatch.setattr(ports, "_returned_ports", set())
    monkeypatch.setattr(socket, "socket", make_probe)

    assert ports.free_port() == 40001
    assert ports.free_port() == 40002
    assert offered == []
