"""``/metrics``, ``/healthz``, ``/readyz`` and the status page of a running node.

A study is sent while /metrics is scraped; the counters must move by exactly what was sent
(4 instances, their bytes, 4 Success responses, one association, the result objects
delivered). The status page is checked as HTML here and, opt-in (``DICOM_AI_STATUS_SCREENSHOT=1``,
needs Debian's chromium), as a screenshot in headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request

import pytest

from node_harness import (PATIENT_ID, PATIENT_NAME, free_port, start_node, start_storescp, store_status, storescu,
                          wait_delivered, wait_for, write_node_config, write_study)

pytestmark = pytest.mark.slow


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening yet: the HTTP server starts just after the DICOM port opens


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m and m[1] == name:
            got = ",".join(sorted(p for p in (m[2] or "").split(",") if p))
            if got == want:
                return float(m[3])
    return 0.0


def test_metrics_move_by_what_a_study_did_and_health_endpoints(tmp_path):
    pacs, pacs_port = start_storescp(tmp_path / "pacs")
    port, http, dead = free_port(), free_port(), free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", pacs_port)],
                            destinations=[("ARCHIVE", dead)], retry={"max_attempts": 1})
    cfg.write_text(cfg.read_text() + f"[http]\nport = {http}\n")
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        wait_for(lambda: get(http, "/healthz")[0] == 200, 20, "/healthz")
        wait_for(lambda: get(http, "/readyz")[0] == 200, 20, "/readyz")
        checks = json.loads(get(http, "/readyz")[1])
        assert checks == {"scp_accepting": True, "worker_alive": True, "job_store_writable": True,
                          "disk_above_reserve": True}
        before = get(http, "/metrics")[1]
        files = write_study(tmp_path / "study", seed=21)
        assert storescu(port, files).returncode == 0
        during = get(http, "/metrics")[1]  # received, perhaps not processed yet
        wait_for(lambda: any(d["state"] == "failed" for d in store_status(tmp_path / "storage")["deliveries"])
                 and any(d["state"] == "done" for d in store_status(tmp_path / "storage")["deliveries"]), 60,
                 "PACS delivery done and ARCHIVE failed")
        after = get(http, "/metrics")[1]
        status = store_status(tmp_path / "storage")

        size = sum(i["size"] for i in status["instances"])
        for text in (during, after):
            assert sample(text, "dicom_ai_instances_received_total") - sample(before, "dicom_ai_instances_received_total") == 4
            assert sample(text, "dicom_ai_received_bytes_total") - sample(before, "dicom_ai_received_bytes_total") == size
            assert sample(text, "dicom_ai_c_store_responses_total", status="0x0000") == 4
            assert sample(text, "dicom_ai_associations_total", outcome="accepted") == 1
        assert sample(after, "dicom_ai_associations_total", outcome="released") == 1
        results = [o for o in status["outbox"]]
        assert sample(after, "dicom_ai_objects_sent_total", destination="PACS") == len(results) > 0
        assert sample(after, "dicom_ai_delivery_attempts_failed_total", destination="ARCHIVE") == 1
        assert sample(after, "dicom_ai_jobs", state="done") == 1
        assert sample(after, "dicom_ai_deliveries", destination="PACS", state="done") == 1
        assert sample(after, "dicom_ai_deliveries", destination="ARCHIVE", state="failed") == 1
        assert sample(after, "dicom_ai_queue_length") == 0
        assert sample(after, "dicom_ai_job_duration_seconds_count") == 1
        assert sample(after, "dicom_ai_storage_free_bytes") > sample(after, "dicom_ai_storage_reserve_bytes") == 2**20
        assert PATIENT_ID not in after and PATIENT_NAME not in after

        # The status page: read-only, refreshing, failed deliveries first, no patient data.
        code, page = get(http, "/")
        assert code == 200 and 'http-equiv="refresh"' in page
        assert "<button" not in page.lower() and "<form" not in page.lower()
        assert status["studies"][0]["study_uid"] in page
        deliveries = page.split("<h2>Deliveries")[1].split("</table>")[0]
        assert deliveries.index("ARCHIVE@") < deliveries.index("PACS@")  # failed first
        assert PATIENT_ID not in page and PATIENT_NAME not in page and "Secret" not in page

        # Worker restarts are counted: kill the worker, the node starts another.
        worker_pid = [json.loads(l)["worker_pid"] for l in (tmp_path / "node.log").read_text().splitlines()
                      if '"worker_spawned"' in l][-1]
        os.kill(worker_pid, signal.SIGKILL)
        wait_for(lambda: sample(get(http, "/metrics")[1], "dicom_ai_worker_restarts_total") == 1, 20,
                 "the worker restart to be counted")
        wait_for(lambda: get(http, "/readyz")[0] == 200, 20, "/readyz after the worker restart")

        if os.environ.get("DICOM_AI_STATUS_SCREENSHOT") == "1":
            browser = shutil.which("chromium") or shutil.which("chromium-browser")
            assert browser, "DICOM_AI_STATUS_SCREENSHOT=1 needs chromium (apt-get install chromium)"
            shot = tmp_path / "status.png"
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                            "--window-size=1280,900", f"http://127.0.0.1:{http}/"], capture_output=True, timeout=120)
            assert shot.exists() and shot.stat().st_size > 10_000
            from PIL import Image
            img = Image.open(shot).convert("RGB")
            # The failed ARCHIVE delivery's row is shaded red (#fdd): such pixels are on the page.
            assert any(c == (255, 221, 221) for _, c in img.getcolors(1 << 24)), "no failed-delivery row rendered"
            out = os.environ.get("DICOM_AI_STATUS_SCREENSHOT_OUT")
            if out:
                shutil.copy(shot, out)
    finally:
        node.stop()
        pacs.stop()


def test_readyz_fails_below_the_disk_reserve_and_http_is_off_by_default(tmp_path):
    from dicom_ai.node.config import load_config
    cfg = load_config(None)
    assert cfg.http.port == 0 and cfg.http.bind_address == "127.0.0.1"

    port, http = free_port(), free_port()
    reserve_mb = shutil.disk_usage(tmp_path).free // 2**20 + 10_000  # more than the disk has free
    cfg_path = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", 104)],
                                 node={"reserve_free_mb": reserve_mb})
    cfg_path.write_text(cfg_path.read_text() + f"[http]\nport = {http}\n")
    node = start_node(cfg_path, port, tmp_path / "node.log")
    try:
        code, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(get(http, "/readyz")), 20, "/readyz 503")
        checks = json.loads(body)
        assert checks["disk_above_reserve"] is False and checks["scp_accepting"] is True
        assert get(http, "/healthz")[0] == 200  # alive, not ready
        metrics = get(http, "/metrics")[1]
        assert sample(metrics, "dicom_ai_storage_reserve_bytes") == reserve_mb * 2**20
        assert sample(metrics, "dicom_ai_storage_free_bytes") < reserve_mb * 2**20
    finally:
        node.stop()
