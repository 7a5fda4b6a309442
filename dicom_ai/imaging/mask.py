"""The breast mask and the pectoral-muscle mask: which pixels of a mammogram are breast.

Owns :func:`breast_mask`, :func:`pectoral_mask`, :func:`chest_wall_side` and
:data:`MASK_VERSION`. The breast mask is computed once per image and cached on the
:class:`~dicom_ai.imaging.mammogram.Mammogram` (``Mammogram.breast_mask``, and
``Mammogram.pectoral_mask`` for MLO views), so every model of a study sees the same mask at
no extra cost, and the pipeline drops every mark outside it.

Conventions: masks are boolean ``(rows, columns)`` on the stored grid of ``pixels`` (no flip);
intensities are in [0, 1], dense tissue bright. All sizes are given in pixels of the working
copy (the image shrunk so its longer side is at most ``max_side``), which makes the method
independent of the source pixel size to first order (a mammogram's field of view is 18-30 cm
whatever its detector).

What the breast mask removes, and how (each step is needed by real images, not phantoms):

1. Scanner edges and film borders: a frame of 1 % of each side is background (digitisers
   and detectors put bright or dark lines there). A film-edge strip that touches the breast
   over a wide front stays in (known weakness; mdb002 of mini-MIAS).
2. Background: triangle threshold on the median-filtered copy (it sits just above the
   background peak, so fatty tissue stays in, which Otsu would cut out).
3. Burned-in labels and markers not touching the breast: only the largest component is kept,
   after an opening of radius ~1 % of the long side that cuts thin bridges (a label lying on
   the skin line); the opened component is dilated back inside the foreground by the same
   radius so the skin line returns but a bridged label does not.
4. Skin / nipple markers (metal beads, radiopaque stickers) on the skin line: near-saturated
   compact components within the breast's outer band are removed.
5. Holes filled (a lesion or a dark duct is breast).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from dicom_ai.imaging.resample import resize

__all__ = ["MASK_VERSION", "breast_mask", "pectoral_mask", "chest_wall_side"]

#: Bump when the mask method changes: caches of model outputs that depend on it are keyed by it.
MASK_VERSION = 3


def _working_copy(pixels: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    rows, cols = pixels.shape
    factor = max(1, int(np.ceil(max(rows, cols) / max_side)))
    small = resize(np.asarray(pixels, dtype=np.float32), (int(np.ceil(rows / factor)), int(np.ceil(cols / factor))))
    return small, factor


def _largest(binary: np.ndarray) -> np.ndarray:
    if not binary.any():
        return binary
    labels = sitk.GetArrayFromImage(sitk.RelabelComponent(
        sitk.ConnectedComponent(sitk.GetImageFromArray(binary.astype(np.uint8)), True), sortByObjectSize=True))
    return labels == 1


def _disk(binary: np.ndarray, radius: int, op: str) -> np.ndarray:
    img = sitk.GetImageFromArray(binary.astype(np.uint8))
    f = {"open": sitk.BinaryMorphologicalOpening, "close": sitk.BinaryMorphologicalClosing,
         "dilate": sitk.BinaryDilate, "erode": sitk.BinaryErode}[op]
    return sitk.GetArrayFromImage(f(img, [radius, radius], sitk.sitkBall)).astype(bool)


def _fill(binary: np.ndarray) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(binary.astype(np.uint8)))).astype(bool)


def _foreground(small: np.ndarray) -> np.ndarray:
    img = sitk.Median(sitk.GetImageFromArray(small), [1, 1])
    fg = sitk.GetArrayFromImage(sitk.TriangleThreshold(img, 0, 1)).astype(bool)
    rows, cols = fg.shape
    frame_r, frame_c = max(2, rows // 100), max(2, cols // 100)
    fg[:frame_r], fg[-frame_r:], fg[:, :frame_c], fg[:, -frame_c:] = False, False, False, False
    return fg


def breast_mask(pixels: np.ndarray, max_side: int = 512) -> np.ndarray:
    """Boolean breast mask (skin line included) on the grid of ``pixels``.

    Parameters
    ----------
    pixels
        ``(rows, columns)`` intensities in [0, 1], dense tissue bright, stored grid.
    max_side
        The mask is computed on a copy shrunk to at most this many pixels per side, then
        brought back (nearest neighbour).

    Returns
    -------
    numpy.ndarray
        Boolean ``(rows, columns)``; all False when no breast is found. The steps are in the
        module docstring.
    """
    rows, cols = pixels.shape
    small, _ = _working_copy(pixels, max_side)
    fg = _foreground(small)
    if not fg.any():
        return np.zeros((rows, cols), dtype=bool)
    radius = max(2, max(small.shape) // 100)
    core = _largest(_disk(fg, radius, "open"))
    if not core.any():
        core = _largest(fg)
    breast = _disk(core, radius + 1, "dilate") & fg
    breast = _fill(_largest(breast))
    breast = _without_markers(small, breast, radius)
    return resize(breast.astype(np.float32), (rows, cols), mode="nearest") > 0.5


def _without_markers(small: np.ndarray, breast: np.ndarray, radius: int) -> np.ndarray:
    """Remove near-saturated compact blobs in the breast's outer band (skin / nipple markers)."""
    values = small[breast]
    if values.size < 100:
        return breast
    # A marker is brighter than any tissue: above the 99.9th percentile of the breast and
    # near the top of the intensity range.
    level = max(0.95, float(np.quantile(values, 0.999)))
    bright = (small >= level) & breast
    if not bright.any():
        return breast
    band = breast & ~_disk(breast, 4 * radius, "erode")
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(bright.astype(np.uint8)), True))
    out = breast.copy()
    max_px = (6 * radius) ** 2
    for lab in range(1, int(labels.max()) + 1):
        blob = labels == lab
        n = int(blob.sum())
        if 2 <= n <= max_px and (blob & band).sum() >= 0.5 * n:
            out &= ~_disk(blob, radius, "dilate")
    return _largest(out)


