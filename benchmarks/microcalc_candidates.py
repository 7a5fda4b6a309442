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

#: Working pixel of the dumps of 0.05 mm bundles (a dump's own is :attr:`Dumped.spacing_mm`).
SPACING = 0.05


@dataclass
class Dumped:
    """One dumped image. The dense maps (:attr:`prob`, :attr:`image`) are rebuilt from the
    sparse dump on each access and not kept: a dense 0.05 mm map is 20-130 MB, and the benches
    hold hundreds of dumps."""

    key: str
    group: str
    shape: tuple[int, int]  # working grid; (0, 0): no breast
    prob_idx: np.ndarray
    prob_val: np.ndarray
    win_rc: np.ndarray
    win: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    lesions: list  # (mask crop, origin)
    labels: tuple
    source_spacing: tuple
    img_idx: np.ndarray | None = None  # exact working image (benchmarks/microcalc_exact.py), sparse
    img_val: np.ndarray | None = None

    @property
    def spacing_mm(self) -> float:
        """Working pixel size of the dumped bundle, mm (``scale`` is working -> source pixels)."""
        if self.shape == (0, 0):
            return SPACING
        return round(float(self.scale[0]) * float(self.source_spacing[0]), 6)

    @property
    def prob(self) -> np.ndarray:
        """Working-grid probability (float32; 0 below the dump's floor)."""
        if self.shape == (0, 0):
            return np.zeros((1, 1), np.float32)
        prob = np.zeros(self.shape[0] * self.shape[1], np.float32)
        prob[self.prob_idx] = self.prob_val.astype(np.float32)
        return prob.reshape(self.shape)

    @property
    def image(self) -> np.ndarray:
        """Working-grid image (float32): the node's working image where an exact dump
        (benchmarks/microcalc_exact.py) stored it, else the dumped windows; NaN elsewhere."""
        if self.shape == (0, 0):
            return np.full((1, 1), np.nan, np.float32)
        if self.img_idx is not None:
            image = np.full(self.shape[0] * self.shape[1], np.nan, np.float32)
            image[self.img_idx] = self.img_val
            return image.reshape(self.shape)
        half = WINDOW // 2
        image = np.full((self.shape[0] + 2 * half, self.shape[1] + 2 * half), np.nan, np.float32)
        for (r, c), w in zip(self.win_rc, self.win):
            image[r:r + WINDOW, c:c + WINDOW] = w.astype(np.float32)
        # The dump's windows were cut from the zero-padded image; outside the image stays NaN.
        return image[half:half + self.shape[0], half:half + self.shape[1]]


def load(path: Path, root: Path) -> Dumped:
    with np.load(path, allow_pickle=False) as z:
        shape = tuple(int(v) for v in z["work_shape"])
        lesions = [(z[k], z[f"{k}_origin"]) for k in z.files if k.startswith("lesion_") and not k.endswith("origin")]
        key = str(path.relative_to(root).with_suffix(""))
        common = dict(key=key, group=str(z["group"]), lesions=lesions, labels=tuple(str(v) for v in z["labels"]),
                      source_spacing=tuple(float(v) for v in z["source_spacing"]), shape=shape)
        if shape == (0, 0):
            empty = np.zeros(0)
            return Dumped(prob_idx=empty.astype(np.int64), prob_val=empty, win_rc=np.zeros((0, 2), int),
                          win=np.zeros((0, WINDOW, WINDOW)), scale=np.ones(2), offset=np.zeros(2), **common)
        exact = {"img_idx": z["img_idx"], "img_val": z["img_val"]} if "img_idx" in z.files else {}
        return Dumped(prob_idx=z["prob_idx"], prob_val=z["prob_val"], win_rc=z["win_rc"], win=z["win"],
                      scale=z["scale"], offset=z["offset"], **exact, **common)


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
    found = candidate_clusters(d.prob, d.image, d.spacing_mm, config)  # dense maps built for this call only
    if not found:
        return np.zeros((0, 10)), np.zeros(0), np.zeros(0, int)
    feats = np.stack([f for _, f, _ in found])
    scores = np.array([s for _, _, s in found])
    hits = np.array([hit(d, tuple(np.mean([c.centroid for c in g], axis=0))) for g, _, _ in found])
    return feats, scores, hits


def load_all(root: Path, prefix: str = "") -> list[Dumped]:
    return [load(p, root) for p in sorted(root.rglob("*.npz")) if not p.name.endswith(".tmp.npz")
            and str(p.relative_to(root)).startswith(prefix)]
