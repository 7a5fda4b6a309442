"""TID 1500 Measurement Report (Comprehensive 3D SR) for one study, built with highdicom.

Content:

* Imaging Measurements: per detected region (:mod:`dicom_ai.results.regions`), one TID 1410 planar ROI
  group: the region as a closed SCOORD POLYLINE on the source image (pixel coordinates,
  (column, row), origin at the top-left corner of the top-left pixel), finding type and finding
  site (breast with laterality), area in mm2 (spacing rules in :mod:`dicom_ai.results.regions`) whose
  Source of Measurement is the SEG frame of its segment (frame N = segment N: the reference to
  the segment the region came from), and the maximum and mean probability inside the region
  (derivation SCT Maximum / Mean; "Probability of cancer" for malignant lesions, "Certainty of
  Finding" otherwise, in percent) with the model's algorithm identification. Tracking
  identifier "<image> <finding> (<model>) region k".
  Regions of several models that overlap on one image and describe the same kind of finding
  (a lesion: malignant or benign; a calcification cluster) are one finding: one group whose
  ROI and area are the most probable member's (area referencing that member's SEG frame),
  and which carries each member's probabilities with its own algorithm identification
  (tracking identifier "<image> <finding> (<model>+<model>) region k"). Each model's segment
  stays in the SEG. Algorithm identification carries the operating point as Algorithm
  Parameters ("operating point <name>: threshold t (<target>)").
* Qualitative Evaluations (TID 1500 row 12), TEXT items: each image's scores per model, a line
  per SEG segment (regions, total area, threshold, segment number, or "no region above
  threshold"), where the image's nipple direction came from (header or pixels) and the
  breast restriction of the marks, and per breast and for the study the maximum of each
  model's scores.

Only groups with a SCOORD are in Imaging Measurements: OHIF 3.13 stops displaying the whole
report when a group has none (conformance/viewer.md), and PixelMed's TID 1500 check decides
per container, not per group, which group template applies.

Validator-driven details (shared/research/dicom-tooling.md): procedure reported is SCT
363679005 "Imaging procedure" (CID 100), and Referenced Segment Number is removed from IMAGE
items that carry Referenced Frame Number (dciodvfy rejects both together).
"""

from __future__ import annotations

from collections.abc import Sequence
import highdicom as hd
import numpy as np
import pydicom
from pydicom.charset import default_encoding
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_ai.core.errors import ResultError
from dicom_ai.core.findings import ImageScore, ModelIdentity
from dicom_ai.core.options import Equipment
from dicom_ai.core.views import image_name
from dicom_ai.results.codes import BREAST, LATERALITY, PERCENT, SQUARE_MM, finding_codes
from dicom_ai.results.types import ImageResult, ObjectIdentity, Segment

__all__ = ["build_measurement_report", "comprehensive_3d_sr", "referenced_instances", "strip_segment_numbers", "merge_regions", "operating_text", "SCORE_FINDING"]

#: Which finding's codes describe an image-level score.
SCORE_FINDING = {"malignant": "malignant_lesion", "benign": "benign_lesion"}


def _site(laterality: str) -> list[hd.sr.FindingSite]:
    lat = LATERALITY.get(laterality)
    return [hd.sr.FindingSite(anatomic_location=BREAST, laterality=lat)]


def operating_text(model: ModelIdentity, threshold: float) -> str:
    """``operating point <name>: threshold t (<target>)`` (the bundle's plain threshold when unnamed)."""
    name = getattr(model, "operating_point", "") or "manifest thresholds"
    target = getattr(model, "operating_target", "")
    return f"operating point {name}: threshold {threshold:g}" + (f" ({target})" if target else "")


def _algorithm(model: ModelIdentity, threshold: float | None = None) -> hd.sr.AlgorithmIdentification:
    params = [operating_text(model, threshold)[:64]] if threshold is not None else None
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version, parameters=params)


#: Findings that describe the same kind of object, so overlapping regions of them by
#: different models are one finding in the SR.
_MERGE_CLASS = {"malignant_lesion": "lesion", "benign_lesion": "lesion", "mass": "lesion",
                "calcification_cluster": "cluster"}


def _overlap(a, b) -> bool:
    ar0, ar1, ac0, ac1 = a.bbox
    br0, br1, bc0, bc1 = b.bbox
    r0, r1, c0, c1 = max(ar0, br0), min(ar1, br1), max(ac0, bc0), min(ac1, bc1)
    if r0 >= r1 or c0 >= c1:
        return False
    return bool((a.mask[r0 - ar0:r1 - ar0, c0 - ac0:c1 - ac0] & b.mask[r0 - br0:r1 - br0, c0 - bc0:c1 - bc0]).any())


