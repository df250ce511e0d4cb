"""Re-encoding an object for a destination that does not accept its stored transfer syntax.

This is the only place where the engine decodes pixel data: a compressed
object is decompressed with one of pydicom's pixel data decoders (its own RLE
decoder, pylibjpeg for JPEG and JPEG 2000) only when the destination accepts
no compressed syntax for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID

from engine.dimse.contexts import is_compressed


class TranscodeError(Exception):
    """The object cannot be re-encoded in the requested transfer syntax."""


def transcode(source: Path, target: Path, transfer_syntax: str) -> None:
    """Write `source` to `target` in an uncompressed `transfer_syntax`."""
    wanted = UID(transfer_syntax)
    if is_compressed(wanted):
        raise TranscodeError(f"cannot encode into compressed transfer syntax {wanted.name}")
    try:
        ds = dcmread(source)
    except Exception as error:
        raise TranscodeError(f"object cannot be read: {error}") from error
    stored = UID(ds.file_meta.TransferSyntaxUID)
    if is_compressed(stored):
        try:
            # Keeps the SOP Instance UID: the destination must get the same instance.
            ds.decompress(generate_instance_uid=False)
        except Exception as error:
            raise TranscodeError(
                f"no pixel data decoder could decompress {stored.name} ({error})"
            ) from error
    ds.file_meta.TransferSyntaxUID = wanted
    partial = target.with_name(target.name + ".partial")
    try:
        ds.save_as(partial, enforce_file_format=True)
        os.replace(partial, target)
    except Exception as error:
        partial.unlink(missing_ok=True)
        raise TranscodeError(f"writing the decompressed object failed: {error}") from error
