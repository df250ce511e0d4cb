"""A read-only JSON API and an HTML status page over the store.

Every page reads the store on the store thread and renders when the read is
done, so the reactor never waits for SQLite. Nothing here shows a patient's
name or birth date: jobs and messages are shown by their ids, patient IDs,
order facts, states and summaries, as `fdqr jobs` and `fdqr messages` show them.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure
from twisted.web import resource, server

from engine.hl7.ack import ack_code
from engine.jobs.store import AsyncStore, JobRecord, JobState, MessageRecord, Store, StudyRecord

logger = logging.getLogger(__name__)

MAX_LIMIT = 1000
# SQLite's largest row id; a larger job id cannot exist.
MAX_ROW_ID = 2**63 - 1


class BadRequest(Exception):
    """A query parameter or path with an invalid value; rendered as 400 or 404."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.status = status


Reader = Callable[[Store], Any]


class StorePage(resource.Resource):
    """A page read from the store: subclasses return the read in reader() and may render it."""

    isLeaf = True
    content_type = b"application/json"

    def __init__(self, db: AsyncStore) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.db = db

    def reader(self, request: Any) -> Reader:
        raise NotImplementedError

    def render_content(self, value: Any) -> bytes:
        return json.dumps(value, indent=1).encode() + b"\n"

    def render_GET(self, request: Any) -> int:
        try:
            reader = self.reader(request)
        except BadRequest as error:
            request.write(self._error(request, error.status, str(error)))
            request.finish()
            return server.NOT_DONE_YET
        # A client that leaves before the read is done gets nothing written.
        disconnected: list[Failure] = []
        request.notifyFinish().addErrback(disconnected.append)
        read = self.db.run(reader)
        read.addCallback(self._write, request, disconnected)
        read.addErrback(self._failed, request, disconnected)
        return server.NOT_DONE_YET

    def _write(self, value: Any, request: Any, disconnected: list[Failure]) -> None:
        if disconnected:
            return
        if isinstance(value, BadRequest):
            body = self._error(request, value.status, str(value))
        else:
            request.setHeader(b"Content-Type", self.content_type + b"; charset=utf-8")
            body = self.render_content(value)
        request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: Any, disconnected: list[Failure]) -> None:
        logger.error("reading the store for %s failed: %s", request.uri, failure.getErrorMessage())
        if disconnected:
            return
        request.write(self._error(request, 500, "reading the store failed; see the engine log"))
        request.finish()

    @staticmethod
    def _error(request: Any, status: int, text: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return json.dumps({"error": text}).encode() + b"\n"


def _argument(request: Any, name: str) -> list[str]:
    return [value.decode("utf-8", "replace") for value in request.args.get(name.encode(), [])]


def _limit(request: Any, default: int = 50) -> int:
    values = _argument(request, "limit")
    if not values:
        return default
    text = values[-1]
    if not (text.isascii() and text.isdigit()):
        raise BadRequest(f"invalid limit '{text}': expected a whole number")
    limit = int(text)
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"invalid limit {limit}: expected 1 to {MAX_LIMIT}")
    return limit


def _states(request: Any) -> list[JobState]:
    states = []
    for value in _argument(request, "state"):
        try:
            states.append(JobState(value))
        except ValueError:
            known = ", ".join(state.value for state in JobState)
            raise BadRequest(f"invalid state '{value}': expected one of {known}") from None
    return states


def job_summary(job: JobRecord, studies: list[StudyRecord]) -> dict[str, Any]:
    """Return a job as the API lists it: no name or birth date, counts of selected studies."""
    selected = [study for study in studies if study.selected]
    return {
        "id": job.id,
        "message_id": job.message_id,
        "state": job.state.value,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
        "not_before": job.not_before.isoformat(),
        "attempts": job.attempts,
        "route": job.route,
        "rule": job.rule,
        "destination": job.destination,
        "sources": list(job.sources),
        "patient": {"id": job.patient.value, "issuer": job.patient.issuer},
        "summary": job.summary,
        "studies": len(selected),
        "found": sum(study.found or 0 for study in selected),
        "received": sum(study.received for study in selected),
        "stored": sum(study.stored for study in selected),
    }


def study_detail(study: StudyRecord) -> dict[str, Any]:
    return {
        "source": study.source,
        "study_instance_uid": study.study_instance_uid,
        "remote_patient": {
            "id": study.remote_patient.value,
            "issuer": study.remote_patient.issuer,
        },
        "study_date": study.study_date,
        "modalities": study.modalities,
        "description": study.description,
        "selected": study.selected,
        "reason": study.reason,
        "state": study.state.value,
        "found": study.found,
        "received": study.received,
        "stored": study.stored,
        "failed": study.failed,
    }


