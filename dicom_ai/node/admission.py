"""What the node accepts as a C-STORE: the checks a received data set passes before Success.

A data set is admitted when it parses completely, is the mammogram its request says it is,
stays within ``[limits]``, carries the attributes the node reads with usable values, and has
Pixel Data of the length (native) or the structure (encapsulated) its attributes require.
Anything else is a :class:`Rejected` with the PS3.4 Annex B status to answer and an Error
Comment saying why (never a value of the data set other than sizes and UIDs the request
already carries).

The checks read the received file without holding it in memory: element headers are walked
from the file (values are skipped by seeking), Pixel Data is never read except the first
bytes of the first fragment (its codestream header), and a Deflated data set is inflated in
1 MiB pieces into a temporary file next to it, stopping as soon as it exceeds
``limits.max_dataset_mb``. Peak memory of a check is therefore a few MiB plus pydicom's
parse of the elements before Pixel Data (values above 64 KiB are deferred, not read).
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.filewriter import write_file_meta_info
from pynetdicom.status import Status

from dicom_ai.core.views import laterality_of, view_of
from dicom_ai.node.config import LimitsSection

SUCCESS = Status.SUCCESS
# pynetdicom names no storage failure codes (its Status enum has only the general ones, and
# Status.add would change that class for the whole process); these are the first code of each
# PS3.4 B.2.3 range, checked against pynetdicom's STORAGE_SERVICE_CLASS_STATUS in test_scp.py.
OUT_OF_RESOURCES = 0xA700           # "Refused: Out of Resources"
DOES_NOT_MATCH_SOP_CLASS = 0xA900   # "Data Set Does Not Match SOP Class" (Error)
CANNOT_UNDERSTAND = 0xC000          # "Cannot Understand"
PROCESSING_FAILURE = 0x0110         # "Processing Failure" (PS3.7 C.4.2): a fault of the node itself

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT = "1.2.840.10008.1.2"
RLE = "1.2.840.10008.1.2.5"
#: Nesting of sequences beyond this is refused; an MG image needs three levels.
MAX_SEQUENCE_DEPTH = 16
#: Elements (all levels) beyond this are refused: an MG header has a few hundred, and the
#: walk costs about a microsecond each.
MAX_ELEMENTS = 200_000

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_VRS = {v.encode() for v in ("AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV "
                             "TM UC UI UL UN UR US UT UV").split()}
_LONG_VRS = {v.encode() for v in "OB OD OF OL OV OW SQ UC UN UR UT SV UV".split()}
_INFLATE_IN, _INFLATE_OUT = 64 * 1024, 1024 * 1024
#: Bytes of the first fragment read to find the codestream's image header (JPEG may carry
#: large APPn segments before its SOF).
_HEAD_BYTES = 256 * 1024
# First bytes of the first fragment for each encapsulated transfer syntax.
_MARKERS = {
    "1.2.840.10008.1.2.4.70": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.80": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.81": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.90": (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  "),
    "1.2.840.10008.1.2.4.91": (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  "),
}


def is_valid_uid(uid: str) -> bool:
    """True for a UID of digits and dots, at most 64 characters (PS3.5 9.1), as spool names need."""
    return isinstance(uid, str) and len(uid) <= 64 and _UID_RE.fullmatch(uid) is not None


class Rejected(Exception):
    """A C-STORE that must be answered with a failure ``status``."""

    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass
class Admitted:
    """What the node needs of an admitted instance, all computed before it enters the spool."""

    study_uid: str
    laterality: str
    view: str
    dataset: pydicom.Dataset = field(repr=False)


@dataclass
class _Layout:
    """Where things are in the file: from the element walk, not from pydicom."""

    pixel_offset: int | None = None   # file offset of the Pixel Data value
    pixel_length: int | None = None   # its declared length (None: undefined, encapsulated)
    fragments: list[tuple[int, int]] = field(default_factory=list)  # (offset, length), BOT excluded
    offset_table_length: int = 0      # bytes of the Basic Offset Table item (4 per frame, or 0)
    elements: int = 0


def check_dataset(path: Path, sop_class: str, sop_uid: str, ts: str,
                  limits: LimitsSection | None = None) -> Admitted:
    """Check a received file is a complete mammogram within the limits; never decodes pixels.

    Parameters
    ----------
    path : Path
        The received file (DICOM File Format as pynetdicom wrote it: preamble, file meta in
        Explicit VR Little Endian, then the data set in ``ts``).
    sop_class, sop_uid : str
        Affected SOP Class and Instance UID of the C-STORE request.
    ts : str
        The transfer syntax UID of the presentation context it arrived on.
    limits : LimitsSection or None
        ``[limits]`` of the configuration (defaults when None): ``max_dataset_mb`` (MiB, of
        the data set as received and, when Deflated, as inflated), ``max_rows``,
        ``max_columns`` and ``max_pixels`` (rows x columns x frames).

    Returns
    -------
    Admitted
        Study Instance UID, laterality and view, and the header (pydicom, Pixel Data not read).

    Raises
    ------
    Rejected
        With ``OUT_OF_RESOURCES`` when the file cannot be read (storage trouble),
        ``DOES_NOT_MATCH_SOP_CLASS`` for a readable data set that is not an admissible
        mammogram, ``CANNOT_UNDERSTAND`` for one that does not parse or whose Pixel Data
        does not fit its attributes.
    """
    limits = limits or LimitsSection()
    bound = limits.max_dataset_mb * 1024 * 1024
    path = Path(path)
    inflated: Path | None = None
    try:
        size = path.stat().st_size
        if size > bound:
            raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"data set over limits.max_dataset_mb ({limits.max_dataset_mb} MiB)")
        start = _dataset_start(path)
        target = path
        if ts == DEFLATED:
            inflated = path.with_name(path.name + ".inflated")
            _inflate(path, start, inflated, bound, limits.max_dataset_mb)
            target, start = inflated, _dataset_start(inflated)
        layout = _walk_file(target, start, implicit=(ts == IMPLICIT))
        ds = _read_header(target)
        admitted = _check_header(ds, sop_class, sop_uid, limits, layout)
        _check_pixel_data(target, ds, ts, layout)
        return admitted
    except OSError as exc:  # the file we just wrote cannot be read back: storage trouble
        raise Rejected(OUT_OF_RESOURCES, f"storage error: {exc.strerror or type(exc).__name__}") \
            from exc
    except Rejected:
        raise
    except Exception as exc:  # pydicom and struct raise many types on hostile bytes
        raise Rejected(CANNOT_UNDERSTAND, f"unreadable data set: {type(exc).__name__}") from exc
    finally:
        if inflated is not None:
            inflated.unlink(missing_ok=True)


# -- reading the file ----------------------------------------------------------------------


class _Broken(Exception):
    """The byte stream is not a complete DICOM data set; the message says where."""


def _dataset_start(path: Path) -> int:
    """File offset of the data set: after the preamble, ``DICM`` and the group 0002 elements."""
    with open(path, "rb") as fp:
        head = fp.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise Rejected(CANNOT_UNDERSTAND, "no DICOM file meta information")
    return 144 + struct.unpack("<I", head[140:144])[0]


def _inflate(src_path: Path, start: int, dst_path: Path, bound: int, bound_mb: int) -> None:
    """Inflate a Deflated Explicit VR LE data set into ``dst_path`` as Explicit VR LE, at most ``bound`` bytes.

    The output is produced 1 MiB at a time (``decompressobj`` with ``max_length``), so a
    small stream that inflates to gigabytes costs ``bound`` bytes of disk and about 1 MiB of
    memory before it is refused. Raw deflate (no zlib header) as PS3.5 A.5 and pydicom read it.
    """
    meta = pydicom.filereader.read_file_meta_info(src_path)
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(src_path, "rb") as src, open(dst_path, "wb") as dst:
        os.chmod(dst_path, 0o600)
        dst.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(dst, meta, enforce_standard=False)
        src.seek(start)
        pending, src_done = b"", False
        try:
            while not inflater.eof:
                if not pending and not src_done:
                    pending = src.read(_INFLATE_IN)
                    src_done = not pending
                out = inflater.decompress(pending, _INFLATE_OUT)
                pending = inflater.unconsumed_tail
                total += len(out)
                if total > bound:
                    raise Rejected(DOES_NOT_MATCH_SOP_CLASS,
                                   f"inflated data set over limits.max_dataset_mb ({bound_mb} MiB)")
                dst.write(out)
                if src_done and not out and not pending:
                    break
        except zlib.error as exc:
            raise Rejected(CANNOT_UNDERSTAND, "Deflated data set is not a valid deflate stream") from exc
    if not inflater.eof:
        raise Rejected(CANNOT_UNDERSTAND, "Deflated data set is cut off (deflate stream incomplete)")


def _walk_file(path: Path, start: int, implicit: bool) -> _Layout:
    """Walk every element header from ``start`` to the end of the file; values are skipped."""
    layout = _Layout()
    size = path.stat().st_size
    try:
        with open(path, "rb", buffering=64 * 1024) as fp:
            fp.seek(start)
            _walk(fp, size, size, implicit, 0, layout)
    except _Broken as exc:
        raise Rejected(CANNOT_UNDERSTAND, str(exc)) from exc
    return layout


def _read(fp: BinaryIO, n: int, what: str) -> bytes:
    data = fp.read(n)
    if len(data) < n:
        raise _Broken(f"data set cut off inside {what}")
    return data


def _walk(fp: BinaryIO, end: int | None, limit: int, implicit: bool, depth: int, layout: _Layout) -> None:
    """Walk the elements of one data set (the file's, or an item's) without reading values.

    ``end`` is where a defined-length data set ends (None: it ends with an Item Delimitation
    Item); nothing may go beyond ``limit`` (the end of the file or of the enclosing value).
    """
    while True:
        pos = fp.tell()
        if end is not None and pos >= end:
            if pos > end:
                raise _Broken("an element runs past the end of its item")
            return
        if pos + 8 > limit:
            raise _Broken("data set cut off inside an element header" if pos < limit
                          else "data set cut off before the end of a sequence item")
        head = _read(fp, 8, "an element header")
        tag = (struct.unpack("<H", head[:2])[0] << 16) | struct.unpack("<H", head[2:4])[0]
        layout.elements += 1
        if layout.elements > MAX_ELEMENTS:
            raise _Broken(f"more than {MAX_ELEMENTS} elements")
        if tag == _ITEM_END and end is None:
            return
        if tag >> 16 == 0xFFFE:
            raise _Broken(f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        if implicit:
            length = struct.unpack("<I", head[4:8])[0]
            try:
                is_sq = dictionary_VR(tag) == "SQ"
            except KeyError:  # private or unknown: a sequence only when of undefined length
                is_sq = False
            is_sq = is_sq or (length == _UNDEFINED and tag != _PIXEL_DATA)
        else:
            vr = head[4:6]
            if vr not in _VRS:
                raise _Broken(f"invalid VR in element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if vr in _LONG_VRS:
                length = struct.unpack("<I", _read(fp, 4, "an element header"))[0]
            else:
                length = struct.unpack("<H", head[6:8])[0]
            is_sq = vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED)
        value_at = fp.tell()
        where = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if tag == _PIXEL_DATA and depth == 0:
            layout.pixel_offset = value_at
            if length == _UNDEFINED:
                layout.pixel_length = None
                _walk_fragments(fp, limit, layout)
                continue
            layout.pixel_length = length
        if is_sq:
            if depth >= MAX_SEQUENCE_DEPTH:
                raise _Broken(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH}")
            if length != _UNDEFINED and value_at + length > limit:
                raise _Broken(f"data set cut off inside sequence {where}")
            _walk_items(fp, None if length == _UNDEFINED else value_at + length,
                        limit if length == _UNDEFINED else value_at + length, implicit, depth + 1, layout)
            continue
        if length == _UNDEFINED:
            raise _Broken(f"undefined length on element {where}")
        if value_at + length > limit:
            raise _Broken(f"cut off in {where}: {max(limit - value_at, 0)} of {length} bytes present")
        fp.seek(value_at + length)


def _walk_items(fp: BinaryIO, end: int | None, limit: int, implicit: bool, depth: int, layout: _Layout) -> None:
    """Walk the items of a sequence up to ``end`` or its Sequence Delimitation Item."""
    while True:
        pos = fp.tell()
        if end is not None and pos >= end:
            if pos > end:
                raise _Broken("a sequence item runs past the end of its sequence")
            return
        head = _read(fp, 8, "a sequence (no Sequence Delimitation Item)")
        tag = (struct.unpack("<H", head[:2])[0] << 16) | struct.unpack("<H", head[2:4])[0]
        length = struct.unpack("<I", head[4:8])[0]
        layout.elements += 1
        if tag == _SEQ_END and end is None:
            return
        if tag != _ITEM:
            raise _Broken("a sequence holds something other than items")
        if length == _UNDEFINED:
            _walk(fp, None, limit, implicit, depth, layout)
        else:
            if fp.tell() + length > limit:
                raise _Broken("data set cut off inside a sequence item")
            _walk(fp, fp.tell() + length, fp.tell() + length, implicit, depth, layout)


def _walk_fragments(fp: BinaryIO, limit: int, layout: _Layout) -> None:
    """Walk encapsulated Pixel Data: Basic Offset Table item, fragments, Sequence Delimitation Item."""
    first = True
    while True:
        head = _read(fp, 8, "encapsulated Pixel Data (no Sequence Delimitation Item)")
        tag = (struct.unpack("<H", head[:2])[0] << 16) | struct.unpack("<H", head[2:4])[0]
        length = struct.unpack("<I", head[4:8])[0]
        if tag == _SEQ_END:
            return
        if tag != _ITEM or length == _UNDEFINED:
            raise _Broken("encapsulated Pixel Data holds something other than items")
        at = fp.tell()
        if at + length > limit:
            raise _Broken(f"cut off in a Pixel Data fragment: {max(limit - at, 0)} of {length} bytes present")
        if first:
            layout.offset_table_length = length
        else:
            layout.fragments.append((at, length))
        first = False
        fp.seek(at + length)


def _read_header(path: Path) -> pydicom.Dataset:
    """The elements before Pixel Data, values over 64 KiB deferred (the walk proved the structure)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, defer_size=64 * 1024)
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many types for malformed streams
        raise Rejected(CANNOT_UNDERSTAND, f"unreadable data set: {type(exc).__name__}") from exc


