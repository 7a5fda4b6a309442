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

Service operation. Under systemd (``dicom_ai/node/dicom-ai.service``, ``Type=notify``) the
node tells the service manager ``READY=1`` once the SCP listens and start-up recovery has
run, ``WATCHDOG=1`` from the supervisor loop (at half of ``WATCHDOG_USEC``; a loop that
hangs gets the node restarted) and ``STOPPING=1`` at SIGTERM: plain datagrams to
``$NOTIFY_SOCKET`` (:func:`sd_notify`), no extra dependency. SIGTERM (``systemctl stop``)
is a graceful stop: the SCP stops accepting, associations in progress are given up to
:data:`DRAIN_SECONDS` to finish their C-STOREs (each one acknowledged is durable), the
worker is terminated (its job is re-queued at the next start, an interruption), delivery
threads end after their current C-STORE; every job and delivery resumes at the next start.

Past one machine (``[workers] broker_url`` with a PostgreSQL ``[jobstore] url``) the node
starts no worker child: it announces jobs on Celery and sweeps the job store
(:class:`~dicom_ai.node.dispatch.Dispatcher`: jobs whose worker's lease ran out are re-queued,
jobs queued but unclaimed are announced again), and its start-up recovery leaves running jobs
to their workers' leases. At every start the node makes sure the storage has an identity
(``<storage>/storage-id``) and that the job store is bound to it, so a node pointed at another
node's job store, and workers that do not see this storage, refuse to run.
"""

from __future__ import annotations

import ctypes
import os
import socket
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dicom_ai.core.errors import ConfigError, JobStoreError, StorageIdentityError
from dicom_ai.core.research import research_notices
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.node import audit, certificates, logs, metrics
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.delivery import DELIVERY_POLL_SECONDS, DeliveryAgent, DeliveryThread
from dicom_ai.node.dispatch import Dispatcher, DispatchThread
from dicom_ai.node.engines import open_jobstore
from dicom_ai.node.http_server import StatusServer
from dicom_ai.node.liveness import no_live_worker, watch_workers
from dicom_ai.node.scp import StorageSCP
from dicom_ai.node.storage import (PRIVATE_UMASK, ensure_storage_id, is_storage_error, make_private,
                                   write_durably)
from dicom_ai.node.tls import server_context

#: How the worker process starts: the parent-death signal (SIGKILL, Linux prctl
#: PR_SET_PDEATHSIG) is set before anything of the node is imported (dicom_ai.node, torch,
#: highdicom: seconds), and a node that died before it was set is noticed by the parent pid;
#: so the worker dies with its node at any moment. Then ``python -m dicom_ai.node.worker``.
WORKER_BOOT = ("import ctypes, os, runpy, signal, sys\n"
               "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGKILL)\nexcept (OSError, AttributeError):\n    pass\n"
               "if os.getppid() != int(sys.argv[sys.argv.index('--parent-pid') + 1]):\n    sys.exit(1)\n"
               "runpy.run_module('dicom_ai.node.worker', run_name='__main__', alter_sys=True)\n")

#: Longest wait between two tries of a supervisor step (assembly, worker recovery, purge,
#: start-up recovery) that failed, in seconds; the wait doubles from ``poll_seconds``.
MAX_BACKOFF_SECONDS = 10.0

#: Longest wait at a graceful stop for associations in progress to end, in seconds.
DRAIN_SECONDS = 30.0


def sd_notify(message: str) -> bool:
    """Send one sd_notify(3) state line (``READY=1``, ``WATCHDOG=1``...) to ``$NOTIFY_SOCKET``.

    Returns False (and does nothing) when the node is not run by systemd with ``Type=notify``.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            # Never block the supervisor loop on a service manager that does not read.
            sock.setblocking(False)
            sock.send(message.encode())
        return True
    except OSError:
        return False


def make_result_uids(source_sop_uids: list[str]) -> str:
    """JSON of the result UIDs of a new job, fixed for the job's life."""
    return ResultUIDs.generate(source_sop_uids).to_json()


