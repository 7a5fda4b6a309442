"""TID 1500 Measurement Report (Comprehensive 3D SR) for one study, built with highdicom.

Content, in this order under Imaging Measurements:

1. Per source image and model, one image-level group (TID 1501) per image score, with the
   image as Source image for measurement group: "Probability of cancer" (DCM 111047) for the
   malignant score, "Certainty of Finding" (DCM 111012) with finding type benign mass for the
   benign score; values in percent (0-100), as the mammography CAD concepts are defined.
2. Per detected region (``dicom_ai.regions``), one planar ROI group (TID 1410): the region as
   a closed SCOORD POLYLINE on the source image (pixel coordinates, (column, row), origin at
   the top-left corner of the top-left pixel), finding type and finding site (breast with
   laterality), area in mm2 (see ``dicom_ai.regions.area_spacing`` for the spacing used) whose
   Source of Measurement is the SEG frame of its segment (frame N = segment N), and the
   maximum and mean probability inside the region (derivation SCT Maximum / Mean) with the
   model's algorithm identification.
3. Per non-empty SEG segment, one planar ROI group referencing the segmentation frame (TID
   1410 Referenced Segmentation Frame) with the segment's total area. Its Tracking Unique
   Identifier is the segment's, so the region groups of (2) and the segment group are tied
   by their tracking identifier text "<image> <finding> (<model>)".
4. Per breast, a summary group over that breast's images: maximum malignant and benign scores.
5. One study summary group: maximum scores over both breasts.

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


def _score_group(name: str, scores: list[ImageScore], sources: Sequence[pydicom.Dataset], laterality: str,
                 label: str, tracking_uid: str, derivation: object = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    fc = finding_codes(SCORE_FINDING[name])
    # The images go on each measurement (TID 300 "Source of Measurement"), not on the group:
    # PixelMed's TID 1500 check reads a group with images as a TID 1410 planar ROI group and
    # then requires an image region.
    refs = [hd.sr.SourceImageForMeasurement(ds.SOPClassUID, ds.SOPInstanceUID) for ds in sources]
    measurements = [
        hd.sr.Measurement(name=fc.probability, value=_percent(s.value), unit=PERCENT,
                          derivation=derivation, algorithm_id=_algorithm(s.model), referenced_images=refs)
        for s in scores
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=label[:64]),
        finding_type=fc.sr_finding,
        finding_sites=_site(laterality),
        measurements=measurements,
    )


def _max_scores(results: Sequence[ImageResult], name: str) -> list[ImageScore]:
    """Per model, the highest score of ``name`` over the images of ``results``."""
    best: dict[ModelIdentity, ImageScore] = {}
    for r in results:
        for s in r.findings.scores:
            if s.name == name and (s.model not in best or s.value > best[s.model].value):
                best[s.model] = s
    return [best[m] for m in sorted(best, key=lambda m: (m.name, m.version))]


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
    groups: list = []
    root = sop_instance_uid
    for r in results:
        src = r.source
        name = _image_name(src)
        lat = str(src.get("ImageLaterality", ""))
        for score_name in ("malignant", "benign"):
            for model in models:
                scores = [s for s in r.findings.scores if s.name == score_name and s.model == model]
                if scores:
                    groups.append(_score_group(
                        score_name, scores, [src], lat, f"{name} {score_name} score ({model.name})",
                        _uid(root, src.SOPInstanceUID, "score", score_name, model.name, model.version)))
        seg = r.segmentation
        for segment in r.segments:
            fc = finding_codes(segment.map.finding)
            model = segment.map.model
            track = f"{name} {fc.label.lower()} ({model.name})"
            seg_ref = (hd.sr.SourceImageForMeasurement(seg.SOPClassUID, seg.SOPInstanceUID, [segment.number])
                       if seg is not None else None)
            regions = sorted(segment.regions.regions, key=lambda g: -g.max_probability)[:max_regions_per_segment]
            for k, region in enumerate(sorted(regions, key=lambda g: g.index), start=1):
                prob = fc.probability
                measurements = [
                    hd.sr.Measurement(name=codes.SCT.Area, value=round(region.area_mm2, 3), unit=SQUARE_MM,
                                      referenced_images=[seg_ref] if seg_ref else None),
                    hd.sr.Measurement(name=prob, value=_percent(region.max_probability), unit=PERCENT,
                                      derivation=codes.SCT.Maximum, algorithm_id=_algorithm(model)),
                    hd.sr.Measurement(name=prob, value=_percent(region.mean_probability), unit=PERCENT,
                                      derivation=codes.SCT.Mean, algorithm_id=_algorithm(model)),
                ]
                groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
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
            if seg is not None and segment.regions.regions:
                total = sum(g.area_mm2 for g in segment.regions.regions)
                groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=_uid(root, src.SOPInstanceUID, "segment", segment.number),
                        identifier=f"{track} segment {segment.number}"[:64]),
                    referenced_segment=hd.sr.ReferencedSegmentationFrame(
                        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                        frame_number=segment.number, segment_number=segment.number,
                        source_image=hd.sr.SourceImageForSegmentation(src.SOPClassUID, src.SOPInstanceUID)),
                    finding_type=fc.sr_finding,
                    finding_sites=_site(lat),
                    measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=round(total, 3), unit=SQUARE_MM)],
                ))
    sides = {"L": "Left breast", "R": "Right breast"}
    for lat, side_name in sides.items():
        side = [r for r in results if str(r.source.get("ImageLaterality", "")) == lat]
        if not side:
            continue
        for score_name in ("malignant", "benign"):
            best = _max_scores(side, score_name)
            if best:
                groups.append(_score_group(
                    score_name, best, [r.source for r in side], lat, f"{side_name} {score_name} score (max)",
                    _uid(root, "breast", lat, score_name), derivation=codes.SCT.Maximum))
    for score_name in ("malignant", "benign"):
        best = _max_scores(results, score_name)
        if best:
            groups.append(_score_group(
                score_name, best, [r.source for r in results], "B", f"Study {score_name} score (max)",
                _uid(root, "study", score_name), derivation=codes.SCT.Maximum))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
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
