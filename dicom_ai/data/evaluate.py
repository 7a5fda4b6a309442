"""Score model output against ground truth and write a report (Markdown + PNG plots + JSON).

Model output is what the pipeline produces (:class:`dicom_ai.findings.ImageFindings`) or the
same content as a :class:`Prediction`. Ground truth comes from :mod:`dicom_ai.datasets`.
Finding maps are scored against these ground-truth unions:

=======================  ==========================================================
map (findings key)       ground truth
=======================  ==========================================================
malignant_lesion         mass_malignant | cluster_malignant
benign_lesion            mass_benign | cluster_benign
mass                     mass_benign | mass_malignant
calcification            calcification_benign | calcification_malignant
calcification_cluster    cluster_benign | cluster_malignant
=======================  ==========================================================

Image scores ``malignant``/``benign`` are scored against the image labels, and at breast level
(mean of the breast's images). FROC uses the ``calcification_cluster`` map (or, without one,
the ``calcification`` map): candidates are connected components of ``p >= 0.1`` scored by
their maximum, against the connected cluster regions. Conventions of every metric are in
:mod:`dicom_ai.metrics`.

Prediction files for ``dicom-ai evaluate --predictions DIR``: one ``<SOPInstanceUID>.npz`` per
image, holding float arrays named by findings key on the stored grid of the image, optional
scalars ``score_malignant``/``score_benign``, and optional ``threshold_<key>`` scalars (default
0.5).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pydicom
from matplotlib.figure import Figure
from tqdm import tqdm

from dicom_ai.data import metrics as M
from dicom_ai.data.sample import Lesion, Sample
from dicom_ai.imaging import resize
from dicom_ai.imaging.mask import MASK_VERSION
from dicom_ai.networks import Pipeline
from dicom_ai.networks.pipeline import allowed_region, restrict_to_breast

TRUTH_FOR_FINDING = {
    "malignant_lesion": ("mass_malignant", "cluster_malignant"),
    "benign_lesion": ("mass_benign", "cluster_benign"),
    "mass": ("mass_benign", "mass_malignant"),
    "calcification": ("calcification_benign", "calcification_malignant"),
    "calcification_cluster": ("cluster_benign", "cluster_malignant"),
}
FROC_CANDIDATE_THRESHOLD = 0.1
_THUMB_ROWS = 256


@dataclass
class Prediction:
    """One image's model output: maps {findings key: probability on the stored grid}, scores, thresholds."""

    maps: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_findings(cls, findings) -> "Prediction":
        """Merge an ImageFindings: maps of the same key are combined by maximum, scores by mean."""
        pred = cls()
        for m in findings.maps:
            prev = pred.maps.get(m.finding)
            pred.maps[m.finding] = m.probability if prev is None else np.maximum(prev, m.probability)
            pred.thresholds.setdefault(m.finding, float(m.threshold))
        by_name: dict[str, list[float]] = {}
        for s in findings.scores:
            by_name.setdefault(s.name, []).append(float(s.value))
        pred.scores = {k: float(np.mean(v)) for k, v in by_name.items()}
        return pred

    @classmethod
    def load(cls, path: str | Path) -> "Prediction":
        """Read a ``<SOPInstanceUID>.npz`` prediction file (format in the module docstring)."""
        pred = cls()
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                if name.startswith("score_"):
                    pred.scores[name[6:]] = float(z[name])
                elif name.startswith("threshold_"):
                    pred.thresholds[name[10:]] = float(z[name])
                elif name in TRUTH_FOR_FINDING:
                    pred.maps[name] = np.asarray(z[name], dtype=np.float32)
        return pred


@dataclass
class _Example:
    title: str
    image: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    dice: float


@dataclass
class Evaluation:
    """Everything the report shows; ``summary()`` is its JSON form."""

    n_images: int = 0
    studies: set = field(default_factory=set)
    segmentation: dict[str, M.SegmentationSummary] = field(default_factory=dict)
    pixel_ap: dict[str, float] = field(default_factory=dict)
    classification: dict[str, dict[str, M.Interval]] = field(default_factory=dict)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    froc: M.FrocResult | None = None
    examples: list[_Example] = field(default_factory=list)

    def summary(self) -> dict:
        def num(v: float) -> float | None:
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)

        seg = {k: {"n_images": s.n_images, "mean_dice": num(s.mean_dice), "mean_iou": num(s.mean_iou),
                   "mean_soft_dice": num(s.mean_soft_dice), "pooled_dice": num(s.pooled_dice),
                   "pixel_ap": num(self.pixel_ap.get(k)), "false_positive_area_px": num(s.false_positive_area_px),
                   "n_negative_images": s.n_negative_images} for k, s in self.segmentation.items()}
        cls = {k: {m: {"value": num(iv.value), "ci95": [num(iv.low), num(iv.high)]} for m, iv in v.items()}
               for k, v in self.classification.items()}
        froc = None
        if self.froc is not None:
            froc = {"sensitivity_at": {str(k): num(v) for k, v in self.froc.sensitivity_at.items()},
                    "mean_sensitivity": num(self.froc.mean_sensitivity), "n_regions": self.froc.n_regions,
                    "n_images": self.froc.n_images}
        return {"n_images": self.n_images, "n_studies": len(self.studies), "segmentation": seg,
                "classification": cls, "froc": froc}


