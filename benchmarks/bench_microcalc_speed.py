"""microcalc's predict on the full-size phantom study: this tree against another revision, alternating.

Turnaround runs on this shared two-core machine move by +-40 % between two nodes of one run
(other jobs' load changes), so this compares the model alone: each round runs the shipped
microcalc bundle's ``predict`` on the four views of bench_turnaround's phantom study (seed
1010, 3328 x 2560) in a fresh process for the ``--before`` revision (``git archive``) and for
this tree, one after the other, alternating which goes first. Per round: seconds of each, the
after/before ratio, and whether both produced the same maps (SHA-256 of every map's bytes).
The node's threads as the worker sets them (torch at CPU_TORCH_THREADS, ONNX Runtime on every core).

Writes benchmarks/results/microcalc_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import hashlib, json, sys, time
import torch
from dicom_ai.data.phantom import generate_study
from dicom_ai.imaging import read_mammogram
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.registry import model_from_bundle
from dicom_ai.node.processing import CPU_TORCH_THREADS
torch.set_num_threads(CPU_TORCH_THREADS)
study = generate_study(1010, shape=(3328, 2560), normal=False)
mgs = [read_mammogram(im.dataset) for im in study.images]
for mg in mgs:
    mg.breast_mask
model = model_from_bundle(load_bundle(sys.argv[2], operating_point=sys.argv[1]), "cpu")
digest, seconds = hashlib.sha256(), []
for mg in mgs:
    t = time.perf_counter()
    out = model.predict(mg)
    seconds.append(time.perf_counter() - t)
    for m in out.maps:
        digest.update(m.finding.encode()); digest.update(m.probability.tobytes())
print(json.dumps({"seconds": seconds, "sha256": digest.hexdigest()}))
"""


def run(tree: Path, point: str, bundle: str = "microcalc") -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, point, bundle], cwd=tree, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--operating-point", default="phantom")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "microcalc_speed.json")
    parser.add_argument("--after-bundle", default="microcalc",
                        help="the microcalc bundle this tree runs (a folder; default: its own models/microcalc), "
                             "e.g. a candidate beside --before's shipped bundle")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="microcalc-speed-") as tmp:
        before = Path(tmp) / "before"
        before.mkdir()
        archive = subprocess.run(["git", "archive", args.before], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        for r in range(args.rounds):
            order = [("before", before), ("after", REPO)] if r % 2 == 0 else [("after", REPO), ("before", before)]
            row = {"round": r, "first": order[0][0], "loadavg_1min": round(os.getloadavg()[0], 2)}
            for label, tree in order:
                res = run(tree, args.operating_point, args.after_bundle if label == "after" else "microcalc")
                row[f"{label}_s"] = round(sum(res["seconds"]), 2)
                row[f"{label}_per_view_s"] = [round(x, 2) for x in res["seconds"]]
                row[f"{label}_sha256"] = res["sha256"]
            row["after_over_before"] = round(row["after_s"] / row["before_s"], 3)
            row["same_maps"] = row["after_sha256"] == row["before_sha256"]
            rounds.append(row)
            print(f"round {r} (first {row['first']}, load {row['loadavg_1min']}): before {row['before_s']} s, "
                  f"after {row['after_s']} s, ratio {row['after_over_before']}, same maps {row['same_maps']}", flush=True)
    result = {"benchmark": "microcalc_speed", "before": args.before, "operating_point": args.operating_point,
              "after_bundle": args.after_bundle,
              "study": {"seed": 1010, "shape": [3328, 2560], "views": 4}, "rounds": rounds,
              "median_after_over_before": statistics.median(r["after_over_before"] for r in rounds),
              "all_same_maps": all(r["same_maps"] for r in rounds),
              "wall_s": round(time.perf_counter() - started, 1),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median after/before {result['median_after_over_before']}; identical maps in every round: "
          f"{result['all_same_maps']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
