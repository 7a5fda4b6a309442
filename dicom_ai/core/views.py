"""Which view and which breast a mammogram shows: the one reader and the one code table.

Kept free of heavy imports so the receiving process (the SCP) can use it without torch. The
result writers, the preview, the phantom generator and the SCP all name views through here.
"""

from __future__ import annotations

import pydicom
from pydicom.sr.coding import Code

__all__ = ["VIEW_CODES", "view_of", "laterality_of", "image_name"]

#: Short view name -> SNOMED view code (View Code Sequence, CID 4014), as an MG image carries it.
VIEW_CODES: dict[str, Code] = {
    "CC": Code("399162004", "SCT", "cranio-caudal"),
    "MLO": Code("399368009", "SCT", "medio-lateral oblique"),
    "ML": Code("399260004", "SCT", "medio-lateral"),
    "LM": Code("399352003", "SCT", "latero-medial"),
    "XCCL": Code("399192008", "SCT", "cranio-caudal exaggerated laterally"),
    "XCCM": Code("399101009", "SCT", "cranio-caudal exaggerated medially"),
}
_VIEW_BY_CODE = {code.value: name for name, code in VIEW_CODES.items()}


def view_of(ds: pydicom.Dataset) -> str:
    """The view from View Code Sequence, else View Position (upper case; '' if neither)."""
    seq = ds.get("ViewCodeSequence")
    if seq:
        code = str(seq[0].get("CodeValue", ""))
        if code in _VIEW_BY_CODE:
            return _VIEW_BY_CODE[code]
    return str(ds.get("ViewPosition", "")).upper()


def laterality_of(ds: pydicom.Dataset) -> str:
    """'L' or 'R' from Image Laterality, else series Laterality; '' when unknown."""
    value = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")).upper()
    return value if value in ("L", "R") else ""


def image_name(ds: pydicom.Dataset) -> str:
    """A short human name of the view, ``"L CC"``; ``?`` stands for an unknown laterality."""
    return f"{laterality_of(ds) or '?'} {view_of(ds)}".strip()