def _subplots(rows: int = 1, cols: int = 1, figsize: tuple[float, float] = (4.5, 4.5), squeeze: bool = True):
    """Figure and axes from matplotlib's object API: no pyplot state, no global backend switch."""
    fig = Figure(figsize=figsize)
    axes = fig.subplots(rows, cols, squeeze=squeeze)
    return fig, axes


def _thumb(a: np.ndarray) -> np.ndarray:
    rows = min(_THUMB_ROWS, a.shape[0])
    cols = max(1, int(round(a.shape[1] * rows / a.shape[0])))
    return resize(np.asarray(a, dtype=np.float32), (rows, cols))


def evaluate(pairs: Iterable[tuple[Sample, Prediction]], bootstrap: int = 2000, examples: int = 8,
             progress: bool = True, total: int | None = None) -> Evaluation:
    """Score (sample, prediction) pairs; streams, so only thumbnails of ``examples`` images are kept.

    Parameters
    ----------
    pairs
        ``(sample, prediction)`` per image, e.g. from :func:`predict`. Every map of a
        prediction must be ``(rows, columns)`` on the stored pixel grid of its sample's image
        (the grid of ``sample.masks``), with probabilities in [0, 1]; it is binarised at its
        ``thresholds`` entry (default 0.5, inclusive). Maps not in ``TRUTH_FOR_FINDING``
        and scores other than ``malignant``/``benign`` are ignored.
    bootstrap
        Number of bootstrap resamples behind each classification confidence interval
        (:func:`~dicom_ai.data.metrics.bootstrap_ci`, 95 % percentile interval).
    examples
        At most this many images keep a thumbnail (256 rows at most) for the report's overlay
        figure: the first images with a ``malignant_lesion``, ``benign_lesion`` or
        ``calcification_cluster`` map whose ground truth for it is not empty.
    progress
        Show a :mod:`tqdm` progress bar (on stderr).
    total
        Number of pairs, for the progress bar only (``pairs`` may be a generator).

    Returns
    -------
    Evaluation
        Segmentation summaries and pixel AP per finding map, image- and breast-level ROC/PR
        AUC with bootstrap intervals per score, and the FROC of calcification clusters
        (None when no prediction has a ``calcification_cluster`` or ``calcification`` map).

    Raises
    ------
    ValueError
        When a map's shape differs from its image's.
    """
    ev = Evaluation()
    seg_lists: dict[str, tuple[list, list, list, list]] = {}  # dice, iou, soft, fp-area
    pooled: dict[str, list[int]] = {}
    pixel: dict[str, M.PixelPrecisionRecall] = {}
    score_lists = {"malignant": [], "benign": []}
    label_lists = {"malignant": [], "benign": []}
    key_lists = {"malignant": [], "benign": []}
    froc_dets, froc_truth = [], []
    froc_used = False
    for sample, pred in tqdm(pairs, desc="evaluating", unit="image", total=total, disable=not progress):
        ev.n_images += 1
        ev.studies.add(sample.study)
        for name in ("malignant", "benign"):
            if name in pred.scores:
                key_lists[name].append((sample.study, sample.laterality))
                score_lists[name].append(float(pred.scores[name]))
                label_lists[name].append(bool(sample.labels.get(name, False)))
        best_example = None
        for finding, truth_keys in TRUTH_FOR_FINDING.items():
            if finding not in pred.maps:
                continue
            prob = np.asarray(pred.maps[finding], dtype=np.float32)
            truth = np.zeros(sample.image.shape, dtype=bool)
            for k in truth_keys:
                truth |= sample.masks[k]
            if prob.shape != truth.shape:
                raise ValueError(f"{sample.source}: {finding} map shape {prob.shape} differs from the image {truth.shape}")
            thr = pred.thresholds.get(finding, 0.5)
            binary = prob >= thr
            lists = seg_lists.setdefault(finding, ([], [], [], []))
            counts = pooled.setdefault(finding, [0, 0])
            counts[0] += int(np.logical_and(binary, truth).sum())
            counts[1] += int(binary.sum()) + int(truth.sum())
            if truth.any():
                d = M.dice(binary, truth)
                lists[0].append(d)
                lists[1].append(M.iou(binary, truth))
                lists[2].append(M.soft_dice(prob, truth))
                if best_example is None and finding in ("malignant_lesion", "benign_lesion", "mass", "calcification_cluster"):
                    best_example = (finding, prob, truth, d)
            else:
                lists[3].append(float(binary.sum()))
            pixel.setdefault(finding, M.PixelPrecisionRecall()).add(prob, truth)
        froc_map = pred.maps.get("calcification_cluster", pred.maps.get("calcification"))
        if froc_map is not None:
            froc_used = True
            froc_dets.append(M.detections_from_map(froc_map, FROC_CANDIDATE_THRESHOLD))
            froc_truth.append(M.label_regions(sample.masks["cluster_benign"] | sample.masks["cluster_malignant"]))
        if len(ev.examples) < examples and best_example is not None:
            finding, prob, truth, d = best_example
            title = f"{sample.laterality}-{sample.view} {finding} Dice {d:.2f}"
            ev.examples.append(_Example(title, _thumb(sample.image.pixels), _thumb(truth.astype(np.float32)) > 0.5,
                                        _thumb(prob), d))
    for finding, (d, i, s, fp) in seg_lists.items():
        inter, total_px = pooled[finding]
        mean = (lambda v: float(np.mean(v)) if v else float("nan"))
        ev.segmentation[finding] = M.SegmentationSummary(
            mean(d), mean(i), mean(s), float("nan") if total_px == 0 else 2 * inter / total_px, len(d), d,
            mean(fp) if fp else 0.0, len(fp))
        ev.pixel_ap[finding] = pixel[finding].average_precision()
    for name in ("malignant", "benign"):
        s, y = np.array(score_lists[name]), np.array(label_lists[name], dtype=bool)
        if s.size == 0:
            continue
        _, bs, by = M.breast_level(key_lists[name], s, y)
        for level, (ss, yy) in (("image", (s, y)), ("breast", (bs, by))):
            ev.classification[f"{name} ({level})"] = {
                "ROC AUC": M.bootstrap_ci(M.roc_auc, ss, yy, n=bootstrap),
                "PR AUC": M.bootstrap_ci(M.average_precision, ss, yy, n=bootstrap),
            }
            if yy.any() and not yy.all():
                fpr, tpr, _ = M.roc_curve(ss, yy)
                ev.curves[f"{name} ({level})"] = (fpr, tpr)
    if froc_used:
        ev.froc = M.froc(froc_dets, froc_truth)
    return ev


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def write_report(ev: Evaluation, out_dir: str | Path, title: str = "dicom_ai evaluation") -> Path:
    """Write report.md, metrics.json and the plots (roc.png, froc.png, dice.png, overlays.png).

    Parameters
    ----------
    ev
        The result of :func:`evaluate`; sections (and their plots) without data are left out.
    out_dir
        Folder to write into; created with its parents when missing, existing files of the
        same names are overwritten.
    title
        Top-level heading of ``report.md``.

    Returns
    -------
    pathlib.Path
        The path of ``report.md``; ``metrics.json`` (:meth:`Evaluation.summary`) and the
        PNGs lie next to it.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"{ev.n_images} images from {len(ev.studies)} studies.", ""]
    if ev.classification:
        lines += ["## Classification (bootstrap 95% CI)", "", "| score (level) | ROC AUC | PR AUC |", "|---|---|---|"]
        for k, v in ev.classification.items():
            lines.append(f"| {k} | {v['ROC AUC']} | {v['PR AUC']} |")
        lines += ["", "![ROC](roc.png)", ""]
        fig, ax = _subplots(figsize=(4.5, 4.5))
        for k, (fpr, tpr) in ev.curves.items():
            ax.step(fpr, tpr, where="post", label=f"{k} AUC {ev.classification[k]['ROC AUC'].value:.3f}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "roc.png", dpi=110)
    if ev.segmentation:
        lines += ["## Segmentation", "",
                  "Dice/IoU/soft Dice per image, averaged over images whose ground truth contains the class; "
                  "pooled Dice over all pixels; pixel AP pooled; FP area = mean predicted pixels on images "
                  "without the class.", "",
                  "| map | images | Dice | IoU | soft Dice | pooled Dice | pixel AP | FP area (px) |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, s in ev.segmentation.items():
            lines.append(f"| {k} | {s.n_images} | {_fmt(s.mean_dice)} | {_fmt(s.mean_iou)} | {_fmt(s.mean_soft_dice)} "
                         f"| {_fmt(s.pooled_dice)} | {_fmt(ev.pixel_ap.get(k))} | {s.false_positive_area_px:.1f} |")
        lines += ["", "![Dice distribution](dice.png)", ""]
        fig, ax = _subplots(figsize=(5.5, 3.5))
        data = [(k, s.per_image_dice) for k, s in ev.segmentation.items() if s.per_image_dice]
        if data:
            ax.hist([d for _, d in data], bins=np.linspace(0, 1, 21), label=[k for k, _ in data])
            ax.legend(fontsize=7)
        ax.set(xlabel="Dice per image", ylabel="images", title="Dice distribution")
        fig.tight_layout()
        fig.savefig(out / "dice.png", dpi=110)
    if ev.froc is not None:
        f = ev.froc
        lines += ["## FROC (calcification clusters)", "",
                  f"{f.n_regions} clusters in {f.n_images} images.", "",
                  "| FP/image | " + " | ".join(f"{r:g}" for r in f.sensitivity_at) + " | mean |",
                  "|---" * (len(f.sensitivity_at) + 2) + "|",
                  "| sensitivity | " + " | ".join(_fmt(v) for v in f.sensitivity_at.values())
                  + f" | {_fmt(f.mean_sensitivity)} |", "", "![FROC](froc.png)", ""]
        fig, ax = _subplots(figsize=(4.5, 3.5))
        # The curve holds its last sensitivity beyond the last operating point.
        right = max(4.5, float(f.fp_per_image[-1]) * 1.1)
        ax.step(np.r_[f.fp_per_image, right], np.r_[f.sensitivity, f.sensitivity[-1]], where="post")
        ax.set_xlim(0, right)
        for r, v in f.sensitivity_at.items():
            ax.plot([r], [v], "o", color="C1")
        ax.set_xscale("symlog", linthresh=0.25)
        ax.set(xlabel="false positives per image", ylabel="sensitivity", title="FROC", ylim=(0, 1.02))
        fig.tight_layout()
        fig.savefig(out / "froc.png", dpi=110)
    if ev.examples:
        n = len(ev.examples)
        cols = min(4, n)
        rows = int(math.ceil(n / cols))
        fig, axes = _subplots(rows, cols, figsize=(2.6 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, ex in zip(axes.ravel(), ev.examples):
            ax.imshow(ex.image, cmap="gray", vmin=0, vmax=1)
            ax.imshow(np.ma.masked_less(ex.pred, 0.05), cmap="magma", alpha=0.5, vmin=0, vmax=1)
            if ex.truth.any():
                ax.contour(ex.truth.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            ax.set_title(ex.title, fontsize=7)
        fig.suptitle("ground truth (green contour) and predicted probability (colour)", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "overlays.png", dpi=110)
        lines += ["## Examples", "", "![overlays](overlays.png)", ""]
    (out / "metrics.json").write_text(json.dumps(ev.summary(), indent=1))
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def predict(samples: Iterable[Sample], pipeline: Pipeline | None = None,
            predictions: str | Path | None = None) -> Iterator[tuple[Sample, Prediction]]:
    """Pair each sample with a prediction: ``pipeline`` run on its DICOM file, or the
    ``<predictions>/<SOPInstanceUID>.npz`` written earlier (see :meth:`Prediction.load`).

    Exactly one of ``pipeline`` and ``predictions`` must be given. Streams: one image at a time.

    Parameters
    ----------
    samples
        The images with their ground truth; ``sample.source`` must be the path of the DICOM
        file when ``pipeline`` is given.
    pipeline
        Runs on each image's DICOM file; its findings become the prediction
        (:meth:`Prediction.from_findings`).
    predictions
        Folder of ``<SOPInstanceUID>.npz`` prediction files (format in the module docstring),
        one per sample, named by ``sample.image.sop_instance_uid``.

    Returns
    -------
    iterator of (Sample, Prediction)
        One pair per sample, in input order, produced lazily.

    Raises
    ------
    ValueError
        When neither or both of ``pipeline`` and ``predictions`` are given (on the first
        ``next``, as this is a generator).
    FileNotFoundError
        When a sample has no prediction file in ``predictions``.
    """
    if (pipeline is None) == (predictions is None):
        raise ValueError("give exactly one of pipeline and predictions")
    for sample in samples:
        if pipeline is not None:
            findings = pipeline.run([pydicom.dcmread(sample.source)])[0]
            yield sample, Prediction.from_findings(findings)
        else:
            path = Path(predictions) / f"{sample.image.sop_instance_uid}.npz"
            if not path.is_file():
                raise FileNotFoundError(f"no prediction file {path} for image {sample.source}")
            yield sample, Prediction.load(path)


# --------------------------------------------------------------------------- lesion level
#
# What a CAD engineer reads: marks (connected regions of a model's maps, each with its peak
# probability and centroid) against lesions, per lesion type, per model and for the union of
# all models' marks (what the node sends in its SEG/SR). Full maps are not kept: a
# ModelMarks holds the marks at the FROC candidate threshold, the marks at the model's own
# operating point and the binarised mass maps for Dice, so predictions cache in ~100 kB.

#: Finding maps whose marks are scored against each lesion type ("all": every map, every lesion).
MAPS_FOR_TYPE = {
    "mass": ("malignant_lesion", "benign_lesion", "mass"),
    "calcification_cluster": ("calcification_cluster",),
    "all": ("malignant_lesion", "benign_lesion", "mass", "calcification_cluster", "calcification"),
}
#: Name of the union of every model's marks in lesion-level reports.
UNION = "union"
#: Version of the mark cache format; bump when ModelMarks changes.
MARKS_FORMAT = 1


@dataclass
class ModelMarks:
    """One model's output on one image, reduced to marks.

    ``candidates[key]`` and ``operating[key]`` are ``(n, 4)`` float arrays of
    (peak probability, centroid row, centroid column, area in pixels) of the connected
    regions of map ``key`` at ``p >= FROC_CANDIDATE_THRESHOLD`` and at ``p >= thresholds[key]``
    (the bundle's operating point: what the node draws). ``binary[key]`` is the map at its
    operating point, for Dice, on the stored grid. ``peaks[key]`` is the map's maximum and
    ``scores`` the model's image scores.
    """

    candidates: dict[str, np.ndarray] = field(default_factory=dict)
    operating: dict[str, np.ndarray] = field(default_factory=dict)
    binary: dict[str, np.ndarray] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_prediction(cls, pred: Prediction, allowed: np.ndarray | None = None) -> "ModelMarks":
        """Reduce a Prediction (full maps) to marks; with ``allowed`` (the pipeline's
        :func:`~dicom_ai.networks.pipeline.allowed_region`), marks whose rounded centroid lies
        outside it are dropped, as the node drops them."""
        out = cls(scores=dict(pred.scores))
        for key, prob in pred.maps.items():
            prob = np.asarray(prob, dtype=np.float32)
            thr = float(pred.thresholds.get(key, 0.5))
            out.thresholds[key] = thr
            out.peaks[key] = float(prob.max()) if prob.size else 0.0
            for name, level in (("candidates", min(FROC_CANDIDATE_THRESHOLD, thr)), ("operating", thr)):
                found = _regions(prob, level)
                if allowed is not None and len(found):
                    rr = np.clip(np.rint(found[:, 1]).astype(int), 0, prob.shape[0] - 1)
                    cc = np.clip(np.rint(found[:, 2]).astype(int), 0, prob.shape[1] - 1)
                    found = found[allowed[rr, cc]]
                getattr(out, name)[key] = found
            out.binary[key] = prob >= thr
        return out

    def marks(self, keys: Sequence[str], operating: bool = False) -> list[tuple[float, float, float]]:
        """(score, row, column) of the marks of maps ``keys`` (candidates, or operating point)."""
        table = self.operating if operating else self.candidates
        return [(float(s), float(r), float(c)) for k in keys if k in table for s, r, c, _ in table[k]]

    def save(self, path: str | Path) -> None:
        """Write as one compressed ``.npz`` (binary maps bit-packed)."""
        arrays: dict[str, np.ndarray] = {"format": np.array(MARKS_FORMAT)}
        for key in self.candidates:
            arrays[f"cand_{key}"] = self.candidates[key]
            arrays[f"op_{key}"] = self.operating[key]
            arrays[f"bin_{key}"] = np.packbits(self.binary[key])
            arrays[f"shape_{key}"] = np.array(self.binary[key].shape)
            arrays[f"peak_{key}"] = np.array(self.peaks[key])
            arrays[f"thr_{key}"] = np.array(self.thresholds[key])
        for name, value in self.scores.items():
            arrays[f"score_{name}"] = np.array(value)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)  # a killed run leaves no half-written cache entry

    @classmethod
    def load(cls, path: str | Path) -> "ModelMarks":
        """Read what :meth:`save` wrote; raises ValueError for another cache format."""
        out = cls()
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != MARKS_FORMAT:
                raise ValueError(f"{path}: mark cache format {int(z['format'])}, expected {MARKS_FORMAT}")
            for name in z.files:
                if name.startswith("cand_"):
                    key = name[5:]
                    shape = tuple(int(v) for v in z[f"shape_{key}"])
                    out.candidates[key] = z[name]
                    out.operating[key] = z[f"op_{key}"]
                    out.binary[key] = np.unpackbits(z[f"bin_{key}"], count=shape[0] * shape[1]).reshape(shape).astype(bool)
                    out.peaks[key] = float(z[f"peak_{key}"])
                    out.thresholds[key] = float(z[f"thr_{key}"])
                elif name.startswith("score_"):
                    out.scores[name[6:]] = float(z[name])
        return out


def _regions(prob: np.ndarray, threshold: float) -> np.ndarray:
    labels = M.label_regions(prob >= threshold)
    n = int(labels.max())
    if n == 0:
        return np.zeros((0, 4))
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    dets = M.detections_from_map(prob, threshold)
    return np.array([(s, r, c, a) for (s, r, c), a in zip(dets, area)], dtype=np.float64)


def _output_prediction(output) -> Prediction:
    pred = Prediction()
    for m in output.maps:
        prev = pred.maps.get(m.finding)
        pred.maps[m.finding] = m.probability if prev is None else np.maximum(prev, m.probability)
        pred.thresholds.setdefault(m.finding, float(m.threshold))
    pred.scores = {s.name: float(s.value) for s in output.scores}
    return pred


def predict_marks(samples: Iterable[Sample], pipeline: Pipeline, cache: str | Path | None = None
                  ) -> Iterator[tuple[Sample, dict[str, ModelMarks]]]:
    """Run each model of ``pipeline`` on each sample's decoded image; marks per model name.

    Models see ``sample.image`` (the Mammogram the adapter decoded, e.g. a MIAS PGM at
    0.2 mm), exactly as :meth:`Pipeline.run` hands them a decoded DICOM image. With
    ``cache``, marks are kept in ``<cache>/<model>-<version>/<SOPInstanceUID>.npz`` and
    read back instead of running the model again (delete the folder after changing a model
    without changing its version). Each output is restricted to the breast as the node does
    it (:func:`~dicom_ai.networks.pipeline.restrict_to_breast`); the cache folder is
    ``<model>-<version>-mask<MASK_VERSION>``, so a new mask method never reads old marks.
    """
    for sample in samples:
        out: dict[str, ModelMarks] = {}
        for model in pipeline.models:
            ident = model.identity
            path = None
            if cache is not None and sample.image.sop_instance_uid:
                path = (Path(cache) / f"{ident.name}-{ident.version}-mask{MASK_VERSION}"
                        / f"{sample.image.sop_instance_uid}.npz")
                if path.is_file():
                    out[ident.name] = ModelMarks.load(path)
                    continue
            output = restrict_to_breast(model.predict(sample.image), sample.image)
            marks = ModelMarks.from_prediction(_output_prediction(output), allowed_region(sample.image))
            if path is not None:
                marks.save(path)
            out[ident.name] = marks
        yield sample, out


def lesions_of(sample: Sample) -> list[Lesion]:
    """The sample's lesions, or, when the adapter lists none, one per connected region of its
    mass and cluster masks (INbreast, CBIS-DDSM, VinDr-Mammo, phantoms)."""
    if sample.lesions:
        return list(sample.lesions)
    found = []
    for key in ("mass_benign", "mass_malignant", "cluster_benign", "cluster_malignant"):
        labels = M.label_regions(sample.masks[key])
        for lab in range(1, int(labels.max()) + 1):
            found.append(Lesion("mass" if key.startswith("mass") else "calcification_cluster",
                                key.split("_")[1], labels == lab, "component"))
    return found


def _union(marks: dict[str, ModelMarks]) -> ModelMarks:
    """All models' marks together (what the node sends); binary maps OR-ed, peaks max-ed."""
    out = ModelMarks()
    for m in marks.values():
        for key in m.candidates:
            if key in out.candidates:
                out.candidates[key] = np.vstack([out.candidates[key], m.candidates[key]])
                out.operating[key] = np.vstack([out.operating[key], m.operating[key]])
                out.binary[key] = out.binary[key] | m.binary[key]
                out.peaks[key] = max(out.peaks[key], m.peaks[key])
            else:
                out.candidates[key], out.operating[key] = m.candidates[key], m.operating[key]
                out.binary[key], out.peaks[key] = m.binary[key], m.peaks[key]
                out.thresholds[key] = m.thresholds[key]
    return out


def _image_scores(m: ModelMarks) -> tuple[float, float]:
    """(abnormal, malignant) image scores of one model's marks (see evaluate_lesions)."""
    abnormal = max(m.peaks.values(), default=0.0)
    if "malignant" in m.scores:
        malignant = m.scores["malignant"]
    else:
        malignant = m.peaks.get("malignant_lesion", abnormal)
    return float(abnormal), float(malignant)


@dataclass
class _ModelTally:
    marks: dict[str, list] = field(default_factory=lambda: {t: [] for t in MAPS_FOR_TYPE})
    op_marks: dict[str, list] = field(default_factory=lambda: {t: [] for t in MAPS_FOR_TYPE})
    abnormal: list[float] = field(default_factory=list)
    malignant: list[float] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    outside: int = 0
    op_total: int = 0
    normal_op_marks: int = 0
    has_maps: set = field(default_factory=set)


@dataclass
class LesionEvaluation:
    """Lesion- and image-level figures per model and for the union (``summary()`` is the JSON)."""

    n_images: int = 0
    n_normal: int = 0
    n_lesions: dict[str, int] = field(default_factory=dict)
    n_lesions_without_location: int = 0
    n_mass_masks: int = 0
    froc: dict[str, dict[str, M.FrocResult]] = field(default_factory=dict)
    operating: dict[str, dict[str, dict]] = field(default_factory=dict)
    auc: dict[str, dict[str, M.Interval]] = field(default_factory=dict)
    mass_dice: dict[str, dict] = field(default_factory=dict)
    robustness: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> dict:
        def num(v) -> float | None:
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)

        # No lesion of a type in these images: no sensitivity (not 0).
        froc = {m: {t: {"sensitivity_at": {str(k): num(v) if f.n_regions else None for k, v in f.sensitivity_at.items()},
                        "mean_sensitivity": num(f.mean_sensitivity), "n_lesions": f.n_regions}
                    for t, f in by_type.items()} for m, by_type in self.froc.items()}
        auc = {m: {task: {"value": num(iv.value), "ci95": [num(iv.low), num(iv.high)], "replicates": iv.replicates}
                   for task, iv in tasks.items()} for m, tasks in self.auc.items()}
        return {"n_images": self.n_images, "n_normal_images": self.n_normal, "n_lesions": dict(self.n_lesions),
                "n_lesions_without_location": self.n_lesions_without_location,
                "n_mass_pixel_masks": self.n_mass_masks, "froc": froc,
                "operating_point": self.operating, "auc": auc, "mass_dice": self.mass_dice,
                "robustness": self.robustness}


