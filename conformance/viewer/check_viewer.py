"""Visible in a real viewer: the node's SEG and SR opened in OHIF over Orthanc DICOMweb.

What it does, all on loopback and bounded in time:

1. Installs what it needs into a cache folder (default ``build/viewer``, ignored by git) when
   missing: the built OHIF application (the ``dist`` folder of ``@ohif/app`` from npm, unpacked
   from its tarball, no dependency install) and ``playwright-core`` (only the driver; the
   browser is Debian's ``/usr/bin/chromium``).
2. Generates a phantom screening study and the node's results for its ground truth
   (``fixtures.make_study``), and validates every SEG with dciodvfy.
3. Starts Orthanc with only its DICOMweb plugin on free ports, uploads the images, opens the
   study in OHIF in headless Chromium (screenshot "before"), uploads the results, opens the SR
   and each SEG as a radiologist does (double-click the series), and takes for each one a
   screenshot with the results drawn and one with them hidden (same viewport state).
4. Asserts from the pixels that the findings are drawn where they belong: the SR contours
   (changed pixels along the projected contour) and, for a SEG that OHIF loads, the segment
   fill (changed pixels inside the mask, unchanged pixels around it). For a SEG without
   Plane Orientation (Patient) it asserts the documented OHIF 3.13 behaviour (the load fails
   with the ImageOrientationPatient error), so a change in OHIF or in the writer is noticed.
5. Uploads the per-image Grayscale Softcopy Presentation States and "AI overlay" Secondary
   Captures (issue 18), opens each by double-clicking its series and records what OHIF shows:
   each SC must be shown with its burned-in (coloured) outlines; for a GSPS it records, without
   asserting, whether OHIF lists it and applies it (OHIF 3.13.2: listed as an "unsupported"
   display set; double-clicking it changes nothing and draws nothing, ``report.json`` "gsps").

Run ``make viewer-check`` or ``.venv/bin/python conformance/viewer/check_viewer.py --out DIR``.
Exit status 0 when every assertion holds; the report is ``DIR/report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(1, str(ROOT))

import fixtures  # noqa: E402
import servers  # noqa: E402

OHIF_VERSION = "3.13.2"
PLAYWRIGHT_VERSION = "1.65.1"
CHROMIUM = "/usr/bin/chromium"
# A screen pixel "changed" when its RGB differs by more than this (sum over channels).
CHANGE_THRESHOLD = 60
MIN_COVERAGE = 0.8
MAX_OUTSIDE_CHANGED = 0.05
SEG_ORIENTATION_ERROR = "ImageOrientationPatient"


class CheckError(RuntimeError):
    """The environment cannot run the check (message says what to install)."""


# ---------------------------------------------------------------- installation

def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise CheckError("npm not found; install Debian packages nodejs and npm (Node 18 or newer)")
    return npm


def ensure_cache(cache: Path) -> tuple[Path, Path]:
    """OHIF's dist folder and the node_modules holding playwright-core, installed if missing."""
    cache.mkdir(parents=True, exist_ok=True)
    dist = cache / f"ohif-app-{OHIF_VERSION}" / "dist"
    if not (dist / "index.html").is_file():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            subprocess.run([_npm(), "pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", tmp],
                           check=True, capture_output=True, timeout=600)
            tgz = next(Path(tmp).glob("*.tgz"))
            with tarfile.open(tgz) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
                tar.extractall(tmp, members=members, filter="data")
            target = dist.parent
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            shutil.move(str(Path(tmp) / "package" / "dist"), str(dist))
    modules = cache / "node_modules"
    pkg = modules / "playwright-core" / "package.json"
    if not pkg.is_file() or json.loads(pkg.read_text())["version"] != PLAYWRIGHT_VERSION:
        subprocess.run([_npm(), "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(cache),
                        f"playwright-core@{PLAYWRIGHT_VERSION}"], check=True, capture_output=True, timeout=600)
    if not Path(CHROMIUM).is_file():
        raise CheckError(f"{CHROMIUM} not found; install the Debian package chromium (make viewer-check does)")
    return dist, modules


