"""The GPU path: bf16 autocast + channels-last against fp32, times per model and per study, and the
ratio of the model time to the compute floor.

On a CUDA host (``--device cuda``, the default when one is present), for full-size (3328 x 2560)
four-view phantom studies:

1. **Tolerances.** Every model runs each image twice: fp32 (autocast off, contiguous) and
   bf16 (``torch.autocast(dtype=torch.bfloat16)`` with the networks in channels-last). Per
   model and map: the largest absolute probability difference, the fraction of breast pixels
   on which the two agree at the bundle's threshold, the regions (8-connected, as the writers
   find them) in each, and the largest image-score difference, against :data:`TOLERANCES`.
   GLAM turns bf16 autocast on by itself on a GPU (``dicom_ai/networks/glam.py``), so its fp32
   reference is the same bundle run on the CPU.
2. **Times.** Per model (bf16, after one warm-up image) and end to end per study in this process:
   decode (``read_mammogram``) + the pipeline + every result object (``build_results``).
   The network part of a turnaround (ingest, delivery) is the CPU's: ``bench_turnaround.py``.
3. **Compute floor.** FLOPs of each model on the study (``compute_floor.model_flops``) over the
   bf16 matrix-multiply rate measured on the same GPU in this run; ``ratio`` = bf16 model time /
   floor (target <= 3).

Runs in well under 8 minutes on one GPU (two studies). ``--device cpu --quick`` runs the same
code on two small synthetic images on the CPU in seconds (the unit test's smoke run; on the CPU
autocast bf16 is oneDNN's, and GLAM stays fp32 in both variants).

Writes benchmarks/results/gpu.json (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from compute_floor import matmul_rate, model_flops  # noqa: E402

#: What bf16 may change, per map (probabilities in [0, 1]); a model outside them is reported
#: as failing, not hidden. Agreement is over breast pixels at the bundle's threshold.
TOLERANCES = {"max_abs_probability": 0.05, "min_binary_agreement": 0.999, "max_abs_score": 0.02}
SHAPE = (3328, 2560)


def _networks(model) -> list[torch.nn.Module]:
    return [m for m in (getattr(model, "network", None), getattr(model, "detector", None),
                        getattr(model, "segmentator", None)) if isinstance(m, torch.nn.Module)]


@contextlib.contextmanager
def precision(models, device: torch.device, mode: str):
    """fp32 (autocast off, contiguous) or bf16 (autocast on, channels-last networks on a GPU;
    on the CPU channels-last is left out: glam.py keeps its CPU network contiguous)."""
    fmt = torch.channels_last if mode == "bf16" and device.type == "cuda" else torch.contiguous_format
    for model in models:
        for net in _networks(model):
            net.to(memory_format=fmt)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_models(device: torch.device):
    from dicom_ai.networks.bundle import load_bundle
    from dicom_ai.networks.microcalc import MicrocalcModel
    from dicom_ai.networks.pipeline import DEFAULT_MODELS
    from dicom_ai.networks.registry import model_from_bundle

    # The microcalc model's torch engine: the one a GPU runs and the reference engine on the CPU.
    return [MicrocalcModel.from_bundle(load_bundle(n), device, engine="torch") if n == "microcalc"
            else model_from_bundle(load_bundle(n), device) for n in DEFAULT_MODELS]


def studies(count: int, quick: bool):
    """Per study: the source data sets and their Mammograms."""
    from dicom_ai.data.phantom import generate_study
    from dicom_ai.imaging import mammogram_from_array, read_mammogram

    out = []
    for k in range(count):
        if quick:
            # Two small views, called 0.07 mm so the microcalcification grid (0.05 mm) stays small.
            study = generate_study(100 + k, shape=(256, 200), normal=False)
            images = study.images[:2]
            mammograms = [mammogram_from_array(im.pixels, im.laterality, im.view, (0.07, 0.07)) for im in images]
            for m, im in zip(mammograms, images):
                m.sop_instance_uid = str(im.dataset.SOPInstanceUID)
            out.append(([im.dataset for im in images], mammograms))
        else:
            study = generate_study(1010 + k, shape=SHAPE, normal=False)
            datasets = [im.dataset for im in study.images]
            out.append((datasets, [read_mammogram(ds) for ds in datasets]))
    return out


def _regions(binary: np.ndarray) -> int:
    if not binary.any():
        return 0
    image = sitk.ConnectedComponent(sitk.GetImageFromArray(binary.astype(np.uint8)), True)
    return int(sitk.GetArrayViewFromImage(image).max())


def compare(reference, candidate, breast: np.ndarray) -> list[dict]:
    """Per map of two ModelOutputs of one image: the differences :data:`TOLERANCES` bound."""
    rows = []
    for a, b in zip(reference.maps, candidate.maps):
        binary_a, binary_b = a.probability >= a.threshold, b.probability >= b.threshold
        agree = float(np.mean(binary_a[breast] == binary_b[breast])) if breast.any() else 1.0
        rows.append({"finding": a.finding, "max_abs_probability": float(np.max(np.abs(a.probability - b.probability))),
                     "binary_agreement": agree, "regions_fp32": _regions(binary_a), "regions_bf16": _regions(binary_b)})
    score = max([abs(x.value - y.value) for x, y in zip(reference.scores, candidate.scores)] or [0.0])
    for r in rows:
        r["max_abs_score"] = score
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="two small synthetic images (a smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu.json")
    args = parser.parse_args(argv)
    from dicom_ai.core.options import ResultOptions
    from dicom_ai.core.uids import ResultUIDs
    from dicom_ai.networks.pipeline import Pipeline
    from dicom_ai.results import build_results

    device = torch.device(args.device)
    started_all = time.perf_counter()
    count = 1 if args.quick else args.studies
    data = studies(count, args.quick)
    models = load_models(device)
    glam_cpu = None
    if device.type == "cuda":
        from dicom_ai.networks.bundle import load_bundle
        from dicom_ai.networks.registry import model_from_bundle
        glam_cpu = model_from_bundle(load_bundle("glam"), "cpu")

    # 1. fp32 vs bf16 on every image; times of the bf16 run (the first image warms up).
    checks: dict[str, list[dict]] = {}
    times: dict[str, dict[str, list[float]]] = {"fp32": {}, "bf16": {}}
    for mode in ("fp32", "bf16"):
        outputs = {}
        for s, (_, mammograms) in enumerate(data):
            for i, mg in enumerate(mammograms):
                for model in models:
                    with precision(models, device, mode):
                        _sync(device)
                        t = time.perf_counter()
                        if mode == "fp32" and glam_cpu is not None and model.identity.name == "glam":
                            out = glam_cpu.predict(mg)
                        else:
                            out = model.predict(mg)
                        _sync(device)
                        elapsed = time.perf_counter() - t
                    if s or i:  # not the warm-up image
                        times[mode].setdefault(model.identity.name, []).append(elapsed)
                    outputs[(s, i, model.identity.name)] = out
        if mode == "fp32":
            reference = outputs
    for (s, i, name), out in outputs.items():
        breast = data[s][1][i].breast_mask
        checks.setdefault(name, []).extend(compare(reference[(s, i, name)], out, breast))
    tolerance = {}
    for name, rows in checks.items():
        worst = {"max_abs_probability": max(r["max_abs_probability"] for r in rows),
                 "min_binary_agreement": min(r["binary_agreement"] for r in rows),
                 "max_abs_score": max(r["max_abs_score"] for r in rows),
                 "same_region_counts": all(r["regions_fp32"] == r["regions_bf16"] for r in rows)}
        worst["within"] = (worst["max_abs_probability"] <= TOLERANCES["max_abs_probability"]
                           and worst["min_binary_agreement"] >= TOLERANCES["min_binary_agreement"]
                           and worst["max_abs_score"] <= TOLERANCES["max_abs_score"])
        tolerance[name] = {**worst, "maps": rows}

    # 2. End to end per study, bf16: decode + pipeline + result objects.
    from dicom_ai.imaging import read_mammogram  # noqa: F401  (decode is part of Pipeline.run)
    pipeline = Pipeline(models)
    end_to_end = []
    for s, (datasets, _) in enumerate(data):
        with precision(models, device, "bf16"):
            _sync(device)
            t = time.perf_counter()
            if args.quick:  # the small images' DICOM spacing is not the one they are run at: models only
                findings = None
                for mg in data[s][1]:
                    for model in models:
                        model.predict(mg)
            else:
                findings = pipeline.run(datasets)
            t_models = time.perf_counter() - t
            if findings is not None:
                uids = ResultUIDs.generate([str(ds.SOPInstanceUID) for ds in datasets])
                results = build_results(datasets, findings, uids, ResultOptions())
                objects = len(results.datasets)
            else:
                objects = 0
            _sync(device)
            end_to_end.append({"study": s, "seconds": round(time.perf_counter() - t, 3),
                               "pipeline_s": round(t_models, 3), "result_objects": objects})

    # 3. Compute floor: FLOPs of each model on the first study over the bf16 matmul rate.
    flops = model_flops(models, data[0][1])
    with torch.inference_mode():
        rate_bf16 = matmul_rate(device, torch.bfloat16, n=8192 if device.type == "cuda" else 1024, seconds=1.0)
        rate_fp32 = matmul_rate(device, torch.float32, n=8192 if device.type == "cuda" else 1024, seconds=1.0)
    images = len(data[0][1])
    per_model = {}
    for name, f in flops.items():
        floor = f / rate_bf16
        measured = float(np.mean(times["bf16"].get(name, [np.nan]))) * images
        # Four significant digits: the 0.8-mm U-Net costs only ~0.01 GFLOP on --quick's small views.
        per_model[name] = {"gflop_per_study": float(f"{f / 1e9:.4g}"), "floor_s": float(f"{floor:.4g}"),
                           "bf16_s_per_study": round(measured, 4), "fp32_s_per_study":
                           round(float(np.mean(times["fp32"].get(name, [np.nan]))) * images, 4),
                           "ratio": round(measured / floor, 2) if floor > 0 else None}
    total_floor = sum(v["floor_s"] for v in per_model.values())
    total_bf16 = sum(v["bf16_s_per_study"] for v in per_model.values())
    result = {
        "benchmark": "gpu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "quick": args.quick,
        "torch": torch.__version__,
        "studies": count,
        "images_per_study": images,
        "shape": [int(v) for v in data[0][1][0].shape],
        "tolerances": TOLERANCES,
        "bf16_vs_fp32": tolerance,
        "all_within_tolerance": all(v["within"] for v in tolerance.values()),
        "per_model": per_model,
        "models_floor_s_per_study": round(total_floor, 4),
        "models_bf16_s_per_study": round(total_bf16, 4),
        "ratio_to_floor": round(total_bf16 / total_floor, 2) if total_floor > 0 else None,
        "matmul_tflops": {"bf16": round(rate_bf16 / 1e12, 2), "fp32": round(rate_fp32 / 1e12, 2)},
        "end_to_end": end_to_end,
        "targets": {"turnaround_s_per_study": 2.0, "ratio_to_floor": 3.0},
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "wall_s": round(time.perf_counter() - started_all, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['device']}: {count} stud{'y' if count == 1 else 'ies'} of {images} images {result['shape']}")
    for name, v in tolerance.items():
        print(f"  {name:<10} bf16 vs fp32: max |dp| {v['max_abs_probability']:.4f}  agreement "
              f"{v['min_binary_agreement']:.5f}  |dscore| {v['max_abs_score']:.4f}  "
              f"{'within' if v['within'] else 'OUTSIDE'} tolerance")
    for name, v in per_model.items():
        print(f"  {name:<10} {v['gflop_per_study']:9.1f} GFLOP  floor {v['floor_s']:.4f} s  bf16 {v['bf16_s_per_study']:.3f} s"
              f"  fp32 {v['fp32_s_per_study']:.3f} s  ratio {v['ratio']}")
    for row in end_to_end:
        print(f"  study {row['study']}: {row['seconds']:.2f} s end to end ({row['pipeline_s']:.2f} s pipeline)")
    print(f"  matmul {result['matmul_tflops']} TFLOP/s; models {total_bf16:.3f} s vs floor {total_floor:.4f} s "
          f"-> {result['ratio_to_floor']} x; wall {result['wall_s']} s\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
