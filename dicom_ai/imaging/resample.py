"""Resampling of 2-D arrays: the one resize every part of the package uses.

Owns :func:`resize`. Arrays are (rows, columns) float32. Shrinking is antialiased (area-like), enlarging is
bilinear or nearest; pixel centres follow align_corners=False (the half-pixel convention).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resize"]


def resize(array: np.ndarray, shape: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Resize a 2-D float array to ``shape`` (rows, columns); antialiased when shrinking.

    Parameters
    ----------
    array
        2-D (rows, columns) array, any real dtype; the same physical extent is kept (the
        corners of the outer pixels map onto each other, ``align_corners=False``).
    shape
        Output (rows, columns) in pixels.
    mode
        ``bilinear`` (default; antialiased when either side shrinks), ``nearest`` (labels and
        masks, never blends), or any other ``torch.nn.functional.interpolate`` 2-D mode.

    Returns
    -------
    numpy.ndarray
        float32 array of ``shape`` (``array`` itself as float32 when the shape already fits).
    """
    if tuple(array.shape) == tuple(shape):
        return np.asarray(array, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if mode == "nearest":
        out = F.interpolate(t, size=shape, mode="nearest")
    else:
        shrinking = shape[0] < array.shape[0] or shape[1] < array.shape[1]
        out = F.interpolate(t, size=shape, mode=mode, align_corners=False, antialias=shrinking)
    return out[0, 0].numpy()