# -- what the header must say ----------------------------------------------------------------


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    """A string attribute the node reads; Rejected if it is not a single string."""
    try:
        value = ds.get(keyword)
    except Exception as exc:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"{keyword} cannot be read") from exc
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is not a single text value")
    return str(value)


def _number(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    """An integer attribute the node reads; Rejected if missing (and no default) or not an integer."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            if default is None:
                raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"missing {keyword}")
            return default
        if isinstance(value, (bytes, list, pydicom.multival.MultiValue, pydicom.Sequence)):
            raise TypeError(type(value).__name__)
        number = int(value)
        if number != float(value):
            raise ValueError("not an integer")
        return number
    except Rejected:
        raise
    except Exception as exc:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is not an integer") from exc


def _check_header(ds: pydicom.Dataset, sop_class: str, sop_uid: str, limits: LimitsSection,
                  layout: _Layout) -> Admitted:
    if _text(ds, "SOPClassUID") != sop_class:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the request")
    if _text(ds, "SOPInstanceUID") != sop_uid:
        raise Rejected(CANNOT_UNDERSTAND, "SOP Instance UID differs from the request")
    if layout.pixel_offset is None:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "no Pixel Data")
    study_uid = _text(ds, "StudyInstanceUID")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not _text(ds, keyword):
            raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"missing {keyword}")
    for name, uid in (("SOP Instance UID", sop_uid), ("Study Instance UID", study_uid)):
        # The UIDs name spool files and folders: only a valid UID may get that far.
        if not is_valid_uid(uid):
            raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"invalid {name}")
    modality = _text(ds, "Modality")
    if modality != "MG":
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"Modality is {'not MG' if modality else 'empty'}")
    # The MG IOD (PS3.3 C.8.11.7): single frame, one sample, MONOCHROME1/2, 8 or 16 bits.
    rows, cols = _number(ds, "Rows"), _number(ds, "Columns")
    frames = _number(ds, "NumberOfFrames", 1)
    spp, bits = _number(ds, "SamplesPerPixel"), _number(ds, "BitsAllocated")
    # Type 1 in the Image Pixel module, and needed to decode: no default.
    stored = _number(ds, "BitsStored")
    high_bit = _number(ds, "HighBit")
    representation = _number(ds, "PixelRepresentation")
    # Type 1C (only with more than one sample), Enumerated Values 0 and 1 where present.
    planar = _number(ds, "PlanarConfiguration", 0)
    photometric = _text(ds, "PhotometricInterpretation")
    if not photometric:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "missing PhotometricInterpretation")
    if rows < 1 or cols < 1:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "Rows or Columns is zero")
    if rows > limits.max_rows:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"Rows {rows} over limits.max_rows {limits.max_rows}")
    if cols > limits.max_columns:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"Columns {cols} over limits.max_columns {limits.max_columns}")
    if frames != 1:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "NumberOfFrames is not 1 (MG is single-frame)")
    if rows * cols * frames > limits.max_pixels:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"{rows}x{cols} over limits.max_pixels {limits.max_pixels}")
    if spp != 1:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "SamplesPerPixel is not 1")
    if bits not in (8, 16):
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "BitsAllocated is not 8 or 16")
    if not 1 <= stored <= bits:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "BitsStored is not 1 to BitsAllocated")
    # The DX Image module the MG IOD includes (PS3.3 C.8.11.3): High Bit is Bits Stored - 1.
    if high_bit != stored - 1:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "HighBit is not BitsStored - 1")
    # Enumerated Values of PS3.3 C.7.6.3.1.4 and C.7.6.3.1.3: anything else cannot be decoded.
    if representation not in (0, 1):
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "PixelRepresentation is not 0 or 1")
    if planar not in (0, 1):
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "PlanarConfiguration is not 0 or 1")
    if photometric not in _MONOCHROME:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "PhotometricInterpretation is not MONOCHROME1/2")
    return Admitted(study_uid=study_uid, laterality=laterality_of(ds), view=view_of(ds), dataset=ds)


# -- Pixel Data ---------------------------------------------------------------------------------


def _check_pixel_data(path: Path, ds: pydicom.Dataset, ts: str, layout: _Layout) -> None:
    """Native: enough bytes present. Encapsulated: fragments present, codestream header matches."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits = int(ds.BitsAllocated)
    if ts not in _MARKERS and ts != RLE:
        if layout.pixel_length is None:
            raise Rejected(CANNOT_UNDERSTAND, "Pixel Data is encapsulated in a native transfer syntax")
        expected = rows * cols * bits // 8  # one frame, one sample (checked above)
        # The walk proved pixel_length bytes are present in the file. PS3.5 8.1.1: the value
        # is exactly one frame, padded to even; more would be read as further frames.
        if layout.pixel_length not in (expected, expected + expected % 2):
            raise Rejected(CANNOT_UNDERSTAND, f"Pixel Data has {layout.pixel_length} bytes, {expected} expected")
        return
    if layout.pixel_length is not None:
        raise Rejected(CANNOT_UNDERSTAND, "Pixel Data is not encapsulated in an encapsulated transfer syntax")
    if not layout.fragments or all(length == 0 for _, length in layout.fragments):
        raise Rejected(CANNOT_UNDERSTAND, "encapsulated Pixel Data holds no frame")
    if layout.offset_table_length not in (0, 4):  # PS3.5 A.4: one 32-bit offset per frame, or empty
        raise Rejected(CANNOT_UNDERSTAND, "Basic Offset Table lists more than one frame")
    offset, length = layout.fragments[0]
    if length == 0:
        raise Rejected(CANNOT_UNDERSTAND, "first Pixel Data fragment is empty")
    with open(path, "rb") as fp:
        fp.seek(offset)
        head = fp.read(min(length, _HEAD_BYTES))
        # A later fragment may continue the frame (PS3.5 A.4), but one that starts a codestream
        # of its own is a second frame; RLE has exactly one fragment per frame (A.4.2).
        for at, n in layout.fragments[1:]:
            fp.seek(at)
            lead = fp.read(min(n, 12))
            if ts == RLE or any(lead.startswith(m) for m in _MARKERS[ts]):
                raise Rejected(CANNOT_UNDERSTAND, "encapsulated Pixel Data holds more than one frame")
    if ts == RLE:
        segments = int.from_bytes(head[:4], "little") if len(head) >= 64 else 0
        if segments != bits // 8:
            raise Rejected(CANNOT_UNDERSTAND, "Pixel Data is not a valid RLE frame for its BitsAllocated")
        return
    if not any(head.startswith(m) for m in _MARKERS[ts]):
        raise Rejected(CANNOT_UNDERSTAND, "Pixel Data is not a codestream of its transfer syntax")
    j2k = ts.startswith("1.2.840.10008.1.2.4.9")
    size = _jpeg2000_size(head) if j2k else _jpeg_size(head)
    if size is None:
        raise Rejected(CANNOT_UNDERSTAND, "codestream has no readable image header (SIZ/SOF)")
    c_rows, c_cols, components = size
    # Only a JPEG frame header may leave the number of lines to a later DNL marker (rows 0);
    # a JPEG 2000 SIZ always states its height.
    if (c_rows != rows and (j2k or c_rows != 0)) or c_cols != cols:
        raise Rejected(CANNOT_UNDERSTAND, f"codestream is {c_rows}x{c_cols}, header says {rows}x{cols}")
    if components != 1:
        raise Rejected(CANNOT_UNDERSTAND, "codestream has more than one component")


def _jpeg2000_size(head: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the SIZ marker segment (ISO 15444-1 A.5.1)."""
    at = head.find(b"\xff\x4f\xff\x51")  # SOC then SIZ; inside the jp2c box of a JP2 file
    if at < 0 or len(head) < at + 4 + 38:
        return None
    siz = head[at + 4:]
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", siz[4:20])
    components = struct.unpack(">H", siz[36:38])[0]
    if xosiz > xsiz or yosiz > ysiz:
        return None
    return ysiz - yosiz, xsiz - xosiz, components


def _jpeg_size(head: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the SOF marker (ITU T.81 B.2.2; T.87 SOF55), rows 0 if set by DNL."""
    at = 2
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        seg_len = struct.unpack(">H", head[at + 2:at + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            if at + 10 > len(head):
                return None
            y, x = struct.unpack(">HH", head[at + 5:at + 9])
            return y, x, head[at + 9]
        if marker == 0xDA:  # start of scan before any frame header
            return None
        at += 2 + seg_len
    return None
