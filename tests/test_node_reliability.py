"""The node under a full disk, a hung destination, repeated kills, an unrecordable send, and the
permissions of what it stores (issue 13, faults 7, 8, 11, 12 and 14)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from node_harness import (PYTHON, REPO, Orthanc, delivered_uids, free_port, make_mg, node_env, outbox_uids, start_node,
                          start_storescp, store_status, storescu, wait_delivered, wait_for, write_node_config,
                          write_study)

pytestmark = pytest.mark.slow

MG = "1.2.840.10008.5.1.4.1.1.1.2"


# -- helpers --------------------------------------------------------------------------------------

class _Events(logging.Handler):
    """Collects the node's log events of this process (the events logger does not propagate)."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, dict]] = []

    def emit(self, record):
        self.events.append((record.getMessage(), dict(getattr(record, "event_fields", {}))))

    def named(self, name: str) -> list[dict]:
        return [fields for event, fields in self.events if event == name]


@pytest.fixture
def events():
    from dicom_ai.node.logs import EVENT_LOGGER

    handler = _Events()
    logging.getLogger(EVENT_LOGGER).addHandler(handler)
    yield handler
    logging.getLogger(EVENT_LOGGER).removeHandler(handler)


def _stores_logged(folder: Path) -> int:
    """C-STOREs a storescp received (every one, duplicates included)."""
    return sum(p.read_text().count("storing DICOM file") for p in folder.parent.glob(f"storescp-*.log"))


