"""SIGKILL the node during a transfer, during inference and during a send; after a restart every
accepted study is processed and each result object reaches the PACS exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pydicom
import pytest

from dicom_ai.core.uids import ResultUIDs
from node_harness import (delivered_uids, free_port, node_env, outbox_uids, start_node, start_storescp,
                          store_status, storescu, wait_delivered, wait_for, write_node_config, write_study)

pytestmark = pytest.mark.slow


def _assert_exactly_once(tmp_path, study_uid: str, max_wire_repeats: int = 0) -> dict:
    """One finished job for the study; the PACS holds exactly its outbox, sent at most
    ``max_wire_repeats`` extra times on the wire (the object in flight at the kill)."""
    status = wait_delivered(tmp_path / "storage", jobs=1)
    jobs = [j for j in status["jobs"] if j["state"] not in ("cancelled",)]
    assert [j["state"] for j in jobs] == ["done"], status["jobs"]
    expected = outbox_uids(status, jobs[0]["id"])
    assert len(expected) >= 2
    assert delivered_uids(tmp_path / "pacs", study_uid) == expected
    assert [d["state"] for d in status["deliveries"]] == ["done"]
    log = "".join(p.read_text() for p in tmp_path.glob("storescp-PACS-*.log"))
    repeats = log.count("storing DICOM file") - len(expected)
    assert 0 <= repeats <= max_wire_repeats, log
    return status


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_during_transfer_then_the_sender_retries(tmp_path):
    pacs, pacs_port = start_storescp(tmp_path / "pacs", "PACS")
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", pacs_port)],
                            study={"grace_seconds": 0.5, "idle_seconds": 60.0})
    files = write_study(tmp_path / "study", shape=(1536, 1152))  # 3.5 MB each: the kill lands mid-study
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    node = start_node(cfg, port, tmp_path / "node1.log")
    try:
        sender = subprocess.Popen(["storescu", "-aet", "PACS", "-aec", "AINODE", "127.0.0.1", str(port),
                                   *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: store_status(tmp_path / "storage")["instances"], 30, "the first stored instance",
                 interval=0.005)
        node.kill()
        sender.wait(30)
        kept = len(store_status(tmp_path / "storage")["instances"])
        assert kept < 4, "the kill came too late to interrupt the transfer"
        node = start_node(cfg, port, tmp_path / "node2.log")
        assert not list((tmp_path / "storage" / "incoming").iterdir())  # the partial file is gone
        resent = storescu(port, files)  # what a PACS does after a failed association
        assert resent.returncode == 0 and resent.stderr.count("(Success)") == 4, resent.stderr
        status = _assert_exactly_once(tmp_path, study_uid)
        assert len(status["instances"]) == 4
        assert len(json.loads(status["jobs"][0]["instance_uids"])) == 4
    finally:
        node.stop()
        pacs.stop()


def test_kill_during_inference_reruns_the_job_with_the_same_uids(tmp_path):
    pacs, pacs_port = start_storescp(tmp_path / "pacs", "PACS")
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", pacs_port)])
    marker = tmp_path / "inferring"
    slow = node_env(DICOM_AI_TEST_INFER_SECONDS="60", DICOM_AI_TEST_INFER_MARKER=str(marker))
    node = start_node(cfg, port, tmp_path / "node1.log", env=slow)
    try:
        files = write_study(tmp_path / "study")
        study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
        assert storescu(port, files).returncode == 0
        wait_for(marker.exists, 30, "the worker to start inference")
        worker_pid = int(marker.read_text())
        before = store_status(tmp_path / "storage")["jobs"]
        assert [j["state"] for j in before] == ["running"]
        node.kill()
        wait_for(lambda: not _pid_alive(worker_pid), 10, "the worker to die with the node")
        node = start_node(cfg, port, tmp_path / "node2.log")
        status = _assert_exactly_once(tmp_path, study_uid)
        job = status["jobs"][0]
        assert job["attempts"] == 2
        assert job["result_uids"] == before[0]["result_uids"]  # fixed at job creation
        # Every result UID is fixed by the job's result UIDs: stored, or derived from them (GSPS).
        fixed = ResultUIDs.from_json(job["result_uids"])
        sources = json.loads(job["instance_uids"])
        expected = json.dumps(json.loads(job["result_uids"])) + " ".join(fixed.gsps_instance(u) for u in sources)
        assert outbox_uids(status, job["id"]) and all(uid in expected for uid in outbox_uids(status, job["id"]))
    finally:
        node.stop()
        pacs.stop()


def test_kill_during_send_resumes_without_duplicates(tmp_path):
    # A slow PACS (1 s per object) so the kill lands between acknowledged objects.
    pacs, pacs_port = start_storescp(tmp_path / "pacs", "PACS", extra=["--sleep-after", "1"])
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", pacs_port)])
    node = start_node(cfg, port, tmp_path / "node1.log")
    try:
        files = write_study(tmp_path / "study")
        study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
        assert storescu(port, files).returncode == 0
        wait_for(lambda: store_status(tmp_path / "storage")["sent"], 60, "the first acknowledged result",
                 interval=0.05)
        node.kill()
        mid = store_status(tmp_path / "storage")
        assert 1 <= len(mid["sent"]) < len(mid["outbox"]), "the kill came too late to interrupt the send"
        node = start_node(cfg, port, tmp_path / "node2.log")
        _assert_exactly_once(tmp_path, study_uid, max_wire_repeats=1)
    finally:
        node.stop()
        pacs.stop(signal.SIGKILL)