def message_summary(message: MessageRecord) -> dict[str, Any]:
    """Return a message's header fields and outcome; its content is never included."""
    return {
        "id": message.id,
        "received_at": message.received_at.isoformat(),
        "peer": message.peer,
        "sending_application": message.origin.sending_application,
        "sending_facility": message.origin.sending_facility,
        "message_type": message.origin.message_type,
        "control_id": message.origin.control_id,
        "ack_code": ack_code(message.ack),
        "outcome": message.outcome,
    }


def list_jobs(store: Store, limit: int, states: list[JobState]) -> list[dict[str, Any]]:
    return [job_summary(job, store.studies(job.id)) for job in store.list_jobs(limit, states)]


class JobsPage(StorePage):
    """GET /api/jobs[?state=failed&state=partial][&limit=50]: the newest jobs first.

    GET /api/jobs/ID: one job with every candidate study and its event log.
    """

    def reader(self, request: Any) -> Reader:
        path = [segment for segment in request.postpath if segment]
        if path:
            return self._job_reader(path[0].decode("utf-8", "replace"))
        limit = _limit(request)
        states = _states(request)
        return lambda store: {"jobs": list_jobs(store, limit, states)}

    @staticmethod
    def _job_reader(text: str) -> Reader:
        if not (text.isascii() and text.isdigit()):
            raise BadRequest(f"invalid job id '{text}': expected a whole number")
        job_id = int(text)
        if job_id > MAX_ROW_ID:
            raise BadRequest(f"job {job_id} not found", 404)

        def read(store: Store) -> Any:
            job = store.get_job(job_id)
            if job is None:
                return BadRequest(f"job {job_id} not found", 404)
            studies = store.studies(job_id)
            detail = job_summary(job, studies)
            detail["order"] = job.order.to_dict()
            detail["candidates"] = [study_detail(study) for study in studies]
            detail["events"] = [
                {"at": at.isoformat(), "text": text} for at, text in store.events(job_id)
            ]
            return detail

        return read


class MessagesPage(StorePage):
    """GET /api/messages[?type=ORM^O01][&limit=50]: the newest messages first, without content."""

    def reader(self, request: Any) -> Reader:
        limit = _limit(request)
        types = _argument(request, "type")
        message_type = types[-1] if types else None

        def read(store: Store) -> Any:
            messages = store.list_messages(limit, message_type=message_type)
            return {"messages": [message_summary(message) for message in messages]}

        return read


class StatusPage(StorePage):
    """GET /: an HTML page with the job counts by state, the newest jobs and messages."""

    content_type = b"text/html"

    def reader(self, request: Any) -> Reader:
        def read(store: Store) -> Any:
            return {
                "counts": store.job_counts(),
                "jobs": list_jobs(store, 50, []),
                "messages": [message_summary(message) for message in store.list_messages(20)],
            }

        return read

    def render_content(self, value: Any) -> bytes:
        counts = value["counts"]
        count_cells = "".join(
            f"<tr><td>{state.value}</td><td>{counts.get(state.value, 0)}</td></tr>"
            for state in JobState
        )
        job_rows = "".join(
            _row(
                job["id"],
                job["state"],
                job["created_at"][:19],
                f"{job['patient']['id']}^^^{job['patient']['issuer']}",
                job["rule"],
                job["destination"],
                f"{job['stored']} of {job['found']}",
                job["summary"],
            )
            for job in value["jobs"]
        )
        message_rows = "".join(
            _row(
                message["id"],
                message["received_at"][:19],
                message["message_type"],
                message["control_id"],
                f"{message['sending_application']}/{message['sending_facility']}",
                message["ack_code"],
                message["outcome"],
            )
            for message in value["messages"]
        )
        page = STATUS_TEMPLATE.format(
            counts=count_cells,
            jobs=job_rows,
            messages=message_rows,
        )
        return page.encode()


def _row(*cells: Any) -> str:
    return "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>"


STATUS_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="15">
<title>fdqr status</title>
<style>
body {{ font-family: sans-serif; margin: 1em 2em; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #bbb; padding: 2px 6px; text-align: left; vertical-align: top; }}
</style></head>
<body>
<h1>fdqr status</h1>
<p>Refreshed every 15 s. JSON: <a href="/api/jobs">/api/jobs</a>,
<a href="/api/messages">/api/messages</a>, /api/jobs/ID.
Metrics: <a href="/metrics">/metrics</a>.</p>
<h2>Jobs by state</h2>
<table><tr><th>state</th><th>jobs</th></tr>{counts}</table>
<h2>Newest jobs</h2>
<table><tr><th>job</th><th>state</th><th>created (UTC)</th><th>patient</th><th>rule</th>
<th>destination</th><th>stored</th><th>summary</th></tr>{jobs}</table>
<h2>Newest HL7 messages</h2>
<table><tr><th>message</th><th>received (UTC)</th><th>type</th><th>control id</th>
<th>sender</th><th>ACK</th><th>outcome</th></tr>{messages}</table>
</body></html>
"""
