"""`dicom-ai phantom | preview | evaluate`: data for the models and judging what they do.

* ``phantom`` writes phantom screening studies (DICOM + ground truth PNG masks + manifest.json,
  layout in :mod:`dicom_ai.data.phantom_folder`).
* ``preview`` writes a side-by-side PNG of phantom views and real mammograms (any folder of
  PNG/DICOM files, by default ``../shared/data/real``) for judging realism by eye.
* ``evaluate`` compares model output with ground truth and writes a Markdown report with plots
  (:mod:`dicom_ai.evaluate`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicom_ai.cli.args import shape_type

SIZES = {"small": (416, 320), "full": (3328, 2560)}
DEFAULT_REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"


_shape = shape_type(SIZES, "size {text!r}: use small, full or ROWSxCOLUMNS (e.g. 832x640)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's subcommands; each sets `handler=` to a function taking the args."""
    p = subparsers.add_parser("phantom", help="write phantom screening studies (DICOM MG + ground truth)")
    p.add_argument("--out", type=Path, required=True, help="output folder; one sub-folder per study")
    p.add_argument("--count", type=int, default=1, help="number of studies (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first study; study i uses seed+i")
    p.add_argument("--size", type=_shape, default=SIZES["small"],
                   help="small (416x320, 0.56 mm), full (3328x2560, 0.07 mm) or ROWSxCOLUMNS")
    p.add_argument("--density", choices=list("abcd"), help="BI-RADS density (default: drawn per study)")
    p.add_argument("--photometric", choices=["MONOCHROME2", "MONOCHROME1"], default="MONOCHROME2")
    p.add_argument("--presentation", choices=["presentation", "processing"], default="presentation",
                   help="Presentation Intent Type: FOR PRESENTATION or FOR PROCESSING")
    p.add_argument("--bits", type=int, default=12, choices=[12, 13, 14], help="Bits Stored")
    p.add_argument("--transfer-syntax", choices=["explicit", "jpeg2000", "jpegls", "rle"], default="explicit")
    normal = p.add_mutually_exclusive_group()
    normal.add_argument("--normal", dest="normal", action="store_true", default=None, help="only normal studies")
    normal.add_argument("--abnormal", dest="normal", action="store_false", help="only studies with findings")
    p.set_defaults(handler=_phantom)

    p = subparsers.add_parser("preview", help="side-by-side PNG of phantom views and real mammograms")
    p.add_argument("--out", type=Path, default=Path("preview.png"), help="PNG to write (default preview.png)")
    p.add_argument("--real", type=Path, default=DEFAULT_REAL,
                   help=f"folder of real mammograms (PNG or DICOM; default {DEFAULT_REAL})")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--count", type=int, default=1, help="phantom studies to show (default 1)")
    p.add_argument("--size", type=_shape, default=SIZES["full"], help="phantom size (default full)")
    p.add_argument("--density", choices=list("abcd"))
    p.add_argument("--height", type=int, default=520, help="tile height in the sheet, pixels (default 520)")
    p.add_argument("--crop", type=int, default=384,
                   help="also show native-resolution crops of this many pixels (0: none; default 384)")
    p.set_defaults(handler=_preview)

    p = subparsers.add_parser("evaluate", help="score model output against ground truth; Markdown report + plots")
    p.add_argument("--truth", "--root", dest="truth", type=Path, required=True,
                   help="ground truth: a phantom folder (manifest.json files) or a data set root")
    p.add_argument("--format", "--dataset", dest="format", default="phantom", choices=["phantom", "inbreast", "cbis-ddsm", "vindr", "mias"],
                   help="layout of --truth (default phantom; mias = mini-MIAS PGMs + Info.txt)")
    p.add_argument("--fold", type=int, action="append",
                   help="mias only: evaluate on this cross-validation fold, 0-4 (repeatable; default all images)")
    p.add_argument("--predictions", type=Path,
                   help="folder of model output (DICOM SEG and/or <SOPInstanceUID>_<finding>.npy/.png maps "
                        "+ scores.json); default: run --bundle on the truth images")
    p.add_argument("--bundle", action="append", default=[], help="model bundle to run (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (with --bundle)")
    p.add_argument("--out", type=Path, required=True,
                   help="report folder (report.md + PNG plots; lesions.md + lesions.json with --bundle)")
    p.add_argument("--cache", type=Path,
                   help="with --bundle: keep each model's marks per image here, so a rerun only scores")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates for the CIs (default 2000)")
    p.add_argument("--limit", type=int, help="use at most this many images")
    p.set_defaults(handler=_evaluate)


