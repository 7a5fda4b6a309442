"""The Storage SCP against dcmtk's echoscu/storescu: negotiation, statuses, durability, transfer syntaxes.

The SCP runs inside the test process here (no worker) so each case is fast; the whole node
as a separate process is exercised in test_node*.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless, JPEGLSNearLossless, RLELossless, generate_uid
from pynetdicom import _config, dimse_messages, transport
from pynetdicom.status import STATUS_FAILURE, STATUS_SUCCESS, STORAGE_SERVICE_CLASS_STATUS

from dicom_ai.core.errors import ConfigError
from dicom_ai.node import admission as scp_module, logs, transport as transport_module
from dicom_ai.node.config import load_config
from dicom_ai.node.jobstore import JobStore
from dicom_ai.node.scp import SUPPORTED_SOP_CLASSES, SUPPORTED_TRANSFER_SYNTAXES, StorageSCP
from node_harness import ACCESSION, PATIENT_ID, PATIENT_NAME, free_port, make_mg, storescu, write_study


@pytest.fixture
def scp(tmp_path):
    """An in-process SCP (AE AINODE) accepting PACS; restores the process-wide settings it changes."""
    saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv)
    saved_tempfile = dimse_messages.NamedTemporaryFile
    port = free_port()
    cfg = load_config(None, {"node.ae_title": "AINODE", "node.port": port, "node.storage": str(tmp_path / "st"),
                             "node.reserve_free_mb": 1, "peers": ["PACS@127.0.0.1:1"]})
    store = JobStore(cfg.layout.jobstore)
    server = StorageSCP(cfg, store)
    server.start()
    yield server
    server.stop()
    tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv = saved
    dimse_messages.NamedTemporaryFile = saved_tempfile


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
    saved_tempfile = dimse_messages.NamedTemporaryFile
    port = free_port()
    cfg = load_config(None, {"node.ae_title": "AINODE", "node.port": port, "node.storage": str(tmp_path / "st"),
                             "node.reserve_free_mb": 1, "node.allow_any_caller": True})
    server = StorageSCP(cfg, JobStore(cfg.layout.jobstore))
    server.start()
    try:
        assert echoscu(port, calling="ANYBODY").returncode == 0
        files = write_study(tmp_path / "in", views=[("R", "CC")])
        assert _responses(storescu(port, files, calling="MODALITY7")) == ["(Success)"]
        assert server.store.status()["studies"][0]["calling_ae"] == "MODALITY7"
    finally:
        server.stop()
        tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv = saved
        dimse_messages.NamedTemporaryFile = saved_tempfile


# -- statuses, process-wide state, configuration errors -------------------------------------


def test_failure_statuses_are_the_storage_service_class_codes():
    """The node's named codes mean in pynetdicom's PS3.4 B.2.3 table what the node says they mean."""
    assert scp_module.SUCCESS == 0 and STORAGE_SERVICE_CLASS_STATUS[scp_module.SUCCESS][0] == STATUS_SUCCESS
    for code, meaning in ((scp_module.OUT_OF_RESOURCES, "Refused: Out of Resources"),
                          (scp_module.DOES_NOT_MATCH_SOP_CLASS, "Data Set Does Not Match SOP Class"),
                          (scp_module.CANNOT_UNDERSTAND, "Cannot Understand")):
        assert STORAGE_SERVICE_CLASS_STATUS[code] == (STATUS_FAILURE, meaning), hex(code)


def test_starting_the_scp_leaves_the_process_tempdir_and_sockets_alone(tmp_path, monkeypatch):
    """Only pynetdicom's receive path is redirected; received files go through <storage>/incoming."""
    before = (tempfile.tempdir, tempfile.gettempdir(), transport.AssociationSocket.recv)
    saved = (_config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile)
    cfg = load_config(None, {"node.ae_title": "AINODE", "node.port": free_port(), "node.storage": str(tmp_path / "st"),
                             "node.reserve_free_mb": 1, "peers": ["PACS@127.0.0.1:1"]})
    server = StorageSCP(cfg, JobStore(cfg.layout.jobstore))
    renamed, reads = [], []
    real_rename, read_pdu = os.rename, transport_module._ReceiveSocket.read_pdu
    monkeypatch.setattr("dicom_ai.node.scp.os.rename", lambda src, dst: (renamed.append(Path(src)),
                                                                          real_rename(src, dst))[1])
    monkeypatch.setattr(transport_module._ReceiveSocket, "read_pdu", lambda self: (lambda pdu: (reads.append(len(pdu)),
                                                                                                pdu)[1])(read_pdu(self)))
    server.start()
    try:
        assert (tempfile.tempdir, tempfile.gettempdir(), transport.AssociationSocket.recv) == before
        files = write_study(tmp_path / "in", views=[("L", "CC")])
        assert _responses(storescu(server.port, files)) == ["(Success)"]
        assert [p.parent for p in renamed] == [cfg.layout.incoming]  # streamed into storage: a rename, no copy
        assert reads and sum(reads) > files[0].stat().st_size  # the SCP's PDUs are read by _ReceiveSocket
        assert (tempfile.tempdir, tempfile.gettempdir(), transport.AssociationSocket.recv) == before
        with tempfile.NamedTemporaryFile() as f:  # the process's other temporary files: where they were
            assert Path(f.name).parent == Path(before[1])
    finally:
        server.stop()
        _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile = saved


