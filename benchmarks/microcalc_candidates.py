"""Candidate clusters of the dumped working-grid maps (benchmarks/microcalc_dump.py), offline.

:func:`load` rebuilds one dumped image's working-grid probability (zeros below the dump's
floor) and image (NaN away from the candidates); :func:`candidates` runs the node's cluster
stage (:func:`dicom_ai.networks.microcalc_clusters.candidate_clusters`) on it and tells for
each candidate cluster whether its centroid (on the source grid) lies in a located cluster,
exactly the hit rule of bench_microcalc_real.py. Used by bench_microcalc_clusters.py and by
the cluster-model fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_ai.networks.microcalc_clusters import WINDOW, ClusterConfig, candidate_clusters

SPACING = 0.05


@dataclass
class Dumped:
    key: str
    group: str
    prob: np.ndarray
    image: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    lesions: list  # (mask crop, origin)
    labels: tuple
    source_spacing: tuple


def load(path: Path, root: Path) -> Dumped:
    with np.load(path, allow_pickle=False) as z:
        shape = tuple(int(v) for v in z["work_shape"])
        lesions = [(z[k], z[f"{k}_origin"]) for k in z.files if k.startswith("lesion_") and not k.endswith("origin")]
        key = str(path.relative_to(root).with_suffix(""))
        common = dict(key=key, group=str(z["group"]), lesions=lesions, labels=tuple(str(v) for v in z["labels"]),
                      source_spacing=tuple(float(v) for v in z["source_spacing"]))
        if shape == (0, 0):
            return Dumped(prob=np.zeros((1, 1), np.float32), image=np.full((1, 1), np.nan, np.float32),
                          scale=np.ones(2), offset=np.zeros(2), **common)
        prob = np.zeros(shape[0] * shape[1], np.float32)
        prob[z["prob_idx"]] = z["prob_val"].astype(np.float32)
        prob = prob.reshape(shape)
        half = WINDOW // 2
        image = np.full((shape[0] + 2 * half, shape[1] + 2 * half), np.nan, np.float32)
        for (r, c), w in zip(z["win_rc"], z["win"]):
            image[r:r + WINDOW, c:c + WINDOW] = w.astype(np.float32)
        # The dump's windows were cut from the zero-padded image; outside the image stays NaN.
        image = image[half:half + shape[0], half:half + shape[1]]
        return Dumped(prob=prob, image=image, scale=z["scale"], offset=z["offset"], **common)


def hit(d: Dumped, centroid_work: tuple[float, float]) -> int:
    """Index of the located cluster whose mask holds the centroid, or -1."""
    r = int(round(centroid_work[0] * d.scale[0] + d.offset[0]))
    c = int(round(centroid_work[1] * d.scale[1] + d.offset[1]))
    for k, (mask, (r0, c0)) in enumerate(d.lesions):
        if 0 <= r - r0 < mask.shape[0] and 0 <= c - c0 < mask.shape[1] and mask[r - r0, c - c0]:
            return k
    return -1


def candidates(d: Dumped, config: ClusterConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (n, F), scores (n,), lesion index hit or -1 (n,)) of one image's candidate clusters."""
    found = candidate_clusters(d.prob, d.image, SPACING, config)
    if not found:
        return np.zeros((0, 10)), np.zeros(0), np.zeros(0, int)
    feats = np.stack([f for _, f, _ in found])
    scores = np.array([s for _, _, s in found])
    hits = np.array([hit(d, tuple(np.mean([c.centroid for c in g], axis=0))) for g, _, _ in found])
    return feats, scores, hits


def load_all(root: Path, prefix: str = "") -> list[Dumped]:
    return [load(p, root) for p in sorted(root.rglob("*.npz")) if not p.name.endswith(".tmp.npz")
            and str(p.relative_to(root)).startswith(prefix)]