def evaluate_lesions(pairs: Iterable[tuple[Sample, dict[str, ModelMarks]]], bootstrap: int = 2000,
                     reference_mask=None, progress: bool = True, total: int | None = None) -> LesionEvaluation:
    """Lesion-level evaluation of each model's marks and of their union.

    Parameters
    ----------
    pairs
        ``(sample, {model name: ModelMarks})`` per image, e.g. from :func:`predict_marks`.
    bootstrap
        Resamples behind each AUC's 95 % percentile interval (images resampled; 0: no CI).
    reference_mask
        ``f(sample) -> (rows, columns) bool``, the breast region marks are checked against;
        default ``sample.image.breast_mask`` (the node's own threshold mask, which the models
        crop to: marks outside it are marks on background, labels or film edges).
    progress, total
        A :mod:`tqdm` bar on stderr, and its length.

    Returns
    -------
    LesionEvaluation
        Per model and for ``"union"``:

        * FROC per lesion type (:data:`MAPS_FOR_TYPE`; :func:`~dicom_ai.data.metrics.lesion_froc`
          at ``LESION_FROC_RATES``), marks = regions at ``p >= 0.1`` scored by their peak; in the
          mass and calcification-cluster curves, marks on lesions of other types are ignored.
          A model without maps for a type has no curve for it.
        * The operating point (each map at its bundle threshold, the marks the node draws):
          sensitivity per type, false marks per image on all images and on normal images.
        * ROC AUC with bootstrap CI: abnormal vs normal (image score = highest map
          probability of the model) and malignant vs the rest (the model's ``malignant``
          score, else its malignant-lesion map's peak, else the abnormal score); at image,
          breast (study + laterality; on MIAS one image per breast, so = image) and woman /
          study level (mean of the images' scores, positive when any image is).
        * Dice of the mass maps (malignant | benign lesion at their thresholds) against the
          drawn mass outlines, per image over images with a drawn outline (whole-image Dice,
          so false marks elsewhere lower it).
        * Robustness: operating-point marks whose centroid is outside the reference breast mask.
    """
    ev = LesionEvaluation()
    tallies: dict[str, _ModelTally] = {}
    truth = {t: [] for t in MAPS_FOR_TYPE}
    ignore = {t: [] for t in MAPS_FOR_TYPE}
    labels_abn, labels_mal, breast_keys, study_keys = [], [], [], []
    mask_of = reference_mask or (lambda s: s.image.breast_mask)
    for sample, by_model in tqdm(pairs, desc="scoring lesions", unit="image", total=total, disable=not progress):
        ev.n_images += 1
        lesions = lesions_of(sample)
        located = [l for l in lesions if l.mask is not None]
        ev.n_lesions_without_location += len(lesions) - len(located)
        abnormal = bool(lesions) or bool(sample.labels.get("benign")) or bool(sample.labels.get("malignant"))
        ev.n_normal += not abnormal
        labels_abn.append(abnormal)
        labels_mal.append(bool(sample.labels.get("malignant")))
        breast_keys.append((sample.study, sample.laterality))
        study_keys.append((sample.study, ""))
        for t in MAPS_FOR_TYPE:
            own = located if t == "all" else [l for l in located if l.kind == t]
            truth[t].append([l.mask for l in own])
            ignore[t].append([] if t == "all" else [l.mask for l in located if l.kind != t])
            ev.n_lesions[t] = ev.n_lesions.get(t, 0) + len(own)
        drawn = [l.mask for l in located if l.kind == "mass" and l.outline == "mask"]
        ev.n_mass_masks += len(drawn)
        drawn_union = np.logical_or.reduce(drawn) if drawn else None
        region = mask_of(sample)
        for name, marks in {**by_model, UNION: _union(by_model)}.items():
            tally = tallies.setdefault(name, _ModelTally())
            tally.has_maps |= set(marks.candidates)
            for t, keys in MAPS_FOR_TYPE.items():
                tally.marks[t].append(marks.marks(keys))
                tally.op_marks[t].append(marks.marks(keys, operating=True))
            a, m = _image_scores(marks)
            tally.abnormal.append(a)
            tally.malignant.append(m)
            sent = marks.marks(MAPS_FOR_TYPE["all"], operating=True)
            tally.op_total += len(sent)
            tally.outside += M.marks_outside(sent, region)
            if not abnormal:
                tally.normal_op_marks += len(sent)
            mass_keys = [k for k in MAPS_FOR_TYPE["mass"] if k in marks.binary]
            if drawn_union is not None and mass_keys:
                pred = np.logical_or.reduce([marks.binary[k] for k in mass_keys])
                tally.dice.append(M.dice(pred, drawn_union))
    y_abn, y_mal = np.array(labels_abn, dtype=bool), np.array(labels_mal, dtype=bool)
    for name, tally in tallies.items():
        ev.froc[name], ev.operating[name] = {}, {}
        for t, keys in MAPS_FOR_TYPE.items():
            if not tally.has_maps & set(keys):
                continue
            ev.froc[name][t] = M.lesion_froc(tally.marks[t], truth[t], None if t == "all" else ignore[t])
            op = M.lesion_froc(tally.op_marks[t], truth[t], None if t == "all" else ignore[t])
            n_fp = op.fp_per_image[-1] * max(ev.n_images, 1)
            ev.operating[name][t] = {"sensitivity": round(float(op.sensitivity[-1]), 4) if op.n_regions else None,
                                     "false_marks_per_image": round(float(op.fp_per_image[-1]), 4),
                                     "false_marks": int(round(n_fp))}
        ev.auc[name] = {}
        for task, scores, y in (("abnormal", tally.abnormal, y_abn), ("malignant", tally.malignant, y_mal)):
            s = np.asarray(scores, dtype=np.float64)
            for level, keys in (("image", None), ("breast", breast_keys), ("woman", study_keys)):
                ss, yy = (s, y) if keys is None else M.breast_level(keys, s, y)[1:]
                ev.auc[name][f"{task} ({level})"] = (M.bootstrap_ci(M.roc_auc, ss, yy, n=bootstrap) if bootstrap
                                                     else M.Interval(M.roc_auc(ss, yy), float("nan"), float("nan"), 0))
        if tally.dice:
            d = np.array(tally.dice, dtype=np.float64)
            ev.mass_dice[name] = {"mean": round(float(np.nanmean(d)), 4), "median": round(float(np.nanmedian(d)), 4),
                                  "n_images": int(d.size), "fraction_above_0.5": round(float(np.mean(d > 0.5)), 4)}
        ev.robustness[name] = {
            "marks_sent": tally.op_total, "marks_outside_breast": tally.outside,
            "marks_per_image": round(tally.op_total / max(ev.n_images, 1), 4),
            "false_marks_per_normal_image": round(tally.normal_op_marks / ev.n_normal, 4) if ev.n_normal else None,
            "n_normal_images": ev.n_normal}
    return ev


