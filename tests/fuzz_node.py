"""Fuzz the running node with mutated C-STOREs and report what it did with each.

A real node (``dicom-ai serve``, the stand-in pipeline of the node tests, which decodes every
image) receives the cases of :mod:`mutations` from one sender, and dcmtk's ``storescp`` is
the PACS that gets the results. Afterwards the run is judged on what a hospital would care
about:

* ``crashes``: the node process died (must be 0);
* ``hangs``: a C-STORE got no answer within the sender's timeout (must be 0);
* ``worker_restarts``: the inference worker exited and was restarted (must be 0);
* ``accepted_unprocessed``: an image answered Success that neither appears in a result object
  nor is named, with a reason, as left out in its job's note (must be 0); the images left out
  with a reason are counted by reason (``accepted_skipped_reasons``);
* ``jobs_failed``: jobs that ended failed (a study none of whose images can be decoded ends
  done with its note, not failed after three identical attempts);
* ``patient_data_leaks``: a patient value of the cases found in any log under ``<storage>/logs`` (node,
  workers, audit) or any console;
* the turnaround of a valid four-view study sent before and after the cases (the second must
  be within its normal time).

``python tests/fuzz_node.py --cases 1200`` (``make fuzz``) runs the full set and writes
``benchmarks/results/fuzz.json``; ``tests/test_fuzz.py`` runs a representative sample.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pynetdicom import AE, _config
from pynetdicom.status import code_to_category

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's dicom_ai, as the node runs it

from dicom_ai.node.jobstore import left_out_images  # noqa: E402
from mutations import Case, cases  # noqa: E402
from node_harness import (ACCESSION, PATIENT_ID, PATIENT_NAME, PYTHON, REPO, Postgres, Proc, Redis,  # noqa: E402
                          free_port, node_env, start_node, start_storescp, store_status, write_node_config,
                          write_study)

MG = "1.2.840.10008.5.1.4.1.1.1.2"
CT = "1.2.840.10008.5.1.4.1.1.2"
#: Values of the cases that must never appear in the node's output.
SECRETS = (PATIENT_NAME, PATIENT_ID, ACCESSION, "19470323XX")
_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.70",
             "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"]


class Sender:
    """One calling AE that keeps an association open and re-opens it when the node drops it."""

    def __init__(self, port: int, timeout: float):
        _config.STORE_SEND_CHUNKED_DATASET = True  # send each file's data set bytes unchanged
        self.port = port
        self.ae = AE(ae_title="PACS")
        self.ae.acse_timeout = self.ae.network_timeout = self.ae.dimse_timeout = timeout
        # One context per transfer syntax: each file is sent in its own, unchanged.
        for ts in _SYNTAXES:
            self.ae.add_requested_context(MG, ts)
        self.ae.add_requested_context(CT, _SYNTAXES[:2])
        self.assoc = None

    def store(self, path: Path) -> tuple[str, int | None, float]:
        """Send one file; returns (outcome, status code or None, seconds)."""
        started = time.monotonic()
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="AINODE")
            if not self.assoc.is_established:
                self.assoc = None
                return "association-refused", None, time.monotonic() - started
        try:
            status = self.assoc.send_c_store(path)
        except (ValueError, AttributeError) as exc:  # the SCU itself cannot send it (no context, no UID)
            return f"not-sendable:{type(exc).__name__}", None, time.monotonic() - started
        seconds = time.monotonic() - started
        if "Status" not in status:
            self.release()
            return "no-response", None, seconds
        code = int(status.Status)
        return code_to_category(code).lower(), code, seconds

    def release(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None


def _referenced_uids(paths: list[str]) -> set[str]:
    """Every Referenced SOP Instance UID in the given result files."""
    found: set[str] = set()

    def walk(ds):
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.keyword == "ReferencedSOPInstanceUID":
                found.add(str(elem.value))
    for p in paths:
        walk(pydicom.dcmread(p, stop_before_pixels=True))
    return found


def _settled(status) -> dict | None:
    s = status()
    busy = [j for j in s["jobs"] if j["state"] in ("queued", "running")]
    pending = [d for d in s["deliveries"] if d["state"] == "pending"]
    open_studies = [x for x in s["studies"] if x["state"] == "open"]
    return None if busy or pending or open_studies else s


def _wait(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return None


def _turnaround(sender: Sender, status, folder: Path, timeout: float = 120) -> float | None:
    """Seconds from the last C-STORE response of a valid four-view study to its results being delivered."""
    files = write_study(folder)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    for f in files:
        outcome, _, _ = sender.store(f)
        if outcome != "success":
            return None
    sender.release()
    done_at = time.monotonic()

    def delivered():
        s = status()
        study = [x for x in s["studies"] if x["study_uid"] == study_uid]
        if not study:
            return False
        jobs = {j["id"] for j in s["jobs"] if j["study_id"] == study[0]["id"] and j["state"] == "done"}
        ds = [d for d in s["deliveries"] if d["job_id"] in jobs]
        return bool(ds) and all(d["state"] == "done" for d in ds)
    return round(time.monotonic() - done_at, 2) if _wait(delivered, timeout) else None


def _peak_rss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return round(int(m.group(1)) / 1024, 1) if m else None


def _worker_pid(storage: Path) -> int | None:
    pid = None
    for line in (storage / "logs" / "node.log").read_text(errors="replace").splitlines():
        if '"worker_spawned"' in line:
            pid = json.loads(line).get("worker_pid")
    return pid


def run_fuzz(workdir: Path, count: int, seed: int = 0, store_timeout: float = 40.0,
             settle_timeout: float = 600.0, progress: bool = False, families: list[str] | None = None,
             distributed: bool = False) -> dict:
    """Send ``count`` mutated data sets (and two valid studies) to a fresh node; returns the report.

    ``distributed``: the node with a PostgreSQL job store, a Redis broker and two ``dicom-ai
    worker`` processes on the same storage, instead of its own worker and SQLite.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    pacs_dir, storage = workdir / "pacs", workdir / "storage"
    pacs, pacs_port = start_storescp(pacs_dir)
    port = free_port()
    sections: dict = {"study": {"grace_seconds": 0.5, "idle_seconds": 2.0}}
    pg = redis = url = None
    workers: list[Proc] = []
    if distributed:
        pg = Postgres()
        url = pg.new_database()
        redis = Redis(workdir / "redis")
        sections.update(jobstore={"url": url, "connect_timeout_seconds": 2.0},
                        workers={"broker_url": redis.url, "lease_seconds": 10.0, "requeue_seconds": 5.0,
                                 "visibility_timeout_seconds": 120.0})
    config = write_node_config(workdir / "node.toml", storage, port, [("PACS", pacs_port)], **sections)
    node = start_node(config, port, workdir / "node.stdout")
    for name in ("w1", "w2") if distributed else ():
        workers.append(Proc([PYTHON, "-m", "dicom_ai", "worker", "--config", str(config), "--name", name],
                            workdir / f"worker-{name}.log", env=node_env(), cwd=REPO))

    def status() -> dict:
        return store_status(storage, url)

    sender = Sender(port, store_timeout)
    report: dict = {"cases": 0, "seed": seed,
                    "site": "distributed: PostgreSQL, Redis, 2 dicom-ai workers" if distributed else "embedded"}
    try:
        report["turnaround_before_s"] = _turnaround(sender, status, workdir / "valid-before")
        outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        statuses: collections.Counter = collections.Counter()
        accepted: dict[str, Case] = {}
        hangs, slowest = [], 0.0
        tmp = workdir / "case.dcm"
        started = time.monotonic()
        for i, case in enumerate(cases(count, seed, families=families)):
            tmp.write_bytes(case.data)
            try:
                sop_uid = str(pydicom.dcmread(tmp, stop_before_pixels=True, force=True).file_meta
                              .MediaStorageSOPInstanceUID)
            except Exception:
                sop_uid = ""
            outcome, code, seconds = sender.store(tmp)
            slowest = max(slowest, seconds)
            outcomes[case.family][outcome] += 1
            if code is not None:
                statuses[f"0x{code:04X}"] += 1
            if outcome == "no-response" and seconds >= store_timeout - 1:
                hangs.append(f"{case.family}/{case.name}")
            if outcome in ("success", "warning"):
                accepted[sop_uid] = case
            if case.family != "valid" and os.environ.get("DICOM_AI_FUZZ_TRACE"):
                print(f"{case.family}/{case.name} {sop_uid} {outcome} {code}", file=sys.stderr)
            if case.valid and outcome != "success":
                outcomes["valid-refused"][f"{case.name}:{outcome}:{code}"] += 1
            if not node.alive():
                break
            report["cases"] = i + 1
            if progress and (i + 1) % 100 == 0:
                print(f"  {i + 1} cases sent, {time.monotonic() - started:.0f} s", file=sys.stderr)
        sender.release()
        report["send_seconds"] = round(time.monotonic() - started, 1)
        report["slowest_store_s"] = round(slowest, 2)
        settled = _wait(lambda: _settled(status), settle_timeout)
        report["settled"] = settled is not None
        s = settled or status()
        report["turnaround_after_s"] = _turnaround(sender, status, workdir / "valid-after")
        report["crashes"] = 0 if node.alive() else 1
        report["hangs"] = len(hangs)
        report["hang_cases"] = hangs[:20]
        log = (storage / "logs" / "node.log").read_text(errors="replace")
        # Embedded: the node restarts its worker (and logs it); distributed: a worker that died.
        report["worker_restarts"] = log.count('"event": "worker_exited"') + sum(not w.alive() for w in workers)
        report["outcomes"] = {family: dict(c) for family, c in sorted(outcomes.items())}
        report["statuses"] = dict(statuses)
        report.update(_judge_accepted(s, accepted))
        # Every log the node and its workers wrote (node.log, a distributed worker's own log,
        # audit.log) and every console.
        texts = [p.read_text(errors="replace") for p in [*sorted((storage / "logs").glob("*.log")),
                                                          workdir / "node.stdout", *(w.log for w in workers)]]
        report["logs_checked_for_patient_data"] = len(texts)
        report["patient_data_leaks"] = sum(text.count(secret) for secret in SECRETS for text in texts)
        report["node_peak_rss_mb"] = _peak_rss_mb(node.pid)
        worker = None if distributed else _worker_pid(storage)
        report["worker_peak_rss_mb"] = _peak_rss_mb(worker) if worker else None
    finally:
        sender.release()
        for w in workers:
            w.stop(timeout=20)
        node.stop()
        pacs.stop()
        if redis is not None:
            redis.stop()
        if pg is not None:
            pg.close()
    return report


