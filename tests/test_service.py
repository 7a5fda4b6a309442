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


def _install_steps() -> str:
    """The shell lines of the README's install block (the fenced block after its marker)."""
    text = (REPO / "README.md").read_text()
    start = text.index("<!-- install-steps:")
    block = text[text.index("```sh\n", start) + len("```sh\n"):]
    return block[:block.index("```")]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or shutil.which("systemd-sysusers") is None,
                    reason="systemd-analyze/systemd-sysusers missing (apt-get install systemd)")
def test_the_readmes_install_steps_give_units_that_pass_systemd_analyze_verify(tmp_path):
    """Exactly the README's install lines, with DESTDIR a temporary root; both units then pass
    ``systemd-analyze verify --root``. The root gets what a machine has before: the OS's own units
    (sysinit.target, ...), /bin/kill and the virtual environment's command at /opt/dicom-ai/.venv."""
    root = tmp_path / "root"
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    (root / "bin").mkdir()
    shutil.copy(shutil.which("kill") or "/bin/kill", root / "bin" / "kill")  # ExecReload's command
    venv_bin = root / "opt" / "dicom-ai" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    exe = Path(PYTHON).parent / "dicom-ai"
    assert exe.exists(), "pip install -e . (make venv) installs the dicom-ai command"
    (venv_bin / "dicom-ai").write_text(f'#!/bin/sh\nexec {exe} "$@"\n')
    (venv_bin / "dicom-ai").chmod(0o755)

    steps = _install_steps()
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", steps], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "DESTDIR": str(root)})
    assert r.returncode == 0, steps + r.stdout + r.stderr
    units = root / "etc" / "systemd" / "system"
    assert (units / "dicom-ai.service").read_text() == UNIT.read_text()
    assert "dicom-ai:x:" in (root / "etc" / "passwd").read_text()  # the system user
    assert oct((root / "etc" / "dicom-ai" / "pgpass").stat().st_mode & 0o777) == "0o600"
    for name in ("dicom-ai.service", "dicom-ai-worker@.service"):
        text = (units / name).read_text()
        for needed in ("User=dicom-ai", "StateDirectory=dicom-ai", "WorkingDirectory=/var/lib/dicom-ai",
                       "LoadCredential=pgpass:/etc/dicom-ai/pgpass", "Environment=PGPASSFILE=%d/pgpass"):
            assert needed in text, (name, needed)
    assert "Type=notify" in UNIT.read_text() and "WatchdogSec=" in UNIT.read_text()
    r = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "dicom-ai.service",
                        "dicom-ai-worker@gpu0.service"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # The check can fail: a unit broken the same way is refused.
    broken = units / "dicom-ai.service"
    broken.write_text(broken.read_text().replace("Type=notify", "Type=notifyy"))
    r = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "dicom-ai.service"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 or "notifyy" in r.stderr
    # The installed configuration passes check-config as shipped, and names the storage the units make.
    r = subprocess.run([PYTHON, "-m", "dicom_ai", "check-config", "--config", str(root / "etc" / "dicom-ai" / "node.toml")],
                       capture_output=True, text=True, timeout=60, env=node_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.split("\n", 1)[1])["node"]["storage"] == "/var/lib/dicom-ai"
    # Running the steps again (an upgrade) keeps the edited configuration and password file.
    (root / "etc" / "dicom-ai" / "pgpass").write_text("db:5432:dicom_ai:dicom_ai:pw\n")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", steps], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "DESTDIR": str(root)})
    assert r.returncode == 0 and "pw" in (root / "etc" / "dicom-ai" / "pgpass").read_text()


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate missing (apt-get install logrotate)")
def test_the_logrotate_rule_rotates_node_and_audit_logs(tmp_path):
    """The shipped rule, pointed at a temporary log folder, rotates node.log and audit.log (no copytruncate:
    the node reopens moved files)."""
    import grp
    import pwd
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    for name in ("node.log", "audit.log"):
        (logs_dir / name).write_text("line\n")
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    rule = (REPO / "dicom_ai" / "node" / "dicom-ai.logrotate").read_text()
    assert "copytruncate" not in rule.split("{", 1)[1]
    rule = rule.replace("/var/lib/dicom-ai/logs", str(logs_dir)).replace("dicom-ai dicom-ai", f"{user} {group}")
    conf = tmp_path / "dicom-ai.logrotate"
    conf.write_text(rule)
    r = subprocess.run(["logrotate", "--force", "--state", str(tmp_path / "state"), str(conf)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("node.log", "audit.log"):
        assert (logs_dir / f"{name}.1").read_text() == "line\n"  # moved, not copied (delaycompress)
        assert oct((logs_dir / name).stat().st_mode & 0o777) == "0o600"


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
        drain = _events(log, "scp_drained")[0]  # the time the drain took, not its 30 s limit
        assert drain["limit_seconds"] == 30.0 and 0 <= drain["seconds"] < 29, drain
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
