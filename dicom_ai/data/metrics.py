"""Evaluation metrics for segmentation, detection and classification, in numpy.

Each function states its convention, since published numbers differ mostly in conventions:

* **Dice / IoU** (``dice``, ``iou``): ``2|P∩G| / (|P|+|G|)`` and ``|P∩G| / |P∪G|`` on boolean
  masks. An image whose ground truth *and* prediction are empty has no defined score (``nan``);
  ``segmentation_summary`` averages per-image scores over the images whose ground truth
  contains the class (the usual "per image, then averaged" report), reports the pooled Dice
  over all pixels of all images, and the false-positive area on images without the class
  separately. Probability maps are binarised at ``threshold`` (default 0.5, inclusive: p >= t).
* **Soft Dice** (``soft_dice``): ``2 Σ p g / (Σ p + Σ g)`` on probabilities, no threshold.
* **Pixel-level average precision** (``pixel_average_precision``): AP over all pixels of all
  images pooled, with probabilities quantised into ``bins`` equal bins (default 1000, so a map
  of several megapixels needs no sort); AP as in ``average_precision``.
* **Average precision / PR AUC** (``average_precision``): ``Σ_n (R_n − R_{n−1}) P_n`` over the
  distinct score thresholds in decreasing order (the scikit-learn definition; no interpolation,
  tied scores enter together).
* **ROC AUC** (``roc_auc``): the probability that a random positive scores above a random
  negative, ties counting one half (Mann-Whitney U / (n_pos n_neg)); equals the trapezoidal
  area under ``roc_curve``.
* **Bootstrap CI** (``bootstrap_ci``): percentile interval over ``n`` resamples (default 2000)
  of the cases with replacement; resamples that miss a class are drawn again.
* **Breast-level scores** (``breast_level``): the mean of the image scores of one breast (its CC
  and MLO), label = any image of that breast positive.
* **FROC** (``froc``): detections are (score, row, column) per image; truth is a label map of
  cluster regions per image. A detection is a true positive when its location lies inside a
  truth region; the highest-scoring detection of each region counts, further detections in an
  already-hit region are neither TP nor FP (they are ignored); everything else is a false
  positive. Sweeping the score threshold gives sensitivity (hit regions / all regions) against
  mean false positives per image (FPs / number of images, all images counted, normal ones
  included). ``sensitivity_at`` reads the curve at 0.25, 0.5, 1, 2, 4 FP/image as the highest
  sensitivity reached with at most that many FP/image; their mean is the CPM-like summary.
* **Lesion-level FROC** (``lesion_froc``): truth is a list of lesion masks per image (circles or
  drawn outlines, which may overlap), read off at ``LESION_FROC_RATES`` (0.125 ... 4 FP/image).
  A mark is a hit when its centroid, rounded to the nearest pixel, lies in a lesion; marks are
  taken in decreasing score and each hits the first not-yet-hit lesion containing it; a mark
  inside lesions that are all hit already, or inside an ``ignore`` region (a lesion of another
  type when one type is scored), is neither TP nor FP; every other mark is a false mark.
  Lesions without location cannot be hit and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import SimpleITK as sitk

FROC_RATES = (0.25, 0.5, 1.0, 2.0, 4.0)
#: False marks per image at which lesion-level FROC curves are read (``lesion_froc``).
LESION_FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)


# --------------------------------------------------------------------------- overlap


def _bool(a: np.ndarray, threshold: float) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == bool else a >= threshold


def dice(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """Dice of a mask or probability map (binarised at ``threshold``) against a boolean truth.

    Returns ``nan`` when both are empty (undefined; excluded from means).

    Parameters
    ----------
    pred
        ``(rows, columns)`` prediction on the same grid as ``truth``: a boolean mask (used as
        is) or a probability map with values in [0, 1].
    truth
        ``(rows, columns)`` ground truth; boolean, or numeric binarised at 0.5 (``>=``).
    threshold
        Probability at which a non-boolean ``pred`` is binarised (inclusive: ``p >= threshold``);
        ignored for a boolean ``pred``.

    Returns
    -------
    float
        ``2|P∩G| / (|P|+|G|)`` in [0, 1], or ``nan`` when both masks are empty.

    Raises
    ------
    ValueError
        When the two shapes differ.
    """
    p, g = _bool(pred, threshold), _bool(truth, 0.5)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}")
    denom = int(p.sum()) + int(g.sum())
    return float("nan") if denom == 0 else 2.0 * int(np.logical_and(p, g).sum()) / denom


def iou(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """Intersection over union (Jaccard); ``nan`` when both are empty.

    Parameters
    ----------
    pred
        ``(rows, columns)`` prediction on the same grid as ``truth``: a boolean mask (used as
        is) or a probability map with values in [0, 1].
    truth
        ``(rows, columns)`` ground truth; boolean, or numeric binarised at 0.5 (``>=``).
    threshold
        Probability at which a non-boolean ``pred`` is binarised (inclusive: ``p >= threshold``);
        ignored for a boolean ``pred``.

    Returns
    -------
    float
        ``|P∩G| / |P∪G|`` in [0, 1], or ``nan`` when both masks are empty.

    Raises
    ------
    ValueError
        When the two shapes differ.
    """
    p, g = _bool(pred, threshold), _bool(truth, 0.5)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}")
    union = int(np.logical_or(p, g).sum())
    return float("nan") if union == 0 else int(np.logical_and(p, g).sum()) / union


def soft_dice(prob: np.ndarray, truth: np.ndarray) -> float:
    """``2 Σ p g / (Σ p + Σ g)`` of probabilities in [0, 1]; ``nan`` when both sums are 0."""
    p = np.asarray(prob, dtype=np.float64)
    g = np.asarray(truth, dtype=np.float64)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}")
    denom = p.sum() + g.sum()
    return float("nan") if denom == 0 else float(2.0 * (p * g).sum() / denom)


@dataclass
class SegmentationSummary:
    """Per-class segmentation result over a set of images (see the module conventions)."""

    mean_dice: float  # over images whose truth contains the class
    mean_iou: float
    mean_soft_dice: float
    pooled_dice: float  # all pixels of all images together
    n_images: int  # images whose truth contains the class
    per_image_dice: list[float] = field(default_factory=list)  # those images, in input order
    false_positive_area_px: float = 0.0  # mean predicted area on images without the class
    n_negative_images: int = 0


def segmentation_summary(preds: Iterable[np.ndarray], truths: Iterable[np.ndarray],
                         threshold: float = 0.5) -> SegmentationSummary:
    """Dice, IoU and soft Dice per image averaged over images containing the class, and pooled Dice.

    Parameters
    ----------
    preds
        One ``(rows, columns)`` prediction per image: a boolean mask or a probability map in
        [0, 1]. Soft Dice uses the probabilities themselves, Dice and IoU the binarised map.
    truths
        The matching ground-truth masks, same order and shape (boolean, or numeric
        binarised at 0.5). The two iterables are paired with :func:`zip`, so the shorter one
        ends the evaluation.
    threshold
        Probability at which non-boolean predictions are binarised (inclusive: ``p >= threshold``).

    Returns
    -------
    SegmentationSummary
        Means over images whose truth contains the class (``nan`` when there are none),
        pooled Dice over all pixels of all images, and the mean predicted area in pixels on
        images without the class (``false_positive_area_px``, 0 when there are none).
    """
    dices, ious, softs, fp_areas = [], [], [], []
    inter = total = 0
    for pred, truth in zip(preds, truths):
        g = _bool(truth, 0.5)
        p = _bool(pred, threshold)
        inter += int(np.logical_and(p, g).sum())
        total += int(p.sum()) + int(g.sum())
        if g.any():
            dices.append(dice(p, g))
            ious.append(iou(p, g))
            softs.append(soft_dice(pred if np.asarray(pred).dtype != bool else p, g))
        else:
            fp_areas.append(float(p.sum()))
    mean = (lambda v: float(np.mean(v)) if v else float("nan"))
    return SegmentationSummary(
        mean_dice=mean(dices), mean_iou=mean(ious), mean_soft_dice=mean(softs),
        pooled_dice=float("nan") if total == 0 else 2.0 * inter / total,
        n_images=len(dices), per_image_dice=dices,
        false_positive_area_px=mean(fp_areas) if fp_areas else 0.0, n_negative_images=len(fp_areas))


# --------------------------------------------------------------------------- ranking


def _check_scores(scores: Sequence[float], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    return s, y


def _pr_from_counts(tp: np.ndarray, fp: np.ndarray, n_pos: int) -> float:
    """AP from cumulative TP/FP counts at decreasing distinct thresholds."""
    if n_pos == 0:
        return float("nan")
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / n_pos
    prev = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - prev) * precision))


def average_precision(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Average precision (= PR AUC here): ``Σ (R_n − R_{n−1}) P_n`` over distinct thresholds."""
    s, y = _check_scores(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last].astype(np.float64)
    fp = (last + 1 - tp).astype(np.float64)
    return _pr_from_counts(tp, fp, int(y.sum()))


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), starting at (0, 0) with threshold +inf."""
    s, y = _check_scores(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last].astype(np.float64)
    fp = (last + 1 - tp).astype(np.float64)
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return (np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, s[last]])


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """ROC AUC by the Mann-Whitney statistic with ties counted one half; ``nan`` with one class."""
    s, y = _check_scores(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # Average ranks over ties.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def pr_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """PR AUC, reported as average precision (see ``average_precision``)."""
    return average_precision(scores, labels)


class PixelPrecisionRecall:
    """Streaming pixel-level precision/recall: add images one by one, then read AP.

    Probabilities are quantised into ``bins`` equal bins: bin ``k`` holds p in
    [k/bins, (k+1)/bins) (p = 1 falls in the last bin); pixels of one bin are tied.
    """

    def __init__(self, bins: int = 1000):
        self.bins = bins
        self.pos = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)

    def add(self, prob: np.ndarray, truth: np.ndarray) -> None:
        p = np.asarray(prob, dtype=np.float32)
        g = _bool(truth, 0.5)
        if p.shape != g.shape:
            raise ValueError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}")
        idx = np.clip((p * self.bins).astype(np.int64), 0, self.bins - 1).ravel()
        gi = g.ravel()
        self.pos += np.bincount(idx[gi], minlength=self.bins)
        self.neg += np.bincount(idx[~gi], minlength=self.bins)

    def average_precision(self) -> float:
        keep = (self.pos + self.neg)[::-1] > 0
        tp = np.cumsum(self.pos[::-1])[keep].astype(np.float64)
        fp = np.cumsum(self.neg[::-1])[keep].astype(np.float64)
        return _pr_from_counts(tp, fp, int(self.pos.sum()))


def pixel_average_precision(probs: Iterable[np.ndarray], truths: Iterable[np.ndarray], bins: int = 1000) -> float:
    """Pixel-level AP pooled over all pixels of all images (see ``PixelPrecisionRecall``).

    Parameters
    ----------
    probs
        One ``(rows, columns)`` probability map per image, values in [0, 1] (values outside
        are clipped into the first or last bin).
    truths
        The matching ground-truth masks, same order and shape (boolean, or numeric
        binarised at 0.5); paired with ``probs`` by :func:`zip`.
    bins
        Number of equal-width probability bins in [0, 1]; pixels in one bin count as tied.

    Returns
    -------
    float
        Average precision over all pixels pooled; ``nan`` when no pixel is positive.
    """
    acc = PixelPrecisionRecall(bins)
    for prob, truth in zip(probs, truths):
        acc.add(prob, truth)
    return acc.average_precision()


# --------------------------------------------------------------------------- bootstrap, breast level


@dataclass
class Interval:
    """A point estimate with its bootstrap percentile interval."""

    value: float
    low: float
    high: float
    replicates: int

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], scores: Sequence[float],
                 labels: Sequence[bool], n: int = 2000, alpha: float = 0.05, seed: int = 0) -> Interval:
    """Percentile bootstrap CI of ``metric(scores, labels)``, resampling cases with replacement.

    Resamples without both classes are redrawn (at most ``10 n`` draws in all).

    Parameters
    ----------
    metric
        Called as ``metric(scores, labels)`` with a float64 and a boolean numpy array of one
        length, returning a float (e.g. :func:`roc_auc`, :func:`average_precision`).
    scores
        One finite score per case (any scale; higher = more likely positive).
    labels
        One truth label per case, same order as ``scores``.
    n
        Number of bootstrap resamples wanted.
    alpha
        Two-sided level: the interval is the ``100 alpha/2`` and ``100 (1 - alpha/2)``
        percentiles (0.05 gives a 95 % interval).
    seed
        Seed of the :func:`numpy.random.default_rng` drawing the resamples (reproducible).

    Returns
    -------
    Interval
        ``value`` is the metric on all cases; ``low``/``high`` the percentile bounds and
        ``replicates`` the number of resamples used. Bounds are ``nan`` and ``replicates`` 0
        when there are no cases or only one class.

    Raises
    ------
    ValueError
        When the lengths differ or a score is NaN or infinite.
    """
    s, y = _check_scores(scores, labels)
    value = metric(s, y)
    if s.size == 0 or y.all() or not y.any():
        return Interval(value, float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    stats: list[float] = []
    draws = 0
    while len(stats) < n and draws < 10 * n:
        draws += 1
        idx = rng.integers(0, s.size, size=s.size)
        yy = y[idx]
        if yy.all() or not yy.any():
            continue
        stats.append(metric(s[idx], yy))
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Interval(float(value), float(lo), float(hi), len(stats))


def breast_level(keys: Sequence[tuple[str, str]], scores: Sequence[float],
                 labels: Sequence[bool]) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    """Aggregate image scores to breasts: ``keys`` are (study, laterality) per image.

    Breast score = mean of its images' scores (CC and MLO); breast label = any image positive.
    Returns (breast keys in first-seen order, scores, labels).

    Parameters
    ----------
    keys
        One ``(study, laterality)`` pair per image (e.g. ``("1.2.3", "L")``); images with an
        equal pair belong to one breast.
    scores
        One score per image, same order as ``keys``.
    labels
        One truth label per image, same order as ``keys``.

    Returns
    -------
    tuple of (list of tuple, numpy.ndarray, numpy.ndarray)
        The breast keys in first-seen order, their mean scores (float64) and their labels
        (boolean, True when any image of the breast is positive), index-aligned.
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(tuple(key), []).append(i)
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    names = list(groups)
    return (names, np.array([s[groups[k]].mean() for k in names]), np.array([y[groups[k]].any() for k in names]))


