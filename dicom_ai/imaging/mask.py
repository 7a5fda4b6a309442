"""The breast mask: which pixels of a mammogram are breast (skin included), not background.

Owns :func:`breast_mask`. Computed once per image and cached on the :class:`~dicom_ai.imaging.mammogram.Mammogram`
(``Mammogram.breast_mask``), so every model of a study sees the same mask at no extra cost.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from dicom_ai.imaging.resample import resize

__all__ = ["breast_mask"]


def breast_mask(pixels: np.ndarray, max_side: int = 512) -> np.ndarray:
    """Boolean breast mask on the grid of ``pixels`` ([0, 1], dense bright).

    Triangle threshold on a downsampled copy (it sits just above the background peak, so
    fatty tissue stays in, which Otsu would cut out), a small opening to detach markers,
    the largest connected component, holes filled: burned-in labels and skin markers in the
    background are excluded.
    """
    rows, cols = pixels.shape
    factor = max(1, int(np.ceil(max(rows, cols) / max_side)))
    small = resize(pixels, (int(np.ceil(rows / factor)), int(np.ceil(cols / factor))))
    image = sitk.GetImageFromArray(small.astype(np.float32))
    foreground = sitk.TriangleThreshold(image, 0, 1)
    foreground = sitk.BinaryMorphologicalOpening(foreground, [2, 2])
    if not np.any(sitk.GetArrayViewFromImage(foreground)):
        return np.zeros_like(pixels, dtype=bool)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(foreground), sortByObjectSize=True)
    largest = sitk.BinaryFillhole(sitk.Equal(components, 1))
    mask_small = sitk.GetArrayFromImage(largest).astype(np.float32)
    return resize(mask_small, (rows, cols), mode="nearest") > 0.5