def _judge_accepted(s: dict, accepted: dict[str, Case]) -> dict:
    """Every accepted image is in a result object or named, with a reason, as left out in its
    job's note (:func:`~dicom_ai.node.jobstore.left_out_images`); the reasons are counted."""
    instances = {i["sop_instance_uid"]: i for i in s["instances"]}
    outbox: dict[int, list[str]] = collections.defaultdict(list)
    for o in s["outbox"]:
        outbox[o["job_id"]].append(o["path"])
    unrecorded, unprocessed, skipped, reasons = [], [], collections.Counter(), collections.Counter()
    referenced_by_job: dict[int, set[str]] = {}
    for uid, case in accepted.items():
        inst = instances.get(uid)
        if inst is None:
            unrecorded.append(f"{case.family}/{case.name}")
            continue
        jobs = [j for j in s["jobs"] if j["study_id"] == inst["study_id"] and uid in json.loads(j["instance_uids"])
                and j["state"] in ("done", "superseded")]
        if not jobs:
            unprocessed.append(f"{case.family}/{case.name}: no finished job")
            continue
        job = max(jobs, key=lambda j: j["id"])
        if job["id"] not in referenced_by_job:
            referenced_by_job[job["id"]] = _referenced_uids(outbox[job["id"]])
        if uid in referenced_by_job[job["id"]]:
            continue
        why = [reason for named, reason in left_out_images(job["error"]) if named == uid]
        if why:  # left out, and the note says why
            skipped[case.family] += 1
            reasons[why[0]] += 1
            continue
        unprocessed.append(f"{case.family}/{case.name}: not in results, not named with a reason in the note")
    return {"accepted": len(accepted), "accepted_unrecorded": len(unrecorded),
            "accepted_unprocessed": len(unprocessed), "accepted_skipped_with_note": dict(skipped),
            "accepted_skipped_reasons": dict(reasons.most_common()),
            "unprocessed_cases": (unrecorded + unprocessed)[:20],
            "jobs_failed": sum(1 for j in s["jobs"] if j["state"] == "failed"),
            "deliveries_failed": sum(1 for d in s["deliveries"] if d["state"] == "failed")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fuzz.json")
    parser.add_argument("--workdir", type=Path, help="keep the node's storage and logs here (default: a temporary folder)")
    parser.add_argument("--families", help="comma-separated mutation families (default: all)")
    parser.add_argument("--distributed", action="store_true",
                        help="PostgreSQL job store, Redis and two dicom-ai workers (out: fuzz_distributed.json)")
    args = parser.parse_args(argv)
    families = args.families.split(",") if args.families else None
    if args.distributed and args.out == parser.get_default("out"):
        args.out = args.out.with_name("fuzz_distributed.json")
    if args.workdir:
        report = run_fuzz(args.workdir, args.cases, args.seed, progress=True, families=families,
                          distributed=args.distributed)
    else:
        with tempfile.TemporaryDirectory(prefix="dicom-ai-fuzz-") as tmp:
            report = run_fuzz(Path(tmp), args.cases, args.seed, progress=True, families=families,
                              distributed=args.distributed)
    report["machine"] = f"{os.cpu_count()} cores"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'cases':28s} {report['cases']}")
    for key in ("crashes", "hangs", "worker_restarts", "accepted", "accepted_unrecorded", "accepted_unprocessed",
                "jobs_failed", "patient_data_leaks", "turnaround_before_s", "turnaround_after_s",
                "node_peak_rss_mb", "worker_peak_rss_mb", "send_seconds"):
        print(f"{key:28s} {report.get(key)}")
    print("accepted images left out, by reason: " + (", ".join(f"{k} {v}" for k, v in
                                                         report["accepted_skipped_reasons"].items()) or "none"))
    print("outcomes per family:")
    for family, c in report["outcomes"].items():
        print(f"  {family:20s} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    bad = any(report[k] for k in ("crashes", "hangs", "worker_restarts", "accepted_unrecorded",
                                   "accepted_unprocessed", "patient_data_leaks"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