# --------------------------------------------------------------------------- FROC


@dataclass
class FrocResult:
    """FROC curve and its read-outs (see the module conventions)."""

    fp_per_image: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    sensitivity_at: dict[float, float]
    mean_sensitivity: float  # mean over FROC_RATES (CPM-like)
    n_regions: int
    n_images: int


def label_regions(mask: np.ndarray) -> np.ndarray:
    """Connected components (8-connected) of a boolean mask as an int32 label map, 0 = background."""
    mask = np.asarray(mask, dtype=np.uint8)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask), True)
    return sitk.GetArrayFromImage(cc).astype(np.int32)


def detections_from_map(prob: np.ndarray, threshold: float = 0.5) -> list[tuple[float, float, float]]:
    """Candidate detections of a probability map: connected components of ``prob >= threshold``.

    Each is (max probability, centroid row, centroid column) in pixels.
    """
    labels = label_regions(np.asarray(prob) >= threshold)
    n = int(labels.max())
    if n == 0:
        return []
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)
    rows, cols = np.indices(labels.shape)
    r = np.bincount(flat, weights=rows.ravel(), minlength=n + 1) / np.maximum(counts, 1)
    c = np.bincount(flat, weights=cols.ravel(), minlength=n + 1) / np.maximum(counts, 1)
    peak = np.zeros(n + 1)
    np.maximum.at(peak, flat, np.asarray(prob, dtype=np.float64).ravel())
    return [(float(peak[i]), float(r[i]), float(c[i])) for i in range(1, n + 1)]


