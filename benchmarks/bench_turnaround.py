"""End-to-end turnaround of a full-size four-view study: modality -> node -> PACS.

dcmtk's ``storescp`` is the PACS and the results' destination; dcmtk's ``storescu`` is the
modality sending a full-size (3328 x 2560, 0.07 mm) four-view phantom study
(:func:`dicom_ai.data.phantom.generate_study`) to a real node (``dicom-ai serve`` with the
shipped bundles on the CPU) that this script starts on loopback ports. The figure is the
time from the end of ``storescu`` (the last C-STORE response and the release) to the last
``delivery_done`` event in the node's log (the PACS has answered the last result's C-STORE).

Per stage (from the node's JSON log: ``job_started``, the worker's ``job_timing``,
``job_finished``, ``delivery_done``): waiting (``study.grace_seconds`` + closing the study +
the worker's claim), decode (spool read + sandbox), prepare (intensities, masks), each model,
restrict, each writer (regions, SEG, GSPS, SR), outbox, previews, delivery; a worker that draws
the previews after the results are queued reports them as ``previews after the record`` (their
``previews_written`` event; they overlap the delivery and are not added to the job). Peak memory: the
highest VmHWM of every process of the node (node, worker, decode sandbox), sampled every 0.1 s.

Model compute floor: the models' FLOPs on the study's four images (counted on the torch
engine with FlopCounterMode, ``compute_floor.model_flops``) divided by the fp32 matrix-multiply
rate measured in the same run; ``ratio`` = measured model seconds / floor.

``--before REV`` also runs the node from ``git archive REV`` (its own code and bundles) on
the same study, and compares the results the PACS received from both (same SEG masks per
image and segment, same region counts), so one JSON holds before and after. Each pair runs
per ``--operating-points`` value: the bundles' default (``fp1``, chosen on mini-MIAS, switches
GLAM's and the microcalcification maps off, so only the U-Net's masses are sent) and
``phantom`` (every finding on at 0.5: the microcalcification cascade's marks are compared too).

Writes benchmarks/results/turnaround.json and prints a table. Run at normal priority; the
load average at each run is recorded (other jobs share this machine's two cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402

from node_harness import (PYTHON, Proc, free_port, start_storescp, store_status, storescu, wait_for,  # noqa: E402
                          wait_port, write_node_config)

SHAPE = (3328, 2560)
SEED = 1010  # a study with calcification clusters and masses in both breasts


# -- the study and the node ----------------------------------------------------------------------

def make_study(folder: Path, seed: int = SEED, shape: tuple[int, int] = SHAPE) -> list[Path]:
    """The four views as DICOM files (generated once into ``folder``)."""
    files = sorted(folder.glob("*.dcm"))
    if len(files) == 4:
        return files
    from dicom_ai.data.phantom import generate_study
    from dicom_ai.data.phantom_folder import write_study

    write_study(generate_study(seed, shape=shape, normal=False), folder)
    return sorted(folder.glob("*.dcm"))


class PeakMemory:
    """Peak RSS (VmHWM, KiB) of a process and all its descendants, by role, sampled in a thread."""

    def __init__(self, root_pid: int, interval: float = 0.1):
        self.root = root_pid
        self.interval = interval
        self.peak_kib: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _children(pid: int) -> list[int]:
        out = []
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
        return out

    def _role(self, pid: int) -> str:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "?"
        if pid == self.root:
            return "node"
        if "worker" in cmd:
            return "worker"
        return "decode sandbox" if "sandbox" in cmd or "multiprocessing" in cmd else cmd[:40]

    def sample(self) -> None:
        todo, seen = [self.root], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            todo += self._children(pid)
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        kib = int(line.split()[1])
                        role, old = self.peak_kib.get(pid, (self._role(pid), 0))
                        self.peak_kib[pid] = (role, max(old, kib))
            except OSError:
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self.sample()
        self._stop.set()
        self._thread.join(2)
        by_role: dict[str, float] = {}
        for role, kib in self.peak_kib.values():
            by_role[role] = max(by_role.get(role, 0.0), round(kib / 1024, 1))
        return by_role


def _log_events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _ts(event: dict) -> float:
    return datetime.strptime(event["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def run_node(label: str, code: Path, files: list[Path], work: Path, grace: float, operating_point: str = "",
             device: str = "cpu", timeout: float = 900, precision: str = "") -> dict:
    """Send ``files`` to a node run from source tree ``code`` (``pipeline.operating_point``,
    ``pipeline.device`` and, unless "", ``pipeline.precision`` as given); returns the run's figures."""
    work.mkdir(parents=True)
    pacs_dir = work / "pacs"
    pacs, pacs_port = start_storescp(pacs_dir, ae_title="PACS")
    port = free_port()
    storage = work / "storage"
    config = write_node_config(work / "node.toml", storage, port, [("PACS", pacs_port)],
                               pipeline={"factory": "", "device": device, "previews": True,
                                         "operating_point": operating_point,
                                         **({"precision": precision} if precision else {})},
                               study={"grace_seconds": grace, "idle_seconds": 60.0})
    env = dict(os.environ, PYTHONPATH=str(code))
    # cwd = the code tree, so `python -m dicom_ai` imports that tree's package (and its models/).
    node = Proc([PYTHON, "-m", "dicom_ai", "serve", "--config", str(config)], work / "node.stdout.log",
                env=env, cwd=code)
    try:
        wait_port(port, 120)
        memory = PeakMemory(node.pid)
        log = storage / "logs" / "node.log"
        wait_for(lambda: log.exists() and "worker_started" in log.read_text(), 300, f"{label}: the worker to load")
        load_before = os.getloadavg()
        sent = storescu(port, files, calling="PACS", timeout=300)
        sent_at = time.time()
        if sent.returncode != 0:
            raise RuntimeError(f"{label}: storescu failed: {sent.stderr[-2000:]}")

        def delivered():
            s = store_status(storage)
            if any(j["state"] == "failed" for j in s["jobs"]):
                raise RuntimeError(f"{label}: the job failed: {s['jobs']}")
            return s if s["deliveries"] and all(d["state"] == "done" for d in s["deliveries"]) else None

        status = wait_for(delivered, timeout, f"{label}: results delivered", interval=0.05)
        load_after = os.getloadavg()
        # A worker that draws the previews after the results are queued: wait for them too
        # (they are not part of the turnaround, but of the worker's peak memory).
        wait_for(lambda: any(k in log.read_text() for k in ('"previews_seconds"', '"previews_written"',
                                                             '"previews_failed"')), 120, f"{label}: the previews")
        peaks = memory.stop()
        events = _log_events(log)
    finally:
        node.stop(timeout=30)
        pacs.stop()
    first = {e["event"]: e for e in reversed(events)}  # the first of each kind (one job here)
    done = [e for e in events if e["event"] == "delivery_done"]
    last_delivery = max(_ts(e) for e in done)
    job = status["jobs"][0]
    model_seconds = {k: sum(v) for k, v in json.loads(job["model_seconds"] or "{}").items()}
    timing = first.get("job_timing", {})
    stages = {"waiting (grace + close + claim)": _ts(first["job_started"]) - sent_at}
    for key in ("decode", "prepare"):
        if f"{key}_seconds" in timing:
            stages[key] = timing[f"{key}_seconds"]
    for name, seconds in model_seconds.items():
        stages[f"model {name}"] = seconds
    for key in ("restrict", "regions", "seg", "gsps", "sc", "sr", "cad_sr", "outbox", "previews"):
        if f"{key}_seconds" in timing:
            stages[key] = timing[f"{key}_seconds"]
    job_seconds = _ts(first["job_finished"]) - _ts(first["job_started"])
    accounted = sum(v for k, v in stages.items() if not k.startswith("waiting"))
    stages["other in the job (pipeline load of images, record)"] = job_seconds - accounted
    stages["delivery (results recorded -> last acknowledged)"] = last_delivery - _ts(first["job_finished"])
    drawn = first.get("previews_written") or first.get("previews_failed")
    if drawn is not None:  # drawn after the results were queued, beside the delivery
        stages["previews after the record (beside the delivery)"] = drawn["seconds"]
    received = sorted(pacs_dir.glob("*.dcm"))
    return {
        "label": label,
        "code": str(code),
        "operating_point": operating_point or "each bundle's default",
        "models_switched_off": [e["model"] for e in events if e["event"] == "model_switched_off"],
        "turnaround_s": round(last_delivery - sent_at, 2),
        "job_s": round(job_seconds, 2),
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "model_seconds": {k: round(v, 3) for k, v in model_seconds.items()},
        "peak_rss_mb": peaks,
        "received": {m: sum(1 for p in received if pydicom.dcmread(p, stop_before_pixels=True).Modality == m)
                     for m in ("SEG", "SR", "PR", "OT")},
        "loadavg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "pacs_folder": str(pacs_dir),
        # The previews carry no result UID (the SEG/SR bytes do, fresh per job), so they can be
        # compared byte for byte between two nodes given the same study.
        "preview_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in sorted((storage / "previews").rglob("*.png"))},
    }