def _received_uids(folder: Path) -> list[str]:
    """SOP Instance UIDs of every file a storescp wrote (the agent tests send MG objects)."""
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.glob("*.dcm"))


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _send_one(port: int, ds: pydicom.Dataset, calling: str = "PACS") -> int:
    """C-STORE one data set with pynetdicom; returns the status code (-1: no association)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(MG, str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    if not assoc.is_established:
        return -1
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


def _one_delivery(tmp_path: Path, destination: tuple[str, int], store_class=None, objects: int = 3):
    """A job store holding one done job with ``objects`` outbox files and one pending delivery."""
    from dicom_ai.node.jobstore import Instance, JobStore

    outbox = tmp_path / "outbox"
    outbox.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    outputs = []
    for i, (lat, view) in enumerate([("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")][:objects], start=1):
        ds = make_mg(lat, view, study, series, i)
        path = outbox / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        outputs.append((str(ds.SOPInstanceUID), MG, str(path)))
    store = (store_class or JobStore)(tmp_path / "jobs.sqlite")
    store.record_instance(study_uid=study, calling_ae="PACS", size=1,
                          instance=Instance("1.2.3.4", MG, "1.2.840.10008.1.2.1", "L", "CC", "/nowhere.dcm"))
    store.close_ready_studies(0.0, 0.0, lambda uids: "{}", now=time.time() + 1)
    assert store.complete_job(store.claim_job(), outputs, [(destination[0], "127.0.0.1", destination[1])]) == "done"
    return store, sorted(uid for uid, _, _ in outputs)


def _agent_config(tmp_path: Path, **retry):
    from dicom_ai.node.config import load_config

    overrides = {"node.storage": str(tmp_path / "agent-storage"), "node.ae_title": "AINODE",
                 "retry.initial_delay_seconds": 0.5, "retry.max_delay_seconds": 2.0, "retry.max_attempts": 5,
                 "retry.timeout_seconds": 10.0}
    overrides.update({f"retry.{k}": v for k, v in retry.items()})
    return load_config(None, overrides)


def _mark_sent_fails_once():
    from dicom_ai.node.jobstore import JobStore

    class MarkSentFailsOnce(JobStore):
        """Stands in for a node killed between the C-STORE response and its record."""
        failed = False

        def mark_sent(self, delivery_id, sop_instance_uid):
            if not MarkSentFailsOnce.failed:
                MarkSentFailsOnce.failed = True
                raise sqlite3.OperationalError("database or disk is full")
            super().mark_sent(delivery_id, sop_instance_uid)

    return MarkSentFailsOnce


# -- fault 7: a full disk ------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs as the node's storage (skipped where mounting is not permitted)."""
    mount = tmp_path / "storage"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({done.stderr.strip() or 'mount failed'}); needs root or "
                    "CAP_SYS_ADMIN")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(mount: Path) -> Path:
    """Write a filler file until the disk is full; returns it."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == 28  # ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_is_waited_out_and_the_study_is_delivered_once(tmp_path, small_disk):
    pacs, pacs_port = start_storescp(tmp_path / "pacs", "PACS")
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", small_disk, port, [("PACS", pacs_port)])
    marker = tmp_path / "inferring"
    env = node_env(DICOM_AI_TEST_INFER_SECONDS="2", DICOM_AI_TEST_INFER_MARKER=str(marker))
    node = start_node(cfg, port, tmp_path / "node1.log", env=env)
    filler = None
    try:
        files = write_study(tmp_path / "study")
        study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
        assert storescu(port, files).returncode == 0
        wait_for(marker.exists, 30, "the worker to start inference")
        filler = _fill(small_disk)  # results cannot be written now
        assert shutil.disk_usage(small_disk).free < 1 << 20
        wait_for(lambda: "storage_unavailable" in (tmp_path / "node1.log").read_text(), 20,
                 "the worker to report the full disk")
        late = make_mg("L", "CC", generate_uid(), generate_uid(), 1)
        # 100 % full: pynetdicom cannot even buffer the data set (the association is aborted;
        # see the report); what matters here is that the node survives it.
        assert _send_one(port, late) != 0x0000
        time.sleep(2)
        assert node.alive()
        log = (tmp_path / "node1.log").read_text()
        assert log.count('"worker_spawned"') == 1 and "worker_exited" not in log
        assert "storage_low" in log  # the supervisor's health signal
        (job,) = store_status(small_disk)["jobs"]
        assert job["state"] == "running" and job["failures"] == 0
        shown = subprocess.run([PYTHON, "-m", "dicom_ai", "status", "--config", str(cfg)], capture_output=True,
                               text=True, timeout=60, env=node_env(), cwd=REPO)
        assert shown.returncode == 1 and "PROBLEM (disk)" in shown.stdout, shown.stdout + shown.stderr

        # Killed and started again while the disk is still full: it starts and waits.
        node.kill()
        node = start_node(cfg, port, tmp_path / "node2.log", env=node_env())
        time.sleep(2)
        assert node.alive()
        # Below node.reserve_free_mb (1 MiB here) but not 100 % full: senders get Out of Resources.
        os.truncate(filler, filler.stat().st_size - (256 << 10))
        assert _send_one(port, late) == 0xA700
        assert node.alive()

        filler.unlink()  # space is back: no manual step follows
        status = wait_delivered(small_disk, jobs=1, timeout=60)
        (job,) = status["jobs"]
        assert job["state"] == "done" and job["failures"] == 0
        expected = outbox_uids(status, job["id"])
        assert delivered_uids(tmp_path / "pacs", study_uid) == expected
        assert _stores_logged(tmp_path / "pacs") == len(expected)  # no object sent twice
        assert _send_one(port, late) == 0x0000
        wait_for(lambda: not store_status(small_disk)["notices"], 30, "the disk notice to be cleared")
    finally:
        node.stop()
        pacs.stop()
        if filler is not None:
            filler.unlink(missing_ok=True)


# -- fault 8: a delivery that cannot record its outcome -----------------------------------------

def test_a_send_the_store_cannot_record_backs_off_and_is_not_repeated(tmp_path, events):
    from dicom_ai.node.delivery import DeliveryAgent, DeliveryThread
    from dicom_ai.node.jobstore import JobStore

    class FullStore(JobStore):
        """Takes the intent, then refuses every outcome while ``full``: a disk that just filled up."""
        full = True

        def _refuse(self):
            if FullStore.full:
                raise sqlite3.OperationalError("database or disk is full")

        def mark_sent(self, *a):
            self._refuse()
            super().mark_sent(*a)

        def delivery_done(self, *a):
            self._refuse()
            super().delivery_done(*a)

        def delivery_attempt_failed(self, *a, **k):
            self._refuse()
            return super().delivery_attempt_failed(*a, **k)

    pacs, pacs_port = start_storescp(tmp_path / "pacs", "PACS")
    try:
        store, uids = _one_delivery(tmp_path, ("PACS", pacs_port), FullStore)
        thread = DeliveryThread(DeliveryAgent(_agent_config(tmp_path), store), poll_seconds=0.02)
        thread.start()
        wait_for(lambda: _stores_logged(tmp_path / "pacs") >= 1, 20, "the first C-STORE")
        time.sleep(4)  # the old code sent the first object again on every poll (112 times in 45 s)
        assert _stores_logged(tmp_path / "pacs") == 1
        held = events.named("delivery_store_unavailable")
        assert 2 <= len(held) <= 5, held  # backoff 0.5, 1, 2, 2 s
        FullStore.full = False
        wait_for(lambda: store.status()["deliveries"][0]["state"] == "done", 20, "the delivery to finish")
        thread.stopping.set()
        thread.join(15)
        assert _stores_logged(tmp_path / "pacs") == len(uids)  # each object exactly once
        assert _received_uids(tmp_path / "pacs") == uids
    finally:
        pacs.stop()


# -- fault 11: in-doubt objects after a stop between C-STORE and record ---------------------------

def test_an_object_in_doubt_is_found_by_c_find_and_not_sent_again(tmp_path, events):
    from dicom_ai.node.delivery import DeliveryAgent
    from dicom_ai.node.jobstore import JobStore

    orthanc = Orthanc(tmp_path / "orthanc", node_port=free_port())
    try:
        store, uids = _one_delivery(tmp_path, (orthanc.ae_title, orthanc.dicom), _mark_sent_fails_once())
        config = _agent_config(tmp_path)
        (d,) = store.due_deliveries()
        assert DeliveryAgent(config, store).attempt(d) == "held"  # the first object's record was lost
        # A new process (the node restarted): nothing in memory, the first object is in doubt.
        fresh = JobStore(tmp_path / "jobs.sqlite")
        (d,) = fresh.due_deliveries()
        assert d.in_doubt == {uids[0]} or len(d.in_doubt) == 1
        assert DeliveryAgent(config, fresh).attempt(d) == "done"
        confirmed = [e["sop_instance_uid"] for e in events.named("delivery_confirmed_in_doubt")]
        assert confirmed == sorted(d.in_doubt)
        sent = [e["sop_instance_uid"] for e in events.named("object_sent")]
        assert sorted(sent) == uids and not events.named("delivery_resent_in_doubt")  # each UID once on the wire
        at_orthanc = sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get("/instances?expand"))
        assert at_orthanc == uids
        assert fresh.status()["deliveries"][0]["state"] == "done"
    finally:
        orthanc.stop()


def test_an_object_in_doubt_is_resent_to_a_destination_without_c_find(tmp_path, events):
    from dicom_ai.node.delivery import DeliveryAgent
    from dicom_ai.node.jobstore import JobStore

    pacs, pacs_port = start_storescp(tmp_path / "pacs", "PACS")
    try:
        store, uids = _one_delivery(tmp_path, ("PACS", pacs_port), _mark_sent_fails_once())
        config = _agent_config(tmp_path)
        (d,) = store.due_deliveries()
        assert DeliveryAgent(config, store).attempt(d) == "held"
        fresh = JobStore(tmp_path / "jobs.sqlite")
        (d,) = fresh.due_deliveries()
        assert len(d.in_doubt) == 1
        assert DeliveryAgent(config, fresh).attempt(d) == "done"
        resent = [e["sop_instance_uid"] for e in events.named("delivery_resent_in_doubt")]
        assert resent == sorted(d.in_doubt)
        assert _stores_logged(tmp_path / "pacs") == len(uids) + 1  # only the object in doubt twice
        assert sorted(set(_received_uids(tmp_path / "pacs"))) == uids
    finally:
        pacs.stop()


# -- fault 11: kills are interruptions, not failures ---------------------------------------------

def test_a_job_interrupted_more_often_than_max_job_attempts_still_ends_done(tmp_path):
    pacs, pacs_port = start_storescp(tmp_path / "pacs", "PACS")
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", pacs_port)],
                            pipeline={"max_job_attempts": 1})
    marker = tmp_path / "inferring"
    env = node_env(DICOM_AI_TEST_INFER_SECONDS="2", DICOM_AI_TEST_INFER_MARKER=str(marker))
    node = start_node(cfg, port, tmp_path / "node1.log", env=env)
    try:
        files = write_study(tmp_path / "study")
        study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
        assert storescu(port, files).returncode == 0
        wait_for(marker.exists, 30, "the worker to start inference")
        marker.unlink()
        (worker,) = _children(node.pid)
        os.kill(worker, signal.SIGKILL)  # 1: the worker dies during the job; the node restarts it
        wait_for(marker.exists, 30, "the restarted worker to start inference")
        marker.unlink()
        node.kill()  # 2: the whole node is killed during the job
        node = start_node(cfg, port, tmp_path / "node2.log", env=env)
        status = wait_delivered(tmp_path / "storage", jobs=1, timeout=60)
        (job,) = status["jobs"]
        # The worker's death under a running node is an interruption; the node's own stop is not
        # counted at all (no study can cause it).
        assert job["state"] == "done" and job["failures"] == 0 and job["interruptions"] == 1
        assert job["attempts"] == 3
        assert delivered_uids(tmp_path / "pacs", study_uid) == outbox_uids(status, job["id"])
    finally:
        node.stop()
        pacs.stop()


# -- fault 12: a hung destination ------------------------------------------------------------------

class _HungPeer:
    """Accepts TCP connections, reads what comes, never answers (a PACS that hangs after accept)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn):
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_a_hung_destination_does_not_delay_the_others(tmp_path):
    hung = _HungPeer()
    pacs, pacs_port = start_storescp(tmp_path / "pacs", "PACS")
    port = free_port()
    # The hung peer sent the study, so its delivery comes first; the PACS is an extra destination.
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("MODALITY", hung.port)],
                            destinations=[("PACS", pacs_port)], retry={"timeout_seconds": 8.0})
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        files = write_study(tmp_path / "study")
        assert storescu(port, files, calling="MODALITY").returncode == 0
        storage = tmp_path / "storage"
        wait_for(lambda: any(j["state"] == "done" for j in store_status(storage)["jobs"]), 30, "the job")
        done_at = time.monotonic()
        wait_for(lambda: any(d["ae_title"] == "PACS" and d["state"] == "done"
                             for d in store_status(storage)["deliveries"]), 6, "the PACS's results")
        took = time.monotonic() - done_at
        print(f"PACS delivered {took:.2f} s after the job finished")
        assert took < 3.0, took
        status = store_status(storage)
        assert hung.accepted >= 1
        assert [d["state"] for d in status["deliveries"] if d["ae_title"] == "MODALITY"] == ["pending"]
        assert delivered_uids(tmp_path / "pacs") == outbox_uids(status, status["jobs"][0]["id"])
    finally:
        hung.close()
        node.stop()
        pacs.stop()


