"""Crash storm: SIGKILL the node and its worker at random moments while studies flow through.

A modality (dcmtk ``storescu``) sends small four-view studies to the node, resending a study
whenever any of its C-STOREs fails (the node was down), as a modality's queue does. Orthanc is
the PACS that receives the results; a Lua ``ReceivedInstanceFilter`` appends the SOP Instance
UID of every C-STORE it receives, duplicates included, so the count at the PACS is the ground
truth. Orthanc also answers C-FIND, which the node uses for objects whose delivery was in doubt
when it was killed. Meanwhile a killer SIGKILLs, at random intervals, either the whole node
(which is then restarted, as systemd would) or only its worker process (which the node restarts
itself). The stand-in pipeline of the node tests takes ``--infer-seconds`` per study so kills
land during inference as well as during receive and delivery. Each result C-STORE takes
``--pacs-delay`` seconds at the PACS, and a ``--delivery-kills`` share of the node kills waits
for an object in flight (a "sending" row in the job store) before it strikes, so objects are
left in doubt and the exactly-once rule (ask the PACS by C-FIND, resend only if absent) is
exercised, not only the receive and inference paths (issue 24, fault 8).

The run passes when, with no manual step (no ``dicom-ai retry``): every study the modality got
Success for is processed and its results are at the PACS; every result object of every
finished job was received by the PACS exactly once; no job or delivery failed.

Writes benchmarks/results/crash_storm.json and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from node_harness import (Orthanc, Postgres, Proc, Redis, free_port, node_env, start_node, store_status,  # noqa: E402
                          wait_for, write_node_config, write_study)

LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open("{path}", "a")
  f:write(dicom.SOPInstanceUID .. " " .. (dicom.Modality or "") .. "\\n")
  f:close()
  if {delay} > 0 and dicom.Modality ~= "MG" then
    os.execute("sleep {delay}")
  end
  return true
end
"""


class OrthancPACS(Orthanc):
    """Orthanc as the result PACS (AE title PACS), logging every C-STORE it receives."""

    def __init__(self, folder: Path, delay: float = 0.0):
        """``delay``: seconds each result C-STORE takes at the PACS (after it is logged), so a
        kill can land while an object is in flight."""
        folder.mkdir(parents=True, exist_ok=True)
        self.received = folder / "received.txt"
        self.received.touch()
        (folder / "count.lua").write_text(LUA.replace("{path}", str(self.received)).replace("{delay}", f"{delay:g}"))
        # The node is never called back (results arrive by C-STORE), so its modality port is moot.
        super().__init__(folder, node_port=free_port(), ae_title="PACS",
                         config={"Name": "STORM-PACS", "DicomAlwaysAllowFind": True,
                                 "LuaScripts": [str(folder / "count.lua")]})

    def counts(self) -> collections.Counter:
        lines = self.received.read_text().split("\n")
        return collections.Counter(line.split()[0] for line in lines if line.strip() and not line.endswith(" MG"))


