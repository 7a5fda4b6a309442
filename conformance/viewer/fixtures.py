"""The study the viewer check opens: a phantom screening study plus the node's results.

The findings are the phantom's ground truth handed to the result writers as if a perfect
model had produced them (a probability of 0.9 inside each lesion, 0.02 outside), so what the
viewer must show is known to the pixel. Results come from the node's writers
(``dicom_ai.results.build_results``) when they are in the tree; otherwise from the highdicom
recipe of shared/research/dicom-tooling.md §2.2-2.3, so the check runs while the writers are
being built. ``Study.writer`` says which one made them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.core.findings import ImageFindings, ImageScore, ModelIdentity, ProbabilityMap
from dicom_ai.data.phantom import generate_study
from dicom_ai.results.regions import Region, area_spacing, find_regions

GROUND_TRUTH_MODEL = ModelIdentity(name="phantom-ground-truth", version="1")
THRESHOLD = 0.5
# Phantom mask keys -> the finding key a model reports them under.
_MASKS_FOR_FINDING = {
    "malignant_lesion": ("mass_malignant",),
    "benign_lesion": ("mass_benign",),
    "calcification_cluster": ("cluster_malignant", "cluster_benign"),
}
#: The Image Orientation (Patient) OHIF/cornerstone assumes for an image that has none.
CORNERSTONE_DEFAULT_IOP = [1, 0, 0, 0, 1, 0]


@dataclass
class Study:
    images: list[pydicom.Dataset]
    findings: list[ImageFindings]
    results: list[pydicom.Dataset] = field(default_factory=list)
    writer: str = ""
    # SOPInstanceUID of an MG image -> regions (contours in SCOORD (column, row)) per finding
    regions: dict[str, dict[str, list[Region]]] = field(default_factory=dict)

    @property
    def segs(self) -> list[pydicom.Dataset]:
        return [ds for ds in self.results if ds.Modality == "SEG"]

    @property
    def srs(self) -> list[pydicom.Dataset]:
        """TID 1500 reports (Comprehensive 3D SR), the ones OHIF draws."""
        return [ds for ds in self.results if ds.Modality == "SR" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"]

    @property
    def views(self) -> list[pydicom.Dataset]:
        """The per-image presentation states (GSPS) and "AI overlay" Secondary Captures."""
        return [ds for ds in self.results if ds.Modality in ("PR", "OT")]

    @property
    def other_srs(self) -> list[pydicom.Dataset]:
        """Other SR objects (the Mammography CAD SR when enabled)."""
        return [ds for ds in self.results if ds.Modality == "SR" and ds not in self.srs]


def ground_truth_findings(images, masks_per_image) -> list[ImageFindings]:
    """ImageFindings a perfect model would report for the phantom masks."""
    out = []
    for ds, masks in zip(images, masks_per_image):
        f = ImageFindings(sop_instance_uid=ds.SOPInstanceUID)
        for key, mask_keys in _MASKS_FOR_FINDING.items():
            mask = np.zeros((ds.Rows, ds.Columns), dtype=bool)
            for k in mask_keys:
                mask |= masks[k]
            if mask.any():
                prob = np.where(mask, 0.9, 0.02).astype(np.float32)
                f.maps.append(ProbabilityMap(key, prob, THRESHOLD, GROUND_TRUTH_MODEL))
        malignant = any(masks[k].any() for k in ("mass_malignant", "cluster_malignant", "calcification_malignant"))
        benign = any(masks[k].any() for k in ("mass_benign", "cluster_benign", "calcification_benign"))
        f.scores.append(ImageScore("malignant", 0.9 if malignant else 0.05, GROUND_TRUTH_MODEL))
        f.scores.append(ImageScore("benign", 0.9 if benign else 0.05, GROUND_TRUTH_MODEL))
        out.append(f)
    return out


def _recipe_results(images: list[pydicom.Dataset], findings: list[ImageFindings],
                    regions: dict[str, dict[str, list[Region]]]) -> list[pydicom.Dataset]:
    """One SEG per image with findings and one TID 1500 SR, as in tooling §2.2-2.3 (v3b)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from dicom_ai.results.codes import finding_codes

    algo = hd.AlgorithmIdentificationSequence(name=GROUND_TRUTH_MODEL.name, version=GROUND_TRUTH_MODEL.version,
                                              family=codes.cid7162.ArtificialIntelligence)
    segs, groups = [], []
    for mg, f in zip(images, findings):
        if not f.maps:
            continue
        descs, planes = [], []
        for n, m in enumerate(f.maps, start=1):
            fc = finding_codes(m.finding)
            descs.append(hd.seg.SegmentDescription(
                segment_number=n, segment_label=fc.label, segmented_property_category=fc.category,
                segmented_property_type=fc.property_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algo, anatomic_regions=[codes.SCT.Breast]))
            planes.append(m.probability >= m.threshold)
        seg = hd.seg.Segmentation(
            source_images=[mg], pixel_array=np.stack(planes, axis=-1)[None].astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descs,
            series_instance_uid=generate_uid(), series_number=100, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="dicom_ai", manufacturer_model_name="viewer-check",
            software_versions="0.1", device_serial_number="1", series_description="AI SEG (recipe)")
        seg.PatientOrientation = mg.PatientOrientation
        segs.append(seg)
        for key, regs in regions[mg.SOPInstanceUID].items():
            for r in regs:
                region = hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=r.contour.astype(np.float32),
                    source_image=hd.sr.SourceImageForRegion.from_source_image(mg))
                groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=generate_uid(), identifier=f"{finding_codes(key).label} {r.index}"),
                    referenced_region=region, finding_type=finding_codes(key).sr_finding,
                    measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=r.area_mm2,
                                                     unit=codes.UCUM.SquareMillimeter)]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="dicom_ai", manufacturer_name="dicom_ai", model_name="viewer-check"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport)
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(images), content=report[0], series_instance_uid=generate_uid(), series_number=101,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="dicom_ai", is_complete=True,
        is_final=False, is_verified=False, series_description="AI SR (recipe)")
    return [*segs, sr]


