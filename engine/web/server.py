"""The engine's HTTP listener: status page, JSON API, Prometheus metrics and a liveness check."""

from __future__ import annotations

from typing import Any

from prometheus_client.twisted import MetricsResource
from twisted.web import http, resource, server

from engine.jobs.store import AsyncStore
from engine.web.api import JobsPage, MessagesPage, StatusPage
from engine.web.metrics import EngineMetrics


class Health(resource.Resource):
    """A liveness check: returns 200 and "ok" while the reactor serves requests."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"ok\n"


class QuietSite(server.Site):
    """A Site without an access log line per request, since a scraper calls every few seconds."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def build_site(metrics: EngineMetrics, db: AsyncStore) -> server.Site:
    """Build the site: /, /api/jobs, /api/jobs/ID, /api/messages, /metrics and /health."""
    root = resource.Resource()  # type: ignore[no-untyped-call]
    root.putChild(b"", StatusPage(db))
    api = resource.Resource()  # type: ignore[no-untyped-call]
    api.putChild(b"jobs", JobsPage(db))
    api.putChild(b"messages", MessagesPage(db))
    root.putChild(b"api", api)
    root.putChild(b"metrics", MetricsResource(registry=metrics.registry))  # type: ignore[no-untyped-call]
    root.putChild(b"health", Health())  # type: ignore[no-untyped-call]
    return QuietSite(root)  # type: ignore[no-untyped-call]
