"""What the Storage SCP accepts as a C-STORE (issue 13, faults 6, 9, 10, 13 and the empty UID).

Every case sends real C-STOREs on loopback to an in-process SCP, with pynetdicom as the SCU
streaming the file from disk as it is (``STORE_SEND_CHUNKED_DATASET``), so truncated and
otherwise broken files reach the node byte for byte. Each test checks the status and Error
Comment, that nothing is left in ``spool/`` or ``incoming/`` that the job store does not
record, and that a valid image sent afterwards is Success.
"""

from __future__ import annotations

import errno
import io
import json
import sqlite3
import struct
import tempfile
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000,
                         JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid)
from pynetdicom import AE, _config, dimse_messages, transport
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicom_ai.core.views import laterality_of, view_of
from dicom_ai.node import logs
from dicom_ai.node.admission import CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS, OUT_OF_RESOURCES, PROCESSING_FAILURE
from dicom_ai.node.config import load_config
from dicom_ai.node.jobstore import JobStore
from dicom_ai.node.scp import SUPPORTED_SOP_CLASSES, StorageSCP
from node_harness import free_port, make_mg

SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEG2000Lossless,
            JPEG2000, JPEGLSLossless, RLELossless]


class Node:
    """An in-process SCP on a free port; restores the process-wide pynetdicom settings."""

    def __init__(self, storage: Path, **overrides):
        self._saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv,
                       dimse_messages.NamedTemporaryFile)
        self.port = free_port()
        self.config = load_config(None, {"node.ae_title": "AINODE", "node.port": self.port,
                                         "node.storage": str(storage), "node.reserve_free_mb": 1,
                                         "peers": ["PACS@127.0.0.1:1"], **overrides})
        self.store = JobStore(self.config.layout.jobstore)
        self.scp = StorageSCP(self.config, self.store)
        self.scp.start()

    def stop(self) -> None:
        self.scp.stop()
        (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, transport.AssociationSocket.recv,
         dimse_messages.NamedTemporaryFile) = self._saved

    def spooled(self) -> list[Path]:
        return sorted(self.config.layout.spool.rglob("*.dcm"))

    def assert_clean(self, recorded: list[str]) -> None:
        """Exactly ``recorded`` are in the spool, each with its instance row; incoming is empty."""
        assert sorted(p.stem for p in self.spooled()) == sorted(recorded)
        assert all(self.store.find_instance(uid) for uid in recorded)
        assert not list(self.config.layout.incoming.iterdir())


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path / "st", **{"limits.max_dataset_mb": 64})
    yield n
    n.stop()


def send(port: int, paths: list[Path]) -> list[tuple[int, str]]:
    """C-STORE each file as it is on disk; returns (status, Error Comment) per file."""
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE("PACS")
    ae.dimse_timeout = ae.network_timeout = 30
    for uid in SUPPORTED_SOP_CLASSES:
        for ts in SYNTAXES:  # one context each: the SCP accepts one transfer syntax per context
            ae.add_requested_context(uid, ts)
    out = []
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_established
        for path in paths:
            rsp = assoc.send_c_store(path)
            assert rsp is not None and "Status" in rsp, f"no response to {path.name}"
            out.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
    return out


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def good(folder: Path, n: int = 99) -> tuple[Path, str]:
    ds = make_mg("R", "MLO", generate_uid(), generate_uid(), n)
    return save(ds, folder / f"good-{n}.dcm"), str(ds.SOPInstanceUID)


# -- fault 6: the deflate bomb ---------------------------------------------------------------


