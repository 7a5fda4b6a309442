"""CPU time and peak memory of the authors' GLAM on a full-size four-view study, beside the compact GLAM.

One phantom study at full size (3328 x 2560 at 0.07 mm, four views) goes through each model's
``predict`` (preprocessing, network, maps back on the source grid), as the node's worker runs it:
torch at one intra-op thread on a CPU (``dicom_ai.node.processing.CPU_TORCH_THREADS``) unless
``--threads`` says otherwise. Each model runs in its own process, so its peak resident memory
(``ru_maxrss``) is its own; the process's resident memory after the imports, before the bundle
loads, is reported beside it. The authors' bundle holds seeded random weights with the
checkpoint's names and shapes (``synthetic_state_dict``): the cost does not depend on the values.
The compact GLAM is the shipped ``models/glam``.

    python benchmarks/bench_glam_authors_cpu.py [--threads 1] [--device cpu]

Writes ``benchmarks/results/glam_authors_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(which: str, threads: int, device: str, seed: int) -> dict:
    import torch

    from dicom_ai.data.phantom import generate_study
    from dicom_ai.imaging import read_mammogram
    from dicom_ai.networks.bundle import load_bundle
    from dicom_ai.networks.glam_authors import synthetic_state_dict
    from dicom_ai.networks.glam_import import import_glam
    from dicom_ai.networks.registry import model_from_bundle

    torch.set_num_threads(threads)
    study = generate_study(seed, shape=(3328, 2560))
    mammograms = [read_mammogram(im.dataset) for im in study.images]
    for m in mammograms:
        _ = m.breast_mask  # decoded and masked once, as the pipeline does before the models
    baseline = _rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        if which == "authors":
            ckpt = Path(tmp) / "model_synthetic.ckpt"
            torch.save(synthetic_state_dict(0), ckpt)
            bundle_dir = import_glam(ckpt, Path(tmp) / "bundle")
        else:
            bundle_dir = "glam"
        started = time.perf_counter()
        model = model_from_bundle(load_bundle(bundle_dir), device)
        load_s = time.perf_counter() - started
    views = []
    for m in mammograms:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        output = model.predict(m)
        views.append({"view": f"{m.laterality}-{m.view}", "cpu_s": round(time.process_time() - cpu0, 2),
                      "wall_s": round(time.perf_counter() - wall0, 2),
                      "max_map": round(max(float(x.probability.max()) for x in output.maps), 4)})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": which, "bundle": str(bundle_dir) if which != "authors" else "imported synthetic checkpoint",
            "load_s": round(load_s, 2), "views": views,
            "cpu_s_study": round(sum(v["cpu_s"] for v in views), 1),
            "wall_s_study": round(sum(v["wall_s"] for v in views), 1),
            "rss_before_bundle_mib": round(baseline), "peak_rss_mib": round(peak)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the worker's CPU setting: 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=21, help="phantom study seed")
    parser.add_argument("--child", choices=("authors", "compact"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "glam_authors_cpu.json"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.threads, args.device, args.seed)))
        return 0
    runs = {}
    for which in ("compact", "authors"):
        done = subprocess.run([sys.executable, __file__, "--child", which, "--threads", str(args.threads),
                               "--device", args.device, "--seed", str(args.seed)],
                              capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        runs[which] = json.loads(done.stdout.strip().splitlines()[-1])
    import torch

    result = {
        "what": "GLAM predict() per view (preprocessing + network + maps to the source grid) on one full-size "
                "four-view phantom study (3328 x 2560, 0.07 mm), each model in its own process",
        "device": args.device, "torch_threads": args.threads, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "gpu": "no GPU was available to this session: no GPU figure",
        "note": "shared 2-core machine (other jobs running): wall times vary; CPU seconds are the process's",
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':8s} {'cpu s/study':>12s} {'wall s/study':>13s} {'peak RSS MiB':>13s} {'RSS before MiB':>15s}")
    for which, r in runs.items():
        print(f"{which:8s} {r['cpu_s_study']:12.1f} {r['wall_s_study']:13.1f} {r['peak_rss_mib']:13d} "
              f"{r['rss_before_bundle_mib']:15d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
