"""DICOM TLS contexts: PS3.15 Annex B secure transport, the BCP 195 profile, from ``[tls]``.

Python's :mod:`ssl` (OpenSSL) does the work; this module only fixes the settings both
directions share, so that the SCP's listener and result delivery negotiate alike:

* TLS 1.2 or newer (``tls.min_version``: ``"1.2"`` or ``"1.3"``); SSLv3, TLS 1.0 and 1.1 are
  never offered (BCP 195, RFC 9325).
* TLS 1.2 cipher suites with forward secrecy and AEAD only (:data:`TLS12_CIPHERS`: ECDHE or
  DHE key exchange, AES-GCM or ChaCha20-Poly1305); TLS 1.3 suites are OpenSSL's (all AEAD).
  This is the set of dcmtk's default "Non-downgrading BCP 195" profile and then some.
* No compression, no renegotiation (OpenSSL defaults kept via ``create_default_context``).
* Peers are authenticated against ``tls.ca_bundle`` only (not the system store): a hospital
  PKI, or the peers' own certificates. The node presents ``tls.certificate`` both as server
  and as client (destinations that require client certificates, such as Orthanc's default).
"""

from __future__ import annotations

import ssl

from dicom_ai.core.errors import ConfigError
from dicom_ai.node.config import TlsSection

__all__ = ["TLS12_CIPHERS", "certificate_names", "client_context", "server_context"]

#: OpenSSL cipher list for TLS 1.2: forward secrecy (ECDHE/DHE) with AEAD ciphers only.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS:!PSK:!SRP"

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _common(ctx: ssl.SSLContext, tls: TlsSection) -> ssl.SSLContext:
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.set_ciphers(TLS12_CIPHERS)
    try:
        ctx.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.certificate / tls.private_key ({tls.certificate}, {tls.private_key}) cannot be "
                          f"loaded: {exc}") from None
    try:
        ctx.load_verify_locations(cafile=tls.ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.ca_bundle ({tls.ca_bundle}) cannot be loaded: {exc}") from None
    return ctx


def server_context(tls: TlsSection) -> ssl.SSLContext:
    """The context of the node's TLS listener.

    Parameters
    ----------
    tls : TlsSection
        ``[tls]``: certificate, private key, CA bundle, ``require_client_certificate``
        (``CERT_REQUIRED``: a caller without a certificate signed by the CA bundle fails the
        handshake; else ``CERT_OPTIONAL``: one it sends is still verified) and ``min_version``.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return _common(ctx, tls)


def client_context(tls: TlsSection) -> ssl.SSLContext:
    """The context of result delivery to a ``tls = true`` peer or destination.

    The destination's certificate must chain to ``tls.ca_bundle`` and name the configured
    ``host`` (a DNS or IP SAN: ``check_hostname``).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    return _common(ctx, tls)


def certificate_names(cert: dict | None) -> list[str]:
    """The subject CN(s) and DNS/IP subject alternative names of a peer certificate (``getpeercert()``)."""
    if not cert:
        return []
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    names += [value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    return list(dict.fromkeys(names))
