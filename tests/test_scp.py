"""The Storage SCP against dcmtk's echoscu/storescu: negotiation, statuses, durability, transfer syntaxes.

The SCP runs inside the test process here (no worker) so each case is fast; the whole node
as a separate process is exercised in test_node*.py.
"""

from __future__ import annotations

import errno
import subprocess
import tempfile

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless, JPEGLSNearLossless, RLELossless, generate_uid
from pynetdicom import _config, transport

from dicom_ai.node.config import load_config
from dicom_ai.node.jobstore import JobStore
from dicom_ai.node.scp import SUPPORTED_SOP_CLASSES, SUPPORTED_TRANSFER_SYNTAXES, StorageSCP
from node_harness import ACCESSION, PATIENT_ID, PATIENT_NAME, free_port, make_mg, storescu, write_study


@pytest.fixture
def scp(tmp_path):
    """An in-process SCP (AE AINODE) accepting PACS; restores the process-wide settings it changes."""
    saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv)
    port = free_port()
    cfg = load_config(None, {"node.ae_title": "AINODE", "node.port": port, "node.storage": str(tmp_path / "st"),
                             "node.reserve_free_mb": 1, "peers": ["PACS@127.0.0.1:1"]})
    store = JobStore(cfg.storage_dir / "jobs.sqlite")
    server = StorageSCP(cfg, store)
    server.start()
    yield server
    server.stop()
    tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv = saved


def _responses(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split("Received Store Response", 1)[1].strip() for line in result.stderr.splitlines()
            if "Received Store Response" in line]


