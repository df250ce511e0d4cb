"""PDUs and command sets of engine/dimse/upperlayer.py, checked against pynetdicom's codecs."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.sop_class import CTImageStorage, Verification

from engine.dimse import upperlayer as ul
from engine.dimse.storeassoc import negotiate, serves_only_storage
from tests.pdus import request_bytes

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
PRIVATE_SYNTAX = "1.2.3.4.5.6"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def test_request_fields_decoded() -> None:
    data = request_bytes([(CTImageStorage, [EXPLICIT, IMPLICIT]), (Verification, [IMPLICIT])])
    pdu_type, length = ul.pdu_header(data[:6])
    request = ul.parse_associate_request(data[6:])

    assert pdu_type == ul.ASSOCIATE_RQ
    assert length == len(data) - 6
    assert request.called_ae_title == "FDQR"
    assert request.calling_ae_title == "HOSP_A"
    assert request.application_context == ul.APPLICATION_CONTEXT
    assert request.max_pdu_length == 32768
    assert request.contexts == (
        ul.ProposedContext(1, CTImageStorage, (EXPLICIT, IMPLICIT)),
        ul.ProposedContext(3, Verification, (IMPLICIT,)),
    )


def test_truncated_request_rejected() -> None:
    data = request_bytes([(CTImageStorage, [EXPLICIT])])

    with pytest.raises(ul.ProtocolError):
        ul.parse_associate_request(data[6:-3])
    with pytest.raises(ul.ProtocolError):
        ul.parse_associate_request(data[6:40])


def test_storage_only_requests_recognized() -> None:
    storage = ul.parse_associate_request(request_bytes([(CTImageStorage, [EXPLICIT])])[6:])
    with_echo = ul.parse_associate_request(
        request_bytes([(CTImageStorage, [EXPLICIT]), (Verification, [IMPLICIT])])[6:]
    )
    with_find = ul.parse_associate_request(
        request_bytes([(CTImageStorage, [EXPLICIT]), (FIND, [IMPLICIT])])[6:]
    )

    assert serves_only_storage(storage)
    assert serves_only_storage(with_echo)
    assert not serves_only_storage(with_find)


def test_accept_decoded_by_pynetdicom() -> None:
    request = ul.parse_associate_request(
        request_bytes(
            [
                (CTImageStorage, [PRIVATE_SYNTAX, EXPLICIT]),
                (CTImageStorage, [PRIVATE_SYNTAX]),
                (FIND, [IMPLICIT]),
            ]
        )[6:]
    )
    results = negotiate(request)
    data = ul.encode_associate_accept(request, results, 65536, "1.2.3.4", "FDQR_TEST")

    pdu = A_ASSOCIATE_AC()
    pdu.decode(data)
    primitive = pdu.to_primitive()
    contexts = {c.context_id: c for c in primitive.presentation_context_definition_results_list}
    assert pdu.calling_ae_title == "HOSP_A"
    assert primitive.maximum_length_received == 65536
    assert primitive.implementation_class_uid == "1.2.3.4"
    assert contexts[1].result == ul.CONTEXT_ACCEPTED
    assert contexts[1].transfer_syntax[0] == EXPLICIT
    assert contexts[3].result == ul.CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED
    assert contexts[5].result == ul.CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED


def test_command_decoded_by_pydicom() -> None:
    encoded = ul.encode_command(
        [
            (ul.AFFECTED_SOP_CLASS_UID, CTImageStorage),
            (ul.COMMAND_FIELD, 0x8001),
            (ul.MESSAGE_ID_BEING_RESPONDED_TO, 7),
            (ul.COMMAND_DATA_SET_TYPE, ul.NO_DATA_SET),
            (ul.STATUS, 0xA700),
            (ul.ERROR_COMMENT, "spool full"),
            (ul.AFFECTED_SOP_INSTANCE_UID, "1.2.3.45"),
        ]
    )
    ds = decode(BytesIO(encoded), True, True)

    assert ds.CommandGroupLength == len(encoded) - 12
    assert ds.AffectedSOPClassUID == CTImageStorage
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 7
    assert ds.CommandDataSetType == ul.NO_DATA_SET
    assert ds.Status == 0xA700
    assert ds.ErrorComment == "spool full"
    # An odd-length UID is padded with NUL, which pydicom strips.
    assert ds.AffectedSOPInstanceUID == "1.2.3.45"
    assert len(encoded) % 2 == 0


def test_command_round_trip() -> None:
    encoded = ul.encode_command(
        [
            (ul.COMMAND_FIELD, ul.C_STORE_RQ),
            (ul.MESSAGE_ID, 3),
            (ul.MOVE_ORIGINATOR_AE_TITLE, "FDQR"),
            (ul.MOVE_ORIGINATOR_MESSAGE_ID, 12),
            (ul.COMMAND_DATA_SET_TYPE, 0),
        ]
    )
    command = ul.decode_command(encoded)

    assert command.command_field == ul.C_STORE_RQ
    assert command.number(ul.MESSAGE_ID) == 3
    assert command.text(ul.MOVE_ORIGINATOR_AE_TITLE) == "FDQR"
    assert command.number(ul.MOVE_ORIGINATOR_MESSAGE_ID) == 12
    assert command.has_data_set
    assert command.number(ul.STATUS) is None


def test_invalid_command_rejected() -> None:
    element_of_group_8 = struct.pack("<HHI", 0x0008, 0x0016, 2) + b"12"
    overlong = struct.pack("<HHI", 0, 0x0100, 50) + b"12"

    with pytest.raises(ul.ProtocolError):
        ul.decode_command(element_of_group_8)
    with pytest.raises(ul.ProtocolError):
        ul.decode_command(overlong)
    with pytest.raises(ul.ProtocolError):
        ul.decode_command(b"\x00\x00\x01")


def test_command_split_to_peer_max_length() -> None:
    command = bytes(range(250))
    data = ul.encode_command_pdus(5, command, 106)

    fragments = []
    offset = 0
    while offset < len(data):
        pdu_type, length = ul.pdu_header(data[offset : offset + 6])
        assert pdu_type == ul.P_DATA_TF
        assert length <= 106
        item_length, context_id, control = ul.PDV_HEADER.unpack_from(data, offset + 6)
        assert context_id == 5
        assert item_length == length - 4
        fragments.append((control, data[offset + 12 : offset + 6 + length]))
        offset += 6 + length

    assert len(fragments) == 3
    assert [control for control, _ in fragments] == [1, 1, 3]
    assert b"".join(fragment for _, fragment in fragments) == command


def test_data_headers_packed() -> None:
    buffer = bytearray(12 + 4)
    ul.pack_data_headers(buffer, 3, 4, ul.LAST_FRAGMENT)

    assert ul.pdu_header(bytes(buffer[:6])) == (ul.P_DATA_TF, 10)
    assert ul.PDV_HEADER.unpack_from(buffer, 6) == (6, 3, ul.LAST_FRAGMENT)


def test_transfer_syntax_chosen_like_pynetdicom() -> None:
    jpeg_baseline = "1.2.840.10008.1.2.4.50"
    request = ul.parse_associate_request(
        request_bytes(
            [
                (CTImageStorage, [jpeg_baseline, EXPLICIT, IMPLICIT]),
                (CTImageStorage, [jpeg_baseline]),
                (CTImageStorage, [PRIVATE_SYNTAX]),
                (FIND, [EXPLICIT]),
            ]
        )[6:]
    )

    results = {result.context_id: result for result in negotiate(request)}

    # pynetdicom takes the first of its own list (Implicit VR Little Endian first).
    assert results[1].transfer_syntax == IMPLICIT
    assert results[3].transfer_syntax == jpeg_baseline
    assert results[5].result == ul.CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED
    # A rejected context repeats the first proposed syntax.
    assert results[5].transfer_syntax == PRIVATE_SYNTAX
    assert results[7].result == ul.CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED
    assert results[7].transfer_syntax == EXPLICIT
