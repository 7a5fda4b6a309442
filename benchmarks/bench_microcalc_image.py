"""Whole-image quality and speed of the shipped microcalcification bundle (models/microcalc).

Quality, on full-size held-out phantom studies (3328x2560 at 0.07 mm; seeds never used in
training), on the stored source grid the node reports on:

* pixel level: Dice of calcification pixels (per image with calcifications, then averaged,
  and pooled), soft Dice, sensitivity and specificity over breast pixels;
* calcification level: share of ground-truth calcifications touched by a prediction, and
  predicted calcifications (components) touching none, per image;
* cluster FROC: a predicted cluster is a true positive when its centroid lies in a
  ground-truth cluster region; sensitivity at 0.25, 0.5, 1, 2, 4 false positives per image.

Speed, on this CPU (no GPU is lent to this task): the measured whole-image time of the dense
cascade, and dense against naive (every patch cut out and classified on its own) on a small
crop, extrapolated to the whole breast.

Writes benchmarks/results/microcalc_image.json.
    .venv/bin/python benchmarks/bench_microcalc_image.py [--seeds 1010,1017,1000,1002]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_ai.networks.bundle import load_bundle  # noqa: E402
from dicom_ai.data.metrics import froc, segmentation_summary  # noqa: E402
from dicom_ai.networks.microcalc import MicrocalcModel, sliding_window_logits  # noqa: E402
from dicom_ai.data.phantom import generate_study  # noqa: E402
from dicom_ai.imaging import read_mammogram, resize  # noqa: E402
from dicom_ai.training.microcalc import microcalcification_mask  # noqa: E402

def _labels(mask: np.ndarray) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))


def speed_on_crop(model: MicrocalcModel, image: np.ndarray, centre: tuple[int, int], side: int = 96) -> dict:
    """Dense vs naive per-position time of both networks on a ``side`` px working-grid crop."""
    p = model.config.patch_size
    half = p // 2
    r, c = centre
    padded = np.pad(image, half + side)
    crop = padded[r + side:r + side + side + 2 * half, c + side:c + side + side + 2 * half]
    x = torch.from_numpy(np.ascontiguousarray(crop))[None, None]
    out = {}
    with torch.no_grad():
        for role, net, stride in (("detector", model.detector, model.config.detector_stride),
                                  ("segmentator", model.segmentator, 1)):
            net.dense_logits(x, stride)  # warm-up
            t0 = time.perf_counter()
            dense = net.dense_logits(x, stride)
            t1 = time.perf_counter()
            naive = sliding_window_logits(net, x, stride, batch=512)
            t2 = time.perf_counter()
            positions = dense.shape[-1] * dense.shape[-2]
            diff = (torch.softmax(dense, 1) - torch.softmax(naive, 1)).abs().max()
            out[role] = {"stride": stride, "positions": positions, "dense_s": t1 - t0, "naive_s": t2 - t1,
                         "dense_s_per_position": (t1 - t0) / positions, "naive_s_per_position": (t2 - t1) / positions,
                         "speed_up": (t2 - t1) / max(t1 - t0, 1e-9), "max_abs_prob_diff": float(diff)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="microcalc")
    ap.add_argument("--seeds", default="1010,1017,1000,1002", help="held-out phantom study seeds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "microcalc_image.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    model = MicrocalcModel.from_bundle(bundle, "cpu")
    thr = model.calcification_threshold

    per_image, detections, truth_clusters, preds, truths = [], [], [], [], []
    tp = fp = fn = tn = 0
    crop_speed = None
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        t_gen = time.perf_counter()
        study = generate_study(seed, shape=(3328, 2560))
        t_gen = time.perf_counter() - t_gen
        for img in study.images:
            mg = read_mammogram(img.dataset)
            gt = microcalcification_mask(img.masks, mg.spacing_mm[0])
            breast = np.asarray(img.breast_mask, dtype=bool)
            res = model.analyse(mg)
            prob = res.calcification
            pred = (prob >= thr) & breast
            g = gt & breast
            i_tp, i_fp, i_fn = int(np.sum(pred & g)), int(np.sum(pred & ~g)), int(np.sum(~pred & g))
            tp, fp, fn = tp + i_tp, fp + i_fp, fn + i_fn
            tn += int(np.sum(~pred & ~g & breast))
            # Breast bounding box only, to keep the maps of all images in memory.
            rb, cb = np.flatnonzero(breast.any(1)), np.flatnonzero(breast.any(0))
            box = (slice(rb[0], rb[-1] + 1), slice(cb[0], cb[-1] + 1))
            preds.append(np.where(breast, prob, 0.0)[box].astype(np.float32))
            truths.append(g[box])
            # Calcification (object) level.
            gt_lab, pred_lab = _labels(g), _labels(pred)
            n_gt_obj = int(gt_lab.max())
            hit_obj = len(np.unique(gt_lab[pred & (gt_lab > 0)]))
            n_pred_obj = int(pred_lab.max())
            fp_obj = n_pred_obj - len(np.unique(pred_lab[g & (pred_lab > 0)]))
            # Clusters: (score, row, column) per predicted cluster vs the truth cluster regions.
            cl_truth = img.masks["cluster_benign"] | img.masks["cluster_malignant"]
            truth_clusters.append(cl_truth)
            detections.append([(c.score, c.centroid[0], c.centroid[1]) for c in res.clusters])
            n_img_clusters = int(_labels(cl_truth).max())
            per_image.append({
                "seed": seed, "view": f"{img.laterality}-{img.view}", "gt_calcification_px": int(g.sum()),
                "dice": (2 * i_tp / (2 * i_tp + i_fp + i_fn)) if g.any() else None,
                "false_positive_px": i_fp, "gt_calcifications": n_gt_obj, "gt_calcifications_hit": hit_obj,
                "predicted_calcifications": n_pred_obj, "false_positive_calcifications": fp_obj,
                "gt_clusters": n_img_clusters, "predicted_clusters": len(res.clusters),
                "cluster_scores": [round(c.score, 3) for c in res.clusters],
                "seconds": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.timings_s.items()},
                "segmentator_fraction": round(res.detector_fraction, 4), "phantom_generation_s": round(t_gen, 1),
            })
            print(json.dumps(per_image[-1]), flush=True)
            if crop_speed is None and (g.any() or seed == seeds[-1]):
                # The crop is centred on a calcification, on the 0.05 mm working grid.
                r_idx, c_idx = np.flatnonzero(breast.any(1)), np.flatnonzero(breast.any(0))
                r0, c0 = r_idx[0], c_idx[0]
                shape = res.timings_s["working_shape"]
                work = resize(mg.pixels[r0:r_idx[-1] + 1, c0:c_idx[-1] + 1], tuple(shape))
                gr, gc = np.argwhere(g)[0] if g.any() else np.argwhere(breast).mean(0).astype(int)
                f = mg.spacing_mm[0] / model.config.pixel_spacing_mm
                crop_speed = speed_on_crop(model, work, (int((gr - r0) * f), int((gc - c0) * f)))

    seg = segmentation_summary(preds, truths, threshold=thr)
    froc_result = froc(detections, truth_clusters)
    n_images = len(per_image)
    work_px = float(np.mean([np.prod(im["seconds"]["working_shape"]) for im in per_image]))
    seg_fraction = float(np.mean([im["segmentator_fraction"] for im in per_image]))
    det = crop_speed["detector"]
    seg_speed = crop_speed["segmentator"]
    det_positions = work_px / model.config.detector_stride**2
    extrapolated = {
        "working_grid_pixels_mean": work_px,
        "dense_cascade_s": det_positions * det["dense_s_per_position"] + seg_fraction * work_px * seg_speed["dense_s_per_position"],
        "naive_cascade_s": det_positions * det["naive_s_per_position"] + seg_fraction * work_px * seg_speed["naive_s_per_position"],
        "naive_segmentator_every_pixel_s": work_px * seg_speed["naive_s_per_position"],
    }
    measured = [im["seconds"]["total"] for im in per_image]
    result = {
        "benchmark": "microcalc_image",
        "bundle": {"name": bundle.manifest["name"], "version": bundle.manifest["version"],
                   "architecture": bundle.manifest["architecture"]},
        "held_out_seeds": seeds, "images": n_images, "image_shape": [3328, 2560], "spacing_mm": 0.07,
        "device": "cpu: no GPU is lent to this task", "cpu": platform.processor() or platform.machine(),
        "torch_threads": args.threads, "calcification_threshold": thr,
        "pixel": {"dice_mean_over_images_with_calcifications": seg.mean_dice, "iou_mean": seg.mean_iou,
                  "soft_dice_mean": seg.mean_soft_dice, "images_with_calcifications": seg.n_images,
                  "dice_pooled": seg.pooled_dice, "sensitivity": tp / max(tp + fn, 1),
                  "specificity": tn / max(tn + fp, 1), "false_positive_px_per_image": fp / n_images,
                  "false_positive_px_per_image_without_calcifications": seg.false_positive_area_px,
                  "convention": "dicom_ai.metrics.segmentation_summary on the source grid, breast pixels"},
        "calcification_level": {
            "sensitivity": sum(im["gt_calcifications_hit"] for im in per_image) / max(sum(im["gt_calcifications"] for im in per_image), 1),
            "false_positives_per_image": sum(im["false_positive_calcifications"] for im in per_image) / n_images},
        "cluster_froc": {"sensitivity_at_fp_per_image": {str(k): v for k, v in froc_result.sensitivity_at.items()},
                         "mean_sensitivity": froc_result.mean_sensitivity, "ground_truth_clusters": froc_result.n_regions,
                         "images": froc_result.n_images, "fp_per_image": froc_result.fp_per_image.tolist(),
                         "sensitivity": froc_result.sensitivity.tolist(),
                         "convention": "dicom_ai.metrics.froc: TP when the cluster centroid lies in a truth cluster region"},
        "speed": {"whole_image_dense_cascade_s": {"mean": float(np.mean(measured)), "max": float(np.max(measured))},
                  "crop": crop_speed, "extrapolated_full_image": extrapolated,
                  "note": "shared 2-core CPU under load from other jobs; times vary with that load"},
        "per_image": per_image,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    px, fr = result["pixel"], result["cluster_froc"]
    print(f"\npixel: Dice {px['dice_mean_over_images_with_calcifications']:.3f} (pooled {px['dice_pooled']:.3f}), "
          f"sensitivity {px['sensitivity']:.3f}, specificity {px['specificity']:.6f}")
    print("cluster FROC sensitivity at FP/image: " + ", ".join(
        f"{k}: {v:.2f}" for k, v in fr["sensitivity_at_fp_per_image"].items()) + f" (GT clusters {fr['ground_truth_clusters']})")
    print(f"whole image (dense cascade, measured): mean {np.mean(measured):.1f} s")
    print(f"{'network':>12} {'dense s/pos':>12} {'naive s/pos':>12} {'speed-up':>9}")
    for role in ("detector", "segmentator"):
        s = crop_speed[role]
        print(f"{role:>12} {s['dense_s_per_position']:12.2e} {s['naive_s_per_position']:12.2e} {s['speed_up']:9.1f}")
    print(f"extrapolated full image: dense {extrapolated['dense_cascade_s']:.1f} s, naive cascade "
          f"{extrapolated['naive_cascade_s']:.0f} s, naive Segmentator on every pixel "
          f"{extrapolated['naive_segmentator_every_pixel_s']:.0f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
