"""DICOM TLS (PS3.15 Annex B, BCP 195) and peer identity, against dcmtk and Orthanc as real peers.

Certificates are made by the test with ``openssl`` (tests/tls_certs.py). The node listens on a
plain port and a TLS port; results go back over TLS to peers configured ``tls = true``.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from node_harness import (Orthanc, Proc, delivered_uids, free_port, log_events, outbox_uids, start_node,
                          wait_delivered, wait_for, wait_port, write_study)
from tls_certs import make_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("certs"))


def write_config(path: Path, storage: Path, port: int, tls_port: int, certs, peers: list[dict],
                 tls: dict | None = None, extra: str = "") -> Path:
    lines = ["[node]", 'ae_title = "AINODE"', 'bind_address = "127.0.0.1"', f"port = {port}",
             f"storage = {json.dumps(str(storage))}", "reserve_free_mb = 1",
             "[study]", "grace_seconds = 0.5", "idle_seconds = 3.0",
             "[pipeline]", 'factory = "node_harness:stand_in_pipeline"', 'device = "cpu"', "previews = false",
             "[retry]", "max_attempts = 5", "initial_delay_seconds = 0.5", "max_delay_seconds = 2.0",
             "[tls]", f"port = {tls_port}", f"certificate = {json.dumps(str(certs['node'][0]))}",
             f"private_key = {json.dumps(str(certs['node'][1]))}", f"ca_bundle = {json.dumps(str(certs['ca'][0]))}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in (tls or {}).items()]
    for p in peers:
        lines.append("[[peers]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in p.items()]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def dcmtk_tls(certs, name: str = "pacs") -> list[str]:
    crt, key = certs[name]
    return ["+tls", str(key), str(crt), "+cf", str(certs["ca"][0])]


def echoscu(port: int, extra: list[str], calling: str = "PACS") -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-v", "-aet", calling, "-aec", "AINODE", *extra, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def storescu(port: int, files, extra: list[str], calling: str = "PACS") -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-v", "-aet", calling, "-aec", "AINODE", *extra, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=60)


def refusals(log: Path) -> list[dict]:
    return log_events(log, "connection_refused")


def test_dcmtk_over_tls_both_ways_and_the_refusals(tmp_path, certs):
    """storescu +tls sends a study to the TLS port, the results come back to storescp +tls; a plain
    client on the TLS port, an unknown CA and a certificate of another name are refused."""
    pacs_port, port, tls_port = free_port(), free_port(), free_port()
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs = Proc(["storescp", "-v", "--aetitle", "PACS", "--output-directory", str(pacs_dir), "+xa", "-fe", ".dcm",
                 *dcmtk_tls(certs), str(pacs_port)], tmp_path / "storescp.log")
    node = None
    try:
        wait_port(pacs_port)
        cfg = write_config(tmp_path / "node.toml", tmp_path / "storage", port, tls_port, certs,
                           [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, "tls": True,
                             "certificate_subject": "PACS"},
                            {"ae_title": "FARAWAY", "host": "127.0.0.2", "port": 104, "require_address": True}])
        node = start_node(cfg, port, tmp_path / "node.log")
        wait_port(tls_port)

        assert echoscu(tls_port, dcmtk_tls(certs)).returncode == 0
        files = write_study(tmp_path / "study", seed=5)
        r = storescu(tls_port, files, dcmtk_tls(certs))
        assert r.returncode == 0, r.stdout + r.stderr
        status = wait_delivered(tmp_path / "storage", jobs=1)
        expected = outbox_uids(status, status["jobs"][0]["id"])
        assert expected and delivered_uids(pacs_dir) == expected  # over TLS: storescp +tls accepts nothing else

        # Refused: a plain DICOM client on the TLS port, a certificate of an unknown CA, a
        # certificate of the right CA that names another peer, PACS over plain TCP (it must
        # present its certificate), and an AE title from the wrong host.
        assert echoscu(tls_port, []).returncode != 0
        assert echoscu(tls_port, dcmtk_tls(certs, "rogue")).returncode != 0
        other = echoscu(tls_port, dcmtk_tls(certs, "other"))
        assert other.returncode != 0 and "Rejected" in other.stdout + other.stderr, other.stdout + other.stderr
        plain = echoscu(port, [])
        assert plain.returncode != 0 and "Rejected" in plain.stdout + plain.stderr
        faraway = echoscu(port, [], calling="FARAWAY")
        assert faraway.returncode != 0 and "Rejected" in faraway.stdout + faraway.stderr

        def seen():
            got = refusals(tmp_path / "node.log")
            reasons = {e["reason"] for e in got}
            return got if {"tls_not_tls", "tls_certificate_verify_failed"} <= reasons and \
                sum(e["reason"].startswith("peer_") for e in got) >= 3 else None
        got = wait_for(seen, 10, "the refusals in the node's log")
        whys = " | ".join(e.get("why", "") for e in got if e["reason"].startswith("peer_"))
        assert "names OTHER" in whys and "must connect over TLS" in whys and "127.0.0.2" in whys, whys
        # The plain client and the rogue CA each have their line: one does not hide the other.
        rogue, = [e for e in got if e["reason"] == "tls_certificate_verify_failed"]
        assert "unable to get local issuer certificate" in rogue["why"]
    finally:
        if node is not None:
            node.stop()
        pacs.stop()


def test_tls_below_1_2_and_weak_ciphers_are_refused(tmp_path, certs):
    port, tls_port, http_port = free_port(), free_port(), free_port()
    cfg = write_config(tmp_path / "node.toml", tmp_path / "storage", port, tls_port, certs,
                       [{"ae_title": "PACS", "host": "127.0.0.1", "port": 104}], tls={"plain_port": False},
                       extra=f"[http]\nport = {http_port}\n")
    node = start_node(cfg, tls_port, tmp_path / "node.log")
    try:
        # The node's certificate (2 days) and its CA in /metrics as seconds until expiry.
        wait_port(http_port)
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
        expiry = {k: float(v) for k, v in re.findall(
            r'dicom_ai_certificate_expiry_seconds\{certificate="(\w+)",subject="[^"]+"\} (\S+)', text)}
        assert set(expiry) == {"node", "ca"} and all(0 < v <= 2 * 86400 for v in expiry.values()), expiry
        with socket.create_connection(("127.0.0.1", port), timeout=2) if False else socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # plain_port = false: nothing on node.port

        def handshake(**kw):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(str(certs["ca"][0]))
            ctx.load_cert_chain(str(certs["pacs"][0]), str(certs["pacs"][1]))
            for k, v in kw.items():
                if k == "ciphers":
                    ctx.set_ciphers(v)
                else:
                    setattr(ctx, k, v)
            with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    return tls.version(), tls.cipher()[0]

        version, cipher = handshake()
        assert version in ("TLSv1.2", "TLSv1.3")
        v12, c12 = handshake(maximum_version=ssl.TLSVersion.TLSv1_2)
        assert v12 == "TLSv1.2" and ("GCM" in c12 or "CHACHA20" in c12) and "ECDHE" in c12, c12
        with pytest.raises((ssl.SSLError, OSError)):  # a client that offers only a non-forward-secret suite
            handshake(maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="AES128-GCM-SHA256")
    finally:
        node.stop()


def test_orthanc_with_dicom_tls_as_sender_and_as_receiver(tmp_path, certs):
    """Orthanc (DicomTlsEnabled) sends the study to the node's TLS port and gets the results back over TLS."""
    port, tls_port = free_port(), free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=tls_port, modality={"UseDicomTls": True},
                      config={"DicomTlsEnabled": True, "DicomTlsCertificate": str(certs["pacs"][0]),
                              "DicomTlsPrivateKey": str(certs["pacs"][1]),
                              "DicomTlsTrustedCertificates": str(certs["ca"][0]),
                              "DicomTlsRemoteCertificateRequired": True})
    node = None
    try:
        cfg = write_config(tmp_path / "node.toml", tmp_path / "storage", port, tls_port, certs,
                           [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom, "tls": True,
                             "certificate_subject": "PACS"}])
        node = start_node(cfg, port, tmp_path / "node.log")
        wait_port(tls_port)
        assert orthanc.post("/modalities/ainode/echo", {}) == {}
        study_ids = {orthanc.post("/instances", p.read_bytes())["ParentStudy"]
                     for p in write_study(tmp_path / "study", seed=7)}
        study = study_ids.pop()
        job = orthanc.post("/modalities/ainode/store", {"Resources": [study], "Synchronous": True})
        assert job["InstancesCount"] == 4 and job["FailedInstancesCount"] == 0, job
        status = wait_delivered(tmp_path / "storage", jobs=1)
        results = outbox_uids(status, status["jobs"][0]["id"])
        instances = orthanc.get(f"/studies/{study}/instances?expand")
        got = sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in instances
                     if i["MainDicomTags"]["SOPInstanceUID"] in set(results))
        assert results and got == results
        # A plain association to Orthanc's TLS-only DICOM port fails: the results did travel over TLS.
        plain = subprocess.run(["echoscu", "-aet", "AINODE", "-aec", "ORTHANC", "-to", "5", "127.0.0.1",
                                str(orthanc.dicom)], capture_output=True, text=True, timeout=30)
        assert plain.returncode != 0
        accepted = [json.loads(l) for l in (tmp_path / "node.log").read_text().splitlines()
                    if '"association_accepted"' in l]
        assert accepted and all(a.get("tls") in ("TLSv1.2", "TLSv1.3") for a in accepted), accepted
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def test_connection_limits_hold_across_the_plain_and_tls_ports(tmp_path, certs):
    """The TLS port shares the per-address cap with the plain one, and a silent TLS client is
    closed at the A-ASSOCIATE-RQ deadline (the handshake counts against it)."""
    port, tls_port = free_port(), free_port()
    cfg = write_config(tmp_path / "node.toml", tmp_path / "storage", port, tls_port, certs,
                       [{"ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
                       extra="[limits]\nmax_connections_per_address = 2\nassociation_request_seconds = 1.5\n")
    node = start_node(cfg, port, tmp_path / "node.log")
    silent = []
    try:
        wait_port(tls_port)
        time.sleep(2)  # the wait_port probes' connections have ended
        for p in (tls_port, tls_port):  # two TCP connections to the TLS port, no ClientHello
            s = socket.create_connection(("127.0.0.1", p), timeout=5)
            silent.append(s)
        time.sleep(0.3)
        third = echoscu(port, [])  # plain port, same address: over the cap of 2
        assert third.returncode != 0
        t0 = time.monotonic()
        for s in silent:  # closed by the node at the deadline: recv returns b"" (or a reset)
            s.settimeout(5)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - t0 < 3.0
        assert echoscu(port, []).returncode == 0  # slots and counts released
        reasons = {e["reason"] for e in refusals(tmp_path / "node.log")}
        assert {"per_address_limit", "association_request_timeout"} <= reasons, reasons
        timeout = [e for e in refusals(tmp_path / "node.log") if e["reason"] == "association_request_timeout"]
        assert timeout[0].get("during") == "TLS handshake"
    finally:
        for s in silent:
            s.close()
        node.stop()


def test_sighup_reloads_the_certificate_without_a_restart(tmp_path, certs):
    """Replace tls.certificate/private_key, SIGHUP: the next TLS connection gets the new certificate;
    a broken file keeps the old one in use and says so."""
    import shutil
    import signal

    from tls_certs import make_cert

    live = tmp_path / "live"
    live.mkdir()
    for name in ("node.crt", "node.key"):
        shutil.copy(certs["node"][0].parent / name, live / name)
    mine = dict(certs, node=(live / "node.crt", live / "node.key"))
    port, tls_port = free_port(), free_port()
    cfg = write_config(tmp_path / "node.toml", tmp_path / "storage", port, tls_port, mine,
                       [{"ae_title": "PACS", "host": "127.0.0.1", "port": 104}])
    log = tmp_path / "node.log"
    node = start_node(cfg, port, log)

    def served_serial() -> int:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(certs["ca"][0]))
        ctx.load_cert_chain(str(certs["pacs"][0]), str(certs["pacs"][1]))
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return int(tls.getpeercert()["serialNumber"], 16)

    try:
        wait_port(tls_port)
        first = served_serial()
        ca = (certs["ca"][0], certs["ca"][0].parent / "ca.key")
        renewed = make_cert(tmp_path, "renewed", ca, "AINODE")
        shutil.copy(renewed[0], live / "node.crt")
        shutil.copy(renewed[1], live / "node.key")
        node.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: '"tls_reloaded"' in log.read_text(), 10, "tls_reloaded")
        second = served_serial()
        assert second != first
        (live / "node.crt").write_text("not a certificate\n")
        node.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: '"tls_reload_failed"' in log.read_text(), 10, "tls_reload_failed")
        assert served_serial() == second and node.alive()
    finally:
        node.stop()
