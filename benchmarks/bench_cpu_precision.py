"""bf16 on the CPU against fp32, per model: marks within bench_gpu.py's tolerances? faster?

For each shipped model, on the four views of a full-size (3328 x 2560) phantom study
(``bench_turnaround.py``'s, seed 1010) at operating point ``phantom`` (every map on):

* **fp32**: the model as the node runs it today (``model_from_bundle`` on the CPU: the
  microcalcification patch CNNs in ONNX Runtime, the others in torch). This is the reference.
* **bf16**: what ``pipeline.precision = "bf16"`` runs for an accepted bundle
  (:func:`dicom_ai.networks.engine.cpu_bf16_plan`): ``torch.autocast("cpu", bfloat16)`` with
  the networks in channels-last; the microcalcification cascade instead runs its gated path
  (``MicrocalcModel.set_precision("bf16-gated")``: both networks in bf16, Detector patches near
  firing and Segmentator tiles near the floor the marks read again in float32 by ONNX Runtime;
  margins from ``bench_microcalc_precision.py``).

Per map and image: max |dp|, agreement at the threshold on breast pixels, region counts,
|d score| (``bench_gpu.compare``), against ``bench_gpu.TOLERANCES``. Times: fp32 and bf16 on the
same image one after the other (the first image warms both up and is not timed); the speed
ratio is the median over images of fp32 seconds / bf16 seconds. A model is **accepted** when
every image is within the tolerances with the same region counts, bf16 changes its output at
all (``NO_EFFECT``: GLAM turns autocast off on the CPU) and the speed ratio is at least
``MIN_SPEED_RATIO``; ``engine.BF16_CPU_ACCEPTED`` must list exactly the accepted bundle
versions (``table_agrees``). torch runs at the node's CPU thread count (``CPU_TORCH_THREADS``).

Writes benchmarks/results/cpu_precision.json and prints a table. Takes a few minutes (the
microcalcification model dominates); run it at normal priority, the load is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench_gpu import TOLERANCES, compare  # noqa: E402
from dicom_ai.data.phantom import generate_study  # noqa: E402
from dicom_ai.imaging import read_mammogram  # noqa: E402
from dicom_ai.networks import engine  # noqa: E402
from dicom_ai.networks.bundle import load_bundle  # noqa: E402
from dicom_ai.networks.registry import model_from_bundle  # noqa: E402
from dicom_ai.node.processing import CPU_TORCH_THREADS  # noqa: E402

SHAPE = (3328, 2560)
SEED = 1010
#: A largest probability or score change below this: bf16 changed nothing (the model keeps fp32).
NO_EFFECT = 1e-4
#: bf16 must be at least this much faster than fp32 (timing noise here is about 5-10 %).
MIN_SPEED_RATIO = 1.1


def candidates(name: str, operating_point: str):
    """(fp32 model as the node runs it, bf16 candidate model, the candidate's engine note)."""
    bundle = load_bundle(name, operating_point=operating_point)
    fp32 = model_from_bundle(bundle, "cpu")
    if name == "microcalc":
        # Its own gated path (cpu_bf16_plan calls set_precision("bf16-gated")): bf16 networks in
        # torch, every decision the marks depend on again in float32 by the node's engine.
        bf16 = model_from_bundle(bundle, "cpu")
        note = f"fp32: engine {fp32.engine}; bf16: gated (bf16 torch networks, float32 {bf16.engine} where it decides)"
    else:
        bf16 = model_from_bundle(bundle, "cpu")
        note = "torch under autocast" + (" (glam.py turns autocast off on the CPU: no bf16 effect)"
                                         if name == "glam" else "")
    chosen, why = engine.cpu_bf16_plan([bf16], "bf16", "cpu", accepted={name: bf16.identity.version}, native=True)
    if id(bf16) not in chosen:
        raise SystemExit(f"{name}: the bf16 plan refuses the candidate: {why}")
    return fp32, bf16, note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dunet,glam,microcalc")
    parser.add_argument("--operating-point", default="phantom")
    parser.add_argument("--images", type=int, default=4, help="views of the study to use (first one warms up)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cpu_precision.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(CPU_TORCH_THREADS)
    started = time.perf_counter()
    study = generate_study(SEED, shape=SHAPE, normal=False)
    mammograms = [read_mammogram(im.dataset) for im in study.images[:args.images]]
    per_model = {}
    for name in args.models.split(","):
        fp32, bf16, note = candidates(name, args.operating_point)
        rows, seconds = [], {"fp32": [], "bf16": []}
        for i, mg in enumerate(mammograms):
            with torch.inference_mode():
                t = time.perf_counter()
                reference = fp32.predict(mg)
                t_fp32 = time.perf_counter() - t
                t = time.perf_counter()
                with engine.bf16_autocast(True):
                    candidate = bf16.predict(mg)
                t_bf16 = time.perf_counter() - t
            if i:
                seconds["fp32"].append(t_fp32)
                seconds["bf16"].append(t_bf16)
            for r in compare(reference, candidate, mg.breast_mask):
                rows.append({"image": i, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}})
            print(f"{name} image {i}: fp32 {t_fp32:.2f} s, bf16 {t_bf16:.2f} s", flush=True)
        within = {
            "max_abs_probability": max(r["max_abs_probability"] for r in rows) <= TOLERANCES["max_abs_probability"],
            "min_binary_agreement": min(r["binary_agreement"] for r in rows) >= TOLERANCES["min_binary_agreement"],
            "max_abs_score": max(r["max_abs_score"] for r in rows) <= TOLERANCES["max_abs_score"],
            "same_region_counts": all(r["regions_fp32"] == r["regions_bf16"] for r in rows),
        }
        ratio = statistics.median(a / b for a, b in zip(seconds["fp32"], seconds["bf16"])) if seconds["fp32"] else None
        # bf16 must change the arithmetic at all (else the model ignores the autocast), and win by
        # more than this shared machine's timing noise.
        effect = (max(r["max_abs_probability"] for r in rows) > NO_EFFECT
                  or max(r["max_abs_score"] for r in rows) > NO_EFFECT)
        accepted = all(within.values()) and effect and ratio is not None and ratio >= MIN_SPEED_RATIO
        per_model[name] = {
            "version": bf16.identity.version, "paths": note, "checks": within, "within_tolerance": all(within.values()),
            "worst": {"max_abs_probability": max(r["max_abs_probability"] for r in rows),
                      "min_binary_agreement": min(r["binary_agreement"] for r in rows),
                      "max_abs_score": max(r["max_abs_score"] for r in rows)},
            "seconds": {k: [round(v, 3) for v in vs] for k, vs in seconds.items()},
            "speed_ratio_fp32_over_bf16": round(ratio, 3) if ratio is not None else None,
            "bf16_has_effect": effect, "accepted": accepted, "in_engine_table": engine.BF16_CPU_ACCEPTED.get(name) == bf16.identity.version,
            "maps": rows,
        }
    result = {
        "benchmark": "cpu_precision", "study": {"seed": SEED, "shape": list(SHAPE), "images": len(mammograms)},
        "operating_point": args.operating_point, "tolerances": TOLERANCES,
        "cpu": platform.processor() or platform.machine(), "native_bf16": engine.cpu_has_native_bf16(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "models": per_model,
        "table_agrees": all(v["accepted"] == v["in_engine_table"] for v in per_model.values()),
        "loadavg_1min": round(os.getloadavg()[0], 2), "wall_s": round(time.perf_counter() - started, 1),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<10} {'max|dp|':>8} {'agree':>8} {'|dscore|':>9} {'regions':>8} {'fp32/bf16':>10} effect accepted")
    for name, v in per_model.items():
        w = v["worst"]
        print(f"{name:<10} {w['max_abs_probability']:>8.4f} {w['min_binary_agreement']:>8.5f} {w['max_abs_score']:>9.4f} "
              f"{'same' if v['checks']['same_region_counts'] else 'DIFFER':>8} {v['speed_ratio_fp32_over_bf16']!s:>10} "
              f"{v['bf16_has_effect']!s:>6} {v['accepted']}")
    print(f"engine.BF16_CPU_ACCEPTED agrees: {result['table_agrees']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
