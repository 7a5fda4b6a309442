"""Profile of the worker's work around the models for a full-size four-view phantom study.

What the worker does for a job after decoding (``processing.process_job``): per image the
pipeline's preparation (``read_mammogram``: intensities, orientation, breast and pectoral
masks) and restriction of every map to the breast, then the result writers image by image
(regions, SEG), the per-image presentation states, the SR and CAD SR, saving every object
(the outbox's ``save_as``) and the preview PNGs. The models are stand-ins that return
precomputed maps, so only this work is measured: the five maps of the all-on point
(``phantom``: GLAM malignant/benign lesion, U-Net mass, microcalcification calcification
and cluster, all at 0.5) made from the phantom's ground truth as ``bench_result_writers.py``
makes them (blurred masks over a smooth low-level background). Result options: the node's
defaults (``[results]``).

``--maps models`` uses the shipped bundles' own outputs instead (maps before the breast
restriction, scores, identities and thresholds at ``--operating-point``, default ``phantom``),
computed once by running the bundles and kept under ``--cache`` (build/, never committed):
the real models send many more regions (each calcification, each GLAM blob), so this is the
load the all-on point puts on the writers (about 160 SR measurement groups on this study).

The study: ``bench_turnaround.py``'s (seed 1010, 3328 x 2560), written as DICOM and read back.

``--before REV`` runs the same measurement with the code of ``git archive REV`` in a second
process, rounds alternating, so before/after ratios come from one run (``--after REV``: the
"after" code from a revision too, else this checkout). ``--profile`` adds a
cProfile of one round (this code) as a table: the first 30 functions by own time and by
cumulative time.

Writes benchmarks/results/writers_profile.json (and writers_profile.md with ``--profile``), or
``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE = Path(os.environ.get("PROFILE_WRITERS_CODE", REPO))
sys.path.insert(0, str(CODE))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map  # noqa: E402

from dicom_ai.core.findings import ImageScore, ModelIdentity, ModelOutput, ProbabilityMap  # noqa: E402
from dicom_ai.networks.bundle import OperatingIdentity  # noqa: E402
from dicom_ai.core.uids import ResultUIDs  # noqa: E402
from dicom_ai.data.phantom import generate_study  # noqa: E402
from dicom_ai.data.phantom_folder import write_study  # noqa: E402
from dicom_ai.networks.pipeline import Pipeline  # noqa: E402
from dicom_ai.node.config import load_config  # noqa: E402
from dicom_ai.node import processing  # noqa: E402
from dicom_ai.node.processing import result_options, run_into_builder  # noqa: E402
from dicom_ai.results.build import ResultsBuilder  # noqa: E402

SHAPE = (3328, 2560)
SEED = 1010
UID_ROOT = "1.2.826.0.1.3680043.8.498."


def _blur(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    out = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(mask.astype(np.float32)),
                                                                 sigma_px))
    return np.clip(out / max(float(out.max()), 1e-6), 0, 1).astype(np.float32) if mask.any() else out


class StandIn:
    """A model that returns precomputed maps (per SOP Instance UID) for its findings.

    ``real`` (``--maps models``): the identity, per finding threshold and per image scores of
    a shipped bundle's cached outputs; else a 1.0.0 identity at 0.5 with fixed scores.
    """

    def __init__(self, name: str, findings: list[str], maps: dict[str, dict[str, np.ndarray]], scores: bool,
                 real: dict | None = None):
        self.identity = ModelIdentity(name, "1.0.0")
        self.findings, self.scores = findings, ["malignant", "benign"] if scores else []
        self._maps = maps
        self._real = real
        if real is not None:
            ident = real["identity"]
            self.identity = OperatingIdentity(**{**ident, "off": tuple(ident.get("off", ()))})
            self.findings = list(real["thresholds"])
            self.scores = sorted({s[0] for per in real["scores"].values() for s in per})

    def predict(self, mammogram) -> ModelOutput:
        uid = mammogram.sop_instance_uid
        # Fresh arrays, as a model returns (the pipeline may restrict them in place); copied
        # here, so the copy counts as the stand-in's time, not the work measured.
        maps = {k: v.copy() for k, v in self._maps.get(uid, {}).items()}
        if self._real is not None:
            return ModelOutput(maps=[ProbabilityMap(f, maps[f], t, self.identity)
                                     for f, t in self._real["thresholds"].items()],
                               scores=[ImageScore(n, v, self.identity) for n, v in self._real["scores"][uid]])
        return ModelOutput(maps=[ProbabilityMap(f, maps[f], 0.5, self.identity) for f in self.findings],
                           scores=[ImageScore("malignant", 0.8, self.identity), ImageScore("benign", 0.3, self.identity)]
                           if self.scores else [])


def make_inputs(folder: Path) -> tuple[list[Path], dict]:
    study = generate_study(SEED, shape=SHAPE, normal=False)
    write_study(study, folder)
    rng = np.random.default_rng(0)
    noise = _blur(rng.random(SHAPE, dtype=np.float32) > 0.5, 25) * 0.05
    maps = {}
    for im in study.images:
        m = im.masks
        lesion = m["mass_malignant"] | m["mass_benign"]
        maps[str(im.dataset.SOPInstanceUID)] = {
            "glam": {"malignant_lesion": np.maximum(_blur(m["mass_malignant"], 8) * 0.95, noise),
                     "benign_lesion": np.maximum(_blur(m["mass_benign"], 8) * 0.9, noise)},
            "dunet": {"mass": np.maximum(_blur(lesion, 6) * 0.9, noise)},
            "microcalc": {"calcification": np.maximum((m["calcification_malignant"] | m["calcification_benign"])
                                                      .astype(np.float32) * 0.9, noise),
                          "calcification_cluster": np.maximum(_blur(m["cluster_malignant"] | m["cluster_benign"], 10)
                                                              * 0.9, noise)}}
    return sorted(folder.glob("*.dcm")), maps


def model_outputs(files: list[Path], cache: Path, operating_point: str) -> tuple[dict, dict]:
    """The shipped bundles' raw outputs on ``files`` at ``operating_point`` (maps before the
    breast restriction, findings the point switches off left out), as (maps, models): maps
    ``{uid: {model: {finding: array}}}``, models ``{model: {identity, thresholds, scores}}``.
    Run once and kept under ``cache`` (npz + json)."""
    import dataclasses

    import torch

    from dicom_ai.imaging import read_mammogram
    from dicom_ai.networks.pipeline import DEFAULT_MODELS
    from dicom_ai.node.processing import CPU_TORCH_THREADS

    folder = cache / (operating_point or "default")
    if not (folder / "models.json").exists():
        torch.set_num_threads(CPU_TORCH_THREADS)
        pipeline = Pipeline.from_bundles(DEFAULT_MODELS, "cpu", operating_point=operating_point)
        maps, models = {}, {}
        for path in files:
            mammogram = read_mammogram(pydicom.dcmread(path))
            uid = mammogram.sop_instance_uid
            for model in pipeline.models:
                if model in pipeline.skipped:
                    continue
                output = model.predict(mammogram)
                off = set(getattr(model.identity, "off", ()))
                name = model.identity.name
                entry = models.setdefault(name, {"identity": dataclasses.asdict(model.identity), "thresholds": {},
                                                 "scores": {}})
                entry["scores"][uid] = [[s.name, s.value] for s in output.scores]
                for m in output.maps:
                    if m.finding not in off:
                        entry["thresholds"][m.finding] = m.threshold
                        maps.setdefault(uid, {}).setdefault(name, {})[m.finding] = m.probability
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / "maps.npz", **_flatten(maps))
        (folder / "models.json").write_text(json.dumps(models, indent=1))
    with np.load(folder / "maps.npz", allow_pickle=False) as flat:
        maps = _unflatten(dict(flat))
    return maps, json.loads((folder / "models.json").read_text())


def one_job(files: list[Path], maps: dict, out: Path, real: dict | None = None) -> dict:
    """The worker's job after decoding: wall seconds per stage (``seconds``), SHA-256 of every
    object and preview it wrote (``digests``), object and region counts (``counts``). ``real``: the bundles' identities,
    thresholds and scores (``--maps models``), else the ground-truth stand-ins."""
    by_model = {name: {uid: per[name] for uid, per in maps.items() if name in per}
                for name in ("glam", "dunet", "microcalc")}
    if real is not None:
        pipeline = Pipeline([StandIn(name, [], by_model[name], False, real[name])
                             for name in ("glam", "dunet", "microcalc") if name in real])
    else:
        pipeline = Pipeline([StandIn("glam", ["malignant_lesion", "benign_lesion"], by_model["glam"], True),
                             StandIn("dunet", ["mass"], by_model["dunet"], False),
                             StandIn("microcalc", ["calcification", "calcification_cluster"], by_model["microcalc"],
                                     False)])
    # The worker's process settings that its load_pipeline makes (where this code has them).
    processing.release_freed_memory_promptly()
    if hasattr(processing, "SITK_THREADS"):
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(processing.SITK_THREADS)
    sources = [pydicom.dcmread(p) for p in files]
    for ds in sources:
        ds.pixel_array  # decoded before the job, as the sandbox hands them over  # noqa: B018
    # As a worker that has run a job before (and, since the change, any worker): highdicom's
    # standard tables are read, so neither version pays their first read inside the timing.
    get_sop_class_iod_map(), get_iod_module_map(), get_module_attribute_map()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    # Fixed UIDs and creation time (as tests/test_golden_results.py), so two runs of the same
    # code, and before/after, can be compared byte for byte.
    uids = ResultUIDs(seg_series=UID_ROOT + "100",
                      seg_instances={str(ds.SOPInstanceUID): f"{UID_ROOT}101.{i}" for i, ds in enumerate(sources)},
                      sr_series=UID_ROOT + "102", sr_instance=UID_ROOT + "103", cad_series=UID_ROOT + "104",
                      cad_instance=UID_ROOT + "105", created="20261201120000")
    builder = ResultsBuilder(sources, uids, options=result_options(load_config(None)))
    run_into_builder(pipeline, sources, builder, timings)
    results = builder.finish()
    timings.update(results.seconds)
    timings.update(pipeline.take_stage_seconds())
    models = sum(sum(v) for v in pipeline.take_model_seconds().values())
    t = time.perf_counter()
    encoded = getattr(results, "encoded", {})  # as process_job: the bytes the writers' check made, if any
    written = []
    for ds in results.datasets:
        data = encoded.get(str(ds.SOPInstanceUID))
        path = out / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
        if data is not None:
            path.write_bytes(data)
        else:
            ds.save_as(path, enforce_file_format=True)
        written.append(path)
    timings["outbox (save_as)"] = time.perf_counter() - t
    t = time.perf_counter()
    previews = results.write_previews(out / "previews")
    timings["previews"] = time.perf_counter() - t
    timings["total without stand-in models"] = time.perf_counter() - started - models
    timings["pipeline (prepare + restrict + stand-ins)"] = timings.pop("pipeline")
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in written}
    digests.update({f"previews/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in previews})
    counts = {"objects": len(results.datasets),
              "regions": sum(len(s.regions.regions) for r in results.images for s in r.segments)}
    return {"seconds": {k: round(v, 3) for k, v in timings.items()}, "digests": digests, "counts": counts}


def _profile_table(profile: cProfile.Profile, key: str, n: int = 30) -> list[dict]:
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = []
    for (path, line, func), (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append({"function": f"{func} ({Path(path).name}:{line})", "calls": nc, "own_s": round(tt, 3),
                     "cumulative_s": round(ct, 3)})
    rows.sort(key=lambda r: r[key], reverse=True)
    return rows[:n]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default="", help="git revision measured in the same run, rounds alternating")
    parser.add_argument("--after", default="", help="git revision measured as 'after' (default: this checkout)")
    parser.add_argument("--profile", action="store_true", help="also a cProfile table of one round (this code)")
    parser.add_argument("--maps", choices=("truth", "models"), default="truth",
                        help="stand-in maps from the phantom's ground truth, or the shipped bundles' own outputs")
    parser.add_argument("--operating-point", default="phantom", help="the bundles' point with --maps models")
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "profile-writers",
                        help="where --maps models keeps the bundles' outputs (computed once)")
    parser.add_argument("--top", type=int, default=30, help="rows of each profile table")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "writers_profile.json")
    parser.add_argument("--inputs", type=Path, default=None, help=argparse.SUPPRESS)  # for the --before child
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="writers-") as tmp:
        tmp = Path(tmp)
        if args.inputs:  # child: one round with this process's code, on the parent's inputs
            files = sorted((args.inputs / "study").glob("*.dcm"))
            maps = dict(np.load(args.inputs / "maps.npz", allow_pickle=False))
            maps = _unflatten(maps)
            real_path = args.inputs / "models.json"
            real = json.loads(real_path.read_text()) if real_path.exists() else None
            (tmp / "out").mkdir()
            print(json.dumps(one_job(files, maps, tmp / "out", real)))
            return 0
        real = None
        if args.maps == "models":
            sys.path.insert(0, str(REPO / "benchmarks"))
            sys.path.insert(0, str(REPO / "tests"))
            from bench_turnaround import make_study

            study = tmp / "study"
            study.mkdir()
            for path in make_study(REPO / "build" / "turnaround-study"):
                (study / path.name).symlink_to(path)
            files = sorted(study.glob("*.dcm"))
            maps, real = model_outputs(files, args.cache, args.operating_point)
            (tmp / "models.json").write_text(json.dumps(real))
        else:
            files, maps = make_inputs(tmp / "study")
        np.savez(tmp / "maps.npz", **_flatten(maps))
        def archived(rev: str, name: str) -> Path:
            code = tmp / name
            code.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
            return code

        before_code = archived(args.before, "before-code") if args.before else None
        after_code = archived(args.after, "after-code") if args.after else REPO
        runs: dict[str, list[dict]] = {"after": [], "before": []}
        digests: dict[str, list[dict]] = {"after": [], "before": []}
        for r in range(args.rounds):
            for label, code in (("before", before_code), ("after", after_code)):
                if label == "before" and code is None:
                    continue
                env = dict(os.environ, PROFILE_WRITERS_CODE=str(code))
                res = subprocess.run([sys.executable, __file__, "--inputs", str(tmp)], env=env, capture_output=True,
                                     text=True)
                if res.returncode:
                    raise SystemExit(f"{label} round {r} failed:\n{res.stderr[-3000:]}")
                job = json.loads(res.stdout.strip().splitlines()[-1])
                runs[label].append(job["seconds"])
                digests[label].append(job["digests"])
                counts = job["counts"]
                print(f"round {r} {label}: {job['seconds']['total without stand-in models']} s", flush=True)
        table = None
        if args.profile:
            profile = cProfile.Profile()
            (tmp / "prof").mkdir()
            profile.enable()
            one_job(files, maps, tmp / "prof", real)
            profile.disable()
            table = {"by_own_time": _profile_table(profile, "own_s", args.top),
                     "by_cumulative_time": _profile_table(profile, "cumulative_s", args.top)}
    median = {label: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]} for label, rs in runs.items()
              if rs}
    result = {"benchmark": "writers_profile", "study": {"seed": SEED, "shape": list(SHAPE), "images": 4},
              "maps": ("the shipped bundles' outputs at operating point " + args.operating_point
                       if args.maps == "models" else "stand-ins from the phantom's ground truth, all at 0.5"),
              "maps_per_image": 5, "rounds": args.rounds, "before": args.before or None,
              "after": args.after or "working tree", "runs": runs,
              "median_seconds": median, "counts": counts,
              "identical_outputs": _identical(digests),
              "digests_after": digests["after"][0], "cpu_cores": os.cpu_count(),
              "load_average_1min_after": round(os.getloadavg()[0], 2),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.before:
        result["after_over_before_total"] = round(statistics.median(
            a["total without stand-in models"] / b["total without stand-in models"]
            for a, b in zip(runs["after"], runs["before"])), 3)
    if table:
        result["cprofile"] = table
    out = args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    labels = [k for k in ("before", "after") if k in median]
    print(f"{'stage':<44}" + "".join(f"{k:>10}" for k in labels))
    for stage in median["after"]:
        print(f"{stage:<44}" + "".join(f"{median[k].get(stage, float('nan')):>10.3f}" for k in labels))
    if args.before:
        print(f"after / before (total, median of per-round ratios): {result['after_over_before_total']}")
    print(f"objects and previews byte-identical: {result['identical_outputs']}; {counts}")
    if table:
        lines = ["# Worker's work around the models, full-size four-view phantom study (cProfile, one round)", "",
                 f"Maps: {result['maps']}. Load average after the run: {result['load_average_1min_after']} "
                 "(2 cores, shared).", "",
                 "| stage | median s |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in median["after"].items()]
        for key, title in (("by_own_time", "own time"), ("by_cumulative_time", "cumulative time")):
            lines += ["", f"## First {args.top} functions by {title}", "", "| function | calls | own s | cumulative s |",
                      "|---|---:|---:|---:|"]
            lines += [f"| `{r['function']}` | {r['calls']} | {r['own_s']} | {r['cumulative_s']} |" for r in table[key]]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


def _identical(digests: dict[str, list[dict]]) -> dict:
    """Whether every round wrote the same bytes: within each code version, and before vs after
    (by file name; the names carry the fixed UIDs). Lists the files that differ."""
    out = {}
    for label, rounds in digests.items():
        if rounds:
            out[f"{label}: every round"] = all(d == rounds[0] for d in rounds)
    if digests["before"] and digests["after"]:
        a, b = digests["after"][0], digests["before"][0]
        out["before vs after"] = a == b
        out["differing files"] = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return out


def _flatten(maps: dict) -> dict[str, np.ndarray]:
    return {f"{uid}|{model}|{finding}": a for uid, per in maps.items() for model, fs in per.items()
            for finding, a in fs.items()}


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    maps: dict = {}
    for key, a in flat.items():
        uid, model, finding = key.split("|")
        maps.setdefault(uid, {}).setdefault(model, {})[finding] = a
    return maps


if __name__ == "__main__":
    sys.exit(main())
