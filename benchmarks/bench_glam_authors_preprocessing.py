"""Our NYU preprocessing (``dicom_ai.imaging.nyu_window``) against the GLAM/GMIC authors' on their sample.

Inputs, all outside the project (fetched, never committed, never a test dependency):

* ``--glam-repo``: a checkout of nyukat/GLAM with ``sample_data/images/0_*.png`` (exam 0, the
  other exams' PNGs are not in the mirror) and ``sample_data/exam_list_before_cropping.pkl``;
* ``--gmic-sample``: nyukat/GMIC's first sample (commit febe243): ``cropped_images/0_*.png``,
  the authors' 2944 x 1920 windows of the same views (flipped, zero-padded, intensities x 16),
  and ``data.pkl`` with their ``best_center``;
* ``--pylib`` (optional): a folder with scipy and pandas, to run the authors' own cropping and
  optimal-centre code (``src/cropping``, ``src/optimal_centers``, ``src/data_loading``) from the
  GLAM checkout for a step-by-step comparison.

The pickles are read with a whitelist unpickler (numpy scalars and dtypes only). Per view it
reports: our breast box, rightmost and bottom points and best centre, and the authors'; the
window against GMIC's (same nonzero pixels; the intensity ratio; max |difference| after the
authors' standardisation of both); and, with ``--pylib``, our standardised input against their
``process_image`` output.

Writes ``benchmarks/results/glam_authors_preprocessing.json``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_ai.imaging.nyu_window import crop_to_breast, nyu_window, optimal_centre, standardise  # noqa: E402

VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in (("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")):
            return _scalar
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _scalar(dtype, data):
    return np.frombuffer(data, dtype=dtype)[0]


def _load_pickle(path: Path):
    with open(path, "rb") as fh:
        return _NumpyOnly(fh).load()


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.float32)


def _authors_code(glam_repo: Path, pylib: Path):
    """Their cropping, optimal-centre and loading modules (cv2 and imageio stubbed: unused here)."""
    for name in ("cv2", "imageio", "h5py"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.path.append(str(pylib))
    sys.path.insert(0, str(glam_repo))
    import src.cropping.crop_mammogram as crop
    import src.data_loading.loading as loading
    import src.optimal_centers.get_optimal_centers as centers

    return crop, centers, loading


def _synthetic_breast(rows: int, cols: int, seed: int, faces_left: bool) -> np.ndarray:
    """A textured half-ellipse breast larger than the window, with a speck and a label strip."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:rows, :cols]
    cy = rows * rng.uniform(0.4, 0.6)
    img = ((((rr - cy) / (rows * 0.45)) ** 2 + (cc / (cols * 0.85)) ** 2) <= 1).astype(np.float32)
    img *= rng.integers(200, 4096, size=(rows, cols)).astype(np.float32)
    img[40:90, cols - 300:cols - 100] = 3000.0  # a label far from the breast
    return img[:, ::-1].copy() if faces_left else img


