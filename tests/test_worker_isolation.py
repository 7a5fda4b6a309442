"""Issue 13 faults 1-3: untrusted images in the worker, and patient data out of logs and consoles.

1. Compressed pixel data is decoded in a sandbox process: a Rust panic (pyo3
   ``PanicException``, a ``BaseException``), a crash, memory exhaustion or a decode that never
   ends costs that image only; the rest of the study is delivered and the note names the image.
2. Patient and study attributes that are invalid for their VR never fail a job: the results
   carry them emptied or left out, with a note naming the keyword.
3. No patient value reaches a console, node.log, the job store or ``dicom-ai status``:
   pydicom's warnings and log records are scrubbed, errors are stored scrubbed.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from dicom_ai.core.errors import ImagingError
from dicom_ai.node import logs
from dicom_ai.node.processing import error_text
from dicom_ai.node.sandbox import DecodeSandbox
from node_harness import (ACCESSION, PATIENT_ID, PATIENT_NAME, PYTHON, REPO, delivered_uids, free_port, make_mg,
                          node_env, received, start_node, start_storescp, store_status, storescu, wait_delivered,
                          write_node_config, write_study)

SECRETS = (PATIENT_NAME, PATIENT_ID, ACCESSION, "Secret", "19470323")


# -- hostile inputs ------------------------------------------------------------------------------

def corrupt_rle(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` as RLE Lossless with its second segment's offset pointing into the first segment,
    which makes pylibjpeg-rle 2.2 panic (index out of bounds) instead of raising."""
    ds.compress(RLELossless)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[8:12] = struct.pack("<I", 100)  # header: segment count, offset 1, offset 2, ...
    ds.PixelData = encapsulate([bytes(frame)])
    return ds


def j2k_declaring(ds: pydicom.Dataset, size: int) -> pydicom.Dataset:
    """``ds`` as JPEG 2000 whose codestream (SIZ marker, not Rows/Columns) declares size x size."""
    ds.compress(JPEG2000Lossless)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    siz = frame.find(b"\xff\x51")
    frame[siz + 6:siz + 14] = struct.pack(">II", size, size)    # Xsiz, Ysiz
    frame[siz + 22:siz + 30] = struct.pack(">II", size, size)   # XTsiz, YTsiz (one tile)
    ds.PixelData = encapsulate([bytes(frame)])
    return ds


