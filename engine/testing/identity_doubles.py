"""Test doubles of identity services that speak the real wire formats.

PixManagerDouble is an IHE PIX Manager and PDQ Supplier over MLLP (answers
QBP^Q23 with RSP^K23 and QBP^Q22 with RSP^K22); PixmResource is an IHE PIXm
Manager on twisted.web. Both read one Registry of patients and domains, and
both can be told to misbehave (garbled answers, silence) for tests.

Run them as a process for integration tests:
    python -m engine.testing.identity_doubles REGISTRY.json --pix-port P --pixm-port Q
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import protocol
from twisted.web import resource, server
from twisted.web.server import Request

from engine.hl7.message import Delimiters, HL7Error, Message, escape, parse
from engine.hl7.mllp import Frame, MLLPDecoder, frame
from engine.model import PatientIdentifier


@dataclasses.dataclass(frozen=True)
class DoubleDomain:
    issuer: str
    namespace_id: str
    universal_id: str = ""
    fhir_system: str = ""


@dataclasses.dataclass(frozen=True)
class DoublePatient:
    identifiers: tuple[PatientIdentifier, ...]
    family_name: str = ""
    given_name: str = ""
    birth_date: str = ""
    sex: str = ""


@dataclasses.dataclass
class Registry:
    """The patients and domains the doubles serve, and how they respond.

    `behaviour` is normal, garbled, silent or wrong-control-id, or for PIX
    two-pids (a second PID segment with another patient's identifier) or
    foreign-oid (the identifiers' authority carries another universal id).
    """

    domains: list[DoubleDomain]
    patients: list[DoublePatient]
    behaviour: str = "normal"
    queries: list[str] = dataclasses.field(default_factory=list)

    def domain_by_authority(self, namespace_id: str, universal_id: str) -> DoubleDomain | None:
        for domain in self.domains:
            if universal_id and domain.universal_id == universal_id:
                return domain
            if not universal_id and namespace_id and domain.namespace_id == namespace_id:
                return domain
        return None

    def domain_by_system(self, system: str) -> DoubleDomain | None:
        return next((d for d in self.domains if d.fhir_system and d.fhir_system == system), None)

    def patient_with(self, identifier: PatientIdentifier) -> DoublePatient | None:
        return next((p for p in self.patients if identifier in p.identifiers), None)

    @classmethod
    def from_file(cls, path: Path) -> Registry:
        data = json.loads(path.read_text())
        return cls(
            domains=[DoubleDomain(**item) for item in data["domains"]],
            patients=[
                DoublePatient(
                    identifiers=tuple(PatientIdentifier(v, i) for v, i in item["identifiers"]),
                    family_name=item.get("family_name", ""),
                    given_name=item.get("given_name", ""),
                    birth_date=item.get("birth_date", ""),
                    sex=item.get("sex", ""),
                )
                for item in data["patients"]
            ],
            behaviour=data.get("behaviour", "normal"),
        )


def _hd(domain: DoubleDomain) -> str:
    if domain.universal_id:
        return f"{domain.namespace_id}&{domain.universal_id}&ISO"
    return domain.namespace_id


class _Managers(protocol.Protocol):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.decoder = MLLPDecoder()

    def dataReceived(self, data: bytes) -> None:
        for event in self.decoder.feed(data):
            if isinstance(event, Frame):
                self._answer(event.content)

    def _answer(self, content: bytes) -> None:
        behaviour = self.registry.behaviour
        if behaviour == "silent":
            return
        if behaviour == "garbled":
            self.transport.write(frame(b"this is not HL7\r"))  # type: ignore[union-attr]
            return
        try:
            message = parse(content)
        except HL7Error:
            return
        self.registry.queries.append(message.message_type)
        if message.message_type.startswith("QBP^Q23"):
            reply = self._pix(message)
        elif message.message_type.startswith("QBP^Q22"):
            reply = self._pdq(message)
        else:
            reply = _response(message, "ACK", "AR", "", [], ["ERR||MSH^1^9|200^^HL70357|E"])
        self.transport.write(frame(reply.encode("utf-8")))  # type: ignore[union-attr]

    def _authority(self, message: Message, cx: str) -> tuple[str, str, str]:
        components = [*cx.split("^"), "", "", "", ""]
        hd = [*components[3].split("&"), "", ""]
        return message.unescape(components[0]), hd[0], hd[1]

    def _pix(self, message: Message) -> str:
        qpd = message.segment("QPD")
        assert qpd is not None
        value, namespace, universal = self._authority(message, qpd.raw_field(3))
        _, target_ns, target_uid = self._authority(message, qpd.raw_field(4))
        source = self.registry.domain_by_authority(namespace, universal)
        if source is None:
            return _error(message, "RSP^K23^RSP_K23", "QPD^1^3^1^4")
        wanted: DoubleDomain | None = None
        if target_ns or target_uid:
            wanted = self.registry.domain_by_authority(target_ns, target_uid)
            if wanted is None:
                return _error(message, "RSP^K23^RSP_K23", "QPD^1^4")
        patient = self.registry.patient_with(PatientIdentifier(value, source.issuer))
        if patient is None:
            return _error(message, "RSP^K23^RSP_K23", "QPD^1^3^1^1")
        found = [
            identifier
            for identifier in patient.identifiers
            if identifier.issuer != source.issuer
            and (wanted is None or identifier.issuer == wanted.issuer)
        ]
        if not found:
            return _response(message, "RSP^K23^RSP_K23", "AA", "NF", [])
        pid3 = "~".join(self._cx(identifier) for identifier in found)
        body = [f"PID|||{pid3}||~^^^^^^S"]
        if self.registry.behaviour == "two-pids":
            body.append(f"PID|||OTHER-{pid3}||~^^^^^^S")
        if self.registry.behaviour == "foreign-oid":
            body = [body[0].replace("&1.2.3.", "&9.9.9.")]
        return _response(message, "RSP^K23^RSP_K23", "AA", "OK", body)

    def _cx(self, identifier: PatientIdentifier) -> str:
        domain = next(d for d in self.registry.domains if d.issuer == identifier.issuer)
        return f"{escape(identifier.value, Delimiters())}^^^{_hd(domain)}^PI"

    def _pdq(self, message: Message) -> str:
        qpd = message.segment("QPD")
        assert qpd is not None
        wanted: DoubleDomain | None = None
        _, target_ns, target_uid = self._authority(message, qpd.raw_field(8))
        if target_ns or target_uid:
            wanted = self.registry.domain_by_authority(target_ns, target_uid)
            if wanted is None:
                return _error(message, "RSP^K22^RSP_K21", "QPD^1^8")
        criteria = {}
        for parameter in qpd.raw_field(3).split("~"):
            path, _, raw = parameter.partition("^")
            criteria[path] = message.unescape(raw).upper()
        hits = []
        for patient in self.registry.patients:
            values = {
                "@PID.5.1.1": patient.family_name,
                "@PID.5.2": patient.given_name,
                "@PID.7.1": patient.birth_date,
                "@PID.8": patient.sex,
            }
            # Like many suppliers, a prefix of the name is enough to be a hit.
            if all(
                values.get(path, "").upper().startswith(value) for path, value in criteria.items()
            ):
                hits.append(patient)
        segments = []
        for number, patient in enumerate(hits, start=1):
            ids = [i for i in patient.identifiers if wanted is None or i.issuer == wanted.issuer]
            if not ids:
                continue
            pid3 = "~".join(self._cx(identifier) for identifier in ids)
            name = f"{patient.family_name}^{patient.given_name}"
            segments.append(f"PID|{number}||{pid3}||{name}||{patient.birth_date}|{patient.sex}")
        if not segments:
            return _response(message, "RSP^K22^RSP_K21", "AA", "NF", [])
        return _response(message, "RSP^K22^RSP_K21", "AA", "OK", segments)


def _response(
    message: Message,
    message_type: str,
    ack: str,
    status: str,
    body: list[str],
    extra: list[str] | None = None,
) -> str:
    control_id = message.control_id
    qpd = message.segment("QPD")
    tag = qpd.raw_field(2) if qpd else ""
    segments = [
        f"MSH|^~\\&|DOUBLE|IDENTITY|FDQR||20260314093000||{message_type}|R{control_id}|P|2.5"
        "||||||UNICODE UTF-8",
        f"MSA|{ack}|{control_id}",
        *(extra or []),
    ]
    if status:
        segments.append(f"QAK|{tag}|{status}")
        if qpd is not None:
            segments.append("|".join(qpd.fields))
    segments += body
    return "\r".join(segments) + "\r"


def _error(message: Message, message_type: str, location: str) -> str:
    err = f"ERR||{location}|204^Unknown Key Identifier^HL70357|E"
    return _response(message, message_type, "AE", "AE", [], [err])


class PixManagerFactory(protocol.Factory):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        if self.registry.behaviour == "wrong-control-id":
            return _WrongControlId(self.registry)
        return _Managers(self.registry)


class _WrongControlId(_Managers):
    def _answer(self, content: bytes) -> None:
        message = parse(content)
        reply = _response(message, "RSP^K23^RSP_K23", "AA", "NF", [])
        reply = reply.replace(f"MSA|AA|{message.control_id}", "MSA|AA|SOMEONE-ELSE")
        self.transport.write(frame(reply.encode("utf-8")))  # type: ignore[union-attr]


class PixmResource(resource.Resource):
    """GET /fhir/Patient/$ihe-pix, as an IHE PIXm Manager answers it."""

    isLeaf = True

    def __init__(self, registry: Registry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry

    def render_GET(self, request: Request) -> bytes | int:
        behaviour = self.registry.behaviour
        self.registry.queries.append(request.uri.decode())
        if behaviour == "silent":
            return server.NOT_DONE_YET
        if behaviour == "garbled":
            request.setHeader(b"content-type", b"application/fhir+json")  # type: ignore[no-untyped-call]
            return b"<html>not json</html>"
        if not request.path.endswith(b"/Patient/$ihe-pix"):
            request.setResponseCode(404)
            return b""
        args = request.args or {}
        source = (args.get(b"sourceIdentifier") or [b""])[0].decode()
        targets = [value.decode() for value in args.get(b"targetSystem", [])]
        system, _, value = source.partition("|")
        domain = self.registry.domain_by_system(system)
        if domain is None:
            return _outcome(request, 400, "sourceIdentifier Assigning Authority not found")
        wanted = [self.registry.domain_by_system(target) for target in targets]
        if any(item is None for item in wanted):
            return _outcome(request, 403, "targetSystem not found")
        patient = self.registry.patient_with(PatientIdentifier(value, domain.issuer))
        if patient is None:
            return _outcome(request, 404, "sourceIdentifier Patient Identifier not found")
        issuers = {item.issuer for item in wanted if item is not None}
        parameters = []
        for identifier in patient.identifiers:
            if identifier.issuer == domain.issuer or (issuers and identifier.issuer not in issuers):
                continue
            target = next(d for d in self.registry.domains if d.issuer == identifier.issuer)
            parameters.append(
                {
                    "name": "targetIdentifier",
                    "valueIdentifier": {"system": target.fhir_system, "value": identifier.value},
                }
            )
        request.setHeader(b"content-type", b"application/fhir+json")  # type: ignore[no-untyped-call]
        return json.dumps({"resourceType": "Parameters", "parameter": parameters}).encode()


def _outcome(request: Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/fhir+json")  # type: ignore[no-untyped-call]
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
    }
    return json.dumps(outcome).encode()


def pixm_site(registry: Registry) -> server.Site:
    root = resource.Resource()  # type: ignore[no-untyped-call]
    fhir = resource.Resource()  # type: ignore[no-untyped-call]
    root.putChild(b"fhir", fhir)
    fhir.putChild(b"Patient", PixmResource(registry))
    return server.Site(root)  # type: ignore[no-untyped-call]


def main(argv: list[str] | None = None) -> int:
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(description="Run the PIX/PDQ and PIXm test doubles.")
    parser.add_argument("registry", type=Path)
    parser.add_argument("--pix-port", type=int, required=True)
    parser.add_argument("--pixm-port", type=int, required=True)
    options = parser.parse_args(argv)
    registry = Registry.from_file(options.registry)
    listener: Any = reactor
    listener.listenTCP(options.pix_port, PixManagerFactory(registry), interface="127.0.0.1")
    listener.listenTCP(options.pixm_port, pixm_site(registry), interface="127.0.0.1")
    print("identity doubles listening", flush=True)
    listener.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
