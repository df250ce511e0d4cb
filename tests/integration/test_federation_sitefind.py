"""A site query against a real pynetdicom Q/R SCP on loopback: C-CANCEL and abort on the wire."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from engine.dimse.scu import AssociationTracker, DimseError, NodeAddress, NodeClient
from engine.federation.levels import Level
from engine.federation.sitefind import QueryCancelled, SiteHandle, SitePlan, run_site_find
from engine.testing.ports import free_port

pytestmark = pytest.mark.integration

MATCHES = 50


class SlowSite:
    """Returns one study every 50 ms until cancelled, and records what it saw."""

    def __init__(self) -> None:
        self.port = free_port()
        self.cancelled = threading.Event()
        self.sent = 0
        ae = AE(ae_title="SLOW")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self._server: Any = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_FIND, self.on_find)]
        )

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        for number in range(MATCHES):
            if event.is_cancelled:
                self.cancelled.set()
                yield 0xFE00, None
                return
            time.sleep(0.05)
            match = Dataset()
            match.QueryRetrieveLevel = "STUDY"
            match.PatientID = "HA-1"
            match.StudyInstanceUID = f"1.2.3.{number + 1}"
            self.sent += 1
            yield 0xFF00, match

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture
def site() -> Iterator[SlowSite]:
    slow = SlowSite()
    yield slow
    slow.stop()


def client_for(site: SlowSite) -> NodeClient:
    return NodeClient(
        NodeAddress("slow", "SLOW", "127.0.0.1", site.port, 30), "FDQR", AssociationTracker()
    )


def plan() -> SitePlan:
    keys = Dataset()
    keys.PatientID = "HA-1"
    keys.StudyInstanceUID = ""
    return SitePlan("slow", Level.STUDY, keys, relational=False)


def interrupt_after_three(
    site: SlowSite, handle: SiteHandle, interrupt: Callable[[], None]
) -> tuple[list[Dataset], list[Exception], float]:
    """Run the site query in a thread, call `interrupt` after three matches; return the outcome."""
    received: list[Dataset] = []
    errors: list[Exception] = []

    def work() -> None:
        try:
            run_site_find(client_for(site), plan(), handle, received.append)
        except Exception as error:
            errors.append(error)

    thread = threading.Thread(target=work)
    thread.start()
    deadline = time.monotonic() + 30
    while len(received) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    interrupted = time.monotonic()
    interrupt()
    thread.join(timeout=60)
    assert not thread.is_alive()
    return received, errors, time.monotonic() - interrupted


def test_site_query_cancel_reaches_site(site: SlowSite) -> None:
    handle = SiteHandle()
    received, errors, seconds = interrupt_after_three(site, handle, handle.cancel)
    assert site.cancelled.wait(10)
    assert [type(error) for error in errors] == [QueryCancelled]
    assert 3 <= len(received) < MATCHES
    assert seconds < 5


def test_site_query_abort_ends_query(site: SlowSite) -> None:
    handle = SiteHandle()
    received, errors, seconds = interrupt_after_three(site, handle, handle.abort)
    assert [type(error) for error in errors] == [DimseError]
    assert len(received) < MATCHES
    assert seconds < 5
