"""The whole node as a process, with dcmtk as the sending modality/PACS and storescp receiving results."""

from __future__ import annotations

import json
import subprocess
import threading

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from node_harness import (PYTHON, REPO, delivered_uids, free_port, node_env,
                          outbox_uids, received, start_node, start_storescp, store_status, storescu, wait_delivered,
                          wait_for, write_node_config, write_study)

pytestmark = pytest.mark.slow


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "dicom_ai", *args], capture_output=True, text=True, timeout=60,
                          env=env or node_env(), cwd=REPO)


def test_four_view_studies_uncompressed_and_jpeg2000_come_back_to_the_pacs(tmp_path):
    pacs, pacs_port = start_storescp(tmp_path / "pacs", "PACS")
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", pacs_port)])
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        echo = subprocess.run(["echoscu", "-aet", "PACS", "-aec", "AINODE", "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        assert "success" in _cli("echo", f"PACS@127.0.0.1:{pacs_port}", "--ae-title", "AINODE").stdout

        # Four-view phantom studies, one uncompressed and one JPEG 2000 lossless.
        from dicom_ai.data.phantom import generate_study
        from dicom_ai.data.phantom_folder import write_study as write_phantom

        studies = [generate_study(seed, shape=(208, 160)) for seed in (1, 2)]
        write_phantom(studies[0], tmp_path / "plain", transfer_syntax="explicit")
        write_phantom(studies[1], tmp_path / "j2k", transfer_syntax="jpeg2000")
        plain, j2k = sorted((tmp_path / "plain").glob("*.dcm")), sorted((tmp_path / "j2k").glob("*.dcm"))
        assert pydicom.dcmread(j2k[0]).file_meta.TransferSyntaxUID == JPEG2000Lossless
        sent = storescu(port, plain)
        assert sent.returncode == 0 and sent.stderr.count("(Success)") == 4, sent.stderr
        sent = storescu(port, j2k, extra=["-R", "-xv"])
        assert sent.returncode == 0 and sent.stderr.count("(Success)") == 4, sent.stderr

        status = wait_delivered(tmp_path / "storage", jobs=2)
        for files, job in zip((plain, j2k), sorted(status["jobs"], key=lambda j: j["id"])):
            study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
            assert len(json.loads(job["instance_uids"])) == 4
            expected = outbox_uids(status, job["id"])
            assert len(expected) >= 2  # at least one SEG and the SR
            assert delivered_uids(tmp_path / "pacs", study_uid) == expected
        results = [ds for ds in received(tmp_path / "pacs")]
        assert {ds.Modality for ds in results} >= {"SEG", "SR"}
        seg_series = [{ds.SeriesInstanceUID for ds in results
                       if ds.Modality == "SEG" and ds.StudyInstanceUID == study.images[0].dataset.StudyInstanceUID}
                      for study in studies]
        assert seg_series[0] and seg_series[1] and not (seg_series[0] & seg_series[1])

        shown = _cli("status", "--config", str(cfg))
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count(" done ") >= 4  # 2 jobs + 2 deliveries
        for image in studies[0].images:
            assert str(image.dataset.PatientName) not in shown.stdout
            assert str(image.dataset.PatientID) not in shown.stdout
    finally:
        node.stop()
        pacs.stop()
    log = (tmp_path / "node.log").read_text() + (tmp_path / "storage" / "logs" / "node.log").read_text()
    assert "job_finished" in log and "delivery_done" in log
    secrets = set()
    for image in studies[0].images + studies[1].images:
        ds = image.dataset
        secrets |= {str(ds.get(k, "")) for k in ("PatientName", "PatientID", "AccessionNumber", "PatientBirthDate")}
    for secret in secrets - {""}:
        assert secret not in log


def test_incomplete_study_after_idle_time_and_a_late_image_supersedes_in_a_new_series(tmp_path):
    pacs, pacs_port = start_storescp(tmp_path / "pacs", "PACS")
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", pacs_port)],
                            study={"grace_seconds": 0.5, "idle_seconds": 2.0})
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        files = write_study(tmp_path / "study", views=[("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"),
                                                       ("L", "CC")])
        study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
        # Three views only (one breast has no MLO): processed after the idle time, not rejected.
        assert storescu(port, files[:3]).returncode == 0
        first = wait_delivered(tmp_path / "storage", jobs=1)
        job1 = first["jobs"][0]
        assert len(json.loads(job1["instance_uids"])) == 3
        # The late R-MLO plus an extra (repeated) L-CC view: one new job for the whole study.
        assert storescu(port, files[3:]).returncode == 0
        second = wait_delivered(tmp_path / "storage", jobs=2)
        job2 = [j for j in second["jobs"] if j["id"] != job1["id"]][0]
        assert len(json.loads(job2["instance_uids"])) == 5
        assert [j["state"] for j in second["jobs"]] == ["done", "done"]
        at_pacs = [ds for ds in received(tmp_path / "pacs") if ds.StudyInstanceUID == study_uid]
        by_job = {j["id"]: set(outbox_uids(second, j["id"])) for j in second["jobs"]}
        assert {str(ds.SOPInstanceUID) for ds in at_pacs} == by_job[job1["id"]] | by_job[job2["id"]]
        series = {j: {str(ds.SeriesInstanceUID) for ds in at_pacs if str(ds.SOPInstanceUID) in uids}
                  for j, uids in by_job.items()}
        assert not (series[job1["id"]] & series[job2["id"]])  # the newer results are a new series
        numbers = {j: {int(ds.SeriesNumber) for ds in at_pacs if str(ds.SOPInstanceUID) in uids}
                   for j, uids in by_job.items()}
        assert min(numbers[job2["id"]]) > max(numbers[job1["id"]])  # listed after the superseded ones
    finally:
        node.stop()
        pacs.stop()


def test_pacs_down_then_back_and_failed_delivery_retried_from_the_cli(tmp_path):
    pacs_port = free_port()
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", pacs_port)],
                            retry={"max_attempts": 4, "initial_delay_seconds": 0.3, "max_delay_seconds": 1.0})
    node = start_node(cfg, port, tmp_path / "node.log")
    pacs = None
    try:
        # 1. The PACS is down when the results are ready and comes back within the retries.
        first = write_study(tmp_path / "one", seed=1)
        assert storescu(port, first).returncode == 0
        wait_for(lambda: any(d["attempts"] >= 1 and d["error"] for d in store_status(tmp_path / "storage")[
            "deliveries"]), 30, "a failed delivery attempt")
        pacs, _ = start_storescp(tmp_path / "pacs", "PACS", port=pacs_port)
        status = wait_delivered(tmp_path / "storage", jobs=1)
        assert delivered_uids(tmp_path / "pacs") == outbox_uids(status, status["jobs"][0]["id"])
        pacs.stop()

        # 2. Down for longer than the retries: failed and visible, then `dicom-ai retry`.
        second = write_study(tmp_path / "two", seed=2)
        assert storescu(port, second).returncode == 0
        wait_for(lambda: any(d["state"] == "failed" for d in store_status(tmp_path / "storage")["deliveries"]),
                 60, "the delivery to be marked failed")
        shown = _cli("status", "--config", str(cfg))
        assert shown.returncode == 1  # something failed
        assert "failed" in shown.stdout and "could not connect" in shown.stdout, shown.stdout
        pacs, _ = start_storescp(tmp_path / "pacs", "PACS", port=pacs_port)
        retried = _cli("retry", "--config", str(cfg))
        assert "re-queued 1 failed deliveries" in retried.stdout, retried.stdout + retried.stderr
        status = wait_delivered(tmp_path / "storage", jobs=2)
        study2 = pydicom.dcmread(second[0]).StudyInstanceUID
        job2 = max(j["id"] for j in status["jobs"])
        assert delivered_uids(tmp_path / "pacs", study2) == outbox_uids(status, job2)
        assert all(d["state"] == "done" for d in status["deliveries"])
    finally:
        node.stop()
        if pacs is not None:
            pacs.stop()


