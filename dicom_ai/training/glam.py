"""`dicom-ai train glam`: train GLAM from image-level labels and write its model bundle.

Training follows the staged recipe of GLAM (models.md section 1.6): (a) the global module
with BCE on its top-t% pooled prediction plus an L1 sparsity term on its saliency map,
(b) the local module on the patches the frozen global module selects, with BCE on the
top-t% pooled local prediction plus L1 on the patch maps, (c) optional joint fine-tuning
with the sum of both losses. Only image-level benign/malignant labels reach the losses;
pixel ground truth, when the data has it, is used only to report validation Dice and to
pick the bundle's operating thresholds.

Checkpoints (safetensors, model and optimiser state, progress in the metadata) are written
after every epoch; ``--resume`` continues from the last one. Every epoch draws its data order
and augmentation from ``(seed, stage, epoch)``, so a fixed seed reproduces a run, resumed or not.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and torch are imported by the handlers, so `dicom-ai --help` stays fast
    import numpy as np

#: Breast size of a full-size phantom (3328 x 2560 at 0.07 mm), used to pick the phantom
#: shape that has a configuration's pixel spacing.
_FULL_SIZE = (3328, 2560)
_FULL_SPACING_MM = 0.07
STAGES = ("global", "local", "joint")
#: Below this validation Dice the calibrated operating point is not used (see calibrate_thresholds).
MIN_CALIBRATION_DICE = 0.05
INTENDED_USE = "research / demonstration, trained on synthetic phantoms, not for clinical use"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train glam``."""
    p = subparsers.add_parser(
        "glam", help="train GLAM (weakly supervised, image-level labels) and write a bundle",
        description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=("compact", "paper"), default="compact",
                   help="network configuration (default: compact, trains on a CPU)")
    p.add_argument("--out", default="models/glam", help="bundle folder to write (default: models/glam)")
    p.add_argument("--phantom-dir", default=None,
                   help="read studies from a phantom folder (dicom_ai.datasets) instead of generating them")
    p.add_argument("--train-studies", type=int, default=1200, help="generated training studies (4 views each)")
    p.add_argument("--val-studies", type=int, default=50, help="generated validation studies")
    p.add_argument("--first-seed", type=int, default=10_000, help="phantom seed of the first training study")
    p.add_argument("--shape", type=int, nargs=2, metavar=("ROWS", "COLS"), default=None,
                   help="phantom image shape (default: a full-size breast at the config's pixel spacing)")
    p.add_argument("--cache", default="build/glam-cache", help="folder for cached preprocessed phantoms")
    p.add_argument("--epochs-global", type=int, default=12)
    p.add_argument("--epochs-local", type=int, default=2)
    p.add_argument("--epochs-joint", type=int, default=1, help="0 skips joint fine-tuning")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4,
                   help="Adam learning rate, all stages (1e-3 stalls at the label prior on the phantoms)")
    p.add_argument("--beta", type=float, default=0.1,
                   help="weight of the L1 sparsity term (mean |saliency| over pixels and classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.add_argument("--workers", type=int, default=1,
                   help="processes generating phantom studies (the data do not depend on it)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: on a shared CPU a second thread mostly waits)")
    p.add_argument("--checkpoint-dir", default="build/glam-checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--baseline", choices=("none", "cam"), default="none",
                   help="cam: train the plain CAM classifier baseline instead (global backbone + GAP)")
    p.set_defaults(handler=_run)


# --------------------------------------------------------------------------- data


@dataclass
class GlamData:
    """Views ready for windowing: source pixels, breast masks and image-level labels.

    ``lesions`` (N, 2, rows, cols) bool holds the benign / malignant lesion ground truth for
    evaluation only; training never reads it.
    """

    mammograms: list
    breast_masks: list
    labels: np.ndarray  # (N, 2) float32: benign, malignant
    lesions: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.mammograms)


def phantom_shape_for(config) -> tuple[int, int]:
    """The phantom shape whose pixel spacing is the config's (the whole breast kept)."""
    f = _FULL_SPACING_MM / config.pixel_spacing_mm
    return int(round(_FULL_SIZE[0] * f)), int(round(_FULL_SIZE[1] * f))


