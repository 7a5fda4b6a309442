"""The NYU preprocessing of the GLAM/GMIC authors: a view as their pipeline hands it to the network.

Owns :func:`crop_to_breast` (their ``crop_mammogram``), :func:`optimal_centre` (their
``get_optimal_centers``), :class:`NyuWindow` (the source -> network-input map and back) and
:func:`nyu_input` (a :class:`~dicom_ai.imaging.Mammogram` to the standardised input). Written
from reading nyukat/GLAM ``src/cropping``, ``src/optimal_centers`` and ``src/data_loading``
(not copied); ``benchmarks/bench_glam_authors_preprocessing.py`` checks it on their sample.

The steps, on an image whose background is 0 (their PNGs; :func:`nyu_input` shifts a DICOM
view's minimum to 0):

1. breast box: mask ``pixel > 0``, eroded 100 times (4-neighbour cross, outside the image
   counts as background), the largest 4-connected component, dilated 100 times; its bounding
   box, widened by up to 50 px above and below and on the side away from the chest wall.
   Computed as taxicab distance transforms (erosion by n crosses = distance > n), which is
   the same set as iterating the cross;
2. the crop is flipped so the breast faces right (chest wall at column 0);
3. the "optimal centre" of the 2944 x 1920 window: for CC its column is fixed by the rightmost
   breast column of the lower two thirds and its row maximises the count of nonzero pixels
   (ties: closest to the crop's middle); for MLO both are fixed by that column and the
   bottom breast row (their ``get_bottomrightmost_pixel_constraint``);
4. the window at that centre, zero-padded when the crop is smaller (CC above and below, MLO
   below, columns on the right) and shifted inside the crop; no resampling;
5. standardisation over the whole window, background included:
   ``(x - mean) / max(std, 1e-5)`` in float32.

Coordinates are (row, column) pixels; boxes are half-open ``(r0, r1, c0, c1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from dicom_ai.core.errors import ImagingError
from dicom_ai.imaging.mammogram import Mammogram

__all__ = ["BreastBox", "NyuWindow", "crop_to_breast", "optimal_centre", "nyu_window", "nyu_input", "standardise"]

#: The authors' constants (``crop_mammogram`` defaults and ``find_rightmost_from_ratio``).
MORPHOLOGY_ITERATIONS = 100
BUFFER_PX = 50
RIGHTMOST_FROM_RATIO = 1 / 3


def _taxicab_distance(zero_set: np.ndarray, outside_is_zero: bool) -> np.ndarray:
    """Taxicab (4-neighbour) distance of every pixel to the nearest pixel of ``zero_set``.

    With ``outside_is_zero`` the pixels beyond the image border count as part of the set
    (scipy's ``binary_erosion`` border). Exact: the L1 transform is separable, and each 1-D
    pass is a forward and a backward sweep.
    """
    big = np.int32(zero_set.size + 2)
    d = np.where(zero_set, np.int32(0), big).astype(np.int32)
    if outside_is_zero:
        d = np.pad(d, 1, constant_values=0)
    for axis in (0, 1):
        view = d if axis == 0 else d.T
        for i in range(1, view.shape[0]):
            np.minimum(view[i], view[i - 1] + 1, out=view[i])
        for i in range(view.shape[0] - 2, -1, -1):
            np.minimum(view[i], view[i + 1] + 1, out=view[i])
    return d[1:-1, 1:-1] if outside_is_zero else d


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component; ties go to the one met first in raster order."""
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), False))
    n = int(labels.max())
    if n == 0:
        raise ImagingError("no breast found: nothing of the image is left after 100 erosions of pixel > 0 "
                           "(is the background 0 and the breast at least 200 px across?)")
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    first = np.full(n + 1, flat.size, dtype=np.int64)
    np.minimum.at(first, flat, np.arange(flat.size))
    candidates = np.flatnonzero(sizes == sizes.max()) + 1
    return labels == candidates[np.argmin(first[candidates])]


@dataclass(frozen=True)
class BreastBox:
    """The authors' cropping result for one view (their ``crop_img_from_largest_connected``).

    ``box`` half-open (r0, r1, c0, c1) in stored source pixels (their ``window_location``);
    ``faces_left`` whether the breast points to column 0 in the source (their mode "left");
    ``rightmost_x`` and ``bottommost_y`` the breast's rightmost column (of the lower two
    thirds) and bottom row, in pixels of the crop *after* it is flipped to face right,
    computed as the authors compute them (including their off-by-one for a flipped view).
    """

    box: tuple[int, int, int, int]
    faces_left: bool
    rightmost_x: int
    bottommost_y: int


