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
    """The view from View Code Sequence, else View Position (upper case; '' if neither).

    Never raises: a malformed attribute (wrong VR, a string where a sequence belongs, a value
    pydicom cannot convert) counts as absent, so a received image with a bad header is an
    image of unknown view rather than a failure.
    """
    try:
        seq = ds.get("ViewCodeSequence")
        if isinstance(seq, pydicom.Sequence) and len(seq) and isinstance(seq[0], pydicom.Dataset):
            code = seq[0].get("CodeValue", "")
            if isinstance(code, str) and code in _VIEW_BY_CODE:
                return _VIEW_BY_CODE[code]
    except Exception:  # pydicom raises many types converting malformed values
        pass
    return _text(ds, "ViewPosition").upper()


def laterality_of(ds: pydicom.Dataset) -> str:
    """'L' or 'R' from Image Laterality, else series Laterality; '' when unknown.

    Never raises: a malformed value counts as unknown (see :func:`view_of`).
    """
    value = (_text(ds, "ImageLaterality") or _text(ds, "Laterality")).upper()
    return value if value in ("L", "R") else ""


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    """A single-valued text attribute, or '' when absent or not a single string."""
    try:
        value = ds.get(keyword)
    except Exception:  # pydicom raises many types converting malformed values
        return ""
    return value.strip() if isinstance(value, str) else ""


def image_name(ds: pydicom.Dataset) -> str:
    """A short human name of the view, ``"L CC"``; ``?`` stands for an unknown laterality."""
    return f"{laterality_of(ds) or '?'} {view_of(ds)}".strip()
