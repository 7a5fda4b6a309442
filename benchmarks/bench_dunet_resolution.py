"""The U-Net's mass sensitivity against its working pixel size (mini-MIAS 5-fold patient-level CV).

For each working pixel size, five U-Nets are patch-trained with ``dicom-ai train dunet --stage
segment`` (each on four mias_folds folds, from one Genesis-pretrained checkpoint that saw
every MIAS image and generated phantoms without labels), then each held-out fold is run by
the network that did not see it, on the whole breast crop at that pixel size, and its map
resized back to the 0.2 mm source grid.

Region scores, two ways:

* ``clipped``: the subtraction output clipped to [0, 1], as every U-Net bundle so far (scores
  saturate at 1.0, so no operating point can tell the strongest regions apart);
* ``platt``: ``sigmoid(slope * (x - f(x)) + intercept)``, Platt scaling fitted for held-out
  fold k on the candidate regions of the other four folds only, each scored by its own
  out-of-fold network (validation folds only; nothing of fold k is used). The map's threshold
  is the calibrated value of raw output 0.1, so the candidate regions are those of the
  clipped map and only their scores change (calibrated probabilities of a region being a
  mass are small: about 2 % of candidates are); mass Dice is the clipped map's.

Then the node's protocol of ``benchmarks/bench_mias_node.py`` (the U-Net alone): maps
restricted to the breast less the pectoral muscle, candidate regions at p >= 0.1 scored by
their peak, thresholds per false-mark budget chosen on the other four folds, held-out marks
pooled over folds: FROC for masses at 0.125-4 false marks per image, false marks per normal
image, image AUC (abnormal vs normal, highest region score; bootstrap 95 % CI), mass Dice at
p >= 0.5 (images with a located mass, source grid).

    nice -n 10 python benchmarks/bench_dunet_resolution.py --root /work/data/mias \\
        --init build/runs/pretrain.safetensors --spacings 0.4 0.8 1.6 --epochs 5 --steps 150

Training runs resume (``build/runs/res-<mm>/fold<k>``), finished folds are not trained again,
and each pixel size's evaluation is kept in ``build/runs/res-<mm>/eval.json``; the figures are
written to benchmarks/results/dunet_resolution.json (all pixel sizes evaluated so far).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mias_node as node  # noqa: E402  (the node's CV protocol, one copy)

from dicom_ai.cli import main as cli  # noqa: E402
from dicom_ai.core.findings import ModelIdentity, ModelOutput, ProbabilityMap  # noqa: E402
from dicom_ai.data.datasets import MIAS_FOLDS, MIASDataset  # noqa: E402
from dicom_ai.data.evaluate import ModelMarks, _output_prediction  # noqa: E402
from dicom_ai.data.metrics import LESION_FROC_RATES, bootstrap_ci, dice, roc_auc  # noqa: E402
from dicom_ai.networks.bundle import load_bundle, save_bundle  # noqa: E402
from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig, calibrate, working_grid  # noqa: E402
from dicom_ai.networks.pipeline import allowed_region, restrict_to_breast  # noqa: E402
from dicom_ai.training.dunet_patches import candidate_level, candidate_regions, fit_platt, predict_raw  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path("build") / "runs"
#: Today's shipped figures (benchmarks/results/mias_node.json, node marks, MIAS-tuned U-Net 128x96).
TODAY = {"node_mass_sensitivity": {"0.125": 0.0, "0.25": 0.0, "0.5": 0.0, "1.0": 0.4138, "2.0": 0.5345, "4.0": 0.5517},
         "source": "models/dunet/manifest.json metrics.cross_validation (bench_mias_node.py, 128x96 whole-image U-Net)"}


#: Training data of the hybrid-vs-real ablation (the held-out folds are always real MIAS images).
TRAIN_DATA = {"real": ("mias",), "hybrid": ("hybrid:mias-normals",), "both": ("mias", "hybrid:mias-normals")}


def run_name(spacing: float, data: str) -> str:
    """Folder of one configuration under ``--runs``: ``res-<mm>`` (real data) or ``res-<mm>-<data>``."""
    return f"res-{spacing:g}" + ("" if data == "real" else f"-{data}")


def train_folds(args, spacing: float) -> list[Path]:
    """The five fold bundles at ``spacing`` (trained, or resumed, where missing)."""
    out = []
    for k in (args.eval_folds if args.eval_folds is not None else range(MIAS_FOLDS)):
        folder = args.runs / run_name(spacing, args.train_data) / f"fold{k}"
        bundle = folder / "bundle"
        if not (bundle / "manifest.json").is_file():
            others = ",".join(str(f) for f in range(MIAS_FOLDS) if f != k)
            datasets = [a for name in TRAIN_DATA[args.train_data] for a in ("--dataset", f"{name}={args.root}")]
            argv = ["train", "dunet", "--stage", "segment", *datasets, "--folds", others,
                    "--pixel-size", f"{spacing:g}", "--patch", str(args.patch), "--epochs", str(args.epochs),
                    "--steps-per-epoch", str(args.steps), "--batch-size", str(args.batch), "--seed", str(k),
                    "--run-dir", str(folder), "--out", str(bundle), "--resume", "--version", f"cv-fold{k}"]
            if args.init:
                argv += ["--init", str(args.init)]
            if cli(argv) != 0:
                raise SystemExit(f"training fold {k} at {spacing} mm failed")
        out.append(bundle)
    return out


def export(folder: Path, spacing: float, bundles: list[Path], evaluation: dict, version: str) -> None:
    """What shipping the recipe at ``spacing`` needs (``--export``), from its 5-fold evaluation:

    * ``folder/fold<k>``: fold k's bundle with ``calibration_per_held_out_fold[k]`` (fitted on the
      other folds' candidates only) as its ``calibration``, version ``<version>-cv-fold<k>``, so
      ``bench_mias_node.py --dunet-folds folder`` runs each held-out fold as the node runs the
      shipped bundle;
    * ``folder/calibration.json``: ``calibration_all_folds`` (the pooled held-out candidates), for
      ``dicom-ai train dunet ... --folds 0,1,2,3,4 --calibration``;
    * ``folder/metrics.json``: the Platt variant's CV figures, for ``--metrics``.
    """
    if evaluation["held_out_folds"] != list(range(MIAS_FOLDS)):
        raise SystemExit("--export needs the 5-fold evaluation (no --eval-folds)")
    folder.mkdir(parents=True, exist_ok=True)
    for k, bundle in enumerate(bundles):
        b = load_bundle(str(bundle))
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        cal = dict(evaluation["calibration_per_held_out_fold"][str(k)])
        cal["fitted_on"] += (f"; validation folds only: the candidate regions of the other four folds (not fold {k}), "
                             "each scored by its own out-of-fold network")
        manifest.update(version=f"{version}-cv-fold{k}", calibration=cal,
                        thresholds={"mass": round(candidate_level(cal), 6)})
        manifest["outputs"]["mass"] = ("probability map on the source grid of a MASS (benign or malignant), "
                                       "Platt-calibrated subtraction output sigmoid(slope * (x - f(x)) + intercept)")
        save_bundle(folder / f"fold{k}", manifest, b.state_dict)
    (folder / "calibration.json").write_text(json.dumps(evaluation["calibration_all_folds"], indent=1) + "\n")
    platt = evaluation["variants"]["platt"]
    metrics = {"cross_validation_unet_alone": {
        "protocol": "mini-MIAS 5-fold patient-level CV (mias_folds); each held-out fold run by the network trained on "
                    "the other four (same recipe, seed = fold), Platt calibration fitted on the other folds' "
                    "candidates; node protocol of bench_mias_node.py with the U-Net alone",
        "source": f"benchmarks/results/dunet_resolution.json ({spacing:g} mm, 5 folds, platt)",
        "held_out_folds": evaluation["held_out_folds"],
        **{k: platt[k] for k in ("node_mass_sensitivity", "false_marks_per_image", "false_marks_per_normal_image",
                                 "auc_abnormal_image_highest_region", "mass_dice_at_0.5")}},
        "shipped_weights": "trained on all 5 folds with the fold recipe; no mini-MIAS image is held out from these "
                           "weights, so the figures above are the recipe's (the fold models), not these weights'"}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"exported fold bundles, calibration.json and metrics.json to {folder}")


def _network(bundle: Path) -> DiscriminativeUNet:
    b = load_bundle(str(bundle))
    net = DiscriminativeUNet(DUNetConfig.from_dict(b.manifest["architecture"]))
    net.load_state_dict(b.state_dict)
    return net.eval()


def evaluate(args, spacing: float, bundles: list[Path]) -> dict:  # noqa: C901
    """Held-out figures at ``spacing`` for the clipped and the Platt-calibrated scores (module doc)."""
    data = MIASDataset(args.root)
    used = list(args.eval_folds if args.eval_folds is not None else range(MIAS_FOLDS))
    nets = dict(zip(used, (_network(b) for b in bundles)))
    multiple = nets[used[0]].config.multiple
    images, kept = [], []
    t0 = time.time()
    n = len(data) if args.limit is None else min(args.limit, len(data))
    for i in range(n):
        if data.fold_of[Path(data.records[i].path).stem] not in nets:
            continue
        sample = data[i]
        ref = sample.source.rsplit("/", 1)[-1].split(".")[0]
        im = node.Image_(sample, data.fold_of[ref])
        geo, image, _ = working_grid(sample.image, spacing, multiple)
        raw = predict_raw(nets[im.fold], image)
        target = np.zeros(sample.image.shape, dtype=bool)
        for m in im.truth["mass"]:
            target |= m
        work_target = geo.forward(target.astype(np.float32)) >= 0.5
        # Validation candidates for the calibration of the other folds' networks: (peak, hit).
        cands = [(peak, bool(work_target[region].any())) for peak, region in candidate_regions(raw, 0.1)]
        images.append(im)
        kept.append({"geo": geo, "raw": raw.astype(np.float16), "allowed": allowed_region(sample.image),
                     "cands": cands, "target": target if target.any() else None})
    seconds_infer = time.time() - t0
    calibrations = {}
    for k in used:
        pool = [c for im, d in zip(images, kept) if im.fold != k for c in d["cands"]]
        calibrations[k] = fit_platt([p for p, _ in pool], [h for _, h in pool])
    shipped_calibration = fit_platt([p for d in kept for p, _ in d["cands"]], [h for d in kept for _, h in d["cands"]])
    identity = ModelIdentity("dunet", f"res-{spacing:g}")
    out: dict = {"pixel_spacing_mm": spacing, "held_out_folds": used, "images": len(images),
                 "seconds_inference_per_image": round(seconds_infer / max(len(images), 1), 3),
                 "calibration_per_held_out_fold": {str(k): c for k, c in calibrations.items()},
                 "calibration_all_folds": shipped_calibration, "variants": {}}
    for variant in ("clipped", "platt"):
        marks, dices, peaks = [], [], []
        for im, d in zip(images, kept):
            raw = torch.from_numpy(d["raw"].astype(np.float32))
            if variant == "platt":
                prob = calibrate(raw, calibrations[im.fold])
                # The candidate regions stay those of raw >= 0.1 (as clipped): only their scores change.
                level = candidate_level(calibrations[im.fold])
            else:
                prob, level = raw.clamp(0.0, 1.0), 0.5
            source = np.clip(d["geo"].inverse(prob.numpy()), 0.0, 1.0).astype(np.float32)
            output = ModelOutput(maps=[ProbabilityMap("mass", source, level, identity)], scores=[])
            output = restrict_to_breast(output, None, d["allowed"])  # type: ignore[arg-type]
            mm = ModelMarks.from_prediction(_output_prediction(output), d["allowed"])
            marks.append({"dunet": mm})
            peaks.append(float(mm.candidates["mass"][:, 0].max()) if len(mm.candidates["mass"]) else 0.0)
            if d["target"] is not None and variant == "clipped":
                dices.append(dice(mm.binary["mass"], d["target"], 0.5))
        cv = node.cross_validate(images, marks)
        cv.pop("sent")
        abnormal = np.array([not im.normal for im in images])
        iv = bootstrap_ci(roc_auc, np.array(peaks), abnormal, n=2000)
        if variant == "clipped":
            dices_a = np.array(dices)  # calibration changes region scores, not regions: one Dice
        out["variants"][variant] = {
            "node_mass_sensitivity": {str(b): cv["froc"][str(b)]["sensitivity"]["mass"] for b in LESION_FROC_RATES},
            "false_marks_per_image": {str(b): cv["froc"][str(b)]["false_marks_per_image"] for b in LESION_FROC_RATES},
            "false_marks_per_normal_image": {str(b): cv["froc"][str(b)]["false_marks_per_normal_image"]
                                             for b in LESION_FROC_RATES},
            "auc_abnormal_image_highest_region": {"value": round(iv.value, 4),
                                                  "ci95": [round(iv.low, 4), round(iv.high, 4)]},
            "mass_dice_at_0.5": {"mean": round(float(dices_a.mean()), 4), "median": round(float(np.median(dices_a)), 4),
                                 "fraction_above_0.5": round(float((dices_a > 0.5).mean()), 4),
                                 "n_images": int(len(dices_a))},
            "per_fold_thresholds": cv["per_fold_thresholds"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/work/data/mias"))
    p.add_argument("--init", type=Path, default=RUNS / "pretrain.safetensors",
                   help="stage-1 checkpoint every fold starts from ('none': random initialisation)")
    p.add_argument("--spacings", type=float, nargs="+", default=[0.4, 0.8, 1.6])
    p.add_argument("--runs", type=Path, default=RUNS, help="fold runs and per-size evaluations")
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="first N images only (a dry run; figures not valid)")
    p.add_argument("--train-only", action="store_true", help="train the fold models, do not evaluate")
    p.add_argument("--eval-folds", type=lambda t: [int(v) for v in t.split(",")], default=None,
                   help="train and evaluate only these held-out folds (thresholds and calibration of each then "
                        "come from the other folds listed; a reduced CV, stated in the JSON)")
    p.add_argument("--train-data", choices=sorted(TRAIN_DATA), default="real",
                   help="real: MIAS training folds; hybrid: phantom lesions inserted into the training folds' "
                        "MIAS normals (dicom_ai.data.insertion); both (the held-out folds are real either way)")
    p.add_argument("--out", type=Path, default=RESULTS / "dunet_resolution.json")
    p.add_argument("--export", type=Path, default=None,
                   help="with one --spacings value: write the calibrated fold bundles, calibration.json and "
                        "metrics.json for shipping the recipe here (export)")
    p.add_argument("--export-version", default="0.3.0", help="version of the shipped bundle the folds validate")
    args = p.parse_args(argv)
    if args.export and len(args.spacings) != 1:
        raise SystemExit("--export needs exactly one --spacings value")
    torch.set_num_threads(args.threads)
    if str(args.init) == "none":
        args.init = None
    if args.init and not args.init.is_file():
        raise SystemExit(f"{args.init} does not exist: run the pretraining first (module docstring)")
    for spacing in args.spacings:
        bundles = train_folds(args, spacing)
        if args.train_only:
            continue
        cached = args.runs / run_name(spacing, args.train_data) / (
            "eval.json" if args.eval_folds is None else f"eval-folds{''.join(str(k) for k in args.eval_folds)}.json")
        if args.limit is None and cached.is_file():
            if args.export:
                export(args.export, spacing, bundles, json.loads(cached.read_text()), args.export_version)
            continue
        result = evaluate(args, spacing, bundles)
        result["train_data"] = args.train_data
        result["training"] = {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": args.batch,
                              "patch": args.patch, "init": str(args.init) if args.init else None,
                              "seconds": [load_bundle(str(b)).manifest["training"]["seconds_this_run"]
                                          for b in bundles]}
        if args.limit is None:
            cached.write_text(json.dumps(result, indent=1) + "\n")
            if args.export:
                export(args.export, spacing, bundles, result, args.export_version)
        else:
            print(json.dumps({k: v for k, v in result["variants"]["platt"].items() if k != "per_fold_thresholds"}))
            return 0
    if args.train_only:
        return 0
    by_folds: dict = {}
    ablation: dict = {}
    for path in sorted(args.runs.glob("res-*/eval*.json")):
        r = json.loads(path.read_text())
        if "held_out_folds" not in r:
            continue  # an evaluation of an older version of this benchmark
        folds = "held-out folds " + ",".join(str(k) for k in r["held_out_folds"])
        if r.get("train_data", "real") == "real":
            by_folds.setdefault(folds, {})[f"{r['pixel_spacing_mm']:g}"] = r
        ablation.setdefault(folds, {}).setdefault(f"{r['pixel_spacing_mm']:g}", {})[r.get("train_data", "real")] = \
            r["variants"]
    result = {"benchmark": "U-Net mass sensitivity vs working pixel size, mini-MIAS 5-fold patient-level CV",
              "protocol": __doc__.split("\n\n", 1)[1].split("    nice")[0].strip(),
              "data": {"images": 322, "licence": MIASDataset(args.root).licence,
                       "split": "dicom_ai.data.datasets.mias_folds (patient level, fixed 5 folds)"},
              "today": TODAY, "by_held_out_folds": by_folds,
              "hybrid_vs_real": {f: {mm: v for mm, v in by.items() if len(v) > 1} for f, by in ablation.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


def table(result: dict) -> str:
    """Markdown table of the node-protocol FROC per pixel size and score."""
    lines = ["| pixel size | scores | mass sens @ 0.125 / 0.25 / 0.5 / 1 / 2 / 4 FP/img | FP/normal @ 0.5 / 1 | "
             "AUC abnormal [95 % CI] | mass Dice mean |", "|---|---|---|---|---|---|"]
    t = result["today"]["node_mass_sensitivity"]
    lines.append(f"| today (128x96, 1.2-1.6 mm), 5 folds | clipped | "
                 f"{' / '.join(f'{t[str(b)]:.2f}' for b in LESION_FROC_RATES)} | - / 1.16 | - | 0.20 |")
    rows = [(folds, mm, r) for folds, by in result["by_held_out_folds"].items() for mm, r in by.items()]
    for folds, mm, r in sorted(rows, key=lambda x: (x[0], float(x[1]))):
        for variant, v in r["variants"].items():
            s = v["node_mass_sensitivity"]
            fpn = v["false_marks_per_normal_image"]
            a = v["auc_abnormal_image_highest_region"]
            sens = " / ".join(f"{s[str(b)]:.2f}" for b in LESION_FROC_RATES)
            lines.append(f"| {mm} mm, {folds} | {variant} | {sens} | "
                         f"{fpn['0.5']} / {fpn['1.0']} | {a['value']:.2f} [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}] | "
                         f"{r['variants']['clipped']['mass_dice_at_0.5']['mean']:.2f} |")
    ablation = [(f, mm, d, v) for f, by in result.get("hybrid_vs_real", {}).items() for mm, runs in by.items()
                for d, v in runs.items()]
    if ablation:
        lines += ["", "| hybrid vs real: size, held-out folds | training data | Platt mass sens @ 0.125 ... 4 FP/img | "
                      "AUC abnormal |", "|---|---|---|---|"]
        for f, mm, d, v in sorted(ablation):
            s = v["platt"]["node_mass_sensitivity"]
            a = v["platt"]["auc_abnormal_image_highest_region"]
            lines.append(f"| {mm} mm, {f} | {d} | {' / '.join(f'{s[str(b)]:.2f}' for b in LESION_FROC_RATES)} | "
                         f"{a['value']:.2f} [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}] |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
