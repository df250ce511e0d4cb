"""IHE PIX Query (ITI-9) and PDQ Query (ITI-21) as HL7 v2.5 messages over MLLP.

PIX: QBP^Q23 with QPD-3 the known identifier as a CX (ID^^^namespace&OID&ISO)
and QPD-4 the wanted domain; the RSP^K23 answer carries QAK-2 OK, NF or AE and,
for OK, the identifiers in PID-3. An AE comes with an ERR segment: code 204
(unknown key identifier) at QPD-3 component 1 means an unknown identifier, at
QPD-3 component 4 an unknown source domain, and at QPD-4 an unknown target domain.

PDQ: QBP^Q22 with the demographics in QPD-3 (@PID.5.1.1^DOE~@PID.8^F) and the
wanted domain in QPD-8; RSP^K22 carries one PID segment per patient. Only hits
whose demographics equal the query in every configured field count, and more
than one of them means no answer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from engine.hl7.codes import AckCode, ErrorCode
from engine.hl7.message import Delimiters, HL7Error, Message, escape, parse
from engine.identity.domains import Domain, DomainDirectory
from engine.identity.mllpclient import ExchangeError, exchange
from engine.identity.settings import SourceSettings
from engine.identity.sources import Answer
from engine.model import Demographics, PatientIdentifier

PIX_QUERY_NAME = "IHE PIX Query"
PDQ_QUERY_NAME = "IHE PDQ Query"
PIX_REQUEST_TYPE = "QBP^Q23^QBP_Q21"
PDQ_REQUEST_TYPE = "QBP^Q22^QBP_Q21"
PIX_RESPONSE_TYPE = "RSP^K23"
PDQ_RESPONSE_TYPE = "RSP^K22"
# RCP-1 query priority: immediate.
IMMEDIATE = "I"
# QAK-2 query response status, HL7 Table 0208.
QUERY_OK = "OK"
QUERY_NOT_FOUND = "NF"
QUERY_APPLICATION_ERROR = "AE"
QUERY_APPLICATION_REJECT = "AR"
# PDQ QPD-3 field names (ITI-21) for the demographics the engine can query by.
PDQ_FIELD_PATHS = {
    "family_name": "@PID.5.1.1",
    "given_name": "@PID.5.2",
    "birth_date": "@PID.7.1",
    "sex": "@PID.8",
}
_DELIMITERS = Delimiters()
_sequence = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class Query:
    """A built request: its bytes and what the response must echo."""

    content: bytes
    control_id: str
    query_tag: str


def _ids(now: dt.datetime) -> tuple[str, str]:
    number = next(_sequence)
    stamp = now.strftime("%Y%m%d%H%M%S")
    return f"FDQR{stamp}{number:06d}", f"Q{stamp}{number:06d}"


def _msh(settings: SourceSettings, message_type: str, control_id: str, now: dt.datetime) -> str:
    fields = [
        "MSH",
        _DELIMITERS.encoding_characters,
        escape(settings.sending_application, _DELIMITERS),
        escape(settings.sending_facility, _DELIMITERS),
        escape(settings.receiving_application, _DELIMITERS),
        escape(settings.receiving_facility, _DELIMITERS),
        now.strftime("%Y%m%d%H%M%S"),
        "",
        message_type,
        control_id,
        "P",
        settings.hl7_version,
        "",
        "",
        "",
        "",
        "",
        "UNICODE UTF-8",
    ]
    return "|".join(fields)


def _hd(domain: Domain) -> str:
    parts = [domain.namespace_id]
    if domain.universal_id:
        parts += [domain.universal_id, domain.universal_id_type]
    return "&".join(escape(part, _DELIMITERS) for part in parts)


def _cx(identifier: PatientIdentifier, domain: Domain) -> str:
    return f"{escape(identifier.value, _DELIMITERS)}^^^{_hd(domain)}"


def build_pix_query(
    settings: SourceSettings,
    identifier: PatientIdentifier,
    source: Domain,
    target: Domain,
    now: dt.datetime,
) -> Query:
    control_id, tag = _ids(now)
    segments = [
        _msh(settings, PIX_REQUEST_TYPE, control_id, now),
        f"QPD|{PIX_QUERY_NAME}|{tag}|{_cx(identifier, source)}|^^^{_hd(target)}",
        f"RCP|{IMMEDIATE}",
    ]
    return Query(("\r".join(segments) + "\r").encode("utf-8"), control_id, tag)


def pdq_parameters(
    demographics: Demographics, fields: Sequence[str]
) -> list[tuple[str, str]] | None:
    """Return the QPD-3 parameters for the configured fields; None if one is empty locally."""
    family, given = _name_parts(demographics.name)
    values = {
        "family_name": family,
        "given_name": given,
        "birth_date": demographics.birth_date,
        "sex": demographics.sex,
    }
    parameters = [(PDQ_FIELD_PATHS[field], values[field]) for field in fields]
    if any(not value for _, value in parameters):
        return None
    return parameters


def build_pdq_query(
    settings: SourceSettings,
    parameters: list[tuple[str, str]],
    target: Domain,
    now: dt.datetime,
) -> Query:
    control_id, tag = _ids(now)
    qpd3 = "~".join(f"{path}^{escape(value, _DELIMITERS)}" for path, value in parameters)
    segments = [
        _msh(settings, PDQ_REQUEST_TYPE, control_id, now),
        f"QPD|{PDQ_QUERY_NAME}|{tag}|{qpd3}|||||^^^{_hd(target)}",
        f"RCP|{IMMEDIATE}|{settings.max_hits}^RD",
    ]
    return Query(("\r".join(segments) + "\r").encode("utf-8"), control_id, tag)


def _name_parts(person_name: str) -> tuple[str, str]:
    alphabetic = person_name.split("=")[0]
    parts = [*alphabetic.split("^"), "", ""]
    return parts[0].strip(), parts[1].strip()


class GarbledResponse(Exception):
    """A response that is not the answer to the query sent."""


@dataclasses.dataclass(frozen=True)
class Response:
    """The parts of RSP^K23 / RSP^K22 the engine reads."""

    message: Message
    status: str
    errors: list[tuple[str, str]]  # (ERR-2 location, ERR-3 code)


def read_response(data: bytes, query: Query, expected_type: str) -> Response:
    """Parse a response and check that it answers `query`. Raises GarbledResponse."""
    try:
        message = parse(data, "utf-8")
    except HL7Error as error:
        raise GarbledResponse(f"unparsable response ({error.text})") from None
    kind = message.message_type
    if not kind.startswith(expected_type):
        raise GarbledResponse(f"response of type '{kind}', expected {expected_type}")
    if message.get("MSA", 2) != query.control_id:
        raise GarbledResponse("MSA-2 does not echo the query's control id")
    acknowledgement = message.get("MSA", 1)
    if acknowledgement not in (AckCode.APPLICATION_ACCEPT, AckCode.APPLICATION_ERROR) and (
        acknowledgement != AckCode.APPLICATION_REJECT
    ):
        raise GarbledResponse(f"invalid MSA-1 '{acknowledgement}'")
    tag = message.get("QAK", 1)
    if tag and tag != query.query_tag:
        raise GarbledResponse("QAK-1 does not echo the query tag")
    status = message.get("QAK", 2) or (
        QUERY_APPLICATION_ERROR
        if acknowledgement == AckCode.APPLICATION_ERROR
        else QUERY_APPLICATION_REJECT
        if acknowledgement == AckCode.APPLICATION_REJECT
        else ""
    )
    if status not in (
        QUERY_OK,
        QUERY_NOT_FOUND,
        QUERY_APPLICATION_ERROR,
        QUERY_APPLICATION_REJECT,
    ):
        raise GarbledResponse(f"invalid or missing QAK-2 '{status}'")
    errors = [
        (segment.raw_field(2), segment.raw_field(3).split(message.delimiters.component)[0])
        for segment in message.segments_of("ERR")
    ]
    return Response(message, status, errors)


def identifiers_in(
    message: Message, raw_pid3: str, directory: DomainDirectory, domain: str
) -> list[PatientIdentifier]:
    """Return the identifiers of one PID-3 field that belong to `domain`."""
    d = message.delimiters
    found: list[PatientIdentifier] = []
    for repetition in raw_pid3.split(d.repetition) if raw_pid3 else []:
        components = [*repetition.split(d.component), "", "", "", ""]
        value = message.unescape(components[0])
        authority = [message.unescape(part) for part in components[3].split(d.subcomponent)]
        authority += ["", ""]
        if not value:
            continue
        if directory.issuer_for_authority(authority[0], authority[1]) != domain:
            continue
        identifier = PatientIdentifier(value, domain)
        if identifier not in found:
            found.append(identifier)
    return found


def error_answer(response: Response, target_field: int) -> Answer:
    """Turn an AE or AR response into an answer, by its ERR-3 code and ERR-2 location.

    NOTE: only ERR-2 is read; a manager that reports the location in the HL7 v2.4
    field ERR-1 gets a transient failure, so the job retries instead of skipping.
    """
    for location, code in response.errors:
        parts = location.split("^")
        segment = parts[0] if parts else ""
        field = parts[2] if len(parts) > 2 else ""
        component = parts[4] if len(parts) > 4 else ""
        if code != str(ErrorCode.UNKNOWN_KEY_IDENTIFIER.value) or segment != "QPD":
            continue
        if field == "3" and component == "4":
            return Answer.failed(
                "unknown source domain (ERR 204 at QPD-3.4): check the domain settings",
                transient=False,
            )
        if field == "3":
            return Answer.not_found("unknown identifier (ERR 204 at QPD-3)")
        if field == str(target_field):
            return Answer.failed(
                f"unknown target domain (ERR 204 at QPD-{target_field}): check the domain settings",
                transient=False,
            )
    codes = ", ".join(code for _, code in response.errors) or "no ERR segment"
    return Answer.failed(f"query answered {response.status} ({codes})")


def _pid_values(message: Message, raw: str) -> list[str]:
    first = raw.split(message.delimiters.repetition)[0] if raw else ""
    return [message.unescape(part) for part in first.split(message.delimiters.component)]


def hit_demographics(message: Message, pid: Any) -> dict[str, str]:
    """Return the demographics of one PID segment as PDQ field name to value."""
    name = [*_pid_values(message, pid.raw_field(5)), "", ""]
    birth = _pid_values(message, pid.raw_field(7))
    sex = _pid_values(message, pid.raw_field(8))
    return {
        "family_name": name[0].split(message.delimiters.subcomponent)[0].strip(),
        "given_name": name[1].strip(),
        "birth_date": (birth[0] if birth else "")[:8],
        "sex": (sex[0] if sex else "").strip(),
    }


class _QuerySource:
    """An identity source that sends HL7 queries over MLLP to one manager."""

    def __init__(
        self,
        name: str,
        settings: SourceSettings,
        directory: DomainDirectory,
        reactor: Any,
        now: Any,
    ) -> None:
        self.name = name
        self.settings = settings
        self.directory = directory
        self.reactor = reactor
        self.now = now


class PixSource(_QuerySource):
    """An IHE PIX Consumer: queries a PIX Manager for an identifier in another domain."""

    cached = True
    needs_demographics = False

    def lookup(
        self, identifier: PatientIdentifier, domain: str, demographics: Demographics | None
    ) -> defer.Deferred[Answer]:
        query = build_pix_query(
            self.settings,
            identifier,
            self.directory.get(identifier.issuer),
            self.directory.get(domain),
            self.now(),
        )
        sent = _send(self.reactor, self.settings, query)
        return sent.addCallback(self._answer, query, domain).addErrback(_failed)

    def _answer(self, data: bytes, query: Query, domain: str) -> Answer:
        response = read_response(data, query, PIX_RESPONSE_TYPE)
        if response.status == QUERY_NOT_FOUND:
            return Answer.not_found("QAK-2 NF")
        if response.status != QUERY_OK:
            return error_answer(response, target_field=4)
        pids = list(response.message.segments_of("PID"))
        if len(pids) > 1:
            # A PIX response names one patient, so a response with several gives no identifier.
            return Answer.failed(f"ambiguous: {len(pids)} PID segments in the response", False)
        pid = pids[0] if pids else None
        found = identifiers_in(
            response.message, pid.raw_field(3) if pid else "", self.directory, domain
        )
        if not found:
            return Answer.not_found(f"QAK-2 OK without an identifier in {domain}")
        if len(found) > 1:
            listed = ", ".join(str(item) for item in found)
            return Answer.failed(f"ambiguous: {len(found)} identifiers ({listed})", False)
        return Answer.found(found[0], "QAK-2 OK")


class PdqSource(_QuerySource):
    """An IHE Patient Demographics Consumer: finds a patient by exactly matching demographics."""

    cached = True
    needs_demographics = True

    def lookup(
        self, identifier: PatientIdentifier, domain: str, demographics: Demographics | None
    ) -> defer.Deferred[Answer]:
        if demographics is None:
            return defer.succeed(Answer.not_found(f"no demographics known for {identifier}"))
        fields = list(self.settings.match)
        parameters = pdq_parameters(demographics, fields)
        if parameters is None:
            return defer.succeed(
                Answer.not_found(f"a field to match ({', '.join(fields)}) is empty locally")
            )
        query = build_pdq_query(self.settings, parameters, self.directory.get(domain), self.now())
        sent = _send(self.reactor, self.settings, query)
        wanted: dict[str, str] = {
            field: value for field, (_, value) in zip(fields, parameters, strict=True)
        }
        answered = sent.addCallback(self._answer, query, domain, wanted)
        return answered.addErrback(_failed)

    def _answer(self, data: bytes, query: Query, domain: str, wanted: dict[str, str]) -> Answer:
        response = read_response(data, query, PDQ_RESPONSE_TYPE)
        if response.status == QUERY_NOT_FOUND:
            return Answer.not_found("QAK-2 NF")
        if response.status != QUERY_OK:
            return error_answer(response, target_field=8)
        message = response.message
        hits = list(message.segments_of("PID"))
        exact: list[PatientIdentifier] = []
        for pid in hits:
            values = hit_demographics(message, pid)
            if any(values[field].upper() != value.upper() for field, value in wanted.items()):
                continue
            for found in identifiers_in(message, pid.raw_field(3), self.directory, domain):
                if found not in exact:
                    exact.append(found)
        more = message.segment("DSC") is not None
        summary = f"{len(hits)} hit(s), {len(exact)} matching exactly"
        if len(exact) > 1 or (exact and more):
            return Answer.failed(f"ambiguous: {summary}; more than one hit means no answer", False)
        if not exact:
            return Answer.not_found(f"QAK-2 OK, {summary} in {domain}")
        return Answer.found(exact[0], f"QAK-2 OK, {summary}")


def _send(reactor: Any, settings: SourceSettings, query: Query) -> defer.Deferred[bytes]:
    assert settings.endpoint is not None
    return exchange(
        reactor,
        settings.endpoint,
        query.content,
        settings.timeout_seconds,
        settings.max_response_bytes,
    )


def _failed(failure: Failure) -> Answer:
    error = failure.value
    if not isinstance(error, ExchangeError | GarbledResponse):
        return failure  # type: ignore[return-value]
    if isinstance(error, GarbledResponse):
        return Answer.failed(f"garbled answer: {error}")
    return Answer.failed(str(error))
