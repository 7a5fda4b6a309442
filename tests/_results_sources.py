"""Small MG source images and findings for the result-writer tests.

Minimal dciodvfy-clean Digital Mammography X-Ray images (the recipe of
shared/research/dicom-tooling.md section 2.1), For Presentation or For Processing, MONOCHROME1
or MONOCHROME2, with synthetic probability maps. The phantom (dicom_ai.data.phantom) is used where
realism matters; these keep the writer tests fast and independent of it.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_ai.core.findings import ImageFindings, ImageScore, ModelIdentity, ProbabilityMap

MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
ORIENTATION = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"], ("L", "MLO"): ["A", "F"], ("R", "MLO"): ["P", "F"]}
VIEW_CODE = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}

GLAM = ModelIdentity("glam", "1.0.0")
DUNET = ModelIdentity("dunet", "0.3.1")
MICRO = ModelIdentity("microcalc", "2.0")


def _code(value: str, scheme: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def make_mg(laterality: str = "L", view: str = "CC", shape: tuple[int, int] = (256, 192),
            photometric: str = "MONOCHROME2", for_processing: bool = False,
            study_uid: str | None = None, seed: int = 0) -> pydicom.Dataset:
    """A dciodvfy-clean MG image with a bright half-ellipse 'breast' on the chest-wall side."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = MG_PROCESSING if for_processing else MG_PRESENTATION
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Writers", "TW0001", "19700101", "F"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20260101", "120000", "20260101", "120000"
    ds.AcquisitionDateTime = "20260101120000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "A1", "1", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Modality, ds.Manufacturer = "MG", "TEST"
    ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PatientOrientation = ORIENTATION[(laterality, view)]
    ds.ImageLaterality, ds.ViewPosition = laterality, view
    vc = _code(VIEW_CODE[view][0], "SCT", VIEW_CODE[view][1])
    vc.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [vc]
    ds.AnatomicRegionSequence = [_code("76752008", "SCT", "Breast")]
    ds.BodyPartExamined = ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent, ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "NO", "00"
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    if not for_processing:
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [0.1, 0.1]
    if for_processing:  # both spacing conventions are covered: Imager Pixel Spacing only, and both
        ds.PixelSpacing, ds.PixelSpacingCalibrationType = [0.094, 0.094], "GEOMETRY"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = 660, 620
    ds.EstimatedRadiographicMagnificationFactor = f"{660 / 620:.6f}"
    ds.PositionerPrimaryAngle = 0 if view == "CC" else 45
    ds.KVP, ds.ExposureTime, ds.XRayTubeCurrent, ds.Exposure = 28, 1000, 100, 100
    ds.AnodeTargetMaterial, ds.BodyPartThickness, ds.CompressionForce = "TUNGSTEN", 50, 100
    ds.AcquisitionContextSequence = []
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    yy, xx = np.mgrid[:rows, :cols]
    chest_left = ds.PatientOrientation[0] == "A"
    x = xx if chest_left else cols - 1 - xx
    breast = (x / (0.8 * cols)) ** 2 + ((yy - rows / 2) / (0.45 * rows)) ** 2 < 1
    img = 300 + breast * 2500 + rng.normal(0, 40, shape)
    img = np.clip(img, 0, 4095)
    if photometric == "MONOCHROME1":
        img = 4095 - img
    ds.PixelData = img.astype(np.uint16).tobytes()
    return ds


