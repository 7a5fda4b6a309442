"""Mutated C-STORE payloads for fuzzing the node: the ways a hostile or broken sender can be wrong.

Every case is a complete Part-10 file (preamble, file meta, data set) whose data set the fuzzer
sends as it is (pynetdicom's chunked send: the bytes after the file meta go on the wire
unchanged), so the node sees exactly the damage. The file meta carries the C-STORE's Affected
SOP Class / Instance UIDs. Each case gets a fresh SOP Instance UID (so no case is answered as
a duplicate of another) unless the mutation is about that UID.

Families (:data:`FAMILIES`), each a function ``(rng, study) -> list of (name, bytes)``:
truncations, byte flips, element lengths, wrong VRs and values, huge or odd image geometry,
corrupt JPEG 2000 / JPEG-LS / JPEG lossless / RLE / Deflate streams, deflate bombs, hostile
UIDs, deep sequences, giant private elements, missing attributes, odd character sets, and
valid images as controls.
"""

from __future__ import annotations

import copy
import io
import random
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless, generate_uid)

from node_harness import make_mg

_VIEWS = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]


@dataclass(frozen=True)
class Case:
    """One payload: ``family`` and ``name`` say what was done, ``data`` is the Part-10 file."""

    family: str
    name: str
    data: bytes
    #: True for the controls: a valid image that must be accepted and processed.
    valid: bool = False


@dataclass
class StudyContext:
    """The study the cases of one batch belong to (so mutated images share studies with valid ones)."""

    study_uid: str
    series_uid: str
    number: int = 0

    def image(self, rng: random.Random, shape: tuple[int, int] = (96, 64)) -> Dataset:
        """A fresh valid MG image of this study (new SOP Instance UID)."""
        self.number += 1
        lat, view = _VIEWS[self.number % 4]
        ds = make_mg(lat, view, self.study_uid, self.series_uid, self.number, shape=shape,
                     seed=rng.randrange(1000))
        # Fixed, so that a mutation removing Bits Allocated can still be written.
        ds["PixelData"].VR = "OW"
        return ds


# -- encoding helpers -------------------------------------------------------------------------

def part10(ds: Dataset, ts: str | None = None) -> bytes:
    """``ds`` as a Part-10 file in transfer syntax ``ts`` (default: its own)."""
    ds = copy.deepcopy(ds)
    if ts is not None:
        ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    return buf.getvalue()


def meta_end(data: bytes) -> int:
    """Offset of the first data set byte after the file meta group."""
    group_length = struct.unpack_from("<I", data, 132 + 8)[0]
    return 132 + 12 + group_length


def raw_elements(data: bytes) -> list[tuple[int, str | None, int, int]]:
    """Top-level elements of an Explicit VR LE data set: (tag, VR, length-field offset, value offset)."""
    start = meta_end(data)
    fp = io.BytesIO(data[start:])
    out = []
    for raw in data_element_generator(fp, is_implicit_VR=False, is_little_endian=True, defer_size=64):
        long_form = raw.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UN", "UT", "UC", "UR", "SV", "UV")
        tell = raw.value_tell + start
        out.append((int(raw.tag), raw.VR, tell - (4 if long_form else 2), tell))
    return out


def compressed(ds: Dataset, ts: str) -> Dataset:
    """A copy of ``ds`` with its pixel data encoded in ``ts`` (pydicom's encoders; dcmtk for JPEG)."""
    ds = copy.deepcopy(ds)
    if ts == JPEGLosslessSV1:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
            ds.save_as(src, enforce_file_format=True)
            subprocess.run(["dcmcjpeg", "+e1", str(src), str(dst)], check=True, capture_output=True)
            return dcmread(dst)
    ds.compress(ts)
    return ds


def _fragment_span(data: bytes) -> tuple[int, int]:
    """(offset, length) of the first pixel data fragment in an encapsulated Part-10 file."""
    pixel = [e for e in raw_elements(data) if e[0] == 0x7FE00010][0]
    pos = pixel[3]
    bot_len = struct.unpack_from("<I", data, pos + 4)[0]  # basic offset table item
    pos += 8 + bot_len
    frag_len = struct.unpack_from("<I", data, pos + 4)[0]
    return pos + 8, frag_len


