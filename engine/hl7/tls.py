"""TLS for the MLLP listener: the server certificate and, optionally, client certificates.

An `ssl:` endpoint string gives server-only TLS. These options add what the
string cannot: a required client certificate signed by a configured CA.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import ssl
from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from engine.tlsfiles import TLSConfigError, load_ca_certificates, load_private_certificate

__all__ = ["TLSConfigError", "server_options", "wrap"]


def server_options(
    certificate: Path, private_key: Path, client_ca: Path | None = None
) -> ssl.CertificateOptions:
    """Load the server certificate and key; with client_ca, require client certificates.

    client_ca is a PEM file of one or more CA certificates: a client must
    present a certificate that one of them signed, or the handshake fails.
    """
    server = load_private_certificate(certificate, private_key)
    if client_ca is None:
        return server.options()  # type: ignore[no-untyped-call,no-any-return]
    return server.options(*load_ca_certificates(client_ca))  # type: ignore[no-untyped-call,no-any-return]


def wrap(factory: IProtocolFactory, options: ssl.CertificateOptions) -> IProtocolFactory:
    """Return a factory whose connections speak TLS, then hand plain bytes to factory."""
    return TLSMemoryBIOFactory(options, False, factory)
