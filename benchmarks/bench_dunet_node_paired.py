"""Paired comparison of two U-Net fold-bundle sets at the node level (mini-MIAS 5-fold CV).

Both sets' marks are the node's (``bench_mias_node.marks_of``: each image run by the fold bundle
that did not see it, maps restricted to the breast less pectoral muscle, candidate regions scored
by their peak; read from ``--cache`` when there); the U-Net alone is sent, at thresholds chosen
per held-out fold on the other four folds for each false-mark budget (``bench_mias_node``'s
``cross_validate``, unchanged). Per budget: held-out mass sensitivity and false marks per image of
each set, the masses found by one set only, and a bootstrap over women (2000 resamples) of the
difference ``--b`` minus ``--a``.

With ``--ship-a``/``--ship-b`` (the all-folds bundles each set would ship), the four shared real
images (``--real``) are run by each as ``bench_mias_node`` runs them (0.07 mm, orientation from the
file name checked on the pixels, breast restriction) and their U-Net marks counted at each set's
default point as the node ships it: the U-Net alone at <= ``--default-budget`` false marks per
image, threshold chosen on all five folds' held-out marks of that set (``choose_thresholds``, as
``--default-by-parts`` chooses it).

    nice -n 10 python benchmarks/bench_dunet_node_paired.py --a /work/data/dunet-0.8-folds \\
        --b /work/data/dunet-0.9-folds --out benchmarks/results/dunet_node_paired.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mias_node as node  # noqa: E402

from dicom_ai.data.datasets import MIASDataset  # noqa: E402
from dicom_ai.data.metrics import LESION_FROC_RATES  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def real_marks(folder: Path, bundle: Path, thresholds) -> dict[str, int]:
    """U-Net marks per shared real PNG at ``thresholds``, run as bench_mias_node runs them."""
    model = node.candidate_model(bundle)
    out = {}
    for png in sorted(folder.glob("*.png")):
        arr = np.asarray(Image.open(png)).astype(np.float32)
        arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        lat = "L" if "_L_" in png.name else "R"
        m = node.mammogram_from_array(arr, lat, "CC", (0.07, 0.07))
        m.faces_left, m.orientation = node.orient(lat == "R", m.breast_mask)
        output = node.restrict_to_breast(model.predict(m), m)
        marks = node.ModelMarks.from_prediction(node._output_prediction(output), node.allowed_region(m))
        out[png.stem] = len(node.sent_marks({"dunet": marks}, thresholds))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/work/data/mias"))
    p.add_argument("--cache", type=Path, default=Path("/work/data/mias_cache"))
    p.add_argument("--a", type=Path, required=True, help="fold bundles (fold0..4) of the reference")
    p.add_argument("--b", type=Path, required=True, help="fold bundles (fold0..4) compared with it")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--out", type=Path, default=RESULTS / "dunet_node_paired.json")
    p.add_argument("--ship-a", type=Path, default=None, help="all-folds bundle of set a (runs the shared real images)")
    p.add_argument("--ship-b", type=Path, default=None, help="all-folds bundle of set b")
    p.add_argument("--real", type=Path, default=Path("/work/shared/data/real"))
    p.add_argument("--default-budget", type=float, default=0.25)
    args = p.parse_args(argv)
    t0 = time.time()
    data = MIASDataset(args.root)
    samples = [data[i] for i in range(len(data))]
    images = [node.Image_(s, data.fold_of[s.source.rsplit("/", 1)[-1].split(".")[0]]) for s in samples]
    res, real = {}, {}
    for name, folder in (("a", args.a), ("b", args.b)):
        src = {"kind": node.FOLDS, "path": folder}
        marks = node.marks_of(args, samples, images, "dunet", src)
        res[name] = {b: node.found_and_false(images, node.held_out_sent(images, [{"dunet": m} for m in marks], b), "mass")
                     for b in LESION_FROC_RATES}
        ship = getattr(args, f"ship_{name}")
        if ship is not None:
            tables = node._tables(images, [{"dunet": m} for m in marks])
            thr = node.choose_thresholds(tables, np.arange(len(images)), args.default_budget)
            real[name] = {"bundle": str(ship), "threshold": thr[("dunet", "mass")],
                          "images": real_marks(args.real, ship, thr)}
    out = {"benchmark": "U-Net fold bundles a vs b, node marks, U-Net alone, mini-MIAS 5-fold CV (paired)",
           "a": str(args.a), "b": str(args.b), "protocol": __doc__.split("\n\n")[1].strip(),
           "budgets": node.paired_over_women(images, "mass", res["a"], res["b"], args.n, "masses")}
    if real:
        for v in real.values():
            v["marks_per_image"] = round(sum(v["images"].values()) / max(len(v["images"]), 1), 3)
        out["shared_real_images"] = dict(real, point=f"U-Net alone, <= {args.default_budget:g} false marks per image "
                                                     "(threshold chosen on all five folds' held-out marks)")
    out["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("| budget | a: sens (FP/img) | b: sens (FP/img) | b only / a only | b - a, 95 % CI (bootstrap over women) |")
    print("|---|---|---|---|---|")
    for b, v in out["budgets"].items():
        print(f"| {b} | {v['a']['sensitivity']:.2f} ({v['a']['false_marks_per_image']:.2f}) | {v['b']['sensitivity']:.2f} "
              f"({v['b']['false_marks_per_image']:.2f}) | {v['masses_found_by_b_only']} / {v['masses_found_by_a_only']} | "
              f"{v['b']['sensitivity'] - v['a']['sensitivity']:+.2f} {v['sensitivity_difference_ci95']} |")
    for name, v in real.items():
        print(f"shared real images, {name} ({v['bundle']}, threshold {v['threshold']:.6f}): {v['images']}, "
              f"{v['marks_per_image']} marks per image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
