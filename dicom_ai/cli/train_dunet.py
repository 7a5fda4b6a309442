"""`dicom-ai train dunet-pretrain` and `dicom-ai train dunet-seg`: the two training stages.

Stage 1 writes a safetensors checkpoint; stage 2 starts from it (or from scratch) and
writes a model bundle (manifest.json + weights.safetensors) the node loads. Both train on
phantom studies generated on the fly (``dicom_ai.phantom``) and cached as .npy under
``build/dunet-cache``. The heavy imports happen inside the handlers so that ``dicom-ai
--help`` stays fast.

Example (the shipped models/dunet bundle; see ``make dunet-bundle``)::

    dicom-ai train dunet-pretrain --out build/dunet/pretrain.safetensors
    dicom-ai train dunet-seg --init build/dunet/pretrain.safetensors --out models/dunet
"""

from __future__ import annotations

import argparse
import json
import time

#: The shipped bundle's intended use (also written to every manifest this module writes).
INTENDED_USE = ("research / demonstration, trained on synthetic phantoms, not for clinical use. "
                "Segments malignant lesions (masses and calcifications combined) on 2-D "
                "mammography views; outputs are not calibrated.")


def _seed_range(text: str) -> range:
    """``"A:B"`` -> range(A, B): the phantom study seeds to use."""
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a seed range START:STOP, got {text!r}") from None
    if stop <= start:
        raise argparse.ArgumentTypeError(f"empty seed range {text!r}")
    return range(start, stop)


