"""IHE PIXm Query (ITI-83) over HTTP: GET [base]/Patient/$ihe-pix.

The request names the known identifier as sourceIdentifier=system|value and
the wanted domain as targetSystem; a 200 answer is a FHIR Parameters resource
whose targetIdentifier parameters hold the identifiers found. ITI-83 answers
404 for an unknown identifier, 400 for an unknown source domain and 403 for an
unknown target domain.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

from twisted.internet import defer, protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from engine.identity.domains import DomainDirectory
from engine.identity.settings import SourceSettings
from engine.identity.sources import Answer
from engine.model import Demographics, PatientIdentifier

OPERATION = "Patient/$ihe-pix"
FHIR_JSON = "application/fhir+json"


class PixmError(Exception):
    pass


class _BoundedBody(protocol.Protocol):
    """Collects a response body, failing once it passes a size limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(PixmError(f"response exceeds {self.limit} bytes"))
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        if isinstance(reason.value, ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(PixmError(f"response body lost: {reason.getErrorMessage()}"))


def query_url(base_url: str, source_system: str, value: str, target_system: str) -> bytes:
    query = urlencode(
        {"sourceIdentifier": f"{source_system}|{value}", "targetSystem": target_system}
    )
    return f"{base_url.rstrip('/')}/{OPERATION}?{query}".encode("ascii")


def read_parameters(body: bytes, target_system: str, domain: str) -> Answer:
    """Read the targetIdentifier parameters of a Parameters resource for one system."""
    try:
        resource = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return Answer.failed("garbled answer: the body is not JSON")
    if not isinstance(resource, dict) or resource.get("resourceType") != "Parameters":
        return Answer.failed("garbled answer: not a FHIR Parameters resource")
    parameters = resource.get("parameter", [])
    if not isinstance(parameters, list):
        return Answer.failed("garbled answer: parameter is not a list")
    found: list[PatientIdentifier] = []
    for parameter in parameters:
        if not isinstance(parameter, dict) or parameter.get("name") != "targetIdentifier":
            continue
        identifier = parameter.get("valueIdentifier")
        if not isinstance(identifier, dict):
            return Answer.failed("garbled answer: targetIdentifier without valueIdentifier")
        value = identifier.get("value")
        if identifier.get("system") != target_system or not isinstance(value, str) or not value:
            continue
        candidate = PatientIdentifier(value, domain)
        if candidate not in found:
            found.append(candidate)
    if not found:
        return Answer.not_found(f"no targetIdentifier in {target_system}")
    if len(found) > 1:
        listed = ", ".join(str(item) for item in found)
        return Answer.failed(f"ambiguous: {len(found)} identifiers ({listed})", transient=False)
    return Answer.found(found[0], "HTTP 200")


def _timed_out(result: Any, timeout: float) -> Any:
    # The agent reports a cancelled request as ResponseNeverReceived; say what happened.
    raise defer.TimeoutError(f"no response within {timeout:g} s")


class PixmSource:
    """An IHE PIXm Consumer."""

    cached = True
    needs_demographics = False

    def __init__(
        self,
        name: str,
        settings: SourceSettings,
        directory: DomainDirectory,
        reactor: Any,
        agent: Any = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.directory = directory
        self.reactor = reactor
        self.agent = agent if agent is not None else Agent(reactor)  # type: ignore[no-untyped-call]

    def lookup(
        self, identifier: PatientIdentifier, domain: str, demographics: Demographics | None
    ) -> defer.Deferred[Answer]:
        source_system = self.directory.get(identifier.issuer).fhir_system
        target_system = self.directory.get(domain).fhir_system
        if not source_system or not target_system:
            missing = identifier.issuer if not source_system else domain
            return defer.succeed(
                Answer.failed(
                    f"domain {missing} has no FHIR system: set identity.domains.{missing}",
                    transient=False,
                )
            )
        assert self.settings.base_url is not None
        url = query_url(self.settings.base_url, source_system, identifier.value, target_system)
        request = self.agent.request(b"GET", url, Headers({b"Accept": [FHIR_JSON.encode()]}), None)
        request.addTimeout(self.settings.timeout_seconds, self.reactor, _timed_out)
        answered: defer.Deferred[Answer] = request.addCallback(self._read, target_system, domain)
        return answered.addErrback(self._failed)

    @defer.inlineCallbacks
    def _read(self, response: IResponse, target_system: str, domain: str) -> Any:
        body = _BoundedBody(self.settings.max_response_bytes)
        response.deliverBody(body)  # type: ignore[no-untyped-call]
        data = yield body.done
        code = response.code
        if code == HTTPStatus.OK:
            return read_parameters(data, target_system, domain)
        if code == HTTPStatus.NOT_FOUND:
            return Answer.not_found("unknown identifier (HTTP 404)")
        if code == HTTPStatus.BAD_REQUEST:
            return Answer.failed(
                "unknown source domain (HTTP 400): check the domain settings", transient=False
            )
        if code == HTTPStatus.FORBIDDEN:
            return Answer.failed(
                "unknown target domain (HTTP 403): check the domain settings", transient=False
            )
        return Answer.failed(f"HTTP {code}")

    def _failed(self, failure: Failure) -> Answer:
        if isinstance(failure.value, defer.TimeoutError):
            return Answer.failed(f"no response within {self.settings.timeout_seconds:g} s")
        return Answer.failed(f"request failed: {failure.getErrorMessage() or failure.type}")
