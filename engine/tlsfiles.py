"""Loading TLS certificates and keys from PEM files, with errors that name the file."""

from __future__ import annotations

import re
from pathlib import Path

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.error import VerifyError

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


class TLSConfigError(Exception):
    """A certificate or key file that cannot be used, with the file and the cause."""


def load_private_certificate(certificate: Path, private_key: Path) -> ssl.PrivateCertificate:
    """Load a certificate with its private key."""
    try:
        certificate_pem = _pem_text(certificate, "CERTIFICATE", "x509")
        key_pem = _pem_text(private_key, "PRIVATE KEY", "pkey")
        pem = certificate_pem + key_pem
        return ssl.PrivateCertificate.loadPEM(pem)  # type: ignore[no-untyped-call,no-any-return]
    except (OSError, ValueError, SSL.Error, crypto.Error, VerifyError) as error:
        raise TLSConfigError(
            f"cannot load certificate {certificate} with key {private_key}: {_reason(error)}"
        ) from None


def _pem_text(path: Path, label: str, openssl_command: str) -> str:
    """Return a PEM file's text; raise TLSConfigError when it has no PEM block of label."""
    data = path.read_bytes()
    if f"-----BEGIN {label}-----".encode() in data or (
        label == "PRIVATE KEY" and re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", data)
    ):
        return data.decode("ascii", errors="replace")
    if data[:1] == b"\x30":
        # An ASN.1 SEQUENCE: the DER form of a certificate or key.
        raise TLSConfigError(
            f"{path} is in DER form, not PEM: convert it with"
            f" `openssl {openssl_command} -inform DER -in {path} -out {path}.pem`"
        )
    raise TLSConfigError(f"{path} contains no PEM {label.lower()} (found: {_blocks(data)})")


def _blocks(data: bytes) -> str:
    """Name the kinds of PEM blocks in a file, e.g. CERTIFICATE REQUEST."""
    blocks = sorted(set(re.findall(rb"-----BEGIN ([A-Z0-9 ]+)-----", data)))
    return ", ".join(block.decode() for block in blocks) or "no PEM block"


def openssl_reasons(error: BaseException | None) -> list[str]:
    """Return the reason texts of a pyOpenSSL error, e.g. ["no start line"]; [] for others.

    pyOpenSSL gives its errors as [(library, function, reason), ...].
    """
    args = getattr(error, "args", ())
    if not args or not isinstance(args[0], list):
        return []
    return [str(item[-1]) for item in args[0] if isinstance(item, tuple) and item and item[-1]]


def _reason(error: Exception) -> str:
    """Return an error's text, with pyOpenSSL's error list as its reason texts only."""
    if isinstance(error, SSL.Error | crypto.Error):
        return "; ".join(openssl_reasons(error)) or str(error)
    return str(error)


def load_ca_certificates(path: Path) -> list[ssl.Certificate]:
    """Load the one or more CA certificates of a PEM file."""
    try:
        data = path.read_bytes()
        blocks = _PEM_CERTIFICATE.findall(data)
        authorities = [ssl.Certificate.loadPEM(block) for block in blocks]
    except (OSError, ValueError, SSL.Error, crypto.Error) as error:
        raise TLSConfigError(f"cannot load CA certificates from {path}: {_reason(error)}") from None
    if not authorities:
        raise TLSConfigError(f"{path} contains no PEM certificate (found: {_blocks(data)})")
    return authorities