class _Step:
    """One periodic step of the supervisor loop, with backoff after an error.

    An error (a full disk, a locked or unwritable job store, or a bug) never leaves the loop:
    the first of a run is logged as ``<name>_error``, the step waits ``poll * 2**n`` seconds
    (capped at :data:`MAX_BACKOFF_SECONDS`) before the next try, and the first success after
    errors logs ``<name>_recovered``.
    """

    def __init__(self, name: str, poll_seconds: float):
        self.name = name
        self.poll_seconds = poll_seconds
        self.failures = 0
        self.next_try = 0.0

    def run(self, fn: Callable[[], object]) -> bool:
        """Call ``fn`` if the step is due; returns True when it ran without an error."""
        now = time.monotonic()
        if now < self.next_try:
            return False
        try:
            fn()
        except Exception as exc:
            self.failures += 1
            delay = min(MAX_BACKOFF_SECONDS, self.poll_seconds * 2 ** self.failures)
            self.next_try = now + delay
            if self.failures == 1 or self.failures % 20 == 0:
                logs.event(f"{self.name}_error", level="ERROR", error=f"{type(exc).__name__}: {exc}",
                           storage_problem=is_storage_error(exc), failures=self.failures,
                           retry_in_s=round(delay, 1))
            return False
        if self.failures:
            logs.event(f"{self.name}_recovered", after_failures=self.failures)
            self.failures = 0
        return True