# The two small changes to OHIF 3.13.2's bundles that make a standard SEG of a projection image
# (no Frame of Reference, so no plane geometry) load and display; used only with --patched-ohif,
# to show where the fix belongs. The default check runs OHIF as published.
# 1. cornerstone's SEG loader: PS3.3 A.51.5.1 says such a SEG is pixel-for-pixel on its source
#    image, so give it the source's orientation instead of reading a missing Plane Orientation.
# 2. OHIF's SEG viewport: read Slice Thickness/Spacing Between Slices from Pixel Measures only
#    when there is one.
_PATCHES = [
    ("  const validOrientations = Segmentation_4X_getValidOrientations(ImageOrientationPatient);\n"
     "  const segMetadata = Segmentation_4X_getSegmentMetadata(multiframe, SeriesInstanceUID);\n",
     "  const validOrientations = Segmentation_4X_getValidOrientations(ImageOrientationPatient);\n"
     "  /* dicom_ai viewer check: SEG without Frame of Reference lies on its source images */\n"
     "  if (!multiframe.FrameOfReferenceUID && !multiframe.SharedFunctionalGroupsSequence.PlaneOrientationSequence\n"
     "      && !(multiframe.PerFrameFunctionalGroupsSequence[0] || {}).PlaneOrientationSequence) {\n"
     "    multiframe.SharedFunctionalGroupsSequence.PlaneOrientationSequence = { ImageOrientationPatient };\n"
     "  }\n"
     "  const segMetadata = Segmentation_4X_getSegmentMetadata(multiframe, SeriesInstanceUID);\n"),
    ("  const {\n    PixelMeasuresSequence\n  } = SharedFunctionalGroup;\n"
     "  const PixelMeasures = Array.isArray(PixelMeasuresSequence) ? PixelMeasuresSequence[0] : PixelMeasuresSequence;\n"
     "  const {\n    SpacingBetweenSlices,\n    SliceThickness\n  } = PixelMeasures;\n"
     "  const image0 = referencedDisplaySet.images[0];\n",
     "  const {\n    PixelMeasuresSequence\n  } = SharedFunctionalGroup || {};\n"
     "  const PixelMeasures = (Array.isArray(PixelMeasuresSequence) ? PixelMeasuresSequence[0] : PixelMeasuresSequence) || {};\n"
     "  const {\n    SpacingBetweenSlices,\n    SliceThickness\n  } = PixelMeasures;\n"
     "  const image0 = referencedDisplaySet.images[0];\n"),
]


def patched_dist(dist: Path) -> Path:
    """A copy of OHIF's dist (hard links) with the changes in ``_PATCHES``; built once."""
    target = dist.parent.parent / f"{dist.parent.name}-patched" / "dist"
    if (target / "PATCHED").is_file() and (target / "PATCHED").read_text().count("\n") == len(_PATCHES):
        return target
    shutil.rmtree(target.parent, ignore_errors=True)
    shutil.copytree(dist, target, copy_function=os.link)
    done = []
    for anchor, replacement in _PATCHES:
        hits = [p for p in target.glob("*.js") if anchor in p.read_text(errors="ignore")]
        if not hits:  # another OHIF build: the patch does not apply
            raise CheckError(f"cannot patch OHIF {OHIF_VERSION}: anchor not found in any bundle")
        for hit in hits:  # webpack copied some modules into more than one chunk
            text = hit.read_text()
            hit.unlink()  # break the hard link before writing
            hit.write_text(text.replace(anchor, replacement))
        done.append(" ".join(h.name for h in hits))
    (target / "PATCHED").write_text("".join(f"{name}\n" for name in done))
    return target


# ---------------------------------------------------------------- browser

