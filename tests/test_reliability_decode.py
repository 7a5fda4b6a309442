"""A decode failure that a retry cannot change is recorded once (issue 24, fault 5).

Compressed pixel data that passes admission (it is structurally valid) but that its codec
cannot decode is accepted by design and left out after decoding in the sandbox (conformance
4.2.5). A single-image study of such an image must not end as a failed job after three
identical attempts: the job ends done with a note, nothing is sent, and ``dicom-ai status``,
``/metrics`` and the audit trail name the image left out (SOP Instance UID) and why, without
any patient data.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node_harness import (ACCESSION, PATIENT_ID, PATIENT_NAME, PYTHON, REPO, free_port, make_mg, node_env,
                          start_node, start_storescp, store_status, storescu, wait_for, write_node_config)
from test_worker_isolation import corrupt_rle

pytestmark = pytest.mark.slow


def _metric(text: str, name: str, label: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f'{name}{{reason="{label}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_an_image_its_codec_cannot_decode_is_left_out_once_and_named_everywhere(tmp_path):
    bad = corrupt_rle(make_mg("R", "CC", generate_uid(), generate_uid(), 1))  # pylibjpeg-rle panics on it
    path = tmp_path / "bad.dcm"
    bad.save_as(path, enforce_file_format=True)
    uid = str(bad.SOPInstanceUID)
    pacs, pacs_port = start_storescp(tmp_path / "pacs")
    port, http = free_port(), free_port()
    storage = tmp_path / "storage"
    cfg = write_node_config(tmp_path / "node.toml", storage, port, [("PACS", pacs_port)],
                            pipeline={"max_job_attempts": 3})
    cfg.write_text(cfg.read_text() + f"[http]\nport = {http}\n")
    node = start_node(cfg, port, tmp_path / "node.out")
    try:
        sent = storescu(port, [path], extra=["-xr"])  # propose RLE Lossless
        assert sent.returncode == 0 and "Success" in sent.stdout + sent.stderr, sent.stdout + sent.stderr
        job = wait_for(lambda: next((j for j in store_status(storage)["jobs"] if j["state"] not in
                                     ("queued", "running")), None), 60, "the job to end")
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        status = subprocess.run([PYTHON, "-m", "dicom_ai", "status", "--config", str(cfg)], capture_output=True,
                                text=True, env=node_env(), cwd=REPO, timeout=60)
    finally:
        node.stop()
        pacs.stop()
    s = store_status(storage)
    # Once: done after one attempt, no failure counted, nothing to deliver.
    assert job["state"] == "done" and job["attempts"] == 1 and job["failures"] == 0, job
    assert f"image {uid} skipped (codec_error): DecodeFailed: pixel data cannot be decoded: PanicException" \
        in job["error"], job["error"]
    assert s["deliveries"] == [] and s["outbox"] == []
    log = (storage / "logs" / "node.log").read_text()
    skipped = [json.loads(line) for line in log.splitlines() if '"image_skipped"' in line]
    assert [(e["sop_instance_uid"], e["reason"], e["repeatable"]) for e in skipped] == [(uid, "codec_error", True)]
    assert '"job_failed"' not in log
    # dicom-ai status names the image and why; the job is not a problem (exit status 0).
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"image {uid} skipped (codec_error)" in status.stdout
    # /metrics counts it by reason.
    assert _metric(metrics, "dicom_ai_images_left_out", "codec_error") == 1.0, metrics
    # The audit trail: DICOM Instances Accessed, minor failure, naming the image and the reason.
    audit = (storage / "logs" / "audit.log").read_text()
    left = [line for line in audit.splitlines() if 'csd-code="110103"' in line]
    assert len(left) == 1 and f"{uid} (codec_error)" in left[0] and 'EventOutcomeIndicator="4"' in left[0]
    assert bad.StudyInstanceUID in left[0]
    for text in (audit, log, status.stdout, job["error"]):
        for secret in (PATIENT_NAME, PATIENT_ID, ACCESSION):
            assert secret not in text