def test_infer_runs_the_pipeline_offline(tmp_path):
    files = write_study(tmp_path / "study", views=[("L", "CC"), ("R", "CC")])
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", 11112, [])
    done = _cli("infer", *map(str, files), "--out", str(tmp_path / "out"), "--config", str(cfg))
    assert done.returncode == 0, done.stderr
    written = [pydicom.dcmread(p) for p in sorted((tmp_path / "out").glob("*.dcm"))]
    assert sorted(ds.Modality for ds in written) == ["PR", "PR", "SEG", "SEG", "SR"]  # a GSPS per SEG
    assert {ds.StudyInstanceUID for ds in written} == {pydicom.dcmread(files[0]).StudyInstanceUID}
    assert not (tmp_path / "out" / "previews").exists()  # pipeline.previews = false in this config


def test_a_pipeline_that_cannot_load_is_shown_by_status_and_jobs_wait(tmp_path):
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", 1)],
                            pipeline={"factory": "node_harness:no_such_pipeline"})
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        assert storescu(port, write_study(tmp_path / "study")).returncode == 0  # receiving goes on
        wait_for(lambda: (lambda s: s["notices"] and s["jobs"])(store_status(tmp_path / "storage")), 60,
                 "the worker's notice and the queued job")
        shown = _cli("status", "--config", str(cfg))
        assert shown.returncode == 1
        assert "PROBLEM (worker" in shown.stdout and "no_such_pipeline" in shown.stdout, shown.stdout
        assert [j["state"] for j in store_status(tmp_path / "storage")["jobs"]] == ["queued"]
    finally:
        node.stop()