def crop_to_breast(image: np.ndarray, faces_left: bool) -> BreastBox:
    """The breast's bounding box as the authors crop it (see the module docstring, step 1).

    ``image`` (rows, columns) with background exactly 0, stored orientation.

    Raises
    ------
    ImagingError
        Nothing survives the erosion (no breast, or the background is not 0).
    """
    rows, cols = image.shape
    eroded = _taxicab_distance(~(image > 0), outside_is_zero=True) > MORPHOLOGY_ITERATIONS
    largest = _taxicab_distance(_largest_component(eroded), outside_is_zero=False) <= MORPHOLOGY_ITERATIONS
    r_any, c_any = np.flatnonzero(largest.any(axis=1)), np.flatnonzero(largest.any(axis=0))
    top, bottom, left, right = int(r_any[0]), int(r_any[-1]) + 1, int(c_any[0]), int(c_any[-1]) + 1
    last_row = bottom - 1
    top -= min(top, BUFFER_PX)
    bottom += min(rows - bottom, BUFFER_PX)
    if faces_left:
        left -= min(left, BUFFER_PX)
    else:
        right += min(cols - right, BUFFER_PX)
    bottommost_y = last_row - top
    cropped = largest[top:bottom, left:right]
    ignore = int(cropped.shape[0] * RIGHTMOST_FROM_RATIO)
    has = np.flatnonzero(cropped[ignore:].any(axis=0))
    rightmost_x = int(has[0] if faces_left else has[-1])
    if faces_left:
        # The authors' conversion to the flipped crop (width - x, not width - 1 - x).
        rightmost_x = cropped.shape[1] - rightmost_x
    return BreastBox(box=(top, bottom, left, right), faces_left=faces_left, rightmost_x=rightmost_x,
                     bottommost_y=int(bottommost_y))


