"""Training and evaluation data: one ``Sample`` per mammogram, from phantoms or published data sets.

Every adapter yields ``Sample(image, masks, labels, view, laterality, study, source)`` where
``image`` is a :class:`dicom_ai.preprocess.Mammogram` on the stored grid, ``masks`` holds the
six ground-truth keys of :data:`MASK_KEYS` as boolean arrays on that grid (all zeros when a data
set has no such annotation), and ``labels`` = {"benign": bool, "malignant": bool} for the image.
``study`` groups the images of one examination (breast level = study + laterality).

Supported layouts (the published ones, so a site holding one of them can train):

* **phantom** — folders written by ``dicom-ai phantom`` (``manifest.json`` + DICOM + PNG masks);
  found recursively under the root.
* **INbreast** — ``AllDICOMs/<FileName>_*.dcm``, ``AllXML/<FileName>.xml`` (Apple plist ROIs with
  ``Point_px`` "(x, y)" contours) and ``INbreast.csv`` (``;``-separated, columns File Name,
  Laterality, View, Bi-Rads). Image class from Bi-Rads: 1 normal, 2-3 benign, 4a/4b/4c/5/6
  malignant; every ROI of an image takes that class. ROI names: Mass (and Spiculated Region) ->
  mass, Cluster -> cluster region, Calcification -> individual calcification (single-point ROIs
  mark one pixel); others (asymmetry, distortion) are not segmented.
* **CBIS-DDSM** — the TCIA download folder plus its description CSVs
  (``mass_case_description_*.csv``, ``calc_case_description_*.csv``). Paths in the CSV are
  resolved by their first folder name (``Mass-Training_P_00001_LEFT_CC``, ``..._1`` for ROIs),
  because TCIA's file names differ from the CSV's; of the DICOMs in an ROI folder the one with
  the full image's size is the mask (the other is the cropped patch). Pathology MALIGNANT ->
  malignant, BENIGN and BENIGN_WITHOUT_CALLBACK -> benign; mass ROIs -> mass masks,
  calcification ROIs -> cluster masks (CBIS-DDSM outlines the cluster, not each speck).
* **VinDr-Mammo** — ``images/<study_id>/<image_id>.dicom``, ``breast-level_annotations.csv`` and
  ``finding_annotations.csv`` (boxes ``xmin, ymin, xmax, ymax`` in stored pixels). Boxes are
  filled as rectangles: Mass -> mass, Suspicious Calcification -> cluster. VinDr has no
  pathology, so BI-RADS stands in: finding/breast BI-RADS 4-5 -> malignant, 2-3 -> benign.
"""

from __future__ import annotations

import ast
import csv
import json
import plistlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from PIL import Image, ImageDraw

from dicom_ai.core.errors import DatasetError
from dicom_ai.data.phantom_folder import read_manifest
from dicom_ai.data.sample import MASK_KEYS, Sample
from dicom_ai.imaging import Mammogram, faces_left_by_content, read_mammogram

FORMATS = ("phantom", "inbreast", "cbis-ddsm", "vindr")


@dataclass
class _Record:
    path: Path
    laterality: str
    view: str
    study: str
    labels: dict[str, bool]
    extra: dict


def _empty_masks(shape: tuple[int, int]) -> dict[str, np.ndarray]:
    return {k: np.zeros(shape, dtype=bool) for k in MASK_KEYS}


def _read(path: Path, laterality: str = "", view: str = "") -> Mammogram:
    """Decode a mammogram; laterality/view from the data set's index override the header."""
    ds = pydicom.dcmread(str(path))
    m = read_mammogram(ds)
    if laterality:
        m.laterality = laterality
    if view:
        m.view = view
    if not ds.get("PatientOrientation"):
        # No orientation in the header (CBIS-DDSM, some exports): orient by content.
        m.faces_left = faces_left_by_content(m.breast_mask)
    return m


class _Dataset:
    """Common sequence behaviour: an index of records built up front, decoding on access."""

    records: list[_Record]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index: int) -> Sample:  # pragma: no cover - each adapter implements
        raise NotImplementedError


# --------------------------------------------------------------------------- phantom


