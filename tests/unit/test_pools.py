"""Stopping the per-node thread pools, with a thread that never returns."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from engine.dimse.pools import NodePools


class ThreadReactor:
    """Delivers results from pool threads nowhere: the tests look at the threads only."""

    def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:
        pass


def test_stop_returns_when_pools_are_idle() -> None:
    pools = NodePools(ThreadReactor(), {"hospital_a": 2})  # type: ignore[arg-type]
    pools.start()
    pools.run("hospital_a", time.sleep, 0)
    assert pools.stop(timeout=5) == []


def test_stop_leaves_a_blocked_thread_behind() -> None:
    pools = NodePools(ThreadReactor(), {"hospital_a": 2, "hospital_b": 1})  # type: ignore[arg-type]
    pools.start()
    release = threading.Event()
    started = threading.Event()

    def stuck() -> None:
        started.set()
        release.wait(30)

    pools.run("hospital_b", stuck)
    assert started.wait(5)
    began = time.monotonic()
    left = pools.stop(timeout=0.5)
    took = time.monotonic() - began
    release.set()
    assert left == ["PoolThread-fdqr-node-hospital_b-0"]
    assert took < 3