class StormNode:
    """The node under test, restartable; knows its worker's PID from the log."""

    def __init__(self, work: Path, pacs_port: int, infer_seconds: float):
        self.storage = work / "storage"
        self.port = free_port()
        self.config = write_node_config(work / "node.toml", self.storage, self.port, [("PACS", pacs_port)],
                                        study={"grace_seconds": 0.5, "idle_seconds": 3.0},
                                        retry={"max_attempts": 50, "initial_delay_seconds": 0.5,
                                               "max_delay_seconds": 2.0})
        self.console = work / "node.stdout"
        self.env = node_env(DICOM_AI_TEST_INFER_SECONDS=str(infer_seconds))
        self.proc: Proc | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        self.proc = start_node(self.config, self.port, self.console, env=self.env)

    def worker_pid(self) -> int | None:
        pid = None
        log = self.storage / "logs" / "node.log"
        if not log.exists():
            return None
        for line in log.read_text(errors="replace").splitlines():
            if '"worker_spawned"' in line:
                pid = json.loads(line).get("worker_pid")
        return pid

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    #: What the killer may strike.
    targets = ("node", "worker")

    def strike(self, target: str, rng: random.Random) -> bool:
        """SIGKILL ``target`` (the node is started again after up to 1 s, as systemd would; the
        node restarts its worker itself); False when there was nothing to kill."""
        with self.lock:
            if target == "worker":
                pid = self.worker_pid()
                try:
                    os.kill(pid, signal.SIGKILL) if pid else None
                    return bool(pid)
                except ProcessLookupError:
                    return False
            self.proc.kill()
        time.sleep(rng.uniform(0.0, 1.0))
        with self.lock:
            self.start()
        return True

    def up(self) -> bool:
        with self.lock:
            return self.proc is not None and self.proc.alive()

    def status(self) -> dict:
        return store_status(self.storage)

    def close(self) -> None:
        self.stop()

    def sending(self) -> bool:
        """Whether an object is being sent now (a "sending" row without its "sent" row)."""
        db = self.storage / "jobs.sqlite"
        if not db.exists():
            return False
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
            try:
                return conn.execute(_IN_FLIGHT).fetchone() is not None
            finally:
                conn.close()
        except sqlite3.Error:
            return False


_IN_FLIGHT = ("SELECT 1 FROM sending x WHERE NOT EXISTS (SELECT 1 FROM sent y WHERE y.delivery_id = x.delivery_id "
              "AND y.sop_instance_uid = x.sop_instance_uid) LIMIT 1")


