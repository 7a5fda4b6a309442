"""The images of one study one after another (as the worker runs them) or N at a time in threads:
wall time and peak RSS.

A full-size (3328 x 2560) four-view phantom study (seed 1010) through the shipped bundles at
operating point ``phantom`` (all three models on) on the CPU, torch at the node's thread count,
each image's findings added to a ``ResultsBuilder`` with its maps released, then the study's
objects built, as ``processing.run_into_builder`` does. Each mode runs in a fresh process (peak
RSS is the process's high-water mark, ``ru_maxrss``) after one warm-up image (ONNX sessions),
modes alternating per round. The issue's memory budget for the worker is 1 GB.

Writes benchmarks/results/parallel_images.json and prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
import torch  # noqa: E402

from dicom_ai.core.uids import ResultUIDs  # noqa: E402
from dicom_ai.data.phantom import generate_study  # noqa: E402
from dicom_ai.data.phantom_folder import write_study  # noqa: E402
from dicom_ai.networks.pipeline import Pipeline  # noqa: E402
from dicom_ai.node.config import load_config  # noqa: E402
from dicom_ai.node.processing import (CPU_TORCH_THREADS, release_freed_memory_promptly,  # noqa: E402
                                      result_options)
from dicom_ai.results import ResultsBuilder  # noqa: E402
from dicom_ai.results.sources import load_standard_tables  # noqa: E402

SEED = 1010
SHAPE = (3328, 2560)


def one_run(folder: Path, parallel: int) -> dict:
    """In this process: load as the worker does, warm up on one image, then the study."""
    release_freed_memory_promptly()
    load_standard_tables()
    torch.set_num_threads(CPU_TORCH_THREADS)
    pipeline = Pipeline.from_bundles(device="cpu", operating_point="phantom")
    sources = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    for ds in sources:
        ds.pixel_array  # decoded before the job, as the sandbox hands them over  # noqa: B018
    pipeline.run([sources[0]])
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    uids = ResultUIDs.generate([str(ds.SOPInstanceUID) for ds in sources])
    builder = ResultsBuilder(sources, uids, result_options(load_config(None)))
    if parallel <= 1:
        for ds in sources:
            for f in pipeline.run([ds]):
                builder.add(f, release_maps=True)
    else:
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            for findings in pool.map(lambda ds: pipeline.run([ds]), sources):
                for f in findings:
                    builder.add(f, release_maps=True)
    objects = len(builder.finish().datasets)
    return {"parallel": parallel, "wall_s": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_mb_after_warm_up": round(loaded, 1), "objects": objects}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=2, help="images at a time in the parallel mode")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child, args.parallel)))
        return 0
    runs: dict[str, list[dict]] = {"sequential": [], "parallel": []}
    with tempfile.TemporaryDirectory(prefix="parallel-images-") as tmp:
        write_study(generate_study(SEED, shape=SHAPE, normal=False), tmp)
        for _ in range(args.rounds):
            for mode, n in (("sequential", 1), ("parallel", args.parallel)):
                res = subprocess.run([sys.executable, __file__, "--child", tmp, "--parallel", str(n)],
                                     capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
                runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(mode, runs[mode][-1], flush=True)
    median = {m: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "peak_rss_mb")} for m, rs in runs.items()}
    result = {"benchmark": "parallel_images", "study": {"seed": SEED, "shape": list(SHAPE), "images": 4},
              "operating_point": "phantom", "torch_threads": CPU_TORCH_THREADS, "parallel": args.parallel,
              "runs": runs, "median": median,
              "speed_ratio_sequential_over_parallel": round(median["sequential"]["wall_s"] /
                                                            median["parallel"]["wall_s"], 3),
              "rss_budget_mb": 1024, "cpu_cores": os.cpu_count(),
              "load_average_1min_after": round(os.getloadavg()[0], 2),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = REPO / "benchmarks" / "results" / "parallel_images.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for m, v in median.items():
        print(f"{m:<11} {v['wall_s']:>8.2f} s  peak RSS {v['peak_rss_mb']:>7.1f} MB")
    print(f"sequential / parallel time: {result['speed_ratio_sequential_over_parallel']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