def froc(detections: Sequence[Sequence[tuple[float, float, float]]], truth_regions: Sequence[np.ndarray],
         rates: Sequence[float] = FROC_RATES) -> FrocResult:
    """FROC over images: ``detections[i]`` = [(score, row, col), ...]; ``truth_regions[i]`` = label map.

    A boolean truth mask is split into 8-connected regions first.

    Parameters
    ----------
    detections
        Per image, its candidate detections as ``(score, row, column)``: any score scale
        (higher = more confident) and a location in pixels on the stored grid of that image,
        (row, column) order with (0, 0) the centre of the top-left pixel, as returned by
        :func:`detections_from_map`. A location is rounded to the nearest pixel; one outside
        the image is a false positive.
    truth_regions
        Per image, same order, a ``(rows, columns)`` map of its truth regions: an integer
        label map (0 = background, each positive label one region) or a boolean mask.
        Images without regions (normal ones) count in the FP/image denominator.
    rates
        Mean false positives per image at which the sensitivity is read off
        (``sensitivity_at``); their mean is ``mean_sensitivity``.

    Returns
    -------
    FrocResult
        The curve (FP/image against sensitivity, one point per distinct score threshold,
        starting at (0, 0) with threshold +inf) and its read-outs; ``mean_sensitivity`` is
        ``nan`` when there are no truth regions.

    Raises
    ------
    ValueError
        When the two sequences differ in length.
    """
    if len(detections) != len(truth_regions):
        raise ValueError(f"{len(detections)} detection lists but {len(truth_regions)} truth maps")
    n_images = len(detections)
    events = []  # (score, is_tp) after resolving duplicate hits
    n_regions = 0
    for dets, truth in zip(detections, truth_regions):
        lab = label_regions(truth) if np.asarray(truth).dtype == bool else np.asarray(truth)
        n_regions += len(np.unique(lab[lab > 0]))
        hit: set[int] = set()
        for score, r, c in sorted(dets, key=lambda d: -d[0]):
            ri, ci = int(round(r)), int(round(c))
            region = int(lab[ri, ci]) if 0 <= ri < lab.shape[0] and 0 <= ci < lab.shape[1] else 0
            if region == 0:
                events.append((score, False))
            elif region not in hit:
                hit.add(region)
                events.append((score, True))
            # a second detection of a hit region is ignored
    return _froc_curve(events, n_regions, n_images, rates)


