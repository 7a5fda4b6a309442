"""Mammography CAD SR (SOP Class 1.2.840.10008.5.1.4.1.1.88.50, root TID 4000) for one study.

This is the object mammography workstations draw as CAD marks. highdicom has no template
class for it, so the tree is built from highdicom's generic content items and written with
highdicom's public Comprehensive SR class, whose module content is the same as the Mammography
CAD SR IOD's; the SOP Class UID is then set to Mammography CAD SR.

Tree (TID numbers as in PS3.16; what is written)::

    CONTAINER (111036,DCM,"Mammography CAD Report")            TID 4000, template id 4000
     ├ HAS CONCEPT MOD CODE Language of Content Item = en-US    TID 1204
         ├ CONTAINS CONTAINER (111028,"Image Library")
     │   └ CONTAINS IMAGE <MG>  per source image                TID 4020
     │       ├ HAS ACQ CONTEXT CODE Image Laterality (CID 6022), Image View (CID 4014)
     │       ├ HAS ACQ CONTEXT TEXT Patient Orientation Row / Column
     │       ├ HAS ACQ CONTEXT DATE/TIME Study Date/Time, Content Date/Time (when present)
     │       └ HAS ACQ CONTEXT NUM Horizontal / Vertical Pixel Spacing (mm, Imager Pixel Spacing)
     ├ CONTAINS CODE (111017,"CAD Processing and Findings Summary") = 111242 with / 111241 without findings
     │   └ INFERRED FROM CONTAINER (111034,"Individual Impression/Recommendation")  per region   TID 4003
     │       ├ HAS CONCEPT MOD CODE Rendering Intent = 111150 Presentation Required
     │       └ CONTAINS CODE (111059,"Single Image Finding") = CID 6014 code        TID 4006
     │           ├ HAS CONCEPT MOD CODE Rendering Intent = Presentation Required
     │           ├ HAS PROPERTIES TEXT Algorithm Name, TEXT Algorithm Version    TID 4019
     │           ├ HAS PROPERTIES NUM Certainty of Finding (%), and Probability of cancer (%) for
     │           │   the malignant-lesion finding
     │           ├ HAS PROPERTIES SCOORD (111010,"Center") POINT ── SELECTED FROM IMAGE <MG>  TID 4021
     │           └ HAS PROPERTIES SCOORD (111041,"Outline") POLYLINE ── SELECTED FROM IMAGE <MG>
     ├ CONTAINS CODE (111064,"Summary of Detections") = 111222 Succeeded        TID 4015
     │   └ INFERRED FROM CONTAINER (111063,"Successful Detections")
     │       └ CONTAINS CODE (111022,"Detection Performed") = finding code per (finding, model)  TID 4017
     │           ├ HAS PROPERTIES TEXT Algorithm Name, TEXT Algorithm Version
     │           └ HAS PROPERTIES IMAGE <MG> per image the detection ran on
     └ CONTAINS CODE (111065,"Summary of Analyses") = 111225 Not Attempted    (no analyses such as
                                                                            breast composition)

No observer context: PixelMed's TID 4000 has no row for it; the node is identified by the
Equipment module and each finding by its Algorithm Name/Version.

Not written (limits): composite features across views (TID 4004), calcification cluster
membership (individual calcifications nested in clusters), CAD operating points, per-image
failure reporting. Which regions appear: the same regions as in the TID 1500 SR, at most
``max_regions_per_segment`` per segment, highest probability first.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicom_ai.core.errors import ResultError
from dicom_ai.core.findings import ModelIdentity
from dicom_ai.core.options import Equipment
from dicom_ai.core.views import VIEW_CODES, view_of
from dicom_ai.results.codes import BREAST_SIDE, PERCENT, finding_codes
from dicom_ai.results.tid1500 import operating_text
from dicom_ai.results.types import ImageResult, ObjectIdentity

__all__ = ["MAMMOGRAPHY_CAD_SR", "build_mammography_cad_sr"]

MAMMOGRAPHY_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"

_REPORT = Code("111036", "DCM", "Mammography CAD Report")
_IMAGE_LIBRARY = Code("111028", "DCM", "Image Library")
_SUMMARY = Code("111017", "DCM", "CAD Processing and Findings Summary")
_WITH_FINDINGS = Code("111242", "DCM", "All algorithms succeeded; with findings")
_WITHOUT_FINDINGS = Code("111241", "DCM", "All algorithms succeeded; without findings")
_IMPRESSION = Code("111034", "DCM", "Individual Impression/Recommendation")
_RENDERING_INTENT = Code("111056", "DCM", "Rendering Intent")
_PRESENTATION_REQUIRED = Code("111150", "DCM", "Presentation Required: Rendering device is expected to present")
_SINGLE_IMAGE_FINDING = Code("111059", "DCM", "Single Image Finding")
_ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
_ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
_ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
_CERTAINTY = Code("111012", "DCM", "Certainty of Finding")
_PROBABILITY_OF_CANCER = Code("111047", "DCM", "Probability of cancer")
_CENTER = Code("111010", "DCM", "Center")
_OUTLINE = Code("111041", "DCM", "Outline")
_SUMMARY_OF_DETECTIONS = Code("111064", "DCM", "Summary of Detections")
_SUMMARY_OF_ANALYSES = Code("111065", "DCM", "Summary of Analyses")
_SUCCEEDED = Code("111222", "DCM", "Succeeded")
_NOT_ATTEMPTED = Code("111225", "DCM", "Not Attempted")
_SUCCESSFUL_DETECTIONS = Code("111063", "DCM", "Successful Detections")
_DETECTION_PERFORMED = Code("111022", "DCM", "Detection Performed")
_IMAGE_LATERALITY = Code("111027", "DCM", "Image Laterality")
_IMAGE_VIEW = Code("111031", "DCM", "Image View")
_ORIENTATION_ROW = Code("111044", "DCM", "Patient Orientation Row")
_ORIENTATION_COLUMN = Code("111043", "DCM", "Patient Orientation Column")
_STUDY_DATE = Code("111060", "DCM", "Study Date")
_STUDY_TIME = Code("111061", "DCM", "Study Time")
_CONTENT_DATE = Code("111018", "DCM", "Content Date")
_CONTENT_TIME = Code("111019", "DCM", "Content Time")
_HORIZONTAL_SPACING = Code("111026", "DCM", "Horizontal Pixel Spacing")
_VERTICAL_SPACING = Code("111066", "DCM", "Vertical Pixel Spacing")
_MM = Code("mm", "UCUM", "millimeter")

_ACQ = "HAS ACQ CONTEXT"
_PROPS = "HAS PROPERTIES"
_MOD = "HAS CONCEPT MOD"


def _children(item: Dataset, children: list[Dataset]) -> Dataset:
    if children:
        item.ContentSequence = list(children)
    return item


# highdicom requires a concept name on every content item while it collects the evidence;
# TID 4020 entries and SELECTED FROM images have none, so they carry this placeholder until
# the document is built and it is removed (``_drop_placeholder_names``).
_UNNAMED = Code("UNNAMED", "99DICOMAI", "placeholder removed before writing")


def _image_item(ds: pydicom.Dataset, relationship: str) -> Dataset:
    """IMAGE content item with no concept name (TID 4020 row 1, TID 4021 SELECTED FROM)."""
    return hd.sr.ImageContentItem(name=_UNNAMED, referenced_sop_class_uid=ds.SOPClassUID,
                                  referenced_sop_instance_uid=ds.SOPInstanceUID, relationship_type=relationship)


def _drop_placeholder_names(item: Dataset) -> None:
    for child in item.get("ContentSequence", []):
        names = child.get("ConceptNameCodeSequence")
        if names and names[0].CodeValue == _UNNAMED.value and names[0].CodingSchemeDesignator == _UNNAMED.scheme_designator:
            del child.ConceptNameCodeSequence
        _drop_placeholder_names(child)


def _library_entry(ds: pydicom.Dataset) -> Dataset:
    children: list[Dataset] = []
    lat = str(ds.get("ImageLaterality", ""))
    if lat in BREAST_SIDE:
        children.append(hd.sr.CodeContentItem(_IMAGE_LATERALITY, BREAST_SIDE[lat], relationship_type=_ACQ))
    view = VIEW_CODES.get(view_of(ds))
    if view is not None:
        children.append(hd.sr.CodeContentItem(_IMAGE_VIEW, view, relationship_type=_ACQ))
    orientation = ds.get("PatientOrientation")
    if orientation and len(orientation) == 2:
        children.append(hd.sr.TextContentItem(_ORIENTATION_ROW, str(orientation[0]), relationship_type=_ACQ))
        children.append(hd.sr.TextContentItem(_ORIENTATION_COLUMN, str(orientation[1]), relationship_type=_ACQ))
    for keyword, concept, cls in (("StudyDate", _STUDY_DATE, hd.sr.DateContentItem),
                                  ("StudyTime", _STUDY_TIME, hd.sr.TimeContentItem),
                                  ("ContentDate", _CONTENT_DATE, hd.sr.DateContentItem),
                                  ("ContentTime", _CONTENT_TIME, hd.sr.TimeContentItem)):
        value = ds.get(keyword)
        if value:
            children.append(cls(concept, value, relationship_type=_ACQ))
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    if spacing:
        # Pixel spacing is (row, column): the vertical spacing is the first value.
        children.append(hd.sr.NumContentItem(_HORIZONTAL_SPACING, float(spacing[1]), _MM, relationship_type=_ACQ))
        children.append(hd.sr.NumContentItem(_VERTICAL_SPACING, float(spacing[0]), _MM, relationship_type=_ACQ))
    return _children(_image_item(ds, "CONTAINS"), children)


def _algorithm_items(model: ModelIdentity, threshold: float | None = None) -> list[Dataset]:
    """TID 4019: Algorithm Name, Algorithm Version and (with ``threshold``) Algorithm
    Parameters naming the operating point, all properties of the finding."""
    items = [hd.sr.TextContentItem(_ALGORITHM_NAME, model.name, relationship_type=_PROPS),
             hd.sr.TextContentItem(_ALGORITHM_VERSION, model.version, relationship_type=_PROPS)]
    if threshold is not None:
        items.append(hd.sr.TextContentItem(_ALGORITHM_PARAMETERS, operating_text(model, threshold),
                                           relationship_type=_PROPS))
    return items


def _scoord(name: Code, graphic_type: str, data: np.ndarray, source: pydicom.Dataset) -> Dataset:
    item = hd.sr.ScoordContentItem(name=name, graphic_type=graphic_type,
                                   graphic_data=np.asarray(data, dtype=np.float32), relationship_type=_PROPS)
    return _children(item, [_image_item(source, "SELECTED FROM")])


def build_mammography_cad_sr(
    results: Sequence[ImageResult],
    identity: ObjectIdentity,
    equipment: Equipment,
    *,
    max_regions_per_segment: int = 20,
) -> hd.sr.ComprehensiveSR:
    """The study's Mammography CAD SR, one Single Image Finding per region of the TID 1500 SR.

    Parameters
    ----------
    results
        One entry per source image of the study, with its analysed segments.
    identity
        Series and instance of the CAD SR.
    equipment
        The device written into the General Equipment module.
    max_regions_per_segment
        At most this many regions per segment are reported, the most probable first.

    Returns a highdicom SR document whose SOP Class UID is :data:`MAMMOGRAPHY_CAD_SR`.
    """
    if not results:
        raise ResultError("a Mammography CAD SR needs at least one source image")
    root = hd.sr.ContainerContentItem(name=_REPORT, template_id="4000", is_content_continuous=False)
    language = hd.sr.LanguageOfContentItemAndDescendants(
        language=hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)"))
    library = _children(hd.sr.ContainerContentItem(name=_IMAGE_LIBRARY, relationship_type="CONTAINS"),
                        [_library_entry(r.source) for r in results])

    impressions: list[Dataset] = []
    for r in results:
        for segment in r.segments:
            fc = finding_codes(segment.map.finding)
            regions = sorted(segment.regions.regions, key=lambda g: -g.max_probability)[:max_regions_per_segment]
            for region in sorted(regions, key=lambda g: g.index):
                props: list[Dataset] = [hd.sr.CodeContentItem(_RENDERING_INTENT, _PRESENTATION_REQUIRED,
                                                              relationship_type=_MOD)]
                props += _algorithm_items(segment.map.model, segment.map.threshold)
                percent = round(100.0 * region.max_probability, 2)
                props.append(hd.sr.NumContentItem(_CERTAINTY, percent, PERCENT, relationship_type=_PROPS))
                if segment.map.finding == "malignant_lesion":
                    props.append(hd.sr.NumContentItem(_PROBABILITY_OF_CANCER, percent, PERCENT,
                                                      relationship_type=_PROPS))
                props.append(_scoord(_CENTER, "POINT", np.asarray([region.centre]), r.source))
                props.append(_scoord(_OUTLINE, "POLYLINE", region.contour, r.source))
                finding = _children(hd.sr.CodeContentItem(_SINGLE_IMAGE_FINDING, fc.cad_finding,
                                                          relationship_type="CONTAINS"), props)
                impression = _children(
                    hd.sr.ContainerContentItem(name=_IMPRESSION, relationship_type="INFERRED FROM"),
                    [hd.sr.CodeContentItem(_RENDERING_INTENT, _PRESENTATION_REQUIRED, relationship_type=_MOD),
                     finding])
                impressions.append(impression)
    summary = _children(hd.sr.CodeContentItem(_SUMMARY, _WITH_FINDINGS if impressions else _WITHOUT_FINDINGS,
                                               relationship_type="CONTAINS"), impressions)

    # TID 4017: one Detection Performed per (finding, model), with the images it ran on.
    processed: dict[tuple[str, ModelIdentity], list[pydicom.Dataset]] = {}
    for r in results:
        for segment in r.segments:
            processed.setdefault((segment.map.finding, segment.map.model), []).append(r.source)
    performed = [
        _children(hd.sr.CodeContentItem(_DETECTION_PERFORMED, finding_codes(finding).cad_finding,
                                        relationship_type="CONTAINS"),
                  _algorithm_items(model) + [_image_item(src, _PROPS) for src in sources])
        for (finding, model), sources in processed.items()
    ]
    detections = hd.sr.CodeContentItem(_SUMMARY_OF_DETECTIONS, _SUCCEEDED if performed else _NOT_ATTEMPTED,
                                       relationship_type="CONTAINS")
    if performed:
        _children(detections, [_children(hd.sr.ContainerContentItem(
            name=_SUCCESSFUL_DETECTIONS, relationship_type="INFERRED FROM"), performed)])
    analyses = hd.sr.CodeContentItem(_SUMMARY_OF_ANALYSES, _NOT_ATTEMPTED, relationship_type="CONTAINS")

    _children(root, [*language, library, summary, detections, analyses])
    sr = hd.sr.ComprehensiveSR(
        evidence=[r.source for r in results], content=root, series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number, sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=equipment.manufacturer, is_complete=True, is_final=False, is_verified=False,
        series_description=identity.series_description, manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_version, device_serial_number=equipment.device_serial_number,
    )
    sr.SOPClassUID = MAMMOGRAPHY_CAD_SR
    sr.file_meta.MediaStorageSOPClassUID = MAMMOGRAPHY_CAD_SR
    _drop_placeholder_names(sr)
    return sr
