"""What the node accepts as a C-STORE: the checks a received data set passes before Success.

A data set is admitted when it parses, is the mammogram its request says it is, carries the
attributes the models need and Pixel Data of a usable shape. Anything else is a
:class:`Rejected` with the PS3.4 Annex B status to answer and an Error Comment saying why.
"""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
from pydicom.encaps import get_frame
from pynetdicom.status import Status

SUCCESS = Status.SUCCESS
# pynetdicom names no storage failure codes (its Status enum has only the general ones, and
# Status.add would change that class for the whole process); these are the first code of each
# PS3.4 B.2.3 range, checked against pynetdicom's STORAGE_SERVICE_CLASS_STATUS in test_scp.py.
OUT_OF_RESOURCES = 0xA700           # "Refused: Out of Resources"
DOES_NOT_MATCH_SOP_CLASS = 0xA900   # "Data Set Does Not Match SOP Class" (Error)
CANNOT_UNDERSTAND = 0xC000          # "Cannot Understand"

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns", "BitsAllocated",
             "SamplesPerPixel", "PhotometricInterpretation")
# First bytes of the first fragment for each encapsulated transfer syntax.
_MARKERS = {
    "1.2.840.10008.1.2.4.70": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.80": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.81": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.90": (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  "),
    "1.2.840.10008.1.2.4.91": (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  "),
}


class Rejected(Exception):
    """A C-STORE that must be answered with a failure ``status``."""

    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status = status
        self.comment = comment


def check_dataset(path: Path, sop_class: str, sop_uid: str, ts: str) -> pydicom.Dataset:
    """Parse the received file lazily and check it is a mammogram we can process."""
    try:
        ds = pydicom.dcmread(path, defer_size=4096)
        missing = [k for k in _REQUIRED if k not in ds or ds[k].value in (None, "")]
        ds_class = str(ds.get("SOPClassUID", ""))
        ds_uid = str(ds.get("SOPInstanceUID", ""))
        modality = str(ds.get("Modality", ""))
        has_pixels = "PixelData" in ds
    except Exception as exc:  # pydicom raises many types for malformed streams
        raise Rejected(CANNOT_UNDERSTAND, f"unreadable data set: {type(exc).__name__}") from exc
    if ds_class != sop_class:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the request")
    if ds_uid != sop_uid:
        raise Rejected(CANNOT_UNDERSTAND, "SOP Instance UID differs from the request")
    if not has_pixels:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "no Pixel Data")
    if missing:
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"missing {missing[0]}")
    for name, uid in (("SOP Instance UID", ds_uid), ("Study Instance UID", str(ds.StudyInstanceUID))):
        # The UIDs name spool files and folders: only a valid UID may get that far.
        if len(uid) > 64 or not _UID_RE.fullmatch(uid):
            raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"invalid {name}")
    if modality != "MG":
        raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"Modality is {modality or 'empty'}, not MG")
    try:
        _check_pixel_data(ds, ts)
    except Rejected:
        raise
    except Exception as exc:
        raise Rejected(CANNOT_UNDERSTAND, f"Pixel Data unreadable: {type(exc).__name__}") from exc
    return ds


def _check_pixel_data(ds: pydicom.Dataset, ts: str) -> None:
    """Structural check without decoding: native length, or encapsulation and codec marker."""
    elem = ds.get_item("PixelData", keep_deferred=True)  # do not read 17 MB to learn its length
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if ts in _MARKERS or ts == "1.2.840.10008.1.2.5":
        value = ds.PixelData
        frame = get_frame(value, 0, number_of_frames=frames)
        if ts in _MARKERS:
            if not any(frame.startswith(m) for m in _MARKERS[ts]):
                raise Rejected(CANNOT_UNDERSTAND, "Pixel Data is not a codestream of its transfer syntax")
        elif len(frame) < 64 or not 1 <= int.from_bytes(frame[:4], "little") <= 15:
            raise Rejected(CANNOT_UNDERSTAND, "Pixel Data is not a valid RLE frame")
        return
    expected = rows * cols * spp * frames * bits // 8
    length = elem.length if getattr(elem, "value", None) is None else len(ds.PixelData)
    if length < expected:
        raise Rejected(CANNOT_UNDERSTAND, f"Pixel Data has {length} bytes, expected {expected}")