def _froc_curve(events: list[tuple[float, bool]], n_regions: int, n_images: int,
                rates: Sequence[float]) -> FrocResult:
    """The FROC curve of resolved (score, is_tp) events; ignored marks are not in ``events``."""
    if not events:
        fps, sens, thr = np.array([0.0]), np.array([0.0]), np.array([np.inf])
    else:
        sc = np.array([e[0] for e in events], dtype=np.float64)
        tp = np.array([e[1] for e in events], dtype=bool)
        order = np.argsort(-sc, kind="mergesort")
        sc, tp = sc[order], tp[order]
        last = np.r_[np.flatnonzero(np.diff(sc)), sc.size - 1]
        ctp = np.cumsum(tp)[last]
        cfp = np.cumsum(~tp)[last]
        fps = np.r_[0.0, cfp / max(n_images, 1)]
        sens = np.r_[0.0, ctp / max(n_regions, 1)] if n_regions else np.r_[0.0, np.zeros(last.size)]
        thr = np.r_[np.inf, sc[last]]
    at = {}
    for rate in rates:
        ok = fps <= rate + 1e-12
        at[float(rate)] = float(sens[ok].max()) if ok.any() else 0.0
    mean = float(np.mean(list(at.values()))) if n_regions else float("nan")
    return FrocResult(fps, sens, thr, at, mean, n_regions, n_images)