def _phantom(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dicom_ai.data.phantom import generate_study
    from dicom_ai.data.phantom_folder import write_study

    if args.count < 1:
        print("dicom-ai phantom: --count must be at least 1", file=sys.stderr)
        return 2
    presentation = "FOR PRESENTATION" if args.presentation == "presentation" else "FOR PROCESSING"
    args.out.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(args.count), desc="phantom studies", unit="study", disable=args.count < 2):
        seed = args.seed + i
        study = generate_study(seed, shape=args.size, density=args.density, photometric=args.photometric,
                               presentation=presentation, normal=args.normal, bits_stored=args.bits)
        write_study(study, args.out / f"phantom_{seed:06d}", transfer_syntax=args.transfer_syntax)
    print(f"wrote {args.count} stud{'y' if args.count == 1 else 'ies'} to {args.out}")
    return 0


def _load_real(path: Path):
    """A real mammogram file as float [0, 1] dense bright, or None when it cannot be read."""
    import numpy as np

    if path.suffix.lower() == ".png":
        from PIL import Image

        arr = np.asarray(Image.open(path)).astype(np.float32)
        if arr.ndim == 3:
            arr = arr[..., :3].mean(-1)
        top = 65535.0 if arr.max() > 255 else 255.0
        return arr / top
    try:
        from dicom_ai.imaging import read_mammogram

        return read_mammogram(str(path)).pixels
    except Exception:  # not a mammogram we can decode: skip it in a preview
        return None


def _tile(img, height: int, label: str):
    """Downsample ``img`` to ``height`` rows (area average), 8-bit, with a caption."""
    import numpy as np
    from PIL import Image, ImageDraw

    width = max(1, int(round(img.shape[1] * height / img.shape[0])))
    pil = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).resize((width, height), Image.BOX)
    ImageDraw.Draw(pil).text((6, height - 16), label, fill=255)
    return np.asarray(pil)


