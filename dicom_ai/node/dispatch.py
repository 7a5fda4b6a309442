"""Jobs to inference workers on other hosts: Celery with a Redis broker, the job store as the truth.

The broker is a doorbell. A message carries one job id and nothing else; claiming, completing
and failing the job happen in job-store transactions (:mod:`~dicom_ai.node.jobstore`), so a
broker message that is lost, repeated or redelivered can neither lose nor duplicate a study's
results:

* Duplicate or redelivered message: the claim is a conditional UPDATE (``state = 'queued'``);
  the second delivery of a message finds the job running or done and returns, acknowledged.
* Lost message (Redis restarted without persistence, a worker host gone with its reserved
  message): the node's sweep (:meth:`Dispatcher.sweep`) announces again every job that is
  queued and unclaimed ``workers.requeue_seconds`` after its last announcement.
* Dead worker: its job's lease (``jobs.heartbeat``) stops being renewed; after
  ``workers.lease_seconds`` the sweep re-queues the job (an interruption, not a failure) and
  announces it, and another worker runs it with the same result UIDs. Its deliveries are
  made once (per-object sending/sent rows, :mod:`~dicom_ai.node.delivery`).

Celery settings (:func:`make_app`) and why:

``task_acks_late = True``
    The message is acknowledged when the task returns, not when it starts, so a message
    whose worker dies before finishing is not gone.
``worker_prefetch_multiplier = 1``
    A worker reserves no more messages than it runs (``--concurrency``, 1 per GPU): a
    busy GPU host does not sit on jobs an idle host could take.
``task_reject_on_worker_lost = True``
    When the pool process running a job dies (SIGKILL, OOM killer) its message goes back
    to the queue at once instead of being acknowledged as failed. The redelivered task finds
    the job still claimed (the lease is still fresh) and returns; the sweep brings the job
    back after the lease. Without this setting nothing is lost either (the sweep alone
    recovers the job); it only spares a broker round trip.
``broker_transport_options.visibility_timeout = workers.visibility_timeout_seconds`` (3600 s)
    Redis hands an unacknowledged message to another worker after this long. It must exceed
    the longest job, or a slow job's message would be run twice (harmless: the second claim
    fails, but it costs a worker slot). A dead host's message is not waited for: the lease
    recovers its job in ``lease_seconds``.
No result backend (``task_ignore_result``)
    Outcomes live in the job store, which ``dicom-ai status`` reads.
JSON serializer only
    A worker never unpickles what the broker hands it.
"""

from __future__ import annotations

import threading
import time

from celery import Celery

from dicom_ai.node import logs
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.jobstore import SqlJobStore

__all__ = ["TASK_NAME", "DispatchThread", "Dispatcher", "make_app"]

#: The Celery task name of "run this job" (its only argument: the job id).
TASK_NAME = "dicom_ai.run_job"


def make_app(config: NodeConfig) -> Celery:
    """The Celery application of a site (the same settings on the node and on every worker)."""
    w = config.workers
    app = Celery("dicom_ai", broker=w.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_ignore_result=True,
        task_default_queue=w.queue,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": w.visibility_timeout_seconds,
                                  "socket_connect_timeout": 5, "socket_timeout": 10},
        broker_connection_timeout=5,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits out a Redis restart
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
    )
    return app


class Dispatcher:
    """The node's side: re-queue jobs whose lease ran out, announce queued jobs to the workers.

    Parameters
    ----------
    config : NodeConfig
        ``[workers]``: broker URL, queue, lease and re-announcement times.
    store : SqlJobStore
        The shared job store.
    """

    def __init__(self, config: NodeConfig, store: SqlJobStore):
        self.config = config
        self.store = store
        self.app = make_app(config)
        self._next_reclaim = 0.0

    def sweep(self) -> int:
        """One pass: reclaim expired leases (every quarter lease), announce what is due; returns
        how many jobs were announced. A broker that cannot be reached raises after recording
        the announcements that were made (the supervisor backs off and calls again)."""
        w = self.config.workers
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + w.lease_seconds / 4
            reclaimed = self.store.reclaim_expired(w.lease_seconds, self.config.pipeline.max_job_interruptions)
            if reclaimed["jobs_requeued"] or reclaimed["jobs_failed"]:
                logs.event("jobs_reclaimed", level="WARNING", lease_seconds=w.lease_seconds, **reclaimed,
                           hint="a worker stopped renewing its lease (died, or lost the job store)")
        due = self.store.jobs_to_enqueue(w.requeue_seconds)
        announced: list[int] = []
        try:
            for job_id in due:
                self.app.send_task(TASK_NAME, args=[job_id], queue=w.queue, retry=False)
                announced.append(job_id)
        finally:
            self.store.mark_enqueued(announced)
        for job_id in announced:
            logs.event("job_announced", job_id=job_id, queue=w.queue)
        return len(announced)

    def close(self) -> None:
        self.app.close()


class DispatchThread(threading.Thread):
    """Runs :meth:`Dispatcher.sweep` every ``poll_seconds`` in a thread of its own, so a broker
    that is down (each send then waits up to its connection timeout) delays announcements only,
    never study assembly or the supervisor's watchdog; errors back off up to 10 s."""

    def __init__(self, dispatcher: Dispatcher, poll_seconds: float = 0.2):
        super().__init__(name="dispatch", daemon=True)
        self.dispatcher = dispatcher
        self.poll_seconds = poll_seconds
        self.stopping = threading.Event()

    def run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                self.dispatcher.sweep()
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    logs.event("dispatch_error", level="ERROR", error=f"{type(exc).__name__}: {exc}"[:500],
                               failures=failures, hint="jobs stay queued in the job store and are announced "
                               "when the broker (workers.broker_url) and the job store answer again")
                self.stopping.wait(min(10.0, self.poll_seconds * 2 ** failures))
                continue
            if failures:
                logs.event("dispatch_recovered", after_failures=failures)
                failures = 0
            self.stopping.wait(self.poll_seconds)