def _claimed_job(tmp_path, store):
    """A two-view study recorded in ``store`` as one claimed job."""
    from dicom_ai.node.jobstore import Instance
    from dicom_ai.node.supervisor import make_result_uids

    for path in write_study(tmp_path / "study", views=[("L", "CC"), ("R", "MLO")]):
        ds = pydicom.dcmread(path)
        store.record_instance(study_uid=ds.StudyInstanceUID, calling_ae="PACS", size=1, instance=Instance(
            ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", ds.ImageLaterality, ds.ViewPosition, str(path)))
    assert store.close_ready_studies(0.0, 0.0, make_result_uids)
    return store.claim_job()


def test_previews_are_drawn_after_the_results_are_queued(tmp_path, monkeypatch):
    """The worker records the job and queues its delivery before it draws a preview; the job's
    note says the previews are not written yet until they are, then only the job's own notes."""
    from dicom_ai.node import worker
    from dicom_ai.node.config import load_config
    from dicom_ai.node.jobstore import JobStore
    from node_harness import StandInPipeline

    cfg = load_config(write_node_config(tmp_path / "node.toml", tmp_path / "storage", free_port(), [("PACS", 11112)],
                                        pipeline={"previews": True}))
    store = JobStore(cfg.storage_dir / "jobs.sqlite")
    job = _claimed_job(tmp_path, store)
    seen = {}
    draw = worker.write_job_previews

    def drawing(built, config, job_id, timings=None):
        status = store.status()
        seen.update(job=status["jobs"][0], deliveries=status["deliveries"],
                    heartbeat=any(t.name == f"heartbeat-{job_id}" and t.is_alive() for t in threading.enumerate()))
        return draw(built, config, job_id, timings)

    monkeypatch.setattr(worker, "write_job_previews", drawing)
    worker.run_claimed_job(job, StandInPipeline(), cfg, store, worker.StorageTrouble(store, tmp_path, 0), lambda: False)
    assert seen["job"]["state"] == "done" and seen["job"]["results"] == 5
    assert seen["job"]["error"] == worker.PREVIEWS_PENDING
    assert not seen["heartbeat"]  # the job is no longer running: no lease renewal (no false "claim lost")
    assert [(d["ae_title"], d["state"]) for d in seen["deliveries"]] == [("PACS", "pending")]
    assert len(list((cfg.storage_dir / "previews" / f"job-{job.id}").glob("*.png"))) == 2
    assert store.status()["jobs"][0]["error"] is None


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, nothing catches it."""


def test_a_worker_stopped_before_the_previews_leaves_a_done_job_that_says_they_are_missing(tmp_path, monkeypatch):
    """Killed between recording the job and drawing its previews, the worker leaves the job done
    with its delivery queued (the results do not depend on a preview), and the job's note, in
    ``status`` and on the status page, says the previews are missing; the node does not run it again."""
    from dicom_ai.node import worker
    from dicom_ai.node.config import load_config
    from dicom_ai.node.http_server import render_status_page
    from dicom_ai.node.jobstore import JobStore
    from node_harness import StandInPipeline

    cfg = load_config(write_node_config(tmp_path / "node.toml", tmp_path / "storage", free_port(), [("PACS", 11112)],
                                        pipeline={"previews": True}))
    store = JobStore(cfg.storage_dir / "jobs.sqlite")
    job = _claimed_job(tmp_path, store)

    def killed(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(worker, "write_job_previews", killed)
    with pytest.raises(_Killed):
        worker.run_claimed_job(job, StandInPipeline(), cfg, store, worker.StorageTrouble(store, tmp_path, 0),
                               lambda: False)
    # What the node does when it restarts the worker: a done job is not re-queued.
    assert store.recover(3, count_interruption=False)["jobs_requeued"] == 0
    status = store.status()
    assert status["jobs"][0]["state"] == "done" and status["jobs"][0]["error"] == worker.PREVIEWS_PENDING
    assert [d["state"] for d in status["deliveries"]] == ["pending"] and status["deliveries"][0]["total"] == 5
    assert store.claim_job() is None
    assert not (cfg.storage_dir / "previews" / f"job-{job.id}").exists()
    assert "previews not written yet" in render_status_page(status, "AINODE", {})
    # A note written meanwhile by someone else (or a job run again) is not overwritten.
    assert not store.replace_job_note(job, None, "another note")


def test_worker_writes_a_durable_outbox_and_previews(tmp_path):
    """One job through the worker in-process: outbox files under the fixed UIDs, one preview PNG
    per image, and re-running the job reproduces the same objects."""
    from dicom_ai.node.config import load_config
    from dicom_ai.node.jobstore import Instance, JobStore
    from dicom_ai.node.supervisor import make_result_uids
    from dicom_ai.node.processing import process_job
    from node_harness import StandInPipeline

    cfg = load_config(None, {"node.storage": str(tmp_path / "storage"), "pipeline.previews": True})
    store = JobStore(cfg.storage_dir / "jobs.sqlite")
    for path in write_study(tmp_path / "study", views=[("L", "CC"), ("R", "MLO")]):
        ds = pydicom.dcmread(path)
        store.record_instance(study_uid=ds.StudyInstanceUID, calling_ae="PACS", size=1, instance=Instance(
            ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", ds.ImageLaterality, ds.ViewPosition, str(path)))
    assert store.close_ready_studies(0.0, 0.0, make_result_uids)
    job = store.claim_job()
    entries, notes = process_job(job, StandInPipeline(), cfg)
    assert notes == []
    assert sorted(pydicom.dcmread(p).Modality for _, _, p in entries) == ["PR", "PR", "SEG", "SEG", "SR"]
    assert all(pydicom.dcmread(p).SOPInstanceUID == uid for uid, _, p in entries)
    assert not list((cfg.storage_dir / "outbox").rglob("*.tmp"))
    assert len(list((cfg.storage_dir / "previews" / f"job-{job.id}").glob("*.png"))) == 2
    again, _ = process_job(job, StandInPipeline(), cfg)  # after a crash the job runs again
    assert sorted(uid for uid, _, _ in again) == sorted(uid for uid, _, _ in entries)
