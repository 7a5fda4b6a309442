"""Scale-out: study throughput with 1, 2 and 4 Celery workers, and the distributed path's per-job overhead.

Everything runs on this machine on loopback, started here: a throw-away PostgreSQL cluster
(the job store, with fsync on like the embedded SQLite store's synchronous=FULL), redis-server (the broker), dcmtk's storescp (the PACS), the receiving node
(``dicom-ai serve``) and N ``dicom-ai worker`` processes (``--concurrency 1`` each, as one per
GPU). The pipeline is the tests' stand-in with a fixed cost: it sleeps ``--infer-seconds`` per
study (a quarter per image) and then writes the real SEG/SR/GSPS objects of a small study, so
what scales is the inference slot, not this machine's two CPU cores (a sleep stands in for a
GPU that does the work while the CPU waits). The encoding and delivery of the results is real
CPU work and shares the two cores.

Each run sends ``--studies`` four-view studies in one storescu association, so every study
completes within about a second, and measures, from the job store:

* throughput = studies / (last job done - first job created), in studies per second;
* per-job time = 1 / throughput with one worker; its overhead = per-job time - infer seconds
  (what the path adds: announcing, claiming, reading the spool, writing and recording results).

The embedded node (SQLite, its own worker child) runs the same studies as the reference for the
per-job overhead. Scaling efficiency of N workers = throughput(N) / (N x throughput(1)).

Writes benchmarks/results/scaleout.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from node_harness import (PYTHON, Postgres, Proc, Redis, free_port, node_env, start_node,  # noqa: E402
                          start_storescp, store_status, storescu, wait_delivered, wait_for, write_node_config,
                          write_study)

OUT = REPO / "benchmarks" / "results" / "scaleout.json"


def _run(tmp: Path, name: str, studies: int, infer_seconds: float, workers: int, pg: Postgres | None,
         redis: Redis | None) -> dict:
    """One run: a fresh node (and ``workers`` Celery workers if ``pg``), ``studies`` studies; its figures."""
    folder = tmp / name
    folder.mkdir()
    pacs, pacs_port = start_storescp(folder / "pacs", "PACS")
    port = free_port()
    sections = {"study": {"grace_seconds": 0.5, "idle_seconds": 30.0}}
    url = None
    if pg is not None:
        url = pg.new_database()
        sections["jobstore"] = {"url": url}
        sections["workers"] = {"broker_url": redis.url, "lease_seconds": 30.0, "requeue_seconds": 60.0}
    cfg = write_node_config(folder / "node.toml", folder / "storage", port, [("PACS", pacs_port)], **sections)
    env = node_env(DICOM_AI_TEST_INFER_SECONDS=str(infer_seconds))
    node = start_node(cfg, port, folder / "node.log", env=env)
    procs: list[Proc] = []
    try:
        for i in range(workers if pg is not None else 0):
            log = folder / f"worker-{i}.log"
            procs.append(Proc([PYTHON, "-m", "dicom_ai", "worker", "--config", str(cfg), "--name", f"w{i}"], log,
                              env=env, cwd=REPO))
        for i, proc in enumerate(procs):
            log = folder / f"worker-{i}.log"
            wait_for(lambda: '"worker_started"' in log.read_text() or not proc.alive(), 180, f"worker {i}")
            assert proc.alive(), log.read_text()[-2000:]
        if pg is None:  # the embedded worker child has loaded its pipeline when it logs worker_started
            wait_for(lambda: '"worker_started"' in (folder / "storage" / "logs" / "node.log").read_text(), 180,
                     "the embedded worker")
        files = [f for i in range(studies) for f in write_study(folder / "studies" / str(i), seed=i)]
        sent_at = time.time()
        sent = storescu(port, files, timeout=300)
        assert sent.returncode == 0 and sent.stderr.count("(Success)") == len(files), sent.stderr[-2000:]
        status = wait_delivered(folder / "storage", studies, timeout=studies * infer_seconds * 3 + 120, url=url)
        delivered_at = time.time()
        jobs = [j for j in status["jobs"] if j["state"] == "done"]
        assert len(jobs) == studies, status["jobs"]
        span = max(j["updated"] for j in jobs) - min(j["created"] for j in jobs)
        per_worker = {}
        for j in store_status(folder / "storage", url)["jobs"]:
            who = (j.get("worker") or "?").split(" ")[0]
            per_worker[who] = per_worker.get(who, 0) + 1
        return {"name": name, "workers": workers, "studies": studies, "span_seconds": round(span, 3),
                "throughput_studies_per_s": round(studies / span, 4),
                "per_job_seconds": round(span / studies, 4),
                "send_to_delivered_seconds": round(delivered_at - sent_at, 3),
                "jobs_per_worker": per_worker}
    finally:
        for proc in procs:
            proc.stop(timeout=30)
        node.stop()
        pacs.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=16, help="studies per run (default 16)")
    parser.add_argument("--infer-seconds", type=float, default=3.0, help="fixed pipeline cost per study")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to run (default 1,2,4)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    pg = Postgres(durable=True)  # fsync on, as the embedded SQLite store (synchronous=FULL)
    runs = []
    with tempfile.TemporaryDirectory(prefix="dicom-ai-scaleout-") as tmp:
        tmp = Path(tmp)
        redis = Redis(tmp / "redis")
        try:
            runs.append(_run(tmp, "embedded", args.studies, args.infer_seconds, 1, None, None))
            for n in counts:
                runs.append(_run(tmp, f"celery-{n}", args.studies, args.infer_seconds, n, pg, redis))
        finally:
            redis.stop()
            pg.close()
    embedded = runs[0]
    one = next(r for r in runs if r["name"] == "celery-1")
    for r in runs[1:]:
        r["speedup_vs_1_worker"] = round(r["throughput_studies_per_s"] / one["throughput_studies_per_s"], 3)
        r["scaling_efficiency"] = round(r["speedup_vs_1_worker"] / r["workers"], 3)
    overhead_embedded = embedded["per_job_seconds"] - args.infer_seconds
    overhead_distributed = one["per_job_seconds"] - args.infer_seconds
    result = {
        "benchmark": "scaleout",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "note": ("stand-in pipeline: a fixed sleep of infer_seconds per study (the GPU's share) plus the real "
                 "encoding of the results; this machine has only 2 CPU cores, so the sleep is what lets 4 workers "
                 "scale here. Every process (PostgreSQL, Redis, node, workers, storescp) shares those 2 cores."),
        "infer_seconds": args.infer_seconds, "studies": args.studies, "runs": runs,
        "per_job_overhead_seconds": {"embedded": round(overhead_embedded, 4),
                                     "distributed": round(overhead_distributed, 4),
                                     "distributed_minus_embedded": round(overhead_distributed - overhead_embedded, 4)},
        "ratios": {
            "per_job_time_distributed_over_embedded": round(one["per_job_seconds"] / embedded["per_job_seconds"], 4),
            **{f"efficiency_{r['workers']}_workers": r["scaling_efficiency"] for r in runs[1:]},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'run':<10} {'workers':>7} {'studies/s':>10} {'s/job':>7} {'speedup':>8} {'efficiency':>10}  jobs per worker")
    for r in runs:
        print(f"{r['name']:<10} {r['workers']:>7} {r['throughput_studies_per_s']:>10.3f} {r['per_job_seconds']:>7.2f} "
              f"{r.get('speedup_vs_1_worker', float('nan')):>8.2f} {r.get('scaling_efficiency', float('nan')):>10.2f}  "
              f"{r['jobs_per_worker']}")
    o = result["per_job_overhead_seconds"]
    print(f"per-job overhead over the {args.infer_seconds:.1f} s pipeline: embedded {o['embedded']:.3f} s, "
          f"distributed {o['distributed']:.3f} s (per-job time ratio distributed/embedded "
          f"{result['ratios']['per_job_time_distributed_over_embedded']:.3f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
