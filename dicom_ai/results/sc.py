"""The "AI overlay" Secondary Capture of one image: the mammogram with the findings burned in.

For a PACS that shows nothing but images. It is a derived picture, never a diagnostic image:
Image Type ``DERIVED\\SECONDARY``, Burned In Annotation ``YES``, a derivation code (DCM 113076
Segmentation) and description, the source in Source Image Sequence (purpose DCM 121322), a
banner ``AI OVERLAY - NOT FOR DIAGNOSIS`` across the top, and a series of its own.

Pixels: RGB, 8 bits, on the source's grid (one SC pixel per source pixel, so an outline is
where the SR's contour is). The grey levels are the source's modality values through its VOI
window (:func:`~dicom_ai.results.marks.voi_window`), inverted when the source displays inverted
(MONOCHROME1), so the picture looks like the mammogram on a workstation. Each drawn region's
boundary pixels (:func:`~dicom_ai.results.marks.outline_mask`) are set to its segment's display
colour, thickened so they survive the downscaling of a PACS thumbnail; labels sit above each
region.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.sr.codedict import codes

from dicom_ai.core.errors import ResultError
from dicom_ai.core.options import Equipment
from dicom_ai.results.codes import display_rgb
from dicom_ai.results.marks import displayed_inverse, drawn_regions, modality_values, outline_mask, region_label, voi_window
from dicom_ai.results.types import ImageResult, ObjectIdentity

__all__ = ["BANNER", "build_overlay_capture", "overlay_pixels"]

#: The text burned across the top of every AI overlay.
BANNER = "AI OVERLAY - NOT FOR DIAGNOSIS"
_SEGMENTATION_DERIVATION = hd.sr.CodedConcept("113076", "DCM", "Segmentation")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def overlay_pixels(image: ImageResult, max_regions_per_segment: int = 20) -> np.ndarray:
    """The burned-in picture, ``(rows, columns, 3)`` uint8 RGB on the source's grid."""
    source = image.source
    center, width, _ = voi_window(source)
    values = modality_values(source)
    # PS3.3 C.11.2.1.2.1 linear window, scaled to 0..255.
    gray = np.clip((values - (center - 0.5)) / max(width - 1, 1) + 0.5, 0, 1)
    if displayed_inverse(source):
        gray = 1 - gray
    rgb = np.repeat((gray * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    rows, cols = gray.shape
    thick = max(1, round(max(rows, cols) / 800))
    occurrences: dict[str, int] = {}
    colours = []
    for segment in image.segments:
        n = occurrences.get(segment.map.finding, 0)
        occurrences[segment.map.finding] = n + 1
        colours.append(display_rgb(segment.map.finding, n))
    # Labels first, outlines over them: an outline is never hidden by another region's label.
    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    line = max(10, rows // 60)
    font = _font(line - 2)
    for segment, colour in zip(image.segments, colours):
        for region in drawn_regions(segment, max_regions_per_segment):
            text = region_label(segment, region)
            w = draw.textlength(text, font=font)
            x = max(0.0, min(float(region.contour[:, 0].min()), cols - w))
            y = max(float(line + 2), float(region.contour[:, 1].min()) - line)
            draw.text((x, y), text, fill=colour, font=font)
    draw.rectangle([0, 0, cols, line + 1], fill=(0, 0, 0))
    draw.text((2, 1), BANNER, fill=(255, 255, 0), font=font)
    rgb = np.array(picture)
    for segment, colour in zip(image.segments, colours):
        edge = outline_mask(image, max_regions_per_segment, segment)
        for _ in range(thick - 1):  # one pixel wider on each side per step
            grown = edge.copy()
            grown[1:, :] |= edge[:-1, :]
            grown[:-1, :] |= edge[1:, :]
            grown[:, 1:] |= edge[:, :-1]
            grown[:, :-1] |= edge[:, 1:]
            edge = grown
        rgb[edge] = colour
    return rgb


def build_overlay_capture(image: ImageResult, identity: ObjectIdentity, equipment: Equipment, *,
                          max_regions_per_segment: int = 20) -> pydicom.Dataset:
    """The "AI overlay" Secondary Capture Image of one image.

    Parameters
    ----------
    image
        The analysed image (cleaned source, segments with their regions).
    identity
        Series and instance UIDs and numbers (from the job's ``ResultUIDs``).
    equipment
        The node, as the SC's manufacturer and its equipment attributes.
    max_regions_per_segment
        Regions drawn per segment, most probable first: the same as the SR's.

    Returns
    -------
    pydicom.Dataset
        A Secondary Capture Image (highdicom), RGB, Explicit VR Little Endian.
    """
    source = image.source
    if not image.segments:
        raise ResultError(f"image {source.SOPInstanceUID} has no segments: nothing to overlay")
    orientation = source.get("PatientOrientation")
    # highdicom needs an orientation for the PATIENT coordinate system (its only choice for a
    # mammogram); a source without a usable one (absent, or dropped as invalid by clean_sources)
    # gets an overlay whose Patient Orientation is sent empty (type 2), not a guessed one.
    orientation = tuple(orientation) if orientation and len(orientation) == 2 else None
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay_pixels(image, max_regions_per_segment),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=equipment.manufacturer,
        laterality=source.get("ImageLaterality") or source.get("Laterality") or None,
        patient_orientation=orientation or ("A", "F"),  # replaced by an empty value below
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    if orientation is None:
        sc.PatientOrientation = None  # type 2 in the General Image module of the SC IOD
    sc.SeriesDescription = identity.series_description[:64]
    sc.ManufacturerModelName = equipment.model_name
    sc.SoftwareVersions = equipment.software_version
    sc.DeviceSerialNumber = equipment.device_serial_number
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    sc.ConversionType = "WSD"
    sc.DerivationDescription = ("AI findings burned in over the windowed source image; "
                                "not for diagnosis")[:1024]
    sc.DerivationCodeSequence = [_SEGMENTATION_DERIVATION]
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept(*_code(codes.DCM.SourceImageForImageProcessingOperation))]
    sc.SourceImageSequence = [ref]
    return sc


def _code(code) -> tuple[str, str, str]:
    return code.value, code.scheme_designator, code.meaning
