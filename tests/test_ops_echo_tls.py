"""`dicom-ai echo --tls` against dcmtk `storescp +tls`, and TLS handshake failures named as such in
echo, the delivery log, `dicom-ai status` and the audit trail."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from node_harness import (PYTHON, REPO, Proc, free_port, node_env, start_node, storescu, wait_for, wait_port,
                          write_study)
from tls_certs import make_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("certs"))


def storescp(tmp_path: Path, certs, server: str | None = "pacs", trusts: str = "ca") -> tuple[Proc, int]:
    """storescp as PACS: over TLS with ``server``'s certificate, trusting ``trusts`` (None: plain)."""
    port = free_port()
    folder = tmp_path / f"pacs-{port}"
    folder.mkdir()
    tls = [] if server is None else ["+tls", str(certs[server][1]), str(certs[server][0]), "+cf", str(certs[trusts][0])]
    proc = Proc(["storescp", "-v", "--aetitle", "PACS", "--output-directory", str(folder), *tls, str(port)],
                tmp_path / f"storescp-{port}.log")
    wait_port(port)
    return proc, port


def node_toml(path: Path, certs, pacs_port: int, storage: Path, port: int = 0, extra: str = "") -> Path:
    path.write_text(f"""[node]
ae_title = "AINODE"
bind_address = "127.0.0.1"
port = {port}
storage = {json.dumps(str(storage))}
reserve_free_mb = 1
[study]
grace_seconds = 0.5
idle_seconds = 2.0
[pipeline]
factory = "node_harness:stand_in_pipeline"
device = "cpu"
previews = false
[retry]
max_attempts = 1
timeout_seconds = 5
[tls]
certificate = {json.dumps(str(certs['node'][0]))}
private_key = {json.dumps(str(certs['node'][1]))}
ca_bundle = {json.dumps(str(certs['ca'][0]))}
[[peers]]
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
tls = true
{extra}""")
    return path


def echo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "dicom_ai", "echo", *args], capture_output=True, text=True, timeout=60,
                          env=node_env(), cwd=REPO)


def test_echo_over_tls_to_storescp_and_each_handshake_failure_named(tmp_path, certs):
    good, good_port = storescp(tmp_path, certs)
    rogue, rogue_port = storescp(tmp_path, certs, server="rogue")  # a server certificate of an unknown CA
    picky, picky_port = storescp(tmp_path, certs, trusts="rogue")  # does not trust the node's CA
    plain, plain_port = storescp(tmp_path, certs, server=None)  # no TLS at all
    try:
        cfg = node_toml(tmp_path / "node.toml", certs, good_port, tmp_path / "storage")
        ok = echo("--config", str(cfg), "PACS")  # the configured peer: its host, port and tls = true
        assert ok.returncode == 0 and "PACS@127.0.0.1" in ok.stdout and "(TLS): success over TLSv1." in ok.stdout, \
            ok.stdout + ok.stderr
        ok = echo("--tls", "--certificate", str(certs["pacs"][0]), "--private-key", str(certs["pacs"][1]),
                  "--ca-bundle", str(certs["ca"][0]), f"PACS@127.0.0.1:{good_port}")  # options only, no file
        assert ok.returncode == 0 and "success over TLSv1." in ok.stdout, ok.stdout + ok.stderr
        assert "storing" not in (tmp_path / f"storescp-{good_port}.log").read_text()  # an echo, nothing stored

        cases = {rogue_port: ("tls_certificate_verify_failed", "unable to get local issuer certificate"),
                 picky_port: ("tls_certificate_rejected_by_peer", "rejected this node's certificate"),
                 plain_port: ("tls_not_tls", "plain (non-TLS) DICOM port")}
        for port, (reason, says) in cases.items():
            r = echo("--config", str(cfg), "--tls", f"PACS@127.0.0.1:{port}")
            assert r.returncode == 1, r.stdout + r.stderr
            assert f"FAILED (TLS handshake failed ({reason}): " in r.stdout and says in r.stdout, (port, r.stdout)
        # Plain echo to the plain peer still works, and to a TLS port it is no TLS failure.
        assert echo(f"PACS@127.0.0.1:{plain_port}").returncode == 0
        missing = echo("--tls", f"PACS@127.0.0.1:{good_port}")
        assert missing.returncode == 2 and "tls.certificate" in missing.stderr and "--certificate" in missing.stderr
    finally:
        for p in (good, rogue, picky, plain):
            p.stop()


def test_a_tls_delivery_failure_says_tls_in_the_log_status_and_audit(tmp_path, certs):
    rogue, rogue_port = storescp(tmp_path, certs, server="rogue")
    port = free_port()
    storage = tmp_path / "storage"
    cfg = node_toml(tmp_path / "node.toml", certs, rogue_port, storage, port=port)
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        assert storescu(port, write_study(tmp_path / "study", seed=3)).returncode == 0
        log = tmp_path / "node.log"

        def failed():
            for line in log.read_text().splitlines():
                if '"delivery_attempt_failed"' in line:
                    return json.loads(line)
            return None
        event = wait_for(failed, 90, "the failed delivery attempt")
    finally:
        node.stop()
        rogue.stop()
    assert "TLS handshake with the destination failed (tls_certificate_verify_failed)" in event["error"], event
    assert "unable to get local issuer certificate" in event["error"]
    shown = subprocess.run([PYTHON, "-m", "dicom_ai", "status", "--config", str(cfg)], capture_output=True,
                           text=True, timeout=60, env=node_env(), cwd=REPO)
    assert "TLS handshake with the destination failed" in shown.stdout, shown.stdout
    audit = (storage / "logs" / "audit.log").read_text()
    assert "TLS handshake with the destination failed (tls_certificate_verify_failed)" in audit
