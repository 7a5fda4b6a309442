"""GLAM benchmark: quality on held-out phantoms, speed and memory per study, real-image overlays.

Quality (compact bundle in models/glam): image-level ROC AUC (benign, malignant) with
bootstrap 95 % CIs, and Dice of three maps against the pixel ground truth (lesion =
mass | calcification-cluster region of the class), on the stored source grid:

* GLAM fused map ``(S_local pasted + S_global up) / 2``;
* the global module's map ``S_g`` alone, upsampled (GMIC-like);
* a plain CAM classifier (same global backbone, GAP + linear head), trained by
  ``dicom-ai train glam --baseline cam`` on the same phantoms with the same seed and epochs.

Dice follows the metric conventions of models.md section 4: per image, averaged over test
images that contain a lesion of the class; binarised at 0.5, at each method's own best
threshold chosen on the validation phantoms, and soft Dice. Speed: wall and CPU seconds and
peak resident memory per full-size (3328 x 2560) four-view phantom study through
``GlamModel.predict`` (preprocessing, network, mapping back to the source grid), each config
in its own process. Overlays: the bundle on the four real CC images of shared/data/real.

Run: ``.venv/bin/python benchmarks/bench_glam.py`` (``--skip-speed``, ``--skip-overlays``).
Results: benchmarks/results/glam.json; overlays of the shared real images: build/previews/glam_overlay_*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_ai.networks.bundle import load_bundle  # noqa: E402
from dicom_ai.networks.glam import CONFIGS, CamClassifier, Glam, GlamModel, glam_input  # noqa: E402
from dicom_ai.data.metrics import bootstrap_ci, dice, roc_auc, soft_dice  # noqa: E402
from dicom_ai.training.glam import GlamData, load_phantoms  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# Pictures of real images (the shared FFDM exams, mini-MIAS) are derived data: their sources may not be
# committed, so they go to build/ (ignored), never to benchmarks/results.
PREVIEWS = ROOT / "build" / "previews"
REAL = Path(os.environ.get("DICOM_AI_REAL_DIR", ROOT.parent / "shared" / "data" / "real"))
CACHE = ROOT / "build" / "glam-cache"
TEST_SEED, TEST_STUDIES = 50_000, 100
VAL_SEED, VAL_STUDIES = 11_200, 50  # the validation set of the shipped bundle (train seeds 10000-11199)
THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


# --------------------------------------------------------------------------- maps per method


def glam_maps(model: GlamModel, data: GlamData):
    """Per image: fused and global maps on the source grid (2, rows, cols) and scores."""
    out = []
    for m, inside in zip(data.mammograms, data.breast_masks):
        pred = model.run(m, mask=inside)
        back = lambda a: np.stack([np.where(inside, pred.geometry.inverse(a[c], mode="bilinear"), 0.0)  # noqa: E731
                                   for c in (0, 1)])
        out.append({"fused": back(pred.fused), "global": back(pred.global_map), "score": pred.scores,
                    "local_score": pred.local_scores})
    return out


def cam_maps(net: CamClassifier, data: GlamData, config):
    """Per image: sigmoid(CAM) upsampled bilinearly, on the source grid, zero outside the breast, and scores."""
    out = []
    net.eval()
    with torch.inference_mode():
        for i, m in enumerate(data.mammograms):
            x, _, geo = glam_input(m, config, mask=data.breast_masks[i])
            pred, cam = net(torch.from_numpy(x)[None, None])
            up = torch.nn.functional.interpolate(torch.sigmoid(cam), size=config.input_shape, mode="bilinear",
                                                 align_corners=False)[0].numpy()
            # The same breast mask as GLAM's maps: no method is scored on background pixels.
            inside = data.breast_masks[i]
            out.append({"cam": np.stack([np.where(inside, geo.inverse(up[c], mode="bilinear"), 0.0) for c in (0, 1)]),
                        "score": pred[0].numpy()})
    return out


# --------------------------------------------------------------------------- metrics


def dice_table(maps: list[dict], key: str, data: GlamData, c: int) -> dict:
    """Dice of ``maps[i][key][c]`` per threshold, soft Dice, over images with a class-c lesion."""
    rows = [i for i in range(len(data)) if data.lesions[i, c].any()]
    per_image = {float(t): [dice(maps[i][key][c], data.lesions[i, c], threshold=float(t)) for i in rows]
                 for t in THRESHOLDS}
    soft = [soft_dice(maps[i][key][c], data.lesions[i, c]) for i in rows]
    return {"images": len(rows), "dice_by_threshold": {t: float(np.mean(v)) for t, v in per_image.items()},
            "per_image": per_image, "soft_dice": float(np.mean(soft)), "soft_per_image": soft}


def mean_ci(values, n: int = 2000, seed: int = 0) -> list[float]:
    """Bootstrap 95 % interval of the mean of per-image values (images resampled)."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boots = [v[rng.integers(0, v.size, v.size)].mean() for _ in range(n)] if v.size else [float("nan")]
    return [round(float(np.percentile(boots, 2.5)), 4), round(float(np.percentile(boots, 97.5)), 4)]