# -- are the marks the same? -----------------------------------------------------------------------

def _seg_masks(folder: Path) -> dict[tuple[str, str], np.ndarray]:
    """(source SOP Instance UID, segment label) -> boolean mask, from every SEG a PACS received."""
    import highdicom as hd

    out = {}
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        if ds.Modality != "SEG":
            continue
        seg = hd.seg.Segmentation.from_dataset(ds)
        source = str(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[source], segment_numbers=list(range(1, len(ds.SegmentSequence) + 1)),
            combine_segments=False, ignore_spatial_locations=True)
        for i, item in enumerate(ds.SegmentSequence):
            out[(source, str(item.SegmentLabel))] = pixels[0, :, :, i] > 0
    return out


def _region_count(mask: np.ndarray) -> int:
    import SimpleITK as sitk

    if not mask.any():
        return 0
    return int(sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)).max())


def compare_marks(before: Path, after: Path) -> dict:
    """Per (image, segment): differing pixels and region counts of the SEGs two PACS received."""
    a, b = _seg_masks(before), _seg_masks(after)
    rows = []
    for key in sorted(set(a) | set(b)):
        ma, mb = a.get(key), b.get(key)
        if ma is None or mb is None:
            rows.append({"image": key[0][-12:], "segment": key[1], "missing_in": "before" if ma is None else "after"})
            continue
        rows.append({"image": key[0][-12:], "segment": key[1], "pixels_before": int(ma.sum()),
                     "pixels_after": int(mb.sum()), "pixels_differing": int((ma != mb).sum()),
                     "regions_before": _region_count(ma), "regions_after": _region_count(mb)})
    same = all(r.get("pixels_differing", 1) == 0 for r in rows)
    same_regions = all(r.get("regions_before", -1) == r.get("regions_after", -2) for r in rows)
    return {"segments": rows, "identical_masks": same, "same_region_counts": same_regions}


