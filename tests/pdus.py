"""PDUs as peers encode them, for tests of engine/dimse/upperlayer.py and its users."""

from __future__ import annotations

from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

from engine.dimse import upperlayer as ul


def request_bytes(contexts: list[tuple[str, list[str]]], max_length: int = 32768) -> bytes:
    """Encode an A-ASSOCIATE-RQ with pynetdicom, as a peer would send it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = ul.APPLICATION_CONTEXT
    primitive.calling_ae_title = "HOSP_A"
    primitive.called_ae_title = "FDQR"
    built = []
    for index, (abstract, syntaxes) in enumerate(contexts):
        context = build_context(abstract, syntaxes)
        context.context_id = 2 * index + 1
        built.append(context)
    primitive.presentation_context_definition_list = built
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_length
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())