class PhantomDataset(_Dataset):
    """Studies written by ``dicom-ai phantom`` (any depth below ``root``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifests = sorted(self.root.rglob("manifest.json"))
        if not manifests:
            raise DatasetError(f"no manifest.json below {self.root}; write studies with `dicom-ai phantom --out`")
        self.records = []
        for mf in manifests:
            meta = read_manifest(mf)
            for entry in meta["images"]:
                self.records.append(_Record(mf.parent / entry["file"], entry["laterality"], entry["view"],
                                            f"phantom-{meta['seed']}", dict(entry["labels"]),
                                            {"masks": {k: mf.parent / v for k, v in entry["masks"].items()},
                                             "findings": entry.get("findings", [])}))

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        image = _read(rec.path)
        masks = {}
        for key in MASK_KEYS:
            arr = np.asarray(Image.open(rec.extra["masks"][key])) > 127
            if arr.shape != image.shape:
                raise DatasetError(f"{rec.extra['masks'][key]}: mask shape {arr.shape} != image {image.shape}")
            masks[key] = arr
        return Sample(image, masks, dict(rec.labels), rec.view, rec.laterality, rec.study, str(rec.path))


# --------------------------------------------------------------------------- INbreast

_INBREAST_MALIGNANT = {"4", "4a", "4b", "4c", "5", "6"}


def _inbreast_class(birads: str) -> str:
    b = birads.strip().lower()
    if b in _INBREAST_MALIGNANT:
        return "malignant"
    if b in ("2", "3"):
        return "benign"
    return "normal"


def _fill_polygon(mask: np.ndarray, points_rc: np.ndarray) -> None:
    """Fill a polygon (rows, cols in pixels) into ``mask`` (even-odd rule), plus its vertices."""
    if len(points_rc) == 0:
        return
    rows, cols = mask.shape
    if len(points_rc) < 3:
        for r, c in points_rc:
            ri, ci = int(round(r)), int(round(c))
            if 0 <= ri < rows and 0 <= ci < cols:
                mask[ri, ci] = True
        return
    canvas = Image.new("1", (cols, rows), 0)
    ImageDraw.Draw(canvas).polygon([(float(c), float(r)) for r, c in points_rc], fill=1, outline=1)
    mask |= np.asarray(canvas, dtype=bool)


def _parse_point(text: str) -> tuple[float, float]:
    x, y = (float(v) for v in text.strip().strip("()").split(","))
    return y, x


class INbreastDataset(_Dataset):
    """INbreast: AllDICOMs/, AllXML/ and INbreast.csv under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        table = self.root / "INbreast.csv"
        dicoms = self.root / "AllDICOMs"
        if not table.is_file() or not dicoms.is_dir():
            raise DatasetError(f"{self.root}: expected INbreast.csv and AllDICOMs/ (the INbreast release layout)")
        by_id = {}
        for path in dicoms.glob("*.dcm"):
            by_id[path.name.split("_")[0]] = path
        self.records = []
        with table.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=";")
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                file_id = row.get("File Name", "")
                if not file_id or file_id not in by_id:
                    continue
                cls = _inbreast_class(row.get("Bi-Rads", ""))
                view = row.get("View", "").upper()
                self.records.append(_Record(
                    by_id[file_id], row.get("Laterality", "").upper(), "MLO" if view == "ML" else view,
                    by_id[file_id].name.split("_")[1] if "_" in by_id[file_id].name else row.get("Patient ID", ""),
                    {"benign": cls == "benign", "malignant": cls == "malignant"},
                    {"xml": self.root / "AllXML" / f"{file_id}.xml", "class": cls}))
        if not self.records:
            raise DatasetError(f"{table}: no rows whose File Name matches a DICOM in {dicoms}")

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        image = _read(rec.path, rec.laterality, rec.view)
        masks = _empty_masks(image.shape)
        cls = rec.extra["class"]
        xml = rec.extra["xml"]
        if xml.is_file() and cls != "normal":
            plist = plistlib.loads(xml.read_bytes())
            for entry in plist.get("Images", []):
                for roi in entry.get("ROIs", []):
                    name = str(roi.get("Name", "")).strip().lower()
                    points = np.array([_parse_point(p) for p in roi.get("Point_px", [])], dtype=np.float64)
                    if name in ("mass", "spiculated region"):
                        _fill_polygon(masks[f"mass_{cls}"], points)
                    elif name == "cluster":
                        _fill_polygon(masks[f"cluster_{cls}"], points)
                    elif name in ("calcification", "calcifications"):
                        _fill_polygon(masks[f"calcification_{cls}"], points)
        return Sample(image, masks, dict(rec.labels), rec.view, rec.laterality, rec.study, str(rec.path))


# --------------------------------------------------------------------------- CBIS-DDSM


def _top_folder(csv_path: str) -> str:
    return csv_path.strip().replace("\\", "/").split("/")[0]


