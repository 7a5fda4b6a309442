"""Medians over several ``bench_turnaround.py --before`` runs: per stage, before and after.

Each run file holds one before/after pair per operating point, run one after the other on this
shared machine, so single figures move with the load (the models' seconds show by how much).
This prints, per operating point, the median of each stage over the runs, the median of the
per-run after/before ratios of the turnaround and of the turnaround without the models (the
part the non-network work decides), the worker's peak RSS, and whether every run sent the same
SEG masks, region counts and preview PNGs before and after. Writes ``--out`` (JSON).

    python benchmarks/turnaround_summary.py benchmarks/results/turnaround_stages*.json \\
        --out benchmarks/results/turnaround_stages_summary.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _outside_models(run: dict) -> float:
    return run["turnaround_s"] - sum(run["model_seconds"].values())


def summarise(files: list[Path]) -> dict:
    """Per operating point: stage medians before/after, median ratios, RSS, identical outputs."""
    runs = [json.loads(f.read_text()) for f in files]
    points = sorted({key.split("/")[0] for r in runs for key in r["runs"]})
    out = {}
    for point in points:
        pairs = [(r["runs"][f"{point}/before"], r["runs"][f"{point}/after"], r["marks_before_vs_after"].get(point, {}))
                 for r in runs if f"{point}/before" in r["runs"] and f"{point}/after" in r["runs"]]
        stages: dict[str, dict[str, float]] = {}
        for label, index in (("before", 0), ("after", 1)):
            names = dict.fromkeys(k for p in pairs for k in p[index]["stages_s"])
            for name in names:
                values = [p[index]["stages_s"][name] for p in pairs if name in p[index]["stages_s"]]
                stages.setdefault(name, {})[label] = round(statistics.median(values), 3)
        out[point] = {
            "runs": len(pairs),
            "loadavg_1min": [p[0]["loadavg_1min"] + p[1]["loadavg_1min"] for p in pairs],
            "turnaround_s": {"before": [p[0]["turnaround_s"] for p in pairs],
                             "after": [p[1]["turnaround_s"] for p in pairs]},
            "without_models_s": {"before": [round(_outside_models(p[0]), 2) for p in pairs],
                                 "after": [round(_outside_models(p[1]), 2) for p in pairs]},
            "median_ratio_turnaround_after_over_before": round(statistics.median(
                p[1]["turnaround_s"] / p[0]["turnaround_s"] for p in pairs), 3),
            "median_ratio_without_models_after_over_before": round(statistics.median(
                _outside_models(p[1]) / _outside_models(p[0]) for p in pairs), 3),
            "worker_peak_rss_mb": {"before": [p[0]["peak_rss_mb"].get("worker") for p in pairs],
                                   "after": [p[1]["peak_rss_mb"].get("worker") for p in pairs]},
            "identical_seg_masks": all(p[2].get("identical_masks") for p in pairs),
            "same_region_counts": all(p[2].get("same_region_counts") for p in pairs),
            "identical_previews": all(p[2].get("identical_previews") for p in pairs),
            "stage_medians_s": stages,
        }
    return {"benchmark": "turnaround_summary", "files": [str(f) for f in files], "points": out,
            "note": "medians over runs; 'without models' = turnaround minus the models' summed seconds"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+", help="bench_turnaround.py JSON files made with --before")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = summarise(args.files)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for point, s in result["points"].items():
        print(f"\n{point}: {s['runs']} runs; turnaround before {s['turnaround_s']['before']} after "
              f"{s['turnaround_s']['after']}; median after/before {s['median_ratio_turnaround_after_over_before']}; "
              f"without the models before {s['without_models_s']['before']} after {s['without_models_s']['after']} "
              f"(median ratio {s['median_ratio_without_models_after_over_before']}); worker peak RSS MB "
              f"{s['worker_peak_rss_mb']}; identical SEG masks {s['identical_seg_masks']}, region counts "
              f"{s['same_region_counts']}, previews {s['identical_previews']}")
        print(f"  {'stage (median s)':<52} {'before':>8} {'after':>8}")
        for name, v in s["stage_medians_s"].items():
            print(f"  {name:<52} {v.get('before', float('nan')):8.2f} {v.get('after', float('nan')):8.2f}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
