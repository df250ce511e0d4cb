"""TLS for the MLLP listener: the server certificate and, optionally, client certificates.

An `ssl:` endpoint string gives server-only TLS. These options add what the
string cannot: a required client certificate signed by a configured CA.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from engine.tlsfiles import TLSConfigError, load_ca_certificates, load_private_certificate

__all__ = ["TLSConfigError", "rejected_certificate", "server_options", "wrap"]


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
    return TLSMemoryBIOFactory(_NotingRejections(options), False, factory)


def rejected_certificate(transport: object) -> str | None:
    """Describe the client certificate a TLS connection rejected, and why; None if none."""
    return _rejections.get(transport)


# The reason each connection rejected a client certificate, by its TLS protocol object.
_rejections: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()

_NOT_YET_VALID = 9
_EXPIRED = 10
# OpenSSL's texts of the verification errors a client certificate meets most.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate (not signed by a CA in client_ca)",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose (not for client authentication)",
}


@implementer(IOpenSSLServerConnectionCreator)
class _NotingRejections:
    """Server TLS options that note which client certificate failed verification, and why."""

    def __init__(self, options: ssl.CertificateOptions) -> None:
        self._options = options
        context = options.getContext()
        # The verification itself is unchanged: the callback returns OpenSSL's verdict.
        context.set_verify(context.get_verify_mode(), _note_verification)

    def serverConnectionForTLS(self, protocol: object) -> SSL.Connection:
        connection: SSL.Connection = self._options.serverConnectionForTLS(protocol)  # type: ignore[arg-type]
        connection.set_app_data(protocol)
        return connection


def _note_verification(
    connection: SSL.Connection, certificate: crypto.X509, error: int, depth: int, ok: int
) -> bool:
    protocol = connection.get_app_data()
    if not ok and protocol is not None and protocol not in _rejections:
        described = certificate.to_cryptography()
        reason = _VERIFY_ERRORS.get(error, f"X509 verification error {error}")
        if error in (_NOT_YET_VALID, _EXPIRED):
            start = described.not_valid_before_utc.isoformat(timespec="seconds")
            end = described.not_valid_after_utc.isoformat(timespec="seconds")
            reason += f" (valid from {start} to {end})"
        where = "client certificate" if depth == 0 else f"certificate {depth} of the client's chain"
        _rejections[protocol] = (
            f"{where} {described.subject.rfc4514_string() or '(empty name)'},"
            f" issued by {described.issuer.rfc4514_string() or '(empty name)'},"
            f" serial {described.serial_number:X}: {reason}"
        )
    return bool(ok)
