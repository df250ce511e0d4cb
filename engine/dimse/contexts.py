"""Presentation contexts built from what a study actually contains.

An A-ASSOCIATE-RQ carries at most 128 presentation contexts (odd ids 1-255),
so larger sets are split over several associations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import build_context, build_role
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext

MAX_CONTEXTS = 128
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Offered for each storage class when the transfer syntaxes of a study are not
# known beforehand (C-GET): native first, then the compressed syntaxes PACS store.
COMMON_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

StorageKey = tuple[str, str]  # (SOP Class UID, Transfer Syntax UID)


def is_compressed(transfer_syntax: str) -> bool:
    uid = UID(transfer_syntax)
    return bool(uid.is_compressed) if uid.is_transfer_syntax else True


def store_contexts(keys: Iterable[StorageKey]) -> list[PresentationContext]:
    """Return contexts to store objects of the given kinds, stored syntax first.

    Each (SOP class, transfer syntax) gets a context offering exactly that
    syntax, so the object can be sent as it is stored. Each SOP class also
    gets one context offering the uncompressed syntaxes, used when the
    destination refuses the stored syntax.
    """
    contexts: list[PresentationContext] = []
    classes: list[str] = []
    for sop_class, syntax in dict.fromkeys(keys):
        contexts.append(build_context(sop_class, [syntax]))
        if sop_class not in classes:
            classes.append(sop_class)
    for sop_class in classes:
        contexts.append(build_context(sop_class, list(UNCOMPRESSED)))
    return contexts


def split_store_keys(keys: Sequence[StorageKey]) -> list[list[StorageKey]]:
    """Split keys into groups whose store_contexts fit in one association."""
    groups: list[list[StorageKey]] = []
    current: list[StorageKey] = []
    for key in dict.fromkeys(keys):
        candidate = [*current, key]
        if len(store_contexts(candidate)) > MAX_CONTEXTS and current:
            groups.append(current)
            candidate = [key]
        current = candidate
    if current:
        groups.append(current)
    return groups


def retrieve_contexts(
    model: str, sop_classes: Sequence[str]
) -> tuple[list[PresentationContext], list[SCP_SCU_RoleSelectionNegotiation]]:
    """Return the contexts and SCP role items of a C-GET association.

    Raises ValueError when the storage classes cannot fit in one association,
    because every C-STORE sub-operation of a C-GET uses the C-GET's association.
    """
    room = MAX_CONTEXTS - 1
    classes = list(dict.fromkeys(sop_classes))
    if len(classes) > room:
        raise ValueError(f"{len(classes)} storage SOP classes do not fit in one association")
    contexts = [build_context(model)]
    if len(classes) * len(COMMON_SYNTAXES) <= room:
        for sop_class in classes:
            contexts += [build_context(sop_class, [syntax]) for syntax in COMMON_SYNTAXES]
    else:
        # One context per class listing every syntax: the peer chooses one.
        contexts += [build_context(sop_class, list(COMMON_SYNTAXES)) for sop_class in classes]
    roles = [build_role(sop_class, scp_role=True) for sop_class in classes]
    return contexts, roles