def chest_wall_side(mask: np.ndarray) -> tuple[str, float]:
    """Which image side the chest wall is on, from the breast mask, and how sure that is.

    The breast's back edge (chest wall) is a straight, nearly vertical line: the per-row
    outermost mask column on that side hardly moves, while on the nipple side it traces the
    curved skin line. Film may be padded on both sides (mini-MIAS), so touching the image
    edge is not used. The side with the smaller spread (interquartile range over the mask's
    middle 80 % of rows) of its outermost columns is the chest wall; when the spreads are
    alike (confidence < 0.3), the half holding more breast.

    Returns
    -------
    tuple
        ``("left" | "right", confidence)``; confidence in [0, 1] is ``1 - small/large`` of
        the two spreads (0: no evidence either way).
    """
    mask = np.asarray(mask, dtype=bool)
    rr = np.nonzero(mask.any(axis=1))[0]
    if rr.size < 10:
        return "left", 0.0
    rr = rr[int(0.1 * rr.size): int(0.9 * rr.size)]
    first = np.array([np.nonzero(mask[r])[0][0] for r in rr], dtype=float)
    last = np.array([np.nonzero(mask[r])[0][-1] for r in rr], dtype=float)
    spread_l = float(np.subtract(*np.percentile(first, [75, 25]))) + 1.0
    spread_r = float(np.subtract(*np.percentile(last, [75, 25]))) + 1.0
    confidence = float(1.0 - min(spread_l, spread_r) / max(spread_l, spread_r))
    if confidence >= 0.3:
        return ("left" if spread_l < spread_r else "right"), confidence
    # Both edges straight (a breast clipped by the frame on both sides) or both curved: the
    # chest-wall half holds more breast.
    half = mask.shape[1] // 2
    return ("right" if mask[:, half:].sum() > mask[:, :half].sum() else "left"), confidence


