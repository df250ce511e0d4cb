"""One bounded thread pool per DICOM node, so a slow site cannot starve the others.

A pool's size is the node's maximum number of concurrent associations.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

logger = logging.getLogger(__name__)
T = TypeVar("T")


class NodePools:
    def __init__(self, reactor: IReactorFromThreads, sizes: dict[str, int]) -> None:
        self._reactor = reactor
        self._pools = {
            name: ThreadPool(minthreads=0, maxthreads=size, name=f"fdqr-node-{name}")
            for name, size in sizes.items()
        }

    def start(self) -> None:
        for pool in self._pools.values():
            pool.start()

    def stop(self, timeout: float | None = None) -> list[str]:
        """Stop every pool; return the names of threads still busy after `timeout` seconds.

        A thread blocked in a call that never returns would otherwise hold the
        stop, and the process, forever. Those threads are left running.
        """
        stopper = threading.Thread(target=self._stop_pools, name="fdqr-node-stop", daemon=True)
        stopper.start()
        stopper.join(timeout)
        if not stopper.is_alive():
            return []
        return [
            thread.name
            for pool in self._pools.values()
            for thread in list(pool.threads)
            if thread.is_alive()
        ]

    def _stop_pools(self) -> None:
        for pool in self._pools.values():
            pool.stop()

    def run(self, node: str, function: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run a blocking call in the node's pool and fire with its result."""
        return deferToThreadPool(self._reactor, self._pools[node], function, *args)
