"""How hard is GLAM's task on the phantoms at the compact resolution? Calibration and two references.

First the lesion population: mass sizes and contrasts of the phantoms against the 58
hand-drawn mini-MIAS mass outlines (``--mias``; skipped when the data are not there). Both
are measured the same way on a 0.525 mm grid: equivalent diameter of the mask, and the
contrast-to-texture ratio (mean inside the mask minus the mean of a ring of one to two
equivalent radii around it, over the ring's standard deviation). "Subtle" = ratio below 1.

GLAM learns from image-level labels only. When it stays at chance, this benchmark tells
apart "the lesions cannot be told from the tissue at this resolution" from "the weak
supervision is too slow for the budget", on the same held-out validation views GLAM uses:

* a hand-made blob detector: the maximum, inside the (eroded) breast, of a difference of
  Gaussians at three scales (sigma 3, 5, 8 input pixels of 0.525 mm); no training;
* the compact global network trained WITH the pixel ground truth (per-cell BCE of s1, s2,
  s3 against the lesion mask max-pooled to the 1/16 map), image score = the map's maximum.
  This uses labels GLAM never sees: it is an upper reference, not a competitor.

Both report image-level ROC AUC (benign, malignant, any lesion) for GLAM's labels: masses
(dicom_ai.training.glam.LESION_KINDS). The training set is the
shipped bundle's (1200 studies, seeds 10000-11199); each epoch's validation AUC is kept.

Run: ``.venv/bin/python benchmarks/bench_glam_learnability.py [--epochs 4]``.
Result: benchmarks/results/glam_learnability.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_ai.networks.glam import CONFIGS, GlobalNetwork, glam_geometry  # noqa: E402
from dicom_ai.data.metrics import roc_auc  # noqa: E402
from dicom_ai.training.glam import LESION_KINDS, GlamData, load_phantoms, make_batch  # noqa: E402
from dicom_ai.data.phantom import generate_study  # noqa: E402
from dicom_ai.imaging import read_mammogram  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "build" / "glam-cache"
SHAPE = (444, 341)  # a full-size phantom at 0.525 mm
TRAIN = (10_000, 1200)
VAL = (11_200, 50)


def _aucs(scores: np.ndarray, labels: np.ndarray) -> dict:
    """scores (N, 2) or (N,) -> AUC for benign, malignant and any lesion."""
    s = scores if scores.ndim == 2 else np.stack([scores, scores], 1)
    return {"benign": round(roc_auc(s[:, 0], labels[:, 0]), 3),
            "malignant": round(roc_auc(s[:, 1], labels[:, 1]), 3),
            "any_lesion": round(roc_auc(s.max(1), labels.max(1)), 3)}


def _blur(t: torch.Tensor, sigma: float) -> torch.Tensor:
    k = int(3 * sigma) * 2 + 1
    g = torch.exp(-(torch.arange(k, dtype=torch.float32) - k // 2) ** 2 / (2 * sigma * sigma))
    g = g / g.sum()
    t = F.conv2d(F.pad(t, (k // 2,) * 4, mode="replicate"), g.view(1, 1, 1, -1))
    return F.conv2d(t, g.view(1, 1, -1, 1))


def blob_detector(val: GlamData, config) -> dict:
    """AUC of the max difference-of-Gaussians response inside the breast, per scale."""
    x, mask, _ = make_batch(val, range(len(val)), config)
    edge = F.max_pool2d(1 - mask.float(), 21, 1, 10)  # within 10 px (5 mm) of the skin line
    out = {}
    for sigma in (3, 5, 8):
        dog = _blur(x, sigma) - _blur(x, 3 * sigma)
        score = (dog * (1 - edge) - 10 * edge).flatten(1).max(1).values.numpy()
        out[f"sigma_{sigma}px"] = _aucs(score, val.labels)
    return out


def _cell_truth(data: GlamData, indices, config) -> torch.Tensor:
    truth = []
    for i in indices:
        geometry = glam_geometry(data.mammograms[i], config, mask=data.breast_masks[i])
        truth.append(np.stack([geometry.forward(data.lesions[i, c].astype(np.float32), mode="nearest")
                               for c in (0, 1)]))
    return (F.adaptive_max_pool2d(torch.from_numpy(np.stack(truth)), config.cam_shape) > 0.5).float()


def _resample_area(a: np.ndarray, spacing_mm: float, target_mm: float = 0.525) -> torch.Tensor:
    f = spacing_mm / target_mm
    shape = (max(8, round(a.shape[0] * f)), max(8, round(a.shape[1] * f)))
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="area")[0, 0]


def mass_statistics(image: np.ndarray, breast: np.ndarray, mask: np.ndarray, spacing_mm: float) -> dict | None:
    """Equivalent diameter (mm) and contrast-to-texture ratio of one mass, on the 0.525 mm grid."""
    im = _resample_area(image, spacing_mm)
    inside = _resample_area(breast, spacing_mm) > 0.5
    m = _resample_area(mask, spacing_mm) > 0.5
    if m.sum() < 3:
        return None
    diameter = 2 * float(np.sqrt(m.sum().item() / np.pi)) * 0.525
    r = max(2, int(diameter / 2 / 0.525))
    near = F.max_pool2d(m[None, None].float(), 2 * r + 1, 1, r)[0, 0] > 0
    far = F.max_pool2d(m[None, None].float(), 4 * r + 1, 1, 2 * r)[0, 0] > 0
    ring = far & ~near & inside
    if ring.sum() < 10:
        return None
    ratio = float((im[m].mean() - im[ring].mean()) / im[ring].std().clamp_min(1e-6))
    return {"diameter_mm": diameter, "contrast_to_texture": ratio}


def _components(mask: np.ndarray) -> list[np.ndarray]:
    import SimpleITK as sitk

    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    return [labels == k for k in range(1, int(labels.max()) + 1)]


def _summary(stats: list[dict]) -> dict:
    d = np.array([s["diameter_mm"] for s in stats])
    c = np.array([s["contrast_to_texture"] for s in stats])
    pct = lambda a: {f"p{q}": round(float(np.percentile(a, q)), 2) for q in (10, 25, 50, 75, 90)}  # noqa: E731
    return {"masses": len(stats), "diameter_mm": pct(d), "contrast_to_texture": pct(c),
            "subtle_share": round(float((c < 1.0).mean()), 3)}


def lesion_population(mias_root: Path | None, phantom_studies: int = 60) -> dict:
    """Mass diameters and contrast-to-texture ratios of phantoms and (when present) mini-MIAS."""
    stats = []
    for seed in range(TRAIN[0], TRAIN[0] + phantom_studies):
        for img in generate_study(seed, shape=SHAPE).images:
            m = read_mammogram(img.dataset)
            for key in ("mass_benign", "mass_malignant"):
                for component in _components(img.masks[key]):
                    s = mass_statistics(m.pixels, m.breast_mask, component, img.spacing_mm)
                    if s:
                        stats.append(s)
    out = {"phantom": {"studies": f"{phantom_studies} training studies from seed {TRAIN[0]}, shape {SHAPE}",
                       **_summary(stats)}}
    if mias_root is not None and (mias_root / "Info.txt").is_file():
        from dicom_ai.data.datasets import MIASDataset

        mias, stats = MIASDataset(mias_root), []
        for i in range(len(mias)):
            sample = mias[i]
            for lesion in sample.lesions:
                if lesion.kind == "mass" and lesion.outline == "mask":
                    s = mass_statistics(sample.image.pixels, sample.image.breast_mask, lesion.mask, 0.2)
                    if s:
                        stats.append(s)
        out["mini_mias"] = {"source": "hand-drawn mass outlines (masks/), 200 um pixels", **_summary(stats)}
    else:
        out["mini_mias"] = "not measured: no mini-MIAS at --mias"
    return out


def pixel_supervised(train: GlamData, val: GlamData, config, epochs: int, lr: float, seed: int) -> list[dict]:
    """Train the global network on per-cell lesion truth; validation AUC of the map maximum per epoch."""
    torch.manual_seed(seed)
    net = GlobalNetwork(config)
    optimiser = torch.optim.Adam(net.parameters(), lr)
    history = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        net.train()
        order = rng.permutation(len(train))
        total, t0 = 0.0, time.time()
        for start in range(0, len(order), 8):
            idx = order[start:start + 8]
            x, mask, _ = make_batch(train, idx, config)
            truth = _cell_truth(train, idx, config)
            g = net(x, mask)
            loss = sum(F.binary_cross_entropy(s.clamp(1e-6, 1 - 1e-6), truth) for s in (g.s1, g.s2, g.s3)) / 3
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        net.eval()
        scores = []
        with torch.inference_mode():
            for start in range(0, len(val), 16):
                x, mask, _ = make_batch(val, range(start, min(start + 16, len(val))), config)
                scores.append(net(x, mask).saliency.flatten(2).max(-1).values.numpy())
        record = {"epoch": epoch + 1, "train_cell_bce": round(total / len(train), 5),
                  "val_auc": _aucs(np.concatenate(scores), val.labels), "seconds": round(time.time() - t0)}
        print(json.dumps(record), flush=True)
        history.append(record)
    return history


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mias", type=Path, default=Path("/work/data/mias"),
                        help="mini-MIAS folder for the size/contrast calibration (skipped when absent)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = CONFIGS["compact"]
    population = lesion_population(args.mias)
    print(json.dumps(population), flush=True)
    val = load_phantoms(*VAL, SHAPE, CACHE, progress=False)
    result = {"lesion_population": population, "labels": f"image-level, lesion kinds {list(LESION_KINDS)}",
              "validation_set": f"{VAL[1]} phantom studies ({len(val)} views) from seed {VAL[0]}, shape {SHAPE}; "
                                f"positives benign {int(val.labels[:, 0].sum())}, malignant {int(val.labels[:, 1].sum())}",
              "blob_detector_auc": blob_detector(val, config)}
    train = load_phantoms(*TRAIN, SHAPE, CACHE, progress=False)
    result["pixel_supervised_global_network"] = {
        "train_set": f"{TRAIN[1]} studies ({len(train)} views) from seed {TRAIN[0]}",
        "lr": args.lr, "batch": 8, "history": pixel_supervised(train, val, config, args.epochs, args.lr, seed=0)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "glam_learnability.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'mass population':16s} {'n':>4s} {'diam p10/50/90 mm':>20s} {'contrast p10/50/90':>20s} {'subtle':>7s}")
    for name, p in population.items():
        if isinstance(p, dict):
            d, c = p["diameter_mm"], p["contrast_to_texture"]
            print(f"{name:16s} {p['masses']:4d} {d['p10']:6.1f}/{d['p50']:5.1f}/{d['p90']:5.1f}    "
                  f"{c['p10']:6.2f}/{c['p50']:5.2f}/{c['p90']:5.2f}    {p['subtle_share']:7.3f}")
    print(f"{'reference':34s} {'benign':>7s} {'malignant':>9s} {'any':>6s}")
    for name, a in result["blob_detector_auc"].items():
        print(f"{'blob detector ' + name:34s} {a['benign']:7.3f} {a['malignant']:9.3f} {a['any_lesion']:6.3f}")
    for h in result["pixel_supervised_global_network"]["history"]:
        a = h["val_auc"]
        print(f"{'pixel-supervised epoch ' + str(h['epoch']):34s} {a['benign']:7.3f} {a['malignant']:9.3f} "
              f"{a['any_lesion']:6.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