def pectoral_mask(pixels: np.ndarray, breast: np.ndarray, faces_left: bool, max_side: int = 512) -> np.ndarray:
    """The pectoral muscle of an MLO view: a triangle at the top chest-wall corner.

    Method (canonical orientation, chest wall at column 0; Kwok et al. style line estimate):
    for each row of the top 60 % of the breast, the smoothed intensity profile from the chest
    wall is searched, within the first 70 % of that row's breast width, for its steepest
    fall (the muscle's front edge is the strongest bright-to-dark step). A line
    ``col = a + b * row`` is fitted to those edges by least squares, twice dropping the 30 %
    farthest edges; the muscle is the breast behind the line. Rejected (all False) when the
    line does not slope towards the chest wall going down, or the triangle holds under 2 % or over 30 % of the breast, or the line meets the chest wall
    below 70 % of the breast's height.

    Parameters
    ----------
    pixels
        ``(rows, columns)`` intensities in [0, 1], dense tissue bright, stored grid.
    breast
        The breast mask of ``pixels`` (:func:`breast_mask`).
    faces_left
        True when the nipple points to column 0 (the chest wall is on the right).
    max_side
        Working size, as for :func:`breast_mask`.

    Returns
    -------
    numpy.ndarray
        Boolean ``(rows, columns)`` on the stored grid, a subset of ``breast``.
    """
    rows, cols = pixels.shape
    small, _ = _working_copy(pixels, max_side)
    bm = resize(np.asarray(breast, dtype=np.float32), small.shape, mode="nearest") > 0.5
    if faces_left:
        small, bm = small[:, ::-1], bm[:, ::-1]
    empty = np.zeros((rows, cols), dtype=bool)
    rr = np.nonzero(bm.any(axis=1))[0]
    if rr.size < 20:
        return empty
    top, bottom = int(rr[0]), int(rr[-1])
    height = bottom - top + 1
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(small), 2.0))
    step = max(2, small.shape[1] // 100)
    er, ec = [], []
    for r in range(top, top + int(0.6 * height)):
        inside = np.nonzero(bm[r])[0]
        if inside.size < 4 * step:
            continue
        start = int(inside[0])
        stop = start + int(0.7 * (inside[-1] - start))
        prof = smooth[r, start:stop + step]
        if prof.size <= 2 * step:
            continue
        fall = prof[:-step] - prof[step:]
        k = int(np.argmax(fall))
        if fall[k] > 0.02:
            er.append(r)
            ec.append(start + k + step / 2)
    if len(er) < 10:
        return empty
    er_a, ec_a = np.asarray(er, float), np.asarray(ec, float)
    keep = np.ones(er_a.size, dtype=bool)
    for _ in range(2):
        b, a = np.polyfit(er_a[keep], ec_a[keep], 1)
        resid = np.abs(ec_a - (a + b * er_a))
        keep = resid <= np.quantile(resid, 0.7)
    b, a = np.polyfit(er_a[keep], ec_a[keep], 1)
    if b >= -0.1 or a + b * top <= 0:
        return empty
    # The line must meet the chest wall (column of the breast's back edge) in the top 70 %.
    back = float(np.median([np.nonzero(bm[r])[0][0] for r in rr]))
    if (back - a) / b > top + 0.7 * height:
        return empty
    yy, xx = np.mgrid[0:small.shape[0], 0:small.shape[1]]
    tri = (xx <= a + b * yy) & bm
    share = tri.sum() / max(bm.sum(), 1)
    if not 0.02 <= share <= 0.30:
        return empty
    if faces_left:
        tri = tri[:, ::-1]
    return (resize(tri.astype(np.float32), (rows, cols), mode="nearest") > 0.5) & np.asarray(breast, dtype=bool)


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's level of a 1-D sample in [0, 1] (between-class variance maximised)."""
    hist, edges = np.histogram(values, bins=bins, range=(float(values.min()), float(values.max()) + 1e-6))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0))
    between = np.nan_to_num(between)
    return float(centres[int(np.argmax(between))])
