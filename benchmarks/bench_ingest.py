"""C-STORE receive throughput of the node vs dcmtk's storescp, four full-size MG images.

Both receivers run on loopback in the same run; dcmtk's ``storescu`` sends the same four
uncompressed 3328 x 2560 x 16-bit images (17 MB each) over one association to each of them
in turn (A B A B ...), with fresh SOP Instance UIDs every round so the node really stores
every image (it answers a known UID without storing it again). Wall time is measured around
storescu. ``ratio`` = node throughput / storescp throughput, median over the paired rounds.

Settings: both receivers offer the same maximum PDU (128 KiB, dcmtk's own cap for sending);
storescp writes files without fsync, while the node fsyncs the file and its directory and
commits a job-store row before answering Success: the comparison is against a receiver
doing less durable work. Peak memory is the node process's VmHWM (the receiving process;
the worker process is idle during the benchmark).

Writes benchmarks/results/ingest.json and prints a table.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from pydicom.uid import generate_uid  # noqa: E402

from node_harness import (Proc, free_port, make_mg, node_env, start_node, storescu,  # noqa: E402
                          wait_port, write_node_config)

ROUNDS = 7
SHAPE = (3328, 2560)
PDU = 131072


def _rss_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_rounds(work: Path, rounds: int, targets: tuple[str, ...],
                 shape: tuple[int, int] = SHAPE) -> list[dict[str, list[Path]]]:
    """Four-view studies to send: per round, per target a fresh study (new Study and SOP Instance
    UIDs, so a receiver really stores every image) under ``work/send-<round>-<target>/``.

    Returns the files per round and target.
    """
    views = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
    templates = [make_mg(lat, view, generate_uid(), generate_uid(), i + 1, shape=shape, seed=i)
                 for i, (lat, view) in enumerate(views)]
    out = []
    for r in range(rounds):
        paths = {}
        for target in targets:
            folder = work / f"send-{r}-{target}"
            folder.mkdir()
            study = generate_uid()
            files = []
            for ds in templates:
                ds.StudyInstanceUID = study
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                p = folder / f"{ds.SOPInstanceUID}.dcm"
                ds.save_as(p, enforce_file_format=True)
                files.append(p)
            paths[target] = files
        out.append(paths)
    return out


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=REPO / "benchmarks"))
    procs: list[Proc] = []
    try:
        rounds = write_rounds(work, ROUNDS, ("storescp", "node"))
        nbytes = sum(p.stat().st_size for p in rounds[0]["node"])

        scp_port = free_port()
        (work / "storescp-in").mkdir()
        storescp = Proc(["storescp", "--aetitle", "STORESCP", "--output-directory", str(work / "storescp-in"),
                         "--max-pdu", str(PDU), str(scp_port)], work / "storescp.log")
        procs.append(storescp)
        wait_port(scp_port)
        node_port = free_port()
        cfg = write_node_config(work / "node.toml", work / "node-storage", node_port, [("BENCH", 1)],
                                node={"max_pdu_size": PDU},
                                study={"grace_seconds": 3600.0, "idle_seconds": 7200.0})
        node = start_node(cfg, node_port, work / "node.log", env=node_env())
        procs.append(node)
        baseline_rss = _rss_kib(node.pid, "VmRSS")

        times = {"storescp": [], "node": []}
        cpu = {"storescp": 0.0, "node": 0.0}
        pids = {"storescp": storescp.pid, "node": node.pid}
        load_before = os.getloadavg()[0]
        for r, paths in enumerate(rounds):
            for target, port, called in (("storescp", scp_port, "STORESCP"), ("node", node_port, "AINODE")):
                c0 = _cpu_seconds(pids[target])
                t0 = time.perf_counter()
                res = storescu(port, paths[target], calling="BENCH", called=called)
                dt = time.perf_counter() - t0
                cpu[target] += _cpu_seconds(pids[target]) - c0
                ok = res.returncode == 0 and res.stderr.count("Received Store Response (Success)") == 4
                if not ok:
                    raise SystemExit(f"{target} round {r}: storescu failed:\n{res.stderr[-2000:]}")
                times[target].append(dt)
        peak_rss = _rss_kib(node.pid, "VmHWM")
        storescp_peak_rss = _rss_kib(storescp.pid, "VmHWM")
        stored = len(list((work / "node-storage" / "spool").rglob("*.dcm")))
        if stored != 4 * ROUNDS:
            raise SystemExit(f"node stored {stored} files, expected {4 * ROUNDS}")

        ratios = [s / n for s, n in zip(times["storescp"], times["node"])]
        # The node logs how long each C-STORE took from "data set received" to "answer Success"
        # (checks, fsync, rename, directory fsync, job-store commit): the durability share.
        handler = [json.loads(line)["seconds"] for line in (work / "node.log").read_text().splitlines()
                   if '"instance_received"' in line]
        mb = nbytes / 1e6
        result = {
            "benchmark": "ingest",
            "what": "C-STORE receive of 4 uncompressed full-size MG images over one association (storescu sender)",
            "image_shape": list(SHAPE), "bytes_per_study": nbytes, "rounds": ROUNDS, "max_pdu": PDU,
            "seconds": {k: [round(v, 4) for v in vs] for k, vs in times.items()},
            "median_seconds": {k: round(statistics.median(vs), 4) for k, vs in times.items()},
            "median_mb_per_s": {k: round(mb / statistics.median(vs), 1) for k, vs in times.items()},
            "ratio_node_over_storescp": round(statistics.median(ratios), 3),
            "ratios_per_round": [round(x, 3) for x in ratios],
            "target_ratio": 1.0,
            "node_store_handler_seconds_per_image_median": round(statistics.median(handler), 4),
            "node_peak_rss_mib": round(peak_rss / 1024, 1),
            "node_rss_before_receiving_mib": round(baseline_rss / 1024, 1),
            "storescp_peak_rss_mib": round(storescp_peak_rss / 1024, 1),
            "receiver_cpu_seconds_per_study": {k: round(v / ROUNDS, 3) for k, v in cpu.items()},
            "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
            "cpu_cores": os.cpu_count(),
            "node_durability": "fsync file + rename + fsync directory + SQLite WAL commit (synchronous=FULL)",
            "storescp_durability": "plain write, no fsync",
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        out = REPO / "benchmarks" / "results" / "ingest.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{'receiver':<10} {'median s':>9} {'MB/s':>8}")
        for k in ("storescp", "node"):
            print(f"{k:<10} {result['median_seconds'][k]:>9.3f} {result['median_mb_per_s'][k]:>8.1f}")
        print(f"ratio node/storescp (median of {ROUNDS} paired rounds): {result['ratio_node_over_storescp']:.3f} "
              f"(target >= 1.0)")
        print(f"node time per image after the data arrived (checks, fsync, rename, commit): "
              f"{result['node_store_handler_seconds_per_image_median']:.3f} s (median)")
        print(f"receiver CPU s per study: node {result['receiver_cpu_seconds_per_study']['node']}, "
              f"storescp {result['receiver_cpu_seconds_per_study']['storescp']}")
        print(f"peak RSS: node {result['node_peak_rss_mib']} MiB (before receiving: "
              f"{result['node_rss_before_receiving_mib']} MiB), storescp {result['storescp_peak_rss_mib']} MiB")
        print(f"machine load average (1 min) before/after: {result['load_average_1min']['before']}/"
              f"{result['load_average_1min']['after']} on {os.cpu_count()} cores")
        print(f"wrote {out}")
        return 0
    finally:
        for p in procs:
            p.stop()
        if "--keep" not in sys.argv:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
