"""How hard is GLAM's task on the phantoms at the compact resolution? Two reference points.

GLAM learns from image-level labels only. When it stays at chance, this benchmark tells
apart "the lesions cannot be told from the tissue at this resolution" from "the weak
supervision is too slow for the budget", on the same held-out validation views GLAM uses:

* a hand-made blob detector: the maximum, inside the (eroded) breast, of a difference of
  Gaussians at three scales (sigma 3, 5, 8 input pixels of 0.525 mm); no training;
* the compact global network trained WITH the pixel ground truth (per-cell BCE of s1, s2,
  s3 against the lesion mask max-pooled to the 1/16 map), image score = the map's maximum.
  This uses labels GLAM never sees: it is an upper reference, not a competitor.

Both report image-level ROC AUC (benign, malignant, any lesion). The training set is the
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
from dicom_ai.training.glam import GlamData, load_phantoms, make_batch  # noqa: E402

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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = CONFIGS["compact"]
    val = load_phantoms(*VAL, SHAPE, CACHE, progress=False)
    result = {"validation_set": f"{VAL[1]} phantom studies ({len(val)} views) from seed {VAL[0]}, shape {SHAPE}; "
                                f"positives benign {int(val.labels[:, 0].sum())}, malignant {int(val.labels[:, 1].sum())}",
              "blob_detector_auc": blob_detector(val, config)}
    train = load_phantoms(*TRAIN, SHAPE, CACHE, progress=False)
    result["pixel_supervised_global_network"] = {
        "train_set": f"{TRAIN[1]} studies ({len(train)} views) from seed {TRAIN[0]}",
        "lr": args.lr, "batch": 8, "history": pixel_supervised(train, val, config, args.epochs, args.lr, seed=0)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "glam_learnability.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
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
