"""PIX (ITI-9), PDQ (ITI-21) and PIXm (ITI-83) lookups against doubles speaking the real wire formats.

The doubles are Twisted servers (MLLP and twisted.web) listening on a
MemoryReactorClock; iosim connects each client connection to them in memory,
so every byte the engine sends and reads is the real protocol.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pytest
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import ConnectionCompleter, IOPump
from twisted.web.client import Agent

from engine.identity.domains import DomainDirectory
from engine.identity.pixm import PixmSource, read_parameters
from engine.identity.pixpdq import PdqSource, PixSource, build_pix_query
from engine.identity.settings import DomainSettings, SourceSettings
from engine.identity.sources import Answer, AnswerKind
from engine.model import Demographics, PatientIdentifier
from engine.testing.identity_doubles import (
    DoubleDomain,
    DoublePatient,
    PixManagerFactory,
    Registry,
    pixm_site,
)
from tests.conftest import NOW

T = TypeVar("T")
LOCAL = PatientIdentifier("L12345", "LOCAL")
MLLP_PORT = 3600
HTTP_PORT = 8080
DOMAINS = {
    "LOCAL": DomainSettings(universal_id="1.2.3.1"),
    "HOSP_A": DomainSettings(universal_id="1.2.3.2"),
    "HOSP_B": DomainSettings(namespace_id="HB", universal_id="1.2.3.3"),
}


def registry(behaviour: str = "normal") -> Registry:
    return Registry(
        domains=[
            DoubleDomain("LOCAL", "LOCAL", "1.2.3.1", "urn:oid:1.2.3.1"),
            DoubleDomain("HOSP_A", "HOSP_A", "1.2.3.2", "urn:oid:1.2.3.2"),
            DoubleDomain("HOSP_B", "HB", "1.2.3.3", "urn:oid:1.2.3.3"),
        ],
        patients=[
            DoublePatient(
                (LOCAL, PatientIdentifier("HA-778899", "HOSP_A")),
                "DOE",
                "JANE",
                "19650312",
                "F",
            ),
            DoublePatient(
                (PatientIdentifier("L2", "LOCAL"), PatientIdentifier("HB-1", "HOSP_B")),
                "ROE",
                "RICHARD",
                "19580101",
                "M",
            ),
            # Two people at B whose names start alike: a supplier's prefix match finds both.
            DoublePatient((PatientIdentifier("HB-7", "HOSP_B"),), "SMITH", "ANN", "19800101", "F"),
            DoublePatient(
                (PatientIdentifier("HB-8", "HOSP_B"),), "SMITHSON", "ANN", "19800101", "F"
            ),
            DoublePatient((PatientIdentifier("L3", "LOCAL"),), "LONE", "LUKE", "19900101", "M"),
        ],
        behaviour=behaviour,
    )


def result_of(deferred: defer.Deferred[T]) -> T:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the lookup has not finished"
    assert not isinstance(results[0], Exception), results[0]
    return results[0]  # type: ignore[no-any-return]


class Watch:
    """Records when a Deferred fires, without consuming its result."""

    def __init__(self, deferred: defer.Deferred[T]) -> None:
        self.done = False

        def fired(result: T) -> T:
            self.done = True
            return result

        deferred.addBoth(fired)


class MLLPWorld:
    """A PIX/PDQ double listening on a MemoryReactorClock, and a way to connect to it."""

    def __init__(self, behaviour: str = "normal", **settings: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.registry = registry(behaviour)
        self.reactor.listenTCP(MLLP_PORT, PixManagerFactory(self.registry))
        self.settings = SourceSettings(
            type=settings.pop("type", "pix"),
            endpoint=f"tcp:host=127.0.0.1:port={MLLP_PORT}",
            timeout_seconds=5,
            **settings,
        )
        self.directory = DomainDirectory(DOMAINS)

    def pix(self) -> PixSource:
        return PixSource("pix", self.settings, self.directory, self.reactor, lambda: NOW)

    def pdq(self) -> PdqSource:
        return PdqSource("pdq", self.settings, self.directory, self.reactor, lambda: NOW)

    def connect(self) -> IOPump:
        pump = ConnectionCompleter(self.reactor).succeedOnce()
        assert pump is not None, "the client did not connect"
        pump.flush()
        return pump


# PIX Query (ITI-9)


def test_pix_query_message_format() -> None:
    world = MLLPWorld()
    query = build_pix_query(
        world.settings,
        LOCAL,
        world.directory.get("LOCAL"),
        world.directory.get("HOSP_B"),
        NOW,
    )
    segments = query.content.decode().split("\r")
    assert segments[0].split("|")[8] == "QBP^Q23^QBP_Q21"
    assert (
        segments[1]
        == f"QPD|IHE PIX Query|{query.query_tag}|L12345^^^LOCAL&1.2.3.1&ISO|^^^HB&1.2.3.3&ISO"
    )
    assert segments[2] == "RCP|I"


def test_pix_found() -> None:
    world = MLLPWorld()
    answer = world.pix().lookup(LOCAL, "HOSP_A", None)
    world.connect()
    assert result_of(answer) == Answer.found(PatientIdentifier("HA-778899", "HOSP_A"), "QAK-2 OK")
    assert world.registry.queries == ["QBP^Q23"]


def test_pix_reverse_lookup_to_local() -> None:
    world = MLLPWorld()
    answer = world.pix().lookup(PatientIdentifier("HB-1", "HOSP_B"), "LOCAL", None)
    world.connect()
    assert result_of(answer).identifier == PatientIdentifier("L2", "LOCAL")


def test_pix_not_found_nf() -> None:
    world = MLLPWorld()
    answer = world.pix().lookup(PatientIdentifier("L3", "LOCAL"), "HOSP_A", None)
    world.connect()
    assert result_of(answer) == Answer.not_found("QAK-2 NF")


def test_pix_unknown_identifier_ae() -> None:
    world = MLLPWorld()
    answer = world.pix().lookup(PatientIdentifier("NOBODY", "LOCAL"), "HOSP_A", None)
    world.connect()
    assert result_of(answer) == Answer.not_found("unknown identifier (ERR 204 at QPD-3)")


def test_pix_unknown_target_domain_ae() -> None:
    world = MLLPWorld()
    answer = world.pix().lookup(LOCAL, "HOSP_Z", None)
    world.connect()
    result = result_of(answer)
    assert result.kind == AnswerKind.FAILED
    assert not result.transient
    assert result.detail.startswith("unknown target domain (ERR 204 at QPD-4)")


def test_pix_unknown_source_domain_ae() -> None:
    world = MLLPWorld()
    answer = world.pix().lookup(PatientIdentifier("X1", "ELSEWHERE"), "HOSP_A", None)
    world.connect()
    result = result_of(answer)
    assert result.kind == AnswerKind.FAILED
    assert result.detail.startswith("unknown source domain (ERR 204 at QPD-3.4)")


def test_pix_timeout_when_manager_silent() -> None:
    world = MLLPWorld("silent")
    answer = world.pix().lookup(LOCAL, "HOSP_A", None)
    watch = Watch(answer)
    pump = world.connect()
    world.reactor.advance(4.9)
    assert not watch.done
    world.reactor.advance(0.2)
    pump.flush()
    assert result_of(answer) == Answer.failed("no response within 5 s")
    assert world.reactor.getDelayedCalls() == []


def test_pix_timeout_when_connect_hangs() -> None:
    world = MLLPWorld()
    answer = world.pix().lookup(LOCAL, "HOSP_A", None)
    world.reactor.advance(5)
    assert result_of(answer) == Answer.failed("no response within 5 s")


def test_pix_connection_refused() -> None:
    world = MLLPWorld()
    answer = world.pix().lookup(LOCAL, "HOSP_A", None)
    ConnectionCompleter(world.reactor).failOnce()
    result = result_of(answer)
    assert result.kind == AnswerKind.FAILED
    assert result.transient
    assert result.detail.startswith("connection failed")
    assert world.reactor.getDelayedCalls() == []


def test_pix_garbled_answer() -> None:
    world = MLLPWorld("garbled")
    answer = world.pix().lookup(LOCAL, "HOSP_A", None)
    world.connect()
    result = result_of(answer)
    assert result.kind == AnswerKind.FAILED
    assert result.transient
    assert result.detail == (
        "garbled answer: unparsable response (message does not start with an MSH segment)"
    )


def test_pix_answer_to_another_query_rejected() -> None:
    world = MLLPWorld("wrong-control-id")
    answer = world.pix().lookup(LOCAL, "HOSP_A", None)
    world.connect()
    assert result_of(answer) == Answer.failed(
        "garbled answer: MSA-2 does not echo the query's control id"
    )


def test_pix_oversize_answer() -> None:
    world = MLLPWorld(max_response_bytes=1024)
    world.registry.patients[0] = world.registry.patients[0].__class__(
        (LOCAL, *(PatientIdentifier(f"HA-{n:05d}" * 10, "HOSP_A") for n in range(40))),
    )
    answer = world.pix().lookup(LOCAL, "HOSP_A", None)
    world.connect()
    result = result_of(answer)
    assert result.kind == AnswerKind.FAILED
    assert "exceeds the 1024 byte limit" in result.detail


def test_pix_several_identifiers_in_domain_is_no_answer() -> None:
    world = MLLPWorld()
    world.registry.patients[0] = DoublePatient(
        (LOCAL, PatientIdentifier("HA-1", "HOSP_A"), PatientIdentifier("HA-2", "HOSP_A"))
    )
    answer = world.pix().lookup(LOCAL, "HOSP_A", None)
    world.connect()
    result = result_of(answer)
    assert result.kind == AnswerKind.FAILED
    assert result.detail == "ambiguous: 2 identifiers (HA-1^^^HOSP_A, HA-2^^^HOSP_A)"


def test_pix_two_patients_is_no_answer() -> None:
    world = MLLPWorld("two-pids")
    answer = world.pix().lookup(LOCAL, "HOSP_A", None)
    world.connect()
    result = result_of(answer)
    assert result.kind == AnswerKind.FAILED
    assert result.detail == "ambiguous: 2 PID segments in the response"


def test_pix_identifier_of_other_universal_id_ignored() -> None:
    # The namespace is HOSP_A's, but the universal id names another authority.
    world = MLLPWorld("foreign-oid")
    answer = world.pix().lookup(LOCAL, "HOSP_A", None)
    world.connect()
    result = result_of(answer)
    assert result.kind == AnswerKind.NOT_FOUND
    assert result.identifier is None


# PDQ Query (ITI-21)

JANE = Demographics("DOE^JANE^M", "19650312", "F")


def test_pdq_finds_exact_match() -> None:
    world = MLLPWorld(type="pdq")
    answer = world.pdq().lookup(LOCAL, "HOSP_A", JANE)
    world.connect()
    assert result_of(answer) == Answer.found(
        PatientIdentifier("HA-778899", "HOSP_A"), "QAK-2 OK, 1 hit(s), 1 matching exactly"
    )
    assert world.registry.queries == ["QBP^Q22"]


def test_pdq_more_than_one_hit_is_no_answer() -> None:
    world = MLLPWorld(type="pdq", match=["family_name", "birth_date"])
    world.registry.patients.append(
        DoublePatient((PatientIdentifier("HB-9", "HOSP_B"),), "SMITH", "ANNA", "19800101", "F")
    )
    answer = world.pdq().lookup(LOCAL, "HOSP_B", Demographics("SMITH^ANN", "19800101", "F"))
    world.connect()
    result = result_of(answer)
    assert result.kind == AnswerKind.FAILED
    assert result.detail == (
        "ambiguous: 3 hit(s), 2 matching exactly; more than one hit means no answer"
    )


def test_pdq_prefix_hits_filtered_to_exact() -> None:
    world = MLLPWorld(type="pdq")
    answer = world.pdq().lookup(LOCAL, "HOSP_B", Demographics("SMITH^ANN", "19800101", "F"))
    world.connect()
    assert result_of(answer) == Answer.found(
        PatientIdentifier("HB-7", "HOSP_B"), "QAK-2 OK, 2 hit(s), 1 matching exactly"
    )


def test_pdq_no_hit_nf() -> None:
    world = MLLPWorld(type="pdq")
    answer = world.pdq().lookup(LOCAL, "HOSP_A", Demographics("NOBODY^NO", "20000101", "M"))
    world.connect()
    assert result_of(answer) == Answer.not_found("QAK-2 NF")


def test_pdq_needs_every_match_field() -> None:
    world = MLLPWorld(type="pdq")
    answer = world.pdq().lookup(LOCAL, "HOSP_A", Demographics("DOE^JANE", "", "F"))
    result = result_of(answer)
    assert result.kind == AnswerKind.NOT_FOUND
    assert "is empty locally" in result.detail
    assert world.reactor.tcpClients == []


def test_pdq_unknown_target_domain() -> None:
    world = MLLPWorld(type="pdq")
    answer = world.pdq().lookup(LOCAL, "HOSP_Z", JANE)
    world.connect()
    result = result_of(answer)
    assert result.kind == AnswerKind.FAILED
    assert result.detail.startswith("unknown target domain (ERR 204 at QPD-8)")


def test_pdq_timeout() -> None:
    world = MLLPWorld("silent", type="pdq")
    answer = world.pdq().lookup(LOCAL, "HOSP_A", JANE)
    world.connect()
    world.reactor.advance(5)
    assert result_of(answer) == Answer.failed("no response within 5 s")


# PIXm (ITI-83)


class HTTPWorld:
    def __init__(self, behaviour: str = "normal", timeout: float = 5) -> None:
        self.reactor = MemoryReactorClock()
        self.registry = registry(behaviour)
        self.reactor.listenTCP(HTTP_PORT, pixm_site(self.registry))
        settings = SourceSettings(
            type="pixm", base_url=f"http://127.0.0.1:{HTTP_PORT}/fhir", timeout_seconds=timeout
        )

        class Endpoints:
            def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:
                return TCP4ClientEndpoint(world.reactor, uri.host.decode(), uri.port)

        world = self
        agent = Agent.usingEndpointFactory(self.reactor, Endpoints())
        self.source = PixmSource(
            "pixm", settings, DomainDirectory(DOMAINS), self.reactor, agent=agent
        )

    def ask(self, identifier: PatientIdentifier, domain: str) -> defer.Deferred[Answer]:
        answer = self.source.lookup(identifier, domain, None)
        pump = ConnectionCompleter(self.reactor).succeedOnce()
        assert pump is not None
        pump.flush()
        self.pump = pump
        return answer


def test_pixm_found() -> None:
    world = HTTPWorld()
    answer = world.ask(LOCAL, "HOSP_A")
    assert result_of(answer) == Answer.found(PatientIdentifier("HA-778899", "HOSP_A"), "HTTP 200")
    [uri] = world.registry.queries
    assert uri == (
        "/fhir/Patient/$ihe-pix?sourceIdentifier=urn%3Aoid%3A1.2.3.1%7CL12345"
        "&targetSystem=urn%3Aoid%3A1.2.3.2"
    )


def test_pixm_empty_parameters_not_found() -> None:
    world = HTTPWorld()
    answer = world.ask(PatientIdentifier("L3", "LOCAL"), "HOSP_A")
    assert result_of(answer) == Answer.not_found("no targetIdentifier in urn:oid:1.2.3.2")


def test_pixm_404_unknown_identifier() -> None:
    world = HTTPWorld()
    answer = world.ask(PatientIdentifier("NOBODY", "LOCAL"), "HOSP_A")
    assert result_of(answer) == Answer.not_found("unknown identifier (HTTP 404)")


def test_pixm_400_unknown_source_domain() -> None:
    world = HTTPWorld()
    world.registry.domains = [d for d in world.registry.domains if d.issuer != "LOCAL"]
    result = result_of(world.ask(LOCAL, "HOSP_A"))
    assert result == Answer.failed(
        "unknown source domain (HTTP 400): check the domain settings", transient=False
    )


def test_pixm_403_unknown_target_domain() -> None:
    world = HTTPWorld()
    world.registry.domains = [d for d in world.registry.domains if d.issuer != "HOSP_B"]
    result = result_of(world.ask(LOCAL, "HOSP_B"))
    assert result == Answer.failed(
        "unknown target domain (HTTP 403): check the domain settings", transient=False
    )


def test_pixm_garbled_answer() -> None:
    world = HTTPWorld("garbled")
    assert result_of(world.ask(LOCAL, "HOSP_A")) == Answer.failed(
        "garbled answer: the body is not JSON"
    )


def test_pixm_timeout() -> None:
    world = HTTPWorld("silent", timeout=3)
    answer = world.ask(LOCAL, "HOSP_A")
    watch = Watch(answer)
    world.reactor.advance(2.9)
    assert not watch.done
    world.reactor.advance(0.2)
    world.pump.flush()
    assert result_of(answer) == Answer.failed("no response within 3 s")


def test_pixm_domain_without_fhir_system() -> None:
    world = HTTPWorld()
    result = result_of(world.source.lookup(LOCAL, "UNKNOWN", None))
    assert result.kind == AnswerKind.FAILED
    assert result.detail == "domain UNKNOWN has no FHIR system: set identity.domains.UNKNOWN"


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"resourceType": "Patient"}', "garbled answer: not a FHIR Parameters resource"),
        (
            b'{"resourceType": "Parameters", "parameter": 3}',
            "garbled answer: parameter is not a list",
        ),
        (
            b'{"resourceType": "Parameters", "parameter": [{"name": "targetIdentifier"}]}',
            "garbled answer: targetIdentifier without valueIdentifier",
        ),
    ],
)
def test_pixm_parameters_garbled(body: bytes, detail: str) -> None:
    assert read_parameters(body, "urn:oid:1.2.3.2", "HOSP_A") == Answer.failed(detail)


def test_pixm_parameters_ambiguous() -> None:
    body = (
        b'{"resourceType": "Parameters", "parameter": ['
        b'{"name": "targetIdentifier", "valueIdentifier": {"system": "s", "value": "A"}},'
        b'{"name": "targetIdentifier", "valueIdentifier": {"system": "s", "value": "B"}},'
        b'{"name": "targetIdentifier", "valueIdentifier": {"system": "t", "value": "C"}}]}'
    )
    result = read_parameters(body, "s", "HOSP_A")
    assert result.kind == AnswerKind.FAILED
    assert result.detail == "ambiguous: 2 identifiers (A^^^HOSP_A, B^^^HOSP_A)"