def _phantom_views(seeds: range, shape: tuple[int, int]) -> tuple[list, list, list, list, list]:
    """Generate the studies of ``seeds``; per view: pixels, breast mask, labels, lesions, metadata."""
    import numpy as np

    from dicom_ai.data.phantom import generate_study
    from dicom_ai.imaging import breast_mask, read_mammogram

    pixels, masks, labels, lesions, meta = [], [], [], [], []
    for seed in seeds:
        study = generate_study(seed, shape=tuple(shape))
        for img in study.images:
            m = read_mammogram(img.dataset)
            pixels.append(m.pixels.astype(np.float16))
            masks.append(breast_mask(m.pixels))
            labels.append([float(img.labels["benign"]), float(img.labels["malignant"])])
            gt = img.masks
            lesions.append(np.stack([gt["mass_benign"] | gt["cluster_benign"],
                                     gt["mass_malignant"] | gt["cluster_malignant"]]))
            meta.append({"seed": seed, "laterality": m.laterality, "view": m.view,
                         "spacing_mm": list(m.spacing_mm), "faces_left": bool(m.faces_left)})
    return pixels, masks, labels, lesions, meta


def _generator_version() -> str:
    """The phantom cache key (:func:`dicom_ai.data.cache.generator_version`)."""
    from dicom_ai.data.cache import generator_version

    return generator_version()


def load_phantoms(first_seed: int, n_studies: int, shape: tuple[int, int], cache: str | Path | None,
                  progress: bool = True, workers: int = 1) -> GlamData:
    """Generate (or read from ``cache``) ``n_studies`` phantom studies as :class:`GlamData`.

    The cache holds .npy arrays (pixels as float16 after dicom_ai.preprocess.read_mammogram,
    breast masks, labels, lesion masks) and a JSON of view metadata; nothing executable.
    ``workers`` processes generate disjoint seed ranges; the result does not depend on it.
    """
    import numpy as np

    folder = None
    if cache is not None:
        folder = Path(cache) / f"phantom-{shape[0]}x{shape[1]}-seed{first_seed}-n{n_studies}-{_generator_version()}"
        if (folder / "meta.json").is_file():
            meta = json.loads((folder / "meta.json").read_text())["views"]
            arrays = {name: np.load(folder / f"{name}.npy") for name in ("pixels", "breast", "labels", "lesions")}
            return _glam_data(arrays, meta)

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    step = 10
    chunks = [range(s, min(s + step, first_seed + n_studies)) for s in range(first_seed, first_seed + n_studies, step)]
    parts = []
    with tqdm(total=n_studies, desc=f"phantoms {shape[0]}x{shape[1]}", disable=not progress, file=sys.stderr) as bar:
        if workers <= 1:
            for chunk in chunks:
                parts.append(_phantom_views(chunk, shape))
                bar.update(len(chunk))
        else:
            # spawn, not fork: a forked child of a process that has used torch can deadlock.
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for chunk, part in zip(chunks, pool.map(_phantom_views, chunks, [shape] * len(chunks))):
                    parts.append(part)
                    bar.update(len(chunk))
    pixels, masks, labels, lesions, meta = ([x for part in parts for x in part[k]] for k in range(5))
    arrays = {"pixels": np.stack(pixels), "breast": np.stack(masks),
              "labels": np.asarray(labels, dtype=np.float32), "lesions": np.asarray(lesions, dtype=bool)}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            np.save(folder / f"{name}.npy", array)
        # meta.json last: its presence marks a complete cache folder.
        (folder / "meta.json").write_text(json.dumps({"views": meta}, indent=1))
    return _glam_data(arrays, meta)


def _glam_data(arrays: dict, meta: list) -> GlamData:
    import numpy as np

    from dicom_ai.imaging import mammogram_from_array

    mammograms = [mammogram_from_array(arrays["pixels"][i].astype(np.float32), m["laterality"], m["view"],
                                       tuple(m["spacing_mm"]), m["faces_left"]) for i, m in enumerate(meta)]
    return GlamData(mammograms, list(arrays["breast"]), arrays["labels"], arrays["lesions"])