def bootstrap_auc(scores, labels) -> list[float]:
    ci = bootstrap_ci(roc_auc, scores, labels, n=2000, seed=0)
    return [round(ci.low, 4), round(ci.high, 4)]


def quality(bundle_dir: str, cam_path: Path) -> dict:
    torch.set_num_threads(1)
    bundle = load_bundle(bundle_dir)
    model = GlamModel.from_bundle(bundle, "cpu")
    config = model.config
    shape = (int(round(3328 * 0.07 / config.pixel_spacing_mm)), int(round(2560 * 0.07 / config.pixel_spacing_mm)))
    val = load_phantoms(VAL_SEED, VAL_STUDIES, shape, CACHE, progress=False)
    test = load_phantoms(TEST_SEED, TEST_STUDIES, shape, CACHE, progress=False)
    from safetensors.torch import load_file

    cam = CamClassifier(config)
    cam.load_state_dict(load_file(str(cam_path)))
    methods = {}
    t0 = time.time()
    g_val, g_test = glam_maps(model, val), glam_maps(model, test)
    c_val, c_test = cam_maps(cam, val, config), cam_maps(cam, test, config)
    print(f"maps computed in {time.time() - t0:.0f} s", file=sys.stderr)
    for name, key, mv, mt in (("glam_fused", "fused", g_val, g_test), ("global_only_gmic_like", "global", g_val, g_test),
                              ("cam_classifier", "cam", c_val, c_test)):
        entry = {}
        for c, cls in ((0, "benign"), (1, "malignant")):
            v = dice_table(mv, key, val, c)
            best_t = max(v["dice_by_threshold"], key=v["dice_by_threshold"].get)
            t = dice_table(mt, key, test, c)
            entry[cls] = {"test_images_with_lesion": t["images"],
                          "dice_at_0.5": round(t["dice_by_threshold"][0.5], 4),
                          "val_best_threshold": best_t,
                          "dice_at_val_best_threshold": round(t["dice_by_threshold"][best_t], 4),
                          "dice_at_val_best_threshold_ci95": mean_ci(t["per_image"][best_t]),
                          "oracle_best_test_dice": round(max(t["dice_by_threshold"].values()), 4),
                          "soft_dice": round(t["soft_dice"], 4), "soft_dice_ci95": mean_ci(t["soft_per_image"])}
        methods[name] = entry
    _phantom_examples(g_test, c_test, test, RESULTS / "glam_phantom_examples.png")
    aucs = {}
    for name, maps, key in (("glam_global_prediction", g_test, "score"), ("glam_local_prediction", g_test, "local_score"),
                            ("cam_classifier", c_test, "score")):
        scores = np.stack([m[key] for m in maps])
        aucs[name] = {cls: {"auc": round(roc_auc(scores[:, c], test.labels[:, c]), 4),
                            "ci95": bootstrap_auc(scores[:, c], test.labels[:, c])}
                      for c, cls in ((0, "benign"), (1, "malignant"))}
    gains = {}
    for cls in ("benign", "malignant"):
        gains[cls] = {}
        for metric in ("dice_at_val_best_threshold", "soft_dice", "dice_at_0.5"):
            f, g = methods["glam_fused"][cls][metric], methods["global_only_gmic_like"][cls][metric]
            gains[cls][metric] = round(100 * (f - g) / g, 1) if g > 0 else None
    return {"bundle": bundle.manifest["name"] + " " + str(bundle.manifest["version"]),
            "test_set": f"{TEST_STUDIES} phantom studies ({len(test)} views), seeds {TEST_SEED}-"
                        f"{TEST_SEED + TEST_STUDIES - 1}, shape {shape}; positives benign "
                        f"{int(test.labels[:, 0].sum())}, malignant {int(test.labels[:, 1].sum())}",
            "validation_set": f"{VAL_STUDIES} studies from seed {VAL_SEED} (thresholds only)",
            "auc": aucs, "dice": methods, "relative_gain_fused_over_global_percent": gains,
            "paper_relative_gain_percent": {"benign": 39.6, "malignant": 20.0}}


