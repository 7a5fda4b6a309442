"""TID 1500 Measurement Report (Comprehensive 3D SR) for one study, built with highdicom.

Content of Imaging Measurements, all TID 1410 planar ROI groups (see "why" below):

1. Per SEG segment (every (finding, model) map of every image, empty ones included), a group
   referencing the segmentation frame (Referenced Segmentation Frame; frame N = segment N),
   with finding type, finding site (breast with laterality), the segment's total area in mm2,
   and the model's image-level scores for that image: "Probability of cancer" (DCM 111047) for
   the malignant score on the model's malignant-lesion segment, "Certainty of Finding" (DCM
   111012) for the benign score on its benign-lesion segment, in percent (0-100), as the
   mammography CAD concepts are defined. A model whose score has no segment of that finding
   reports it on its first segment of the image.
2. Per detected region (``dicom_ai.regions``), a group with the region as a closed SCOORD
   POLYLINE on the source image (pixel coordinates, (column, row), origin at the top-left
   corner of the top-left pixel), finding type and site, area in mm2 (spacing rules in
   ``dicom_ai.regions``) whose Source of Measurement is the SEG frame of its segment, and the
   maximum and mean probability inside the region (derivation SCT Maximum / Mean) with the
   model's algorithm identification. Tracking identifier "<image> <finding> (<model>) region k"
   ties it to the segment group "<image> <finding> (<model>) segment n".
3. Per breast and for the study, per model and score, the maximum over the images (derivation
   Maximum), as a group referencing the segment of the image where the maximum occurred.

Why only TID 1410 groups: PixelMed's TID 1500 validator decides per Imaging Measurements
container, not per group, whether to check groups as TID 1410 or TID 1501; once one group has a
segmentation reference, every group must have an image region or one. Anchoring image, breast
and study scores on a segment keeps PixelMed error-free and still says which image a score
belongs to.

Validator-driven details (shared/research/dicom-tooling.md): procedure reported is SCT
363679005 "Imaging procedure" (CID 100), and Referenced Segment Number is removed from IMAGE
items that carry Referenced Frame Number (dciodvfy rejects both together).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_ai.codes import BREAST, LATERALITY, PERCENT, SQUARE_MM, algorithm_family, finding_codes
from dicom_ai.findings import ImageFindings, ImageScore, ModelIdentity
from dicom_ai.seg_writer import Segment

__all__ = ["ImageResult", "build_measurement_report", "strip_segment_numbers", "SCORE_FINDING"]

#: Which finding's codes describe an image-level score.
SCORE_FINDING = {"malignant": "malignant_lesion", "benign": "benign_lesion"}


@dataclass
class ImageResult:
    """Everything the SR needs of one source image: the image, its findings, its SEG."""

    source: pydicom.Dataset
    findings: ImageFindings
    segments: list[Segment]
    segmentation: pydicom.Dataset | None


def _image_name(ds: pydicom.Dataset) -> str:
    lat = str(ds.get("ImageLaterality", "") or "?")
    view = str(ds.get("ViewPosition", "") or "")
    if not view and ds.get("ViewCodeSequence"):
        view = str(ds.ViewCodeSequence[0].get("CodeMeaning", ""))
    return f"{lat} {view}".strip()


def _site(laterality: str) -> list[hd.sr.FindingSite]:
    lat = LATERALITY.get(laterality)
    return [hd.sr.FindingSite(anatomic_location=BREAST, laterality=lat)]


def _algorithm(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version)


def _uid(root: str, *parts: object) -> str:
    """A UID derived from ``root`` and ``parts`` (the same inputs give the same UID)."""
    return generate_uid(entropy_srcs=[root, *map(str, parts)])


def _percent(value: float) -> float:
    return round(100.0 * float(value), 2)


def _score_measurement(score: ImageScore, refs: list, derivation: object = None) -> hd.sr.Measurement:
    fc = finding_codes(SCORE_FINDING[score.name])
    return hd.sr.Measurement(name=fc.probability, value=_percent(score.value), unit=PERCENT,
                             derivation=derivation, algorithm_id=_algorithm(score.model),
                             referenced_images=refs or None)


def _anchor(result: ImageResult, score: ImageScore) -> Segment | None:
    """The segment an image-level score is reported with: the same model's segment of the
    score's finding (malignant -> malignant lesion), else that model's first segment."""
    own = [s for s in result.segments if s.map.model == score.model]
    for s in own:
        if s.map.finding == SCORE_FINDING[score.name]:
            return s
    return own[0] if own else None


def _segment_reference(result: ImageResult, segment: Segment) -> hd.sr.ReferencedSegmentationFrame:
    seg, src = result.segmentation, result.source
    return hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
        frame_number=segment.number, segment_number=segment.number,
        source_image=hd.sr.SourceImageForSegmentation(src.SOPClassUID, src.SOPInstanceUID))


def _track(result: ImageResult, segment: Segment) -> str:
    return f"{_image_name(result.source)} {finding_codes(segment.map.finding).label.lower()} ({segment.map.model.name})"


def build_measurement_report(
    results: Sequence[ImageResult],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    manufacturer: str,
    model_name: str,
    software_version: str,
    device_serial_number: str,
    device_uid: str,
    series_description: str = "AI findings (SR)",
    max_regions_per_segment: int = 20,
    content_datetime: tuple[str, str] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The study's TID 1500 report. Tracking UIDs derive from ``sop_instance_uid``."""
    if not results:
        raise ValueError("a measurement report needs at least one source image")
    models = sorted({m.model for r in results for m in r.findings.maps}
                    | {s.model for r in results for s in r.findings.scores}, key=lambda m: (m.name, m.version))
    versions = ", ".join(f"{m.name} {m.version}" for m in models)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=f"{model_name} {software_version}: {versions}"[:64],
            manufacturer_name=manufacturer, model_name=model_name, serial_number=device_serial_number))
    root = sop_instance_uid
    region_groups: list = []
    segment_groups: list = []
    other_groups: list = []
    for r in results:
        src = r.source
        lat = str(src.get("ImageLaterality", ""))
        seg = r.segmentation
        anchored: dict[int, list[ImageScore]] = {}
        for score in r.findings.scores:
            anchor = _anchor(r, score) if seg is not None else None
            if anchor is None:
                # A model with scores but no map on this image: a TID 1501 group. (PixelMed
                # 2022 then checks every group as TID 1410 and reports errors; the shipped
                # models all produce maps, so this does not occur with them.)
                other_groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=_uid(root, src.SOPInstanceUID, "score", score.name, score.model.name, score.model.version),
                        identifier=f"{_image_name(src)} {score.name} score ({score.model.name})"[:64]),
                    finding_type=finding_codes(SCORE_FINDING[score.name]).sr_finding, finding_sites=_site(lat),
                    measurements=[_score_measurement(score, [hd.sr.SourceImageForMeasurement(
                        src.SOPClassUID, src.SOPInstanceUID)])]))
            else:
                anchored.setdefault(anchor.number, []).append(score)
        for segment in r.segments:
            fc = finding_codes(segment.map.finding)
            model = segment.map.model
            track = _track(r, segment)
            seg_ref = (hd.sr.SourceImageForMeasurement(seg.SOPClassUID, seg.SOPInstanceUID, [segment.number])
                       if seg is not None else None)
            regions = sorted(segment.regions.regions, key=lambda g: -g.max_probability)[:max_regions_per_segment]
            for region in sorted(regions, key=lambda g: g.index):
                prob = fc.probability
                measurements = [
                    hd.sr.Measurement(name=codes.SCT.Area, value=round(region.area_mm2, 3), unit=SQUARE_MM,
                                      referenced_images=[seg_ref] if seg_ref else None),
                    hd.sr.Measurement(name=prob, value=_percent(region.max_probability), unit=PERCENT,
                                      derivation=codes.SCT.Maximum, algorithm_id=_algorithm(model)),
                    hd.sr.Measurement(name=prob, value=_percent(region.mean_probability), unit=PERCENT,
                                      derivation=codes.SCT.Mean, algorithm_id=_algorithm(model)),
                ]
                region_groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=_uid(root, src.SOPInstanceUID, "region", segment.number, region.index),
                        identifier=f"{track} region {region.index}"[:64]),
                    referenced_region=hd.sr.ImageRegion(
                        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                        graphic_data=np.asarray(region.contour, dtype=np.float32),
                        source_image=hd.sr.SourceImageForRegion(src.SOPClassUID, src.SOPInstanceUID)),
                    finding_type=fc.sr_finding,
                    finding_sites=_site(lat),
                    measurements=measurements,
                ))
            if seg is None:
                continue
            total = sum(g.area_mm2 for g in segment.regions.regions)
            measurements = [hd.sr.Measurement(name=codes.SCT.Area, value=round(total, 3), unit=SQUARE_MM)]
            measurements += [_score_measurement(sc, []) for sc in anchored.get(segment.number, [])]
            segment_groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_uid(root, src.SOPInstanceUID, "segment", segment.number),
                    identifier=f"{track} segment {segment.number}"[:64]),
                referenced_segment=_segment_reference(r, segment),
                finding_type=fc.sr_finding,
                finding_sites=_site(lat),
                measurements=measurements,
            ))
    summary_groups = _summaries(results, root)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=segment_groups + region_groups + summary_groups + other_groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    evidence = [r.source for r in results] + [r.segmentation for r in results if r.segmentation is not None]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=series_instance_uid,
        series_number=series_number, sop_instance_uid=sop_instance_uid, instance_number=instance_number,
        manufacturer=manufacturer, is_complete=True, is_final=False, is_verified=False,
        series_description=series_description,
        manufacturer_model_name=model_name, software_versions=software_version,
        device_serial_number=device_serial_number,
    )
    strip_segment_numbers(sr)
    if content_datetime is not None:
        sr.SeriesDate, sr.SeriesTime = content_datetime
        sr.ContentDate, sr.ContentTime = content_datetime
    return sr


