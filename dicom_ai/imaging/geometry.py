"""The map from a source image to a model's input grid and back.

Owns :class:`Geometry` (flip, crop box, output shape) and :func:`geometry_for`, the breast-crop
geometry the U-Net uses (GLAM builds its own window, :func:`dicom_ai.networks.glam.glam_geometry`).

Forward: flip to the canonical orientation (chest wall at column 0), crop a box, resize.
Inverse: the three steps undone, so a model's map lands on the stored source pixels. Boxes are
half-open ``(r0, r1, c0, c1)`` in pixels of the canonical (flipped) image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_ai.core.errors import ImagingError
from dicom_ai.imaging.mammogram import Mammogram
from dicom_ai.imaging.resample import resize

__all__ = ["Geometry", "geometry_for"]


@dataclass(frozen=True)
class Geometry:
    """The map from a source image to a model's input grid, and back.

    Forward: flip to the canonical orientation (if ``flip``), take ``box`` (canonical
    coordinates, may extend past the image, where zeros are padded), resize to
    ``out_shape``. ``inverse`` undoes the three steps, so a model's map lands on the
    stored source pixels.
    """

    source_shape: tuple[int, int]
    flip: bool
    box: tuple[int, int, int, int]
    out_shape: tuple[int, int]

    def forward(self, image: np.ndarray, mode: str = "bilinear") -> np.ndarray:
        """Source grid -> model input grid."""
        if tuple(image.shape) != tuple(self.source_shape):
            raise ImagingError(f"image shape {image.shape} differs from geometry source {self.source_shape}")
        canonical = image[:, ::-1] if self.flip else image
        r0, r1, c0, c1 = self.box
        rows, cols = self.source_shape
        crop = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
        sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, rows), max(c0, 0), min(c1, cols)
        crop[sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0] = canonical[sr0:sr1, sc0:sc1]
        return resize(crop, self.out_shape, mode=mode)

    def inverse(self, array: np.ndarray, mode: str = "bilinear", fill: float = 0.0) -> np.ndarray:
        """Model grid -> source grid; pixels outside the box get ``fill``.

        Parameters
        ----------
        array
            ``out_shape`` (rows, columns) on the model input grid, canonical orientation.
        mode
            ``bilinear`` (maps, images) or ``nearest`` (labels), see :func:`resize`.
        fill
            Value of the source pixels outside ``box``, in the units of ``array``.

        Returns
        -------
        numpy.ndarray
            float32 ``source_shape`` (rows, columns) on the *stored* source grid (flipped back
            when ``flip``).
        """
        r0, r1, c0, c1 = self.box
        rows, cols = self.source_shape
        crop = resize(np.asarray(array, dtype=np.float32), (r1 - r0, c1 - c0), mode=mode)
        canonical = np.full((rows, cols), fill, dtype=np.float32)
        sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, rows), max(c0, 0), min(c1, cols)
        canonical[sr0:sr1, sc0:sc1] = crop[sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0]
        return np.ascontiguousarray(canonical[:, ::-1]) if self.flip else canonical


def geometry_for(
    mammogram: Mammogram,
    out_shape: tuple[int, int],
    mask: np.ndarray | None = None,
    margin: int = 0,
) -> Geometry:
    """The breast-crop geometry of ``mammogram`` for a model input of ``out_shape``.

    The box is the breast bounding box (plus ``margin`` pixels) in canonical orientation,
    grown to the aspect ratio of ``out_shape`` so nothing is distorted: extra columns are
    added away from the chest wall, extra rows evenly above and below. With no breast found
    the whole image is used.

    Parameters
    ----------
    mammogram
        The decoded view; its ``faces_left`` decides the flip.
    out_shape
        The model input grid, (rows, columns) in model pixels.
    mask
        Boolean breast mask on the *stored* source grid (``mammogram.breast_mask`` when None).
    margin
        Pixels of the source grid added around the breast's bounding box (not at the chest wall,
        which stays at canonical column 0).

    Returns
    -------
    Geometry
        Its ``box`` is half-open ``(r0, r1, c0, c1)`` in source pixels of the *canonical*
        (flipped) image; it may extend past the image (zero padded).
    """
    rows, cols = mammogram.shape
    if mask is None:
        mask = mammogram.breast_mask
    canonical = mask[:, ::-1] if mammogram.faces_left else mask
    if canonical.any():
        r_idx = np.flatnonzero(canonical.any(axis=1))
        c_idx = np.flatnonzero(canonical.any(axis=0))
        r0, r1 = int(r_idx[0]) - margin, int(r_idx[-1]) + 1 + margin
        c0, c1 = 0, int(c_idx[-1]) + 1 + margin  # chest wall kept at column 0
    else:
        r0, r1, c0, c1 = 0, rows, 0, cols
    r0, r1, c1 = max(r0, 0), min(r1, rows), min(max(c1, 1), cols)
    height, width = r1 - r0, c1 - c0
    target = out_shape[0] / out_shape[1]
    if height / width > target:
        c1 = c0 + int(round(height / target))
    else:
        extra = int(round(width * target)) - height
        r0 -= extra // 2
        r1 = r0 + int(round(width * target))
    return Geometry(source_shape=(rows, cols), flip=mammogram.faces_left, box=(r0, r1, c0, c1),
                    out_shape=(int(out_shape[0]), int(out_shape[1])))