def merge_regions(entries: Sequence[tuple[Segment, object]]) -> list[list[tuple[Segment, object]]]:
    """Group ``(segment, region)`` pairs of one image: pairs of different models whose
    findings are of one :data:`_MERGE_CLASS` and whose pixels overlap are one finding
    (transitively). Each group is ordered most probable first; groups in input order."""
    parent = list(range(len(entries)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, (si, ri) in enumerate(entries):
        ci = _MERGE_CLASS.get(si.map.finding)
        if ci is None:
            continue
        for j in range(i):
            sj, rj = entries[j]
            if _MERGE_CLASS.get(sj.map.finding) == ci and sj.map.model != si.map.model and _overlap(ri, rj):
                parent[find(i)] = find(j)
    groups: dict[int, list] = {}
    for i, e in enumerate(entries):
        groups.setdefault(find(i), []).append(e)
    return [sorted(g, key=lambda e: -e[1].max_probability) for g in groups.values()]


def _uid(root: str, *parts: object) -> str:
    """A UID derived from ``root`` and ``parts`` (the same inputs give the same UID)."""
    return generate_uid(entropy_srcs=[root, *map(str, parts)])


def _percent(value: float) -> float:
    return round(100.0 * float(value), 2)


def _concept(item: pydicom.Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def _placeholder_group() -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="placeholder"))


def _max_scores(results: Sequence[ImageResult], name: str) -> list[ImageScore]:
    """Per model, the highest score of ``name`` over the images of ``results``."""
    best: dict[ModelIdentity, ImageScore] = {}
    for r in results:
        for s in r.findings.scores:
            if s.name == name and (s.model not in best or s.value > best[s.model].value):
                best[s.model] = s
    return [best[m] for m in sorted(best, key=lambda m: (m.name, m.version))]


def _track(result: ImageResult, segment: Segment) -> str:
    return f"{image_name(result.source)} {finding_codes(segment.map.finding).label.lower()} ({segment.map.model.name})"


def build_measurement_report(
    results: Sequence[ImageResult],
    identity: ObjectIdentity,
    equipment: Equipment,
    *,
    max_regions_per_segment: int = 20,
) -> hd.sr.Comprehensive3DSR:
    """The study's TID 1500 report. Tracking UIDs derive from the SR's SOP Instance UID.

    Parameters
    ----------
    results
        One entry per source image of the study, with its analysed segments and its SEG.
    identity
        Series and instance of the SR.
    equipment
        The device written into the General Equipment module and the observer context.
    max_regions_per_segment
        At most this many regions per segment are reported, the most probable first.
    """
    if not results:
        raise ResultError("a measurement report needs at least one source image")
    models = sorted({m.model for r in results for m in r.findings.maps}
                    | {s.model for r in results for s in r.findings.scores}, key=lambda m: (m.name, m.version))
    versions = ", ".join(f"{m.name} {m.version}" for m in models)
    manufacturer, model_name, software_version = equipment.manufacturer, equipment.model_name, equipment.software_version
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=equipment.device_uid, name=f"{model_name} {software_version}: {versions}"[:64],
            manufacturer_name=manufacturer, model_name=model_name, serial_number=equipment.device_serial_number))
    root = identity.sop_instance_uid
    region_groups: list = []
    # Content items that are the same in many groups are built once and put in each (a content
    # item is a data set; highdicom and pydicom put it in a sequence as it is, and it is written
    # where it is put): the finding site per side, the algorithm per model and threshold, the
    # source image of the regions per image. About a tenth of the report's time at the all-on point.
    sites: dict[str, list[hd.sr.FindingSite]] = {}
    algorithms: dict[tuple[ModelIdentity, float], hd.sr.AlgorithmIdentification] = {}
    for r in results:
        src, seg = r.source, r.segmentation
        lat = str(src.get("ImageLaterality", ""))
        if lat not in sites:
            sites[lat] = _site(lat)
        site = sites[lat]
        source_image = hd.sr.SourceImageForRegion(src.SOPClassUID, src.SOPInstanceUID)
        entries = []
        for segment in r.segments:
            regions = sorted(segment.regions.regions, key=lambda g: -g.max_probability)[:max_regions_per_segment]
            entries += [(segment, region) for region in sorted(regions, key=lambda g: g.index)]
        for group in merge_regions(entries):
            segment, region = group[0]
            fc = finding_codes(segment.map.finding)
            models = "+".join(dict.fromkeys(s.map.model.name for s, _ in group))
            track = f"{image_name(src)} {fc.label.lower()} ({models})"
            # The area is the kept member's: its Source of Measurement is that member's frame.
            seg_ref = (hd.sr.SourceImageForMeasurement(seg.SOPClassUID, seg.SOPInstanceUID, [segment.number])
                       if seg is not None else None)
            measurements = [hd.sr.Measurement(name=codes.SCT.Area, value=round(region.area_mm2, 3), unit=SQUARE_MM,
                                              referenced_images=[seg_ref] if seg_ref else None)]
            for member_segment, member in group:
                prob = finding_codes(member_segment.map.finding).probability
                key = (member_segment.map.model, member_segment.map.threshold)
                if key not in algorithms:
                    algorithms[key] = _algorithm(*key)
                algorithm = algorithms[key]
                measurements += [
                    hd.sr.Measurement(name=prob, value=_percent(member.max_probability), unit=PERCENT,
                                      derivation=codes.SCT.Maximum, algorithm_id=algorithm),
                    hd.sr.Measurement(name=prob, value=_percent(member.mean_probability), unit=PERCENT,
                                      derivation=codes.SCT.Mean, algorithm_id=algorithm),
                ]
            region_groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_uid(root, src.SOPInstanceUID, "region", segment.number, region.index),
                    identifier=f"{track} region {region.index}"[:64]),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=np.asarray(region.contour, dtype=np.float32),
                    source_image=source_image),
                finding_type=fc.sr_finding,
                finding_sites=site,
                measurements=measurements,
            ))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=region_groups or [_placeholder_group()],
        title=codes.DCM.ImagingMeasurementReport,
    )
    if not region_groups:
        # No region in the study: TID 1500 then carries Qualitative Evaluations only (rows 6
        # and 12 are "at least one of"); highdicom insists on a group, so its placeholder goes.
        items = report[0].ContentSequence
        report[0].ContentSequence = [i for i in items if _concept(i) != "126010"]
    evaluations = _qualitative_evaluations(results)
    if evaluations:
        report[0].ContentSequence.append(evaluations)
    evidence = [r.source for r in results] + [r.segmentation for r in results if r.segmentation is not None]
    sr = comprehensive_3d_sr(
        report[0], evidence, series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number, sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=manufacturer, is_complete=True, is_final=False, is_verified=False,
        series_description=identity.series_description,
        manufacturer_model_name=model_name, software_versions=software_version,
        device_serial_number=equipment.device_serial_number,
    )
    strip_segment_numbers(sr)
    _written_as_explicit_little(sr)
    return sr