def _deflate_bomb(path: Path, inflated_mib: int) -> str:
    """A valid MG header, a private OB of ``inflated_mib`` MiB of zeros, the image; Deflated.

    Written as it is compressed, so the test process never holds the inflated bytes.
    """
    ds = make_mg("L", "CC", generate_uid(), generate_uid(), 1)
    pixels = ds.PixelData
    del ds.PixelData
    ds.add_new(0x7FD10010, "LO", "BOMB")
    body = encode(ds, False, True)  # Explicit VR Little Endian
    meta = ds.file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb_len = inflated_mib * 2**20
    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        f.write(z.compress(body))
        f.write(z.compress(struct.pack("<HH2sHI", 0x7FD1, 0x1000, b"OB", 0, bomb_len)))
        zeros = bytes(2**20)
        for _ in range(inflated_mib):
            f.write(z.compress(zeros))
        f.write(z.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(pixels)) + pixels))
        f.write(z.flush())
    return str(ds.SOPInstanceUID)


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


def test_deflate_bomb_is_refused_and_the_receiver_stays_small(node, tmp_path):
    bomb = tmp_path / "bomb.dcm"
    _deflate_bomb(bomb, 1024)
    assert bomb.stat().st_size < 2 * 2**20  # ~1 MiB on the wire, 1 GiB inflated
    try:  # reset the peak (Linux >= 4.0) so VmHWM measures this store only
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset VmHWM here: {exc}")
    base = _kib("VmRSS")
    assert _kib("VmHWM") < base + 8 * 1024
    ((status, comment),) = send(node.port, [bomb])
    growth_mib = (_kib("VmHWM") - base) / 1024
    assert (status, comment) == (DOES_NOT_MATCH_SOP_CLASS, "inflated data set over limits.max_dataset_mb (64 MiB)")
    # The receiver inflated 64 MiB in 1 MiB pieces to disk; the unbounded inflate held 1 GiB.
    assert growth_mib < 48, f"receiving process grew by {growth_mib:.0f} MiB"
    print(f"deflate bomb: peak RSS growth {growth_mib:.1f} MiB")
    node.assert_clean([])
    path, uid = good(tmp_path)
    assert send(node.port, [path]) == [(0, "")]
    node.assert_clean([uid])


def test_deflated_streams_and_sizes_within_and_beyond_the_bound(tmp_path):
    n = Node(tmp_path / "st", **{"limits.max_dataset_mb": 1})
    try:
        small = tmp_path / "small.dcm"
        small_uid = _deflate_bomb(small, 0)  # a valid deflated image
        over = tmp_path / "over.dcm"
        _deflate_bomb(over, 2)
        cut = tmp_path / "cut.dcm"
        _deflate_bomb(cut, 0)
        cut.write_bytes(cut.read_bytes()[:-200])
        garbage = tmp_path / "garbage.dcm"
        _deflate_bomb(garbage, 0)
        data = garbage.read_bytes()
        garbage.write_bytes(data[:400] + bytes(b ^ 0x5A for b in data[400:600]) + data[600:])
        big = make_mg("R", "CC", generate_uid(), generate_uid(), 2)
        big.add_new(0x7FD10010, "LO", "BIG")
        big.add_new(0x7FD11000, "OB", bytes(2 * 2**20))
        big_native = save(big, tmp_path / "big.dcm")
        got = send(n.port, [small, over, cut, garbage, big_native])
        assert got[0] == (0, "")
        assert got[1] == (DOES_NOT_MATCH_SOP_CLASS, "inflated data set over limits.max_dataset_mb (1 MiB)")
        assert got[2][0] == CANNOT_UNDERSTAND and "cut off" in got[2][1], got[2]
        assert got[3][0] == CANNOT_UNDERSTAND, got[3]
        assert got[4] == (DOES_NOT_MATCH_SOP_CLASS, "data set over limits.max_dataset_mb (1 MiB)")
        n.assert_clean([small_uid])
        kept = pydicom.dcmread(n.spooled()[0])
        assert kept.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian  # stored as received
    finally:
        n.stop()


# -- fault 9: cut-off and incomplete files ------------------------------------------------------


def _cut(src: Path, dst: Path, keep: int) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    return dst


