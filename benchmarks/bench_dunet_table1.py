"""Table 1 of Tardy & Mateus (MIDL 2020) on held-out phantom studies, at a CPU-sized scale.

Four rows, as in the paper: the standard sigmoid head and the subtraction head (output =
x - f(x)), each trained from scratch and from the stage-1 restoration checkpoint. Columns:
DICE_max = best test Dice over the epochs, DICE_avg = mean test Dice over the last 10
epochs. Dice is per image on the model grid (map >= 0.5), averaged over the held-out
images that contain a malignant lesion (mass_malignant | calcification_malignant).

Reduced scale (stated in the JSON): the paper trains a wide U-Net at 1536 x 1536 on INbreast
for many epochs; here the compact U-Net (widths 8..64) sees 128 x 96 inputs (at most 1.8 mm
per pixel, where calcifications are sub-pixel), on a few dozen phantom images, for a few
epochs, on two shared CPU cores. Every row gets the same data, epochs, learning rate, seed
and initial weights (scratch rows) or pretrained weights (pretrained rows).

Writes benchmarks/results/dunet_table1.json, restoration examples after stage 1
(dunet_restoration.png) and input / reconstruction / output / mask grids after stage 2 for
the pre-trained rows (dunet_reconstruction_discriminative.png, _supervised.png), and prints
the table. The seeds run in parallel processes (one torch thread each).

    .venv/bin/python benchmarks/bench_dunet_table1.py [--seeds 0 1 2] [--seg-epochs 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig
from dicom_ai.training.dunet import evaluate_segmentation, phantom_image_set, predict_probability, pretrain, seed_everything, train_segmentation
from dicom_ai.training.genesis import GenesisConfig, distort

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = (
    ("fully supervised, from scratch", "sigmoid", False),
    ("fully supervised, pre-trained", "sigmoid", True),
    ("discriminative, from scratch", "subtraction", False),
    ("discriminative, pre-trained", "subtraction", True),
)
PAPER = {  # seed text, Table 1 (INbreast malignant images, 1536 x 1536)
    "fully supervised, from scratch": (0.58, 0.44),
    "fully supervised, pre-trained": (0.58, 0.57),
    "discriminative, from scratch": (0.61, 0.52),
    "discriminative, pre-trained": (0.61, 0.59),
}


def _data(args):
    input_shape, phantom_shape = tuple(args.input_shape), tuple(args.phantom_shape)
    pool = phantom_image_set(range(args.train_studies), input_shape, phantom_shape)
    test_all = phantom_image_set(range(100000, 100000 + args.test_studies), input_shape, phantom_shape)
    pre_data = pool.pretraining_pool()
    seg_data = pool.segmentation_pool(empty_targets=True)
    has_lesion = seg_data.lesions.any(axis=(1, 2))
    benign = np.flatnonzero(~has_lesion)[: args.max_benign]
    seg_data = seg_data.subset(np.sort(np.concatenate([np.flatnonzero(has_lesion), benign])))
    test = test_all.positives()
    lesion_free_test = test_all.subset(np.flatnonzero(~test_all.lesions.any(axis=(1, 2)) & test_all.benign))
    return pre_data, seg_data, test, lesion_free_test


def run_seed(seed: int, args: argparse.Namespace, data: tuple) -> dict:
    """Stage 1 once, then the four rows of Table 1 from the same initial weights, for one seed."""
    torch.set_num_threads(args.threads)
    pre_data, seg_data, test, lesion_free_test = data
    config = DUNetConfig.compact(input_shape=tuple(args.input_shape))
    seed_everything(seed)
    backbone = DiscriminativeUNet(config)
    scratch_state = {k: v.clone() for k, v in backbone.state_dict().items()}
    t0 = time.time()
    history = pretrain(backbone, pre_data, args.pretrain_epochs, batch_size=8, lr=args.lr, seed=seed,
                       validation=lesion_free_test, progress=False)
    pretraining = {"seed": seed, "seconds": round(time.time() - t0, 1), "history": history}
    print(f"seed {seed}: stage 1 restoration MSE {history[-1]['train_mse']:.4f} "
          f"(validation {history[-1].get('validation_mse', float('nan')):.4f}), {time.time() - t0:.0f} s", flush=True)
    pretrained_state = {k: v.clone() for k, v in backbone.state_dict().items()}
    if seed == args.seeds[0]:
        restoration_grid(backbone, lesion_free_test if len(lesion_free_test) else pre_data,
                         args.results / "dunet_restoration.png")
    runs = {}
    for name, head, pretrained in ROWS:
        net = DiscriminativeUNet(DUNetConfig.from_dict(dict(config.to_dict(), head=head)))
        net.load_state_dict(pretrained_state if pretrained else scratch_state)
        t0 = time.time()
        hist = train_segmentation(net, seg_data, args.seg_epochs, batch_size=4, lr=args.lr, seed=seed,
                                  test=test, progress=False)
        curve = [h["test_dice"] for h in hist]
        soft = [h["test_soft_dice"] for h in hist]
        fp = evaluate_segmentation(net, lesion_free_test)["fp_fraction"] if len(lesion_free_test) else None
        run = {"seed": seed, "dice_max": float(np.max(curve)), "dice_avg_last10": float(np.mean(curve[-10:])),
               "soft_dice_max": float(np.max(soft)), "soft_dice_avg_last10": float(np.mean(soft[-10:])),
               "fp_fraction_benign_test_images": fp, "dice_curve": curve, "soft_dice_curve": soft,
               "train_loss_curve": [h["train_loss"] for h in hist], "seconds": round(time.time() - t0, 1)}
        runs[name] = run
        print(f"seed {seed}: {name:32s} DICE_max {run['dice_max']:.3f} DICE_avg {run['dice_avg_last10']:.3f} "
              f"({run['seconds']:.0f} s)", flush=True)
        if seed == args.seeds[0] and pretrained:
            tag = "discriminative" if head == "subtraction" else "supervised"
            reconstruction_grid(net, test, args.results / f"dunet_reconstruction_{tag}.png", name)
    return {"runs": runs, "pretraining": pretraining}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--input-shape", type=int, nargs=2, default=[128, 96])
    ap.add_argument("--phantom-shape", type=int, nargs=2, default=[416, 320])
    ap.add_argument("--train-studies", type=int, default=60, help="phantom seeds 0..N-1 for training")
    ap.add_argument("--test-studies", type=int, default=48, help="phantom seeds 100000.. held out")
    ap.add_argument("--max-benign", type=int, default=24, help="benign empty-target images in stage 2")
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--seg-epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per seed process")
    ap.add_argument("--parallel", type=int, default=3, help="seeds run in parallel processes")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and PNG files")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    config = DUNetConfig.compact(input_shape=tuple(args.input_shape))
    # Build (or load) the cached data once; the workers get these arrays, not the cache.
    data = _data(args)
    pre_data, seg_data, test, lesion_free_test = data
    n_malignant = int(seg_data.lesions.any(axis=(1, 2)).sum())
    print(f"data: {len(pre_data)} stage-1 images, {n_malignant} malignant + {len(seg_data) - n_malignant} "
          f"benign stage-2 images, {len(test)} test images with lesions ({time.time() - started:.0f} s)", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, args.parallel), mp_context=ctx) as pool:
        per_seed = list(pool.map(run_seed, args.seeds, [args] * len(args.seeds), [data] * len(args.seeds)))
    runs = {name: [r["runs"][name] for r in per_seed] for name, _, _ in ROWS}
    pretrain_runs = [r["pretraining"] for r in per_seed]

    table = []
    for name, _, _ in ROWS:
        r = runs[name]
        table.append({
            "method": name,
            "dice_max_mean": float(np.mean([x["dice_max"] for x in r])),
            "dice_max_std": float(np.std([x["dice_max"] for x in r])),
            "dice_avg_mean": float(np.mean([x["dice_avg_last10"] for x in r])),
            "dice_avg_std": float(np.std([x["dice_avg_last10"] for x in r])),
            "soft_dice_max_mean": float(np.mean([x["soft_dice_max"] for x in r])),
            "soft_dice_avg_mean": float(np.mean([x["soft_dice_avg_last10"] for x in r])),
            "paper_dice_max": PAPER[name][0],
            "paper_dice_avg": PAPER[name][1],
        })
    result = {
        "benchmark": "dunet_table1",
        "claim": "Tardy & Mateus Table 1: subtraction head raises DICE_max; pre-training raises DICE_avg",
        "scale": {
            "note": "reduced scale for a shared 2-core CPU; not comparable in absolute value with the paper",
            "input_shape": list(args.input_shape), "paper_input_shape": [1536, 1536],
            "channels": list(config.channels), "parameters": sum(p.numel() for p in DiscriminativeUNet(config).parameters()),
            "phantom_shape": list(args.phantom_shape),
            "model_pixel_mm_at_most": round(0.07 * 3328 / args.input_shape[0], 2),
            "train_studies": args.train_studies, "test_studies": args.test_studies,
            "stage1_images": len(pre_data),
            "stage2_malignant_images": int(seg_data.lesions.any(axis=(1, 2)).sum()),
            "stage2_benign_images": int((~seg_data.lesions.any(axis=(1, 2))).sum()),
            "parallel_seed_processes": args.parallel,
            "test_images_with_lesion": len(test), "test_benign_images": len(lesion_free_test),
            "pretrain_epochs": args.pretrain_epochs, "seg_epochs": args.seg_epochs, "lr": args.lr,
            "batch_size": {"pretrain": 8, "segmentation": 4}, "seeds": args.seeds,
        },
        "dice_protocol": "per image on the model grid, probability >= 0.5, mean over test images with a "
                         "malignant lesion; DICE_max = max over epochs, DICE_avg = mean of the last 10 epochs",
        "table": table,
        "runs": runs,
        "pretraining": pretrain_runs,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads, "load_average_at_end": os.getloadavg(), "gpu": "none lent to this task"},
        "seconds": round(time.time() - started, 1),
    }
    (args.results / "dunet_table1.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"{'method':34s} {'DICE_max':>15s} {'DICE_avg(10)':>15s}   paper max/avg")
    for row in table:
        print(f"{row['method']:34s} {row['dice_max_mean']:.3f} ± {row['dice_max_std']:.3f}   "
              f"{row['dice_avg_mean']:.3f} ± {row['dice_avg_std']:.3f}   {row['paper_dice_max']:.2f}/{row['paper_dice_avg']:.2f}")
    print(f"wrote {args.results / 'dunet_table1.json'} in {result['seconds']:.0f} s")
    return 0


def restoration_grid(network: DiscriminativeUNet, data, path: Path, n: int = 4) -> None:
    """Rows: distorted input, restoration f(T(x)), target x; one column per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(123)
    idx = np.arange(min(n, len(data)))
    dists = [distort(data.images[i], data.breasts[i], rng, GenesisConfig()) for i in idx]
    x = torch.from_numpy(np.stack([d.image for d in dists]))[:, None]
    network.eval()
    with torch.no_grad():
        restored = network.reconstruct(x)[:, 0].numpy()
    fig, axes = plt.subplots(3, len(idx), figsize=(2.2 * len(idx), 7.5), squeeze=False)
    for j, d in enumerate(dists):
        for i, (img, title) in enumerate(((d.image, "distorted: " + "+".join(d.applied or ["none"])),
                                          (restored[j], "restored f(T(x))"), (d.target, "target x"))):
            axes[i, j].imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_title(title, fontsize=7)
            axes[i, j].axis("off")
    fig.suptitle("Stage 1: restoration of modified Genesis distortions (held-out phantom images)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reconstruction_grid(network: DiscriminativeUNet, data, path: Path, title: str, n: int = 4) -> None:
    """Rows: input x, head output (f(x) or sigmoid map), x - f(x) or probability, mask (paper Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.arange(min(n, len(data)))
    x = torch.from_numpy(data.images[idx])[:, None]
    network.eval()
    with torch.no_grad():
        f = network.reconstruct(x)[:, 0].numpy()
    prob = predict_probability(network, data.images[idx])
    subtraction = network.head == "subtraction"
    rows = [("input x", data.images[idx], "gray", (0, 1)),
            ("reconstruction f(x)" if subtraction else "logit f(x)", f, "gray", (0, 1) if subtraction else (None, None)),
            ("output clip(x - f(x))" if subtraction else "output sigmoid(f(x))", prob, "magma", (0, 1)),
            ("ground truth mask", data.lesions[idx].astype(float), "gray", (0, 1))]
    fig, axes = plt.subplots(len(rows), len(idx), figsize=(2.2 * len(idx), 10), squeeze=False)
    for i, (label, arrays, cmap, (lo, hi)) in enumerate(rows):
        for j in range(len(idx)):
            axes[i, j].imshow(arrays[j], cmap=cmap, vmin=lo, vmax=hi)
            axes[i, j].set_title(f"{label}\n{data.source[idx[j]]}", fontsize=7)
            axes[i, j].axis("off")
    fig.suptitle(f"Stage 2, {title} (held-out phantom images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