def learning_curve(bundle_dir: str, out_path: Path) -> dict:
    """Train BCE and validation AUC per epoch of the bundle's phantom training, as a PNG."""
    manifest = load_bundle(bundle_dir).manifest
    history = [h for h in manifest["training"]["history"] if "val_auc_benign" in h]
    pre = manifest["training"].get("initialisation")
    fig = Figure(figsize=(9, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(1, len(history) + 1)
    labels = [f"{h['stage'][0]}{h['epoch']}" for h in history]
    for key, name in (("bce_g", "global BCE"), ("bce_l", "local BCE")):
        ys = [h.get(key, np.nan) for h in history]
        ax1.plot(x, ys, marker="o", label=name)
    ax1.set_title("training loss (image-level BCE)")
    for key, name in (("val_auc_benign", "benign"), ("val_auc_malignant", "malignant")):
        ax2.plot(x, [h[key] for h in history], marker="o", label=name)
    ax2.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax2.set_ylim(0.4, 1.0)
    ax2.set_title("validation image AUC (200 views)")
    for ax in (ax1, ax2):
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_xlabel("stage/epoch (g global, l local, j joint)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{manifest['name']} {manifest['version']}: "
                 + ("Genesis-pretrained" if isinstance(pre, dict) else "random init"), fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    return {"png": str(out_path.relative_to(ROOT)), "epochs": len(history),
            "final_val_auc": {k: history[-1][k] for k in ("val_auc_benign", "val_auc_malignant")} if history else None}


def _phantom_examples(g_maps, c_maps, data: GlamData, out_path: Path, n: int = 4, rows: int = 220) -> None:
    """Test phantoms with a lesion: image + truth outline, CAM, global and fused malignant/benign maps."""
    from PIL import Image

    picks = [i for i in range(len(data)) if data.lesions[i, 1].any()][:n // 2]
    picks += [i for i in range(len(data)) if data.lesions[i, 0].any() and i not in picks][:n - len(picks)]
    lines = []
    for i in picks:
        c = 1 if data.lesions[i, 1].any() else 0
        img = data.mammograms[i].pixels
        truth = data.lesions[i, c]
        edge = truth ^ np.roll(truth, 1, 0) | truth ^ np.roll(truth, 1, 1)
        base = np.stack([img] * 3, -1)
        first = base.copy()
        first[edge] = (1, 0, 0) if c else (0, 1, 0)
        panels = [first]
        for m in (c_maps[i]["cam"][c], g_maps[i]["global"][c], g_maps[i]["fused"][c]):
            heat = np.clip(m, 0, 1)[..., None]
            panel = base * (1 - 0.7 * heat) + np.array((1.0, 0.9, 0.0)) * 0.7 * heat
            panel[edge] = (1, 0, 0) if c else (0, 1, 0)
            panels.append(panel)
        line = np.concatenate(panels, axis=1)
        h, w = line.shape[:2]
        lines.append(np.asarray(Image.fromarray((np.clip(line, 0, 1) * 255).astype(np.uint8))
                                .resize((int(w * rows / h), rows), Image.BILINEAR)))
    Image.fromarray(np.concatenate(lines, axis=0)).save(out_path, optimize=True)


# --------------------------------------------------------------------------- speed


def _conv_macs(net: torch.nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of every convolution in one forward pass."""
    total = [0]

    def hook(mod, inp, out):
        total[0] += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        net(x)
    for h in handles:
        h.remove()
    return float(total[0])


def speed_child(config_name: str, threads: int) -> dict:
    """Time one full-size four-view study; runs in its own process so peak RSS is its own."""
    from dicom_ai.data.phantom import FULL_SHAPE, generate_study
    from dicom_ai.imaging import read_mammogram

    torch.set_num_threads(threads)
    cache = ROOT / "build" / "glam-fullsize-study.npz"
    if cache.is_file():
        z = np.load(cache)
        from dicom_ai.imaging import mammogram_from_array

        mammograms = [mammogram_from_array(z[f"p{i}"].astype(np.float32), str(z["lat"][i]), str(z["view"][i]),
                                           (0.07, 0.07)) for i in range(4)]
    else:
        study = generate_study(7, shape=FULL_SHAPE)
        mammograms = [read_mammogram(img.dataset) for img in study.images]
        np.savez(cache, **{f"p{i}": m.pixels.astype(np.float16) for i, m in enumerate(mammograms)},
                 lat=[m.laterality for m in mammograms], view=[m.view for m in mammograms])
    if config_name == "compact":
        model = GlamModel.from_bundle(load_bundle(ROOT / "models" / "glam"), "cpu")
    else:  # untrained weights: the cost does not depend on their values
        torch.manual_seed(0)
        net = Glam(CONFIGS[config_name])
        from dicom_ai.core.findings import ModelIdentity

        model = GlamModel(net, ModelIdentity("glam-paper-untrained", "0"), {}, "cpu")
    cfg = model.config
    macs_global = _conv_macs(model.network.global_net, torch.zeros(1, 1, *cfg.input_shape))
    macs_local = _conv_macs(model.network.local_net, torch.zeros(cfg.num_patches, 1, cfg.patch_size, cfg.patch_size))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_view = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for m in mammograms:
        c, w = time.process_time(), time.perf_counter()
        out = model.predict(m)
        assert out.maps[0].probability.shape == m.shape
        per_view.append({"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(time.process_time() - c, 2)})
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    macs = 4 * (macs_global + macs_local)
    return {"config": config_name, "threads": threads, "study_wall_s": round(wall, 2), "study_cpu_s": round(cpu, 2),
            "per_view": per_view, "gmac_per_view": round((macs_global + macs_local) / 1e9, 2),
            "gmac_global_per_view": round(macs_global / 1e9, 2), "gmac_local_per_view": round(macs_local / 1e9, 2),
            "achieved_gflops_per_cpu_second": round(2 * macs / 1e9 / cpu, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_inference_mib": round(rss_before, 1),
            "params_millions": round(sum(p.numel() for p in model.network.parameters()) / 1e6, 3),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def speed(threads: int) -> dict:
    results = {}
    for name in ("compact", "paper"):
        proc = subprocess.run([sys.executable, __file__, "--speed-child", name, "--threads", str(threads)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            results[name] = {"error": proc.stderr[-2000:]}
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"device": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores shared "
                      f"with other jobs; no GPU was lent to this task, so no GPU/bf16 timing",
            "configs": results}


# --------------------------------------------------------------------------- overlays


def overlays(bundle_dir: str) -> list[dict]:
    """The bundle on the real CC images; small PNGs with benign/malignant maps and patches."""
    from PIL import Image

    from dicom_ai.imaging import mammogram_from_array

    torch.set_num_threads(1)
    model = GlamModel.from_bundle(load_bundle(bundle_dir), "cpu")
    notes = []
    for path in sorted(REAL.glob("*_CC.png")):
        raw = np.asarray(Image.open(path), dtype=np.float32) / 65535.0
        lat = "L" if "_L_" in path.name else "R"
        # 3328 x 2560 FFDM: 0.07 mm pixels assumed (the PNG carries no spacing).
        m = mammogram_from_array(raw, lat, "CC", spacing_mm=(0.07, 0.07))
        pred = model.run(m)
        out = model.to_output(pred)
        scores, geo = pred.scores, pred.geometry
        maps = {p.finding: p.probability for p in out.maps}
        out_path = PREVIEWS / f"glam_overlay_{path.stem}.png"
        _save_overlay(raw, maps, pred, model.config, out_path)
        notes.append({"image": path.name, "score_benign": round(float(scores[0]), 4),
                      "score_malignant": round(float(scores[1]), 4),
                      "max_map_benign": round(float(maps["benign_lesion"].max()), 4),
                      "max_map_malignant": round(float(maps["malignant_lesion"].max()), 4),
                      "window_box_source_rows_cols": list(geo.box), "overlay": str(out_path.relative_to(ROOT))})
    return notes


def overlay_panels(raw: np.ndarray, maps: dict, rows: int, alpha: float, scale_to_max: bool) -> tuple[np.ndarray, tuple]:
    """Image, benign-map and malignant-map panels side by side ((rows, 3 * cols, 3) in [0, 1]) and the panel size.

    ``scale_to_max`` divides each map by its maximum before blending (shape of the map, not its level).
    """
    from PIL import Image

    h, w = raw.shape
    size = (int(round(w * rows / h)), rows)
    gray = np.asarray(Image.fromarray((np.clip(raw, 0, 1) * 255).astype(np.uint8)).resize(size, Image.BILINEAR),
                      dtype=np.float32) / 255
    panels = [np.stack([gray] * 3, -1)]
    for finding, colour in (("benign_lesion", (0.1, 1.0, 0.1)), ("malignant_lesion", (1.0, 0.15, 0.1))):
        p = np.asarray(Image.fromarray(maps[finding].astype(np.float32)).resize(size, Image.BILINEAR))
        if scale_to_max:
            p = p / max(float(p.max()), 1e-6)
        a = np.clip(p, 0, 1)[..., None] * alpha
        panels.append(np.stack([gray] * 3, -1) * (1 - a) + np.array(colour) * a)
    return np.concatenate(panels, axis=1), size


def _save_overlay(raw, maps, pred, config, out_path: Path, rows: int = 360) -> None:
    from PIL import Image, ImageDraw

    h, w = raw.shape
    panels, size = overlay_panels(raw, maps, rows, alpha=0.6, scale_to_max=True)
    canvas = Image.fromarray((panels * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    # Selected patches, mapped from the input grid through the geometry to the source grid.
    geo = pred.geometry
    sy, sx = (geo.box[1] - geo.box[0]) / config.input_shape[0], (geo.box[3] - geo.box[2]) / config.input_shape[1]
    for r, c in pred.patch_corners.tolist():
        r0, r1 = geo.box[0] + r * sy, geo.box[0] + (r + config.patch_size) * sy
        c0, c1 = geo.box[2] + c * sx, geo.box[2] + (c + config.patch_size) * sx
        if geo.flip:
            c0, c1 = w - c1, w - c0
        for k in range(3):
            off = k * size[0]
            draw.rectangle([off + c0 * size[0] / w, r0 * rows / h, off + c1 * size[0] / w, r1 * rows / h],
                           outline=(255, 255, 0))
    draw.text((4, 4), "image + patch", fill=(255, 255, 0))
    draw.text((size[0] + 4, 4), "benign map", fill=(120, 255, 120))
    draw.text((2 * size[0] + 4, 4), "malignant map", fill=(255, 120, 120))
    canvas.save(out_path, optimize=True)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(ROOT / "models" / "glam"))
    parser.add_argument("--cam", default=str(ROOT / "build" / "glam-cam" / "cam.safetensors"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-overlays", action="store_true")
    parser.add_argument("--speed-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.speed_child:
        print(json.dumps(speed_child(args.speed_child, args.threads)))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    PREVIEWS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / "glam.json"

    def update(key: str, value) -> dict:
        # Re-read first: the sections may run as separate invocations.
        result = json.loads(out_path.read_text()) if out_path.is_file() else {}
        result[key] = value
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        return result

    if not args.skip_quality:
        update("quality", quality(args.bundle, Path(args.cam)))
        update("learning_curve", learning_curve(args.bundle, RESULTS / "glam_learning_curve.png"))
    if not args.skip_overlays:
        update("real_images", overlays(args.bundle) if REAL.is_dir() else f"{REAL} not found; overlays skipped")
    if not args.skip_speed:
        update("speed", speed(args.threads))
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    _print_table(result)
    print(f"wrote {out_path}")
    return 0


def _print_table(result: dict) -> None:
    q = result.get("quality")
    if q:
        print(f"{'method':28s} {'class':10s} {'Dice@0.5':>9s} {'Dice@valT':>9s} {'softDice':>9s}")
        for name, entry in q["dice"].items():
            for cls, v in entry.items():
                print(f"{name:28s} {cls:10s} {v['dice_at_0.5']:9.4f} {v['dice_at_val_best_threshold']:9.4f} "
                      f"{v['soft_dice']:9.4f}")
        for name, entry in q["auc"].items():
            print(f"AUC {name:24s} benign {entry['benign']['auc']:.3f} {entry['benign']['ci95']}  "
                  f"malignant {entry['malignant']['auc']:.3f} {entry['malignant']['ci95']}")
        print("relative Dice gain fused over global (%):", json.dumps(q["relative_gain_fused_over_global_percent"]))
    s = result.get("speed")
    if s:
        for name, v in s["configs"].items():
            if "error" in v:
                print(f"speed {name}: error")
                continue
            print(f"speed {name:8s} study wall {v['study_wall_s']:8.1f} s  cpu {v['study_cpu_s']:8.1f} s  "
                  f"peak RSS {v['peak_rss_mib']:7.0f} MiB  {v['gmac_per_view']} GMAC/view")


if __name__ == "__main__":
    sys.exit(main())