# -- fault 14: permissions ---------------------------------------------------------------------------

def test_everything_under_storage_is_private_including_files_of_an_older_version(tmp_path):
    storage = tmp_path / "storage"
    old = storage / "outbox" / "job-old"
    old.mkdir(parents=True)
    os.chmod(storage, 0o755)
    os.chmod(storage / "outbox", 0o755)
    os.chmod(old, 0o755)
    (old / "result.dcm").write_bytes(b"x")
    os.chmod(old / "result.dcm", 0o644)
    pacs, pacs_port = start_storescp(tmp_path / "pacs", "PACS")
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", storage, port, [("PACS", pacs_port)],
                            pipeline={"previews": True})
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        assert storescu(port, write_study(tmp_path / "study")).returncode == 0
        wait_delivered(storage, jobs=1)
        # The previews are drawn after the results are queued: wait for them too.
        wait_for(lambda: store_status(storage)["jobs"][0]["error"] is None, 60, "the previews")
    finally:
        node.stop()
        pacs.stop()
    assert '"storage_permissions_tightened"' in (tmp_path / "node.log").read_text()
    kinds = set()
    loose = []
    for folder, dirs, names in os.walk(storage):
        for name in dirs + names:
            path = Path(folder) / name
            mode = stat.S_IMODE(path.lstat().st_mode)
            kinds.add(path.relative_to(storage).parts[0])
            if mode & 0o077 or (path.is_dir() and mode != 0o700):
                loose.append(f"{path.relative_to(storage)} {mode:o}")
    assert stat.S_IMODE(storage.stat().st_mode) == 0o700
    assert not loose, loose
    assert {"jobs.sqlite", "spool", "outbox", "previews", "logs"} <= kinds
    assert list((storage / "previews").rglob("*.png")) and list((storage / "outbox").rglob("*.dcm"))