def _synthetic_cases(authors) -> dict:
    """Views larger than 2944 x 1920 (the optimal-centre search and the shift inside the crop), ours vs theirs."""
    crop_mod, centers_mod, loading_mod = authors
    out = {}
    for i, (view, faces_left, shape) in enumerate([("R-CC", True, (3600, 2700)), ("L-CC", False, (3400, 2500)),
                                                   ("R-MLO", True, (3700, 2600)), ("L-MLO", False, (3300, 2400))]):
        raw = _synthetic_breast(*shape, seed=i, faces_left=faces_left)
        kind = view.split("-")[1]
        flip = "NO"  # R views face left in the stored image, L views right
        window = nyu_window(raw, kind, faces_left)
        info = crop_mod.crop_img_from_largest_connected(raw.copy(), crop_mod.image_orientation(flip, view[0]), True, 100, 50, 1 / 3)
        (wt, wb, wl, wr), (_, rightmost), (bottommost, _), _ = info
        datum = {"full_view": view, "view": kind, "horizontal_flip": flip,
                 "rightmost_points": (None, rightmost), "bottommost_points": (bottommost, None)}
        their_centre = centers_mod.extract_center(datum, raw[wt:wb, wl:wr].copy())
        their_input = loading_mod.process_image(loading_mod.flip_image(raw[wt:wb, wl:wr].copy(), view, flip), view,
                                                their_centre)
        b = window.breast
        top, bottom, left, right = b.box
        crop = raw[top:bottom, left:right][:, ::-1] if faces_left else raw[top:bottom, left:right]
        centre = optimal_centre(crop, kind, b)
        out[f"{view} {shape[0]}x{shape[1]}"] = {
            "box_equal": list(b.box) == [int(wt), int(wb), int(wl), int(wr)],
            "points_equal": (b.rightmost_x, b.bottommost_y) == (int(rightmost), int(bottommost)),
            "best_center": {"ours": list(centre), "theirs": [float(v) for v in their_centre]},
            "best_center_equal": [float(v) for v in centre] == [float(v) for v in their_centre],
            "input_max_abs_diff": float(np.abs(standardise(window.forward(raw)) - their_input).max()),
        }
        print(f"synthetic {view} {shape}: {out[f'{view} {shape[0]}x{shape[1]}']}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glam-repo", required=True)
    parser.add_argument("--gmic-sample", required=True, help="folder with GMIC febe243 cropped_images/ and data.pkl")
    parser.add_argument("--pylib", default="", help="folder with scipy + pandas to run the authors' own steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "glam_authors_preprocessing.json"))
    args = parser.parse_args(argv)
    glam, gmic = Path(args.glam_repo), Path(args.gmic_sample)
    exam = _load_pickle(glam / "sample_data" / "exam_list_before_cropping.pkl")[0]
    gmic_exam = _load_pickle(gmic / "data.pkl")[0]
    authors = _authors_code(glam, Path(args.pylib)) if args.pylib else None
    flip = exam["horizontal_flip"]
    rows = {}
    for view in VIEWS:
        raw = _png(glam / "sample_data" / "images" / f"0_{view}.png")
        faces_left = (view[0] == "R") == (flip == "NO")
        kind = view.split("-")[1]
        breast = crop_to_breast(raw, faces_left)
        window = nyu_window(raw, kind, faces_left)
        top, bottom, left, right = breast.box
        crop = raw[top:bottom, left:right][:, ::-1] if faces_left else raw[top:bottom, left:right]
        centre = optimal_centre(crop, kind, breast)
        ours = window.forward(raw)
        theirs_window = _png(gmic / "cropped_images" / f"0_{view}.png")
        nz_ours, nz_theirs = ours > 0, theirs_window > 0
        ratio = theirs_window[nz_theirs & nz_ours] / ours[nz_theirs & nz_ours]
        row = {
            "source_shape": list(raw.shape), "faces_left": faces_left,
            "ours": {"box": list(breast.box), "rightmost_x": breast.rightmost_x, "bottommost_y": breast.bottommost_y,
                     "best_center": list(centre), "window_in_crop": list(window.window)},
            "gmic_best_center": [float(v) for v in gmic_exam["best_center"][view][0]],
            "best_center_equal_gmic": [float(v) for v in centre] == [float(v) for v in gmic_exam["best_center"][view][0]],
            "window_vs_gmic_cropped_image": {
                "same_shape": ours.shape == theirs_window.shape,
                "same_nonzero_pixels": bool(np.array_equal(nz_ours, nz_theirs)),
                "nonzero_pixels_differing": int((nz_ours != nz_theirs).sum()),
                "intensity_ratio_min_max": [float(ratio.min()), float(ratio.max())],
                "max_abs_diff_after_standardisation": float(np.abs(standardise(ours) - standardise(theirs_window)).max()),
            },
        }
        if authors is not None:
            crop_mod, centers_mod, loading_mod = authors
            mode = crop_mod.image_orientation(flip, view[0])
            info = crop_mod.crop_img_from_largest_connected(raw.copy(), mode, True, 100, 50, 1 / 3)
            (wt, wb, wl, wr), (_, rightmost), (bottommost, _), _ = info
            datum = {"full_view": view, "view": kind, "horizontal_flip": flip,
                     "rightmost_points": (None, rightmost), "bottommost_points": (bottommost, None)}
            their_centre = centers_mod.extract_center(datum, raw[wt:wb, wl:wr].copy())
            their_input = loading_mod.process_image(
                loading_mod.flip_image(raw[wt:wb, wl:wr].copy(), view, flip), view, their_centre)
            our_input = standardise(ours)
            row["authors_code"] = {
                "box": [int(wt), int(wb), int(wl), int(wr)], "rightmost_x": int(rightmost), "bottommost_y": int(bottommost),
                "best_center": [float(v) for v in their_centre],
                "box_equal": list(breast.box) == [int(wt), int(wb), int(wl), int(wr)],
                "points_equal": (breast.rightmost_x, breast.bottommost_y) == (int(rightmost), int(bottommost)),
                "best_center_equal": [float(v) for v in centre] == [float(v) for v in their_centre],
                "input_max_abs_diff": float(np.abs(our_input - their_input).max()),
            }
        rows[view] = row
        print(f"{view:6s} box {breast.box} centre {centre} (GMIC {row['gmic_best_center']}) "
              f"nonzero same {row['window_vs_gmic_cropped_image']['same_nonzero_pixels']} "
              f"z-diff {row['window_vs_gmic_cropped_image']['max_abs_diff_after_standardisation']:.2e}"
              + (f" | authors' code: box {row['authors_code']['box_equal']} centre {row['authors_code']['best_center_equal']}"
                 f" input diff {row['authors_code']['input_max_abs_diff']:.2e}" if authors is not None else ""))
    synthetic = _synthetic_cases(authors) if authors is not None else {}
    result = {"what": "dicom_ai.imaging.nyu_window vs the authors' preprocessing on their sample exam 0",
              "glam_sample": "nyukat/GLAM sample_data/images/0_*.png (17a0019)",
              "gmic_sample": "nyukat/GMIC sample_data/cropped_images/0_*.png and data.pkl (febe243)",
              "authors_code_run": bool(authors), "views": rows,
              "synthetic_large_views": synthetic}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