class DistributedSite(StormNode):
    """The distributed node under the same storm: PostgreSQL job store (durable), Redis broker,
    the receiving node and two ``dicom-ai worker`` processes (Celery, one pool process each) on
    one shared storage folder.

    The killer SIGKILLs the node (restarted), a whole worker (Celery's main process and its
    pool, restarted as systemd would), only the pool process running a job (Celery's main
    process starts another), and restarts PostgreSQL (``-m immediate``: every connection
    breaks) or Redis (its queue is lost) after up to 2 s down.
    """

    targets = ("node", "worker", "pool", "postgres", "redis")

    def __init__(self, work: Path, pacs_port: int, infer_seconds: float, workers: int = 2):
        super().__init__(work, pacs_port, infer_seconds)
        self.pg = Postgres(durable=True)
        self.url = self.pg.new_database()
        self.redis = Redis(work / "redis")
        self.config = write_node_config(work / "node.toml", self.storage, self.port, [("PACS", pacs_port)],
                                        study={"grace_seconds": 0.5, "idle_seconds": 3.0},
                                        retry={"max_attempts": 50, "initial_delay_seconds": 0.5,
                                               "max_delay_seconds": 2.0},
                                        jobstore={"url": self.url, "connect_timeout_seconds": 2.0},
                                        workers={"broker_url": self.redis.url, "lease_seconds": 6.0,
                                                 "requeue_seconds": 4.0, "visibility_timeout_seconds": 60.0})
        self.work = work
        self.names = [f"w{i + 1}" for i in range(workers)]
        self.workers: dict[str, Proc] = {}
        self.restarts = collections.Counter()

    def start(self) -> None:
        super().start()
        for name in self.names:
            if name not in self.workers or not self.workers[name].alive():
                self._start_worker(name)

    def _start_worker(self, name: str) -> None:
        self.workers[name] = Proc([sys.executable, "-m", "dicom_ai", "worker", "--config", str(self.config), "--name",
                                   name], self.work / f"worker-{name}.log", env=self.env, cwd=REPO)

    def strike(self, target: str, rng: random.Random) -> bool:
        if target == "node":
            return super().strike("node", rng)
        if target == "worker":
            name = rng.choice(self.names)
            with self.lock:
                proc = self.workers[name]
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait(10)
            time.sleep(rng.uniform(0.0, 1.0))
            with self.lock:
                self._start_worker(name)
            return True
        if target == "pool":  # the pool process running a job (the OOM killer's way)
            running = [j for j in self.status()["jobs"] if j["state"] == "running" and j.get("worker")]
            if not running:
                return False
            try:
                os.kill(int(rng.choice(running)["worker"].rsplit(" ", 1)[-1]), signal.SIGKILL)
                return True
            except (ProcessLookupError, ValueError):
                return False
        down = rng.uniform(0.0, 2.0)
        (self.pg if target == "postgres" else self.redis).restart(down)
        return True

    def status(self) -> dict:
        return wait_for(lambda: _try(lambda: store_status(self.storage, self.url)), 120, "the job store")

    def sending(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                return conn.execute(_IN_FLIGHT).fetchone() is not None
        except psycopg.Error:
            return False

    def close(self) -> None:
        for proc in self.workers.values():
            if proc.alive():
                proc.stop(timeout=20)
        self.stop()
        self.redis.stop()
        self.pg.close()


def _try(read):
    """``read()``, or None while the job store is restarting."""
    try:
        return read()
    except Exception:
        return None


def wait_until(predicate, seconds: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _send_study(port: int, files: list[Path]) -> bool:
    r = subprocess.run(["storescu", "-aet", "PACS", "-aec", "AINODE", "-to", "10", "-ta", "10", "-td", "10",
                        "127.0.0.1", str(port), *map(str, files)], capture_output=True, text=True, timeout=60)
    return r.returncode == 0 and "Status: Error" not in r.stderr and "Failure" not in r.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=30)
    parser.add_argument("--kills", type=int, default=30, help="SIGKILLs (node or worker), at least 25 for issue 13")
    parser.add_argument("--interval", type=float, nargs=2, default=(0.8, 3.0), metavar=("MIN", "MAX"),
                        help="seconds between kills, drawn uniformly")
    parser.add_argument("--infer-seconds", type=float, default=1.0, help="stand-in pipeline time per study")
    parser.add_argument("--pacs-delay", type=float, default=0.2,
                        help="seconds each result C-STORE takes at the PACS (Orthanc Lua), to widen the delivery window")
    parser.add_argument("--delivery-kills", type=float, default=0.5, metavar="FRACTION",
                        help="share of node kills aimed at a moment an object is being sent (in doubt afterwards)")
    parser.add_argument("--distributed", action="store_true",
                        help="PostgreSQL + Redis + two `dicom-ai worker` processes; also kills pool processes and "
                             "restarts PostgreSQL and Redis (default out: crash_storm_distributed.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.out = args.out or REPO / "benchmarks" / "results" / (
        "crash_storm_distributed.json" if args.distributed else "crash_storm.json")
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="crash-storm-"))
    pacs = OrthancPACS(work / "pacs", args.pacs_delay)
    node = (DistributedSite if args.distributed else StormNode)(work, pacs.dicom, args.infer_seconds)
    node.start()
    studies = {}
    for i in range(args.studies):
        files = write_study(work / "studies" / f"{i:03d}", seed=i)
        studies[str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)] = files
    sends = collections.Counter()
    accepted: set[str] = set()
    kills = collections.Counter()
    aims = collections.Counter()  # node kills aimed at a delivery: landed while an object was in flight, or not
    sending_done = threading.Event()

    def modality():
        for uid, files in studies.items():
            while True:
                sends[uid] += 1
                if node.up() and _send_study(node.port, files):
                    accepted.add(uid)
                    break
                time.sleep(1.0)
            time.sleep(rng.uniform(0.2, 1.5))
        sending_done.set()

    started = time.monotonic()
    sender = threading.Thread(target=modality, daemon=True)
    sender.start()
    killer = random.Random(args.seed + 1)  # its own stream: the sender thread draws from rng meanwhile
    schedule: list[str] = []
    while sum(kills.values()) < args.kills:
        time.sleep(killer.uniform(*args.interval))
        if not schedule:  # every kind of target equally often, in a shuffled order
            schedule = list(node.targets)
            killer.shuffle(schedule)
        target = schedule.pop()
        if target == "node" and killer.random() < args.delivery_kills:
            # Aim at a delivery: wait (up to 10 s) for an object in flight, then kill the node.
            aimed = wait_until(node.sending, 10)
            aims["during_send" if aimed else "missed"] += 1
        if node.strike(target, killer):
            kills[target] += 1
        elif not sending_done.is_set():
            schedule.append(target)  # nothing to kill yet (no job running): try it next time
    storm_seconds = time.monotonic() - started
    sender.join(timeout=600)

    def settled():
        s = node.status()
        if any(x["state"] == "open" for x in s["studies"]):
            return None
        if any(j["state"] in ("queued", "running") for j in s["jobs"]):
            return None
        if any(d["state"] == "pending" for d in s["deliveries"]):
            return None
        return s
    try:
        s = wait_for(settled, 600, "the node to process and deliver everything", interval=0.5)
        settle_seconds = time.monotonic() - started - storm_seconds
    finally:
        time.sleep(1.0)  # let Orthanc's Lua log the last receipt
        counts = pacs.counts()
        node.close()
        pacs.stop()

    log = (node.storage / "logs" / "node.log").read_text(errors="replace")
    in_doubt = {name: log.count(f'"event": "{name}"') for name in
                ("delivery_confirmed_in_doubt", "delivery_resent_in_doubt", "worker_exited", "node_recovered")}
    studies_by_id = {x["id"]: x["study_uid"] for x in s["studies"]}
    done_jobs = [j for j in s["jobs"] if j["state"] == "done"]
    delivered_studies = {studies_by_id[j["study_id"]] for j in done_jobs
                         if all(d["state"] == "done" for d in s["deliveries"] if d["job_id"] == j["id"])}
    expected = collections.Counter(o["sop_instance_uid"] for o in s["outbox"]
                                   if o["job_id"] in {j["id"] for j in done_jobs})
    missing = [u for u in expected if counts[u] == 0]
    duplicated = {u: n for u, n in counts.items() if n > 1}
    unexpected = [u for u in counts if u not in expected]
    report = {
        "studies": args.studies, "studies_accepted": len(accepted), "sends_per_study_max": max(sends.values()),
        "kills": dict(kills), "node_kills_aimed_at_a_send": dict(aims), "kills_total": sum(kills.values()),
        "storm_seconds": round(storm_seconds, 1),
        "settle_seconds": round(settle_seconds, 1),
        "accepted_not_delivered": sorted(accepted - delivered_studies),
        "jobs": collections.Counter(j["state"] for j in s["jobs"]),
        "deliveries": collections.Counter(d["state"] for d in s["deliveries"]),
        "result_objects_expected": len(expected), "received_at_pacs": sum(counts.values()),
        "missing_at_pacs": len(missing), "duplicated_at_pacs": duplicated, "unexpected_at_pacs": len(unexpected),
        "log_events": in_doubt,
        "infer_seconds_per_study": args.infer_seconds, "pacs_delay_seconds": args.pacs_delay,
        "delivery_kill_share": args.delivery_kills, "seed": args.seed, "machine": f"{os.cpu_count()} cores",
        "pacs": "Orthanc (answers C-FIND)",
        "site": ("distributed: PostgreSQL job store, Redis broker, 2 dicom-ai workers, shared storage"
                 if args.distributed else "embedded: SQLite job store, one worker process"),
    }
    report["passed"] = (not report["accepted_not_delivered"] and not missing and not duplicated
                        and report["jobs"].get("failed", 0) == 0 and report["deliveries"].get("failed", 0) == 0
                        and report["kills_total"] >= min(25, args.kills))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=dict) + "\n")
    for key, value in report.items():
        print(f"{key:28s} {value}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
