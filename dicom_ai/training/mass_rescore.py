"""Training of the U-Net's false-positive reduction stage (:mod:`dicom_ai.networks.mass_rescore`).

Examples are the U-Net's candidate regions on training images: positive when the region's
centroid lies in a mass, negative when it lies on no located lesion (regions on other lesions,
e.g. calcifications, are left out). Each image contributes its regions' windows and features
(:func:`image_examples`); :func:`train_rescorer` fits :class:`MassRescoreNet` with binary
cross-entropy, positives drawn ``positive_rate`` of each batch with random up-down flips and
shifts of up to ``max_shift`` working pixels (a window need not be centred exactly).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dicom_ai.data.evaluate import lesions_of
from dicom_ai.networks.bundle import load_bundle, save_bundle
from dicom_ai.networks.dunet import RESCORE_PREFIX, network_grid
from dicom_ai.networks.mass_rescore import (FEATURES, MassRescoreNet, RescoreConfig, candidate_regions,
                                            region_features, region_patches)
from dicom_ai.networks.pipeline import allowed_region

__all__ = ["Examples", "image_examples", "concat_examples", "train_rescorer", "out_of_fold_examples",
           "attach_rescore"]


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
    (the node's thresholds are chosen on validation folds anyway). Each of ``config.members``
    members is trained alone on its own batches.
    """
    if not (examples.labels == 1).any() or not (examples.labels == 0).any():
        raise ValueError("the rescore stage needs positive and negative candidate regions to train on")
    torch.manual_seed(seed)
    net = MassRescoreNet(config)
    feats = torch.from_numpy(examples.features)
    net.feature_mean.copy_(feats.mean(0))
    net.feature_std.copy_(feats.std(0).clamp_min(1e-3))
    pos, neg = np.flatnonzero(examples.labels == 1), np.flatnonzero(examples.labels == 0)
    n_pos = max(1, int(round(batch_size * positive_rate)))
    steps = max(1, len(examples.labels) // batch_size)
    net.train()
    for member in range(config.members):
        # Each member its own initialisation (drawn in turn above) and its own batches.
        rng = np.random.default_rng((seed, member))
        params = net.members[member].parameters()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
        for _ in range(epochs):
            for _ in range(steps):
                idx = np.concatenate([rng.choice(pos, n_pos), rng.choice(neg, batch_size - n_pos)])
                shift = rng.integers(0, examples.shifted.shape[0], len(idx))
                win = torch.from_numpy(examples.shifted[shift, idx])
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
                win = torch.where(flip[:, None, None, None], torch.flip(win, dims=(2,)), win)
                y = torch.from_numpy(examples.labels[idx])
                loss = F.binary_cross_entropy_with_logits(net(win, feats[idx], member=member), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return net.eval()


def out_of_fold_examples(dataset, fold_of, fold_models: dict, train_folds, config: RescoreConfig,
                         cache_dir: str | Path | None = None, progress: bool = False) -> Examples:
    """Training examples of every image of ``dataset`` whose fold is in ``train_folds``, each
    image's candidate regions found by ``fold_models[fold]``, the U-Net that did not see it.

    ``fold_of(i)`` is image ``i``'s patient-level fold; ``fold_models`` maps a fold to a
    :class:`~dicom_ai.networks.dunet.DUNetModel` (its raw subtraction output is used, so its
    calibration plays no part). With ``cache_dir`` each image's examples are kept as
    ``<cache_dir>/<weights sha256 prefix>/<image index>.npz`` and read back on the next run.
    """
    parts = []
    train_folds = set(int(f) for f in train_folds)
    for i in range(len(dataset)):
        fold = int(fold_of(i))
        if fold not in train_folds:
            continue
        model = fold_models[fold]
        path = None
        if cache_dir is not None:
            key = hashlib.sha256(repr((model.identity.name, model.identity.version, config.to_dict())).encode())
            path = Path(cache_dir) / f"rescore-{key.hexdigest()[:12]}" / f"{i}.npz"
            if path.is_file():
                with np.load(path) as z:
                    parts.append(Examples(z["windows"], z["features"], z["labels"], z["shifted"]))
                continue
        sample = dataset[i]
        geo, image, _ = network_grid(sample.image, model.config)
        with torch.no_grad():
            x = torch.from_numpy(image)[None, None]
            raw = (x - model.network.reconstruct(x))[0, 0].numpy()
        lesions = [l for l in lesions_of(sample) if l.mask is not None]

        def grid(masks):
            return (np.stack([geo.forward(m.astype(np.float32)) > 0.5 for m in masks]) if masks
                    else np.zeros((0,) + raw.shape, dtype=bool))

        allowed = geo.forward(allowed_region(sample.image).astype(np.float32)) > 0.5
        ex = image_examples(raw, image, allowed, grid([l.mask for l in lesions if l.kind == "mass"]),
                            grid([l.mask for l in lesions]), config)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, windows=ex.windows, features=ex.features, labels=ex.labels, shifted=ex.shifted)
            tmp.rename(path)
        parts.append(ex)
        if progress and len(parts) % 50 == 0:
            print(f"  rescore examples: {len(parts)} images", flush=True)
    if not parts:
        raise ValueError(f"no image of the data set lies in folds {sorted(train_folds)}")
    return concat_examples(parts)


def attach_rescore(base: str | Path, net: MassRescoreNet, out: str | Path, info: dict,
                   floor: float = 1e-4, version: str | None = None) -> Path:
    """Write ``base`` (a U-Net bundle folder) plus the rescore stage ``net`` as the bundle ``out``.

    The stage's tensors join the U-Net's in one safetensors file under ``rescore.``; the
    manifest gains ``rescore`` (config, floor, ``info``), its map threshold becomes ``floor``
    (the rescored map's candidate level), the U-Net's Platt ``calibration`` moves into
    ``rescore.unet_calibration`` (the stage's score replaces it), and named operating points are
    dropped: they were chosen for the old scores and must be chosen again (bench_mias_node).
    """
    bundle = load_bundle(base)
    manifest = {k: v for k, v in bundle.manifest.items()
                if k not in ("operating_points", "operating_point", "weights", "weights_sha256", "calibration")}
    finding = str(manifest.get("finding", "malignant_lesion"))
    manifest["thresholds"] = dict(manifest["thresholds"], **{finding: floor})
    manifest["rescore"] = {"config": net.config.to_dict(), "floor": floor, "features": list(FEATURES),
                           "unet_calibration": bundle.manifest.get("calibration"), **info}
    if version:
        manifest["version"] = version
    state = dict(bundle.state_dict)
    state.update({RESCORE_PREFIX + k: v for k, v in net.state_dict().items()})
    return save_bundle(out, manifest, state)
