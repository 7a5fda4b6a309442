"""Which view and which breast a mammogram shows, read from its header.

Kept free of heavy imports so the receiving process (the SCP) can use it without torch.
"""

from __future__ import annotations

import pydicom

#: SNOMED view codes (View Code Sequence, CID 4014) -> short view name.
VIEW_CODES = {"399162004": "CC", "399368009": "MLO", "399260004": "ML", "399352003": "LM",
              "399192008": "XCCL", "399101009": "XCCM"}


def view_of(ds: pydicom.Dataset) -> str:
    """The view from View Code Sequence, else View Position (upper case; '' if neither)."""
    seq = ds.get("ViewCodeSequence")
    if seq:
        code = str(seq[0].get("CodeValue", ""))
        if code in VIEW_CODES:
            return VIEW_CODES[code]
    return str(ds.get("ViewPosition", "")).upper()


def laterality_of(ds: pydicom.Dataset) -> str:
    """'L' or 'R' from Image Laterality, else series Laterality; '' when unknown."""
    value = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")).upper()
    return value if value in ("L", "R") else ""