def _shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS, got {text!r}") from None
    return rows, cols


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-seeds", type=_seed_range, default=range(0, 96),
                   help="phantom study seeds START:STOP used for training (default 0:96)")
    p.add_argument("--phantom-shape", type=_shape, default=(416, 320),
                   help="stored size ROWSxCOLS of the generated phantom views (default 416x320)")
    p.add_argument("--config", choices=("compact", "paper"), default="compact",
                   help="network configuration (paper = 1536x1536; compact = 256x192, default)")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="override the configuration's input size ROWSxCOLS")
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of weights init, sampling and distortions")
    p.add_argument("--device", default="cpu", help="cpu, cuda:N or auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared CPU, more threads spin at barriers)")
    p.add_argument("--cache-dir", default="build/dunet-cache", help="where phantom arrays are cached")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``dunet-pretrain`` and ``dunet-seg`` subcommands of ``dicom-ai train``."""
    p = subparsers.add_parser("dunet-pretrain", help="discriminative U-Net stage 1: self-supervised restoration",
                              description="Train the U-Net to restore Models-Genesis distortions of "
                                          "benign and normal phantom images (MSE inside the breast).")
    _add_common(p)
    p.add_argument("--out", required=True, help="checkpoint file to write (.safetensors)")
    p.set_defaults(handler=_pretrain_main)

    s = subparsers.add_parser("dunet-seg", help="discriminative U-Net stage 2: malignancy segmentation",
                              description="Train malignancy segmentation on malignant phantom images "
                                          "(benign images as empty targets) and write a model bundle.")
    _add_common(s)
    s.add_argument("--init", default=None, help="stage-1 checkpoint; omit to train from scratch")
    s.add_argument("--head", choices=("subtraction", "sigmoid"), default="subtraction",
                   help="subtraction = x - f(x) (the paper's method), sigmoid = standard head")
    s.add_argument("--no-empty-targets", action="store_true", help="leave benign images out of stage 2")
    s.add_argument("--test-seeds", type=_seed_range, default=range(100000, 100024),
                   help="held-out phantom seeds START:STOP for the metrics in the manifest")
    s.add_argument("--name", default="dunet", help="bundle name (written into SEG/SR)")
    s.add_argument("--version", default="0.1.0", help="bundle version")
    s.add_argument("--out", required=True, help="bundle folder to write, e.g. models/dunet")
    s.set_defaults(handler=_seg_main)


def _setup(args: argparse.Namespace):
    import torch

    from dicom_ai.networks.dunet import DUNetConfig
    from dicom_ai.networks.pipeline import resolve_device

    torch.set_num_threads(max(1, args.threads))
    config = DUNetConfig.paper() if args.config == "paper" else DUNetConfig.compact()
    if args.input_shape is not None:
        config = DUNetConfig.from_dict(dict(config.to_dict(), input_shape=args.input_shape))
    return config, resolve_device(args.device)


def _pretrain_main(args: argparse.Namespace) -> int:
    from dicom_ai.networks.dunet import DiscriminativeUNet
    from dicom_ai.training.dunet import phantom_image_set, pretrain, save_checkpoint, seed_everything

    config, device = _setup(args)
    data = phantom_image_set(args.train_seeds, config.input_shape, args.phantom_shape, args.cache_dir,
                             progress=not args.no_progress).pretraining_pool()
    if len(data) == 0:
        raise SystemExit("no benign or normal images in the training seeds; widen --train-seeds")
    epochs = args.epochs if args.epochs is not None else 6
    lr = args.lr if args.lr is not None else 1e-3
    seed_everything(args.seed)
    network = DiscriminativeUNet(config)
    started = time.time()
    history = pretrain(network, data, epochs, args.batch_size, lr, args.seed, device=device,
                       progress=not args.no_progress,
                       on_epoch=lambda e, r: print(f"epoch {e}: restoration MSE {r['train_mse']:.5f}", flush=True))
    info = {"stage": "pretrain", "images": len(data), "epochs": epochs, "lr": lr, "batch_size": args.batch_size,
            "seed": args.seed, "train_seeds": f"{args.train_seeds.start}:{args.train_seeds.stop}",
            "phantom_shape": list(args.phantom_shape), "seconds": round(time.time() - started, 1),
            "history": history}
    path = save_checkpoint(args.out, network, info)
    print(f"wrote {path} ({len(data)} benign/normal images, {epochs} epochs)")
    return 0


def _seg_main(args: argparse.Namespace) -> int:
    import numpy as np

    from dicom_ai.networks.bundle import save_bundle
    from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig
    from dicom_ai.training.dunet import evaluate_segmentation, load_checkpoint, phantom_image_set, seed_everything, train_segmentation

    config, device = _setup(args)
    init_info: dict = {}
    seed_everything(args.seed)
    if args.init:
        init_config, state, init_info = load_checkpoint(args.init)
        config = DUNetConfig.from_dict(dict(init_config.to_dict(), head=args.head))
        network = DiscriminativeUNet(config)
        network.load_state_dict(state)
    else:
        config = DUNetConfig.from_dict(dict(config.to_dict(), head=args.head))
        network = DiscriminativeUNet(config)
    progress = not args.no_progress
    pool = phantom_image_set(args.train_seeds, config.input_shape, args.phantom_shape, args.cache_dir, progress)
    data = pool.segmentation_pool(empty_targets=not args.no_empty_targets)
    test = phantom_image_set(args.test_seeds, config.input_shape, args.phantom_shape, args.cache_dir, progress)
    if not data.lesions.any():
        raise SystemExit("no malignant images with visible lesions in the training seeds; widen --train-seeds")
    epochs = args.epochs if args.epochs is not None else 30
    lr = args.lr if args.lr is not None else 5e-4
    started = time.time()
    history = train_segmentation(
        network, data, epochs, args.batch_size, lr, args.seed, test=test.positives(), device=device,
        progress=progress,
        on_epoch=lambda e, r: print(f"epoch {e}: loss {r['train_loss']:.4f}, test Dice {r.get('test_dice', float('nan')):.3f}",
                                    flush=True))
    final = evaluate_segmentation(network, test, device=device)
    dice_curve = [r["test_dice"] for r in history if "test_dice" in r]
    metrics = {
        "test_set": f"phantom seeds {args.test_seeds.start}:{args.test_seeds.stop}, "
                    f"{int(test.lesions.any(axis=(1, 2)).sum())} images with malignant lesions, "
                    f"{len(test)} images in all",
        "dice_protocol": "per image on the model grid, map >= 0.5, mean over images with a lesion",
        "dice_final": final["dice"],
        "soft_dice_final": final["soft_dice"],
        "fp_fraction_lesion_free_images": final["fp_fraction"],
        "dice_max": float(np.nanmax(dice_curve)) if dice_curve else None,
        "dice_avg_last10": float(np.nanmean(dice_curve[-10:])) if dice_curve else None,
    }
    manifest = {
        "name": args.name,
        "version": args.version,
        "family": "Artificial Intelligence",
        "architecture": {"kind": "dunet", **config.to_dict()},
        "input": {
            "views": ["CC", "MLO"],
            "intensity": "[0, 1], dense tissue bright (dicom_ai.preprocess.read_mammogram)",
            "geometry": f"breast crop in canonical orientation (chest wall at column 0), grown to the "
                        f"input aspect and resized to {config.input_shape[0]}x{config.input_shape[1]}",
            "trained_pixel_spacing_mm": round(0.07 * 3328 / args.phantom_shape[0], 4),
        },
        "outputs": {
            "malignant_lesion": "probability map on the source grid (subtraction head: clip(x - f(x), 0, 1))"
            if config.head == "subtraction" else "probability map on the source grid (sigmoid head)",
            "malignant": f"image score = mean of the top {config.score_top_fraction:.1%} of the model-grid map",
            "reconstruction": "f(x), optional explainability image (DUNetModel.predict_with_reconstruction)",
        },
        "thresholds": {"malignant_lesion": 0.5},
        "intended_use": INTENDED_USE,
        "training": {
            "data": f"synthetic phantom studies (dicom_ai.phantom) seeds {args.train_seeds.start}:"
                    f"{args.train_seeds.stop} at {args.phantom_shape[0]}x{args.phantom_shape[1]}; "
                    f"{int(data.lesions.any(axis=(1, 2)).sum())} malignant images, "
                    f"{int((~data.lesions.any(axis=(1, 2))).sum())} benign images as empty targets",
            "lesion_mask": "mass_malignant | calcification_malignant",
            "command": "dicom-ai train dunet-seg " + " ".join(_argv_echo(args)),
            "pretraining": init_info.get("stage") and {k: v for k, v in init_info.items() if k != "history"},
            "head": config.head,
            "seed": args.seed,
            "epochs": epochs,
            "lr": lr,
            "batch_size": args.batch_size,
            "seconds": round(time.time() - started, 1),
            "history": history,
        },
        "metrics": metrics,
    }
    path = save_bundle(args.out, manifest, network.state_dict())
    print(f"wrote bundle {path}: test Dice {final['dice']:.3f} (max {metrics['dice_max']:.3f}) "
          f"on {metrics['test_set']}")
    print(json.dumps(metrics, indent=2))
    return 0


def _argv_echo(args: argparse.Namespace) -> list[str]:
    out = []
    for key in ("init", "head", "config", "epochs", "lr", "batch_size", "seed"):
        value = getattr(args, key, None)
        if value is not None:
            out.append(f"--{key.replace('_', '-')} {value}")
    for key in ("train_seeds", "test_seeds"):
        r = getattr(args, key)
        out.append(f"--{key.replace('_', '-')} {r.start}:{r.stop}")
    out.append(f"--phantom-shape {args.phantom_shape[0]}x{args.phantom_shape[1]}")
    if args.input_shape is not None:
        out.append(f"--input-shape {args.input_shape[0]}x{args.input_shape[1]}")
    return out