# -- the compute floor -----------------------------------------------------------------------------

def model_study_flops(files: list[Path]) -> dict[str, float]:
    """FLOPs of each shipped model on the study's four images (torch engine)."""
    import torch

    from compute_floor import model_flops
    from dicom_ai.imaging import read_mammogram
    from dicom_ai.networks.bundle import load_bundle
    from dicom_ai.networks.microcalc import MicrocalcModel
    from dicom_ai.networks.pipeline import DEFAULT_MODELS
    from dicom_ai.networks.registry import model_from_bundle

    mammograms = [read_mammogram(pydicom.dcmread(f)) for f in files]
    models = [MicrocalcModel.from_bundle(load_bundle(n), "cpu", engine="torch") if n == "microcalc"
              else model_from_bundle(load_bundle(n), "cpu") for n in DEFAULT_MODELS]
    with torch.inference_mode():
        return model_flops(models, mammograms)


def compute_floor(flops: dict[str, float], rates: tuple[float, float], model_seconds: dict[str, float]) -> dict:
    """The models that ran (``model_seconds``): their floor (FLOPs / fp32 matmul rate) and ratios."""
    import torch

    rate, rate_bf16 = rates
    per_model = {}
    for name, measured in model_seconds.items():
        floor = flops[name] / rate
        per_model[name] = {"gflop": round(flops[name] / 1e9, 1), "floor_s": round(floor, 3),
                           "measured_s": measured, "ratio": round(measured / floor, 2)}
    total_floor = sum(flops[n] for n in model_seconds) / rate
    total_measured = sum(model_seconds.values())
    return {"matmul_gflops_fp32": round(rate / 1e9, 1), "matmul_gflops_bf16": round(rate_bf16 / 1e9, 1),
            "threads": torch.get_num_threads(), "per_model": per_model,
            "models_floor_s": round(total_floor, 3), "models_measured_s": round(total_measured, 3),
            "ratio": round(total_measured / total_floor, 2) if total_floor else None,
            "note": "FLOPs counted by torch.utils.flop_counter.FlopCounterMode on the torch engine "
                    "(convolutions and matrix products, 2 FLOPs per multiply-add); floor = FLOPs / fp32 "
                    "matmul rate of this run"}


