"""Which ``dicom-ai worker`` processes are alive: their heartbeats against ``workers.lease_seconds``.

Each worker's pool processes write ``workers.seen`` every ``lease_seconds / 3``
(:class:`~dicom_ai.node.celery_worker._WorkerHeartbeat`). A worker whose last heartbeat is
older than ``workers.lease_seconds`` (on the job store's clock) is *lost*: killed, its host
down, or cut off from the job store; its running job is re-queued by the same rule
(:meth:`~dicom_ai.node.jobstore.SqlJobStore.reclaim_expired`). ``status``, the status page,
``/metrics`` (:class:`WorkerCollector`) and ``/readyz`` (:func:`no_live_worker`) all read it
from here.
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from dicom_ai.node.jobstore import SqlJobStore
from dicom_ai.node.metrics import REGISTRY
from dicom_ai.node.storage import is_storage_error

__all__ = ["describe_workers", "no_live_worker", "WorkerCollector"]


def describe_workers(workers: list[dict], lease_seconds: float) -> list[dict]:
    """``SqlJobStore.workers()`` rows with ``alive`` (bool) and ``state`` (``alive`` / ``lost``) added."""
    out = []
    for w in workers:
        alive = w["age"] <= lease_seconds
        out.append({**w, "alive": alive, "state": "alive" if alive else "lost"})
    return out


def no_live_worker(store: SqlJobStore, lease_seconds: float) -> str | None:
    """Why the node is not ready in distributed mode: jobs wait and no worker was seen within the
    lease; None when a worker is alive or nothing waits."""
    waiting = store.queued_jobs()
    if not waiting:
        return None
    workers = describe_workers(store.workers(), lease_seconds)
    if any(w["alive"] for w in workers):
        return None
    last = ("no worker has registered" if not workers else
            f"the last heartbeat of any worker was {min(w['age'] for w in workers):.0f} s ago")
    return (f"{waiting} job(s) waiting and no live worker within workers.lease_seconds = {lease_seconds:g} s "
            f"({last}): start `dicom-ai worker` (see its log) or check its host and the job store")


class WorkerCollector:
    """``dicom_ai_worker_*{worker}`` gauges at each scrape: last heartbeat, alive, current job."""

    def __init__(self, store: SqlJobStore, lease_seconds: float):
        self.store, self.lease_seconds = store, float(lease_seconds)

    def collect(self):
        try:
            workers = describe_workers(self.store.workers(), self.lease_seconds)
        except Exception as exc:
            if is_storage_error(exc) or type(exc).__module__.startswith(("sqlite3", "psycopg")):
                return  # the job store is down: /readyz says so
            raise
        seen = GaugeMetricFamily("dicom_ai_worker_last_heartbeat_timestamp_seconds",
                                 "POSIX time of each worker's last heartbeat (job store clock)", labels=["worker"])
        age = GaugeMetricFamily("dicom_ai_worker_heartbeat_age_seconds", "Seconds since each worker's last "
                                "heartbeat", labels=["worker"])
        alive = GaugeMetricFamily("dicom_ai_worker_alive", "1 while a worker's last heartbeat is within "
                                  "workers.lease_seconds, 0 once it is lost", labels=["worker"])
        job = GaugeMetricFamily("dicom_ai_worker_current_job", "Id of the job a worker runs now (0: idle)",
                                labels=["worker"])
        for w in workers:
            seen.add_metric([w["name"]], float(w["seen"]))
            age.add_metric([w["name"]], float(w["age"]))
            alive.add_metric([w["name"]], 1.0 if w["alive"] else 0.0)
            job.add_metric([w["name"]], float(w["jobs"][0]) if w["jobs"] else 0.0)
        yield from (seen, age, alive, job)


_watched: WorkerCollector | None = None


def watch_workers(store: SqlJobStore | None, lease_seconds: float = 0.0) -> None:
    """Report ``store``'s workers in the node's metrics (replacing an earlier call; None: stop)."""
    global _watched
    if _watched is not None:
        REGISTRY.unregister(_watched)
        _watched = None
    if store is not None:
        _watched = WorkerCollector(store, lease_seconds)
        REGISTRY.register(_watched)