def _node_results(images, findings, cad_sr: bool) -> list[pydicom.Dataset] | None:
    """The node's own writers with their default options (and the optional "AI overlay" SC), or
    None while they are not in the tree."""
    try:
        from dicom_ai.core.options import ResultOptions
        from dicom_ai.core.uids import ResultUIDs
        from dicom_ai.results import build_results
    except ImportError:
        return None
    uids = ResultUIDs.generate([ds.SOPInstanceUID for ds in images])
    return build_results(images, findings, uids, ResultOptions(cad_sr=cad_sr, secondary_capture=True)).datasets


def sr_contours(sr: pydicom.Dataset) -> dict[str, list[tuple[str, np.ndarray]]]:
    """SCOORD POLYLINE/POLYGON regions of an SR per referenced image: (group name, (N,2) column,row)."""
    out: dict[str, list[tuple[str, np.ndarray]]] = {}

    def walk(items, name):
        for it in items:
            concept = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            if it.get("ValueType") == "CONTAINER" and concept == "Measurement Group":
                name = ""
                for child in it.get("ContentSequence", []):
                    if child.get("ValueType") == "TEXT" and "TextValue" in child:
                        name = child.TextValue
            if it.get("ValueType") == "SCOORD" and it.get("GraphicType") in ("POLYLINE", "POLYGON"):
                pts = np.asarray(it.GraphicData, dtype=np.float64).reshape(-1, 2)
                for ref in it.get("ContentSequence", []):
                    for r in ref.get("ReferencedSOPSequence", []):
                        out.setdefault(str(r.ReferencedSOPInstanceUID), []).append((name, pts))
            walk(it.get("ContentSequence", []), name)
    walk(sr.get("ContentSequence", []), "")
    return out


def make_study(seed: int = 2, shape=(832, 640), writer: str = "auto", cad_sr: bool = False) -> Study:
    """Phantom images, ground-truth findings and SEG/SR results for the viewer to show.

    ``writer`` is ``node`` (dicom_ai.results, required), ``recipe`` (tooling §2.2-2.3) or
    ``auto`` (node when available).
    """
    ph = generate_study(seed, shape=shape, normal=False)
    images = [im.dataset for im in ph.images]
    findings = ground_truth_findings(images, [im.masks for im in ph.images])
    regions = {}
    for ds, f in zip(images, findings):
        spacing = area_spacing(ds)
        regions[ds.SOPInstanceUID] = {m.finding: find_regions(m.probability, m.threshold, spacing).regions
                                      for m in f.maps}
    study = Study(images=images, findings=findings, regions=regions)
    results = None if writer == "recipe" else _node_results(images, findings, cad_sr)
    if results is None:
        if writer == "node":
            raise RuntimeError("dicom_ai.results.build_results is not available in this tree")
        study.results, study.writer = _recipe_results(images, findings, regions), "highdicom recipe (tooling §2.2-2.3)"
    else:
        study.results, study.writer = results, "dicom_ai.results.build_results"
    return study


def _copy_as_new_series(ds: pydicom.Dataset, suffix: str, number_offset: int) -> pydicom.Dataset:
    out = copy.deepcopy(ds)
    out.SeriesInstanceUID, out.SOPInstanceUID = generate_uid(), generate_uid()
    if "file_meta" in dir(out) and out.file_meta is not None:
        out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.SeriesDescription = f"{ds.get('SeriesDescription', '')} {suffix}".strip()[:64]
    out.SeriesNumber = int(ds.get("SeriesNumber") or 0) + number_offset
    return out


def sr_geometry_groups_only(sr: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``sr`` (new series) keeping only Measurement Groups that carry a SCOORD.

    Experiment only: OHIF 3.13 stops drawing an SR at the first Measurement Group without
    spatial coordinates (segment references, image and breast scores), see viewer.md.
    """
    out = _copy_as_new_series(sr, "geometry only (experiment)", 60)
    for item in out.ContentSequence:
        if item.get("ValueType") == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "126010":
            item.ContentSequence = [
                g for g in item.get("ContentSequence", [])
                if any(c.get("ValueType") in ("SCOORD", "SCOORD3D") or any(
                    cc.get("ValueType") in ("SCOORD", "SCOORD3D") for cc in c.get("ContentSequence", []))
                    for c in g.get("ContentSequence", []))]
    return out


def with_plane_orientation(seg: pydicom.Dataset, source: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``seg`` (its own new series) with the plane geometry OHIF 3.13 needs.

    Adds Plane Orientation (Patient) = :data:`CORNERSTONE_DEFAULT_IOP` to the shared functional
    groups, and Pixel Measures (Pixel Spacing of ``source``) when the SEG has none. Experiment
    only (see conformance/viewer.md): PS3.3 Table A.51-2 allows both functional groups only when
    the SEG has a patient-relative Frame of Reference, which an MG has not.
    """
    out = _copy_as_new_series(seg, "+ PlaneOrientation/PixelMeasures (experiment)", 50)
    if not out.get("SharedFunctionalGroupsSequence"):
        out.SharedFunctionalGroupsSequence = [Dataset()]
    shared = out.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" not in shared:
        spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
        pm = Dataset()
        pm.PixelSpacing = [float(v) for v in spacing]
        shared.PixelMeasuresSequence = [pm]
    item = Dataset()
    item.ImageOrientationPatient = CORNERSTONE_DEFAULT_IOP
    shared.PlaneOrientationSequence = [item]
    return out
