"""``dicom-ai worker``: inference workers on any host, as a Celery worker fed job ids by the broker.

One ``dicom-ai worker --config node.toml`` per GPU (``--device cuda:N``), or one with
``--concurrency N`` on a CPU host. It reads the same ``node.toml`` as the node (the shared
storage path, ``[jobstore] url``, ``[workers] broker_url``, ``[pipeline]``, ``[results]``).

At start, before taking any message, the worker checks that it sees the node's storage
(:func:`~dicom_ai.node.worker.check_storage`) and records itself in the job store; a mismatch
stops it with exit status 2 and a message naming the path. Then Celery's prefork pool starts
``--concurrency`` processes; each opens its own job-store pool, loads the model pipeline once
and runs tasks. A task (:data:`~dicom_ai.node.dispatch.TASK_NAME`) claims the job it names in
one job-store transaction and runs it exactly as the embedded worker does
(:func:`~dicom_ai.node.worker.run_claimed_job`: outbox, lease renewal, complete/fail/stale);
a job that is not claimable (done, cancelled, running elsewhere) is left alone. With
``workers.deliver_on_workers`` each pool process also runs a delivery thread (leased
deliveries, :mod:`~dicom_ai.node.delivery`).
"""

from __future__ import annotations

import os
import socket
import threading
import time

import celery.apps.worker as celery_worker_app
from celery.signals import worker_process_init

from dicom_ai.node import audit, logs
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.delivery import DeliveryAgent, DeliveryThread
from dicom_ai.node.dispatch import TASK_NAME, make_app
from dicom_ai.node.engines import open_jobstore
from dicom_ai.node.processing import load_pipeline
from dicom_ai.node.storage import PRIVATE_UMASK, is_storage_error
from dicom_ai.node.worker import (StorageTrouble, check_storage, lower_priority, run_claimed_job,
                                  worker_identity)

__all__ = ["run"]

#: Longest a task waits for an unreachable job store before it gives up its message (the
#: node announces the job again later), in seconds.
CLAIM_PATIENCE_SECONDS = 600.0


class _PoolProcess:
    """What one pool process keeps between tasks: its job store, pipeline and storage backoff."""

    def __init__(self, config: NodeConfig, name: str):
        self.config = config
        self.identity = worker_identity(name)
        # The images a job leaves out and the deliveries a worker makes are audited where they happen.
        audit.configure(config)
        self.store = open_jobstore(config)
        started = time.monotonic()
        notice = f"worker {name}@{socket.gethostname()}"
        try:
            self.pipeline = load_pipeline(config)
        except Exception as exc:
            # Its messages fail and the jobs stay queued (announced again later); status says why.
            try:
                self.store.set_notice(notice, f"the model pipeline cannot be loaded, this worker runs no job: "
                                              f"{type(exc).__name__}: {exc}")
            finally:
                self.store.close()
            raise
        self.store.set_notice(notice, None)
        self.trouble = StorageTrouble(self.store, config.layout.root, config.node.reserve_free_mb * 2**20)
        self.delivery = None
        if config.workers.deliver_on_workers:
            self.delivery = DeliveryThread(DeliveryAgent(config, self.store))
            self.delivery.start()
        logs.event("worker_started", worker=self.identity, factory=config.pipeline.factory or "bundles",
                   models=",".join(config.pipeline.models), device=config.pipeline.device,
                   load_seconds=round(time.monotonic() - started, 1),
                   delivers=config.workers.deliver_on_workers)

    def run(self, job_id: int) -> str:
        """Claim and run one job; returns ``ran``, or ``not_claimable``/``gave_up``."""
        waited = time.monotonic()
        while True:
            try:
                job = self.store.claim_job(job_id, worker=self.identity)
                break
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                if time.monotonic() - waited > CLAIM_PATIENCE_SECONDS:
                    logs.event("claim_gave_up", level="ERROR", job_id=job_id, error=f"{type(exc).__name__}: {exc}",
                               hint="the job stays queued; the node announces it again")
                    return "gave_up"
                self.trouble.failed(exc, "claim", job_id=job_id)
        self.trouble.succeeded()
        if job is None:
            logs.event("job_not_claimable", job_id=job_id, worker=self.identity,
                       rule="a repeated or redelivered message: the job is running elsewhere, done or cancelled")
            return "not_claimable"
        run_claimed_job(job, self.pipeline, self.config, self.store, self.trouble, lambda: False)
        return "ran"