def _summaries(results: Sequence[ImageResult], root: str) -> list:
    """Breast- and study-level maxima of each model's image scores.

    Each is a planar ROI group anchored on the segment of the image where the maximum
    occurred (TID 1410 needs an image region or segmentation reference), with finding site
    the breast (laterality L, R, or B for the study) and derivation Maximum.
    """
    groups = []
    scopes = [(lat, f"{name} breast", [r for r in results if str(r.source.get("ImageLaterality", "")) == lat])
              for lat, name in (("L", "Left"), ("R", "Right"))]
    scopes.append(("B", "Study", list(results)))
    for lat, scope_name, scope in scopes:
        candidates = [(score, r) for r in scope if r.segmentation is not None for score in r.findings.scores]
        keys = sorted({(sc.name, sc.model) for sc, _ in candidates},
                      key=lambda k: (k[0] != "malignant", k[1].name, k[1].version))
        for name, model in keys:
            score, r = max(((sc, rr) for sc, rr in candidates if sc.name == name and sc.model == model),
                           key=lambda t: t[0].value)
            anchor = _anchor(r, score)
            if anchor is None:
                continue
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_uid(root, "summary", lat, name, model.name, model.version),
                    identifier=f"{scope_name} {name} score ({model.name}), max over images"[:64]),
                referenced_segment=_segment_reference(r, anchor),
                finding_type=finding_codes(SCORE_FINDING[name]).sr_finding,
                finding_sites=_site(lat),
                measurements=[_score_measurement(score, [], derivation=codes.SCT.Maximum)],
            ))
    return groups


def strip_segment_numbers(ds: pydicom.Dataset) -> None:
    """Remove Referenced Segment Number where Referenced Frame Number is present.

    dciodvfy (Image Reference Macro rules in PS3.3 Table 10-3) forbids both in one
    Referenced SOP Sequence item; the frame number alone identifies the segment here,
    because each SEG has exactly one frame per segment, frame N holding segment N.
    """
    for item in ds.get("ContentSequence", []):
        for ref in item.get("ReferencedSOPSequence", []):
            if "ReferencedFrameNumber" in ref and "ReferencedSegmentNumber" in ref:
                del ref.ReferencedSegmentNumber
        strip_segment_numbers(item)
