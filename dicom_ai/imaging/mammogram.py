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
from dicom_ai.imaging.mask import breast_mask

__all__ = ["Mammogram", "read_mammogram", "mammogram_from_array", "faces_left_by_content"]


@dataclass
class Mammogram:
    """One decoded mammographic view on its stored pixel grid.

    ``spacing_mm`` is (row, column) spacing in mm at the detector plane (Imager Pixel
    Spacing; Pixel Spacing only when no Imager Pixel Spacing is present). ``faces_left``
    is True when the nipple points to column 0 (an R-CC as stored by convention), i.e.
    when the image must be flipped to reach the canonical orientation.
    """

    pixels: np.ndarray
    laterality: str
    view: str
    spacing_mm: tuple[float, float]
    faces_left: bool
    sop_instance_uid: str = ""
    _breast_mask: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def breast_mask(self) -> np.ndarray:
        """Boolean breast mask on the stored grid, computed on first use and then kept.

        Every model of a study asks for it; computing it once per image is the point.
        """
        if self._breast_mask is None:
            self._breast_mask = breast_mask(self.pixels)
        return self._breast_mask

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
    """The nipple direction of an image whose header does not say: the chest wall side holds
    more breast, so the nipple points to column 0 when the right half of ``mask`` has more."""
    half = mask.shape[1] // 2
    return bool(mask[:, half:].sum() > mask[:, :half].sum())


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
    faces_left = _faces_left_from_header(ds, laterality)
    # Unlabelled images are oriented by content; the mask is the one the models use next.
    mammogram.faces_left = faces_left_by_content(mammogram.breast_mask) if faces_left is None else faces_left
    return mammogram
