"""Inference time and peak memory of the discriminative U-Net per four-view study, on this CPU.

One full-size phantom study (3328 x 2560 at 0.07 mm, four views) is written as DICOM files;
each configuration then runs in a fresh child process that reads the files, decodes and
preprocesses them (``read_mammogram``), runs the network and maps the malignancy map back to
the source grid (``DUNetModel.predict``). Peak memory is the child's maximum resident set
size (VmHWM), reported in total and above the level reached after imports and model
loading. Configurations: the shipped bundle (models/dunet, compact, 256 x 192) and the
paper's 1536 x 1536 configuration with random weights (the cost of the paper's scale).

No GPU is lent to this task; the CPU numbers are from a 2-core machine shared with other
jobs (the load average is recorded), so treat them as upper bounds.

    .venv/bin/python benchmarks/bench_dunet_inference.py [--threads 1] [--shape 3328 2560]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("bundle", "paper")


def _hwm_kib() -> int:
    """Peak resident set size of this process image (VmHWM), in KiB.

    Not ``ru_maxrss``: Linux carries the parent's high-water mark across fork + exec, so a child
    of the (large) phantom-generating parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(spec: str, folder: str, threads: int) -> dict:
    import numpy as np
    import pydicom
    import torch

    from dicom_ai.networks.bundle import load_bundle
    from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig, DUNetModel
    from dicom_ai.core.findings import ModelIdentity
    from dicom_ai.imaging import read_mammogram

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if spec == "bundle":
        model = DUNetModel.from_bundle(load_bundle("dunet"), "cpu")
    else:
        torch.manual_seed(0)
        model = DUNetModel(DiscriminativeUNet(DUNetConfig.paper()), ModelIdentity("dunet-paper-random", "0"))
    load_s = time.perf_counter() - t0
    base_kib = _hwm_kib()
    per_image = []
    started = time.perf_counter()
    for path in sorted(Path(folder).glob("*.dcm")):
        t = time.perf_counter()
        mammogram = read_mammogram(pydicom.dcmread(path))
        t_read = time.perf_counter() - t
        out = model.predict(mammogram)
        per_image.append({"file": path.name, "read_s": round(t_read, 3),
                          "predict_s": round(time.perf_counter() - t - t_read, 3),
                          "map_shape": list(out.maps[0].probability.shape),
                          "score": round(out.scores[0].value, 4)})
        assert out.maps[0].probability.shape == mammogram.shape and np.isfinite(out.maps[0].probability).all()
    peak_kib = _hwm_kib()
    return {
        "config": spec,
        "input_shape": list(model.config.input_shape),
        "parameters": sum(p.numel() for p in model.network.parameters()),
        "model_load_s": round(load_s, 3),
        "study_s": round(time.perf_counter() - started, 3),
        "per_image": per_image,
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "peak_rss_above_loaded_model_mib": round((peak_kib - base_kib) / 1024, 1),
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shape", type=int, nargs=2, default=[3328, 2560], help="phantom rows cols")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.folder, args.threads)))
        return 0

    from dicom_ai.data.phantom import generate_study

    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        t = time.time()
        study = generate_study(7, shape=tuple(args.shape), normal=False)
        for im in study.images:
            im.dataset.save_as(os.path.join(folder, f"{im.laterality}_{im.view}.dcm"), enforce_file_format=True)
        generate_s = time.time() - t
        results = []
        for spec in args.configs:
            proc = subprocess.run([sys.executable, __file__, "--child", spec, "--folder", folder,
                                   "--threads", str(args.threads)], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{spec} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            images = ", ".join(f"{p['read_s'] + p['predict_s']:.1f}" for p in r["per_image"])
            print(f"{spec:7s} input {r['input_shape']}: {r['study_s']:.1f} s per four-view study "
                  f"({images} s per image), "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB ({r['peak_rss_above_loaded_model_mib']:.0f} MiB above the "
                  f"loaded model)", flush=True)
    result = {
        "benchmark": "dunet_inference",
        "study": {"source_shape": list(args.shape), "views": 4, "phantom_seed": 7,
                  "phantom_generation_s": round(generate_s, 1)},
        "results": results,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average_at_end": os.getloadavg(), "gpu": "none lent to this task (not measured)"},
        "note": "CPU shared with other jobs; per-study time includes DICOM decoding, preprocessing "
                "(breast mask, crop, resize), the network and the inverse map to the source grid",
        "seconds": round(time.time() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "dunet_inference.json"
    if path.is_file() and set(args.configs) != set(CONFIGS):
        # A partial run (--configs) keeps the other configurations' earlier results.
        earlier = json.loads(path.read_text()).get("results", [])
        result["results"] = [r for r in earlier if r["config"] not in args.configs] + results
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'dunet_inference.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
