"""TLS for the MLLP listener: the server certificate and, optionally, client certificates.

An `ssl:` endpoint string gives server-only TLS. These options add what the
string cannot: a required client certificate signed by a configured CA.
"""

from __future__ import annotations

import re
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


class TLSConfigError(Exception):
    """A certificate or key file that cannot be used, with the file and the cause."""


def server_options(
    certificate: Path, private_key: Path, client_ca: Path | None = None
) -> ssl.CertificateOptions:
    """Load the server certificate and key; with client_ca, require client certificates.

    client_ca is a PEM file of one or more CA certificates: a client must
    present a certificate that one of them signed, or the handshake fails.
    """
    try:
        pem = certificate.read_text() + private_key.read_text()
        server = ssl.PrivateCertificate.loadPEM(pem)  # type: ignore[no-untyped-call]
    except (OSError, ValueError, SSL.Error) as error:
        raise TLSConfigError(
            f"cannot load certificate {certificate} with key {private_key}: {error}"
        ) from None
    if client_ca is None:
        return server.options()  # type: ignore[no-any-return]
    try:
        blocks = _PEM_CERTIFICATE.findall(client_ca.read_bytes())
        authorities = [ssl.Certificate.loadPEM(block) for block in blocks]
    except (OSError, ValueError, SSL.Error) as error:
        raise TLSConfigError(f"cannot load CA certificates from {client_ca}: {error}") from None
    if not authorities:
        raise TLSConfigError(f"{client_ca} contains no PEM certificate")
    return server.options(*authorities)  # type: ignore[no-any-return]


def wrap(factory: IProtocolFactory, options: ssl.CertificateOptions) -> IProtocolFactory:
    """Return a factory whose connections speak TLS, then hand plain bytes to factory."""
    return TLSMemoryBIOFactory(options, False, factory)