def drive(plan: dict, timeout_s: float) -> dict:
    """Run drive.mjs with ``plan``; returns what it wrote to <outDir>/<phase>.json."""
    out = Path(plan["outDir"])
    plan_path = out / f"plan_{plan['phase']}.json"
    plan_path.write_text(json.dumps(plan))
    node = shutil.which("node") or "node"
    proc = subprocess.Popen([node, str(HERE / "drive.mjs"), str(plan_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # node and the Chromium it started
        proc.communicate()
        raise CheckError(f"the browser driver did not finish within {timeout_s:.0f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    result_path = out / f"{plan['phase']}.json"
    if not result_path.is_file():
        raise CheckError(f"drive.mjs wrote no result (rc={proc.returncode}): {log.decode(errors='replace')[-2000:]}")
    result = json.loads(result_path.read_text())
    if result.get("fatal"):
        raise CheckError(f"browser phase {plan['phase']} failed: {result['fatal'][:2000]}")
    return result


# ---------------------------------------------------------------- pixel analysis

def _changed(a: Path, b: Path) -> np.ndarray:
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    return np.abs(x - y).sum(axis=2) > CHANGE_THRESHOLD


def _hit(changed: np.ndarray, xy, radius: int) -> bool:
    x, y = int(round(xy[0])), int(round(xy[1]))
    h, w = changed.shape
    y0, y1, x0, x1 = max(0, y - radius), min(h, y + radius + 1), max(0, x - radius), min(w, x + radius + 1)
    return bool(y0 < y1 and x0 < x1 and changed[y0:y1, x0:x1].any())


def contour_samples(contour: np.ndarray, n: int = 120) -> np.ndarray:
    """``n`` points evenly spaced along a closed polyline (column, row)."""
    seg = np.diff(contour, axis=0)
    lengths = np.hypot(seg[:, 0], seg[:, 1])
    cum = np.concatenate([[0], np.cumsum(lengths)])
    t = np.linspace(0, cum[-1], n, endpoint=False)
    i = np.clip(np.searchsorted(cum, t, side="right") - 1, 0, len(seg) - 1)
    frac = ((t - cum[i]) / np.maximum(lengths[i], 1e-9))[:, None]
    return contour[i] + frac * seg[i]


def _shift_or(mask: np.ndarray, steps: int, erode: bool) -> np.ndarray:
    m = mask.copy()
    for _ in range(steps):
        p = np.pad(m, 1, constant_values=not erode)
        nb = [p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]
        m = np.logical_and.reduce(nb) if erode else np.logical_or.reduce(nb)
    return m


def mask_samples(mask: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres (column, row) well inside ``mask`` and in a ring 4-12 px around it."""
    inner = _shift_or(mask, 2, erode=True)
    ring = _shift_or(mask, 12, erode=False) & ~_shift_or(mask, 4, erode=False)

    def pick(m):
        rr, cc = np.nonzero(m)
        if rr.size == 0:
            return np.zeros((0, 2))
        k = rng.choice(rr.size, size=min(n, rr.size), replace=False)
        return np.column_stack([cc[k] + 0.5, rr[k] + 0.5])
    return pick(inner), pick(ring)


# ---------------------------------------------------------------- the check

def strip_linear_voi_function(images) -> int:
    """Drop VOI LUT Function (0028,1056) = LINEAR from the images; returns how many had it.

    OHIF 3.13.2 (cornerstone dicom-image-loader) indexes the string value, gets "L" and then
    refuses to render the image ("Invalid VOI LUT function", cornerstone3D issue #2844), so
    no mammogram carrying the attribute is displayed at all. LINEAR is also the value that
    applies when the attribute is absent (PS3.3 C.11.2.1.3), so removing it changes nothing
    in how the image should look; any other value is left alone and the check will fail.
    """
    n = 0
    for ds in images:
        if str(ds.get("VOILUTFunction", "")).strip() == "LINEAR":
            del ds.VOILUTFunction
            n += 1
    return n


def _label(ds) -> str:
    """A result's name in the report: its series description and the end of its instance UID."""
    return f"{ds.SeriesDescription} (..{ds.SOPInstanceUID[-6:]})"


def _seg_source(seg) -> str:
    """SOP Instance UID of the image a (single-image) SEG was derived from."""
    fg = seg.PerFrameFunctionalGroupsSequence[0]
    return str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)


def _view_source(ds) -> str:
    """SOP Instance UID of the image a GSPS or SC was made for."""
    if "ReferencedSeriesSequence" in ds:
        return ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
    return ds.SourceImageSequence[0].ReferencedSOPInstanceUID


def _coloured_fraction(png: Path, canvas: dict | None) -> float:
    """Share of the viewport's pixels that are clearly coloured (not grey): burned-in outlines."""
    if not canvas or not png.is_file():
        return 0.0
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    x0, y0 = int(canvas["left"]), int(canvas["top"])
    box = a[y0:y0 + int(canvas["height"]), x0:x0 + int(canvas["width"])]
    if not box.size:
        return 0.0
    return float(((box.max(axis=2) - box.min(axis=2)) > 60).mean())


def _image_visible(png: Path, canvas: dict) -> float:
    """Fraction of the viewport canvas that is not black: the mammogram is on screen."""
    img = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
    x0, y0 = int(canvas["left"]), int(canvas["top"])
    box = img[y0:y0 + int(canvas["height"]), x0:x0 + int(canvas["width"])]
    return float((box > 40).mean()) if box.size else 0.0


def run_check(out: Path, cache: Path, seed: int, shape: tuple[int, int], writer: str,
              experiments: bool, timeout_s: float, keep_voi_function: bool = False,
              patched: bool = False, cad_sr: bool = False) -> dict:
    from conformance.validators import dciodvfy

    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    dist, modules = ensure_cache(cache)
    if patched:
        dist = patched_dist(dist)
    t_install = time.monotonic() - t0

    study = fixtures.make_study(seed=seed, shape=shape, writer=writer, cad_sr=cad_sr)
    stripped = 0 if keep_voi_function else strip_linear_voi_function(study.images)
    segs, srs = list(study.segs), list(study.srs)
    if experiments:
        sources = {ds.SOPInstanceUID: ds for ds in study.images}
        segs += [fixtures.with_plane_orientation(s, sources[_seg_source(s)]) for s in study.segs]
        srs += [fixtures.sr_geometry_groups_only(s) for s in study.srs]
    files = {"images": [], "results": []}
    dicom_dir = out / "dicom"
    shutil.rmtree(dicom_dir, ignore_errors=True)
    dicom_dir.mkdir()
    cad = list(study.other_srs)  # Mammography CAD SR: opened and recorded, nothing asserted
    for group, datasets in (("images", study.images), ("results", [*srs, *cad, *segs])):
        for ds in datasets:
            p = dicom_dir / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
            ds.save_as(p, enforce_file_format=True)
            files[group].append(p)
    seg_reports = {}
    for ds in segs:
        rep = dciodvfy(dicom_dir / f"SEG_{ds.SOPInstanceUID}.dcm")
        seg_reports[_label(ds)] = {"dciodvfy_errors": rep.errors, "dciodvfy_warnings": rep.warnings}

    # Probe points per image: samples along each SR contour, then SEG samples inside each
    # thresholded map and in a ring around it. drive.mjs projects them to screen pixels.
    contours = {}  # the node's SR regions (an experiment variant keeps the same ones)
    for sr in study.srs:
        for sop, items in fixtures.sr_contours(sr).items():
            contours.setdefault(sop, []).extend(items)
    rng = np.random.default_rng(0)
    probes, layout = {}, {}
    for f in study.findings:
        pts, lay = [], {"contours": [], "seg": []}
        for name, poly in contours.get(f.sop_instance_uid, []):
            s = contour_samples(poly)
            lay["contours"].append((name, len(pts), len(s)))
            pts.extend(s.tolist())
        for m in f.maps:
            inside, ring = mask_samples(m.probability >= m.threshold, 150, rng)
            lay["seg"].append((m.finding, len(pts), len(inside), len(pts) + len(inside), len(ring)))
            pts.extend(inside.tolist())
            pts.extend(ring.tolist())
        if pts:
            probes[f.sop_instance_uid] = pts
            layout[f.sop_instance_uid] = lay
    n_regions = sum(len(v) for v in contours.values())

    report: dict = {"ohif": OHIF_VERSION + (" + SEG geometry patches" if patched else ""),
                    "playwright_core": PLAYWRIGHT_VERSION, "writer": study.writer, "seed": seed, "shape": list(shape), "voi_lut_function_removed_from_images": stripped,
                    "segs": seg_reports, "checks": [], "ok": True}

    def check(name: str, ok: bool, detail: str) -> None:
        report["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        report["ok"] &= bool(ok)

    for label, rep in seg_reports.items():  # the variants too: viewer.md says they stay clean
        check(f"SEG '{label}' passes dciodvfy", not rep["dciodvfy_errors"], f"{rep['dciodvfy_errors'][:3]}")

    with servers.Orthanc() as orthanc, servers.OhifServer(dist, orthanc.url) as web:
        base_plan = {"nodeModules": str(modules), "chromium": CHROMIUM, "baseUrl": web.url,
                     "studyUID": study.images[0].StudyInstanceUID, "outDir": str(out),
                     "timeoutMs": int(timeout_s * 1000), "probes": probes}
        for p in files["images"]:
            orthanc.upload(p)
        before = drive({**base_plan, "phase": "before"}, timeout_s + 30)
        check("study opens", before.get("viewport", {}).get("sopInstanceUID") in {d.SOPInstanceUID for d in study.images},
              f"{len(before.get('displaySets', []))} display sets: "
              f"{sorted({(d['modality'], d['description']) for d in before.get('displaySets', [])})}")
        visible = _image_visible(out / before["screenshot"], before["viewport"]["canvas"])
        check("mammogram rendered", visible > 0.05 and not before["consoleErrors"],
              f"{visible:.0%} of the viewport is lit; console errors: {[e[:200] for e in before['consoleErrors'][:2]]}")
        for p in files["results"]:
            orthanc.upload(p)
        after = drive({**base_plan, "phase": "after", "timeoutMs": int(timeout_s * 2000),
                       "sr": [{"uid": d.SeriesInstanceUID, "sop": d.SOPInstanceUID, "label": _label(d)}
                              for d in [*srs, *cad]],
                       "seg": [{"uid": d.SeriesInstanceUID, "sop": d.SOPInstanceUID, "label": _label(d),
                                "source": _seg_source(d)} for d in segs]}, timeout_s * 2 + 30)
        # Then the per-image GSPS and "AI overlay" SC (issue 18), uploaded after the SR/SEG
        # checks so those see the study as before.
        views = list(study.views)
        for ds in views:
            p = dicom_dir / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
            ds.save_as(p, enforce_file_format=True)
            orthanc.upload(p)
        shown = drive({**base_plan, "phase": "views", "timeoutMs": int(timeout_s * 2000),
                       "views": [{"kind": "PR" if d.Modality == "PR" else "SC", "uid": d.SeriesInstanceUID,
                                  "sop": d.SOPInstanceUID, "label": _label(d), "source": _view_source(d)}
                                 for d in views]}, timeout_s * 2 + 30) if views else {"opened": []}
    report["before"], report["after"], report["views"] = before, after, shown
    for entry in shown["opened"]:
        shown_sop = (entry.get("viewport") or {}).get("sopInstanceUID")
        summary = {"listed": entry.get("reachable"), "thumbnail": entry.get("thumbnail"),
                   "display_set": entry.get("displaySet"), "shown_sop_instance": shown_sop,
                   "shows_its_source_image": shown_sop == entry.get("sourceSOPInstanceUID"),
                   "drawn_svg_elements": entry.get("drawnSvg"), "screenshot": entry.get("screenshot"),
                   "ohif_errors": [e[:300] for e in entry.get("errors", [])[:3]]}
        if entry["kind"] == "PR":
            # Recorded, not asserted: whether OHIF applies a GSPS is what this answers.
            report.setdefault("gsps", {})[entry["description"]] = summary
            continue
        colour = _coloured_fraction(out / entry["screenshot"], (entry.get("viewport") or {}).get("canvas"))
        summary["coloured_fraction_of_viewport"] = round(colour, 5)
        report.setdefault("secondary_captures", {})[entry["description"]] = summary
        check(f"AI overlay SC '{entry['description']}' shown with its burned-in outlines",
              entry.get("reachable") and shown_sop == entry["sopInstanceUID"] and colour > 0.0002,
              f"listed {entry.get('reachable')}, shown {str(shown_sop)[-8:]}, {colour:.3%} of the viewport "
              f"coloured; errors {[e[:200] for e in entry.get('errors', [])[:2]]}")

    for entry in after["opened"]:
        sop = entry.get("viewport", {}).get("sopInstanceUID")
        lay, proj = layout.get(sop), entry.get("probes")
        label = entry["description"]
        errors = " ".join(entry["errors"])
        if entry.get("reachable") is False:
            check(f"{entry['kind']} '{label}' listed in the study browser", False,
                  "OHIF builds one display set per SEG series from its last instance only" if entry["kind"] == "SEG"
                  else entry["errors"][:1])
            continue
        if entry["kind"] == "SR" and entry["sopInstanceUID"] in {d.SOPInstanceUID for d in cad}:
            report.setdefault("cad_sr", {})[label] = {
                "listed": entry.get("reachable"), "annotations": len(entry.get("annotations") or []),
                "screenshot": entry.get("screenshot"), "ohif_errors": [e[:300] for e in entry["errors"][:3]]}
            continue
        if entry["kind"] == "SR":
            anns = entry.get("annotations") or []
            report.setdefault("srs", {})[label] = {"drawn": entry.get("drawn"), "annotations": len(anns),
                                                   "ohif_errors": entry["errors"][:3]}
            check(f"SR '{label}' loads: one annotation per SR region", entry.get("loaded") and len(anns) == n_regions
                  and not entry["errors"], f"{len(anns)} annotations in OHIF, {n_regions} regions in the SR; "
                  f"drawn elements {entry.get('drawn')}; errors {[e[:200] for e in entry['errors'][:2]]}")
            if not (lay and proj and entry.get("screenshotHidden") and anns):
                continue
            changed = _changed(out / entry["screenshot"], out / entry["screenshotHidden"])
            for name, start, n in lay["contours"]:
                hits = sum(_hit(changed, proj[start + k], 3) for k in range(n))
                check(f"SR '{label}' contour drawn: {name}", hits / n >= MIN_COVERAGE,
                      f"{hits}/{n} contour samples have drawn pixels within 3 px ({entry['screenshot']})")
        else:
            ds = next(d for d in segs if d.SOPInstanceUID == entry["sopInstanceUID"])
            shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else Dataset()
            has_po = "PlaneOrientationSequence" in shared or any(
                "PlaneOrientationSequence" in fg for fg in ds.PerFrameFunctionalGroupsSequence)
            has_pm = "PixelMeasuresSequence" in shared
            seg_reports[label].update(plane_orientation=has_po, pixel_measures=has_pm,
                                      loaded_in_ohif=bool(entry.get("loaded")),
                                      ohif_errors=[e[:300] for e in entry["errors"][:2]])
            if not (has_po and has_pm) and not patched:
                # OHIF 3.13.2 as published: the SEG viewport crashes without shared Pixel Measures,
                # the loader without Plane Orientation (conformance/viewer.md, SEG point 2).
                expected = "PixelMeasuresSequence" if not has_pm else SEG_ORIENTATION_ERROR
                check(f"SEG '{label}' without {'Pixel Measures' if not has_pm else 'Plane Orientation'}: "
                      f"OHIF {OHIF_VERSION} refuses it as documented",
                      not entry.get("loaded") and expected in errors,
                      f"loaded={entry.get('loaded')}, errors: {errors[:200]}")
                continue
            check(f"SEG '{label}' loads", entry.get("loaded") and not entry["errors"],
                  f"segmentations {entry.get('segmentations')}, errors {[e[:200] for e in entry['errors'][:2]]}")
            tries = entry.get("attempts", [])
            seg_reports[label]["attempts"] = tries
            check(f"SEG '{label}' shown on its source image", sop == _seg_source(ds),
                  f"{len(tries)} opening(s); shown on {[t['shownSOPInstanceUID'][-6:] for t in tries]}, "
                  f"source ..{_seg_source(ds)[-6:]}")
            if not (lay and proj and entry.get("screenshotHidden")):
                continue
            changed = _changed(out / entry["screenshot"], out / entry["screenshotHidden"])
            for finding, s_in, n_in, s_out, n_out in lay["seg"]:
                inside = sum(_hit(changed, proj[s_in + k], 0) for k in range(n_in)) / max(n_in, 1)
                outside = sum(_hit(changed, proj[s_out + k], 0) for k in range(n_out)) / max(n_out, 1)
                check(f"SEG '{label}' drawn on its mask: {finding}",
                      inside >= MIN_COVERAGE and outside <= MAX_OUTSIDE_CHANGED,
                      f"{inside:.0%} of pixels inside the mask changed, {outside:.0%} around it ({entry['screenshot']})")
    for c in report["checks"]:
        c["experiment"] = "(experiment)" in c["name"]
    report["seconds"] = {"install": round(t_install, 1), "total": round(time.monotonic() - t0, 1)}
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "viewer" / "out",
                    help="folder for screenshots, DICOM files and report.json")
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "viewer",
                    help="npm cache folder (OHIF dist, playwright-core)")
    ap.add_argument("--seed", type=int, default=2, help="phantom seed (2: a malignant mass in both right views)")
    ap.add_argument("--shape", default="832x640", help="phantom rows x columns")
    ap.add_argument("--writer", choices=("auto", "node", "recipe"), default="auto",
                    help="who writes SEG/SR: the node (dicom_ai.results), the highdicom recipe, or node when present")
    ap.add_argument("--no-experiments", dest="experiments", action="store_false",
                    help="skip the SEG variant with Plane Orientation (Patient)")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per browser phase")
    ap.add_argument("--patched-ohif", action="store_true",
                    help="run OHIF with the SEG loader/viewport fixes in _PATCHES instead of as published")
    ap.add_argument("--cad-sr", action="store_true",
                    help="also send the Mammography CAD SR and record what OHIF shows for it (not asserted)")
    ap.add_argument("--keep-voi-lut-function", action="store_true",
                    help="upload the images with VOI LUT Function as generated (OHIF 3.13.2 then shows no image)")
    args = ap.parse_args(argv)
    rows, cols = (int(v) for v in args.shape.lower().split("x"))
    try:
        report = run_check(args.out.resolve(), args.cache.resolve(), args.seed, (rows, cols), args.writer,
                           args.experiments, args.timeout, args.keep_voi_lut_function, args.patched_ohif,
                           args.cad_sr)
    except (CheckError, FileNotFoundError, subprocess.CalledProcessError, TimeoutError) as e:
        print(f"viewer check could not run: {e}", file=sys.stderr)
        return 2
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"OHIF {report['ohif']} over Orthanc DICOMweb; results by {report['writer']}; "
          f"{report['seconds']['total']} s; screenshots in {args.out}")
    for c in report["checks"]:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")
    for label, info in report.get("cad_sr", {}).items():
        print(f"  info CAD SR '{label}': {info}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
