"""Grayscale Softcopy Presentation State of one image: the AI findings as graphic annotations.

Every PACS workstation applies a GSPS; few render TID 1500 contours or a SEG on a projection
image. The presentation state references its source image and holds, in one graphic layer
(:data:`GRAPHIC_LAYER`), each region's outline and a short label (finding, model, maximum
probability), with the source's VOI window so the image looks as it does without it.

Coordinates. Graphic Annotation Units are ``PIXEL``: ``(column, row)`` in the source's stored
pixel grid with (0.0, 0.0) at the top-left corner of the top-left pixel, so the centre of pixel
``[r, c]`` is ``(c + 0.5, r + 0.5)`` (PS3.3 C.10.5.1.2). That is the SCOORD convention of the SR
(PS3.3 C.18.6.1.2), so the outlines are the SR's contour points unchanged
(:attr:`~dicom_ai.results.regions.Region.contour`), for the same regions the SR lists: per
segment the ``max_regions_per_segment`` most probable ones.

Each outline is also burned into an overlay plane (60xx, activated in the same layer): the
pixels the SR contour passes through (:func:`~dicom_ai.results.marks.outline_mask`), so that renderers which apply a presentation
state's overlays but draw no vector graphics (dcmtk's ``dcmp2pgm``, several print servers) show
the findings too.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.tag import Tag

from dicom_ai.core.errors import ResultError
from dicom_ai.core.options import Equipment
from dicom_ai.results.codes import display_rgb
from dicom_ai.results.marks import displayed_inverse, drawn_regions, outline_mask, region_label, voi_window
from dicom_ai.results.types import ImageResult, ObjectIdentity

__all__ = ["GRAPHIC_LAYER", "OVERLAY_GROUP", "build_presentation_state"]

#: Graphic Layer (CS) of the findings' outlines, labels and overlay.
GRAPHIC_LAYER = "AI_FINDINGS"
#: The overlay group (60xx) holding the burned outlines.
OVERLAY_GROUP = 0x6000
_CONTENT_LABEL = "AI_FINDINGS"


def _add_overlay(ds: pydicom.Dataset, bits: np.ndarray) -> None:
    """Overlay Plane module (PS3.3 C.9.2) in group 6000, activated in :data:`GRAPHIC_LAYER`."""
    g = OVERLAY_GROUP
    rows, cols = bits.shape
    ds.add_new(Tag(g, 0x0010), "US", rows)
    ds.add_new(Tag(g, 0x0011), "US", cols)
    ds.add_new(Tag(g, 0x0022), "LO", "AI findings: region outlines")
    ds.add_new(Tag(g, 0x0040), "CS", "G")
    ds.add_new(Tag(g, 0x0045), "LO", "AUTOMATED")
    ds.add_new(Tag(g, 0x0050), "SS", [1, 1])
    ds.add_new(Tag(g, 0x0100), "US", 1)
    ds.add_new(Tag(g, 0x0102), "US", 0)
    ds.add_new(Tag(g, 0x1001), "CS", GRAPHIC_LAYER)
    ds.add_new(Tag(g, 0x3000), "OW", pydicom.pixels.pack_bits(bits.ravel()))


def build_presentation_state(image: ImageResult, identity: ObjectIdentity, equipment: Equipment, *,
                             max_regions_per_segment: int = 20, overlay: bool = True) -> pydicom.Dataset:
    """The GSPS of one image: outlines and labels of its regions over the source's window.

    Parameters
    ----------
    image
        The analysed image (cleaned source, segments with their regions). An image with
        segments but no region gets one label saying so, top left.
    identity
        Series and instance UIDs and numbers (from the job's ``ResultUIDs``).
    equipment
        The node as the presentation state's creator.
    max_regions_per_segment
        Regions drawn per segment, most probable first: the same as the SR's.
    overlay
        Also burn the outlines into an overlay plane activated in the layer (see the module
        docstring).

    Returns
    -------
    pydicom.Dataset
        A Grayscale Softcopy Presentation State (highdicom), Explicit VR Little Endian.
    """
    source = image.source
    if not image.segments:
        raise ResultError(f"image {source.SOPInstanceUID} has no segments: nothing to present")
    rows, cols = int(source.Rows), int(source.Columns)
    layer = hd.pr.GraphicLayer(layer_name=GRAPHIC_LAYER, order=1, description="AI findings: outlines and labels",
                               display_color=hd.color.CIELabColor(*_lab(display_rgb("malignant_lesion"))))
    graphics, texts = [], []
    # Label height in pixels: readable on a full-size mammogram and on a small test image.
    height = max(8.0, rows / 50)
    for segment in image.segments:
        for region in drawn_regions(segment, max_regions_per_segment):
            contour = np.asarray(region.contour, dtype=np.float64)
            graphics.append(hd.pr.GraphicObject(graphic_type="POLYLINE", graphic_data=contour, units="PIXEL"))
            text = region_label(segment, region)
            left, top = float(contour[:, 0].min()), float(contour[:, 1].min())
            width = min(float(cols), 0.6 * height * len(text))
            left = max(0.0, min(left, cols - width))
            bottom = max(height, top)
            texts.append(hd.pr.TextObject(text_value=text, units="PIXEL",
                                          bounding_box=(left, bottom - height, left + width, bottom)))
    if not graphics:
        models = ", ".join(sorted({s.map.model.name for s in image.segments}))
        text = f"AI ({models}): no region above threshold"
        texts.append(hd.pr.TextObject(text_value=text, units="PIXEL",
                                      bounding_box=(0.0, 0.0, min(float(cols), 0.6 * height * len(text)), height)))
    annotation = hd.pr.GraphicAnnotation(referenced_images=[source], graphic_layer=layer,
                                         graphic_objects=graphics or None, text_objects=texts)
    center, width, explanation = voi_window(source)
    voi = hd.pr.SoftcopyVOILUTTransformation(window_center=[center], window_width=[width],
                                             window_explanation=[explanation],
                                             voi_lut_function=source.get("VOILUTFunction") or None)
    # The GSPS pipeline ignores the image's Photometric Interpretation (PS3.4 N.2): a MONOCHROME1
    # source keeps its look only through an INVERSE presentation LUT.
    shape = "INVERSE" if displayed_inverse(source) else "IDENTITY"
    models = ", ".join(sorted({s.map.model.name for s in image.segments}))
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_version,
        device_serial_number=equipment.device_serial_number,
        content_label=_CONTENT_LABEL,
        content_description=f"AI findings ({models})"[:64],
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        voi_lut_transformations=[voi],
        presentation_lut_transformation=hd.PresentationLUTTransformation(presentation_lut_shape=shape),
    )
    gsps.SeriesDescription = identity.series_description[:64]
    # General Series Laterality is required of a paired body part when the IOD has no Image
    # Laterality (a GSPS has none): the source's breast.
    laterality = source.get("ImageLaterality") or source.get("Laterality")
    if laterality in ("L", "R"):
        gsps.Laterality = laterality
    if overlay and graphics:
        _add_overlay(gsps, outline_mask(image, max_regions_per_segment))
    return gsps


def _lab(rgb: Sequence[int]) -> tuple[float, float, float]:
    """CIELab (D65) of an sRGB colour: L* 0..100, a* and b* -128..127."""
    c = np.asarray(rgb, dtype=np.float64) / 255
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)), float(np.clip(lab[2], -128, 127))