def test_cut_off_or_incomplete_files_are_cannot_understand(node, tmp_path):
    native = save(make_mg("L", "CC", generate_uid(), generate_uid(), 1), tmp_path / "native.dcm")
    j2k_ds = make_mg("L", "MLO", generate_uid(), generate_uid(), 2)
    j2k_ds.compress(JPEG2000Lossless)
    j2k = save(j2k_ds, tmp_path / "j2k.dcm")
    size = native.stat().st_size
    header_end = size - 96 * 64 * 2 - 12  # where Pixel Data's element header starts
    empty_frames = make_mg("R", "CC", generate_uid(), generate_uid(), 3)
    empty_frames.compress(RLELossless)
    empty_frames.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    implicit = make_mg("R", "MLO", generate_uid(), generate_uid(), 4)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit_path = save(implicit, tmp_path / "implicit.dcm")
    cases = {
        "inside Pixel Data": _cut(native, tmp_path / "c1.dcm", -1000),
        "one byte short": _cut(native, tmp_path / "c2.dcm", -1),
        "inside the header": _cut(native, tmp_path / "c3.dcm", header_end - 40),
        "inside an element header": _cut(native, tmp_path / "c4.dcm", header_end + 5),
        "inside a fragment": _cut(j2k, tmp_path / "c5.dcm", -500),
        "without sequence delimiter": _cut(j2k, tmp_path / "c6.dcm", -8),
        "trailing garbage": tmp_path / "c7.dcm",
        "empty fragments": save(empty_frames, tmp_path / "c8.dcm"),
        "implicit cut inside Pixel Data": _cut(implicit_path, tmp_path / "c9.dcm", -3000),
    }
    cases["trailing garbage"].write_bytes(native.read_bytes() + b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b")
    got = send(node.port, list(cases.values()))
    for (name, _), (status, comment) in zip(cases.items(), got):
        assert status == CANNOT_UNDERSTAND, (name, hex(status), comment)
        assert comment and "Secret" not in comment, (name, comment)
    comments = dict(zip(cases, (c for _, c in got)))
    assert comments["inside Pixel Data"] == "cut off in (7FE0,0010): 11288 of 12288 bytes present"
    assert comments["empty fragments"] == "encapsulated Pixel Data holds no frame"
    node.assert_clean([])
    ok = [native, j2k, implicit_path]
    assert send(node.port, ok) == [(0, "")] * 3
    node.assert_clean([pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ok])


# -- fault 13: image size and the MG pixel module --------------------------------------------


def test_images_beyond_the_limits_or_the_mg_iod_are_refused_before_decoding(node, tmp_path):
    def variant(name, change, ts=None):
        ds = make_mg("L", "CC", generate_uid(), generate_uid(), len(cases) + 1)
        if ts == JPEG2000:
            ds.compress(ts, j2k_psnr=[60])
        elif ts:
            ds.compress(ts)
        change(ds)
        cases[name] = save(ds, tmp_path / f"{len(cases)}.dcm")

    cases: dict[str, Path] = {}
    variant("rows", lambda ds: setattr(ds, "Rows", 16384))
    variant("columns", lambda ds: setattr(ds, "Columns", 9000))
    variant("pixels", lambda ds: (setattr(ds, "Rows", 8192), setattr(ds, "Columns", 8192)), JPEG2000Lossless)
    variant("bits", lambda ds: (setattr(ds, "BitsAllocated", 32), setattr(ds, "PixelData", ds.PixelData * 2)))
    variant("samples", lambda ds: setattr(ds, "SamplesPerPixel", 3))
    variant("frames", lambda ds: setattr(ds, "NumberOfFrames", 2))
    variant("photometric", lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"))
    variant("bits stored", lambda ds: delattr(ds, "BitsStored"))
    variant("pixel representation", lambda ds: delattr(ds, "PixelRepresentation"))
    variant("j2k siz", lambda ds: setattr(ds, "Rows", 128), JPEG2000)
    variant("j2k siz columns", lambda ds: setattr(ds, "Columns", 32), JPEG2000Lossless)
    variant("jpeg-ls sof", lambda ds: setattr(ds, "Columns", 65), JPEGLSLossless)
    variant("rle segments", lambda ds: (setattr(ds, "BitsAllocated", 8), setattr(ds, "BitsStored", 8),
                                        setattr(ds, "HighBit", 7)), RLELossless)
    got = dict(zip(cases, send(node.port, list(cases.values()))))
    assert got == {
        "rows": (DOES_NOT_MATCH_SOP_CLASS, "Rows 16384 over limits.max_rows 8192"),
        "columns": (DOES_NOT_MATCH_SOP_CLASS, "Columns 9000 over limits.max_columns 8192"),
        "pixels": (DOES_NOT_MATCH_SOP_CLASS, "8192x8192 over limits.max_pixels 40000000"),
        "bits": (DOES_NOT_MATCH_SOP_CLASS, "BitsAllocated is not 8 or 16"),
        "samples": (DOES_NOT_MATCH_SOP_CLASS, "SamplesPerPixel is not 1"),
        "frames": (DOES_NOT_MATCH_SOP_CLASS, "NumberOfFrames is not 1 (MG is single-frame)"),
        "photometric": (DOES_NOT_MATCH_SOP_CLASS, "PhotometricInterpretation is not MONOCHROME1/2"),
        "bits stored": (DOES_NOT_MATCH_SOP_CLASS, "missing BitsStored"),
        "pixel representation": (DOES_NOT_MATCH_SOP_CLASS, "missing PixelRepresentation"),
        "j2k siz": (CANNOT_UNDERSTAND, "codestream is 96x64, header says 128x64"),
        "j2k siz columns": (CANNOT_UNDERSTAND, "codestream is 96x64, header says 96x32"),
        "jpeg-ls sof": (CANNOT_UNDERSTAND, "codestream is 96x64, header says 96x65"),
        "rle segments": (CANNOT_UNDERSTAND, "Pixel Data is not a valid RLE frame for its BitsAllocated"),
    }
    node.assert_clean([])
    path, uid = good(tmp_path)
    assert send(node.port, [path]) == [(0, "")]


def test_the_image_limits_are_read_from_the_configuration(tmp_path):
    n = Node(tmp_path / "st", **{"limits.max_rows": 90, "limits.max_pixels": 5000})
    try:
        tall = save(make_mg("L", "CC", generate_uid(), generate_uid(), 1), tmp_path / "tall.dcm")  # 96 x 64
        wide = save(make_mg("L", "CC", generate_uid(), generate_uid(), 2, shape=(64, 96)), tmp_path / "wide.dcm")
        assert send(n.port, [tall, wide]) == [(DOES_NOT_MATCH_SOP_CLASS, "Rows 96 over limits.max_rows 90"),
                                               (DOES_NOT_MATCH_SOP_CLASS, "64x96 over limits.max_pixels 5000")]
        n.assert_clean([])
    finally:
        n.stop()


# -- fault 10: permanent header problems, recording failures, orphans ---------------------------


def test_malformed_attributes_are_permanent_failures_or_unknown_views_never_orphans(node, tmp_path):
    def variant(name, change):
        ds = make_mg("R", "CC", generate_uid(), generate_uid(), len(cases) + 1)
        change(ds)
        cases[name] = (save(ds, tmp_path / f"{len(cases)}.dcm"), str(ds.SOPInstanceUID))

    def replace(ds, keyword, vr, value):
        tag = pydicom.datadict.tag_for_keyword(keyword)
        del ds[tag]
        ds.add_new(tag, vr, value)

    cases: dict[str, tuple[Path, str]] = {}
    variant("view code as text", lambda ds: replace(ds, "ViewCodeSequence", "LO", "CC"))
    variant("view code item without code", lambda ds: setattr(ds.ViewCodeSequence[0], "CodeValue", None))
    variant("laterality as sequence", lambda ds: replace(ds, "ImageLaterality", "SQ", [Dataset()]))
    variant("rows as text", lambda ds: replace(ds, "Rows", "LO", "many"))
    variant("study uid as sequence", lambda ds: replace(ds, "StudyInstanceUID", "SQ", [Dataset()]))
    variant("modality as number", lambda ds: replace(ds, "Modality", "US", 7))
    got = dict(zip(cases, send(node.port, [p for p, _ in cases.values()])))
    assert got == {
        "view code as text": (0, ""),
        "view code item without code": (0, ""),
        "laterality as sequence": (0, ""),
        "rows as text": (DOES_NOT_MATCH_SOP_CLASS, "Rows is not an integer"),
        "study uid as sequence": (DOES_NOT_MATCH_SOP_CLASS, "StudyInstanceUID is not a single text value"),
        "modality as number": (DOES_NOT_MATCH_SOP_CLASS, "Modality is not a single text value"),
    }
    accepted = [uid for name, (_, uid) in cases.items() if got[name][0] == 0]
    node.assert_clean(accepted)
    rows = {uid: dict(node.store._conn().execute("SELECT view, laterality FROM instances WHERE sop_instance_uid = ?",
                                                  (uid,)).fetchone()) for uid in accepted}
    # A malformed View Code Sequence falls back to View Position; a malformed laterality is unknown.
    assert [rows[cases[n][1]] for n in ("view code as text", "view code item without code", "laterality as sequence")] \
        == [{"view": "CC", "laterality": "R"}, {"view": "CC", "laterality": "R"}, {"view": "CC", "laterality": ""}]


def test_view_and_laterality_never_raise_on_malformed_values():
    ds = Dataset()
    assert (view_of(ds), laterality_of(ds)) == ("", "")
    ds.add_new(0x00540220, "LO", "CC")           # View Code Sequence as a string
    ds.add_new(0x00185101, "US", 3)              # View Position as a number
    ds.add_new(0x00200062, "CS", ["L", "R"])     # Image Laterality, two values
    ds.add_new(0x00200060, "SQ", [Dataset()])    # Laterality as a sequence
    assert (view_of(ds), laterality_of(ds)) == ("", "")
    item = Dataset()
    item.add_new(0x00080100, "SQ", [Dataset()])  # Code Value as a sequence
    seq = Dataset()
    seq.add_new(0x00540220, "SQ", [item])
    seq.ViewPosition, seq.ImageLaterality = "MLO", "l"
    assert (view_of(seq), laterality_of(seq)) == ("MLO", "L")


@pytest.mark.parametrize("error, status", [
    (sqlite3.OperationalError("disk I/O error"), OUT_OF_RESOURCES),
    (OSError(errno.EIO, "Input/output error"), OUT_OF_RESOURCES),
    (OSError(errno.ENOSPC, "No space left on device"), OUT_OF_RESOURCES),
    (AttributeError("a bug"), PROCESSING_FAILURE),
])
def test_a_failure_to_record_takes_the_file_back_out_of_the_spool(node, tmp_path, monkeypatch, error, status):
    def fail(**kwargs):
        raise error

    path, uid = good(tmp_path, 1)
    monkeypatch.setattr(node.store, "record_instance", fail)
    ((got, comment),) = send(node.port, [path])
    assert got == status, (hex(got), comment)
    assert comment
    node.assert_clean([])
    monkeypatch.undo()
    assert send(node.port, [path]) == [(0, "")]
    node.assert_clean([uid])


def test_spool_orphans_are_removed_at_start(tmp_path):
    storage = tmp_path / "st"
    first = Node(storage)
    path, uid = good(tmp_path, 1)
    assert send(first.port, [path]) == [(0, "")]
    first.stop()
    # A crash between the rename into the spool and the job store commit leaves these.
    kept = first.spooled()[0]
    orphan_same_study = kept.parent / f"{generate_uid()}.dcm"
    orphan_new_study = storage / "spool" / generate_uid() / f"{generate_uid()}.dcm"
    orphan_new_study.parent.mkdir()
    for orphan in (orphan_same_study, orphan_new_study):
        orphan.write_bytes(path.read_bytes())
    log = tmp_path / "node.log"
    logs.configure("node", "INFO", log, stream=None)
    try:
        second = Node(storage)
    finally:
        logs.configure("node", "INFO", None)
    try:
        assert second.spooled() == [kept]
        assert not orphan_new_study.parent.exists()
        events = [json.loads(line) for line in log.read_text().splitlines()]
        assert [e["orphans_removed"] for e in events if e["event"] == "spool_reconciled"] == [2]
        path2, uid2 = good(tmp_path, 2)
        assert send(second.port, [path2]) == [(0, "")]
        second.assert_clean([uid, uid2])
    finally:
        second.stop()


# -- a C-STORE without a usable Affected SOP Instance UID -------------------------------------


def _raw_store(assoc, ds: Dataset, affected_uid: str | None) -> tuple[int, str] | None:
    """A C-STORE-RQ whose Affected SOP Instance UID is exactly ``affected_uid`` (None: absent).

    pynetdicom's send_c_store refuses to build such a request, so the primitive is made here;
    the reactor is paused as send_c_store does (a test client only) so the reply reaches us.
    """
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == ds.SOPClassUID
              and c.transfer_syntax[0] == ExplicitVRLittleEndian)
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = ds.SOPClassUID
    req._affected_sop_instance_uid = None if affected_uid is None else pydicom.uid.UID(affected_uid)
    req.Priority = 2
    req.DataSet = io.BytesIO(encode(ds, False, True))
    assoc._reactor_checkpoint.clear()
    try:
        assoc.dimse.send_msg(req, cx.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return None if rsp is None else (int(rsp.Status), str(rsp.ErrorComment or ""))


def test_a_c_store_without_a_usable_affected_sop_instance_uid_gets_a_failure_status(node, tmp_path):
    ds = make_mg("L", "CC", generate_uid(), generate_uid(), 1)
    ae = AE("PACS")
    ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    try:
        for uid in (None, "", "1.2.x", "1." * 40 + "1", "0.0.0.0"):
            got = _raw_store(assoc, ds, uid)
            assert got == (CANNOT_UNDERSTAND, "Affected SOP Instance UID missing or invalid"), (uid, got)
            assert assoc.is_established, uid  # the association lives on
        assert _raw_store(assoc, ds, ds.SOPInstanceUID) == (0, "")
    finally:
        assoc.release()
    node.assert_clean([str(ds.SOPInstanceUID)])


# -- issue 24, faults 2 and 3: every Image Pixel attribute and the Pixel Data's extent -------------


def _encapsulated(ds: Dataset, fragments: list[bytes], offset_table: bytes = b"") -> Dataset:
    """``ds`` with its encapsulated Pixel Data rebuilt from exactly these fragments (each padded to even)."""
    items = [offset_table] + [f + b"\x00" * (len(f) % 2) for f in fragments]
    ds.PixelData = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(v)) + v for v in items)
    ds["PixelData"].is_undefined_length = True
    return ds


