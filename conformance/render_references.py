"""Reference renderings of the node's result objects, one PNG per object type, for ``conformance/air/``.

The job is the golden one (``tests/test_golden_results.py``): phantom screening study seed 3 at
416 x 320, the three shipped bundles on the CPU, every result object enabled. For the image with
the most drawn regions it writes:

* ``air/gsps-dcmp2pgm.png``: what dcmtk's ``dcmp2pgm`` renders of the MG with the node's
  Grayscale Softcopy Presentation State (the image through the GSPS's modality LUT, VOI window
  and presentation LUT), with the overlay dcmp2pgm extracts from the GSPS's activated graphic
  layer painted yellow. dcmp2pgm draws no vector graphics or text: the labels are not in it.
* ``air/sc-ai-overlay.png``: the pixels of the "AI overlay" Secondary Capture, as sent.
* ``air/seg-sr-preview.png``: the node's own preview (SEG segment outlines in their recommended
  display colours, TID 1500 SR contours in white, labels), the same drawing as
  ``<storage>/previews``.
* ``air/manifest.json``: which image, which objects and how many, what drew each PNG
  and the tool versions.

Run ``.venv/bin/python conformance/render_references.py`` (about a minute on two cores); it
exits non-zero when dciodvfy reports an error on any object it renders.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conformance.validators import dciodvfy  # noqa: E402
from dicom_ai.core.options import RESULT_OBJECTS, ResultOptions  # noqa: E402
from dicom_ai.core.uids import ResultUIDs  # noqa: E402
from dicom_ai.data import generate_study, write_study  # noqa: E402
from dicom_ai.networks import Pipeline  # noqa: E402
from dicom_ai.node.processing import run_pipeline  # noqa: E402
from dicom_ai.results import build_results, render_preview  # noqa: E402

OUT = Path(__file__).resolve().parent / "air"


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def render(out: Path = OUT) -> dict:
    """Write the reference PNGs and the manifest into ``out``; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_study(generate_study(3, shape=(416, 320)), work / "study")
        sources = [pydicom.dcmread(p) for p in sorted((work / "study").glob("*.dcm"))]
        sources, findings, notes = run_pipeline(Pipeline.from_bundles(["glam", "dunet", "microcalc"], "cpu"), sources)
        uids = ResultUIDs.generate([str(s.SOPInstanceUID) for s in sources], created=None)
        results = build_results(sources, findings, uids,
                                ResultOptions(cad_sr=True, gsps=True, secondary_capture=True))
        by_class: dict[str, list[pydicom.Dataset]] = {}
        for ds in results.datasets:
            by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
        errors = []
        for ds in results.datasets:
            path = work / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            report = dciodvfy(path)
            errors += [f"{ds.Modality} {ds.SOPInstanceUID}: {e}" for e in report.errors]

        def referenced(ds: pydicom.Dataset) -> str:
            if "ReferencedSeriesSequence" in ds:
                return ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
            return ds.SourceImageSequence[0].ReferencedSOPInstanceUID

        prs = by_class[RESULT_OBJECTS["GSPS"][0]]
        pr = max(prs, key=lambda p: len(p.GraphicAnnotationSequence[0].get("GraphicObjectSequence", [])))
        image = next(i for i in results.images if i.source.SOPInstanceUID == referenced(pr))
        sc = next(s for s in by_class[RESULT_OBJECTS["SC"][0]] if referenced(s) == image.source.SOPInstanceUID)
        seg = image.segmentation

        # GSPS through dcmtk.
        image.source.save_as(work / "mg.dcm", enforce_file_format=True)
        pr.save_as(work / "pr.dcm", enforce_file_format=True)
        # -v: dcmp2pgm writes each activated overlay as ovl_<group><n>.pgm only in verbose mode.
        run = subprocess.run(["dcmp2pgm", "-v", "-p", str(work / "pr.dcm"), str(work / "mg.dcm"), str(work / "out.pgm")],
                             capture_output=True, text=True, timeout=120, cwd=work)
        if run.returncode != 0:
            raise SystemExit(f"dcmp2pgm failed: {run.stderr}")
        gray = np.array(Image.open(work / "out.pgm"))
        rgb = np.repeat(gray[..., None], 3, axis=2)
        overlays = sorted(work.glob("ovl_*.pgm"))
        for o in overlays:
            rgb[np.array(Image.open(o)) > 0] = (255, 255, 0)
        Image.fromarray(rgb).save(out / "gsps-dcmp2pgm.png", optimize=True)
        Image.fromarray(sc.pixel_array).save(out / "sc-ai-overlay.png", optimize=True)
        render_preview(image.source, image.segments, image.findings.scores).save(out / "seg-sr-preview.png",
                                                                                 optimize=True)
        sr = next(d for d in results.datasets if d.SOPClassUID in RESULT_OBJECTS["SR"])
        manifest = {
            "job": "phantom study seed 3 at 416x320, bundles glam/dunet/microcalc on the CPU",
            "image": {"laterality": str(image.source.ImageLaterality), "view": str(image.source.ViewPosition),
                      "regions_drawn": len(pr.GraphicAnnotationSequence[0].get("GraphicObjectSequence", []))},
            "renderings": {
                "gsps-dcmp2pgm.png": {"object": "Grayscale Softcopy Presentation State", "drawn_by": _version(["dcmp2pgm", "--version"]),
                                      "overlays": len(overlays)},
                "sc-ai-overlay.png": {"object": "Secondary Capture Image (AI overlay)", "drawn_by": "the SC's own pixels"},
                "seg-sr-preview.png": {"object": "Segmentation + Comprehensive 3D SR (TID 1500)",
                                       "drawn_by": "dicom_ai.results.render_preview",
                                       "seg_segments": len(seg.SegmentSequence) if seg is not None else 0,
                                       "sr_modality": str(sr.Modality)},
            },
            "objects_in_job": {k: len([d for d in results.datasets if str(d.SOPClassUID) in v])
                               for k, v in RESULT_OBJECTS.items()},
            "dciodvfy_errors": errors,
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs (default conformance/air)")
    manifest = render(parser.parse_args(argv).out)
    print(json.dumps(manifest, indent=1))
    return 1 if manifest["dciodvfy_errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