def _written_as_explicit_little(ds: pydicom.Dataset) -> None:
    """Mark every content item under ``ds`` as a data set in Explicit VR Little Endian (the SR's
    transfer syntax) in the default character set, so pydicom's writer does not correct
    ambiguous VRs again in each nested item: it corrects the whole tree once, from the root,
    then did it again for every item at every depth (about a quarter of the SR's encoding
    time at the all-on point). Content items hold no ambiguous-VR element anyway; written in
    another transfer syntax or character set, the items are corrected as before. Same bytes."""
    for item in ds.get("ContentSequence", []):
        item.set_original_encoding(False, True, default_encoding)
        _written_as_explicit_little(item)


def referenced_instances(item: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs the IMAGE and COMPOSITE content items under ``item`` reference (recursive)."""
    out: set[str] = set()
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") in ("IMAGE", "COMPOSITE"):
            out.add(str(child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        if "ContentSequence" in child:
            out |= referenced_instances(child)
    return out


def comprehensive_3d_sr(root: hd.sr.ContainerContentItem, evidence: Sequence[pydicom.Dataset],
                        **kwargs) -> hd.sr.Comprehensive3DSR:
    """highdicom's Comprehensive 3D SR of the content tree under ``root`` (its other arguments
    as ``kwargs``), without the constructor's per-item work on the tree.

    The constructor deep-copies the whole tree, parses the copy back into content items (what
    ``sr.content`` returns) and searches it for IMAGE and COMPOSITE references to check them
    against ``evidence``: for the all-on point's 157 measurement groups (about 3300 content
    items) that was three quarters of the report's time (benchmarks/results/writers_profile_allon.md).
    None of the attributes it writes depends on the tree below the root (every piece of
    evidence is recorded, referenced or not), so here it is given the root with an empty
    Content Sequence and the tree is attached afterwards, the same data element as the
    constructor would have copied, so the object and its bytes are the same. ``root`` is a
    highdicom content item already, so ``sr.content`` is ``root`` itself (the constructor's
    parsed copy of it, and ``from_dataset``'s parse, would cost as much again), and the
    evidence check is made here.

    Raises
    ------
    ResultError
        A content item references an instance that is not among ``evidence``.
    """
    missing = referenced_instances(root) - {str(ds.SOPInstanceUID) for ds in evidence}
    if missing:
        raise ResultError(f"the report references {len(missing)} instance(s) that are not among its evidence")
    tree = root[_CONTENT_SEQUENCE]
    del root[_CONTENT_SEQUENCE]
    try:
        root.ContentSequence = []
        sr = hd.sr.Comprehensive3DSR(evidence=evidence, content=root, **kwargs)
    finally:
        root[_CONTENT_SEQUENCE] = tree
    sr[_CONTENT_SEQUENCE] = tree
    # What the constructor sets from its parsed copy (tests/test_sr_writer.py checks that
    # sr.content is the whole tree, so a highdicom that renamed it would fail there).
    sr._content = hd.sr.ContentSequence([root], is_root=True)
    return sr


_CONTENT_SEQUENCE = 0x0040A730


_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")


def _score_text(scope: str, score: ImageScore, note: str = "") -> hd.sr.TextContentItem:
    fc = finding_codes(SCORE_FINDING[score.name])
    text = f"{scope}: {score.name} score {_percent(score.value):g} %{note} ({score.model.name} {score.model.version})"
    return hd.sr.TextContentItem(name=fc.probability, value=text[:1024], relationship_type="CONTAINS")


def _qualitative_evaluations(results: Sequence[ImageResult]) -> hd.sr.ContainerContentItem | None:
    """TID 1500 row 12: image-, breast- and study-level scores and a per-segment summary as TEXT.

    Why not measurement groups: OHIF 3.13 stops displaying a report when a group of Imaging
    Measurements has no SCOORD (conformance/viewer.md), and PixelMed's TID 1500 check wants
    every group to have an image region once one has a segmentation reference. TEXT items
    keep the numbers readable in every SR viewer; the per-region values stay NUMs.
    """
    items: list = []
    for r in results:
        name = image_name(r.source)
        for score in sorted(r.findings.scores, key=lambda s: (s.name != "malignant", s.model.name)):
            items.append(_score_text(name, score))
        for segment in r.segments:
            n = len(segment.regions.regions)
            area = sum(g.area_mm2 for g in segment.regions.regions)
            where = f"SEG segment {segment.number}" if r.segmentation is not None else "no SEG"
            text = (f"{_track(r, segment)}: {n} region{'s' if n != 1 else ''}, {area:.2f} mm2 at threshold "
                    f"{segment.map.threshold:g} ({where})" if n else
                    f"{_track(r, segment)}: no region above threshold {segment.map.threshold:g} ({where})")
            items.append(hd.sr.TextContentItem(name=_FINDING, value=text, relationship_type="CONTAINS"))
        orientation = r.findings.orientation
        if orientation:
            text = (f"{name}: nipple direction from the {orientation}; marks restricted to the breast mask "
                    f"less the pectoral muscle")
            items.append(hd.sr.TextContentItem(name=_FINDING, value=text, relationship_type="CONTAINS"))
        for segment in r.segments:
            text = f"{_track(r, segment)}: {operating_text(segment.map.model, segment.map.threshold)}"
            items.append(hd.sr.TextContentItem(name=_FINDING, value=text[:1024], relationship_type="CONTAINS"))
    scopes = [(f"{side} breast", [r for r in results if str(r.source.get("ImageLaterality", "")) == lat])
              for lat, side in (("L", "Left"), ("R", "Right"))]
    scopes.append(("Study", list(results)))
    for scope_name, scope in scopes:
        for name in ("malignant", "benign"):
            for score in _max_scores(scope, name):
                items.append(_score_text(scope_name, score, " (maximum over its images)"))
    if not items:
        return None
    container = hd.sr.ContainerContentItem(name=_QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    container.ContentSequence = items
    return container


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