def _pixel_at(mask: np.ndarray, r: float, c: float) -> bool:
    ri, ci = int(round(r)), int(round(c))
    return 0 <= ri < mask.shape[0] and 0 <= ci < mask.shape[1] and bool(mask[ri, ci])


def lesion_froc(marks: Sequence[Sequence[tuple[float, float, float]]], lesions: Sequence[Sequence[np.ndarray]],
                ignore: Sequence[Sequence[np.ndarray]] | None = None,
                rates: Sequence[float] = LESION_FROC_RATES) -> FrocResult:
    """Lesion-level FROC: a mark is true when its centroid lies in a lesion (module conventions).

    Parameters
    ----------
    marks
        Per image, its marks as ``(score, row, column)``: any score scale (higher = more
        suspicious), the mark's centroid in pixels on the stored grid, (0, 0) the centre of
        the top-left pixel (as :func:`detections_from_map` returns them).
    lesions
        Per image, same order, the lesions to find: one ``(rows, columns)`` boolean mask
        each (they may overlap); an empty list for a normal image. Every image counts in the
        false-marks-per-image denominator.
    ignore
        Per image, regions whose marks are neither true nor false (e.g. lesions of another
        type when only masses are scored); None for none.
    rates
        False marks per image at which the sensitivity is read (``sensitivity_at``).

    Returns
    -------
    FrocResult
        ``n_regions`` is the number of lesions, ``fp_per_image`` the false marks per image.

    Raises
    ------
    ValueError
        When the per-image sequences differ in length.
    """
    if len(marks) != len(lesions) or (ignore is not None and len(ignore) != len(marks)):
        raise ValueError(f"{len(marks)} mark lists, {len(lesions)} lesion lists"
                         + ("" if ignore is None else f", {len(ignore)} ignore lists"))
    events: list[tuple[float, bool]] = []
    n_lesions = 0
    for i, (dets, targets) in enumerate(zip(marks, lesions)):
        n_lesions += len(targets)
        skip = [] if ignore is None else ignore[i]
        hit = [False] * len(targets)
        for score, r, c in sorted(dets, key=lambda d: -d[0]):
            inside = [j for j, t in enumerate(targets) if _pixel_at(t, r, c)]
            fresh = [j for j in inside if not hit[j]]
            if fresh:
                hit[fresh[0]] = True
                events.append((float(score), True))
            elif inside or any(_pixel_at(m, r, c) for m in skip):
                continue  # a second mark of a found lesion, or a mark on a lesion not scored here
            else:
                events.append((float(score), False))
    return _froc_curve(events, n_lesions, len(marks), rates)


def marks_outside(marks: Sequence[tuple[float, float, float]], region: np.ndarray) -> int:
    """How many marks ``(score, row, column)`` have their centroid (rounded) outside ``region``.

    ``region`` is a ``(rows, columns)`` boolean mask, e.g. the breast; a mark off the grid is
    outside.
    """
    return sum(not _pixel_at(region, r, c) for _, r, c in marks)
