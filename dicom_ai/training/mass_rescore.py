"""Training of the U-Net's false-positive reduction stage (:mod:`dicom_ai.networks.mass_rescore`).

Examples are the U-Net's candidate regions on training images: positive when the region's
centroid lies in a mass, negative when it lies on no located lesion (regions on other lesions,
e.g. calcifications, are left out). Each image contributes its regions' windows and features
(:func:`image_examples`); :func:`train_rescorer` fits :class:`MassRescoreNet` with binary
cross-entropy, positives drawn ``positive_rate`` of each batch with random up-down flips and
shifts of up to ``max_shift`` working pixels (a window need not be centred exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dicom_ai.networks.mass_rescore import (MassRescoreNet, RescoreConfig, candidate_regions, region_features,
                                            region_patches)

__all__ = ["Examples", "image_examples", "concat_examples", "train_rescorer"]


@dataclass
class Examples:
    """Windows (n, 2, W, W), features (n, F), labels (n,) 1 = mass, and the shifted windows used
    for augmentation (k, n, 2, W, W), one per shift of :data:`SHIFTS`."""

    windows: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    shifted: np.ndarray


#: Window shifts (rows, columns) in working pixels drawn for augmentation.
SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2))


def image_examples(output: np.ndarray, image: np.ndarray, allowed: np.ndarray, masses: np.ndarray,
                   lesions: np.ndarray, config: RescoreConfig) -> Examples:
    """The candidate regions of one image as training examples.

    ``masses`` / ``lesions``: (k, H, W) boolean masks on the working grid of the image's masses
    and of all its located lesions. A region hitting a mass is positive, one on no lesion
    negative, others dropped.
    """
    regions = candidate_regions(output, allowed, config.level)
    keep, labels = [], []
    for j, reg in enumerate(regions):
        r, c = (int(round(v)) for v in reg.centroid)
        on_mass = bool(masses.shape[0]) and bool(masses[:, r, c].any())
        on_any = bool(lesions.shape[0]) and bool(lesions[:, r, c].any())
        if on_mass or not on_any:
            keep.append(j)
            labels.append(1.0 if on_mass else 0.0)
    regions = [regions[j] for j in keep]
    feats = region_features(regions, output, image, allowed, config)
    shifted = np.stack([region_patches(regions, output, image, config, s) for s in SHIFTS]) if regions else \
        np.zeros((len(SHIFTS), 0, 2, config.window_px, config.window_px), np.float32)
    return Examples(shifted[0], feats, np.asarray(labels, dtype=np.float32), shifted)


def concat_examples(parts: list[Examples]) -> Examples:
    """One :class:`Examples` of many images'."""
    return Examples(np.concatenate([p.windows for p in parts]), np.concatenate([p.features for p in parts]),
                    np.concatenate([p.labels for p in parts]), np.concatenate([p.shifted for p in parts], axis=1))


def train_rescorer(examples: Examples, config: RescoreConfig, epochs: int = 30, batch_size: int = 64,
                   positive_rate: float = 0.25, lr: float = 1e-3, weight_decay: float = 1e-3,
                   seed: int = 0) -> MassRescoreNet:
    """Fit :class:`MassRescoreNet` on ``examples`` (see the module doc); returns it in eval mode.

    An epoch is ``len(examples) // batch_size`` batches. Positives are over-drawn to
    ``positive_rate`` of each batch, which shifts the output's scale, not its ranking of regions
    (the node's thresholds are chosen on validation folds anyway).
    """
    if not (examples.labels == 1).any() or not (examples.labels == 0).any():
        raise ValueError("the rescore stage needs positive and negative candidate regions to train on")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = MassRescoreNet(config)
    feats = torch.from_numpy(examples.features)
    net.feature_mean.copy_(feats.mean(0))
    net.feature_std.copy_(feats.std(0).clamp_min(1e-3))
    pos, neg = np.flatnonzero(examples.labels == 1), np.flatnonzero(examples.labels == 0)
    n_pos = max(1, int(round(batch_size * positive_rate)))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, len(examples.labels) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    net.train()
    for _ in range(epochs):
        for _ in range(steps):
            idx = np.concatenate([rng.choice(pos, n_pos), rng.choice(neg, batch_size - n_pos)])
            shift = rng.integers(0, examples.shifted.shape[0], len(idx))
            win = torch.from_numpy(examples.shifted[shift, idx])
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            win = torch.where(flip[:, None, None, None], torch.flip(win, dims=(2,)), win)
            y = torch.from_numpy(examples.labels[idx])
            loss = F.binary_cross_entropy_with_logits(net(win, feats[idx]), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()
