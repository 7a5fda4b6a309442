"""C-STORE receive throughput of the node vs dcmtk's storescp, four full-size MG images, with
the node's worker idle ("quiet") and with it running real inference ("busy").

Both receivers run on loopback in the same run; dcmtk's ``storescu`` sends the same four
uncompressed 3328 x 2560 x 16-bit images (17 MB each) over one association to each of them
in turn (A B A B ...), with fresh SOP Instance UIDs every round so the node really stores
every image (it answers a known UID without storing it again). Wall time is measured around
storescu. ``ratio`` = node throughput / storescp throughput, median over the paired rounds.

Phases (in one run):

- ``quiet``: the node's study grace is an hour, so its worker stays idle; the stand-in
  pipeline is configured (nothing is inferred).
- ``busy``: (once per worker niceness in :data:`BUSY_NICE`: 0, the receiver's own priority
  as before issue 28, then the default ``workers.nice``) a node with the shipped models at operating point ``phantom`` and a
  0.5 s grace: a warm-up study is sent first and the rounds start once the worker has begun
  inferring it; every study received becomes a job too, so the worker stays busy through the
  rounds. Both receivers (node and storescp) are measured while that worker runs, and the
  worker's CPU use during each round is recorded (``worker_cpu_share_per_round``: CPU seconds
  over wall seconds, up to the number of cores), so a round with an idle worker would show.

Settings: both receivers offer the same maximum PDU (128 KiB, dcmtk's own cap for sending);
storescp writes files without fsync, while the node fsyncs the file and its directory and
commits a job-store row before answering Success: the comparison is against a receiver
doing less durable work. Peak memory is the node process's VmHWM (the receiving process).
Everything runs at the caller's priority; the machine's load average is recorded.

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

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
#: Worker niceness of the busy phases: 0 = the receiver's own priority (the node before issue 28),
#: 10 = the default ``workers.nice``.
BUSY_NICE = (0, 10)
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


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = [int(k) for k in (task / "children").read_text().split()]
                out += kids
                todo += kids
        except OSError:
            continue
    return out


def _worker_pid(node_pid: int) -> int | None:
    """The node's worker process (``dicom-ai`` runs it as a child whose command names the worker)."""
    for pid in _descendants(node_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "worker" in cmd:
            return pid
    return None


def _thread_nices(pid: int) -> dict[str, int]:
    """Niceness -> number of threads of process ``pid`` at it (from /proc/<pid>/task/*/stat): shows
    whether ``workers.nice`` reached every thread, the model runtimes' pools included."""
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            nice = task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[16]
        except (OSError, IndexError):
            continue
        out[nice] = out.get(nice, 0) + 1
    return out


def _events(log: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if f'"{name}"' in line]


def _paired_rounds(rounds: list[dict[str, list[Path]]], ports: dict[str, int], pids: dict[str, int],
                   worker: int | None) -> dict:
    """storescu to storescp, then to the node, per round; wall and receiver CPU seconds, and
    the worker's CPU share during each send (if a worker pid is given)."""
    times = {"storescp": [], "node": []}
    cpu = {"storescp": 0.0, "node": 0.0}
    share = {"storescp": [], "node": []}
    called = {"storescp": "STORESCP", "node": "AINODE"}
    for r, paths in enumerate(rounds):
        for target in ("storescp", "node"):
            c0 = _cpu_seconds(pids[target])
            w0 = _cpu_seconds(worker) if worker else 0.0
            t0 = time.perf_counter()
            res = storescu(ports[target], paths[target], calling="BENCH", called=called[target])
            dt = time.perf_counter() - t0
            cpu[target] += _cpu_seconds(pids[target]) - c0
            if worker:
                share[target].append(round((_cpu_seconds(worker) - w0) / dt, 2))
            ok = res.returncode == 0 and res.stderr.count("Received Store Response (Success)") == 4
            if not ok:
                raise SystemExit(f"{target} round {r}: storescu failed:\n{res.stderr[-2000:]}")
            times[target].append(dt)
    return {"times": times, "cpu": cpu, "worker_share": share}


def _phase_result(name: str, measured: dict, nbytes: int, rounds: int, node: Proc, log: Path,
                  load: tuple[float, float]) -> dict:
    times, cpu = measured["times"], measured["cpu"]
    ratios = [s / n for s, n in zip(times["storescp"], times["node"])]
    # The node logs how long each C-STORE took from "data set received" to "answer Success"
    # (checks, fsync, rename, directory fsync, job-store commit): the durability share.
    handler = [e["seconds"] for e in _events(log, "instance_received")]
    mb = nbytes / 1e6
    out = {
        "phase": name,
        "seconds": {k: [round(v, 4) for v in vs] for k, vs in times.items()},
        "median_seconds": {k: round(statistics.median(vs), 4) for k, vs in times.items()},
        "median_mb_per_s": {k: round(mb / statistics.median(vs), 1) for k, vs in times.items()},
        "ratio_node_over_storescp": round(statistics.median(ratios), 3),
        "ratios_per_round": [round(x, 3) for x in ratios],
        "node_store_handler_seconds_per_image_median": round(statistics.median(handler), 4),
        "node_peak_rss_mib": round(_rss_kib(node.pid, "VmHWM") / 1024, 1),
        "receiver_cpu_seconds_per_study": {k: round(v / rounds, 3) for k, v in cpu.items()},
        "load_average_1min": {"before": round(load[0], 2), "after": round(load[1], 2)},
    }
    if any(measured["worker_share"].values()):
        out["worker_cpu_share_per_round"] = measured["worker_share"]
        out["worker_cpu_share_min"] = min(min(v) for v in measured["worker_share"].values())
        out["worker_jobs_started_by_end"] = len(_events(log, "job_started"))
    return out


def _busy_phase(work: Path, nice: int, warmup: dict, busy_rounds: list, scp_port: int, storescp: Proc,
                procs: list[Proc]) -> dict:
    """Rounds against a node whose own worker infers (shipped models, operating point 'phantom')
    at niceness ``nice`` (``workers.nice``), storescp measured in the same rounds."""
    nbytes = sum(p.stat().st_size for p in busy_rounds[0]["node"])
    node_port = free_port()
    log = work / f"node-busy-{nice}.log"
    cfg = write_node_config(work / f"node-busy-{nice}.toml", work / f"node-busy-{nice}-storage", node_port,
                            [("BENCH", 1)],
                            node={"max_pdu_size": PDU},
                            pipeline={"factory": "", "device": "cpu", "previews": False,
                                      "operating_point": "phantom"},
                            study={"grace_seconds": 0.5, "idle_seconds": 60.0},
                            retry={"max_attempts": 1, "initial_delay_seconds": 60.0, "max_delay_seconds": 60.0},
                            workers={"nice": nice})
    node = start_node(cfg, node_port, log, env=node_env())
    procs.append(node)
    res = storescu(node_port, warmup["node"], calling="BENCH")
    if res.returncode != 0:
        raise SystemExit(f"warm-up study not sent:\n{res.stderr[-2000:]}")
    deadline = time.monotonic() + 300
    while not _events(log, "job_started"):
        if time.monotonic() > deadline:
            raise SystemExit(f"the worker never started the warm-up job; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    worker = _worker_pid(node.pid)
    if worker is None:
        raise SystemExit("no worker process found under the node")
    time.sleep(2.0)  # into the models (decode and the first image's preparation come first)
    load0 = os.getloadavg()[0]
    measured = _paired_rounds(busy_rounds, {"storescp": scp_port, "node": node_port},
                              {"storescp": storescp.pid, "node": node.pid}, worker)
    busy = _phase_result(f"busy-nice{nice}", measured, nbytes, ROUNDS, node, log, (load0, os.getloadavg()[0]))
    busy["worker_threads_by_nice"] = _thread_nices(worker)  # after the rounds: every pool has started
    busy["receiver_threads_by_nice"] = _thread_nices(node.pid)
    finished = _events(log, "job_finished")
    busy["worker_jobs_finished_by_end"] = len(finished)
    stored = len(list((work / f"node-busy-{nice}-storage" / "spool").rglob("*.dcm")))
    if stored < 4 * ROUNDS:
        raise SystemExit(f"busy node stored {stored} files, expected at least {4 * ROUNDS}")
    busy["worker_nice"] = nice
    node.stop()
    procs.remove(node)
    return busy


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=REPO / "benchmarks"))
    procs: list[Proc] = []
    try:
        n_busy = len(BUSY_NICE)
        rounds = write_rounds(work, (1 + n_busy) * ROUNDS + n_busy, ("storescp", "node"))
        quiet_rounds, warm, busy_rounds = rounds[:ROUNDS], rounds[ROUNDS:ROUNDS + n_busy], rounds[ROUNDS + n_busy:]
        nbytes = sum(p.stat().st_size for p in rounds[0]["node"])

        scp_port = free_port()
        (work / "storescp-in").mkdir()
        storescp = Proc(["storescp", "--aetitle", "STORESCP", "--output-directory", str(work / "storescp-in"),
                         "--max-pdu", str(PDU), str(scp_port)], work / "storescp.log")
        procs.append(storescp)
        wait_port(scp_port)

        # Quiet: the worker never starts a job (an hour's grace).
        node_port = free_port()
        cfg = write_node_config(work / "node.toml", work / "node-storage", node_port, [("BENCH", 1)],
                                node={"max_pdu_size": PDU},
                                study={"grace_seconds": 3600.0, "idle_seconds": 7200.0})
        node = start_node(cfg, node_port, work / "node.log", env=node_env())
        procs.append(node)
        baseline_rss = _rss_kib(node.pid, "VmRSS")
        load0 = os.getloadavg()[0]
        measured = _paired_rounds(quiet_rounds, {"storescp": scp_port, "node": node_port},
                                  {"storescp": storescp.pid, "node": node.pid}, None)
        quiet = _phase_result("quiet", measured, nbytes, ROUNDS, node, work / "node.log",
                              (load0, os.getloadavg()[0]))
        stored = len(list((work / "node-storage" / "spool").rglob("*.dcm")))
        if stored != 4 * ROUNDS:
            raise SystemExit(f"node stored {stored} files, expected {4 * ROUNDS}")
        quiet["node_rss_before_receiving_mib"] = round(baseline_rss / 1024, 1)
        node.stop()
        procs.remove(node)

        # Busy: the shipped models at the phantom operating point on every study received, the
        # worker first at the receiver's priority (the node before issue 28), then at the default
        # niceness, in one run so that the ratios compare on the same machine state.
        busy_by_nice = {}
        for i, nice in enumerate(BUSY_NICE):
            busy_by_nice[nice] = _busy_phase(work, nice, warm[i], busy_rounds[i * ROUNDS:(i + 1) * ROUNDS],
                                             scp_port, storescp, procs)
        busy = busy_by_nice[BUSY_NICE[-1]]

        result = {
            "benchmark": "ingest",
            "what": "C-STORE receive of 4 uncompressed full-size MG images over one association (storescu sender)",
            "image_shape": list(SHAPE), "bytes_per_study": nbytes, "rounds": ROUNDS, "max_pdu": PDU,
            "target_ratio": 1.0,
            "ratio_node_over_storescp": {"quiet": quiet["ratio_node_over_storescp"],
                                         **{f"busy_worker_nice_{n}": b["ratio_node_over_storescp"]
                                            for n, b in busy_by_nice.items()}},
            "quiet": quiet,
            "busy": busy_by_nice,
            "busy_worker": "the node's own worker: shipped glam, dunet, microcalc at operating point 'phantom', "
                           "ONNX Runtime / torch on the CPU, inferring the warm-up study and then each round's",
            "storescp_peak_rss_mib": round(_rss_kib(storescp.pid, "VmHWM") / 1024, 1),
            "cpu_cores": os.cpu_count(),
            "priority": f"receivers at nice {os.nice(0)} (the caller's); the busy node's worker at "
                        f"{', '.join(str(n) for n in BUSY_NICE)} in turn (workers.nice)",
            "node_durability": "fsync file + rename + fsync directory + SQLite WAL commit (synchronous=FULL)",
            "storescp_durability": "plain write, no fsync",
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        out = REPO / "benchmarks" / "results" / "ingest.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{'phase':<6} {'receiver':<10} {'median s':>9} {'MB/s':>8} {'CPU s/study':>12}")
        for phase in (quiet, *busy_by_nice.values()):
            for k in ("storescp", "node"):
                print(f"{phase['phase']:<6} {k:<10} {phase['median_seconds'][k]:>9.3f} "
                      f"{phase['median_mb_per_s'][k]:>8.1f} {phase['receiver_cpu_seconds_per_study'][k]:>12.3f}")
        for phase in (quiet, *busy_by_nice.values()):
            print(f"{phase['phase']}: ratio node/storescp (median of {ROUNDS} paired rounds) "
                  f"{phase['ratio_node_over_storescp']:.3f} (target >= 1.0); node time per image after the data "
                  f"arrived {phase['node_store_handler_seconds_per_image_median']:.3f} s; load "
                  f"{phase['load_average_1min']['before']}/{phase['load_average_1min']['after']}")
        print(f"busy: worker CPU share during the sends (min over rounds) {busy['worker_cpu_share_min']} "
              f"of {os.cpu_count()} cores; jobs started/finished by the end "
              f"{busy['worker_jobs_started_by_end']}/{busy['worker_jobs_finished_by_end']}")
        for phase in busy_by_nice.values():
            print(f"{phase['phase']}: worker threads by niceness {phase['worker_threads_by_nice']}, "
                  f"receiver {phase['receiver_threads_by_nice']}")
        print(f"peak RSS: node {quiet['node_peak_rss_mib']} MiB quiet, {busy['node_peak_rss_mib']} MiB busy; "
              f"storescp {result['storescp_peak_rss_mib']} MiB")
        print(f"wrote {out}")
        return 0
    finally:
        for p in procs:
            p.stop()
        if "--keep" not in sys.argv:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
