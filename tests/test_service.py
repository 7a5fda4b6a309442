"""Running the node as a service: the systemd unit, sd_notify, SIGTERM, log rotation, check-config."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from node_harness import (PYTHON, REPO, Proc, free_port, node_env, start_node, start_storescp, store_status,
                          wait_delivered, wait_for, wait_port, write_node_config, write_study)

UNIT = REPO / "dicom_ai" / "node" / "dicom-ai.service"


def _events(log: Path, name: str) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        if f'"{name}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (apt-get install systemd)")
def test_the_shipped_unit_passes_systemd_analyze_verify(tmp_path):
    text = UNIT.read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text and "KillSignal=SIGTERM" in text
    # The unit names /opt/dicom-ai/.venv/bin/dicom-ai; verify checks that it exists, so point it
    # at this checkout's command (everything else is the shipped file).
    exe = Path(PYTHON).parent / "dicom-ai"
    assert exe.exists(), "pip install -e . (make venv) installs the dicom-ai command"
    unit = tmp_path / "dicom-ai.service"
    unit.write_text(text.replace("/opt/dicom-ai/.venv/bin/dicom-ai", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    r = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 or "notifyy" in r.stderr  # the check can fail


def test_check_config_prints_the_effective_configuration_and_names_bad_keys(tmp_path):
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", 11112, [("PACS", 104)])
    r = subprocess.run([PYTHON, "-m", "dicom_ai", "check-config", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60, env=node_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr
    effective = json.loads(r.stdout.split("\n", 1)[1])
    assert effective["node"]["ae_title"] == "AINODE" and effective["tls"]["min_version"] == "1.2"
    assert effective["audit"]["sink"] == "file" and effective["http"]["port"] == 0
    assert effective["derived"]["storage"] == str((tmp_path / "storage").resolve())
    cfg.write_text(cfg.read_text() + '[tls]\nport = 2762\nmin_version = "1.1"\n')
    r = subprocess.run([PYTHON, "-m", "dicom_ai", "check-config", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60, env=node_env(), cwd=REPO)
    assert r.returncode == 2 and "tls.min_version" in r.stderr, r.stderr


def test_sd_notify_sigterm_drains_a_store_in_progress_and_logs_can_rotate(tmp_path):
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(0.2)
    pacs, pacs_port = start_storescp(tmp_path / "pacs")
    port = free_port()
    storage = tmp_path / "storage"
    cfg = write_node_config(tmp_path / "node.toml", storage, port, [("PACS", pacs_port)])
    log = tmp_path / "node.log"
    env = node_env(NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="400000")
    node = start_node(cfg, port, log, env=env)
    got: list[str] = []

    def drain():  # what systemd does: read every datagram as it comes
        while listener.fileno() >= 0:
            try:
                got.append(listener.recv(4096).decode())
            except OSError:
                if listener.fileno() < 0:
                    return
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(m.startswith("READY=1") for m in got), 20, "READY=1")
        wait_for(lambda: sum(m == "WATCHDOG=1" for m in got) >= 2, 10, "WATCHDOG=1 pings")

        # logrotate moves node.log away: the next line goes to a new node.log (WatchedFileHandler).
        log_file = storage / "logs" / "node.log"
        wait_for(log_file.exists, 10, "the node's log file")
        log_file.rename(storage / "logs" / "node.log.1")
        subprocess.run(["echoscu", "-aet", "PACS", "-aec", "AINODE", "127.0.0.1", str(port)], timeout=30, check=True)
        wait_for(lambda: log_file.exists() and '"echo"' in log_file.read_text(), 10, "a new node.log after rotation")

        # SIGTERM while a sender is mid-association: its C-STOREs still complete.
        files = write_study(tmp_path / "study", shape=(2048, 1536), seed=31)
        sender = subprocess.Popen(["storescu", "-aet", "PACS", "-aec", "AINODE", "127.0.0.1", str(port),
                                   *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: _events(log, "association_accepted")[1:], 20, "the sender's association")
        node.popen.send_signal(signal.SIGTERM)
        out, _ = sender.communicate(timeout=60)
        assert sender.returncode == 0, out
        assert node.popen.wait(60) == 0
        assert len(_events(log, "instance_received")) == 4
        assert _events(log, "scp_drained") and _events(log, "node_stopped")
        assert any(m.startswith("STOPPING=1") for m in got)
        with socket.socket() as s:  # nothing listens any more
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        node.stop()
        listener.close()
    # Everything left resumes at the next start: the study is processed and delivered.
    node = start_node(cfg, port, log)
    try:
        status = wait_delivered(storage, jobs=1, timeout=90)
        assert len(status["instances"]) == 4
    finally:
        node.stop()
        pacs.stop()