def _crop(img, mask, size: int):
    """A ``size`` square at native resolution, centred on the breast half nearest the chest wall."""
    import numpy as np

    rows, cols = img.shape
    ys, xs = np.nonzero(mask) if mask is not None and mask.any() else (np.array([rows // 2]), np.array([cols // 2]))
    cy, cx = int(np.median(ys)), int(np.median(xs))
    r0 = int(np.clip(cy - size // 2, 0, max(rows - size, 0)))
    c0 = int(np.clip(cx - size // 2, 0, max(cols - size, 0)))
    return img[r0:r0 + size, c0:c0 + size]


def make_preview(phantom_images: list, real_dir: Path | None, out: Path, height: int = 520, crop: int = 384) -> Path:
    """Write one PNG: real mammograms on the first row, phantom views below, native crops after.

    Parameters
    ----------
    phantom_images
        (label, pixels [0, 1] dense bright, breast mask) tuples.
    real_dir
        Folder of real mammograms (PNG or DICOM), or None for phantom views only.
    out
        The PNG to write; returned.
    height
        Tile height in the sheet, in pixels.
    crop
        Side of the native-resolution crops, in pixels (0: none).

    ``phantom_images`` are (label, pixels [0, 1] dense bright, breast mask) tuples. Real files are
    PNG (8/16-bit, dense bright) or DICOM; unreadable files are skipped.
    """
    import numpy as np
    from PIL import Image

    from dicom_ai.imaging import breast_mask

    real = []
    if real_dir is not None and real_dir.is_dir():
        for path in sorted(real_dir.iterdir()):
            if path.suffix.lower() in (".png", ".dcm", "") and path.is_file():
                img = _load_real(path)
                if img is not None and img.ndim == 2:
                    real.append((path.stem, img, breast_mask(img)))
    rows = []
    if real:
        rows.append([_tile(img, height, f"real {name}") for name, img, _ in real])
    rows.append([_tile(img, height, f"phantom {name}") for name, img, _ in phantom_images])
    if crop > 0:
        # Native-resolution crops show texture at the detector's scale (shown at tile height).
        for prefix, group in (("real", real[:4]), ("phantom", phantom_images[:4])):
            if group:
                rows.append([_tile(_crop(i, m, crop), height, f"{prefix} {n} crop {crop}px") for n, i, m in group])
    width = max(sum(t.shape[1] for t in row) + 8 * (len(row) - 1) for row in rows)
    sheet = np.zeros((sum(row[0].shape[0] for row in rows) + 8 * (len(rows) - 1), width), dtype=np.uint8)
    y = 0
    for row in rows:
        x = 0
        for t in row:
            sheet[y:y + t.shape[0], x:x + t.shape[1]] = t
            x += t.shape[1] + 8
        y += row[0].shape[0] + 8
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(out)
    return out


def _preview(args: argparse.Namespace) -> int:
    from dicom_ai.data.phantom import generate_study

    images = []
    for i in range(args.count):
        study = generate_study(args.seed + i, shape=args.size, density=args.density)
        for im in study.images:
            label = f"{args.seed + i} {im.laterality}-{im.view} ({study.density})"
            images.append((label, im.pixels, im.breast_mask))
    real = args.real if args.real and args.real.is_dir() else None
    if real is None:
        print(f"dicom-ai preview: no folder {args.real}; showing phantom views only", file=sys.stderr)
    path = make_preview(images, real, args.out, height=args.height, crop=args.crop)
    print(f"wrote {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from dicom_ai.core.errors import DatasetError
    from dicom_ai.data.datasets import open_dataset
    from dicom_ai.data.evaluate import evaluate, evaluate_lesions, predict, predict_marks, write_lesion_report, write_report
    from dicom_ai.networks import Pipeline

    if args.fold and args.format != "mias":
        print("dicom-ai evaluate: --fold applies to --format mias only", file=sys.stderr)
        return 2
    try:
        data = open_dataset(args.format, args.truth, **({"folds": args.fold} if args.fold else {}))
    except DatasetError as exc:
        print(f"dicom-ai evaluate: {exc}", file=sys.stderr)
        return 2
    n = len(data) if args.limit is None else min(args.limit, len(data))
    if args.predictions is None and not args.bundle:
        print("dicom-ai evaluate: give --predictions DIR or at least one --bundle", file=sys.stderr)
        return 2
    pipeline = Pipeline.from_bundles(args.bundle, device=args.device) if args.bundle else None
    if args.format != "mias":
        # Pixel-level report: data sets with DICOM sources and pixel truth (MIAS truth is circles).
        samples = (data[i] for i in range(n))
        pairs = predict(samples, pipeline=pipeline, predictions=None if pipeline is not None else args.predictions)
        print(f"wrote {write_report(evaluate(pairs, bootstrap=args.bootstrap, total=n), args.out)}")
    elif pipeline is None:
        print("dicom-ai evaluate: --format mias needs --bundle (lesion-level evaluation runs the models)",
              file=sys.stderr)
        return 2
    if pipeline is not None:
        marks = predict_marks((data[i] for i in range(n)), pipeline, cache=args.cache)
        notes = []
        if args.format == "mias":
            folds = ", ".join(str(f) for f in args.fold) if args.fold else "all (0-4)"
            notes = [f"mini-MIAS, folds {folds} (patient-level, stratified; dicom_ai.data.datasets.mias_folds).",
                     f"Licence: {data.licence}"]
        path = write_lesion_report(evaluate_lesions(marks, bootstrap=args.bootstrap, total=n), args.out,
                                   notes=notes)
        print(f"wrote {path}")
    return 0
