"""Prometheus metrics of the node (prometheus-client), served at ``/metrics`` by :mod:`~dicom_ai.node.http_server`.

The node has two processes. What happens in the receiving process (associations, C-STOREs,
deliveries, worker restarts) is counted there, in :data:`REGISTRY`. The worker process is not
instrumented itself (no prometheus-client multiprocess mode, no shared files): what it does
reaches the metrics **through the job store**, which it already writes durably. At each
scrape :class:`JobStoreCollector` reads the store read-only and reports studies, jobs and
deliveries by state, the queue and the age of its oldest job, job durations
(``created`` -> ``updated`` of each finished job, i.e. queue wait plus processing) and each
model's inference time per image (``jobs.model_seconds``, written by the worker). So the
worker's figures survive worker restarts, and counters kept in the receiving process start
from 0 at each node start (Prometheus' ``rate()`` handles such resets).

Labels carry AE titles, states, status codes and refusal reasons only: never a UID or any
value of a data set.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from dicom_ai.node.jobstore import JobStore, SqlJobStore, left_out_images
from dicom_ai.node.storage import is_storage_error

__all__ = ["REGISTRY", "JobStoreCollector", "watch_store"]

#: The node's registry (not prometheus-client's global one, so library users are unaffected).
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

ASSOCIATIONS = Counter("dicom_ai_associations_total", "Associations offered to the SCP, by outcome "
                       "(accepted, rejected by pynetdicom's negotiation, refused by the node's policy, aborted, released)",
                       ["outcome"], registry=REGISTRY)
CONNECTIONS_REFUSED = Counter("dicom_ai_connections_refused_total", "Connections refused by the node's "
                              "connection policy (transport.py), by reason", ["reason"], registry=REGISTRY)
INSTANCES_RECEIVED = Counter("dicom_ai_instances_received_total", "Instances stored in the spool (C-STORE Success, "
                             "duplicates not counted)", registry=REGISTRY)
BYTES_RECEIVED = Counter("dicom_ai_received_bytes_total", "Bytes of the instances stored in the spool",
                         registry=REGISTRY)
C_STORE_STATUS = Counter("dicom_ai_c_store_responses_total", "C-STORE responses sent by the SCP, by status code",
                         ["status"], registry=REGISTRY)
OBJECTS_SENT = Counter("dicom_ai_objects_sent_total", "Result objects acknowledged by a destination",
                       ["destination"], registry=REGISTRY)
DELIVERY_ATTEMPTS_FAILED = Counter("dicom_ai_delivery_attempts_failed_total", "Failed delivery attempts "
                                   "(each is retried until retry.max_attempts)", ["destination"], registry=REGISTRY)
WORKER_RESTARTS = Counter("dicom_ai_worker_restarts_total", "Worker processes that exited and were restarted",
                          registry=REGISTRY)
RECEIVE_SECONDS = Histogram("dicom_ai_c_store_seconds", "Seconds from the end of a C-STORE's data to its response "
                            "(admission, fsync, job store)", registry=REGISTRY,
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

_JOB_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# One model on one image: tens of milliseconds on a GPU to a minute on a CPU.
_INFERENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class JobStoreCollector:
    """Reads the job store (read-only SQL) and the storage's free space at each scrape.

    Parameters
    ----------
    db : Path
        The job store (``<storage>/jobs.sqlite``).
    storage : Path
        The storage folder whose free space is reported.
    reserve_bytes : int
        ``node.reserve_free_mb`` in bytes.
    """

    def __init__(self, db: Path | SqlJobStore, storage: Path, reserve_bytes: int):
        # A path: the SQLite file, read on a read-only connection of its own; a store
        # (PostgreSQL): its pool.
        self.db = db if isinstance(db, SqlJobStore) and not isinstance(db, JobStore) else \
            Path(db.path if isinstance(db, JobStore) else db)
        self.storage, self.reserve_bytes = Path(storage), int(reserve_bytes)

    def _rows(self, sql: str) -> list[tuple]:
        if isinstance(self.db, SqlJobStore):
            return [tuple(r.values()) for r in self.db.rows(sql)]
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=2)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def collect(self):
        free = GaugeMetricFamily("dicom_ai_storage_free_bytes", "Free bytes on the storage file system")
        reserve = GaugeMetricFamily("dicom_ai_storage_reserve_bytes", "node.reserve_free_mb in bytes: below it "
                                    "C-STOREs are answered Out of Resources")
        try:
            free.add_metric([], shutil.disk_usage(self.storage).free)
        except OSError:
            pass
        reserve.add_metric([], self.reserve_bytes)
        yield free
        yield reserve
        try:
            studies = self._rows("SELECT state, COUNT(*) FROM studies GROUP BY state")
            jobs = self._rows("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            oldest = self._rows("SELECT MIN(created) FROM jobs WHERE state = 'queued'")[0][0]
            deliveries = self._rows("SELECT ae_title, state, COUNT(*) FROM deliveries GROUP BY ae_title, state")
            durations = [r[0] for r in self._rows("SELECT updated - created FROM jobs WHERE state = 'done'")]
            model_seconds = [r[0] for r in self._rows("SELECT model_seconds FROM jobs WHERE state IN "
                                                      "('done', 'superseded') AND model_seconds IS NOT NULL")]
            job_notes = [r[0] for r in self._rows("SELECT error FROM jobs WHERE state IN ('done', 'superseded') "
                                                  "AND error IS NOT NULL")]
            versions = self._rows("SELECT models, COUNT(*) FROM jobs WHERE state IN ('done', 'superseded') "
                                  "AND models IS NOT NULL GROUP BY models")
        except Exception as exc:
            if isinstance(exc, sqlite3.Error) or is_storage_error(exc):
                return  # no store yet, locked for longer than 2 s, PostgreSQL down: /readyz says so
            raise
        g = GaugeMetricFamily("dicom_ai_studies", "Studies in the job store, by state", labels=["state"])
        for state, n in studies:
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily("dicom_ai_jobs", "Jobs in the job store, by state", labels=["state"])
        for state, n in jobs:
            g.add_metric([state], n)
        yield g
        queued = dict(jobs).get("queued", 0)
        g = GaugeMetricFamily("dicom_ai_queue_length", "Jobs waiting for the worker")
        g.add_metric([], queued)
        yield g
        g = GaugeMetricFamily("dicom_ai_queue_oldest_age_seconds", "Age of the oldest queued job (0: none)")
        g.add_metric([], max(0.0, time.time() - oldest) if oldest else 0.0)
        yield g
        g = GaugeMetricFamily("dicom_ai_deliveries", "Deliveries in the job store, by destination and state",
                              labels=["destination", "state"])
        for ae, state, n in deliveries:
            g.add_metric([ae, state], n)
        yield g
        left_out: dict[str, int] = {}
        for text in job_notes:
            for _, reason in left_out_images(text):
                left_out[reason] = left_out.get(reason, 0) + 1
        g = GaugeMetricFamily("dicom_ai_images_left_out", "Images left out of finished jobs, by reason (the job's "
                              "note and `dicom-ai status` name each; jobs still in the job store)", labels=["reason"])
        for reason, n in sorted(left_out.items()):
            g.add_metric([reason], n)
        yield g
        buckets, total = [], 0.0
        for bound in _JOB_BUCKETS:
            buckets.append((str(float(bound)), sum(d <= bound for d in durations)))
        buckets.append(("+Inf", len(durations)))
        total = float(sum(durations))
        h = HistogramMetricFamily("dicom_ai_job_duration_seconds", "Finished jobs, seconds from queued to done "
                                  "(jobs still in the job store: until retention purges them)")
        h.add_metric([], buckets, total)
        yield h
        per_model: dict[str, list[float]] = {}
        for text in model_seconds:
            try:
                for model, seconds in json.loads(text).items():
                    per_model.setdefault(str(model), []).extend(float(s) for s in seconds)
            except (ValueError, TypeError, AttributeError):
                continue  # a row written by something else: not this metric's business
        h = HistogramMetricFamily("dicom_ai_inference_seconds", "Wall seconds of one model on one image, from "
                                  "the worker (finished jobs still in the job store)", labels=["model"])
        for model, values in sorted(per_model.items()):
            buckets = [(str(float(b)), sum(v <= b for v in values)) for b in _INFERENCE_BUCKETS]
            buckets.append(("+Inf", len(values)))
            h.add_metric([model], buckets, float(sum(values)))
        yield h
        by_version: dict[tuple[str, str], int] = {}
        for text, n in versions:
            try:
                for model, version in json.loads(text).items():
                    key = (str(model), str(version))
                    by_version[key] = by_version.get(key, 0) + int(n)
            except (ValueError, TypeError, AttributeError):
                continue
        g = GaugeMetricFamily("dicom_ai_jobs_by_model_version", "Finished jobs still in the job store, by the "
                              "model versions that made their results (version@operating point)",
                              labels=["model", "version"])
        for (model, version), n in sorted(by_version.items()):
            g.add_metric([model, version], n)
        yield g


_watched: JobStoreCollector | None = None


def watch_store(db: Path | SqlJobStore, storage: Path, reserve_bytes: int) -> None:
    """Report this job store and storage in :data:`REGISTRY` (replacing an earlier one)."""
    global _watched
    if _watched is not None:
        REGISTRY.unregister(_watched)
    _watched = JobStoreCollector(db, storage, reserve_bytes)
    REGISTRY.register(_watched)