def _archive(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def with_microcalc_bundle(code: Path, bundle: Path, into: Path | None = None) -> Path:
    """``code`` (a source tree) with ``models/microcalc`` replaced by ``bundle``; copied to
    ``into`` first when given (the working tree itself is never changed).

    A bundle without operating points gets one named ``phantom`` at its own thresholds (and as
    its default), so ``pipeline.operating_point = "phantom"`` runs it as the shipped bundles'
    ``phantom`` point does: every finding on at the bundle's threshold. Only the copy's
    manifest is changed, not the weights.
    """
    import shutil

    if into is not None:
        for part in ("dicom_ai", "models"):
            shutil.copytree(code / part, into / part, ignore=shutil.ignore_patterns("__pycache__"))
        code = into
    target = code / "models" / "microcalc"
    shutil.rmtree(target)
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    if not manifest.get("operating_points"):
        manifest["operating_points"] = {"default": "phantom", "findings": {
            finding: [{"name": "phantom", "threshold": float(t), "target": "the bundle's own threshold (bench)"}]
            for finding, t in manifest["thresholds"].items()}}
        (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="", help="git revision to run as 'before' on the same study")
    parser.add_argument("--grace", type=float, default=0.0,
                        help="study.grace_seconds of the node (default 0: the job starts when the fourth view is in)")
    parser.add_argument("--study", type=Path, default=REPO / "build" / "turnaround-study",
                        help="where the phantom study is generated (once)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "turnaround.json")
    parser.add_argument("--operating-points", default=",phantom",
                        help="comma-separated pipeline.operating_point values, one pair of runs each "
                             "('' = each bundle's default, fp1, which switches GLAM's and the microcalcification "
                             "maps off; 'phantom' = every finding on at 0.5)")
    parser.add_argument("--device", default="cpu", help="pipeline.device of the node (cpu, auto, cuda:N)")
    parser.add_argument("--no-floor", action="store_true", help="skip the FLOP count (about a minute)")
    parser.add_argument("--precision", default="",
                        help="pipeline.precision of the 'after' node only (fp32 or bf16; default: the config's, fp32)")
    parser.add_argument("--microcalc-bundle", type=Path, default=None,
                        help="run both trees with this microcalc bundle in models/microcalc (copies; e.g. the "
                             "unshipped 0.2.0 bundle); 'phantom' is added as its operating point if it has none")
    parser.add_argument("--after-microcalc-bundle", type=Path, default=None,
                        help="run the 'after' tree only with this microcalc bundle in models/microcalc (a copy): "
                             "today's bundle (--before REV's own) beside a candidate in the same run")
    args = parser.parse_args(argv)
    if args.microcalc_bundle is not None and args.after_microcalc_bundle is not None:
        parser.error("give --microcalc-bundle (both trees) or --after-microcalc-bundle (the after tree), not both")

    import torch

    from compute_floor import matmul_rate

    files = make_study(args.study)
    runs, marks, speed_up = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-turnaround-") as tmp:
        tmp = Path(tmp)
        code = _archive(args.before, tmp / "before-code") if args.before else None
        after_code = REPO
        if args.microcalc_bundle is not None:
            if code is not None:
                with_microcalc_bundle(code, args.microcalc_bundle)
            after_code = with_microcalc_bundle(REPO, args.microcalc_bundle, tmp / "after-code")
        elif args.after_microcalc_bundle is not None:
            after_code = with_microcalc_bundle(REPO, args.after_microcalc_bundle, tmp / "after-code")
        for op in args.operating_points.split(","):
            key = op or "default"
            if code is not None:
                runs[f"{key}/before"] = run_node(f"before ({args.before}), operating point {key}", code, files,
                                                 tmp / f"{key}-before", args.grace, op, args.device)
            runs[f"{key}/after"] = run_node(f"after (this tree{', ' + args.precision if args.precision else ''}), "
                                            f"operating point {key}", after_code, files,
                                            tmp / f"{key}-after", args.grace, op, args.device, precision=args.precision)
            if code is not None:
                before, after = runs[f"{key}/before"], runs[f"{key}/after"]
                marks[key] = compare_marks(Path(before["pacs_folder"]), Path(after["pacs_folder"]))
                marks[key]["identical_previews"] = (bool(before["preview_sha256"])
                                                    and before["preview_sha256"] == after["preview_sha256"])
                speed_up[key] = round(before["turnaround_s"] / after["turnaround_s"], 2)
    floor = None
    if not args.no_floor:
        flops = model_study_flops(files)
        rates = (matmul_rate("cpu", torch.float32), matmul_rate("cpu", torch.bfloat16))
        floor = {key: compute_floor(flops, rates, run["model_seconds"]) for key, run in runs.items()}

    result = {
        "benchmark": "turnaround",
        "study": {"shape": list(SHAPE), "views": 4, "seed": SEED, "spacing_mm": 0.07},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "device": args.device},
        "precision_after": args.precision or "config default (fp32)",
        "grace_seconds": args.grace,
        "microcalc_bundle": str(args.microcalc_bundle) if args.microcalc_bundle else
        f"before: its own models/microcalc; after: {args.after_microcalc_bundle}" if args.after_microcalc_bundle else
        "models/microcalc (each tree's own)",
        "runs": runs,
        "speed_up_before_over_after": speed_up,
        "marks_before_vs_after": marks,
        "compute_floor": floor,
        "targets": {"turnaround_s": 15.0, "peak_rss_mb_per_process": 1024},
        "note": "2-core machine shared with other jobs (see loadavg_1min per run); turnaround = end of storescu "
                "-> last delivery_done in the node log",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key, run in runs.items():
        print(f"\n{run['label']}: turnaround {run['turnaround_s']:.1f} s (job {run['job_s']:.1f} s), "
              f"load {run['loadavg_1min']}, peak RSS MB {run['peak_rss_mb']}")
        for stage, seconds in run["stages_s"].items():
            print(f"  {stage:<52} {seconds:8.2f} s")
    for key, m in marks.items():
        segments = sorted({r["segment"] for r in m["segments"]})
        print(f"\n{key}: before/after turnaround {speed_up[key]} x; identical SEG masks {m['identical_masks']}, "
              f"same region counts {m['same_region_counts']}, identical previews {m['identical_previews']} "
              f"({len(m['segments'])} segments: {', '.join(segments)})")
    for key, f in (floor or {}).items():
        print(f"\n{key} models: {f['models_measured_s']:.1f} s measured, floor {f['models_floor_s']:.2f} s "
              f"(fp32 matmul {f['matmul_gflops_fp32']} GFLOP/s) -> {f['ratio']} x")
        for name, row in f["per_model"].items():
            print(f"  {name:<10} {row['gflop']:8.1f} GFLOP  floor {row['floor_s']:.3f} s  measured {row['measured_s']} s"
                  f"  ratio {row['ratio']}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