def _mg(number: int = 1, shape=(96, 64), study: str | None = None, series: str | None = None) -> pydicom.Dataset:
    return make_mg("L", "CC", study or generate_uid(), series or generate_uid(), number, shape=shape)


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_the_corrupt_rle_panics_with_a_base_exception(tmp_path):
    """The fixture reproduces fault 1: neither `except Exception` in the worker catches it."""
    path = _save(corrupt_rle(_mg()), tmp_path / "bad.dcm")
    probe = ("import pydicom, sys\n"
             "try:\n    pydicom.dcmread(sys.argv[1]).pixel_array\n"
             "except Exception:\n    print('Exception')\n"
             "except BaseException as e:\n    print('BaseException', type(e).__name__)\n")
    out = subprocess.run([PYTHON, "-c", probe, str(path)], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "BaseException PanicException"


# -- the sandbox on its own ------------------------------------------------------------------------

def test_sandbox_contains_panic_memory_crash_and_hang(tmp_path):
    good = _save(_mg().copy(), tmp_path / "good.dcm")
    reference = pydicom.dcmread(good).pixel_array
    rle = _mg()
    rle.compress(RLELossless)
    rle_path = _save(rle, tmp_path / "rle.dcm")
    bad = _save(corrupt_rle(_mg()), tmp_path / "bad.dcm")
    bomb = _save(j2k_declaring(_mg(), 12000), tmp_path / "bomb.dcm")
    fifo = tmp_path / "never-written.dcm"
    os.mkfifo(fifo)
    storage = tmp_path / "storage"
    with DecodeSandbox(storage, 512, 3.0) as sandbox:
        # Valid RLE: decoded to native, the same array pydicom gives in the worker.
        ds = sandbox.decode(pydicom.dcmread(rle_path), rle_path)
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(ds.pixel_array, reference)
        assert sandbox.starts == 1
        # Rust panic: an ImagingError here, not a BaseException; the child is replaced.
        with pytest.raises(ImagingError, match="PanicException"):
            sandbox.decode(pydicom.dcmread(bad), bad)
        # A codestream that declares 12000 x 12000 inside a 96 x 64 image: the memory limit.
        started = time.monotonic()
        with pytest.raises(ImagingError, match="memory"):
            sandbox.decode(pydicom.dcmread(bomb), bomb)
        assert time.monotonic() - started < 10
        # A decode that never ends (the child blocks reading a FIFO): killed after 3 s.
        header = pydicom.dcmread(rle_path)
        started = time.monotonic()
        with pytest.raises(ImagingError, match="DecodeTimeout"):
            sandbox.decode(header, fifo)
        assert 2.5 < time.monotonic() - started < 8
        # A decoder that crashes (SIGSEGV while it works): reported, and the next image decodes.
        sandbox.decode(pydicom.dcmread(rle_path), rle_path)
        child = sandbox._proc.pid
        threading.Timer(0.5, os.kill, (child, signal.SIGSEGV)).start()
        with pytest.raises(ImagingError, match="SIGSEGV"):
            sandbox.decode(pydicom.dcmread(rle_path), fifo)
        assert np.array_equal(sandbox.decode(pydicom.dcmread(rle_path), rle_path).pixel_array, reference)
        scratch = sandbox.folder
        assert (os.stat(scratch).st_mode & 0o777) == 0o700
    assert not scratch.exists()


def test_sandbox_overhead_on_a_full_size_image(tmp_path, capsys):
    """Per-image cost of the sandbox on 3328 x 2560 16-bit RLE, with one child for all images."""
    ds = _mg(shape=(3328, 2560))
    ds.compress(RLELossless)
    path = _save(ds, tmp_path / "full.dcm")
    inline = []
    for _ in range(3):
        started = time.perf_counter()
        reference = pydicom.dcmread(path).pixel_array
        inline.append(time.perf_counter() - started)
    sandboxed = []
    with DecodeSandbox(tmp_path / "storage", 4096, 60) as sandbox:
        started = time.perf_counter()
        sandbox.decode(pydicom.dcmread(path), path)
        first = time.perf_counter() - started
        for _ in range(3):
            started = time.perf_counter()
            decoded = sandbox.decode(pydicom.dcmread(path), path).pixel_array
            sandboxed.append(time.perf_counter() - started)
    assert np.array_equal(decoded, reference)
    overhead_ms = (min(sandboxed) - min(inline)) * 1000
    with capsys.disabled():
        print(f"\nsandbox on 3328x2560 16-bit RLE: in-process decode {min(inline) * 1000:.0f} ms, sandboxed "
              f"{min(sandboxed) * 1000:.0f} ms (overhead {overhead_ms:.0f} ms per image); first image incl. "
              f"child start {first * 1000:.0f} ms")
    assert overhead_ms < 250


# -- the node ---------------------------------------------------------------------------------------

def _node(tmp_path: Path):
    pacs, pacs_port = start_storescp(tmp_path / "pacs")
    port = free_port()
    storage = tmp_path / "storage"
    cfg = write_node_config(tmp_path / "node.toml", storage, port, [("PACS", pacs_port)])
    node = start_node(cfg, port, tmp_path / "node.out")
    return pacs, node, port, storage, cfg


def test_a_panicking_image_is_skipped_and_the_rest_of_the_study_delivered(tmp_path):
    files = write_study(tmp_path / "study")
    bad = corrupt_rle(pydicom.dcmread(files[1]))  # compress() gives it a new SOP Instance UID
    bad_uid = str(bad.SOPInstanceUID)
    _save(bad, files[1])
    pacs, node, port, storage, _ = _node(tmp_path)
    try:
        sent = storescu(port, files, extra=["-xr"])  # propose RLE Lossless too
        assert sent.returncode == 0, sent.stdout + sent.stderr
        status = wait_delivered(storage, 1, timeout=60)
    finally:
        node.stop()
        pacs.stop()
    job = status["jobs"][0]
    assert job["state"] == "done" and job["attempts"] == 1
    assert bad_uid in job["error"] and "PanicException" in job["error"]
    segs = [ds for ds in received(tmp_path / "pacs") if ds.Modality == "SEG"]
    refs = {str(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID) for ds in segs}
    assert len(segs) == 3 and bad_uid not in refs
    assert len(delivered_uids(tmp_path / "pacs")) == 7  # three SEGs, their three GSPS and the SR
    log = (storage / "logs" / "node.log").read_text()
    assert log.count('"event": "worker_started"') == 1, "the worker must not have died"
    assert any(json.loads(line).get("event") == "image_skipped" and json.loads(line).get("sop_instance_uid") == bad_uid
               for line in log.splitlines())


def _hostile_study(folder: Path) -> list[Path]:
    """Four views with invalid PN/LO/SH/DA values carrying the harness's secrets, one DA with a wrong VR."""
    files = write_study(folder)
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME + "^" + "X" * 70           # PN component over 64
        ds.PatientID = PATIENT_ID * 5                             # LO over 64
        ds.AccessionNumber = ACCESSION + "-TOO-LONG"              # SH over 16
        if i == 2:
            ds.add(DataElement(0x00100030, "US", [19470, 323]))  # Patient's Birth Date with VR US
        else:
            ds.PatientBirthDate = "19470323XX"
        ds.OtherPatientIDs = [PATIENT_ID] * 2
        ds.save_as(path, enforce_file_format=True)
    return files


def _assert_clean(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} appears in {where}"


def test_invalid_patient_attributes_do_not_fail_the_job_nor_reach_any_log(tmp_path):
    files = _hostile_study(tmp_path / "study")
    pacs, node, port, storage, cfg = _node(tmp_path)
    try:
        sent = storescu(port, files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        status = wait_delivered(storage, 1, timeout=60)
    finally:
        node.stop()
        pacs.stop()
    job = status["jobs"][0]
    assert job["state"] == "done" and job["attempts"] == 1, job["error"]
    assert "PatientBirthDate" in job["error"] and "PatientName" in job["error"]
    results = [pydicom.dcmread(p) for p in sorted((tmp_path / "pacs").glob("*.dcm"))]
    results = [ds for ds in results if ds.Modality != "MG"]
    assert len(results) == 9  # four SEGs, their four GSPS and the SR
    assert {ds.get("PatientBirthDate") for ds in results} == {""}
    assert len({(str(ds.PatientName), ds.PatientID, ds.AccessionNumber) for ds in results}) == 1
    shown = subprocess.run([PYTHON, "-m", "dicom_ai", "status", "--config", str(cfg)], capture_output=True,
                           text=True, timeout=60, env=node_env(), cwd=REPO)
    shown_json = subprocess.run([PYTHON, "-m", "dicom_ai", "status", "--json", "--config", str(cfg)],
                                capture_output=True, text=True, timeout=60, env=node_env(), cwd=REPO)
    _assert_clean(shown.stdout + shown.stderr + shown_json.stdout + shown_json.stderr, "dicom-ai status")
    _assert_clean((tmp_path / "node.out").read_text(errors="replace"), "the node's stdout/stderr")
    _assert_clean((storage / "logs" / "node.log").read_text(errors="replace"), "node.log")
    store = store_status(storage)
    _assert_clean(json.dumps({t: store[t] for t in ("jobs", "deliveries", "notices", "studies")}, default=str),
                  "the job store")


def test_every_node_process_logs_pydicom_warnings_scrubbed(tmp_path):
    """What logs.configure sets up in the node, the worker (and the CLI): pydicom's warnings and
    its logger's records become events that name the attribute, never the value."""
    path = _save(next(iter([_mg()])), tmp_path / "img.dcm")
    ds = pydicom.dcmread(path)
    ds.PatientBirthDate, ds.PatientID = "19470323XX", PATIENT_ID * 5
    ds.save_as(path, enforce_file_format=True)
    script = ("import logging, sys, pydicom\n"
              "from pathlib import Path\n"
              "from dicom_ai.node import logs\n"
              "logs.configure('worker', 'INFO', Path(sys.argv[2]))\n"
              "ds = pydicom.dcmread(sys.argv[1])\n"
              "ds.PatientBirthDate, ds.PatientID\n"          # raw values converted: pydicom warns
              f"logging.getLogger('pydicom').warning('bad value %r in (0010,0020) PatientID', {PATIENT_ID!r})\n"
              f"logging.getLogger('highdicom.seg').error('copy %s', {PATIENT_NAME!r})\n")
    log = tmp_path / "node.log"
    run = subprocess.run([PYTHON, "-c", script, str(path), str(log)], capture_output=True, text=True, timeout=60,
                         env=node_env(), cwd=REPO)
    assert run.returncode == 0, run.stderr
    _assert_clean(run.stdout + run.stderr, "the process's stdout/stderr")
    _assert_clean(log.read_text(), "node.log")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    warned = [e for e in events if e["event"] == "warning"]
    assert warned and {e["module"] for e in warned} == {"pydicom.valuerep"}
    assert any("PatientBirthDate" in e["attributes"] or "LO" in e["attributes"] or e["attributes"] == ""
               for e in warned)
    library = [e for e in events if e["event"] == "library_log"]
    assert {e["logger"] for e in library} >= {"pydicom", "highdicom.seg"}
    assert any(e["attributes"] == "(0010,0020),PatientID" for e in library)


def test_dicom_ai_infer_prints_no_patient_value(tmp_path):
    files = _hostile_study(tmp_path / "study")
    cfg = tmp_path / "infer.toml"
    cfg.write_text('[pipeline]\nfactory = "node_harness:stand_in_pipeline"\ndevice = "cpu"\npreviews = false\n')
    run = subprocess.run([PYTHON, "-m", "dicom_ai", "infer", *map(str, files), "--out", str(tmp_path / "out"),
                          "--config", str(cfg)], capture_output=True, text=True, timeout=120, env=node_env(),
                         cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    _assert_clean(run.stdout + run.stderr, "dicom-ai infer's output")
    assert '"event": "library_log"' in run.stderr  # pydicom's complaints, scrubbed
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 9  # four SEGs, four GSPS, the SR


# -- the scrubbing itself --------------------------------------------------------------------------

@pytest.mark.parametrize("message", [
    f"Invalid value for VR DA: '19470323XX'.",
    f"Unable to convert '19470323XX' to 'DA' object",
    f"The value length (80) exceeds the maximum length of 64 allowed for VR LO: {PATIENT_ID * 5}",
    f"Expected (0010, 0010) PatientName, got {PATIENT_NAME} and b'{ACCESSION}' [19470, 323]",
])
def test_scrub_keeps_what_and_drops_values(message):
    text = logs.scrub(message)
    _assert_clean(text, "the scrubbed text")
    assert "[19470" not in text and "19470" not in text
    if "(0010, 0010)" in message:
        assert "(0010,0010) PatientName" in text


def test_error_text_names_the_type_and_keeps_uids():
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    text = error_text(ValueError(f"image {uid} has PatientBirthDate '19470323XX'"))
    assert text == f"ValueError: image {uid} has PatientBirthDate …"