def test_a_disk_full_to_the_last_byte_is_out_of_resources_not_a_dropped_association(small_disk, tmp_path):
    """Fault 7, the receive itself: pynetdicom writes the arriving data set to a file; at 0 bytes
    free that write fails in its reader thread. The sender must get 0xA700 on a live association."""
    from dicom_ai.node.config import load_config
    from dicom_ai.node.jobstore import JobStore
    from dicom_ai.node.scp import StorageSCP

    cfg = load_config(None, {"node.ae_title": "AINODE", "node.port": free_port(), "node.storage": str(small_disk),
                             "node.reserve_free_mb": 0, "peers": ["PACS@127.0.0.1:1"]})
    scp = StorageSCP(cfg, JobStore(cfg.layout.jobstore))
    port = scp.start()
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.1.2.1")
        study = generate_uid()
        images = [make_mg("L", "CC", study, generate_uid(), n, shape=(512, 512)) for n in (1, 2, 3)]
        filler = _fill(small_disk)
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_established
        first = assoc.send_c_store(images[0])
        second = assoc.send_c_store(images[1])
        assert assoc.is_established, "the association was dropped instead of answered"
        for status in (first, second):
            assert int(status.Status) == 0xA700, status
            assert "storage full" in str(status.get("ErrorComment", ""))
        filler.unlink()
        assert int(assoc.send_c_store(images[2]).Status) == 0x0000
        assoc.release()
        assert not list(cfg.layout.incoming.iterdir()), "partial receives left behind"
    finally:
        scp.stop()