def _flip(data: bytes, rng: random.Random, start: int, end: int, count: int) -> bytes:
    b = bytearray(data)
    for _ in range(count):
        i = rng.randrange(start, max(start + 1, end))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _with(ds: Dataset, **changes) -> Dataset:
    ds = copy.deepcopy(ds)
    for key, value in changes.items():
        if value is None:
            if key in ds:
                del ds[key]
        else:
            setattr(ds, key, value)
    return ds


def _raw(ds: Dataset, tag: int, vr: str, value: bytes) -> bytes:
    """``ds`` as a Part-10 file (Explicit VR LE) whose element ``tag`` is ``vr`` with raw ``value``.

    Spliced into the encoded bytes, so any VR and any content can be written (pydicom would
    validate or convert a value given to it).
    """
    if len(value) % 2:
        value += b" "
    long_form = vr in ("OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UN", "UT", "UC", "UR", "SV", "UV")
    element = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    element += struct.pack("<HI", 0, len(value)) if long_form else struct.pack("<H", len(value))
    element += value
    data = part10(_with(ds, **{}), ExplicitVRLittleEndian)
    elems = raw_elements(data)
    for i, (t, evr, at, _) in enumerate(elems):
        start = at - (8 if evr in ("OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UN", "UT", "UC", "UR", "SV", "UV")
                      else 6)
        if t == tag:
            end = elems[i + 1][2] - (8 if elems[i + 1][1] in ("OB", "OW", "SQ", "UN", "UT", "UC", "UR") else 6) \
                if i + 1 < len(elems) else len(data)
            return data[:start] + element + data[end:]
        if t > tag:
            return data[:start] + element + data[start:]
    return data + element


# -- families -----------------------------------------------------------------------------------