def optimal_centre(crop: np.ndarray, view: str, breast: BreastBox,
                   window: tuple[int, int] = (2944, 1920)) -> tuple[int, int]:
    """The authors' "best centre" (row, column) of ``window`` in the flipped crop (step 3).

    ``crop`` is the cropped image flipped to face right; ``view`` ``CC`` or anything else
    (treated as MLO). The centre may lie outside the crop; :class:`NyuWindow` shifts the
    window inside.
    """
    h, w = crop.shape
    wh, ww = window
    half = np.array([wh // 2, ww // 2])
    if view.upper() == "CC":
        com = np.array([h // 2, w // 2])
        lo, hi = half[0], h - (wh - half[0])
        if lo >= hi:
            lo = hi = com[0]
        ys = np.arange(lo, hi + 1)
        x = breast.rightmost_x - half[1] - 1
        if len(ys) == 1:
            return int(ys[0]), int(x)
        nonzero = (crop > 0).astype(np.int64)
        # Count of nonzero pixels in the window rows [y - wh/2, y + wh/2) (clipped), columns
        # [x - ww/2, x + ww/2) clipped and shifted as the authors' candidate boxes are.
        c0 = x - half[1]
        off = max(-c0, 0)
        c0, c1 = max(c0, 0), min(x + (ww - half[1]) + off, w)
        col_sums = np.concatenate([[0], nonzero[:, c0:c1].sum(axis=1).cumsum()])
        r0 = ys - half[0]
        offs = np.clip(-r0, 0, None)
        r0 = np.clip(r0, 0, None)
        r1 = np.clip(ys + (wh - half[0]) + offs, None, h)
        counts = col_sums[r1] - col_sums[r0]
        best = ys[counts == counts.max()]
        return int(best[np.argmin((best - com[0]) ** 2)]), int(x)
    strip = crop[:, -ww:] != 0
    rows_any = np.flatnonzero(strip.any(axis=1))
    bottom = min(int(rows_any[-1]), breast.bottommost_y) if len(rows_any) else breast.bottommost_y
    return int(bottom - half[0] - 1), int(breast.rightmost_x - half[1] - 1)


@dataclass(frozen=True)
class NyuWindow:
    """The map from a stored source image to the authors' network input, and back.

    Forward: crop ``breast.box``, flip to face right when ``breast.faces_left``, take the
    window ``(r0, r1, c0, c1)`` in pixels of that flipped crop (rows may start above it and
    run past it, columns past its right edge: zeros there). Every step is integer indexing,
    so ``inverse`` places each input pixel back on exactly the source pixel it came from.
    """

    source_shape: tuple[int, int]
    breast: BreastBox
    window: tuple[int, int, int, int]

    def _overlap(self) -> tuple[slice, slice, slice, slice]:
        r0, r1, c0, c1 = self.window
        top, bottom, left, right = self.breast.box
        h, w = bottom - top, right - left
        sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
        return slice(sr0, sr1), slice(sc0, sc1), slice(sr0 - r0, sr1 - r0), slice(sc0 - c0, sc1 - c0)

    def forward(self, image: np.ndarray) -> np.ndarray:
        """Stored source grid -> the (unstandardised) float32 network input."""
        if tuple(image.shape) != tuple(self.source_shape):
            raise ImagingError(f"image shape {image.shape} differs from the window's source {self.source_shape}")
        top, bottom, left, right = self.breast.box
        crop = image[top:bottom, left:right]
        if self.breast.faces_left:
            crop = crop[:, ::-1]
        r0, r1, c0, c1 = self.window
        out = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
        cr, cc, orr, occ = self._overlap()
        out[orr, occ] = crop[cr, cc]
        return out

    def inverse(self, array: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Network-input grid -> stored source grid (float32); pixels the window does not cover get ``fill``."""
        top, bottom, left, right = self.breast.box
        crop = np.full((bottom - top, right - left), fill, dtype=np.float32)
        cr, cc, orr, occ = self._overlap()
        crop[cr, cc] = np.asarray(array, dtype=np.float32)[orr, occ]
        if self.breast.faces_left:
            crop = crop[:, ::-1]
        out = np.full(self.source_shape, fill, dtype=np.float32)
        out[top:bottom, left:right] = crop
        return out


def nyu_window(image: np.ndarray, view: str, faces_left: bool,
               input_shape: tuple[int, int] = (2944, 1920)) -> NyuWindow:
    """The authors' window for one view (steps 1-4); ``image`` stored orientation, background 0."""
    breast = crop_to_breast(image, faces_left)
    top, bottom, left, right = breast.box
    crop = image[top:bottom, left:right]
    if faces_left:
        crop = crop[:, ::-1]
    h, w = crop.shape
    wh, ww = input_shape
    cy, cx = optimal_centre(crop, view, breast, input_shape)
    r0, r1 = cy - wh // 2, cy + wh - wh // 2
    c0, c1 = cx - ww // 2, cx + ww - ww // 2
    pad_top = 0
    if h < wh:  # padded: CC half above (the window starts at the padded top), MLO below
        pad_top = (wh - h) // 2 if view.upper() == "CC" else 0
        r0, r1 = 0, wh
    if w < ww:
        c0, c1 = 0, ww
    padded_h, padded_w = max(h, wh), max(w, ww)
    # Shift inside the padded crop (their shift_window_inside_image).
    if r0 < 0:
        r0, r1 = 0, wh
    elif r1 > padded_h:
        r0, r1 = padded_h - wh, padded_h
    if c0 < 0:
        c0, c1 = 0, ww
    elif c1 > padded_w:
        c0, c1 = padded_w - ww, padded_w
    return NyuWindow(source_shape=tuple(image.shape), breast=breast,
                     window=(r0 - pad_top, r1 - pad_top, c0, c1))


def standardise(x: np.ndarray) -> np.ndarray:
    """The authors' standardisation: ``(x - mean) / max(std, 1e-5)`` over the whole window, float32."""
    x = np.array(x, dtype=np.float32)
    x -= np.mean(x)
    x /= np.maximum(np.std(x), np.float32(1e-5))
    return x


def nyu_input(mammogram: Mammogram, input_shape: tuple[int, int] = (2944, 1920)) -> tuple[np.ndarray, NyuWindow]:
    """A decoded view as the authors' pipeline hands it to GLAM: standardised float32 ``input_shape``
    facing right, and the :class:`NyuWindow` that maps network outputs back to the stored grid.

    The view's minimum is shifted to 0 first: the authors' breast mask is ``pixel > 0`` on PNGs
    whose background is 0, and the standardisation removes any shift. No resampling: the
    authors' model sees the detector's pixels (theirs: NYU's scanners).
    """
    pixels = np.asarray(mammogram.pixels, dtype=np.float32)
    image = pixels - pixels.min()
    window = nyu_window(image, mammogram.view, mammogram.faces_left, input_shape)
    return standardise(window.forward(image)), window