def test_every_image_pixel_attribute_and_the_pixel_data_extent_are_checked_at_admission(node, tmp_path):
    """Refused with a status, never Success-then-left-out: longer Pixel Data (issue 24 fault 2),
    an invalid Pixel Representation, High Bit or Planar Configuration, a JPEG 2000 SIZ of height 0,
    a second frame in the fragments or the Basic Offset Table (fault 3)."""
    cases: dict[str, Path] = {}

    def variant(name, change, ts=None):
        ds = make_mg("L", "CC", generate_uid(), generate_uid(), len(cases) + 1)
        if ts:
            ds.compress(ts)
        change(ds)
        cases[name] = save(ds, tmp_path / f"{len(cases)}.dcm")

    def j2k_siz(ds, at, value):  # rewrite one 32-bit field of the SIZ segment (Xsiz at 8, Ysiz at 12)
        frame = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
        siz = frame.find(b"\xff\x4f\xff\x51") + 2
        struct.pack_into(">I", frame, siz + at, value)
        _encapsulated(ds, [bytes(frame)])

    def one_frame(ds):
        return next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))

    variant("native longer", lambda ds: setattr(ds, "PixelData", ds.PixelData * 2))
    variant("native 2x1 with 266240 bytes", lambda ds: (setattr(ds, "Rows", 2), setattr(ds, "Columns", 1),
                                                         setattr(ds, "PixelData", bytes(266240))))
    variant("native one byte more", lambda ds: setattr(ds, "PixelData", ds.PixelData + b"\x00\x00"))
    variant("pixel representation 65535", lambda ds: setattr(ds, "PixelRepresentation", 65535), RLELossless)
    variant("pixel representation 2", lambda ds: setattr(ds, "PixelRepresentation", 2))
    variant("high bit", lambda ds: setattr(ds, "HighBit", 15))
    variant("no high bit", lambda ds: delattr(ds, "HighBit"))
    variant("planar configuration", lambda ds: setattr(ds, "PlanarConfiguration", 7))
    variant("j2k siz height 0", lambda ds: j2k_siz(ds, 12, 0), JPEG2000Lossless)
    variant("j2k siz width 0", lambda ds: j2k_siz(ds, 8, 0), JPEG2000Lossless)
    variant("j2k two frames", lambda ds: _encapsulated(ds, [one_frame(ds)] * 2), JPEG2000Lossless)
    variant("rle two fragments", lambda ds: _encapsulated(ds, [one_frame(ds)] * 2), RLELossless)
    variant("offset table of two frames", lambda ds: _encapsulated(ds, [one_frame(ds)], struct.pack("<II", 0, 99)),
            JPEG2000Lossless)
    got = dict(zip(cases, send(node.port, list(cases.values()))))
    assert got == {
        "native longer": (CANNOT_UNDERSTAND, "Pixel Data has 24576 bytes, 12288 expected"),
        "native 2x1 with 266240 bytes": (CANNOT_UNDERSTAND, "Pixel Data has 266240 bytes, 4 expected"),
        "native one byte more": (CANNOT_UNDERSTAND, "Pixel Data has 12290 bytes, 12288 expected"),
        "pixel representation 65535": (DOES_NOT_MATCH_SOP_CLASS, "PixelRepresentation is not 0 or 1"),
        "pixel representation 2": (DOES_NOT_MATCH_SOP_CLASS, "PixelRepresentation is not 0 or 1"),
        "high bit": (DOES_NOT_MATCH_SOP_CLASS, "HighBit is not BitsStored - 1"),
        "no high bit": (DOES_NOT_MATCH_SOP_CLASS, "missing HighBit"),
        "planar configuration": (DOES_NOT_MATCH_SOP_CLASS, "PlanarConfiguration is not 0 or 1"),
        "j2k siz height 0": (CANNOT_UNDERSTAND, "codestream is 0x64, header says 96x64"),
        "j2k siz width 0": (CANNOT_UNDERSTAND, "codestream is 96x0, header says 96x64"),
        "j2k two frames": (CANNOT_UNDERSTAND, "encapsulated Pixel Data holds more than one frame"),
        "rle two fragments": (CANNOT_UNDERSTAND, "encapsulated Pixel Data holds more than one frame"),
        "offset table of two frames": (CANNOT_UNDERSTAND, "Basic Offset Table lists more than one frame"),
    }
    node.assert_clean([])

    # What the standard allows stays accepted, and decodes to the one frame: a codestream split
    # over two fragments, an offset table of one frame, signed pixels, Planar Configuration 0.
    accepted: dict[str, Path] = {}
    cases = accepted

    def split(ds):
        frame = one_frame(ds)
        _encapsulated(ds, [frame[:len(frame) // 2 & ~1], frame[len(frame) // 2 & ~1:]], struct.pack("<I", 0))

    variant("j2k split over two fragments", split, JPEG2000Lossless)
    variant("signed", lambda ds: setattr(ds, "PixelRepresentation", 1))
    variant("planar configuration 0", lambda ds: setattr(ds, "PlanarConfiguration", 0))
    assert send(node.port, list(accepted.values())) == [(0, "")] * 3
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in accepted.values()]
    node.assert_clean(uids)
    for path in node.spooled():
        assert pydicom.dcmread(path).pixel_array.shape == (96, 64)
