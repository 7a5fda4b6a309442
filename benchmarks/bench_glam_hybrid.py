"""GLAM fine-tuned on hybrid images (masses inserted into real MIAS normals): does it separate real MIAS?

Per held-out fold k of :func:`dicom_ai.data.datasets.mias_folds` (women kept together), a GLAM
bundle fine-tuned by ``dicom-ai train glam`` on the OTHER folds only (hybrids: masses inserted
into those folds' NORM images, ``hybrid:mias-normals``, plus the real images of those folds,
image-level labels only) is applied to the real images of fold k at full resolution through
:meth:`GlamModel.run` (the node's path). The bench checks, from each bundle's manifest, that
fold k was not among its training folds.

Reported per fold and pooled over the folds given:

* image AUC, abnormal (any MIAS finding) vs normal, and mass images vs normal, with 95 %
  bootstrap intervals resampling images and resampling women; scores: the global
  prediction (the node's image score, max of the benign / malignant channels) and the local one;
* the same for a reference bundle on the same images (default the shipped models/glam, which
  was fine-tuned on all five MIAS folds, fold k included: its figure is optimistic), beside
  the earlier five-fold CV of the shipped recipe (results/glam_mias.json) when present;
* localisation: on fold-k images with a located mass, is the peak of the fused map (max over
  both channels, inside the breast) in a mass, and is the centroid of the top region; chance
  = the share of the breast the masses cover; lesion-level FROC of the fused-map regions;
* an in-domain check: the same AUC on the held-out hybrids of fold k (masses inserted into
  fold k's normals, GLAM's grid), which says whether the network learnt the inserted masses at all.

Diagnostics run by hand on fold 0 (results/glam_hybrid_{conspicuous,curriculum}_fold0.json; the
exact commands are in each bundle's manifest): the ``long`` recipe with ``--mass-contrast 0.6
1.2`` (masses 3x the fitted contrast: can GLAM learn inserted masses at all?), then that bundle
as ``--init`` for 12/2/2 epochs at 3e-4 on the realistic hybrids (a curriculum).

Five folds of the curriculum (results/glam_hybrid_curriculum_folds01234.json) gave GLAM 0.3.0:
``--recipe curriculum`` trains both stages per fold (and with ``--train-all`` on all five folds),
``--ship STAGE1 STAGE2`` writes the all-folds bundle to models/glam with a manifest naming the
curriculum, the starting bundle and the five-fold figures (``make glam-bundle``)::

    PYTHONPATH=. nice -n 10 python benchmarks/bench_glam_hybrid.py --bundles build/glam-hybrid --train --train-all \
        --recipe curriculum --folds 0 1 2 3 4 --out benchmarks/results/glam_hybrid_curriculum_folds01234.json
    PYTHONPATH=. python benchmarks/bench_glam_hybrid.py --ship build/glam-hybrid/all-stage1 build/glam-hybrid/all

Result: the JSON given by ``--out`` (default benchmarks/results/glam_hybrid.json), the same
name with .md, and a short table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_ai.data.datasets import MIASDataset, mias_woman, open_dataset  # noqa: E402
from dicom_ai.data.insertion import InsertionConfig  # noqa: E402
from dicom_ai.data.metrics import bootstrap_ci, detections_from_map, lesion_froc, roc_auc  # noqa: E402
from dicom_ai.networks.bundle import load_bundle  # noqa: E402
from dicom_ai.networks.glam import GlamModel  # noqa: E402
from dicom_ai.training.glam import HYBRID_KINDS, dataset_views  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

#: Fine-tuning recipes of ``--train`` (``dicom-ai train glam`` arguments after the data; a list of
#: stages, each stage's ``--init`` being the previous stage's bundle where it says ``PREVIOUS``).
#: ``short``: the first one (8 global epochs at 3e-4, as bench_glam_mias's stages but longer);
#: its training loss stalled near the label prior (bce_g 0.75) and it barely told held-out
#: hybrids apart (AUC 0.59), so ``long`` gives the network the sample count the phantom GLAM
#: needed before its loss dropped (about 15-20 k views seen) and the phantom recipe's 1e-3.
#: ``curriculum`` (the shipped 0.3.0 recipe): ``long`` on masses inserted at 3x the fitted
#: contrast (GLAM learns those), then 12/2/2 epochs at 3e-4 on the realistic hybrids.
_COMMON = ["--copies", "4", "--beta", "0.1", "--balance", "sqrt", "--schedule", "cosine", "--seed", "0", "--no-progress"]
RECIPES = {
    "short": [["--copies", "4", "--init", "glam", "--epochs-global", "8", "--epochs-local", "2", "--epochs-joint", "2",
               "--lr", "3e-4", "--beta", "0.1", "--balance", "sqrt", "--schedule", "cosine", "--warmup-steps", "20",
               "--seed", "0", "--no-progress"]],
    "long": [["--copies", "4", "--init", "glam", "--epochs-global", "24", "--epochs-local", "2", "--epochs-joint", "2",
              "--lr", "1e-3", "--beta", "0.1", "--balance", "sqrt", "--schedule", "cosine", "--warmup-steps", "50",
              "--seed", "0", "--no-progress"]],
    "curriculum": [[*_COMMON, "--mass-contrast", "0.6", "1.2", "--init", "glam", "--epochs-global", "24",
                    "--epochs-local", "2", "--epochs-joint", "2", "--lr", "1e-3", "--warmup-steps", "50"],
                   [*_COMMON, "--init", "PREVIOUS", "--epochs-global", "12", "--epochs-local", "2", "--epochs-joint", "2",
                    "--lr", "3e-4", "--warmup-steps", "20"]],
}


def train_fold(k: int | None, mias: Path, out: Path, run_dir: Path, log: Path, recipe: str = "long") -> list[list[str]]:
    """Fine-tune the fold-k bundle (trained without fold k; ``k`` None: on all five folds) with
    ``RECIPES[recipe]``; earlier stages go to ``<out>-stage<i>``; returns the commands."""
    folds = ",".join(str(f) for f in range(5) if f != k)
    stages = RECIPES[recipe]
    commands, previous = [], None
    for i, stage in enumerate(stages, 1):
        target = out if i == len(stages) else out.parent / f"{out.name}-stage{i}"
        args = [str(previous) if a == "PREVIOUS" else a for a in stage]
        stage_run = run_dir if len(stages) == 1 else run_dir.parent / f"{run_dir.name}-stage{i}"
        cmd = [sys.executable, "-m", "dicom_ai", "train", "glam", "--dataset", f"mias={mias}",
               "--dataset", f"hybrid:mias-normals={mias}", "--folds", folds, *args,
               "--run-dir", str(stage_run), "--resume", "--out", str(target)]
        if not (target / "manifest.json").is_file():
            with log.open("a") as fh:
                subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        commands.append(cmd)
        previous = target
    return commands


def _auc_block(scores: np.ndarray, labels: np.ndarray, women: np.ndarray) -> dict:
    """AUC with a 95 % bootstrap interval over images and one over women (all images of a woman together)."""
    auc = roc_auc(scores, labels)
    ci = bootstrap_ci(roc_auc, scores, labels, n=2000, seed=0)
    rng = np.random.default_rng(0)
    ids = np.unique(women)
    rows = {w: np.flatnonzero(women == w) for w in ids}
    boots = []
    while len(boots) < 2000:
        pick = np.concatenate([rows[w] for w in rng.choice(ids, ids.size)])
        y = labels[pick]
        if y.all() or not y.any():
            continue
        boots.append(roc_auc(scores[pick], y))
    return {"auc": round(auc, 4), "ci95_images": [round(ci.low, 4), round(ci.high, 4)],
            "ci95_women": [round(float(np.percentile(boots, 2.5)), 4), round(float(np.percentile(boots, 97.5)), 4)],
            "positives": int(labels.sum()), "negatives": int((~labels).sum())}


def evaluate_real(model: GlamModel, samples: list, refs: list[str]) -> dict:
    """Scores, localisation hits and FROC regions of ``model`` on real MIAS samples (full resolution)."""
    out = {"global": [], "local": [], "peak_hit": [], "top_region_hit": [], "chance": [], "regions": [],
           "masses": [], "other": []}
    for s in samples:
        m = s.image
        breast = m.breast_mask
        pred = model.run(m, mask=breast)
        out["global"].append(float(np.max(pred.scores)))
        out["local"].append(float(np.max(pred.local_scores)))
        fused = np.max([pred.geometry.inverse(pred.fused[c], mode="bilinear") for c in (0, 1)], axis=0)
        fused = np.where(breast, fused, 0.0)
        masses = [l.mask for l in s.lesions if l.kind == "mass" and l.mask is not None]
        out["masses"].append(masses)
        out["other"].append([l.mask for l in s.lesions if l.kind != "mass" and l.mask is not None])
        regions = detections_from_map(fused, threshold=0.05)
        out["regions"].append(regions)
        if masses:
            union = np.logical_or.reduce(masses)
            r, c = np.unravel_index(int(np.argmax(fused)), fused.shape)
            out["peak_hit"].append(bool(union[r, c]))
            if regions:
                _, rr, cc = max(regions)
                out["top_region_hit"].append(bool(union[int(round(rr)), int(round(cc))]))
            else:
                out["top_region_hit"].append(False)
            out["chance"].append(float((union & breast).sum() / max(1, breast.sum())))
    return out


def image_aucs(ev: dict, abnormal: np.ndarray, mass: np.ndarray, women: np.ndarray) -> dict:
    """Abnormal-vs-normal and mass-vs-normal AUCs of the global and local scores."""
    normal = ~abnormal
    result = {}
    for key in ("global", "local"):
        s = np.asarray(ev[key])
        keep = mass | normal
        result[key] = {"abnormal_vs_normal": _auc_block(s, abnormal, women),
                       "mass_vs_normal": _auc_block(s[keep], mass[keep], women[keep])}
    return result


def localisation(ev: dict) -> dict:
    n = len(ev["peak_hit"])
    froc = lesion_froc(ev["regions"], ev["masses"], ignore=ev["other"])
    return {"images_with_located_mass": n,
            "peak_in_mass": round(float(np.mean(ev["peak_hit"])), 4) if n else None,
            "top_region_centroid_in_mass": round(float(np.mean(ev["top_region_hit"])), 4) if n else None,
            "chance_mass_share_of_breast": round(float(np.mean(ev["chance"])), 4) if n else None,
            "froc_fused_regions": {"sensitivity_at": {str(k): round(v, 4) for k, v in froc.sensitivity_at.items()},
                                   "masses": froc.n_regions, "images": froc.n_images}}


def hybrid_check(model: GlamModel, mias: Path, fold: int, copies: int, seed: int, cache: Path,
                 mass_contrast: tuple[float, float] | None = None) -> dict:
    """AUC (inserted mass vs none) on fold ``fold``'s hybrids, on GLAM's grid (the training cache);
    ``mass_contrast`` as ``dicom-ai train glam --mass-contrast`` (None: the default insertion)."""
    kwargs, tag = {}, f"-s{seed}-c{copies}"
    if mass_contrast is not None:
        kwargs["config"] = InsertionConfig(mass_contrast=tuple(mass_contrast))
        tag += "-mc{:g}-{:g}".format(*mass_contrast)
    ds = open_dataset("hybrid:mias-normals", mias, seed=seed, copies=copies, kinds=HYBRID_KINDS, **kwargs)
    views, _ = dataset_views(ds, "hybrid:mias-normals", model.config,
                             fold_of=lambda i: ds.background.fold_of[Path(ds.records[i].path).stem],
                             cache_dir=cache, cache_tag=tag)
    idx = np.flatnonzero(views.folds == fold)
    scores = [float(np.max(model.run(views.mammograms[i], mask=views.breast_masks[i]).scores)) for i in idx]
    labels = views.labels[idx].max(1) > 0
    ci = bootstrap_ci(roc_auc, scores, labels, n=2000, seed=0)
    return {"mass_contrast": list(mass_contrast or InsertionConfig().mass_contrast),
            "images": int(idx.size), "with_inserted_mass": int(labels.sum()),
            "auc_inserted_vs_none": round(roc_auc(scores, labels), 4), "ci95_images": [round(ci.low, 4), round(ci.high, 4)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mias", type=Path, default=Path("/work/data/mias"))
    p.add_argument("--bundles", type=Path, default=Path("/work/data/glam-hybrid"),
                   help="folder with fold<k> bundles, each fine-tuned without fold k")
    p.add_argument("--folds", type=int, nargs="+", default=[0])
    p.add_argument("--reference", default="glam", help="bundle compared on the same images (default models/glam)")
    p.add_argument("--train", action="store_true", help="fine-tune missing fold bundles first (--recipe)")
    p.add_argument("--train-all", action="store_true",
                   help="also fine-tune the all-folds bundle (<bundles>/all, stages before the last in all-stage<i>)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="long", help="the RECIPES entry --train uses")
    p.add_argument("--work-cache", type=Path, default=ROOT / "build" / "glam-work")
    p.add_argument("--no-hybrid-check", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "glam_hybrid.json")
    p.add_argument("--ship", type=Path, nargs=2, metavar=("STAGE1", "STAGE2"), default=None,
                   help="instead of evaluating: write the all-folds curriculum bundle STAGE2 (fine-tuned from "
                        "STAGE1) to --ship-to with a manifest naming the curriculum and the CV figures of --cv")
    p.add_argument("--ship-to", type=Path, default=ROOT / "models" / "glam")
    p.add_argument("--ship-version", default="0.3.0")
    p.add_argument("--cv", type=Path, default=RESULTS / "glam_hybrid_curriculum_folds01234.json",
                   help="the five-fold result (this bench's JSON) that --ship records")
    args = p.parse_args(argv)
    if args.ship:
        ship(*args.ship, cv=args.cv, out=args.ship_to, version=args.ship_version)
        return 0
    torch.set_num_threads(1)
    t0 = time.time()
    reference = GlamModel.from_bundle(load_bundle(args.reference), "cpu")
    ref_manifest = load_bundle(args.reference).manifest
    per_fold, pooled = {}, {"tuned": [], "reference": [], "abnormal": [], "mass": [], "women": []}
    if args.train_all:
        train_fold(None, args.mias, args.bundles / "all", args.bundles / "run-all", args.bundles / "all.log", args.recipe)
    for k in args.folds:
        folder = args.bundles / f"fold{k}"
        if args.train and not (folder / "manifest.json").is_file():
            train_fold(k, args.mias, folder, args.bundles / f"run-fold{k}", args.bundles / f"fold{k}.log", args.recipe)
        bundle = load_bundle(folder)
        trained_on = bundle.manifest["training"].get("folds")
        if not isinstance(trained_on, list) or k in trained_on:
            raise SystemExit(f"{folder}: trained on folds {trained_on}; fold {k} must be held out")
        model = GlamModel.from_bundle(bundle, "cpu")
        data = MIASDataset(args.mias, folds=[k])
        samples = [data[i] for i in range(len(data))]
        refs = [r.extra["reference"] for r in data.records]
        abnormal = np.array([any(r.labels.values()) for r in data.records])
        mass = np.array([any(l.kind == "mass" for l in s.lesions) for s in samples])
        women = np.array([mias_woman(r) for r in refs])
        ev, ev_ref = evaluate_real(model, samples, refs), evaluate_real(reference, samples, refs)
        per_fold[str(k)] = {
            "bundle": f"{bundle.identity.name} {bundle.identity.version}", "trained_on_folds": trained_on,
            "command": bundle.manifest["training"]["command"],
            "training_sources": [{key: s.get(key) for key in ("dataset", "images", "with_mass", "folds", "copies")}
                                 for s in bundle.manifest["training"].get("sources", [])],
            "images": len(samples), "abnormal": int(abnormal.sum()), "mass_images": int(mass.sum()),
            "normal": int((~abnormal).sum()), "women": int(np.unique(women).size),
            "auc": image_aucs(ev, abnormal, mass, women), "localisation": localisation(ev),
            "reference": {"auc": image_aucs(ev_ref, abnormal, mass, women), "localisation": localisation(ev_ref)},
            "history": bundle.manifest["training"].get("history"),
        }
        if not args.no_hybrid_check:
            per_fold[str(k)]["held_out_hybrids"] = hybrid_check(model, args.mias, k, 4, 0, args.work_cache)
            trained = [s.get("mass_contrast") for s in bundle.manifest["training"].get("sources", [])
                       if s.get("dataset", "").startswith("hybrid:")]
            if trained and trained[0] and list(trained[0]) != list(InsertionConfig().mass_contrast):
                per_fold[str(k)]["held_out_hybrids_training_contrast"] = hybrid_check(
                    model, args.mias, k, 4, 0, args.work_cache, mass_contrast=tuple(trained[0]))
        pooled["tuned"].append(ev)
        pooled["reference"].append(ev_ref)
        pooled["abnormal"].append(abnormal)
        pooled["mass"].append(mass)
        pooled["women"].append(women)
        print(f"fold {k} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    result = {
        "benchmark": "GLAM fine-tuned on hybrid MIAS (inserted masses) + real MIAS training folds, on real held-out MIAS",
        "data": "mini-MIAS 322 MLO images (200 um), mias_folds (patient level); hybrids: hybrid:mias-normals "
                "(dicom_ai.data.insertion, masses only) from the training folds' NORM images",
        "licence": MIASDataset(args.mias).licence,
        "bundles_trained_by": sorted({f["command"] for f in per_fold.values()}),
        "reference_bundle": f"{ref_manifest['name']} {ref_manifest['version']}: fine-tuned on all five MIAS folds "
                            "(the held-out fold included), so its figure on that fold is not held out",
        "folds": per_fold,
        "minutes": round((time.time() - t0) / 60, 1),
    }
    if len(args.folds) > 1:
        cat = lambda evs, key: [v for e in evs for v in e[key]]  # noqa: E731
        ab, ms, wo = (np.concatenate(pooled[k]) for k in ("abnormal", "mass", "women"))
        result["pooled"] = {}
        for name in ("tuned", "reference"):
            evs = pooled[name]
            merged = {key: cat(evs, key) for key in evs[0]}
            result["pooled"][name] = {"auc": image_aucs(merged, ab, ms, wo), "localisation": localisation(merged)}
    earlier = RESULTS / "glam_mias.json"
    if earlier.is_file():
        old = json.loads(earlier.read_text())
        result["earlier_cv_shipped_recipe"] = {
            "source": "benchmarks/results/glam_mias.json (phantom GLAM fine-tuned on 4 real folds, 5-fold CV, "
                      "all 322 held-out images, mass labels; not per fold)",
            "any_mass_global": old["auc"]["glam_global_prediction"]["any_mass"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = _table(result)
    args.out.with_suffix(".md").write_text("```\n" + table + "```\n")
    print(table, end="")
    print(f"wrote {args.out}")
    return 0


def ship(stage1: Path, stage2: Path, cv: Path, out: Path, version: str) -> None:
    """Write the all-folds curriculum bundle ``stage2`` to ``out``: weights copied byte for byte, the
    manifest of ``stage2`` with the version, the first (conspicuous) stage, what the run started
    from (the bundle ``out`` held before) and the five-fold figures of ``cv``."""
    first = json.loads((stage1 / "manifest.json").read_text())
    manifest = json.loads((stage2 / "manifest.json").read_text())
    before = json.loads((out / "manifest.json").read_text())
    result = json.loads(cv.read_text())
    if sorted(result["folds"]) != [str(k) for k in range(5)]:
        raise SystemExit(f"{cv}: needs the five-fold result (folds {sorted(result['folds'])})")
    for m, folds in ((first, [0, 1, 2, 3, 4]), (manifest, [0, 1, 2, 3, 4])):
        if m["training"].get("folds") != folds:
            raise SystemExit(f"{m['name']} {m['version']}: trained on folds {m['training'].get('folds')}, not all five")
    weights = (stage2 / "weights.safetensors").read_bytes()
    if hashlib.sha256(weights).hexdigest() != manifest["weights_sha256"]:
        raise SystemExit(f"{stage2}: weights do not match the manifest's digest")

    def auc(block):
        return {"auc": block["auc"], "ci95_images": block["ci95_images"], "ci95_women": block["ci95_women"],
                "positives": block["positives"], "negatives": block["negatives"]}

    pooled = result["pooled"]
    manifest["version"] = version
    manifest["intended_use"] = (
        "research / demonstration, not for clinical use: an image-level mass score (benign / malignant "
        "channels; the node's image score) with held-out signal on mini-MIAS (5-fold CV, abnormal vs normal "
        f"{pooled['tuned']['auc']['global']['abnormal_vs_normal']['auc']:.2f}); its maps do not localise masses "
        "and are off at every named operating point")
    old_training = {k: v for k, v in before["training"].items() if k not in ("history", "fine_tuning")}
    manifest["training"]["initialisation"] = {
        "bundle": f"{before['name']} {before['version']} (models/glam before {version})",
        "its_training": {**old_training, "fine_tuning": {k: v for k, v in before["training"].get("fine_tuning", {}).items()
                                                         if k != "history"}},
        "caveat": "the starting bundle was fine-tuned on all 322 mini-MIAS images (every fold's labels), so the "
                  "fold bundles of the cross-validation below started from weights that had seen their held-out "
                  "fold's labels: the CV figures can only be flattered by it (that bundle itself scores "
                  f"{pooled['reference']['auc']['global']['abnormal_vs_normal']['auc']:.2f} on the same images)"}
    manifest["training"]["curriculum"] = {
        "why": "trained on realistic inserted masses directly, GLAM learns neither them nor real masses "
               "(benchmarks/results/glam_hybrid_{short,long}_fold0.json); conspicuous ones first, then realistic, it does",
        "stage_1_conspicuous": {"version": first["version"], "command": first["training"]["command"],
                                "sources": first["training"]["sources"], "stages": first["training"]["stages"],
                                "lr": first["training"]["lr"], "history": first["training"].get("history")},
        "stage_2_realistic": "this manifest's command, sources, stages and history (initialised from stage 1)"}
    manifest["metrics"] = {
        **manifest.get("metrics", {}),
        "mini_mias_cross_validation": {
            "source": "benchmarks/results/glam_hybrid_curriculum_folds01234.json (benchmarks/bench_glam_hybrid.py)",
            "protocol": "5 patient-level folds (dicom_ai.data.datasets.mias_folds); fold k's bundles trained by the "
                        "same two commands with --folds = the other four; fold k's 64-66 real images scored at full "
                        "resolution through GlamModel.run (the node's path); score = global prediction, max of the "
                        "two channels (the node's image score); 322 images, 161 women pooled",
            "fold_commands_stage_2": sorted(result["bundles_trained_by"]),
            "fold_commands_stage_1": "stage_1_conspicuous's command with --folds = the other four folds",
            "pooled": {"abnormal_vs_normal": auc(pooled["tuned"]["auc"]["global"]["abnormal_vs_normal"]),
                       "mass_vs_normal": auc(pooled["tuned"]["auc"]["global"]["mass_vs_normal"]),
                       "local_score_abnormal_vs_normal": auc(pooled["tuned"]["auc"]["local"]["abnormal_vs_normal"]),
                       "localisation": pooled["tuned"]["localisation"]},
            "per_fold_abnormal_vs_normal": {k: auc(f["auc"]["global"]["abnormal_vs_normal"])
                                            for k, f in result["folds"].items()},
            "per_fold_mass_vs_normal": {k: auc(f["auc"]["global"]["mass_vs_normal"]) for k, f in result["folds"].items()},
            "held_out_hybrids_auc": {k: f.get("held_out_hybrids", {}).get("auc_inserted_vs_none")
                                     for k, f in result["folds"].items()},
            "before": {"bundle": f"{before['name']} {before['version']}",
                       "same_images_not_held_out": {
                           "abnormal_vs_normal": auc(pooled["reference"]["auc"]["global"]["abnormal_vs_normal"]),
                           "mass_vs_normal": auc(pooled["reference"]["auc"]["global"]["mass_vs_normal"])},
                       "its_recipe_cv": before.get("metrics", {}).get("mini_mias_cross_validation", {})
                       .get("auc", {}).get("glam_global_prediction")},
            "note": "figures of the fold bundles; the all-folds weights shipped here hold nothing out"}}
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stage2 / "weights.safetensors", out / "weights.safetensors")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out} ({manifest['name']} {version})")


def _cell(b: dict) -> str:
    return f"{b['auc']:.3f} [{b['ci95_images'][0]:.2f},{b['ci95_images'][1]:.2f}] w[{b['ci95_women'][0]:.2f},{b['ci95_women'][1]:.2f}]"


def _table(result: dict) -> str:
    """The short table of per-fold and pooled AUCs (printed and written beside the JSON as .md)."""
    lines = []
    lines.append(f"{'fold / model':34s} {'abnormal vs normal (global)':>36s} {'mass vs normal (global)':>36s} {'peak in mass':>12s}")
    rows = [(f"fold {k}", f) for k, f in result["folds"].items()]
    if "pooled" in result:
        rows.append(("pooled", {"auc": result["pooled"]["tuned"]["auc"],
                                "localisation": result["pooled"]["tuned"]["localisation"],
                                "reference": result["pooled"]["reference"]}))
    for name, f in rows:
        for label, block in (("hybrid-tuned", f), ("reference (saw fold)", f["reference"])):
            a = block["auc"]["global"]
            loc = block["localisation"]
            lines.append(f"{name + ' ' + label:34s} {_cell(a['abnormal_vs_normal']):>36s} {_cell(a['mass_vs_normal']):>36s} "
                         f"{loc['peak_in_mass'] if loc['peak_in_mass'] is not None else '-':>12}")
        if "held_out_hybrids" in f:
            h = f["held_out_hybrids"]
            lines.append(f"{name + ' held-out hybrids':34s} AUC inserted vs none {h['auc_inserted_vs_none']:.3f} "
                         f"[{h['ci95_images'][0]:.2f},{h['ci95_images'][1]:.2f}] ({h['images']} images)")
        if "held_out_hybrids_training_contrast" in f:
            h = f["held_out_hybrids_training_contrast"]
            lines.append(f"{name + ' same, training contrast':34s} AUC inserted vs none {h['auc_inserted_vs_none']:.3f} "
                         f"[{h['ci95_images'][0]:.2f},{h['ci95_images'][1]:.2f}] (mass contrast {h['mass_contrast']})")
    if "earlier_cv_shipped_recipe" in result:
        e = result["earlier_cv_shipped_recipe"]["any_mass_global"]
        lines.append(f"earlier 5-fold CV (real folds only): any mass {e['auc']:.3f} [{e['ci95'][0]:.2f},{e['ci95'][1]:.2f}]")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
