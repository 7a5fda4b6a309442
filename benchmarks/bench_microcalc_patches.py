"""The seed paper's comparison: patch accuracy of Detector and Segmentator for 29/39/49 px
patches and "same"/"valid" convolutions, with sensitivity and specificity beside accuracy.

Scale (be explicit): every one of the 12 networks is trained for ``--steps`` Adam steps of
``--batch`` class-balanced patches (default 150 x 64 = 9,600 patch presentations) on patches of
12 full-size phantom studies, on a shared 2-core CPU; held-out patches come from 3 other
phantom studies (different seeds). The paper trained on 231 real mammograms to convergence,
so absolute numbers are not comparable; the ranking under an equal small budget is what this
measures. Also measured per configuration: how far dense (fully convolutional) inference is
from patch-by-patch inference (exactly equal for "valid", approximate for "same").

Writes benchmarks/results/microcalc_patches.json.
    .venv/bin/python benchmarks/bench_microcalc_patches.py [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_ai.cli.args import seed_list as _seed_list  # noqa: E402
from dicom_ai.networks.microcalc import MicrocalcConfig, PatchCNN, sliding_window_logits  # noqa: E402
from dicom_ai.training.microcalc import evaluate_patches, load_patches, select_seeds, train_network  # noqa: E402


def dense_gap(net, patches, n: int = 6, seed: int = 0) -> dict:
    """Dense vs patch-by-patch output at every position of ``n`` 98x98 regions, each a 2x2
    mosaic of held-out 49 px patches (so every patch size has many positions)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(patches), size=(n, 2, 2), replace=False)
    tiles = patches.images[idx]  # (n, 2, 2, 49, 49)
    top = np.concatenate([tiles[:, 0, 0], tiles[:, 0, 1]], axis=-1)
    bottom = np.concatenate([tiles[:, 1, 0], tiles[:, 1, 1]], axis=-1)
    mosaic = np.concatenate([top, bottom], axis=-2)  # (n, 98, 98)
    region = torch.from_numpy(np.ascontiguousarray(mosaic, dtype=np.float32))[:, None]
    with torch.no_grad():
        dense = torch.softmax(net.dense_logits(region, 1), 1)[:, 1]
        naive = torch.softmax(sliding_window_logits(net, region, 1), 1)[:, 1]
    diff = (dense - naive).abs()
    return {"max_abs_prob_diff": float(diff.max()), "mean_abs_prob_diff": float(diff.mean()),
            "decision_agreement": float(((dense >= 0.5) == (naive >= 0.5)).float().mean()),
            "positions": int(diff.numel())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-seeds", default="0:30")
    ap.add_argument("--val-seeds", default="1001,1003,1005")
    ap.add_argument("--cache", default=str(ROOT / "build" / "microcalc"))
    ap.add_argument("--sizes", default="29,39,49")
    ap.add_argument("--paddings", default="same,valid")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "microcalc_patches.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # fastest on the shared, loaded CPU

    t_start = time.time()
    train_seeds = select_seeds(_seed_list(args.train_seeds), 10, 2)
    train = load_patches(train_seeds, Path(args.cache))
    val = load_patches(_seed_list(args.val_seeds), Path(args.cache))
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for padding in args.paddings.split(","):
            cfg = MicrocalcConfig(patch_size=size, padding=padding)
            row = {"patch_size": size, "padding": padding,
                   "params_per_network": sum(p.numel() for p in PatchCNN(cfg).parameters())}
            for k, role in enumerate(("detector", "segmentator")):
                t0 = time.time()
                net, losses = train_network(cfg, role, train, steps=args.steps, batch=args.batch, lr=args.lr,
                                            seed=k, desc=f"{role} {size} {padding}")
                row[role] = evaluate_patches(net, role, val, per_class=300)
                row[role]["train_s"] = round(time.time() - t0, 1)
                row[role]["final_loss"] = float(np.mean(losses[-20:]))
                if role == "segmentator":
                    row["dense_vs_patch"] = dense_gap(net, val)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("patch_size", "padding")}),
                  f"det acc {row['detector']['accuracy']:.3f} seg acc {row['segmentator']['accuracy']:.3f}", flush=True)

    result = {
        "benchmark": "microcalc_patches",
        "scale": {"train_studies": train_seeds, "train_patches": len(train), "held_out_studies": args.val_seeds,
                  "held_out_patches_available": len(val), "steps_per_network": args.steps, "batch": args.batch,
                  "lr": args.lr, "evaluation": "balanced held-out sets: Detector 300 per C1-C3 + 900 C4; "
                                              "Segmentator 300 per C1..C4 (fewer where a class ran out)"},
        "device": "cpu (no GPU lent to this task)", "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "wall_s": round(time.time() - t_start, 1),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'size':>4} {'pad':>5} | {'Det acc':>7} {'sens':>5} {'spec':>5} | {'Seg acc':>7} {'sens':>5} "
          f"{'spec':>5} | {'dense-patch max|dp|':>19}")
    for r in rows:
        d, s = r["detector"], r["segmentator"]
        print(f"{r['patch_size']:>4} {r['padding']:>5} | {d['accuracy']:7.3f} {d['sensitivity']:5.3f} "
              f"{d['specificity']:5.3f} | {s['accuracy']:7.3f} {s['sensitivity']:5.3f} {s['specificity']:5.3f} | "
              f"{r['dense_vs_patch']['max_abs_prob_diff']:19.2e}")
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
