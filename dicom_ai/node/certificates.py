"""The ``[tls]`` files checked before they bite: expiry, issuer, key permissions; expiry as a metric.

``dicom-ai check-config`` (and ``serve`` at start) runs :func:`check_certificates`: problems
that stop TLS working are errors naming the configuration key, certificates that expire
within :data:`WARN_DAYS` days are warnings. :class:`ExpiryCollector` reports the seconds
until the node's certificate and each CA of ``tls.ca_bundle`` expire at every scrape of
``/metrics``, so an alert rule can fire weeks ahead.

Certificates are parsed with ``cryptography`` (PEM only, as Python's :mod:`ssl` reads them).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID
from prometheus_client.core import GaugeMetricFamily

from dicom_ai.node.config import TlsSection
from dicom_ai.node.metrics import REGISTRY

__all__ = ["WARN_DAYS", "Certificate", "CertificateReport", "check_certificates", "ExpiryCollector", "read_pem"]

#: A certificate that expires within this many days is warned about.
WARN_DAYS = 30


@dataclass(frozen=True)
class Certificate:
    """One certificate of a PEM file: who it names and when it is valid (POSIX seconds, UTC)."""

    subject: str
    not_before: float
    not_after: float
    cert: x509.Certificate

    @property
    def expires(self) -> str:
        return datetime.fromtimestamp(self.not_after, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@dataclass
class CertificateReport:
    """What :func:`check_certificates` found: ``errors`` stop the node, ``warnings`` do not."""

    errors: list[str]
    warnings: list[str]


def _subject(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"CN={names[0].value}" if names else cert.subject.rfc4514_string() or "(no subject)"


def read_pem(path: str | Path) -> list[Certificate]:
    """Every certificate in a PEM file, in file order (ValueError when there is none or it is not PEM)."""
    certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    return [Certificate(_subject(c), c.not_valid_before_utc.timestamp(), c.not_valid_after_utc.timestamp(), c)
            for c in certs]


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except Exception:  # cryptography's InvalidSignature, or a key type it cannot check: not this issuer
        return False


def _chains_to(chain: list[Certificate], bundle: list[Certificate]) -> bool:
    """Does the leaf ``chain[0]`` lead, through the file's own intermediates, to a CA of ``bundle``?"""
    current = chain[0].cert
    intermediates = [c.cert for c in chain[1:]]
    for _ in range(len(chain) + 1):
        if any(current == ca.cert or _issued_by(current, ca.cert) for ca in bundle):
            return True
        nxt = next((c for c in intermediates if _issued_by(current, c)), None)
        if nxt is None:
            return False
        intermediates.remove(nxt)
        current = nxt
    return False


def check_certificates(tls: TlsSection, now: float | None = None, warn_days: int = WARN_DAYS) -> CertificateReport:
    """Check ``tls.certificate``, ``tls.private_key`` and ``tls.ca_bundle`` as files (they exist).

    Errors: the node's certificate has expired or is not valid yet; it is not issued (through
    the file's own intermediates) by a CA of ``tls.ca_bundle``; the private key can be read or
    written by group or others (mode ``& 0o077``); a file cannot be parsed. Warnings: the
    node's certificate or a CA of the bundle expires within ``warn_days`` days, or a CA of the
    bundle has expired.

    Parameters
    ----------
    tls : TlsSection
        ``[tls]`` with the three paths set.
    now : float, optional
        POSIX seconds to check against (default: now).
    warn_days : int
        Days before expiry from which a warning is given.
    """
    now = time.time() if now is None else now
    errors: list[str] = []
    warnings: list[str] = []
    horizon = now + warn_days * 86400
    try:
        chain = read_pem(tls.certificate)
    except (OSError, ValueError) as exc:
        return CertificateReport([f"tls.certificate ({tls.certificate}) cannot be read as PEM: {exc}"], [])
    try:
        bundle = read_pem(tls.ca_bundle)
    except (OSError, ValueError) as exc:
        return CertificateReport([f"tls.ca_bundle ({tls.ca_bundle}) cannot be read as PEM: {exc}"], [])
    node = chain[0]
    if node.not_after <= now:
        errors.append(f"tls.certificate ({tls.certificate}, {node.subject}) expired on {node.expires}: peers refuse "
                      "it; install a renewed certificate")
    elif node.not_before > now:
        errors.append(f"tls.certificate ({tls.certificate}, {node.subject}) is not valid before "
                      f"{datetime.fromtimestamp(node.not_before, timezone.utc):%Y-%m-%d %H:%M UTC}: check the clock")
    elif node.not_after <= horizon:
        warnings.append(f"tls.certificate ({tls.certificate}, {node.subject}) expires on {node.expires}, in "
                        f"{(node.not_after - now) / 86400:.0f} days: renew it")
    if not _chains_to(chain, bundle):
        errors.append(f"tls.certificate ({tls.certificate}, {node.subject}, issued by "
                      f"{node.cert.issuer.rfc4514_string()}) is not issued by a CA in tls.ca_bundle "
                      f"({tls.ca_bundle}): peers that trust that bundle refuse it; use a certificate of "
                      "that CA or add its CA (and intermediates) to the bundle")
    for ca in bundle:
        if ca.not_after <= now:
            warnings.append(f"tls.ca_bundle ({tls.ca_bundle}): CA {ca.subject} expired on {ca.expires}: peers "
                            "with certificates of that CA are refused")
        elif ca.not_after <= horizon:
            warnings.append(f"tls.ca_bundle ({tls.ca_bundle}): CA {ca.subject} expires on {ca.expires}, in "
                            f"{(ca.not_after - now) / 86400:.0f} days")
    try:
        mode = os.stat(tls.private_key).st_mode
    except OSError as exc:
        errors.append(f"tls.private_key ({tls.private_key}) cannot be read: {exc}")
    else:
        if mode & 0o077:
            errors.append(f"tls.private_key ({tls.private_key}) is readable or writable by group or others "
                          f"(mode {stat.S_IMODE(mode):04o}): chmod 600 it, owned by the node's user")
    return CertificateReport(errors, warnings)


class ExpiryCollector:
    """``dicom_ai_certificate_expiry_seconds{certificate, subject}`` at each scrape.

    ``certificate`` is ``node`` (``tls.certificate``) or ``ca`` (each CA of
    ``tls.ca_bundle``, the CAs peers' certificates are checked against); the value is
    seconds until ``notAfter`` (negative once expired). The files are re-read at each
    scrape, so a replaced certificate shows at once.
    """

    def __init__(self, tls: TlsSection):
        self.tls = tls

    def collect(self):
        g = GaugeMetricFamily("dicom_ai_certificate_expiry_seconds", "Seconds until a TLS certificate expires "
                              "(node: tls.certificate; ca: each CA of tls.ca_bundle)", labels=["certificate", "subject"])
        now = time.time()
        for kind, path in (("node", self.tls.certificate), ("ca", self.tls.ca_bundle)):
            try:
                certs = read_pem(path)
            except (OSError, ValueError):
                continue
            for c in certs[:1] if kind == "node" else certs:
                g.add_metric([kind, c.subject], c.not_after - now)
        yield g


_watched: ExpiryCollector | None = None


def watch_expiry(tls: TlsSection | None) -> None:
    """Report ``tls``'s certificates in the node's metrics (replacing an earlier call; None: stop)."""
    global _watched
    if _watched is not None:
        REGISTRY.unregister(_watched)
        _watched = None
    if tls is not None:
        _watched = ExpiryCollector(tls)
        REGISTRY.register(_watched)