def test_install_receive_path_is_idempotent_and_repoints(tmp_path):
    saved = (_config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile)
    try:
        for folder in (tmp_path / "a", tmp_path / "a", tmp_path / "b"):
            folder.mkdir(exist_ok=True)
            transport_module.install_receive_path(folder)
            with dimse_messages.NamedTemporaryFile(mode="wb", suffix=".dcm") as f:
                assert Path(f.name).parent == folder
        assert _config.STORE_RECV_CHUNKED_DATASET is True
    finally:
        _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile = saved


def test_no_peers_without_allow_any_caller_is_a_configuration_error(tmp_path):
    saved = (_config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile)
    cfg = load_config(None, {"node.ae_title": "AINODE", "node.port": free_port(), "node.storage": str(tmp_path / "st")})
    try:
        with pytest.raises(ConfigError, match="no peers are configured"):
            StorageSCP(cfg, JobStore(cfg.layout.jobstore)).start()
        # Refused before anything process-wide was changed.
        assert (_config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile) == saved
    finally:
        _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile = saved


# -- the JSON log lines through the logging machinery ----------------------------------------

_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def log_file(tmp_path):
    path = tmp_path / "logs" / "node.log"
    yield path
    logs.configure("node", "INFO", None)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_log_line_shape(log_file):
    import io

    stream = io.StringIO()
    logs.configure("scp", "INFO", log_file, stream=stream)
    uid = pydicom.uid.UID("1.2.3.4")
    logs.event("instance_received", calling_ae="PACS", sop_instance_uid=uid, bytes=17, seconds=0.25, ok=True,
               retry_in_s=None, path=Path("/x/y.dcm"), note="ünïcode")
    logs.event("hidden", level="DEBUG", x=1)  # below the configured level
    (line,) = _lines(log_file)
    assert list(line)[:5] == ["ts", "level", "proc", "pid", "event"]
    assert _TS.fullmatch(line["ts"]), line["ts"]
    assert line == {"ts": line["ts"], "level": "INFO", "proc": "scp", "pid": os.getpid(), "event": "instance_received",
                    "calling_ae": "PACS", "sop_instance_uid": "1.2.3.4", "bytes": 17, "seconds": 0.25, "ok": True,
                    "retry_in_s": None, "path": "/x/y.dcm", "note": "ünïcode"}
    assert stream.getvalue().splitlines() == log_file.read_text(encoding="utf-8").splitlines()  # same line on stderr
    assert "ünïcode" in log_file.read_text(encoding="utf-8")  # not \u-escaped
    logs.event("warned", level="WARNING", n=1)
    assert [(x["event"], x["level"]) for x in _lines(log_file)] == [("instance_received", "INFO"),
                                                                     ("warned", "WARNING")]


def test_patient_fields_never_reach_the_file(log_file):
    logs.configure("scp", "DEBUG", log_file, stream=None)
    logs.event("instance_received", PatientName="Secret^Name", PatientID="PID-1", patient_name="x", birth_date="1960",
               AccessionNumber="ACC-1", sop_instance_uid="1.2.3")
    # The filter sits on the handlers: a record that reaches them another way is cleaned too.
    logging.getLogger(logs.EVENT_LOGGER).info("direct", extra={"event_fields": {"PatientID": "PID-2", "n": 1}})
    text = log_file.read_text(encoding="utf-8")
    for secret in ("Secret^Name", "PID-1", "PID-2", "ACC-1", "1960", "PatientName", "PatientID"):
        assert secret not in text
    assert [(x["event"], x.get("sop_instance_uid"), x.get("n")) for x in _lines(log_file)] == [
        ("instance_received", "1.2.3", None), ("direct", None, 1)]
    # The formatter on its own drops them as well.
    record = logging.LogRecord(logs.EVENT_LOGGER, logging.INFO, __file__, 1, "e", None, None)
    record.event_fields = {"PatientName": "Secret^Name", "k": "v"}
    assert "Secret" not in logs.JsonFormatter("scp").format(record)


def test_pynetdicom_warnings_are_json_lines_and_its_debug_is_not_written(log_file):
    logs.configure("scp", "DEBUG", log_file, stream=None)
    logging.getLogger("pynetdicom.assoc").warning("peer %s went away", "PACS")
    logging.getLogger("pynetdicom.dul").error("bad PDU")
    logging.getLogger("pynetdicom.dsutils").info("a data set summary")  # pynetdicom stays at WARNING
    logging.getLogger("pynetdicom.dsutils").debug("(0010,0010) PN Secret^Name")
    lines = _lines(log_file)
    assert [(x["event"], x["level"], x["message"]) for x in lines] == [
        ("pynetdicom", "WARNING", "peer PACS went away"), ("pynetdicom", "ERROR", "bad PDU")]
    assert all(x["proc"] == "scp" and _TS.fullmatch(x["ts"]) and x["pid"] == os.getpid() for x in lines)
    logs.configure("scp", "ERROR", log_file, stream=None)  # the node's level applies to pynetdicom too
    logging.getLogger("pynetdicom.assoc").warning("dropped")
    assert len(_lines(log_file)) == 2


def test_reconfiguring_replaces_the_sinks(log_file, tmp_path):
    logs.configure("node", "INFO", log_file, stream=None)
    logs.event("first")
    other = tmp_path / "other.log"
    logs.configure("worker", "INFO", other, stream=None)
    logs.event("second")
    assert [x["event"] for x in _lines(log_file)] == ["first"]
    assert [(x["event"], x["proc"]) for x in _lines(other)] == [("second", "worker")]
    assert len(logging.getLogger(logs.EVENT_LOGGER).handlers) == 1
    assert logging.getLogger("pynetdicom").handlers == logging.getLogger(logs.EVENT_LOGGER).handlers