def write_lesion_report(ev: LesionEvaluation, out_dir: str | Path, title: str = "lesion-level evaluation",
                        notes: Sequence[str] = ()) -> Path:
    """Write ``lesions.md`` (tables) and ``lesions.json`` (:meth:`LesionEvaluation.summary`) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = ev.summary()
    rates = [str(r) for r in M.LESION_FROC_RATES]
    lines = [f"# {title}", "", f"{ev.n_images} images ({ev.n_normal} normal); lesions with location: "
             + ", ".join(f"{k} {v}" for k, v in ev.n_lesions.items())
             + f"; {ev.n_lesions_without_location} without location (image labels only).", ""]
    lines += list(notes) + ([""] if notes else [])
    lines += ["## FROC (sensitivity at false marks per image)", "",
              "| model | lesions | " + " | ".join(rates) + " |", "|---|---|" + "---|" * len(rates)]
    for name, by_type in s["froc"].items():
        for t, f in by_type.items():
            lines.append(f"| {name} | {t} ({f['n_lesions']}) | "
                         + " | ".join(_fmt(f["sensitivity_at"][r]) for r in rates) + " |")
    lines += ["", "## Operating point, AUC, Dice, robustness", "",
              "| model | mass sens | calc sens | false marks/image (normals) | marks outside breast "
              "| AUC abnormal (image) | AUC malignant (image) | mass Dice |", "|---|---|---|---|---|---|---|---|"]
    for name in s["froc"]:
        op = s["operating_point"].get(name, {})
        a = s["auc"][name]
        lines.append(
            f"| {name} | {_fmt(op.get('mass', {}).get('sensitivity'))} "
            f"| {_fmt(op.get('calcification_cluster', {}).get('sensitivity'))} "
            f"| {_fmt(s['robustness'][name]['false_marks_per_normal_image'])} "
            f"| {s['robustness'][name]['marks_outside_breast']} / {s['robustness'][name]['marks_sent']} "
            f"| {_fmt(a['abnormal (image)']['value'])} [{_fmt(a['abnormal (image)']['ci95'][0])}, {_fmt(a['abnormal (image)']['ci95'][1])}] "
            f"| {_fmt(a['malignant (image)']['value'])} [{_fmt(a['malignant (image)']['ci95'][0])}, {_fmt(a['malignant (image)']['ci95'][1])}] "
            f"| {_fmt(s['mass_dice'].get(name, {}).get('mean'))} |")
    (out / "lesions.json").write_text(json.dumps(s, indent=1))
    path = out / "lesions.md"
    path.write_text("\n".join(lines) + "\n")
    return path