def echoscu(port, calling="PACS", called="AINODE"):
    return subprocess.run(["echoscu", "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def test_constants_match_what_is_negotiated():
    assert set(SUPPORTED_SOP_CLASSES) == {"1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1"}
    assert len(SUPPORTED_TRANSFER_SYNTAXES) == 9
    assert "1.2.840.10008.1.2.2" not in SUPPORTED_TRANSFER_SYNTAXES  # big endian is not claimed


def test_echo_and_association_policy(scp):
    ok = echoscu(scp.port)
    assert ok.returncode == 0, ok.stderr
    assert "Received Echo Response (Success)" in ok.stderr
    stranger = echoscu(scp.port, calling="STRANGER")
    assert stranger.returncode != 0
    assert "Calling AE Title Not Recognized" in stranger.stderr, stranger.stderr
    wrong_called = echoscu(scp.port, called="NOTME")
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stderr, wrong_called.stderr
    assert echoscu(scp.port).returncode == 0  # still serving


def test_store_is_durable_and_recorded(scp, tmp_path):
    files = write_study(tmp_path / "in")
    result = storescu(scp.port, files)
    assert result.returncode == 0, result.stderr
    assert _responses(result) == ["(Success)"] * 4
    spool = sorted((scp.spool).rglob("*.dcm"))
    assert len(spool) == 4
    assert not list(scp.incoming.iterdir())  # nothing left half-written
    for src in files:
        ds = pydicom.dcmread(src)
        kept = pydicom.dcmread(scp.spool / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm")
        assert np.array_equal(kept.pixel_array, ds.pixel_array)
        assert scp.store.find_instance(ds.SOPInstanceUID)
    status = scp.store.status()
    assert [(s["calling_ae"], s["instances"], s["state"]) for s in status["studies"]] == [("PACS", 4, "open")]


def test_repeated_instance_is_success_without_new_work(scp, tmp_path):
    files = write_study(tmp_path / "in", views=[("L", "CC")])
    assert storescu(scp.port, files).returncode == 0
    again = storescu(scp.port, files)
    assert _responses(again) == ["(Success)"]
    assert len(list(scp.spool.rglob("*.dcm"))) == 1
    assert scp.store.status()["studies"][0]["instances"] == 1


def test_unsupported_sop_class_is_refused_at_negotiation(scp, tmp_path):
    ds = make_mg("L", "CC", generate_uid(), generate_uid(), 1)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ds.Modality = "CT"
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = storescu(scp.port, [path], extra=["-R"])
    assert result.returncode != 0
    assert "No presentation context" in result.stderr or "No Acceptable Presentation Contexts" in result.stderr, \
        result.stderr
    assert not list(scp.spool.rglob("*.dcm"))


def test_broken_data_sets_get_failure_statuses_and_the_scp_keeps_serving(scp, tmp_path):
    study, series = generate_uid(), generate_uid()
    no_pixels = make_mg("L", "CC", study, series, 1)
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    truncated = make_mg("L", "MLO", study, series, 2)
    truncated.PixelData = truncated.PixelData[:1000]
    truncated.save_as(tmp_path / "short.dcm", enforce_file_format=True)
    not_mg = make_mg("R", "CC", study, series, 3)
    not_mg.Modality = "CT"
    not_mg.save_as(tmp_path / "notmg.dcm", enforce_file_format=True)
    traversal = make_mg("R", "CC", "../../../escape", series, 5)
    traversal.save_as(tmp_path / "traversal.dcm", enforce_file_format=True)
    good = make_mg("R", "MLO", study, series, 4)
    good.save_as(tmp_path / "good.dcm", enforce_file_format=True)
    names = ("nopix.dcm", "short.dcm", "notmg.dcm", "traversal.dcm", "good.dcm")
    result = storescu(scp.port, [tmp_path / n for n in names], extra=["--no-halt"])
    statuses = _responses(result)
    assert len(statuses) == 5, result.stderr
    assert statuses[:4] == ["(Error: DataSetDoesNotMatchSOPClass)", "(Error: CannotUnderstand)",
                            "(Error: DataSetDoesNotMatchSOPClass)", "(Error: DataSetDoesNotMatchSOPClass)"]
    assert statuses[4] == "(Success)"
    assert not (scp.storage.parent / "escape").exists()
    assert [p.stem for p in scp.spool.rglob("*.dcm")] == [str(good.SOPInstanceUID)]
    assert echoscu(scp.port).returncode == 0


def test_garbage_after_a_valid_header_is_cannot_understand(scp, tmp_path):
    ds = make_mg("L", "CC", generate_uid(), generate_uid(), 1)
    ds.compress(JPEG2000Lossless)
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * len(frame)])
    ds.save_as(tmp_path / "bad-j2k.dcm", enforce_file_format=True)
    result = storescu(scp.port, [tmp_path / "bad-j2k.dcm"], extra=["-R", "-xv"])
    assert _responses(result) == ["(Error: CannotUnderstand)"], result.stderr


def test_out_of_resources_below_reserve_and_on_disk_full(scp, tmp_path, monkeypatch):
    files = write_study(tmp_path / "in", views=[("L", "CC"), ("R", "CC")])
    scp.config.node.reserve_free_mb = 10**9  # more than any disk has
    refused = storescu(scp.port, files[:1])
    assert _responses(refused) == ["(Refused: OutOfResources)"], refused.stderr
    scp.config.node.reserve_free_mb = 1

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dicom_ai.node.scp.os.rename", full)
    refused = storescu(scp.port, files[1:])
    assert _responses(refused) == ["(Refused: OutOfResources)"], refused.stderr
    assert not list(scp.spool.rglob("*.dcm"))
    assert not scp.store.find_instance(pydicom.dcmread(files[1]).SOPInstanceUID)


def _encode(ds: pydicom.Dataset, ts: str, tmp_path) -> pydicom.Dataset:
    """The data set in transfer syntax ``ts`` (pydicom encoders, dcmtk for the rest)."""
    if ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        ds.file_meta.TransferSyntaxUID = ts
        return ds
    if ts in (JPEG2000Lossless, JPEGLSLossless, RLELossless):
        ds.compress(ts)
        return ds
    if ts == JPEG2000:
        ds.compress(ts, j2k_psnr=[60])
        return ds
    if ts == JPEGLSNearLossless:
        ds.compress(ts, jls_error=2)
        return ds
    src = tmp_path / "src.dcm"
    ds.save_as(src, enforce_file_format=True)
    dst = tmp_path / "dst.dcm"
    tool = {"1.2.840.10008.1.2.4.70": ["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.1.99": ["dcmconv", "+td"]}[ts]
    subprocess.run([*tool, str(src), str(dst)], check=True, capture_output=True)
    return pydicom.dcmread(dst)


#: storescu's option that proposes each transfer syntax (with the uncompressed ones).
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr",
}


def test_every_claimed_transfer_syntax_is_accepted_and_decodes(scp, tmp_path):
    assert set(STORESCU_PROPOSE) == set(SUPPORTED_TRANSFER_SYNTAXES)
    study, series = generate_uid(), generate_uid()
    for i, ts in enumerate(SUPPORTED_TRANSFER_SYNTAXES, start=1):
        ds = make_mg("L", "CC", study, series, i)
        pixels = ds.pixel_array.astype(int)
        enc = _encode(ds, ts, tmp_path)
        assert enc.file_meta.TransferSyntaxUID == ts
        path = tmp_path / f"ts-{i}.dcm"
        enc.save_as(path, enforce_file_format=True)
        result = storescu(scp.port, [path], extra=["-R", STORESCU_PROPOSE[ts]])
        assert _responses(result) == ["(Success)"], (ts, result.stderr)
        kept = pydicom.dcmread(scp.spool / study / f"{ds.SOPInstanceUID}.dcm")
        assert kept.file_meta.TransferSyntaxUID == ts  # negotiated and stored as sent
        error = np.abs(kept.pixel_array.astype(int) - pixels)
        if ts in ("1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91"):  # lossy: close, not equal
            assert error.max() <= 2 if ts.endswith(".81") else error.mean() < 20, (ts, error.max(), error.mean())
        else:
            assert error.max() == 0, ts


def test_log_has_no_patient_data(scp, tmp_path, capfd):
    from dicom_ai.node import logs

    log = tmp_path / "scp.log"
    logs.configure("scp", "INFO", log)
    try:
        files = write_study(tmp_path / "in", views=[("L", "CC")])
        assert storescu(scp.port, files).returncode == 0
    finally:
        logs.configure("node", "INFO", None)
    text = log.read_text()
    assert "instance_received" in text
    for secret in (PATIENT_NAME, PATIENT_ID, ACCESSION, "19600101", "Secret"):
        assert secret not in text


def test_any_caller_is_accepted_only_when_configured(tmp_path):
    saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv)
    port = free_port()
    cfg = load_config(None, {"node.ae_title": "AINODE", "node.port": port, "node.storage": str(tmp_path / "st"),
                             "node.reserve_free_mb": 1, "node.allow_any_caller": True})
    server = StorageSCP(cfg, JobStore(cfg.storage_dir / "jobs.sqlite"))
    server.start()
    try:
        assert echoscu(port, calling="ANYBODY").returncode == 0
        files = write_study(tmp_path / "in", views=[("R", "CC")])
        assert _responses(storescu(port, files, calling="MODALITY7")) == ["(Success)"]
        assert server.store.status()["studies"][0]["calling_ae"] == "MODALITY7"
    finally:
        server.stop()
        tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv = saved
