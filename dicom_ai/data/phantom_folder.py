"""The phantom study folder format: its writer and its reader, together.

Files on disk (:func:`write_study`; read by :func:`read_manifest`)::

    OUT/<study-folder>/
        L_CC.dcm, L_MLO.dcm, R_CC.dcm, R_MLO.dcm   # the four views, chosen transfer syntax
        masks/<LAT>_<VIEW>_<key>.png               # one 8-bit PNG per ground-truth mask key
                                                   # (0 = absent, 255 = present), stored grid
        masks/<LAT>_<VIEW>_breast.png              # the breast region (skin included)
        manifest.json                              # see below

``manifest.json`` holds ``format`` ("dicom_ai-phantom/1"), ``seed``, ``density`` (BI-RADS
a-d), ``normal``, ``breast_labels`` ({"L": {"benign": b, "malignant": b}, "R": ...}), and
``images``: one entry per view with ``file``, ``laterality``, ``view``, ``sop_instance_uid``,
``rows``, ``columns``, ``spacing_mm`` ([row, column] at the detector), ``faces_left``
(True when the nipple points to column 0, i.e. R views), ``labels``, ``masks`` ({key: PNG path
relative to the study folder}) and ``findings`` (each with ``kind``, ``malignant``, ``shape``,
``size_mm``, ``center_rc`` in stored pixels, ``area_px``). All mask PNGs are on the stored
pixel grid of their DICOM file (same rows/columns, no flip).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dicom_ai.core.errors import DatasetError
from dicom_ai.data.mg import TRANSFER_SYNTAXES, encode
from dicom_ai.data.phantom import PhantomStudy

__all__ = ["FORMAT", "write_study", "read_manifest"]

#: The ``format`` value of every manifest this module writes and reads.
FORMAT = "dicom_ai-phantom/1"


def _png(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path, optimize=False)


def write_study(study: PhantomStudy, out_dir: str | Path, transfer_syntax: str = "explicit") -> Path:
    """Write the four views, ground-truth PNG masks and ``manifest.json`` into ``out_dir``.

    Returns the path of the manifest. The layout is documented in this module's docstring.

    Parameters
    ----------
    study
        The study to write, from :func:`~dicom_ai.data.phantom.generate_study`; its masks
        are written as they are, on the stored pixel grid of each view (no flip).
    out_dir
        The study folder; created (with ``masks/``) when missing, existing files of the same
        names are overwritten.
    transfer_syntax
        Key of :data:`~dicom_ai.data.mg.TRANSFER_SYNTAXES` for the DICOM files:
        ``"explicit"``, ``"jpeg2000"``, ``"jpegls"`` or ``"rle"`` (all lossless).

    Returns
    -------
    pathlib.Path
        ``out_dir / "manifest.json"``.

    Raises
    ------
    ValueError
        When ``transfer_syntax`` is not a known key.
    RuntimeError
        When the codec plugin for a compressed syntax is missing.
    """
    out = Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    entries = []
    for image in study.images:
        stem = f"{image.laterality}_{image.view}"
        ds = encode(image.dataset, transfer_syntax)
        ds.save_as(out / f"{stem}.dcm", enforce_file_format=True)
        masks = {}
        for key, mask in list(image.masks.items()) + [("breast", image.breast_mask)]:
            rel = f"masks/{stem}_{key}.png"
            _png(out / rel, mask)
            masks[key] = rel
        entries.append({
            "file": f"{stem}.dcm",
            "laterality": image.laterality,
            "view": image.view,
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "rows": int(ds.Rows),
            "columns": int(ds.Columns),
            "spacing_mm": [float(image.spacing_mm), float(image.spacing_mm)],
            "faces_left": image.laterality == "R",
            "labels": dict(image.labels),
            "masks": masks,
            "findings": [dict(f) for f in image.findings],
        })
    manifest = {
        "format": FORMAT,
        "seed": study.seed,
        "density": study.density,
        "normal": study.normal,
        "transfer_syntax": str(TRANSFER_SYNTAXES[transfer_syntax]),
        "breast_labels": study.breast_labels,
        "images": entries,
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path



def read_manifest(path: str | Path) -> dict:
    """Read a study folder's ``manifest.json`` (written by :func:`write_study`).

    Raises :class:`~dicom_ai.core.errors.DatasetError` when the file is not a phantom
    manifest of this format.
    """
    path = Path(path)
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise DatasetError(f"{path}: not a dicom_ai phantom manifest")
    return meta