class Node:
    """Runs until :meth:`stop` (SIGTERM/SIGINT in :func:`serve`)."""

    def __init__(self, config: NodeConfig, poll_seconds: float = 0.2):
        self.config = config
        self.poll_seconds = poll_seconds
        self.layout = config.layout
        self.layout.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = open_jobstore(config)
        self.distributed = config.workers.distributed
        self.dispatch = DispatchThread(Dispatcher(config, self.store), poll_seconds) if self.distributed else None
        self._storage_bound = False
        self.scp = StorageSCP(config, self.store)
        self.delivery = DeliveryThread(DeliveryAgent(config, self.store), min(poll_seconds, DELIVERY_POLL_SECONDS))
        self.worker: subprocess.Popen | None = None
        self._worker_restarts: list[float] = []
        self._stopping = threading.Event()
        self._reload = threading.Event()
        self._next_purge = 0.0
        # Recovery (re-queue what a stopped worker left running) must run, and succeed, before
        # a worker is started: run later, it would take the new worker's claim away.
        self._ready = False
        self._worker_down = False
        self._disk_low: bool | None = None
        self._disk_notice_written = False
        self._steps = {name: _Step(name, poll_seconds)
                       for name in ("startup", "assembly", "worker_recovery", "purge", "disk_check")}
        self.http: StatusServer | None = None
        #: Why a failing ``/readyz`` check fails (check name -> text), from the last :meth:`readiness`.
        self.ready_reasons: dict[str, str] = {}
        watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
        self._watchdog_every = int(watchdog_usec) / 2e6 if watchdog_usec.isdigit() else 0.0
        self._next_watchdog = 0.0

    def start(self) -> int:
        """Start the SCP, recover, then start the worker and delivery; returns the SCP port.

        When the job store cannot be written (a full disk) the SCP still starts, answering
        Out of Resources, and recovery is retried by :meth:`run` until the storage takes writes.
        """
        audit.configure(self.config)
        try:
            self._bind_storage()
        except StorageIdentityError:
            raise
        except Exception as exc:  # a full disk: retried by the start-up step
            if not is_storage_error(exc):
                raise
        metrics.watch_store(self.store, self.layout.root, self.config.node.reserve_free_mb * 2**20)
        watch_workers(self.store if self.distributed else None, self.config.workers.lease_seconds)
        self._check_certificates()
        port = self.scp.start()
        research = research_notices(self.config.pipeline.models)
        for note in research:
            logs.event("research_only_model", level="WARNING", notice=note)
        if self.config.http.port:
            self.http = StatusServer(self.config.http.bind_address, self.config.http.port, self.config.node.ae_title,
                                     lambda: dict(self.store.status(), research=research), self.readiness,
                                     reasons=lambda: self.ready_reasons,
                                     lease_seconds=self.config.workers.lease_seconds if self.distributed else None)
            self.http.start()
        self._steps["startup"].run(self._prepare)
        if not self._ready:
            logs.event("node_waiting_for_storage", level="ERROR", storage=str(self.layout.root),
                       hint="free space on the storage disk; the node resumes by itself")
        logs.event("node_started", ae_title=self.config.node.ae_title, port=port, tls_port=self.scp.tls_port,
                   storage=str(self.layout.root))
        audit.application_activity(started=True, who=audit.operator())
        sd_notify(f"READY=1\nSTATUS=listening on port {port}\nMAINPID={os.getpid()}")
        return port

    def _check_certificates(self) -> None:
        """Log what ``check-config`` would say of the ``[tls]`` files; export their expiry as metrics."""
        if not self.config.tls_in_use:
            certificates.watch_expiry(None)
            return
        report = certificates.check_certificates(self.config.tls)
        for text in report.errors:
            logs.event("certificate_problem", level="ERROR", problem=text)
        for text in report.warnings:
            logs.event("certificate_warning", level="WARNING", problem=text)
        certificates.watch_expiry(self.config.tls)

    def readiness(self) -> dict[str, bool]:
        """The ``/readyz`` checks: SCP accepting, worker alive, job store writable, disk above reserve."""
        checks = {"scp_accepting": self.scp.accepting}
        self.ready_reasons = {}
        if not self.distributed:
            checks["worker_alive"] = self.worker is not None and self.worker.poll() is None
        else:  # workers on other hosts: their heartbeats, and only when jobs wait for one
            try:
                why = no_live_worker(self.store, self.config.workers.lease_seconds)
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                why = None  # job_store_writable below says it
            checks["worker_alive"] = why is None
            if why is not None:
                self.ready_reasons["worker_alive"] = why
        if self.config.jobstore.url:
            checks["job_store_writable"] = self.store.writable()
        else:
            try:
                conn = sqlite3.connect(self.layout.jobstore, timeout=1.0, isolation_level=None)
                try:
                    conn.execute("BEGIN IMMEDIATE")  # takes the write lock: writable now
                    conn.execute("ROLLBACK")
                finally:
                    conn.close()
                checks["job_store_writable"] = True
            except sqlite3.Error:
                checks["job_store_writable"] = False
        try:
            checks["disk_above_reserve"] = (shutil.disk_usage(self.layout.root).free
                                            >= self.config.node.reserve_free_mb * 2**20)
        except OSError:
            checks["disk_above_reserve"] = False
        return checks

    def _bind_storage(self) -> None:
        if not self._storage_bound:
            storage_id = ensure_storage_id(self.layout)
            self.store.bind_storage(storage_id)
            self._storage_bound = True
            logs.event("storage_identity", storage_id=storage_id, job_store=self.store.engine)

    def _prepare(self) -> None:
        self._bind_storage()
        text = self.config.to_json()
        try:
            current = self.layout.config_json.read_text()
        except OSError:
            current = None
        if current != text:  # an unchanged file is not rewritten: a full disk can still start
            write_durably(self.layout.config_json, lambda tmp: tmp.write_text(text))
        # A job left running by a node that was stopped (SIGKILL, power loss, restart) is not
        # counted: the node process runs no model, so a study cannot have brought it down.
        # Past one machine, jobs left running belong to workers elsewhere: their leases decide.
        recovered = self.store.recover(self.config.pipeline.max_job_interruptions, count_interruption=False,
                                       jobs=not self.distributed)
        logs.event("node_recovered", **recovered)
        if self.dispatch is not None:
            self.dispatch.start()
        else:
            self._start_worker()
        self.delivery.start()
        self._ready = True

    def run(self) -> None:
        """The supervisor loop: close complete studies, keep the worker alive, purge, watch the disk."""
        steps = self._steps
        while not self._stopping.is_set():
            if not self._ready:
                steps["startup"].run(self._prepare)
            steps["assembly"].run(self._assemble)
            if self._ready and self.dispatch is None:
                self._check_worker()
            steps["purge"].run(self._purge)
            steps["disk_check"].run(self._check_disk)
            if self._reload.is_set():
                self._reload.clear()
                self.reload_certificates()
            if self._watchdog_every and time.monotonic() >= self._next_watchdog:
                sd_notify("WATCHDOG=1")
                self._next_watchdog = time.monotonic() + self._watchdog_every
            self._stopping.wait(self.poll_seconds)
        self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    def request_reload(self) -> None:
        """SIGHUP: re-read the ``[tls]`` files at the next turn of :meth:`run`."""
        self._reload.set()

    def reload_certificates(self) -> None:
        """Load ``tls.certificate``, ``tls.private_key`` and ``tls.ca_bundle`` again (SIGHUP).

        The TLS listener's next handshake uses the new files (each connection's thread reads
        the listener's context when it starts); associations already established keep theirs.
        Deliveries load the files for every association anyway, and the audit sink reconnects
        with them. Files that do not load keep the old ones in use (``tls_reload_failed``).
        """
        if not self.config.tls_in_use:
            logs.event("tls_reload_skipped", reason="no [tls] in use")
            return
        try:
            context = server_context(self.config.tls) if self.config.tls.port else None
        except ConfigError as exc:
            logs.event("tls_reload_failed", level="ERROR", error=str(exc), hint="the previous certificate stays in use")
            return
        for server in self.scp.servers:
            if getattr(server, "tls_context", None) is not None and context is not None:
                server.tls_context = context
        audit.configure(self.config)
        self._check_certificates()
        node = certificates.read_pem(self.config.tls.certificate)[0]
        logs.event("tls_reloaded", certificate=node.subject, expires=node.expires)

    def _assemble(self) -> None:
        for job_id in self.store.close_ready_studies(self.config.study.grace_seconds,
                                                     self.config.study.idle_seconds, make_result_uids):
            logs.event("job_queued", job_id=job_id)

    def _purge(self) -> None:
        """Every minute (or half the retention time): delete finished studies' files."""
        days = self.config.node.retention_days
        if days <= 0 or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + min(60.0, days * 86400.0 / 2)
        for study_id, jobs, paths in self.store.purge_finished(time.time() - days * 86400.0):
            for path in paths:
                Path(path).unlink(missing_ok=True)
            for job in jobs:
                for folder in self.layout.job_folders(job):
                    shutil.rmtree(folder, ignore_errors=True)
            logs.event("study_purged", study_id=study_id, files=len(paths), retention_days=days)

    def _check_disk(self) -> None:
        """Health signal: free space below ``node.reserve_free_mb`` is logged once and shown by
        ``dicom-ai status`` (notice ``disk``) while it lasts, when the job store can be written."""
        reserve = self.config.node.reserve_free_mb * 1024 * 1024
        free = shutil.disk_usage(self.layout.root).free
        low = free < reserve
        if low != self._disk_low:
            if low:
                logs.event("storage_low", level="ERROR", free_mb=free // 2**20,
                           reserve_mb=self.config.node.reserve_free_mb, storage=str(self.layout.root),
                           hint="senders get Out of Resources (0xA700) and results wait until space is freed")
            elif self._disk_low is not None:
                logs.event("storage_ok", free_mb=free // 2**20)
            self._disk_low, self._disk_notice_written = low, False
        if not self._disk_notice_written:  # written (or cleared) once per change, retried until it takes
            self.store.set_notice("disk", (f"storage below node.reserve_free_mb ({free // 2**20} MiB free, "
                                           f"{self.config.node.reserve_free_mb} MiB reserved): C-STOREs are refused "
                                           "with Out of Resources (0xA700) and results wait until space is freed")
                                  if low else None)
            self._disk_notice_written = True

    # -- the worker process --------------------------------------------------------------

    def _start_worker(self) -> None:
        self.worker = subprocess.Popen([sys.executable, "-c", WORKER_BOOT, "--config-json",
                                        str(self.layout.config_json), "--parent-pid", str(os.getpid())])
        logs.event("worker_spawned", worker_pid=self.worker.pid)

    def _check_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is not None and not self._worker_down:
            code = self.worker.returncode
            now = time.monotonic()
            self._worker_restarts = [t for t in self._worker_restarts if now - t < 60] + [now]
            logs.event("worker_exited", level="ERROR", returncode=code,
                       restarts_last_minute=len(self._worker_restarts))
            metrics.WORKER_RESTARTS.inc()
            self._worker_down = True
            if len(self._worker_restarts) > 5:
                # A worker that cannot start: do not spin; the log says why.
                self._steps["worker_recovery"].next_try = now + 5
        if self._worker_down and self._steps["worker_recovery"].run(self._restart_worker):
            self._worker_down = False

    def _restart_worker(self) -> None:
        # The job it was running is re-queued (an interruption, not a failure of the job);
        # only then a new worker may claim it.
        recovered = self.store.recover(self.config.pipeline.max_job_interruptions)
        if recovered["jobs_failed"]:
            logs.event("job_interrupted_too_often", level="ERROR", jobs=recovered["jobs_failed"],
                       max_interruptions=self.config.pipeline.max_job_interruptions)
        self._start_worker()

    def _shutdown(self) -> None:
        stopping = time.monotonic()
        logs.event("node_stopping")
        sd_notify("STOPPING=1")
        self.scp.stop()
        drained = self.scp.wait_idle(DRAIN_SECONDS)
        # seconds: how long the drain took; limit_seconds: the most it may take.
        logs.event("scp_drained" if drained else "scp_drain_timeout", level="INFO" if drained else "WARNING",
                   seconds=round(time.monotonic() - stopping, 3), limit_seconds=DRAIN_SECONDS)
        self.delivery.stopping.set()
        if self.dispatch is not None:
            self.dispatch.stopping.set()
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(15)
            except subprocess.TimeoutExpired:
                self.worker.kill()
            logs.event("worker_stopped", returncode=self.worker.wait())
        if self.delivery.is_alive():
            self.delivery.join(self.config.retry.timeout_seconds + 5)
        if self.http is not None:
            self.http.stop()
        audit.application_activity(started=False, who=audit.operator())
        logs.event("node_stopped", seconds=round(time.monotonic() - stopping, 3))


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


def _make_file_private(path: Path) -> int:
    """Owner-only permissions on one file (a log outside the storage); 1 if changed, never raises."""
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            path.chmod(mode & 0o700)
            return 1
    except OSError:
        pass
    return 0


def serve(config: NodeConfig) -> int:
    """Run a node in the foreground until SIGTERM or SIGINT.

    Returns 2 (after a message on stderr) when the node cannot start: a configuration error,
    a port in use, a storage folder that cannot be made, or a job store that cannot be opened
    (not a database, no permission, or a disk so full SQLite cannot open it). A job store that
    opens but cannot be written (a full disk) is not such a case: the node starts and waits.
    """
    # Before any file is made: everything under the storage holds or points at patient data.
    os.umask(PRIVATE_UMASK)
    _limit_malloc_arenas()
    try:
        config.storage_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        logs.configure("node", config.logging.level, config.log_file)
        tightened = make_private(config.storage_dir)
        if config.storage_dir.resolve() not in config.log_file.resolve().parents:
            tightened += _make_file_private(config.log_file)
        if tightened:
            logs.event("storage_permissions_tightened", entries=tightened, storage=str(config.storage_dir),
                       mode="files 0600, folders 0700")
        node = Node(config)
        signal.signal(signal.SIGTERM, lambda *_: node.stop())
        signal.signal(signal.SIGINT, lambda *_: node.stop())
        signal.signal(signal.SIGHUP, lambda *_: node.request_reload())
        node.start()
    except ConfigError as exc:  # what the CLI checks first; a library caller gets the same answer
        print(f"dicom-ai: configuration error: {exc}", file=sys.stderr)
        logs.event("node_start_failed", level="ERROR", error=str(exc))
        return 2
    except (StorageIdentityError, JobStoreError) as exc:
        print(f"dicom-ai: cannot start the node: {exc}", file=sys.stderr)
        logs.event("node_start_failed", level="ERROR", error=str(exc))
        return 2
    except sqlite3.Error as exc:
        print(f"dicom-ai: cannot open the job store {config.layout.jobstore}: {exc} (if the disk is full, free "
              "space; if the file is damaged, move it away and start again)", file=sys.stderr)
        logs.event("node_start_failed", level="ERROR", error=f"{type(exc).__name__}: {exc}")
        return 2
    except OSError as exc:
        where = f"{config.node.bind_address}:{config.node.port}" if exc.errno in (98, 99, 13) else config.storage_dir
        print(f"dicom-ai: cannot start the node ({where}): {exc.strerror or exc}", file=sys.stderr)
        logs.event("node_start_failed", level="ERROR", error=str(exc))
        return 2
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        # PostgreSQL not reachable at start (once running, the node waits such outages out).
        print(f"dicom-ai: cannot reach the job store (jobstore.url): {type(exc).__name__}: {exc}", file=sys.stderr)
        logs.event("node_start_failed", level="ERROR", error=f"{type(exc).__name__}: {exc}")
        return 2
    node.run()
    sys.stderr.flush()
    # Everything is committed and fsynced; skip the slow interpreter teardown.
    os._exit(0)