def blob(shape: tuple[int, int], centre: tuple[float, float], radius: tuple[float, float],
         peak: float = 0.95) -> np.ndarray:
    """A smooth elliptical probability blob, float32 in [0, 1]."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    d2 = ((yy - centre[0]) / radius[0]) ** 2 + ((xx - centre[1]) / radius[1]) ** 2
    return (peak * np.exp(-d2)).astype(np.float32)


def make_findings(ds: pydicom.Dataset, lesion: bool = True, seed: int = 0) -> ImageFindings:
    """GLAM malignant/benign, U-Net malignant, microcalc calcification/cluster maps and scores."""
    rng = np.random.default_rng(seed)
    shape = (int(ds.Rows), int(ds.Columns))
    r, c = shape[0] * 0.45, shape[1] * (0.3 if ds.PatientOrientation[0] == "A" else 0.7)
    zero = np.zeros(shape, np.float32)
    mal = blob(shape, (r, c), (14, 18)) + blob(shape, (r + 60, c + 5), (5, 5), 0.7) if lesion else zero.copy()
    ben = blob(shape, (r - 70, c), (10, 10), 0.8) if lesion else zero.copy()
    calc = zero.copy()
    if lesion:
        for _ in range(6):
            rr, cc = int(r + rng.integers(-12, 12)), int(c + rng.integers(-12, 12))
            calc[rr:rr + 2, cc:cc + 2] = 0.9
    cluster = blob(shape, (r, c), (16, 16), 0.85) if lesion else zero.copy()
    f = ImageFindings(ds.SOPInstanceUID)
    f.maps = [
        ProbabilityMap("malignant_lesion", np.clip(mal, 0, 1), 0.5, GLAM),
        ProbabilityMap("benign_lesion", ben, 0.5, GLAM),
        ProbabilityMap("malignant_lesion", np.clip(mal * 0.9, 0, 1), 0.4, DUNET),
        ProbabilityMap("calcification", calc, 0.5, MICRO),
        ProbabilityMap("calcification_cluster", cluster, 0.5, MICRO),
    ]
    f.scores = [ImageScore("malignant", 0.83 if lesion else 0.04, GLAM),
                ImageScore("benign", 0.41 if lesion else 0.02, GLAM)]
    return f


def make_study(photometric: str = "MONOCHROME2", for_processing: bool = False,
               shape: tuple[int, int] = (256, 192)) -> tuple[list[pydicom.Dataset], list[ImageFindings]]:
    """Four views of one study; the left breast has findings, the right breast none."""
    study = generate_uid()
    sources, findings = [], []
    for i, (lat, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]):
        ds = make_mg(lat, view, shape, photometric, for_processing, study, seed=i)
        ds.InstanceNumber = i + 1
        sources.append(ds)
        findings.append(make_findings(ds, lesion=(lat == "L"), seed=i))
    return sources, findings


# --- Built results, cached per test process, and checks shared by the writer tests ---------

import functools  # noqa: E402
import io  # noqa: E402

import highdicom as hd  # noqa: E402
from matplotlib.path import Path as _Path  # noqa: E402

VARIANTS = [("MONOCHROME2", False), ("MONOCHROME1", False), ("MONOCHROME2", True), ("MONOCHROME1", True)]


@functools.lru_cache(maxsize=None)
def built(photometric: str = "MONOCHROME2", for_processing: bool = False, cad_sr: bool = True,
          segmentation_type: str = "BINARY", compression: str = "none"):
    """(sources, findings, uids, datasets) of one synthetic study, built once per process."""
    from dicom_ai.core.options import ResultOptions
    from dicom_ai.core.uids import ResultUIDs
    from dicom_ai.results import build_results

    sources, findings = make_study(photometric, for_processing)
    uids = ResultUIDs.generate([str(d.SOPInstanceUID) for d in sources])
    options = ResultOptions(cad_sr=cad_sr, segmentation_type=segmentation_type, compression=compression)
    return sources, findings, uids, build_results(sources, findings, uids, options).datasets


def roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Write to bytes and read back (what a receiver sees)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def seg_masks(seg_ds: pydicom.Dataset, source_uid: str) -> np.ndarray:
    """(segments, rows, cols) masks of a SEG read back with highdicom."""
    buf = io.BytesIO()
    seg_ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    seg = hd.seg.segread(buf)
    numbers = list(range(1, seg.number_of_segments + 1))
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source_uid], segment_numbers=numbers)
    return np.moveaxis(arr[0], -1, 0)


def _items(ds, path=()):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _name(item) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def sr_regions(sr: pydicom.Dataset) -> list[dict]:
    """Planar ROI groups with a SCOORD region: contour, source UID, SEG UID, frame, area."""
    out = []
    for group in _items(sr):
        if _name(group) != "125007":
            continue
        children = list(group.get("ContentSequence", []))
        scoords = [c for c in children if c.ValueType == "SCOORD" and _name(c) == "111030"]
        if not scoords:
            continue
        sc = scoords[0]
        src = sc.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        area = next(c for c in children if c.ValueType == "NUM" and _name(c) == "42798000")
        ref = next(c for c in area.ContentSequence if c.ValueType == "IMAGE").ReferencedSOPSequence[0]
        out.append({"contour": np.asarray(sc.GraphicData, dtype=float).reshape(-1, 2), "source": src,
                    "graphic_type": sc.GraphicType,
                    "seg": ref.ReferencedSOPInstanceUID, "frame": int(ref.ReferencedFrameNumber),
                    "area": float(area.MeasuredValueSequence[0].NumericValue),
                    "tracking": next(str(c.TextValue) for c in children if _name(c) == "112039")})
    return out


def contour_inside(contour: np.ndarray, mask: np.ndarray) -> tuple[bool, int]:
    """Is a closed SCOORD polyline (column, row) inside ``mask``?

    Every vertex must lie on a mask pixel, and every pixel whose centre lies strictly
    inside the polygon must be a mask pixel. Returns (ok, pixels strictly inside).
    """
    cols, rows = contour[:, 0], contour[:, 1]
    if not mask[np.floor(rows).astype(int), np.floor(cols).astype(int)].all():
        return False, 0
    r0, r1 = int(np.floor(rows.min())), min(int(np.ceil(rows.max())) + 1, mask.shape[0])
    c0, c1 = int(np.floor(cols.min())), min(int(np.ceil(cols.max())) + 1, mask.shape[1])
    yy, xx = np.mgrid[r0:r1, c0:c1]
    centres = np.column_stack([xx.ravel() + 0.5, yy.ravel() + 0.5])
    inside = _Path(contour).contains_points(centres).reshape(yy.shape)
    return bool(not (inside & ~mask[r0:r1, c0:c1]).any()), int(inside.sum())


@functools.lru_cache(maxsize=None)
def built_small(cad_sr: bool = True):
    """A two-image study (L CC with findings, R CC without), no single calcifications: the
    smallest study that has every kind of SR content, for the slow PixelMed runs."""
    from dicom_ai.core.options import ResultOptions
    from dicom_ai.core.uids import ResultUIDs
    from dicom_ai.results import build_results

    study = generate_uid()
    sources, findings = [], []
    for i, lat in enumerate(("L", "R")):
        ds = make_mg(lat, "CC", (192, 144), "MONOCHROME1", True, study, seed=i)
        ds.InstanceNumber = i + 1
        f = make_findings(ds, lesion=(lat == "L"), seed=i)
        f.maps = [m for m in f.maps if m.finding != "calcification"]
        sources.append(ds)
        findings.append(f)
    uids = ResultUIDs.generate([str(d.SOPInstanceUID) for d in sources])
    return sources, findings, uids, build_results(sources, findings, uids, ResultOptions(cad_sr=cad_sr)).datasets


@functools.lru_cache(maxsize=None)
def pixelmed_reports(tmp_dir: str) -> dict:
    """PixelMed DicomSRValidator on the small study's TID 1500 SR and CAD SR, run in parallel
    (each run costs ~11 s of CPU, mostly JVM start and XSLT compilation)."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from conformance.validators import pixelmed_sr

    sources, findings, uids, datasets = built_small()
    paths = {}
    for ds in datasets:
        if ds.Modality == "SR":
            kind = "cad" if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.50" else "tid1500"
            paths[kind] = Path(tmp_dir) / f"{kind}.dcm"
            ds.save_as(paths[kind], enforce_file_format=True)
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(pixelmed_sr, p) for k, p in paths.items()}
        return {k: f.result() for k, f in futures.items()}
