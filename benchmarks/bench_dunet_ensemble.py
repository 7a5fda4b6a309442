"""Does a seed ensemble of the U-Net's fold networks find more masses held out? (issue 26, masses)

Single U-Net runs of one recipe on the mini-MIAS folds move by up to 0.07 in held-out mass
sensitivity between seeds (results/dunet_node_paired_cont_seed100_vs_seed200.json), so one run
against another says little. This bench averages, per image, the raw outputs x - f(x) of
several sets of fold networks on the 0.8 mm working grid (every member of an image is the fold
network that did not see it), then scores exactly as ``bench_dunet_scores.py --export-only``
does: candidate regions of the averaged raw output >= 0.1 inside the breast, scored by their
peak, Platt-calibrated per fold on the other folds' candidates, thresholds chosen per held-out
fold on the other four folds at each budget (bench_mias_node's rule, U-Net alone), paired
bootstrap over women against the first member (today's shipped recipe).

The ensemble is fixed before it is scored (the mean of every ``--member``); no member subset is
chosen on these folds. Each member is a ``bench_dunet_scores.py`` cache folder (one ``.npz`` per
MIAS image with the ``s0.8`` raw output), made by ``--export-only`` on that member's fold bundles::

    python benchmarks/bench_dunet_scores.py --dunet-folds /work/data/dunet-0.8-folds \\
        --export /tmp/x --export-scales --export-only --cache build/dunet_scores_c0
    python benchmarks/bench_dunet_ensemble.py --member build/dunet_scores_c0 \\
        --member build/dunet_scores_c1 --member build/dunet_scores_c2

Writes results/dunet_ensemble.json and prints the FROC table. Working-grid figures (the node's
source-grid marks agree within two masses, issue-26r's notes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dunet_scores as scores  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load_member(data: scores.MIASDataset, folder: Path) -> list[dict]:
    """A member's cached per-image arrays (every image must be cached already)."""
    args = argparse.Namespace(cache=folder, export_only=True, export_scales=[])
    missing = [r.path for r in data.records if not (folder / f"{Path(r.path).stem}.npz").is_file()]
    if missing:
        raise SystemExit(f"{folder}: {len(missing)} image(s) not cached; run bench_dunet_scores.py --export-only first")
    return scores.image_arrays(args, data, models={})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/work/data/mias"))
    p.add_argument("--member", type=Path, action="append", required=True,
                   help="a bench_dunet_scores cache folder; the first is the reference (today's recipe)")
    p.add_argument("--label", action="append", default=None, help="one label per --member")
    p.add_argument("--out", type=Path, default=RESULTS / "dunet_ensemble.json")
    args = p.parse_args(argv)
    t0 = time.time()
    labels = args.label or [str(m) for m in args.member]
    data = scores.MIASDataset(args.root)
    members = [load_member(data, m) for m in args.member]
    refs = [d["ref"] for d in members[0]]
    if any([d["ref"] for d in m] != refs for m in members[1:]):
        raise SystemExit("members cover different images")
    ensemble = []
    for i, d in enumerate(members[0]):
        e = dict(d)
        e["s0.8"] = np.mean([m[i]["s0.8"] for m in members], axis=0).astype(np.float32)
        ensemble.append(e)
    folds = np.array([d["fold"] for d in ensemble])
    n_img = len(ensemble)

    def scored(arrays):
        tab = scores.table(arrays)
        return tab, scores.map_table(tab, scores.calibrated(tab, ("peak",)))

    result: dict = {"benchmark": "U-Net seed ensemble of fold networks, mini-MIAS 5-fold CV, working grid (issue 26)",
                    "protocol": __doc__.split("\n\n")[1].strip(), "budgets": list(scores.BUDGETS),
                    "members": dict(zip(labels, map(str, args.member))), "froc": {}}
    tables = {}
    for label, arrays in list(zip(labels, members)) + [("ensemble (mean of every member)", ensemble)]:
        tab, mt = scored(arrays)
        tables[label] = (tab, mt)
        result["froc"][label] = scores.froc(mt, folds, tab["n_lesions"], n_img)
    ref_label = labels[0]
    result["paired_ensemble_minus_reference"] = scores.paired(
        ensemble, tables[ref_label][1], tables["ensemble (mean of every member)"][1], None)
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| masses @ " + " / ".join(f"{b:g}" for b in scores.BUDGETS) + " FP/img | held out |\n|---|---|")
    for label, f in result["froc"].items():
        print(f"| {label} | {scores._line(f)} |")
    print("ensemble - reference, 95 % CI (bootstrap over women): " + "; ".join(
        f"{b}: {v['sensitivity_difference']:+.2f} [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}]"
        for b, v in result["paired_ensemble_minus_reference"].items()))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
