"""Result writers on a full-size mammogram (3328 x 2560): SEG size per segmentation type and
compression, and build time of SEG, TID 1500 SR and Mammography CAD SR.

Maps: a phantom study's ground truth (masses, clusters) blurred into probabilities, plus
low-level noise, for three models as the node runs them (GLAM malignant/benign, U-Net
malignant, microcalcification individual/cluster): five segments per image.
Writes benchmarks/results/result_writers.json and prints a table.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_ai.core.findings import ImageFindings, ImageScore, ModelIdentity, ProbabilityMap  # noqa: E402
from dicom_ai.data.phantom import generate_study  # noqa: E402
from dicom_ai.core.options import ResultOptions
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.results import build_results  # noqa: E402

SHAPE = (3328, 2560)


def _blur(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    img = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(mask.astype(np.float32)), sigma_px)
    out = sitk.GetArrayFromImage(img)
    return np.clip(out / max(float(out.max()), 1e-6), 0, 1).astype(np.float32) if mask.any() else out


def main() -> None:
    study = generate_study(5, shape=SHAPE, normal=False)
    im = max(study.images, key=lambda i: sum(m.sum() for m in i.masks.values()))
    ds = im.dataset
    rng = np.random.default_rng(0)
    # Smooth low-level background, as a network's map has (white noise would defeat any codec).
    noise = _blur(rng.random(SHAPE, dtype=np.float32) > 0.5, 25) * 0.05
    lesion = im.masks["mass_malignant"] | im.masks["mass_benign"]
    calc = im.masks["calcification_malignant"] | im.masks["calcification_benign"]
    cluster = im.masks["cluster_malignant"] | im.masks["cluster_benign"]
    glam, dunet, micro = ModelIdentity("glam", "1.0.0"), ModelIdentity("dunet", "1.0.0"), ModelIdentity("microcalc", "1.0.0")
    f = ImageFindings(ds.SOPInstanceUID, maps=[
        ProbabilityMap("malignant_lesion", np.maximum(_blur(im.masks["mass_malignant"], 8) * 0.95, noise), 0.5, glam),
        ProbabilityMap("benign_lesion", np.maximum(_blur(im.masks["mass_benign"], 8) * 0.9, noise), 0.5, glam),
        ProbabilityMap("malignant_lesion", np.maximum(_blur(lesion, 6) * 0.9, noise), 0.5, dunet),
        ProbabilityMap("calcification", np.maximum(calc.astype(np.float32) * 0.9, noise), 0.5, micro),
        ProbabilityMap("calcification_cluster", np.maximum(_blur(cluster, 10) * 0.9, noise), 0.5, micro),
    ], scores=[ImageScore("malignant", 0.8, glam), ImageScore("benign", 0.3, glam)])
    uids = ResultUIDs.generate([ds.SOPInstanceUID])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seg_type, compression in [("BINARY", "none"), ("BINARY", "jpeg2000"), ("FRACTIONAL", "none"),
                                      ("FRACTIONAL", "rle"), ("FRACTIONAL", "jpegls"), ("FRACTIONAL", "jpeg2000")]:
            t0 = time.perf_counter()
            out = build_results([ds], [f], uids, ResultOptions(segmentation_type=seg_type, compression=compression,
                                                               cad_sr=True)).datasets
            total = time.perf_counter() - t0
            sizes = {}
            for d in out:
                p = Path(tmp) / f"{d.SOPInstanceUID}.dcm"
                d.save_as(p, enforce_file_format=True)
                sizes[d.SOPClassUID] = p.stat().st_size
            rows.append({"segmentation_type": seg_type, "compression": compression,
                         "seg_bytes": sizes["1.2.840.10008.5.1.4.1.1.66.4"],
                         "sr_bytes": sizes["1.2.840.10008.5.1.4.1.1.88.34"],
                         "cad_sr_bytes": sizes["1.2.840.10008.5.1.4.1.1.88.50"],
                         "build_seconds_all_objects": round(total, 2)})
    from dicom_ai.results import analyse_image

    regions = sum(len(seg.regions.regions) for seg in analyse_image(ds, f))
    result = {"image": {"rows": SHAPE[0], "columns": SHAPE[1], "segments": len(f.maps), "regions": regions},
              "machine": {"platform": platform.platform(), "python": platform.python_version()},
              "rows": rows}
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "result_writers.json").write_text(json.dumps(result, indent=2))
    print(f"{'type':<11}{'compression':<12}{'SEG bytes':>12}{'SR bytes':>10}{'CAD bytes':>10}{'build s':>9}")
    for r in rows:
        print(f"{r['segmentation_type']:<11}{r['compression']:<12}{r['seg_bytes']:>12,}{r['sr_bytes']:>10,}"
              f"{r['cad_sr_bytes']:>10,}{r['build_seconds_all_objects']:>9}")


if __name__ == "__main__":
    main()
