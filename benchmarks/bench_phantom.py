"""Phantom realism and speed: texture spectrum exponent beta, lesion statistics, generation time.

* **beta** over 100 images (25 studies x 4 views, default 1664 x 1280 at 0.14 mm): in each
  For Presentation image one square ROI of 256 px (36 mm) lying wholly inside the breast mask,
  nearest the breast's centroid (MLO: below the upper third, away from the pectoral muscle);
  ROI minus its mean, 2-D Hann window, periodogram, radial average in log-spaced frequency
  bins, least-squares line of log P against log f over 0.15-1.0 cycles/mm (above the ROI's
  lowest frequencies, below where quantum noise flattens the spectrum). beta = -slope. Real
  mammograms give beta of about 2.5-3.5 in this band (Burgess 2001 ~3; Heine & Velthuizen 2002).
  When ../shared/data/real/ holds the real CC views (3328 x 2560, assumed 0.07 mm), the same
  protocol is run on them after 2x2 binning to 0.14 mm, as a reference (never committed data).
* **lesion statistics** from the same 25 studies plus 200 more at 104 x 80 (findings are
  drawn in mm, so they do not depend on the grid): share of normal studies, density mix,
  masses per shape and class with radius, clusters with speck counts, speck sizes and extent.
* **generation time** of one full-size (3328 x 2560) four-view study: median wall and CPU
  time (all threads) of 3 runs, plus
  writing it as explicit VR and as JPEG 2000 lossless.

Writes benchmarks/results/phantom.json and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicom_ai.data.phantom import generate_study  # noqa: E402
from dicom_ai.data.phantom_folder import write_study  # noqa: E402

ROI = 256
BAND = (0.15, 1.0)


def roi_origin(mask: np.ndarray, view: str, size: int = ROI) -> tuple[int, int] | None:
    """Top-left corner of a ``size`` square wholly inside ``mask``, nearest the mask centroid."""
    m = mask.copy()
    if view == "MLO":
        m[: m.shape[0] // 3] = False
    integral = np.pad(m.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    full = (integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size])
    ok = full == size * size
    if not ok.any():
        return None
    rows, cols = np.nonzero(ok)
    cy, cx = np.argwhere(m).mean(0) - size / 2
    if view == "MLO":
        # Stay away from the pectoral muscle near the chest wall at the top: prefer the middle.
        cy = max(cy, m.shape[0] * 0.45)
    i = int(np.argmin((rows - cy) ** 2 + (cols - cx) ** 2))
    return int(rows[i]), int(cols[i])


def spectrum_beta(roi: np.ndarray, spacing_mm: float, band: tuple[float, float] = BAND) -> float:
    """beta of P(f) ~ 1/f^beta fitted over ``band`` (cycles/mm) on a Hann-windowed periodogram."""
    n = roi.shape[0]
    x = roi.astype(np.float64) - roi.mean()
    w = np.hanning(n)
    p = np.abs(np.fft.fftshift(np.fft.fft2(x * np.outer(w, w)))) ** 2
    f = np.fft.fftshift(np.fft.fftfreq(n, d=spacing_mm))
    fr = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    edges = np.geomspace(band[0], band[1], 16)
    fc, pc = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (fr >= lo) & (fr < hi)
        if sel.any():
            fc.append(np.sqrt(lo * hi))
            pc.append(p[sel].mean())
    slope = np.polyfit(np.log(fc), np.log(pc), 1)[0]
    return float(-slope)


def summarise(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "mean": round(float(a.mean()), 3), "sd": round(float(a.std(ddof=1)), 3) if a.size > 1 else 0.0,
            "median": round(float(np.median(a)), 3), "min": round(float(a.min()), 3), "max": round(float(a.max()), 3)}


def lesion_stats(studies) -> dict:
    masses, clusters, macro = [], [], []
    normal = 0
    densities = Counter()
    image_labels = Counter()
    for st in studies:
        normal += st.normal
        densities[st.density] += 1
        for im in st.images:
            image_labels["malignant" if im.labels["malignant"] else "benign" if im.labels["benign"] else "normal"] += 1
        for lat, findings in st.findings.items():
            for f in findings:
                if f.kind == "mass":
                    masses.append(f)
                elif f.kind == "cluster":
                    clusters.append(f)
                else:
                    macro.append(f)
    out = {"studies": len(studies), "normal_share": round(normal / len(studies), 3),
           "density": dict(sorted(densities.items())), "image_labels": dict(image_labels), "masses": {}, "clusters": {},
           "macrocalcifications": {"count": len(macro),
                                   "diameter_mm": summarise([f.size_mm for f in macro]) if macro else None}}
    for cls in ("benign", "malignant"):
        ms = [f for f in masses if f.malignant == (cls == "malignant")]
        out["masses"][cls] = {"count": len(ms), "shapes": dict(Counter(f.shape for f in ms)),
                              "radius_mm": summarise([f.size_mm for f in ms]) if len(ms) > 1 else None}
        cs = [f for f in clusters if f.malignant == (cls == "malignant")]
        if cs:
            lengths = np.concatenate([f.speck_sizes[:, 0] for f in cs])
            widths = np.concatenate([f.speck_sizes[:, 1] for f in cs])
            extent = [float(np.ptp(f.speck_offsets[:, :2], axis=0).max()) for f in cs]
            out["clusters"][cls] = {"count": len(cs), "shapes": dict(Counter(f.shape for f in cs)),
                                    "specks_per_cluster": summarise([len(f.speck_offsets) for f in cs]),
                                    "speck_length_mm": summarise(lengths.tolist()),
                                    "speck_elongation": summarise((lengths / widths).tolist()),
                                    "extent_mm": summarise(extent)}
        else:
            out["clusters"][cls] = {"count": 0}
    return out


def real_reference(folder: Path) -> dict | None:
    from PIL import Image

    from dicom_ai.imaging import breast_mask

    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    betas = []
    for path in files:
        arr = np.asarray(Image.open(path)).astype(np.float32) / 65535.0
        if arr.shape != (3328, 2560):
            continue
        binned = arr.reshape(1664, 2, 1280, 2).mean((1, 3))
        origin = roi_origin(breast_mask(binned), "CC")
        if origin is not None:
            r, c = origin
            betas.append(spectrum_beta(binned[r:r + ROI, c:c + ROI], 0.14))
    return {"files": len(betas), "beta": summarise(betas), "note": "reference only; data not in the project"} if betas else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=25, help="studies for beta (4 images each; default 25)")
    parser.add_argument("--size", default="1664x1280", help="ROWSxCOLUMNS for the beta images (default 1664x1280)")
    parser.add_argument("--extra", type=int, default=200, help="extra small studies for lesion statistics")
    parser.add_argument("--timing-runs", type=int, default=3)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.size.split("x"))
    spacing = 0.07 * 3328 / shape[0]

    t0 = time.perf_counter()
    studies, betas, by_density, by_view = [], [], {}, {}
    for seed in range(args.studies):
        st = generate_study(10_000 + seed, shape=shape)
        studies.append(st)
        for im in st.images:
            origin = roi_origin(im.breast_mask, im.view)
            if origin is None:
                continue
            r, c = origin
            b = spectrum_beta(im.pixels[r:r + ROI, c:c + ROI], spacing)
            betas.append(b)
            by_density.setdefault(st.density, []).append(b)
            by_view.setdefault(im.view, []).append(b)
    beta_time = time.perf_counter() - t0
    small = [generate_study(20_000 + s, shape=(104, 80)) for s in range(args.extra)]

    times, cpu = [], []
    for i in range(args.timing_runs):
        t, c = time.perf_counter(), time.process_time()
        full = generate_study(30_000 + i, shape=(3328, 2560))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_study(full, Path(tmp) / "explicit")
        write_explicit = time.perf_counter() - t
        t = time.perf_counter()
        write_study(full, Path(tmp) / "j2k", transfer_syntax="jpeg2000")
        write_j2k = time.perf_counter() - t

    result = {
        "protocol": {"images": len(betas), "shape": list(shape), "spacing_mm": round(spacing, 4), "roi_px": ROI,
                     "band_cycles_per_mm": list(BAND), "generator_beta": 3.0},
        "beta": summarise(betas),
        "beta_by_density": {k: summarise(v) for k, v in sorted(by_density.items()) if len(v) > 1},
        "beta_by_view": {k: summarise(v) for k, v in sorted(by_view.items())},
        "beta_real_reference": real_reference(REPO.parent / "shared" / "data" / "real"),
        "lesions_beta_studies": lesion_stats(studies),
        "lesions_population": lesion_stats(studies + small),
        # Wall time depends on what else runs on the machine; CPU time (all threads) less so.
        "full_size_study_seconds": {"runs": [round(t, 2) for t in times], "median": round(statistics.median(times), 2),
                                    "cpu_median": round(statistics.median(cpu), 2),
                                    "write_explicit": round(write_explicit, 2), "write_jpeg2000": round(write_j2k, 2)},
        "machine": {"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)},
        "wall_seconds_beta_set": round(beta_time, 1),
    }
    out = REPO / "benchmarks" / "results" / "phantom.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

    b = result["beta"]
    print(f"{'measure':38s} value")
    print(f"{'beta (phantom, ' + str(b['n']) + ' images)':38s} {b['mean']:.2f} +- {b['sd']:.2f} (median {b['median']:.2f})")
    if result["beta_real_reference"]:
        rb = result["beta_real_reference"]["beta"]
        print(f"{'beta (real CC reference, ' + str(rb['n']) + ')':38s} {rb['mean']:.2f} +- {rb['sd']:.2f}")
    pop = result["lesions_population"]
    print(f"{'studies (normal share)':38s} {pop['studies']} ({pop['normal_share']:.2f})")
    for cls in ("benign", "malignant"):
        m, c = pop["masses"][cls], pop["clusters"][cls]
        print(f"{'masses ' + cls:38s} {m['count']} {m['shapes']}")
        if c["count"]:
            print(f"{'clusters ' + cls:38s} {c['count']} specks/cluster {c['specks_per_cluster']['mean']:.1f}, "
                  f"elongation {c['speck_elongation']['mean']:.2f}")
    ft = result["full_size_study_seconds"]
    print(f"{'full-size 4-view study, wall (cpu) s':38s} {ft['median']:.2f} ({ft['cpu_median']:.2f}); "
          f"write {ft['write_explicit']:.2f}, J2K {ft['write_jpeg2000']:.2f}")
    print(f"{'load average during run':38s} {result['machine']['load_average_1min']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
