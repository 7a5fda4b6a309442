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

import socket
import ssl

from dicom_ai.core.errors import ConfigError
from dicom_ai.node.config import TlsSection

__all__ = ["TLS12_CIPHERS", "certificate_names", "client_context", "handshake_failure", "probe_handshake",
           "server_context"]

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


# OpenSSL's reason codes (``SSLError.reason``) -> the node's name for the failure, as seen by
# either side of the handshake. A code not listed is ``tls_handshake_failed``.
_HANDSHAKE_REASONS = {
    # The other side does not speak TLS (a plain DICOM association on a TLS port, or a TLS
    # client at a plain port): its first bytes are no TLS record.
    "WRONG_VERSION_NUMBER": "tls_not_tls",
    "HTTP_REQUEST": "tls_not_tls",
    "PACKET_LENGTH_TOO_LONG": "tls_not_tls",
    "RECORD_LAYER_FAILURE": "tls_not_tls",
    # The certificate the other side presented does not chain to tls.ca_bundle (or has expired,
    # or does not name the host): verify_message says which.
    "CERTIFICATE_VERIFY_FAILED": "tls_certificate_verify_failed",
    "TLSV1_ALERT_UNKNOWN_CA": "tls_certificate_rejected_by_peer",
    "SSLV3_ALERT_BAD_CERTIFICATE": "tls_certificate_rejected_by_peer",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "tls_certificate_rejected_by_peer",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "tls_certificate_rejected_by_peer",
    # A client certificate was required and none was sent.
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "tls_no_client_certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "tls_no_client_certificate",
    # No TLS version or cipher suite in common (TLS < tls.min_version, non-BCP 195 suites).
    "UNSUPPORTED_PROTOCOL": "tls_version_refused",
    "TLSV1_ALERT_PROTOCOL_VERSION": "tls_version_refused",
    "NO_PROTOCOLS_AVAILABLE": "tls_version_refused",
    "NO_SHARED_CIPHER": "tls_no_shared_cipher",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "tls_no_shared_cipher",
}

_HANDSHAKE_TEXT = {
    "tls_not_tls": "the other side does not speak TLS (a plain DICOM connection on a TLS port, or TLS to a plain port)",
    "tls_certificate_verify_failed": "certificate verify failed",
    "tls_certificate_rejected_by_peer": "the other side rejected this node's certificate (not issued by a CA it trusts, "
                                        "or expired)",
    "tls_no_client_certificate": "no client certificate (the TLS port requires one)",
    "tls_version_refused": "no TLS version in common (BCP 195: TLS 1.2 or newer)",
    "tls_no_shared_cipher": "no cipher suite in common (BCP 195: forward secrecy with AEAD) or the handshake was refused",
    "tls_handshake_failed": "TLS handshake failed",
}


def handshake_failure(exc: BaseException) -> tuple[str, str] | None:
    """Name a failed TLS handshake: ``(reason, text)``, or None if ``exc`` is no TLS error.

    ``reason`` is one of ``tls_not_tls``, ``tls_certificate_verify_failed`` (the other side's
    certificate: ``text`` carries OpenSSL's verify message, e.g. "unable to get local issuer
    certificate" for an unknown CA, "certificate has expired", "Hostname mismatch"),
    ``tls_certificate_rejected_by_peer``, ``tls_no_client_certificate``,
    ``tls_version_refused``, ``tls_no_shared_cipher`` or ``tls_handshake_failed``; ``text``
    is for the log, the delivery status and the audit trail.
    """
    if not isinstance(exc, ssl.SSLError):
        return None
    code = str(getattr(exc, "reason", None) or "")
    reason = _HANDSHAKE_REASONS.get(code, "tls_handshake_failed")
    text = _HANDSHAKE_TEXT[reason]
    verify = getattr(exc, "verify_message", None)
    if verify:
        text = f"{text}: {verify}"
    elif reason == "tls_handshake_failed":
        text = f"{text}: {code or type(exc).__name__}"
    return reason, text


def probe_handshake(context: ssl.SSLContext, host: str, port: int, timeout: float) -> tuple[str, str] | None:
    """Why a TLS connection to ``host:port`` fails, as :func:`handshake_failure` names it; None if it works.

    pynetdicom reports a failed TLS association only as "could not connect"; after such a
    failure this opens one more connection and runs the handshake alone, so the delivery log,
    ``status``, the audit trail and ``dicom-ai echo`` can say *why*. With TLS 1.3 a server
    refuses the client's certificate after the client's side of the handshake is done, so
    the probe then waits up to one second for that alert. Connection errors below TLS
    (refused, unreachable, timed out) give None: the caller's own message covers them.

    Parameters
    ----------
    context : ssl.SSLContext
        The client context the association used (:func:`client_context`).
    host, port : str, int
        The destination; ``host`` is also the name its certificate must carry.
    timeout : float
        Seconds for the TCP connect and the handshake.
    """
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(min(timeout, 1.0))
            try:
                tls.recv(1)
            except TimeoutError:
                pass  # no alert: the server took the handshake and waits for an A-ASSOCIATE-RQ
    except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
        # A plain DICOM SCP reads the ClientHello as a bad PDU and drops the connection.
        return "tls_not_tls", ("the destination closed the connection during the TLS handshake: most likely a "
                               "plain (non-TLS) DICOM port")
    except ssl.SSLError as exc:
        return handshake_failure(exc)
    except OSError:
        return None
    finally:
        raw.close()
    return None
