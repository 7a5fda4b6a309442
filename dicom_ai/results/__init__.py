"""results: from the models' probability maps to the DICOM objects the node sends back.

Owns region analysis (:mod:`~dicom_ai.results.regions`: threshold, components, SCOORD contours,
areas in mm2), the coded concepts (:mod:`~dicom_ai.results.codes`), one writer per object side by
side (:mod:`~dicom_ai.results.seg` SEG per image, :mod:`~dicom_ai.results.tid1500` TID 1500
Measurement Report, :mod:`~dicom_ai.results.cad_sr` Mammography CAD SR, :mod:`~dicom_ai.results.gsps`
Grayscale Softcopy Presentation State per image, :mod:`~dicom_ai.results.sc` "AI overlay" Secondary
Capture per image, both drawing what :mod:`~dicom_ai.results.marks` chooses), the PNG preview
(:mod:`~dicom_ai.results.preview`), the values they share (:mod:`~dicom_ai.results.types`) and the
one entry point :func:`build_results` (:mod:`~dicom_ai.results.build`).

May import: :mod:`dicom_ai.core`, :mod:`dicom_ai.imaging` (the preview shows the image as the
models saw it); highdicom, pydicom, SimpleITK, matplotlib (polygon tests), Pillow. No writer
imports another; each reads :mod:`~dicom_ai.results.types`.
"""

from dicom_ai.results.build import ResultsBuilder, StudyResults, analyse_image, build_results
from dicom_ai.results.cad_sr import MAMMOGRAPHY_CAD_SR, build_mammography_cad_sr
from dicom_ai.results.gsps import GRAPHIC_LAYER, build_presentation_state
from dicom_ai.results.preview import render_preview
from dicom_ai.results.regions import DEFAULT_MIN_AREA_MM2, Region, RegionSet, Spacing, area_spacing, find_regions
from dicom_ai.results.sc import build_overlay_capture
from dicom_ai.results.seg import build_segmentation, transfer_syntax_for
from dicom_ai.results.tid1500 import build_measurement_report
from dicom_ai.results.types import ImageResult, ObjectIdentity, Segment, order_maps

__all__ = [
    "build_results", "ResultsBuilder", "StudyResults", "analyse_image",
    "ImageResult", "ObjectIdentity", "Segment", "order_maps",
    "Spacing", "Region", "RegionSet", "area_spacing", "find_regions", "DEFAULT_MIN_AREA_MM2",
    "build_segmentation", "transfer_syntax_for", "build_measurement_report",
    "build_mammography_cad_sr", "MAMMOGRAPHY_CAD_SR", "render_preview",
    "build_presentation_state", "GRAPHIC_LAYER", "build_overlay_capture",
]