def truncations(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    out = []
    for name in ("inside-header", "inside-pixel-data", "last-byte"):
        data = part10(study.image(rng))
        pixel = [e for e in raw_elements(data) if e[0] == 0x7FE00010][0][3]
        cut = {"inside-header": rng.randrange(meta_end(data) + 1, pixel - 8),
               "inside-pixel-data": rng.randrange(pixel + 1, len(data) - 1), "last-byte": len(data) - 1}[name]
        out.append((name, data[:cut]))
    return out


def byte_flips(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    data = part10(study.image(rng))
    pixel = [e for e in raw_elements(data) if e[0] == 0x7FE00010][0][3]
    n = rng.choice([1, 4, 32])
    return [(f"header-{n}", _flip(data, rng, meta_end(data), pixel, n))]


def lengths(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    data = part10(study.image(rng))
    elems = raw_elements(data)
    tag, vr, at, _ = rng.choice(elems)
    b = bytearray(data)
    long_form = (at - meta_end(data)) >= 0 and vr in ("OB", "OW", "SQ", "UN", "UT", "UC", "UR")
    if long_form:
        value = rng.choice([0xFFFFFFFE, 0x7FFFFFFF, len(data) * 3, 1, 3])
        struct.pack_into("<I", b, at, value)
    else:
        value = rng.choice([0xFFFF, 0xFFFE, 1, 7, 255])
        struct.pack_into("<H", b, at, value)
    return [(f"{tag:08X}-{vr}-{value}", bytes(b))]


def wrong_values(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    ds = study.image(rng)
    choices: list[tuple[str, Callable[[Dataset], Dataset | bytes]]] = [
        ("view-code-as-string", lambda d: _raw(d, 0x00540220, "LO", b"MEDIOLATERAL OBLIQUE")),
        ("birth-date-19470323XX", lambda d: _raw(d, 0x00100030, "DA", b"19470323XX")),
        ("birth-date-as-US", lambda d: _raw(d, 0x00100030, "US", b"\x01\x02\x03\x04")),
        ("patient-name-binary", lambda d: _raw(d, 0x00100010, "PN", bytes(range(256)))),
        ("patient-name-10k", lambda d: _raw(d, 0x00100010, "PN", b"Secret^Patientname" * 600)),
        ("patient-id-as-OB", lambda d: _raw(d, 0x00100020, "OB", b"PID-77123-SECRET")),
        ("rows-as-string", lambda d: _raw(d, 0x00280010, "US", b"ab")),
        ("rows-as-LO", lambda d: _raw(d, 0x00280010, "LO", b"96")),
        ("laterality-Q", lambda d: _with(d, ImageLaterality="Q")),
        ("pixel-spacing-text", lambda d: _raw(d, 0x00280030, "DS", b"abc\\def")),
        ("pixel-spacing-zero", lambda d: _with(d, PixelSpacing=[0, 0], ImagerPixelSpacing=[0, 0])),
        ("pixel-spacing-negative", lambda d: _with(d, PixelSpacing=[-1, 1e9], ImagerPixelSpacing=[-1, 1e9])),
        ("window-text", lambda d: _raw(d, 0x00281050, "DS", b"wide")),
        ("window-width-zero", lambda d: _with(d, WindowWidth=0)),
        ("study-date-bad", lambda d: _raw(d, 0x00080020, "DA", b"2026-13-45")),
        ("accession-too-long", lambda d: _raw(d, 0x00080050, "SH", b"ACC-99887-SECRET" * 8)),
        ("photometric-RGB", lambda d: _with(d, PhotometricInterpretation="RGB")),
        ("photometric-empty", lambda d: _raw(d, 0x00280004, "CS", b"")),
        ("presentation-lut-odd", lambda d: _with(d, PresentationLUTShape="INVERSE")),
        ("rescale-slope-zero", lambda d: _with(d, RescaleSlope=0)),
        ("pixel-representation-signed", lambda d: _with(d, PixelRepresentation=1)),
        ("bits-stored-20", lambda d: _with(d, BitsStored=20, HighBit=19)),
        ("modality-CT", lambda d: _with(d, Modality="CT")),
        ("no-modality", lambda d: _with(d, Modality=None)),
    ]
    name, change = rng.choice(choices)
    out = change(ds)
    return [(name, out if isinstance(out, bytes) else part10(out))]


def geometry(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    ds = study.image(rng)
    choices = [
        ("rows-16384", dict(Rows=16384)), ("cols-65535", dict(Columns=65535)), ("rows-0", dict(Rows=0)),
        ("both-8192", dict(Rows=8192, Columns=8192)),
        ("bits-allocated-32", dict(BitsAllocated=32, BitsStored=32, HighBit=31)),
        ("bits-allocated-1", dict(BitsAllocated=1, BitsStored=1, HighBit=0)),
        ("bits-allocated-7", dict(BitsAllocated=7, BitsStored=7, HighBit=6)),
        ("samples-3", dict(SamplesPerPixel=3, PlanarConfiguration=0)),
        ("frames-1000", dict(NumberOfFrames=1000)),
        ("frames-0", dict(NumberOfFrames=0)),
    ]
    name, change = rng.choice(choices)
    out = [(name, part10(_with(ds, **change)))]
    if rng.random() < 0.5:
        # A small valid JPEG 2000 stream under a header claiming a huge image.
        j2k = compressed(study.image(rng), JPEG2000Lossless)
        out.append(("j2k-small-stream-declares-8192", part10(_with(j2k, Rows=8192, Columns=8192))))
    return out


def _corrupt_codec(rng: random.Random, study: StudyContext, ts: str, label: str) -> list[tuple[str, bytes]]:
    ds = compressed(study.image(rng), ts)
    data = part10(ds)
    off, length = _fragment_span(data)
    how = rng.choice(["flip-head", "flip-body", "truncate-fragment", "zero-head", "garbage"])
    b = bytearray(data)
    if how == "flip-head":
        b = bytearray(_flip(data, rng, off, off + min(64, length), rng.choice([1, 3, 8])))
    elif how == "flip-body":
        b = bytearray(_flip(data, rng, off + 64, off + length, rng.choice([4, 64])))
    elif how == "zero-head":
        b[off:off + min(64, length)] = bytes(min(64, length))
    elif how == "garbage":
        b[off + 4:off + length] = rng.randbytes(length - 4)
    else:  # keep the item lengths but cut the codestream's end: a short fragment padded with zeros
        cut = rng.randrange(8, length)
        b[off + cut:off + length] = bytes(length - cut)
    return [(f"{label}-{how}", bytes(b))]


def codec_j2k(rng, study):
    return _corrupt_codec(rng, study, JPEG2000Lossless, "j2k")


def codec_jpegls(rng, study):
    return _corrupt_codec(rng, study, JPEGLSLossless, "jpegls")


def codec_jpeg(rng, study):
    return _corrupt_codec(rng, study, JPEGLosslessSV1, "jpeg")


def codec_rle(rng, study):
    out = _corrupt_codec(rng, study, RLELossless, "rle")
    # The header of an RLE frame: segment count and offsets (the pyo3 panic of issue 13).
    data = part10(compressed(study.image(rng), RLELossless))
    off, _ = _fragment_span(data)
    b = bytearray(data)
    struct.pack_into("<I", b, off, rng.choice([1, 15]))
    struct.pack_into("<I", b, off + 4, rng.choice([64, 0xFFFFFF00, 3]))
    struct.pack_into("<I", b, off + 8, rng.choice([0, 10**9]))
    out.append(("rle-segment-offsets", bytes(b)))
    return out


def deflate(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    data = part10(study.image(rng), DeflatedExplicitVRLittleEndian)
    out = [("deflate-flip", _flip(data, rng, meta_end(data), len(data), rng.choice([1, 8, 64])))]
    data = part10(study.image(rng), DeflatedExplicitVRLittleEndian)
    out.append(("deflate-truncated", data[:rng.randrange(meta_end(data) + 2, len(data) - 1)]))
    if rng.random() < 0.3:
        out.append(("deflate-bomb-1GiB", deflate_bomb(study.image(rng), 1 << 30)))
    return out


def deflate_bomb(ds: Dataset, inflated_bytes: int) -> bytes:
    """A valid Deflated Explicit VR LE file whose data set inflates to about ``inflated_bytes``.

    The zeros of a private OB element compress about 1000:1, so the file stays small; the
    stream is built with zlib directly so building it costs no gigabyte of memory either.
    """
    body = io.BytesIO()
    plain = copy.deepcopy(ds)
    plain.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plain.save_as(body, enforce_file_format=True)
    raw = body.getvalue()
    start = meta_end(raw)
    header = raw[start:]
    meta = _rewrite_meta_ts(raw[:start], str(DeflatedExplicitVRLittleEndian))
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = [comp.compress(header)]
    # A private creator and one huge OB element (0x0009,0x1010) after the public elements
    # would break the tag order; pydicom tolerates it, which is what a hostile sender counts on.
    element = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, inflated_bytes)
    out.append(comp.compress(element))
    chunk = bytes(1 << 20)
    for _ in range(inflated_bytes >> 20):
        out.append(comp.compress(chunk))
    out.append(comp.flush())
    return meta + b"".join(out)


def _rewrite_meta_ts(meta: bytes, ts: str) -> bytes:
    """The file meta bytes (preamble included) with another Transfer Syntax UID."""
    return _rewrite_meta(meta, TransferSyntaxUID=ts)


def _rewrite_meta(data: bytes, **fields: str) -> bytes:
    """``data`` (a Part-10 file, or its preamble and meta alone) with file meta ``fields`` replaced.

    Written without pydicom's checks, so the meta may say what the data set does not.
    """
    end = meta_end(data)
    fm = dcmread(io.BytesIO(data[:end]), force=True).file_meta
    for key, value in fields.items():
        setattr(fm, key, value)
    out = io.BytesIO()
    out.write(data[:132])
    write_file_meta_info(out, fm, enforce_standard=False)
    return out.getvalue() + data[end:]


def uids(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    ds = study.image(rng)
    choices = [
        ("sop-uid-path", dict(SOPInstanceUID="../../../escape")),
        ("sop-uid-65", dict(SOPInstanceUID="1." + "2" * 63)),
        ("sop-uid-letters", dict(SOPInstanceUID="1.2.abc.4")),
        ("study-uid-path", dict(StudyInstanceUID="../../spool")),
        ("study-uid-empty", dict(StudyInstanceUID="")),
        ("study-uid-trailing-dot", dict(StudyInstanceUID="1.2.3.")),
        ("series-uid-missing", dict(SeriesInstanceUID=None)),
        ("sop-class-ct", dict(SOPClassUID="1.2.840.10008.5.1.4.1.1.2")),
    ]
    name, change = rng.choice(choices)
    changed = _with(ds, **change)
    # The file meta (hence the C-STORE's Affected UIDs) follows the data set (pydicom writes it
    # so) unless the mutation is a mismatch between the two.
    out = [(name, part10(changed))]
    out.append(("affected-uid-mismatch", _rewrite_meta(part10(study.image(rng)),
                                                       MediaStorageSOPInstanceUID=generate_uid())))
    out.append(("affected-uid-empty", _rewrite_meta(part10(study.image(rng)), MediaStorageSOPInstanceUID="")))
    return out


def deep_sequences(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    ds = study.image(rng)
    depth = rng.choice([64, 600, 3000])
    inner = Dataset()
    inner.add_new(0x00091010, "LO", "leaf")
    for _ in range(depth):
        outer = Dataset()
        outer.add_new(0x00090010, "LO", "FUZZ")
        outer.add_new(0x00091011, "SQ", [inner])
        inner = outer
    ds.add_new(0x00090010, "LO", "FUZZ")
    ds.add_new(0x00091011, "SQ", [inner])
    try:
        return [(f"depth-{depth}", part10(ds))]
    except RecursionError:  # pydicom cannot write it: hand-build the nested items instead
        return [(f"depth-{depth}", _deep_raw(ds, depth))]


def _deep_raw(ds: Dataset, depth: int) -> bytes:
    """A private sequence nested ``depth`` times, as undefined-length items and sequences."""
    del ds[0x00091011]
    data = part10(ds)
    nest = b""
    for _ in range(depth):
        nest = (struct.pack("<HH2sHI", 0x0009, 0x1011, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
                + nest + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    # Pixel Data (OB/OW) has tag (4), VR (2) and reserved (2) bytes before its length field.
    head = [e for e in raw_elements(data) if e[0] == 0x7FE00010][0][2] - 8
    return data[:head] + nest + data[head:]


def private_giant(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    ds = study.image(rng)
    size = rng.choice([1 << 20, 24 << 20])
    ds.add_new(0x00090010, "LO", "FUZZ")
    ds.add_new(0x00091010, "OB", rng.randbytes(size))
    return [(f"private-ob-{size >> 20}MiB", part10(ds))]


def missing(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    ds = study.image(rng)
    key = rng.choice(["PixelData", "Rows", "Columns", "BitsAllocated", "PhotometricInterpretation",
                      "StudyInstanceUID", "ImageLaterality", "ViewCodeSequence", "PixelSpacing",
                      "ImagerPixelSpacing", "WindowCenter", "PatientOrientation", "SamplesPerPixel"])
    return [(f"no-{key}", part10(_with(ds, **{key: None})))]


def charsets(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    ds = study.image(rng)
    name, charset, value = rng.choice([
        ("unknown-charset", "ISO_IR 999", b"Secret^Patientname"),
        ("2022-invalid-escape", "ISO 2022 IR 87", b"\x1b$B\xff\xfe^\x1b(B"),
        ("utf8-invalid", "ISO_IR 192", b"\xc3\x28Secret\xa0\xa1"),
    ])
    ds.SpecificCharacterSet = charset
    return [(name, _raw(ds, 0x00100010, "PN", value))]


def _fragments(ds: Dataset, fragments: list[bytes], offset_table: bytes = b"") -> Dataset:
    """``ds`` (encapsulated) with its Pixel Data items replaced: the Basic Offset Table, then ``fragments``."""
    items = [offset_table] + [f + b"\x00" * (len(f) % 2) for f in fragments]
    ds.PixelData = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(v)) + v for v in items)
    ds["PixelData"].is_undefined_length = True
    return ds


def _first_frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def pixel_module(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    """Image Pixel attributes outside their allowed values and Pixel Data of more than one frame
    (issue 24, faults 2 and 3): each must be refused at admission, never accepted and dropped."""
    ds = study.image(rng)

    def j2k_siz(at: int, value: int) -> Dataset:
        j2k = compressed(ds, JPEG2000Lossless)
        frame = bytearray(_first_frame(j2k))
        struct.pack_into(">I", frame, frame.find(b"\xff\x4f\xff\x51") + 2 + at, value)
        return _fragments(j2k, [bytes(frame)])

    def two(ts: str) -> Dataset:
        enc = compressed(ds, ts)
        return _fragments(enc, [_first_frame(enc)] * 2)

    choices: list[tuple[str, Callable[[], Dataset]]] = [
        ("native-twice-as-long", lambda: _with(ds, PixelData=ds.PixelData * 2)),
        ("native-2x1-266240-bytes", lambda: _with(ds, Rows=2, Columns=1, PixelData=bytes(266240))),
        ("native-two-bytes-more", lambda: _with(ds, PixelData=ds.PixelData + b"\x00\x00")),
        ("rle-pixel-representation-65535", lambda: _with(compressed(ds, RLELossless), PixelRepresentation=65535)),
        ("pixel-representation-2", lambda: _with(ds, PixelRepresentation=2)),
        ("high-bit-15-of-12", lambda: _with(ds, HighBit=15)),
        ("no-high-bit", lambda: _with(ds, HighBit=None)),
        ("planar-configuration-7", lambda: _with(ds, PlanarConfiguration=7)),
        ("j2k-siz-height-0", lambda: j2k_siz(12, 0)),
        ("j2k-siz-width-0", lambda: j2k_siz(8, 0)),
        ("j2k-two-frames", lambda: two(JPEG2000Lossless)),
        ("rle-two-fragments", lambda: two(RLELossless)),
        ("jpegls-two-frames", lambda: two(JPEGLSLossless)),
        ("offset-table-two-frames", lambda: _fragments(compressed(ds, JPEG2000Lossless),
                                                       [_first_frame(compressed(ds, JPEG2000Lossless))],
                                                       struct.pack("<II", 0, 64))),
    ]
    name, change = rng.choice(choices)
    return [(name, part10(change()))]


def copied_attributes(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    """A damaged attribute the models do not read (issue 24, fault 4): the image keeps its results."""
    ds = study.image(rng)
    how = rng.choice(["manufacturer-UL", "root-attribute-UL", "flip-near-0028-1040"])
    if how == "manufacturer-UL":
        return [(how, _raw(ds, 0x00080070, "UL", bytes(range(1, 9))))]
    if how == "root-attribute-UL":
        tags = [int(e.tag) for e in ds if e.keyword not in _NEEDED_BY_ADMISSION and not e.tag.is_private]
        return [(how, _raw(ds, rng.choice(tags), "UL", bytes(range(1, 9))))]
    data = part10(ds)
    at = data.find(struct.pack("<HH", 0x0028, 0x1040))
    return [(how, _flip(data, rng, at - 16, at + 40, 1))]


#: What the admission checks read: a wrong VR there is refused, not a case for copied_attributes.
_NEEDED_BY_ADMISSION = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows",
                        "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                        "HighBit", "PixelRepresentation", "PixelData", "NumberOfFrames"}


def lone_undecodable(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    """A study of one image whose codec fails on its bytes (issue 24, fault 5): accepted (it is
    structurally valid), left out with a reason, and the job ends done after one attempt."""
    alone = StudyContext(generate_uid(), generate_uid())
    ds = compressed(alone.image(rng), RLELossless)
    frame = bytearray(_first_frame(ds))
    frame[8:12] = struct.pack("<I", 100)  # the second segment's offset inside the first: pylibjpeg-rle panics
    return [("rle-panic-alone", part10(_fragments(ds, [bytes(frame)])))]


def transfer_syntaxes(rng: random.Random, study: StudyContext) -> list[tuple[str, bytes]]:
    """Valid images in every accepted transfer syntax: the controls."""
    ds = study.image(rng)
    ts = rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1])
    if ts in (RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1):
        return [(f"valid-{ts.name}", part10(compressed(ds, ts)))]
    return [(f"valid-{ts.name}", part10(ds, ts))]


#: family name -> generator; ``valid`` marks the controls.
FAMILIES: dict[str, Callable[[random.Random, StudyContext], list[tuple[str, bytes]]]] = {
    "truncation": truncations, "byte-flip": byte_flips, "length": lengths, "wrong-value": wrong_values,
    "geometry": geometry, "j2k": codec_j2k, "jpegls": codec_jpegls, "jpeg": codec_jpeg, "rle": codec_rle,
    "deflate": deflate, "uid": uids, "deep-sequence": deep_sequences, "private-giant": private_giant,
    "missing": missing, "charset": charsets, "pixel-module": pixel_module, "copied-attribute": copied_attributes,
    "lone-undecodable": lone_undecodable, "valid": transfer_syntaxes,
}


def cases(count: int, seed: int = 0, per_study: int = 8, families: list[str] | None = None) -> Iterator[Case]:
    """``count`` cases (at least), cycling through the families in a seeded order.

    Cases come in studies of about ``per_study`` images; every study also holds a valid image,
    so a bad image never stands alone in its study.
    """
    rng = random.Random(seed)
    names = families or list(FAMILIES)
    made = turn = 0
    study = StudyContext(generate_uid(), generate_uid())
    while made < count:
        if study.number >= per_study:
            study = StudyContext(generate_uid(), generate_uid())
        if study.number == 0:
            for name, data in transfer_syntaxes(rng, study):
                made += 1
                yield Case("valid", name, data, valid=True)
        family = names[turn % len(names)]
        turn += 1
        for name, data in FAMILIES[family](rng, study):
            made += 1
            yield Case(family, name, data, valid=family == "valid")
