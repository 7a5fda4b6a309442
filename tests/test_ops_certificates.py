"""`dicom-ai check-config` against certificates, keys and ports that would bite later; expiry metrics.

The certificates are made here with ``cryptography`` so that their validity can be placed in
the past or the near future (openssl 3.0's ``x509 -req`` cannot back-date).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, generate_latest

from dicom_ai.cli import main
from dicom_ai.node.certificates import ExpiryCollector, check_certificates
from dicom_ai.node.config import load_config

NOW = dt.datetime.now(dt.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(folder: Path, name: str, days: float = 365) -> tuple[Path, object, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = folder / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_leaf(folder: Path, name: str, ca, start_days: float = -1, days: float = 365,
              key_mode: int = 0o600) -> tuple[Path, Path]:
    _, ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW + dt.timedelta(days=start_days)).not_valid_after(NOW + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt, kfile = folder / f"{name}.crt", folder / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    kfile.chmod(key_mode)
    return crt, kfile


def write(tmp_path: Path, leaf: tuple[Path, Path], ca: Path, extra: str = "", name: str = "node.toml") -> Path:
    cfg = tmp_path / name
    cfg.write_text(f"""[node]
ae_title = "AINODE"
port = 11113
storage = "store"
[tls]
port = 2762
certificate = {json.dumps(str(leaf[0]))}
private_key = {json.dumps(str(leaf[1]))}
ca_bundle = {json.dumps(str(ca))}
[[peers]]
ae_title = "PACS"
host = "127.0.0.1"
port = 104
{extra}""")
    return cfg


def check(cfg: Path, capsys) -> tuple[int, str]:
    try:
        code = main(["check-config", "--config", str(cfg), "--quiet"])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture()
def ca(tmp_path):
    return make_ca(tmp_path, "hospital-ca")


def test_a_good_certificate_passes_without_warnings(tmp_path, ca, capsys):
    code, err = check(write(tmp_path, make_leaf(tmp_path, "node", ca), ca[0]), capsys)
    assert code == 0 and err == "", err


def test_an_expired_certificate_fails_naming_the_key(tmp_path, ca, capsys):
    code, err = check(write(tmp_path, make_leaf(tmp_path, "node", ca, start_days=-400, days=-2), ca[0]), capsys)
    assert code == 2 and re.search(r"configuration error: tls\.certificate .*expired on", err), err


def test_a_certificate_not_valid_yet_fails(tmp_path, ca, capsys):
    code, err = check(write(tmp_path, make_leaf(tmp_path, "node", ca, start_days=3), ca[0]), capsys)
    assert code == 2 and "tls.certificate" in err and "not valid before" in err, err


def test_a_certificate_of_another_ca_fails_naming_the_bundle(tmp_path, ca, capsys):
    other = make_ca(tmp_path, "other-ca")
    code, err = check(write(tmp_path, make_leaf(tmp_path, "node", other), ca[0]), capsys)
    assert code == 2 and "tls.certificate" in err and "not issued by a CA in tls.ca_bundle" in err, err


def test_a_chain_through_an_intermediate_in_the_certificate_file_passes(tmp_path, ca, capsys):
    # The intermediate signed by the root; the leaf by the intermediate; the file holds leaf + intermediate.
    ikey = ec.generate_private_key(ec.SECP256R1())
    inter = (x509.CertificateBuilder().subject_name(_name("issuing-ca")).issuer_name(ca[2].subject)
             .public_key(ikey.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=365))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca[1], hashes.SHA256()))
    leaf = make_leaf(tmp_path, "node", (None, ikey, inter))
    leaf[0].write_bytes(leaf[0].read_bytes() + inter.public_bytes(serialization.Encoding.PEM))
    code, err = check(write(tmp_path, leaf, ca[0]), capsys)
    assert code == 0, err


def test_a_private_key_readable_by_others_fails_naming_the_key(tmp_path, ca, capsys):
    code, err = check(write(tmp_path, make_leaf(tmp_path, "node", ca, key_mode=0o640), ca[0]), capsys)
    assert code == 2 and "tls.private_key" in err and "group or others" in err and "0640" in err, err


@pytest.mark.parametrize("clash", ["node.port", "tls.port"])
def test_http_port_on_a_dicom_port_fails_naming_the_key(tmp_path, ca, capsys, clash):
    port = 11113 if clash == "node.port" else 2762
    code, err = check(write(tmp_path, make_leaf(tmp_path, "node", ca), ca[0], f"[http]\nport = {port}\n"), capsys)
    assert code == 2 and f"http.port {port} is {clash} too" in err, err


def test_certificates_expiring_within_30_days_are_warned_about(tmp_path, capsys):
    ca = make_ca(tmp_path, "short-ca", days=20)
    code, err = check(write(tmp_path, make_leaf(tmp_path, "node", ca, days=10), ca[0]), capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("dicom-ai: warning:")]
    assert len(warnings) == 2, err
    assert "tls.certificate" in warnings[0] and "in 10 days" in warnings[0]
    assert "tls.ca_bundle" in warnings[1] and "CN=short-ca" in warnings[1] and "in 20 days" in warnings[1]


def test_check_certificates_at_a_later_time_sees_the_expiry(tmp_path, ca):
    cfg = load_config(write(tmp_path, make_leaf(tmp_path, "node", ca, days=100), ca[0]))
    assert check_certificates(cfg.tls).errors == []
    later = check_certificates(cfg.tls, now=(NOW + dt.timedelta(days=101)).timestamp())
    assert len(later.errors) == 1 and "expired" in later.errors[0]


def test_expiry_metric_for_the_node_certificate_and_each_ca(tmp_path, ca):
    other = make_ca(tmp_path, "second-ca", days=50)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca[0].read_bytes() + other[0].read_bytes())
    cfg = load_config(write(tmp_path, make_leaf(tmp_path, "node", ca, days=10), bundle))
    registry = CollectorRegistry()
    registry.register(ExpiryCollector(cfg.tls))
    text = generate_latest(registry).decode()
    values = {m[0] + "/" + m[1]: float(m[2]) for m in
              re.findall(r'dicom_ai_certificate_expiry_seconds\{certificate="(\w+)",subject="([^"]+)"\} (\S+)', text)}
    assert set(values) == {"node/CN=node", "ca/CN=hospital-ca", "ca/CN=second-ca"}, text
    elapsed = dt.datetime.now(dt.timezone.utc).timestamp() - NOW.timestamp()  # NOW: when the module was imported
    for key, days in (("node/CN=node", 10), ("ca/CN=hospital-ca", 365), ("ca/CN=second-ca", 50)):
        assert abs(values[key] - (days * 86400 - elapsed)) < 60, (key, values[key], elapsed)