class _WorkerHeartbeat:
    """Writes ``workers.seen`` for ``<name>@<host>`` every ``lease_seconds / 3`` from a pool process.

    In the pool processes (started after Celery's fork, so no job-store connection crosses a
    fork), before the pipeline loads: a worker whose models do not load still shows alive,
    with its notice. It stops when its Celery main process is gone (SIGKILLed: the pool
    process is an orphan that takes no new job), so ``status`` shows such a worker as lost
    once ``workers.lease_seconds`` have passed. A job store that cannot be reached is
    retried at the next beat.
    """

    def __init__(self, config: NodeConfig, worker: str):
        self.config, self.worker = config, worker
        self.interval = max(0.2, config.workers.lease_seconds / 3)
        self.parent = os.getppid()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        store = None
        failing = False
        while os.getppid() == self.parent:
            try:
                if store is None:
                    store = open_jobstore(self.config)
                store.worker_seen(self.worker)
                failing = False
            except Exception as exc:
                if not failing:
                    logs.event("worker_heartbeat_failed", level="WARNING", worker=self.worker,
                               error=f"{type(exc).__name__}: {exc}"[:300], hint="retried; status may show the "
                               "worker as lost until the job store is reachable again")
                failing = True
            time.sleep(self.interval)
        logs.event("worker_heartbeat_stopped", level="WARNING", worker=self.worker,
                   reason="the Celery main process is gone")


_process: _PoolProcess | None = None


def _pool_process(config: NodeConfig, name: str) -> _PoolProcess:
    global _process
    if _process is None:
        _process = _PoolProcess(config, name)
    return _process


def _quiet_celery_console() -> None:
    """Turn Celery's direct console messages ("worker: Warm shutdown (MainProcess)", written to
    the real stderr by ``celery.apps.worker.safe_say``, which no logging setting reaches) into
    JSON ``celery_console`` events, so the worker's output stays one JSON object per line."""
    if hasattr(celery_worker_app, "safe_say"):
        celery_worker_app.safe_say = lambda msg, f=None: logs.event("celery_console", message=str(msg).strip()[:300])


def run(config: NodeConfig, name: str = "worker", concurrency: int = 1, loglevel: str = "WARNING") -> int:
    """Run a Celery worker until SIGTERM (warm shutdown: the running jobs finish first).

    Parameters
    ----------
    config : NodeConfig
        The site's configuration; ``workers.broker_url`` and a PostgreSQL ``jobstore.url``
        are required.
    name : str
        This worker's name (``<name>@<host>`` in ``status`` and in Celery).
    concurrency : int
        Pool processes, each with its own pipeline: 1 per GPU.
    loglevel : str
        Celery's own log level (the worker's events go to the JSON log as everywhere).

    Returns
    -------
    int
        0 after a clean stop, 2 when the configuration or the storage check refuses to start.
    """
    os.umask(PRIVATE_UMASK)
    lower_priority(config.workers.nice)  # inherited by the pool processes
    host = socket.gethostname()
    store = open_jobstore(config)
    try:
        storage_id = check_storage(config, store)
        store.register_worker(f"{name}@{host}", host, os.getpid(), storage_id)
    finally:
        store.close()  # not across the fork: each pool process opens its own pool
    app = make_app(config)

    @app.task(name=TASK_NAME, ignore_result=True)
    def run_job(job_id: int) -> str:
        return _pool_process(config, name).run(int(job_id))

    def _init(**_):
        _WorkerHeartbeat(config, f"{name}@{host}").start()
        try:
            _pool_process(config, name)
        except Exception as exc:  # the first task retries, and its error is in the log
            logs.event("pipeline_load_failed", level="ERROR", error=f"{type(exc).__name__}: {exc}")

    worker_process_init.connect(_init, weak=False)
    logs.event("celery_worker_starting", worker=f"{name}@{host}", queue=config.workers.queue,
               concurrency=concurrency, storage_id=storage_id)
    _quiet_celery_console()
    # --quiet: no start-up banner on stdout (the worker's log is JSON lines; the same facts are
    # in celery_worker_starting above).
    app.worker_main(["--quiet", "worker", f"--loglevel={loglevel}", f"--concurrency={concurrency}", "--pool=prefork",
                     f"--hostname={name}@{host}", "-Q", config.workers.queue, "--prefetch-multiplier=1",
                     "--without-gossip", "--without-mingle", "--without-heartbeat"])
    return 0
