"""Loading TLS certificates and keys from PEM files, with errors that name the file."""

from __future__ import annotations

import re
from pathlib import Path

from OpenSSL import SSL
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
        pem = certificate.read_text() + private_key.read_text()
        return ssl.PrivateCertificate.loadPEM(pem)  # type: ignore[no-untyped-call,no-any-return]
    except (OSError, ValueError, SSL.Error, VerifyError) as error:
        raise TLSConfigError(
            f"cannot load certificate {certificate} with key {private_key}: {error}"
        ) from None


def load_ca_certificates(path: Path) -> list[ssl.Certificate]:
    """Load the one or more CA certificates of a PEM file."""
    try:
        blocks = _PEM_CERTIFICATE.findall(path.read_bytes())
        authorities = [ssl.Certificate.loadPEM(block) for block in blocks]
    except (OSError, ValueError, SSL.Error) as error:
        raise TLSConfigError(f"cannot load CA certificates from {path}: {error}") from None
    if not authorities:
        raise TLSConfigError(f"{path} contains no PEM certificate")
    return authorities
