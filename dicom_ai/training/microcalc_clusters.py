"""Fitting the cluster-level stage of the microcalcification model.

The cluster stage (:mod:`dicom_ai.networks.microcalc_clusters`) scores each candidate cluster
with a logistic model over a handful of cluster features. It is fitted here on candidate
clusters of images the networks were run on: candidates on an inserted cluster are positives,
every candidate on a real background elsewhere a negative. Plain numpy (Newton steps with an
L2 penalty): ten features and a few hundred candidates need nothing more.

:func:`spacing_calibration` makes one threshold mean the same false-cluster rate on images of
different pixel-size classes (film scans at 0.1-0.2 mm vs digital or high-resolution scans at
<= 0.1 mm): the raw cluster score of a class is mapped, by the false clusters per image it
lets through on that class's validation backgrounds, onto the score that lets through the same
rate on the reference class.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dicom_ai.core.errors import ModelError
from dicom_ai.networks.bundle import load_bundle, save_bundle
from dicom_ai.networks.microcalc_clusters import FEATURES, ClusterConfig


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, balanced: bool = True,
                 iterations: int = 50) -> dict:
    """L2-penalised logistic regression on standardised features.

    Parameters
    ----------
    x
        (n, len(FEATURES)) cluster features.
    y
        (n,) 0/1 labels (1: the candidate lies on a true cluster).
    l2
        Penalty on the weights (not the bias), per unit of total sample weight.
    balanced
        Weight the classes equally (positives are few).

    Returns
    -------
    dict
        ``weights``, ``bias``, ``mean``, ``std`` as :class:`~dicom_ai.networks.microcalc_clusters.ClusterConfig` takes them.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(FEATURES) or len(x) != len(y):
        raise ModelError(f"cluster features must be (n, {len(FEATURES)}) with one label each, got {x.shape}, {y.shape}")
    if y.min() == y.max():
        raise ModelError("the cluster model needs both true clusters and false candidates to fit")
    mean, std = x.mean(0), x.std(0)
    std = np.where(std < 1e-6, 1.0, std)
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w_s = np.where(y > 0, 0.5 / y.sum(), 0.5 / (1 - y).sum()) if balanced else np.full(len(y), 1.0 / len(y))
    beta = np.zeros(z.shape[1])
    pen = np.full(z.shape[1], l2 / len(y))
    pen[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -30, 30)))
        grad = z.T @ (w_s * (p - y)) + pen * beta
        hess = (z * (w_s * p * (1 - p))[:, None]).T @ z + np.diag(pen + 1e-9)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return {"weights": [float(v) for v in beta[:-1]], "bias": float(beta[-1]),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def false_rate_curve(false_scores: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores descending, false clusters per image at score >= each) of one image set."""
    s = np.sort(np.asarray(false_scores, dtype=np.float64))[::-1]
    return s, np.arange(1, len(s) + 1) / max(n_images, 1)


def spacing_calibration(reference: tuple[np.ndarray, int], other: tuple[np.ndarray, int],
                        rates: tuple[float, ...] = (0.03, 0.06, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)) -> dict:
    """Piecewise-linear map of the ``other`` class's raw scores onto the reference class's.

    ``reference`` and ``other`` are (false-candidate scores, number of images) of validation
    backgrounds of each class. For each false-cluster rate in ``rates`` the score reaching it
    in ``other`` is mapped to the score reaching it in ``reference``; between knots the map is
    linear, and it is clamped to be monotone. Returns ``{"raw": [...], "mapped": [...]}``
    (ascending raw scores, with (0, 0) and (1, 1) as end points).
    """
    knots = []
    for r in rates:
        knots.append((_score_at_rate(*other, r), _score_at_rate(*reference, r)))
    knots = sorted(set(knots))
    raw, mapped = [0.0], [0.0]
    for a, b in knots:
        if 0.0 < a < 1.0 and a > raw[-1] and b >= mapped[-1]:
            raw.append(float(a))
            mapped.append(float(min(b, 1.0)))
    raw.append(1.0)
    mapped.append(1.0)
    return {"raw": raw, "mapped": mapped}


def _score_at_rate(scores: np.ndarray, n_images: int, rate: float) -> float:
    """The lowest score at which no more than ``rate`` false clusters per image pass."""
    s, fp = false_rate_curve(scores, n_images)
    ok = np.flatnonzero(fp <= rate + 1e-12)
    if not len(s):
        return 0.0
    if not len(ok):
        return float(min(1.0, s[0] + 1e-6))
    # halfway to the next score, so the rate is not exceeded by ties
    k = ok[-1]
    return float(s[k] if k + 1 >= len(s) else 0.5 * (s[k] + s[k + 1]))


def write_cluster_bundle(source: str | Path, out: str | Path, clusters: ClusterConfig, version: str,
                         evaluation: dict, default: str = "fp0.25", mias_held_out: int | None = None) -> Path:
    """Write ``source``'s networks (same weights) with the cluster stage ``clusters`` as a new
    microcalc bundle ``version`` in ``out``.

    ``evaluation`` is what benchmarks/bench_microcalc_clusters.py measured: its ``final.points``
    (per named point: the cluster threshold chosen on mini-MIAS, the 5-fold CV figures and the
    held-out sharp figures) become the manifest's operating points for
    ``calcification_cluster``; the per-calcification map stays off at every point (a mark per
    speck is no finding). The manifest keeps the source's training data and licences and adds
    how the cluster stage was fitted.

    ``mias_held_out``: the mini-MIAS patient fold (:data:`dicom_ai.data.datasets.MIAS_FOLDS`)
    this bundle's mini-MIAS choices left out (a fold variant for cross-validation): its points'
    thresholds and the film side of ``clusters.sharp_calibration`` come from the other folds and
    each point's ``sensitivity``/``false_marks_per_image`` are measured on that fold alone.
    """
    src = load_bundle(source)
    manifest = json.loads((Path(src.path) / "manifest.json").read_text())
    state = src.state_dict
    points = evaluation["final"]["points"]
    if default not in points:
        raise ModelError(f"default operating point {default!r} is not among the measured ones ({', '.join(points)})")
    how = ("cluster threshold: lowest score with at most mias_rate_target false clusters per image on the dumped "
           "mini-MIAS images (the CALC images and a fixed random sample of the others); mias_cv: each mini-MIAS "
           "fold scored at the threshold chosen on the other four (patient folds); B_*: held-out sharp backgrounds "
           "(the held-out-fold CBIS-DDSM woman's 4 views, FFDM exam 1) never used for any fit or choice, scores "
           "calibrated for sharp images")
    if mias_held_out is not None:
        how = (f"cluster threshold: lowest score with at most mias_rate_target false clusters per image on the "
               f"mini-MIAS images of every patient fold but fold {mias_held_out} (dicom_ai.data.datasets.mias_folds); "
               f"sensitivity and false marks: fold {mias_held_out} alone at that threshold (held out); B_*: held-out "
               "sharp backgrounds, never used for any fit or choice, scores calibrated for sharp images")
    cluster_points = [{"name": name, "threshold": p["threshold"],
                       "target": f"<= {p['mias_rate_target']} false clusters per image (mini-MIAS; half the node's budget)",
                       "sensitivity": p["mias_cv"]["sensitivity"], "false_marks_per_image": p["mias_cv"]["false_clusters_per_image"],
                       "data": how, "held_out": {k: v for k, v in p.items() if k.startswith(("B_", "A_", "shared"))}}
                      for name, p in points.items()]
    off_points = [{"name": name, "off": True, "threshold": 0.5,
                   "target": "off: single calcifications are not sent as findings (their clusters are)"}
                  for name in points]
    # The synthetic demo point every bundle has ('phantom': every finding on at 0.5; not
    # validated on real images), which the demo and the distributed-node checks select.
    phantom = {"name": "phantom", "threshold": 0.5, "sensitivity": None,
               "data": "none on real images: pick it to get every map as before issue 14",
               "target": "the bundle's own threshold (phantom validation only; not validated on real images)"}
    cluster_points.append(dict(phantom))
    off_points.append(dict(phantom))
    arch = dict(manifest["architecture"], clusters=clusters.to_dict())
    training = dict(manifest.get("training", {}))
    training["cluster_stage"] = {
        "fitted_on": "candidate clusters of the source networks on the fit side: the training-fold CBIS-DDSM woman (4 views) and FFDM "
                     "exam 2 (2 views), as they are and with clusters inserted (seed 0) at native resolution and at "
                     "0.2 mm / 8 bit; positives = candidates on an inserted cluster, negatives = the rest",
        "chosen_by": "leave-one-background-out inside the fit side (6 background images, each with its hybrids)",
        "never_used": "mini-MIAS clusters (no fit, no choice; the MIAS rate only sets the thresholds, and the "
                      "sharp calibration maps sharp scores onto the MIAS false-cluster rate)",
        "features_from": evaluation.get("scoring", "the 2 mm image windows saved with the dumps (microcalc 0.3.0)"),
        "search": evaluation.get("chosen"),
        "benchmark": "benchmarks/bench_microcalc_clusters.py -> benchmarks/results/microcalc_clusters.json",
    }
    if evaluation.get("chosen_on_mias"):
        training["cluster_stage"]["chosen_by"] = (
            "the cluster definition and model (one row of the fit side's search; model fitted on the fit side only) "
            "chosen on mini-MIAS: highest mean sensitivity at 0.125/0.25/0.5 false clusters per image"
            + ("" if mias_held_out is None else f", on every mini-MIAS fold but fold {mias_held_out}"))
        training["cluster_stage"]["never_used"] = (
            "mini-MIAS images for any fit (the MIAS clusters choose among fitted rows and set the thresholds)"
            + ("" if mias_held_out is None else f"; mini-MIAS fold {mias_held_out} for anything"))
    if mias_held_out is not None:
        training["cluster_stage"]["mias_held_out_fold"] = (
            f"mini-MIAS fold {mias_held_out} played no part in this bundle: its thresholds and the film side of the "
            f"sharp calibration were chosen on the other folds (a cross-validation variant, not for shipping)")
    manifest.update(version=version, architecture=arch, training=training,
                    thresholds={"calcification": 0.5, "calcification_cluster": points[default]["threshold"]},
                    operating_points={"default": default,
                                      "default_reason": f"{default}: the node's default name; this map's share is half "
                                                        "of that budget on mini-MIAS",
                                      "findings": {"calcification_cluster": cluster_points, "calcification": off_points},
                                      "note": "Named points fp0.25/fp0.5/fp1/fp2: this map's share (half) of the node's "
                                              "budget of false marks per image on mini-MIAS; the cluster score of an "
                                              "image with pixel spacing <= clusters.sharp_max_spacing_mm is calibrated "
                                              "(clusters.sharp_calibration) so the same threshold lets through about "
                                              "the same false clusters per image on sharp images; 'phantom' = every "
                                              "finding on at 0.5 (not validated on real images). The node-level points "
                                              "of bench_mias_node.py may replace these thresholds."})
    metrics = dict(manifest.get("metrics", {}))
    metrics["clusters"] = {"mias_froc": evaluation["final"]["mias_froc"],
                           "held_out_sharp_hybrid_froc": evaluation["final"]["B_sharp_froc"],
                           "points": points}
    manifest["metrics"] = metrics
    for key in ("weights", "weights_sha256"):
        manifest.pop(key, None)
    return save_bundle(out, manifest, state)