def load_phantom_folder(path: str | Path) -> GlamData:
    """Read a phantom folder written by ``dicom-ai phantom`` through dicom_ai.datasets."""
    import numpy as np

    from dicom_ai.data import datasets
    from dicom_ai.imaging import breast_mask

    mammograms, masks, labels, lesions = [], [], [], []
    for item in datasets.phantom_folder(path):
        m = item.mammogram
        mammograms.append(m)
        masks.append(breast_mask(m.pixels))
        labels.append([float(item.labels["benign"]), float(item.labels["malignant"])])
        gt = item.masks
        lesions.append(np.stack([gt["mass_benign"] | gt["cluster_benign"],
                                 gt["mass_malignant"] | gt["cluster_malignant"]]))
    if not mammograms:
        raise SystemExit(f"no images found in phantom folder {path}")
    return GlamData(mammograms, masks, np.asarray(labels, dtype=np.float32), np.asarray(lesions, dtype=bool))


def make_batch(data: GlamData, indices, config, rng=None):
    """(x (B, 1, H, W) float, breast mask (B, 1, H, W) bool, y (B, 2)) tensors.

    ``rng`` switches on the window noise augmentation.
    """
    import numpy as np
    import torch

    from dicom_ai.networks.glam import glam_input

    inputs = [glam_input(data.mammograms[i], config, mask=data.breast_masks[i], rng=rng) for i in indices]
    x = torch.from_numpy(np.stack([item[0] for item in inputs]))[:, None]
    m = torch.from_numpy(np.stack([item[1] for item in inputs]))[:, None]
    y = torch.from_numpy(data.labels[list(indices)])
    return x, m, y


# --------------------------------------------------------------------------- losses


def bce(pred, target):
    """Binary cross-entropy on probabilities (float32, clamped away from 0 and 1)."""
    import torch.nn.functional as F

    return F.binary_cross_entropy(pred.float().clamp(1e-6, 1 - 1e-6), target.float())


def stage_loss(stage: str, net, x, mask, y, config, beta: float):
    """Loss of one batch in ``stage`` (``mask``: breast mask or None); returns (total, {name: float})."""
    if stage == "global":
        g = net.global_net(x, mask)
        cls, sparsity = bce(g.prediction, y), g.saliency.float().abs().mean()
        total = cls + beta * sparsity
        return total, {"bce_g": cls.item(), "l1_g": sparsity.item()}
    import torch

    if stage == "local":
        with torch.no_grad():
            g = net.global_net(x, mask)
        out = net(x, num_patches=config.train_num_patches, global_output=g, mask=mask)
        cls, sparsity = bce(out.local_prediction, y), out.patch_maps.float().abs().mean()
        total = cls + beta * sparsity
        return total, {"bce_l": cls.item(), "l1_l": sparsity.item()}
    out = net(x, num_patches=config.train_num_patches, mask=mask)
    g = out.global_
    cls_g, l1_g = bce(g.prediction, y), g.saliency.float().abs().mean()
    cls_l, l1_l = bce(out.local_prediction, y), out.patch_maps.float().abs().mean()
    total = cls_g + beta * l1_g + cls_l + beta * l1_l
    return total, {"bce_g": cls_g.item(), "bce_l": cls_l.item(), "l1_g": l1_g.item(), "l1_l": l1_l.item()}


def cam_loss(net, x, y, beta: float):
    """BCE of the CAM classifier (no sparsity term: a plain classifier)."""
    pred, _ = net(x)
    cls = bce(pred, y)
    return cls, {"bce": cls.item()}


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, net, optimiser, state: dict) -> None:
    """Model and Adam state as safetensors; ``state`` (JSON) in the file's metadata."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    opt = optimiser.state_dict()
    for idx, pstate in opt["state"].items():
        for key, value in pstate.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = dict(state, param_groups=opt["param_groups"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    tmp.replace(path)


def load_checkpoint(path: Path):
    """(model state dict, optimiser state dict or None, progress state) from a checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["state"])
    tensors = load_file(str(path))
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    optimiser = {"state": opt_state, "param_groups": meta.pop("param_groups")}
    return model, optimiser, meta


