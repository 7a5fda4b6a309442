"""The node: Storage SCP + study assembly + inference worker process + result delivery.

Crash safety rests on three rules: a C-STORE is acknowledged only once the instance is
durable and recorded; a job's result UIDs are fixed when the job is created, so re-running it
reproduces the same objects; a delivery records each acknowledged object. On start the node
re-queues jobs left running and makes pending deliveries due, so killing it at any moment
(SIGKILL included) and starting it again ends with every accepted study processed and each
result object stored once at its destination.

Late instances: an instance that arrives after its study became a job re-opens the study.
If that job has not started it is cancelled; otherwise it runs to completion. When the study
is complete again, a new job covers all its instances, with new result UIDs (new series,
series numbers 10 higher per revision: SEG 9011, SR 9012 after 9001, 9002); undelivered
results of the earlier job are superseded and not sent. Results already sent stay at the
PACS; the newer series supersede them.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dicom_ai.core.errors import ConfigError
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.node import logs
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.delivery import DeliveryAgent, DeliveryThread
from dicom_ai.node.jobstore import JobStore
from dicom_ai.node.scp import StorageSCP
from dicom_ai.node.storage import write_durably


def make_result_uids(source_sop_uids: list[str]) -> str:
    """JSON of the result UIDs of a new job, fixed for the job's life."""
    return ResultUIDs.generate(source_sop_uids).to_json()


class Node:
    """Runs until :meth:`stop` (SIGTERM/SIGINT in :func:`serve`)."""

    def __init__(self, config: NodeConfig, poll_seconds: float = 0.2):
        self.config = config
        self.poll_seconds = poll_seconds
        self.layout = config.layout
        self.layout.root.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.layout.jobstore)
        self.scp = StorageSCP(config, self.store)
        self.delivery = DeliveryThread(DeliveryAgent(config, self.store), poll_seconds)
        self.worker: subprocess.Popen | None = None
        self._worker_restarts: list[float] = []
        self._stopping = threading.Event()
        self._next_purge = 0.0

    def start(self) -> int:
        """Recover, then start the SCP, the worker and delivery; returns the SCP port."""
        recovered = self.store.recover(self.config.pipeline.max_job_attempts)
        logs.event("node_recovered", **recovered)
        write_durably(self.layout.config_json, lambda tmp: tmp.write_text(self.config.to_json()))
        port = self.scp.start()
        self._start_worker()
        self.delivery.start()
        logs.event("node_started", ae_title=self.config.node.ae_title, port=port, storage=str(self.layout.root))
        return port

    def run(self) -> None:
        """The assembly loop: close complete studies, keep the worker alive."""
        while not self._stopping.is_set():
            try:
                for job_id in self.store.close_ready_studies(self.config.study.grace_seconds,
                                                             self.config.study.idle_seconds, make_result_uids):
                    logs.event("job_queued", job_id=job_id)
            except Exception as exc:
                logs.event("assembly_error", level="ERROR", error=f"{type(exc).__name__}: {exc}")
            self._check_worker()
            self._purge()
            self._stopping.wait(self.poll_seconds)
        self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    def _purge(self) -> None:
        """Every minute (or half the retention time): delete finished studies' files."""
        days = self.config.node.retention_days
        if days <= 0 or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + min(60.0, days * 86400.0 / 2)
        try:
            for study_id, jobs, paths in self.store.purge_finished(time.time() - days * 86400.0):
                for path in paths:
                    Path(path).unlink(missing_ok=True)
                for job in jobs:
                    for folder in self.layout.job_folders(job):
                        shutil.rmtree(folder, ignore_errors=True)
                logs.event("study_purged", study_id=study_id, files=len(paths), retention_days=days)
        except Exception as exc:  # retention must never stop the node
            logs.event("purge_error", level="ERROR", error=f"{type(exc).__name__}: {exc}")

    # -- the worker process --------------------------------------------------------------

    def _start_worker(self) -> None:
        self.worker = subprocess.Popen([sys.executable, "-m", "dicom_ai.node.worker", "--config-json",
                                        str(self.layout.config_json), "--parent-pid", str(os.getpid())])
        logs.event("worker_spawned", worker_pid=self.worker.pid)

    def _check_worker(self) -> None:
        if self.worker is None or self.worker.poll() is None:
            return
        code = self.worker.returncode
        now = time.monotonic()
        self._worker_restarts = [t for t in self._worker_restarts if now - t < 60] + [now]
        logs.event("worker_exited", level="ERROR", returncode=code, restarts_last_minute=len(self._worker_restarts))
        if len(self._worker_restarts) > 5:
            time.sleep(5)  # a worker that cannot start: do not spin; the log says why
        # The job it was running is re-queued (or failed after too many attempts).
        self.store.recover(self.config.pipeline.max_job_attempts)
        self._start_worker()

    def _shutdown(self) -> None:
        logs.event("node_stopping")
        self.scp.stop()
        self.delivery.stopping.set()
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(15)
            except subprocess.TimeoutExpired:
                self.worker.kill()
            logs.event("worker_stopped", returncode=self.worker.wait())
        self.delivery.join(35)
        logs.event("node_stopped")


def _limit_malloc_arenas(arenas: int = 1) -> None:
    """Cap glibc's per-thread malloc arenas before any thread starts.

    Every thread otherwise gets an arena of its own that keeps the 128 KiB PDU buffers it has
    freed: receiving four 17 MB images grew the node by ~100 MB; with one arena by ~17 MB
    (benchmarks/bench_ingest.py), at no measurable cost in throughput.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc


def serve(config: NodeConfig) -> int:
    """Run a node in the foreground until SIGTERM or SIGINT."""
    _limit_malloc_arenas()
    try:
        config.storage_dir.mkdir(parents=True, exist_ok=True)
        logs.configure("node", config.logging.level, config.log_file)
        node = Node(config)
        signal.signal(signal.SIGTERM, lambda *_: node.stop())
        signal.signal(signal.SIGINT, lambda *_: node.stop())
        node.start()
    except ConfigError as exc:  # what the CLI checks first; a library caller gets the same answer
        print(f"dicom-ai: configuration error: {exc}", file=sys.stderr)
        logs.event("node_start_failed", level="ERROR", error=str(exc))
        return 2
    except OSError as exc:
        where = f"{config.node.bind_address}:{config.node.port}" if exc.errno in (98, 99, 13) else config.storage_dir
        print(f"dicom-ai: cannot start the node ({where}): {exc.strerror or exc}", file=sys.stderr)
        logs.event("node_start_failed", level="ERROR", error=str(exc))
        return 2
    node.run()
    sys.stderr.flush()
    # Everything is committed and fsynced; skip the slow interpreter teardown.
    os._exit(0)

