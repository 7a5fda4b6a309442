"""Where the microcalcification model's CPU time goes on the full-size phantom study.

Per view of ``bench_turnaround.py``'s four-view study (3328 x 2560, 0.07 mm, seed 1010), with the
shipped bundle as the node builds it (``model_from_bundle`` on the CPU: ONNX Runtime), at the
default operating point and at ``phantom``: seconds of each part of ``MicrocalcModel.analyse``
(working grid, Detector, Segmentator, cluster stage, maps back to the source grid), how many
512 px Detector tiles hold breast (and of those, how many fire), fired Detector patches, and
the working-grid pixels the Segmentator computes (its tiles or strips). The networks' work is the same at both points (their thresholds
are the cascade's own); only the cluster stage's thresholds differ.

Also, per view, right after the node's path: the whole cascade with the Segmentator on 32 px
tiles (``seg_strip=0``; its Detector on strips) and the Detector on 512 px tiles (the paths
before the strips): seconds, and whether maps (Segmentator) and breast points (Detector) are bit
for bit equal. Tiles before strips = tiled_detector_s + tiled_segmentator_cascade_s - detector_s.

Writes benchmarks/results/microcalc_profile.json and prints a table.
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

from dicom_ai.data.phantom import generate_study  # noqa: E402
from dicom_ai.imaging import read_mammogram  # noqa: E402
from dicom_ai.networks.bundle import load_bundle  # noqa: E402
from dicom_ai.networks.microcalc import MicrocalcModel  # noqa: E402
from dicom_ai.networks.registry import model_from_bundle  # noqa: E402
from dicom_ai.node.processing import CPU_TORCH_THREADS  # noqa: E402

SHAPE = (3328, 2560)
SEED = 1010


def profile_view(model: MicrocalcModel, mg) -> dict:
    """Seconds per part and tile counts of one ``analyse`` call, by the same calls it makes."""
    cfg, s = model.config, model.config.detector_stride
    t0 = time.perf_counter()
    mask = mg.breast_mask
    image, work_mask, box = model.working_grid(mg, mask)
    t1 = time.perf_counter()
    det = model.detector_map(image, work_mask, breast_only=True)
    t2 = time.perf_counter()
    tile = cfg.tile - cfg.tile % s
    rows, cols = image.shape
    tiles = [(r, c) for r in range(0, rows, tile) for c in range(0, cols, tile)]
    breast_tiles = [(r, c) for r, c in tiles if work_mask[r:r + tile, c:c + tile].any()]
    grid_mask = work_mask[::s, ::s][:det.shape[0], :det.shape[1]]
    fired = (det >= cfg.detector_threshold) & grid_mask
    fired_tiles = sum(bool(fired[r // s:(r + tile) // s, c // s:(c + tile) // s].any()) for r, c in breast_tiles)
    # The Segmentator: the whole dense_cascade minus its Detector (timed again, same input).
    t3 = time.perf_counter()
    prob, fired_fraction = model.dense_cascade(image, work_mask)
    t4 = time.perf_counter()
    computed = model.last_stats["segmentator_pixels"]
    det_again = model.last_stats.get("detector_s")
    # The tiled Detector and Segmentator (before the strips) on the same view, for a same-run comparison.
    t5 = time.perf_counter()
    tiled, _ = model.dense_cascade(image, work_mask, seg_strip=0)
    t6 = time.perf_counter()
    computed_tiles = model.last_stats["segmentator_pixels"]
    det_tiles = model.detector_map(image, work_mask)
    t7 = time.perf_counter()
    return {"working_shape": list(image.shape), "breast_fraction": round(float(work_mask.mean()), 4),
            "detector_tiles": len(tiles), "detector_tiles_breast": len(breast_tiles),
            "detector_tiles_fired": int(fired_tiles),
            "detector_breast_points": int(grid_mask.sum()), "detector_fired_points": int(fired.sum()),
            "segmentator_pixels": int(computed), "fired_breast_fraction": round(fired_fraction, 4),
            "working_grid_s": t1 - t0, "detector_s": t2 - t1, "cascade_s": t4 - t3,
            "segmentator_s": (t4 - t3) - (t2 - t1),
            "tiled_segmentator_cascade_s": t6 - t5, "tiled_detector_s": t7 - t6,
            "detector_strips_equal_tiles": bool(np.array_equal(det[grid_mask], det_tiles[:det.shape[0], :det.shape[1]][grid_mask])), "tiled_segmentator_pixels": int(computed_tiles),
            "strips_equal_tiles": bool(np.array_equal(prob, tiled)), "_prob": prob, "_image": image, "_box": box,
            "_det_again": det_again}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "microcalc_profile.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(CPU_TORCH_THREADS)
    started = time.perf_counter()
    study = generate_study(SEED, shape=SHAPE, normal=False)
    mammograms = [read_mammogram(im.dataset) for im in study.images[:args.images]]
    models = {point: model_from_bundle(load_bundle("microcalc", operating_point=point), "cpu")
              for point in ("", "phantom")}
    views = []
    for i, mg in enumerate(mammograms):
        v = profile_view(models[""], mg)
        prob, image, (r0, r1, c0, c1) = v.pop("_prob"), v.pop("_image"), v.pop("_box")
        v.pop("_det_again")
        sr, sc = (float(x) for x in mg.spacing_mm)
        for point, model in models.items():
            t = time.perf_counter()
            clusters = model._clusters(prob, (sr, sc), (r0, c0), image)
            v[f"clusters_s[{point or 'default'}]"] = time.perf_counter() - t
            v[f"clusters[{point or 'default'}]"] = len(clusters)
            v[f"clusters_above_threshold[{point or 'default'}]"] = sum(c.score >= model.cluster_threshold for c in clusters)
        t = time.perf_counter()
        result = models["phantom"].analyse(mg)
        v["analyse_s[phantom]"] = time.perf_counter() - t
        v["analyse_timings[phantom]"] = {k: (round(x, 3) if isinstance(x, float) else x) for k, x in result.timings_s.items()}
        v = {k: (round(x, 3) if isinstance(x, float) else x) for k, x in v.items()}
        views.append(v)
        print(json.dumps(v), flush=True)
    keys = ["working_grid_s", "detector_s", "segmentator_s", "cascade_s", "tiled_segmentator_cascade_s", "tiled_detector_s", "clusters_s[default]",
            "clusters_s[phantom]"]
    totals = {k: round(sum(v[k] for v in views), 2) for k in keys}
    result = {"benchmark": "microcalc_profile", "study": {"seed": SEED, "shape": list(SHAPE), "images": len(views)},
              "engine": models[""].engine, "torch_threads": torch.get_num_threads(), "views": views, "totals_s": totals,
              "loadavg_1min": round(os.getloadavg()[0], 2), "wall_s": round(time.perf_counter() - started, 1),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'view':>4} {'grid s':>7} {'det s':>6} {'seg s':>6} {'clu s d/p':>10} {'det tiles brst/fired/all':>25} "
          f"{'fired pts':>10} {'seg px':>9}")
    for i, v in enumerate(views):
        print(f"{i:>4} {v['working_grid_s']:>7.2f} {v['detector_s']:>6.2f} {v['segmentator_s']:>6.2f} "
              f"{v['clusters_s[default]']:>4.2f}/{v['clusters_s[phantom]']:<5.2f} "
              f"{v['detector_tiles_breast']:>9}/{v['detector_tiles_fired']}/{v['detector_tiles']:<8} "
              f"{v['detector_fired_points']:>7}/{v['detector_breast_points']:<7} {v['segmentator_pixels']:>9}")
    print("totals", totals, "strips == tiles on every view:", all(v["strips_equal_tiles"] for v in views),
          "Detector strips == tiles on breast points:", all(v["detector_strips_equal_tiles"] for v in views))
    return 0


if __name__ == "__main__":
    sys.exit(main())