class CBISDDSMDataset(_Dataset):
    """CBIS-DDSM: the TCIA image folders and the case description CSVs under ``root``."""

    def __init__(self, root: str | Path, csv_files: list[str | Path] | None = None):
        self.root = Path(root)
        files = [Path(p) for p in csv_files] if csv_files else sorted(self.root.glob("*case_description*.csv"))
        if not files:
            raise DatasetError(f"{self.root}: no *case_description*.csv (mass_case_description_train_set.csv, ...)")
        self._folders = {}
        for d in self.root.rglob("*"):
            if d.is_dir() and re.match(r"^(Mass|Calc)-(Training|Test)_P_\d+", d.name):
                self._folders.setdefault(d.name, d)
        images: dict[str, _Record] = {}
        for f in files:
            with f.open(newline="", encoding="utf-8-sig") as fh:
                for row in csv.DictReader(fh):
                    row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                    full = _top_folder(row["image file path"])
                    kind = "mass" if row.get("abnormality type", "").lower().startswith("mass") else "cluster"
                    cls = "malignant" if row.get("pathology", "").upper() == "MALIGNANT" else "benign"
                    rec = images.get(full)
                    if rec is None:
                        lat = "L" if row.get("left or right breast", "").upper().startswith("L") else "R"
                        rec = images[full] = _Record(Path(full), lat, row.get("image view", "").upper(),
                                                     row.get("patient_id", ""), {"benign": False, "malignant": False},
                                                     {"rois": []})
                    rec.labels[cls] = True
                    rec.extra["rois"].append((f"{kind}_{cls}", _top_folder(row["ROI mask file path"])))
        self.records = list(images.values())
        if not self.records:
            raise DatasetError(f"{self.root}: the description CSVs list no images")

    def _dicoms(self, folder: str) -> list[Path]:
        d = self._folders.get(folder)
        if d is None:
            raise DatasetError(f"CBIS-DDSM folder {folder} not found below {self.root}")
        found = sorted(d.rglob("*.dcm"))
        if not found:
            raise DatasetError(f"no DICOM files in {d}")
        return found

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        path = self._dicoms(str(rec.path))[0]
        image = _read(path, rec.laterality, rec.view)
        masks = _empty_masks(image.shape)
        for key, folder in rec.extra["rois"]:
            mask = None
            for candidate in self._dicoms(folder):
                ds = pydicom.dcmread(str(candidate))
                if (int(ds.Rows), int(ds.Columns)) == image.shape:
                    mask = ds.pixel_array > 0
                    break
            if mask is None:
                raise DatasetError(f"{folder}: no ROI mask of the full image's size {image.shape}")
            masks[key] |= mask
        return Sample(image, masks, dict(rec.labels), rec.view, rec.laterality, rec.study, str(path))


# --------------------------------------------------------------------------- VinDr-Mammo


def _birads_number(text: str) -> int:
    m = re.search(r"(\d)", text or "")
    return int(m.group(1)) if m else 0


def _categories(text: str) -> list[str]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = [text]
    return [str(v).strip() for v in (value if isinstance(value, (list, tuple)) else [value])]


class VinDrMammoDataset(_Dataset):
    """VinDr-Mammo: images/<study>/<image>.dicom with the two annotation CSVs under ``root``."""

    def __init__(self, root: str | Path, split: str | None = None):
        self.root = Path(root)
        breast_csv = self.root / "breast-level_annotations.csv"
        finding_csv = self.root / "finding_annotations.csv"
        if not breast_csv.is_file() or not finding_csv.is_file():
            raise DatasetError(f"{self.root}: expected breast-level_annotations.csv and finding_annotations.csv")
        boxes: dict[str, list[tuple[str, int, tuple[float, float, float, float]]]] = {}
        with finding_csv.open(newline="", encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh):
                cats = _categories(row.get("finding_categories", ""))
                if not row.get("xmin"):
                    continue
                box = tuple(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
                for cat in cats:
                    boxes.setdefault(row["image_id"], []).append((cat, _birads_number(row.get("finding_birads", "")), box))
        self.records = []
        with breast_csv.open(newline="", encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh):
                if split and row.get("split", "") != split:
                    continue
                birads = _birads_number(row.get("breast_birads", ""))
                path = self.root / "images" / row["study_id"] / f"{row['image_id']}.dicom"
                self.records.append(_Record(path, row.get("laterality", "").upper(), row.get("view_position", "").upper(),
                                            row["study_id"], {"benign": birads in (2, 3), "malignant": birads >= 4},
                                            {"boxes": boxes.get(row["image_id"], [])}))
        if not self.records:
            raise DatasetError(f"{breast_csv}: no images{' in split ' + split if split else ''}")

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        if not rec.path.is_file():
            raise DatasetError(f"{rec.path} is missing")
        image = _read(rec.path, rec.laterality, rec.view)
        masks = _empty_masks(image.shape)
        rows, cols = image.shape
        for cat, birads, (x0, y0, x1, y1) in rec.extra["boxes"]:
            cat = cat.lower()
            kind = "mass" if cat == "mass" else "cluster" if "calcification" in cat else None
            if kind is None:
                continue
            cls = "malignant" if birads >= 4 else "benign"
            r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), rows)
            c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), cols)
            masks[f"{kind}_{cls}"][r0:r1, c0:c1] = True
        return Sample(image, masks, dict(rec.labels), rec.view, rec.laterality, rec.study, str(rec.path))


def open_dataset(fmt: str, root: str | Path, **kwargs) -> _Dataset:
    """The adapter for ``fmt`` (one of FORMATS) on ``root``."""
    adapters = {"phantom": PhantomDataset, "inbreast": INbreastDataset, "cbis-ddsm": CBISDDSMDataset,
                "vindr": VinDrMammoDataset}
    if fmt not in adapters:
        raise DatasetError(f"unknown data set format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return adapters[fmt](root, **kwargs)
