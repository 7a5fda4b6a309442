"""One decoded mammographic view: pixels, laterality, view, spacing and orientation.

Owns :class:`Mammogram` and the two ways to make one: :func:`read_mammogram` (a DICOM MG data
set) and :func:`mammogram_from_array` (pixels already in [0, 1]).

Conventions:

* Intensities: float32 in [0, 1] with dense tissue bright (see :mod:`dicom_ai.imaging.intensity`).
* Canonical orientation ("facing right"): the chest wall is at column 0 and the nipple points
  towards increasing columns, as an L-CC is stored by convention (Patient Orientation A\\R).
* Arrays are ``(rows, columns)`` on the *stored* pixel grid of the source image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pydicom

from dicom_ai.core.errors import ImagingError
from dicom_ai.core.views import laterality_of, view_of
from dicom_ai.imaging.intensity import normalise_intensities
from dicom_ai.imaging.mask import breast_mask, chest_wall_side, pectoral_mask, working_copy

__all__ = ["Mammogram", "read_mammogram", "mammogram_from_array", "faces_left_by_content", "orient",
           "OVERRIDE_CONFIDENCE"]

#: Content confidence (:func:`~dicom_ai.imaging.mask.chest_wall_side`) above which the pixels
#: overrule a header that disagrees. On mini-MIAS the content rule is wrong on 7/322 images,
#: the most confident of them at 0.67, so 0.9 overrules no correct header there.
OVERRIDE_CONFIDENCE = 0.9


@dataclass
class Mammogram:
    """One decoded mammographic view on its stored pixel grid.

    ``spacing_mm`` is (row, column) spacing in mm at the detector plane (Imager Pixel
    Spacing; Pixel Spacing only when no Imager Pixel Spacing is present). ``faces_left``
    is True when the nipple points to column 0 (an R-CC as stored by convention), i.e.
    when the image must be flipped to reach the canonical orientation. ``orientation``
    says where ``faces_left`` came from (:func:`orient`): ``header``, ``header (pixels
    agree)``, ``header (pixels disagree, not sure)``, ``pixels (header disagrees)``,
    ``pixels (no header)`` or ``caller``.
    """

    pixels: np.ndarray
    laterality: str
    view: str
    spacing_mm: tuple[float, float]
    faces_left: bool
    sop_instance_uid: str = ""
    orientation: str = "caller"
    _breast_mask: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _pectoral_mask: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _working: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def _working_copy(self) -> np.ndarray:
        """The masks' shrunk copy of the pixels (:func:`~dicom_ai.imaging.mask.working_copy`),
        made once for both masks (0.5 MB for a full-size view)."""
        if self._working is None:
            self._working = working_copy(self.pixels)
        return self._working

    @property
    def breast_mask(self) -> np.ndarray:
        """Boolean breast mask on the stored grid, computed on first use and then kept.

        Every model of a study asks for it; computing it once per image is the point.
        """
        if self._breast_mask is None:
            self._breast_mask = breast_mask(self.pixels, working=self._working_copy())
        return self._breast_mask

    @property
    def pectoral_mask(self) -> np.ndarray:
        """Boolean pectoral-muscle mask on the stored grid (MLO-type views; all False for CC
        and when no muscle is found), a subset of :attr:`breast_mask`; computed once."""
        if self._pectoral_mask is None:
            if "MLO" in self.view or self.view in ("ML", "LM", "LMO", "SIO"):
                self._pectoral_mask = pectoral_mask(self.pixels, self.breast_mask, self.faces_left,
                                                    working=self._working_copy())
            else:
                self._pectoral_mask = np.zeros(self.pixels.shape, dtype=bool)
        return self._pectoral_mask

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]


def _faces_left_from_header(ds: pydicom.Dataset, laterality: str) -> bool | None:
    """The nipple direction from Patient Orientation, else laterality; None when neither says."""
    orientation = ds.get("PatientOrientation")
    if orientation and len(orientation) == 2 and str(orientation[0]):
        towards = str(orientation[0])[0].upper()
        if towards == "A":
            return False
        if towards == "P":
            return True
    if laterality:
        return laterality == "R"
    return None


def faces_left_by_content(mask: np.ndarray) -> bool:
    """The nipple direction from the pixels alone: True (nipple towards column 0) when the
    chest wall is on the right (:func:`~dicom_ai.imaging.mask.chest_wall_side`)."""
    return chest_wall_side(mask)[0] == "right"


def orient(header_faces_left: bool | None, mask: np.ndarray) -> tuple[bool, str]:
    """Cross-check the header's nipple direction against the pixels; returns (faces_left, source).

    The header (Patient Orientation, else laterality) is used when present, unless the
    pixels disagree with confidence >= :data:`OVERRIDE_CONFIDENCE`; without a header the
    pixels decide. ``source`` is the text the log and the SR carry.
    """
    side, confidence = chest_wall_side(mask)
    content = side == "right"
    if header_faces_left is None:
        return content, "pixels (no header)"
    if content == header_faces_left:
        return header_faces_left, "header (pixels agree)"
    if confidence >= OVERRIDE_CONFIDENCE:
        return content, "pixels (header disagrees)"
    return header_faces_left, "header (pixels disagree, not sure)"


def mammogram_from_array(
    pixels: np.ndarray,
    laterality: str,
    view: str,
    spacing_mm: tuple[float, float] = (0.1, 0.1),
    faces_left: bool | None = None,
) -> Mammogram:
    """Wrap a [0, 1] float array (for example a PNG scaled by the caller) as a Mammogram.

    Parameters
    ----------
    pixels
        (rows, columns) intensities in [0, 1], dense tissue bright, on the image's stored grid
        (not flipped to the canonical orientation).
    laterality
        ``L`` or ``R`` (case-insensitive).
    view
        ``CC``, ``MLO``, ... (case-insensitive).
    spacing_mm
        (row, column) pixel spacing in mm at the detector plane.
    faces_left
        True when the nipple points to column 0; when None it is taken from the laterality
        (R faces left by convention).
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if faces_left is None:
        faces_left = laterality.upper() == "R"
    return Mammogram(pixels=pixels, laterality=laterality.upper(), view=view.upper(),
                     spacing_mm=(float(spacing_mm[0]), float(spacing_mm[1])), faces_left=faces_left)


def read_mammogram(source: pydicom.Dataset | str) -> Mammogram:
    """Decode a DICOM MG image (any transfer syntax pydicom's plugins decode) into a Mammogram."""
    ds = pydicom.dcmread(source) if isinstance(source, str) else source
    if "PixelData" not in ds:
        raise ImagingError("data set has no Pixel Data")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ImagingError("only single-frame grayscale mammograms are supported")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoder plugins raise many types
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
        raise ImagingError(f"cannot decode Pixel Data (transfer syntax {ts}): {exc}") from exc
    pixels = normalise_intensities(ds, stored)
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing") or (0.1, 0.1)
    laterality = laterality_of(ds)
    mammogram = Mammogram(
        pixels=pixels,
        laterality=laterality,
        view=view_of(ds),
        spacing_mm=(float(spacing[0]), float(spacing[1])),
        faces_left=False,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
    )
    # The header is cross-checked against the pixels; the mask is the one the models use next.
    mammogram.faces_left, mammogram.orientation = orient(_faces_left_from_header(ds, laterality),
                                                         mammogram.breast_mask)
    return mammogram