# --------------------------------------------------------------------------- evaluation


def predict_images(net, data: GlamData, config, device, batch_size: int = 8, maps: bool = False):
    """Image-level global and local predictions (N, 2) and optionally fused/global input-grid maps."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dicom_ai.networks.glam import fuse

    net.eval()
    g_pred, l_pred, fused_maps, global_maps = [], [], [], []
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            idx = range(start, min(start + batch_size, len(data)))
            x, mask, _ = make_batch(data, idx, config)
            x, mask = _to_device(x, device), mask.to(device)
            with _autocast(device):
                out = net(x, mask=mask)
                if maps:
                    fused_maps.append(fuse(out, config).float().cpu().numpy())
                    global_maps.append(F.interpolate(out.global_.saliency, size=config.input_shape,
                                                     mode="nearest").float().cpu().numpy())
            g_pred.append(out.global_.prediction.float().cpu().numpy())
            l_pred.append(out.local_prediction.float().cpu().numpy())
    result = {"global": np.concatenate(g_pred), "local": np.concatenate(l_pred)}
    if maps:
        result["fused_maps"] = np.concatenate(fused_maps)
        result["global_maps"] = np.concatenate(global_maps)
    return result


def _to_device(x, device):
    import torch

    x = x.to(device, non_blocking=True)
    # CPU stays contiguous: channels-last backward corrupted the heap on torch 2.13 CPU.
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def _autocast(device):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# --------------------------------------------------------------------------- training


def train(net, data: GlamData, config, *, stages: list[tuple[str, int]], batch_size: int, lr: float,
          beta: float, seed: int, device, checkpoint: Path | None = None, resume: bool = False,
          val: GlamData | None = None, progress: bool = True, loss_fn=None) -> list[dict]:
    """Run the training ``stages`` ([(name, epochs)]); returns the per-epoch history.

    ``loss_fn(stage, net, x, mask, y)`` defaults to :func:`stage_loss`; the CAM baseline passes its
    own. With ``checkpoint`` a checkpoint is written after every epoch; with ``resume`` the
    run continues after the last completed epoch.
    """
    import numpy as np
    import torch
    from tqdm import tqdm

    from dicom_ai.data.metrics import roc_auc

    loss_fn = loss_fn or (lambda stage, n, x, mask, y: stage_loss(stage, n, x, mask, y, config, beta))
    net.to(device)
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    history: list[dict] = []
    done = (-1, -1)  # (stage index, last completed epoch) of the checkpoint
    model_sd = opt_sd = None
    if resume and checkpoint is not None and checkpoint.is_file():
        model_sd, opt_sd, meta = load_checkpoint(checkpoint)
        net.load_state_dict(model_sd)
        history = meta["history"]
        done = (meta["stage_index"], meta["epoch"])
        print(f"resuming after stage {STAGES[done[0]] if done[0] < len(STAGES) else done[0]} "
              f"epoch {done[1] + 1}", file=sys.stderr)
    for s_idx, (stage, epochs) in enumerate(stages):
        if epochs <= 0 or s_idx < done[0] or (s_idx == done[0] and done[1] + 1 >= epochs):
            continue
        params = _stage_parameters(net, stage)
        optimiser = torch.optim.Adam(params, lr=lr)
        first = 0
        if s_idx == done[0]:
            optimiser.load_state_dict(opt_sd)
            first = done[1] + 1
        for epoch in range(first, epochs):
            rng = np.random.default_rng([seed, s_idx, epoch])
            torch.manual_seed(int(rng.integers(2**31)))
            _set_modes(net, stage)
            order = rng.permutation(len(data))
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            sums: dict[str, float] = {}
            t0 = time.time()
            bar = tqdm(batches, desc=f"{stage} {epoch + 1}/{epochs}", disable=not progress, file=sys.stderr)
            for idx in bar:
                x, mask, y = make_batch(data, idx, config, rng=rng)
                x, mask, y = _to_device(x, device), mask.to(device), y.to(device)
                with _autocast(device):
                    loss, parts = loss_fn(stage, net, x, mask, y)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                parts = dict(parts, loss=loss.item())
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v * len(idx)
                bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
            record = {"stage": stage, "epoch": epoch + 1, "seconds": round(time.time() - t0, 1),
                      **{k: round(v / len(data), 5) for k, v in sums.items()}}
            if val is not None and stage != "cam":
                pred = predict_images(net, val, config, device)
                key = "local" if stage == "local" else "global"
                record["val_auc_benign"] = round(roc_auc(pred[key][:, 0], val.labels[:, 0]), 4)
                record["val_auc_malignant"] = round(roc_auc(pred[key][:, 1], val.labels[:, 1]), 4)
            history.append(record)
            print(json.dumps(record), file=sys.stderr)
            if checkpoint is not None:
                save_checkpoint(checkpoint, net, optimiser,
                                {"stage_index": s_idx, "epoch": epoch, "history": history, "seed": seed})
    net.eval()
    return history


def _stage_parameters(net, stage: str):
    if stage == "global":
        return list(net.global_net.parameters())
    if stage == "local":
        return list(net.local_net.parameters())
    return list(net.parameters())


def _set_modes(net, stage: str) -> None:
    net.train()
    if stage == "local":
        net.global_net.eval()  # frozen: its batch-norm statistics must not drift either
    elif stage == "global" and hasattr(net, "local_net"):
        net.local_net.eval()


def calibrate_thresholds(net, val: GlamData, config, device) -> tuple[dict, dict]:
    """Operating points maximising mean Dice of the fused maps on the validation ground truth.

    Dice is computed on the network's input grid over validation images that contain a
    lesion of the class; when even the best Dice is below MIN_CALIBRATION_DICE the threshold
    stays 0.5. Returns ({finding: threshold}, {finding: best validation Dice}).
    """
    import numpy as np

    from dicom_ai.networks.glam import glam_geometry
    from dicom_ai.data.metrics import dice

    pred = predict_images(net, val, config, device, maps=True)
    thresholds, best_dice = {}, {}
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    for c, finding in ((0, "benign_lesion"), (1, "malignant_lesion")):
        rows = [i for i in range(len(val)) if val.lesions[i, c].any()]
        if not rows:
            thresholds[finding], best_dice[finding] = 0.5, float("nan")
            continue
        gts = [glam_geometry(val.mammograms[i], config, mask=val.breast_masks[i])
               .forward(val.lesions[i, c].astype(np.float32), mode="nearest") > 0.5 for i in rows]
        scores = []
        for t in grid:
            d = [dice(pred["fused_maps"][i, c], gt, threshold=float(t)) for i, gt in zip(rows, gts)]
            scores.append(float(np.mean(d)))
        best = int(np.argmax(scores))
        thresholds[finding], best_dice[finding] = float(grid[best]), round(scores[best], 4)
        if scores[best] < MIN_CALIBRATION_DICE:
            # An uninformative map's "best" point is a low threshold that marks the whole
            # window as lesion; keep the conventional 0.5 (only confident patch regions).
            thresholds[finding] = 0.5
    return thresholds, best_dice


def _run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from dicom_ai.networks.bundle import save_bundle
    from dicom_ai.networks.glam import CONFIGS, CamClassifier, Glam
    from dicom_ai.data.metrics import roc_auc
    from dicom_ai.networks.pipeline import resolve_device

    torch.set_num_threads(max(1, args.threads))
    device = resolve_device(args.device)
    config = CONFIGS[args.config]
    shape = tuple(args.shape) if args.shape else phantom_shape_for(config)
    if args.phantom_dir:
        data = load_phantom_folder(args.phantom_dir)
        val = None
        data_note = f"phantom folder {args.phantom_dir} ({len(data)} images)"
    else:
        data = load_phantoms(args.first_seed, args.train_studies, shape, args.cache, workers=args.workers)
        val_seed = args.first_seed + args.train_studies
        val = (load_phantoms(val_seed, args.val_studies, shape, args.cache, workers=args.workers)
               if args.val_studies > 0 else None)
        data_note = (f"{args.train_studies} generated phantom studies ({len(data)} views), seeds "
                     f"{args.first_seed}-{args.first_seed + args.train_studies - 1}, shape {shape[0]}x{shape[1]}; "
                     f"validation {args.val_studies} studies from seed {val_seed}")
    print(f"training data: {data_note}; positives benign {int(data.labels[:, 0].sum())}, "
          f"malignant {int(data.labels[:, 1].sum())} of {len(data)}", file=sys.stderr)
    torch.manual_seed(args.seed)
    ckpt_dir = Path(args.checkpoint_dir)
    start = time.time()
    if args.baseline == "cam":
        net = CamClassifier(config)
        history = train(net, data, config, stages=[("cam", args.epochs_global)], batch_size=args.batch_size,
                        lr=args.lr, beta=0.0, seed=args.seed, device=device,
                        checkpoint=ckpt_dir / f"cam-{config.name}.safetensors", resume=args.resume,
                        loss_fn=lambda stage, n, x, mask, y: cam_loss(n, x, y, 0.0))
        from safetensors.torch import save_file

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "cam.safetensors"),
                  metadata={"config": json.dumps(config.to_dict()), "history": json.dumps(history)})
        print(f"wrote CAM baseline weights to {out / 'cam.safetensors'}", file=sys.stderr)
        return 0
    net = Glam(config)
    stages = [("global", args.epochs_global), ("local", args.epochs_local), ("joint", args.epochs_joint)]
    history = train(net, data, config, stages=stages, batch_size=args.batch_size, lr=args.lr, beta=args.beta,
                    seed=args.seed, device=device, checkpoint=ckpt_dir / f"glam-{config.name}.safetensors",
                    resume=args.resume, val=val)
    minutes = round((time.time() - start) / 60, 1)
    metrics: dict = {}
    thresholds = {"benign_lesion": 0.5, "malignant_lesion": 0.5}
    if val is not None:
        pred = predict_images(net, val, config, device)
        metrics["validation"] = {
            "images": len(val),
            "auc_benign": round(roc_auc(pred["global"][:, 0], val.labels[:, 0]), 4),
            "auc_malignant": round(roc_auc(pred["global"][:, 1], val.labels[:, 1]), 4),
        }
        if val.lesions is not None:
            thresholds, dice = calibrate_thresholds(net, val, config, device)
            metrics["validation"]["dice_at_threshold_input_grid"] = dice
    argv = shlex.join(sys.argv[sys.argv.index("train"):]) if "train" in sys.argv else None
    manifest = {
        "name": "glam",
        "version": f"0.1.0-{config.name}",
        "family": "Artificial Intelligence",
        "architecture": {"kind": "glam", **config.to_dict()},
        "input": {
            "views": ["CC", "MLO"],
            "pixel_spacing_mm": config.pixel_spacing_mm,
            "window_rows_cols": list(config.input_shape),
            "intensity": "dicom_ai.preprocess.read_mammogram ([0, 1], dense bright), then z-score over the window",
            "orientation": "flipped to face right (chest wall at column 0)",
            "window": "fixed-size window holding most breast (glam.optimal_window) after resampling to pixel_spacing_mm",
        },
        "thresholds": thresholds,
        "intended_use": INTENDED_USE,
        "training": {
            "data": data_note,
            "labels": "image-level benign/malignant only (pixel masks used for validation Dice and thresholds only)",
            "command": f"dicom-ai {argv}" if argv else "dicom-ai train glam " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
                if k not in ("handler", "command", "model") and v not in (None, False)),
            "seed": args.seed,
            "stages": {s: e for s, e in stages},
            "batch_size": args.batch_size, "lr": args.lr, "beta_l1": args.beta,
            "device": str(device), "threads": args.threads,
            "epoch_minutes_total": round(sum(h["seconds"] for h in history) / 60, 1),
            "history": history,
        },
        "metrics": metrics,
    }
    path = save_bundle(args.out, manifest, net.state_dict())
    print(f"wrote bundle {path} ({minutes} min); thresholds {thresholds}; metrics {json.dumps(metrics)}",
          file=sys.stderr)
    return 0
