"""The durable job store: instances, studies, jobs, result outbox and deliveries.

One interface (:class:`SqlJobStore`), two engines: :class:`JobStore`, SQLite in WAL mode in
the storage folder (the embedded default: nothing else runs), and
:class:`~dicom_ai.node.jobstore_postgres.PostgresJobStore` (psycopg 3 with a connection pool)
for a site whose workers run on other hosts. ``[jobstore] url`` picks one
(:func:`dicom_ai.node.engines.open_jobstore`). The SQL is shared: ``?`` placeholders, ``INSERT ... ON CONFLICT``,
``RETURNING``; each engine supplies its transactions, its row locks and its schema.

States::

    study     open -> closed        (a job covers every instance; a late instance re-opens it)
    job       queued -> running -> done | failed        queued -> cancelled (late instance
              before the worker started it); done jobs whose study got a newer job end as
              superseded (no deliveries are made for them)
    delivery  pending -> done | failed | superseded
    object    (per delivery) sending -> sent   "sending" is written before each C-STORE and
              replaced by "sent" when the destination acknowledged it, so an object with a
              "sending" row and no "sent" row is *in doubt* (the node stopped, or the store
              could not be written, between the C-STORE and its record)

Two counters per job: ``failures``, the job itself raised (limited by
``pipeline.max_job_attempts``), and ``interruptions``, the worker or the node stopped while
the job ran (limited by ``pipeline.max_job_interruptions``, default
:data:`MAX_JOB_INTERRUPTIONS`, which is larger: a SIGKILL, a restart
or a power cut is not the study's fault, but a study that takes its worker down every time
must not loop for ever). ``attempts`` counts the runs started, for ``status``.

Claims and leases. A worker claims a job with one conditional UPDATE (``state = 'queued'``;
PostgreSQL picks the row with ``FOR UPDATE SKIP LOCKED``), under a fresh claim token, and
records who it is (``jobs.worker``: name, host, pid). While it runs the job it renews
``jobs.heartbeat``; a job whose heartbeat is older than ``workers.lease_seconds`` belongs to a
worker that died or lost the store, and :meth:`SqlJobStore.reclaim_expired` queues it again
(an interruption). Completing, failing or releasing a job checks the claim token in the same
transaction, so a worker that lost its claim records nothing. A delivery is leased the same
way (:meth:`SqlJobStore.claim_delivery`) before each attempt, so any number of delivery
processes (the node, workers) never send the same object at the same time.

Every write is one transaction. SQLite: ``BEGIN IMMEDIATE`` (one writer at a time) with
``synchronous=FULL``, so a committed row survives power loss. PostgreSQL: READ COMMITTED
with the rows that decide an outcome locked first, study before job (``SELECT ... FOR
UPDATE``), so two processes never both act on one study or one job.

Schema versions: :data:`SCHEMA_VERSION`. SQLite keeps it in ``PRAGMA user_version`` and
upgrades an older file in one transaction (tables and columns added); opening a current
database only reads, so a node whose disk is full can still start. PostgreSQL keeps it in
``meta`` and applies its numbered migrations (``jobstore_postgres._MIGRATIONS``) under an
advisory lock, so the node and workers starting together migrate once. A store newer than
this version is refused (:class:`~dicom_ai.core.errors.JobStoreError`).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dicom_ai.core.errors import JobStoreError, StorageIdentityError

#: The four standard screening views (laterality, view).
STANDARD_VIEWS = frozenset({("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")})

#: The schema version. 1: the first schema (never written, read as 0); 2: ``jobs.failures``,
#: ``jobs.interruptions`` and the ``sending`` table; 3: ``jobs.model_seconds`` (JSON: model
#: name -> seconds per image); 4: ``jobs.worker``, ``jobs.heartbeat``, ``jobs.enqueued``,
#: ``deliveries.lease_owner``, ``deliveries.lease_until``, the ``meta`` and ``workers`` tables
#: (the first PostgreSQL schema); 5: ``jobs.models`` (JSON: model name -> version [@ operating
#: point] of the models that produced the job's results).
SCHEMA_VERSION = 5

#: Default of ``pipeline.max_job_interruptions``: interruptions (the worker died under a running
#: node while the job ran) before a job is marked failed. Far larger than
#: ``pipeline.max_job_attempts`` on purpose: kills are rarely the job's fault (decoding is
#: sandboxed, image size capped; a crash storm of 15 worker kills can all land on one job whose
#: worker never gets to finish it), but a study that kills its worker every time (a crash the
#: sandbox did not contain, the kernel's OOM killer) must end as failed rather than loop for ever.
MAX_JOB_INTERRUPTIONS = 50

#: Seconds a delivery attempt holds its lease (renewed with every object it starts to send).
DELIVERY_LEASE_SECONDS = 120.0

#: How a finished job's note (``jobs.error``) names an image it left out: ``image <SOP Instance
#: UID> skipped (<reason>): <why>`` (processing.skipped_note) or the result writers' ``image
#: <uid> left out of the results: <why>``; :func:`left_out_images` reads them back.
_LEFT_OUT_NOTE = re.compile(r"image ([0-9.]+) (?:skipped \(([a-z_]+)\)|left out of the (results))")


def left_out_images(note: str | None) -> list[tuple[str, str]]:
    """(SOP Instance UID, reason) of each image a job's note names as left out; reason
    ``results`` for one whose result objects could not be built."""
    return [(uid, reason or results) for uid, reason, results in _LEFT_OUT_NOTE.findall(note or "")]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    state TEXT NOT NULL,
    last_received REAL NOT NULL,
    UNIQUE (study_uid, calling_ae)
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    laterality TEXT NOT NULL,
    view TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_id);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    state TEXT NOT NULL,
    instance_uids TEXT NOT NULL,
    result_uids TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    interruptions INTEGER NOT NULL DEFAULT 0,
    claim_token TEXT,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS outbox (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (job_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    ae_title TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries (state, next_attempt);
CREATE TABLE IF NOT EXISTS notices (
    key TEXT PRIMARY KEY,
    message TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sent (
    delivery_id INTEGER NOT NULL REFERENCES deliveries(id),
    sop_instance_uid TEXT NOT NULL,
    sent REAL NOT NULL,
    PRIMARY KEY (delivery_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS sending (
    delivery_id INTEGER NOT NULL REFERENCES deliveries(id),
    sop_instance_uid TEXT NOT NULL,
    started REAL NOT NULL,
    PRIMARY KEY (delivery_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    storage_id TEXT NOT NULL,
    started REAL NOT NULL,
    seen REAL NOT NULL
);
"""

# Columns added after the first schema: (table, column, definition).
_ADDED_COLUMNS = [
    ("jobs", "failures", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "interruptions", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "model_seconds", "TEXT"),
    ("jobs", "worker", "TEXT"),
    ("jobs", "heartbeat", "REAL"),
    ("jobs", "enqueued", "REAL"),
    ("deliveries", "lease_owner", "TEXT"),
    ("deliveries", "lease_until", "REAL"),
    ("jobs", "models", "TEXT"),
]


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    laterality: str
    view: str
    path: str


@dataclass(frozen=True)
class Job:
    id: int
    study_id: int
    study_uid: str
    calling_ae: str
    instances: list[Instance]
    result_uids: str
    attempts: int
    claim_token: str
    #: Earlier jobs of the same study that produced (or may produce) results: 0 for the
    #: first, 1 for the first superseding job, ...
    revision: int = 0


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int
    ae_title: str
    host: str
    port: int
    attempts: int
    #: (sop_instance_uid, sop_class_uid, path) of outbox objects not yet acknowledged.
    pending: list[tuple[str, str, str]]
    #: SOP Instance UIDs of ``pending`` objects whose C-STORE was started (a "sending" row)
    #: but never recorded as acknowledged: the destination may or may not hold them.
    in_doubt: frozenset[str] = frozenset()


class _Duplicate(Exception):
    """Raised inside a write to roll it back: the instance was recorded meanwhile."""


class SqlJobStore:
    """The job store's operations, in SQL both engines run; safe from several threads and processes.

    Subclasses provide :meth:`_write` (one transaction, yielding an object with
    ``execute(sql, params)`` and ``executemany``), :meth:`_read`, :attr:`FOR_UPDATE` (the
    row-lock suffix of a SELECT) and :meth:`close`.
    """

    #: Appended to the SELECTs that read the rows a write decides on (PostgreSQL row locks;
    #: empty for SQLite, whose BEGIN IMMEDIATE already serialises writers).
    FOR_UPDATE = ""
    #: ``FOR UPDATE SKIP LOCKED`` for the pick of the next queued job (PostgreSQL).
    SKIP_LOCKED = ""
    #: What ``status`` calls the engine.
    engine = "?"

    @contextmanager
    def _write(self) -> Iterator:  # pragma: no cover - every engine overrides it
        raise NotImplementedError
        yield

    @contextmanager
    def _read(self) -> Iterator:  # pragma: no cover - every engine overrides it
        raise NotImplementedError
        yield

    def close(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def _clock(self, db) -> float:
        """The time leases are written and compared in, epoch seconds: this host's clock for
        SQLite (one host); the database server's for PostgreSQL, so the hosts' clock skew
        cannot make a lease look expired while its holder still works."""
        return time.time()

    def rows(self, sql: str, params: Sequence = ()) -> list[dict]:
        """Rows of a read-only query as dicts (for metrics and tests)."""
        with self._read() as db:
            return [dict(r) for r in db.execute(sql, tuple(params)).fetchall()]

    def writable(self) -> bool:
        """Whether a write transaction can be opened now (``/readyz``)."""
        try:
            with self._write() as db:
                db.execute("SELECT 1 AS one")
            return True
        except Exception:
            return False

    # -- storage identity and workers ----------------------------------------------------

    def bind_storage(self, storage_id: str) -> None:
        """Record the storage's identity (the node, at start); refuse a store bound to another storage.

        Raises
        ------
        StorageIdentityError
            The job store already belongs to a storage with another identity.
        """
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'storage_id'" + self.FOR_UPDATE).fetchone()
            if row is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('storage_id', ?)", (storage_id,))
            elif row["value"] != storage_id:
                raise StorageIdentityError(
                    f"this job store belongs to the storage with id {row['value']}, but the storage folder holds "
                    f"id {storage_id}: node.storage must be the shared storage the job store was first used with "
                    "(or give this node its own [jobstore] url)")

    def storage_id(self) -> str | None:
        """The storage identity the node recorded, or None before the node first started."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'storage_id'").fetchone()
        return row["value"] if row else None

    def register_worker(self, name: str, host: str, pid: int, storage_id: str) -> None:
        """Record a worker that checked the storage identity and starts taking jobs (``status``)."""
        now = time.time()
        with self._write() as db:
            db.execute("INSERT INTO workers (name, host, pid, storage_id, started, seen) VALUES (?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
                       "storage_id = excluded.storage_id, started = excluded.started, seen = excluded.seen",
                       (name, host, pid, storage_id, now, now))

    def worker_seen(self, name: str, now: float | None = None) -> None:
        """A registered worker's heartbeat: ``workers.seen`` = now (POSIX seconds, the job store's clock)."""
        with self._write() as db:
            db.execute("UPDATE workers SET seen = ? WHERE name = ?", (self._clock(db) if now is None else now, name))

    def workers(self) -> list[dict]:
        """The registered workers' rows, each with ``jobs`` (the ids of the jobs it runs now) and
        ``age`` (seconds since its last heartbeat, on the job store's clock: hosts' clocks may differ)."""
        with self._read() as db:
            now = self._clock(db)
            workers = [dict(r) for r in db.execute("SELECT * FROM workers ORDER BY name").fetchall()]
            running = db.execute("SELECT id, worker FROM jobs WHERE state = 'running' ORDER BY id").fetchall()
        for w in workers:  # jobs.worker is "<name>@<host> pid <pid>" of the pool process
            w["jobs"] = [r["id"] for r in running if (r["worker"] or "").startswith(f"{w['name']} pid ")]
            w["age"] = max(0.0, now - w["seen"])
        return workers

    def queued_jobs(self) -> int:
        """How many jobs wait for a worker."""
        with self._read() as db:
            return int(db.execute("SELECT COUNT(*) AS n FROM jobs WHERE state = 'queued'").fetchone()["n"])

    # -- receiving -----------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """The spool path of an already recorded instance, or None."""
        with self._read() as db:
            row = db.execute("SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
        return row["path"] if row else None

    def record_instance(self, *, study_uid: str, calling_ae: str, instance: Instance, size: int,
                        now: float | None = None) -> bool:
        """Record a received instance; returns False when the SOP Instance UID was already known.

        A new instance (re-)opens its study and cancels a job of that study that no worker has
        started yet, since that job no longer covers the whole study.

        Parameters
        ----------
        study_uid : str
            The instance's Study Instance UID.
        calling_ae : str
            The AE title that sent it; a study is kept per sender, whose results it gets.
        instance : Instance
            What was received and where it is in the spool.
        size : int
            Its size in bytes, for ``status``.
        now : float or None
            The time of receipt (``time.time()`` when None; tests pass their own clock).
        """
        now = time.time() if now is None else now
        try:
            with self._write() as db:
                if db.execute("SELECT 1 AS known FROM instances WHERE sop_instance_uid = ?",
                              (instance.sop_instance_uid,)).fetchone():
                    return False
                # The upsert locks the study row (PostgreSQL), so assembly and completion of
                # this study wait for this transaction.
                study_id = db.execute(
                    "INSERT INTO studies (study_uid, calling_ae, state, last_received) VALUES (?, ?, 'open', ?) "
                    "ON CONFLICT (study_uid, calling_ae) DO UPDATE SET state = 'open', last_received = ? "
                    "RETURNING id", (study_uid, calling_ae, now, now)).fetchone()["id"]
                inserted = db.execute(
                    "INSERT INTO instances (sop_instance_uid, study_id, sop_class_uid, transfer_syntax, laterality, "
                    "view, path, size, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (sop_instance_uid) DO NOTHING",
                    (instance.sop_instance_uid, study_id, instance.sop_class_uid, instance.transfer_syntax,
                     instance.laterality, instance.view, instance.path, size, now)).rowcount
                if not inserted:  # a concurrent association recorded it first: undo the re-open
                    raise _Duplicate
                db.execute("UPDATE jobs SET state = 'cancelled', error = 'a later instance arrived before processing "
                           "started', updated = ? WHERE study_id = ? AND state = 'queued'", (now, study_id))
        except _Duplicate:
            return False
        return True

    # -- study assembly ------------------------------------------------------------------

    def close_ready_studies(self, grace_seconds: float, idle_seconds: float,
                            make_result_uids: Callable[[list[str]], str], now: float | None = None) -> list[int]:
        """Turn every complete open study into a queued job; returns the new job ids.

        Pending deliveries of earlier jobs of the study are superseded by the new job.

        Parameters
        ----------
        grace_seconds : float
            A study with the four standard views is complete once nothing arrived for this long.
        idle_seconds : float
            Any other open study is complete once nothing arrived for this long.
        make_result_uids : callable
            Gets the study's SOP Instance UIDs and returns the JSON of the result UIDs, fixed
            here for the job's life.
        now : float or None
            The current time (``time.time()`` when None; tests pass their own clock).
        """
        now = time.time() if now is None else now
        with self._read() as db:
            candidates = [dict(r) for r in db.execute(
                "SELECT id, last_received FROM studies WHERE state = 'open' AND last_received <= ?",
                (now - min(grace_seconds, idle_seconds),)).fetchall()]
        created = []
        for study in candidates:
            with self._read() as db:
                rows = [dict(r) for r in db.execute(
                    "SELECT sop_instance_uid, laterality, view FROM instances WHERE study_id = ? "
                    "ORDER BY received, sop_instance_uid", (study["id"],)).fetchall()]
            views = {(r["laterality"], r["view"]) for r in rows}
            quiet = now - study["last_received"]
            if not (quiet >= idle_seconds or (STANDARD_VIEWS <= views and quiet >= grace_seconds)):
                continue
            uids = [r["sop_instance_uid"] for r in rows]
            result_uids = make_result_uids(uids)
            with self._write() as db:
                # Re-check inside the transaction: an instance may have arrived meanwhile.
                cur = db.execute("SELECT state, last_received FROM studies WHERE id = ?" + self.FOR_UPDATE,
                                 (study["id"],)).fetchone()
                if cur["state"] != "open" or cur["last_received"] != study["last_received"]:
                    continue
                db.execute("UPDATE studies SET state = 'closed' WHERE id = ?", (study["id"],))
                db.execute("UPDATE deliveries SET state = 'superseded', error = 'a newer job covers the study', "
                           "updated = ? WHERE state = 'pending' AND job_id IN (SELECT id FROM jobs WHERE study_id = ?)",
                           (now, study["id"]))
                job_id = db.execute("INSERT INTO jobs (study_id, state, instance_uids, result_uids, created, updated) "
                                    "VALUES (?, 'queued', ?, ?, ?, ?) RETURNING id",
                                    (study["id"], json.dumps(uids), result_uids, now, now)).fetchone()["id"]
            created.append(int(job_id))
        return created

    # -- jobs (worker side) ----------------------------------------------------------------

    def job_waiting(self) -> bool:
        """Whether a job is queued (a read: no write lock, unlike :meth:`claim_job`), so an idle
        worker can look often without taking the lock the receiving node writes under."""
        with self._read() as db:
            return db.execute("SELECT 1 AS queued FROM jobs WHERE state = 'queued' LIMIT 1").fetchone() is not None

    def claim_job(self, job_id: int | None = None, worker: str = "") -> Job | None:
        """Take a queued job (``job_id``, or the oldest) and mark it running under a fresh claim token.

        Parameters
        ----------
        job_id : int or None
            The job a broker message names; None takes the oldest queued job. A job that is
            not queued (done, running under another claim, cancelled) is not taken: None.
        worker : str
            Who runs it (``name host pid``), kept in ``jobs.worker`` for ``status``.
        """
        token = uuid.uuid4().hex
        with self._write() as db:
            now = self._clock(db)
            if job_id is None:
                row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1" + self.SKIP_LOCKED
                                 ).fetchone()
                if row is None:
                    return None
                job_id = row["id"]
            claimed = db.execute("UPDATE jobs SET state = 'running', claim_token = ?, attempts = attempts + 1, "
                                 "updated = ?, heartbeat = ?, worker = ? WHERE id = ? AND state = 'queued'",
                                 (token, now, now, worker or None, job_id)).rowcount
            if not claimed:
                return None
            # Read inside the transaction: a read that fails undoes the claim, rather than
            # leaving a job running that no worker knows it holds.
            return self._job(db, job_id)

    def job(self, job_id: int) -> Job:
        with self._read() as db:
            return self._job(db, job_id)

    def _job(self, db, job_id: int) -> Job:
        row = db.execute("SELECT j.*, s.study_uid, s.calling_ae FROM jobs j JOIN studies s ON s.id = j.study_id "
                         "WHERE j.id = ?", (job_id,)).fetchone()
        uids = json.loads(row["instance_uids"])
        by_uid = {r["sop_instance_uid"]: r for r in db.execute(
            f"SELECT * FROM instances WHERE sop_instance_uid IN ({','.join('?' * len(uids))})", tuple(uids)).fetchall()
        } if uids else {}
        instances = [Instance(u, by_uid[u]["sop_class_uid"], by_uid[u]["transfer_syntax"], by_uid[u]["laterality"],
                              by_uid[u]["view"], by_uid[u]["path"]) for u in uids]
        revision = db.execute("SELECT COUNT(*) AS n FROM jobs WHERE study_id = ? AND id < ? AND state != 'cancelled'",
                              (row["study_id"], job_id)).fetchone()["n"]
        return Job(id=row["id"], study_id=row["study_id"], study_uid=row["study_uid"], calling_ae=row["calling_ae"],
                   instances=instances, result_uids=row["result_uids"], attempts=row["attempts"],
                   claim_token=row["claim_token"] or "", revision=int(revision))

    def heartbeat(self, job: Job) -> bool:
        """Renew a running job's lease; False when the claim is lost (reclaimed, or the job was reset)."""
        with self._write() as db:
            return db.execute("UPDATE jobs SET heartbeat = ? WHERE id = ? AND state = 'running' AND claim_token = ?",
                              (self._clock(db), job.id, job.claim_token)).rowcount == 1

    def _claimed(self, db, job: Job) -> dict | None:
        """Lock the job's study and the job (in that order); the job row, or None when the claim is lost."""
        db.execute("SELECT id FROM studies WHERE id = ?" + self.FOR_UPDATE, (job.study_id,)).fetchone()
        row = db.execute("SELECT state, claim_token, failures FROM jobs WHERE id = ?" + self.FOR_UPDATE,
                         (job.id,)).fetchone()
        if row is None or row["state"] != "running" or row["claim_token"] != job.claim_token:
            return None
        return row

    def complete_job(self, job: Job, outputs: Sequence[tuple[str, str, str]],
                     destinations: Sequence[tuple[str, str, int]], note: str | None = None,
                     model_seconds: dict[str, list[float]] | None = None, models: dict[str, str] | None = None) -> str:
        """Record the job's outbox objects and queue one delivery per destination, atomically.

        Parameters
        ----------
        job : Job
            The job as claimed (its claim token must still be current).
        outputs : sequence of (sop_instance_uid, sop_class_uid, path)
            The result objects, already durable in the outbox.
        destinations : sequence of (ae_title, host, port)
            Where the results go.
        note : str or None
            Kept in the job's error column for ``status`` (e.g. images skipped).
        model_seconds : dict or None
            Inference wall time per model name, one value per image, in seconds (for the
            node's metrics).
        models : dict or None
            Model name -> version (``@operating point`` appended when there is one) of the
            models that produced the results (``status``, the status page, metrics).

        Returns
        -------
        str
            The job's final state: ``done``, ``superseded`` (a newer job of the study exists;
            nothing is queued), or ``stale`` (the claim was lost, e.g. after a node restart).
        """
        now = time.time()
        with self._write() as db:
            if self._claimed(db, job) is None:
                return "stale"
            newer = db.execute("SELECT 1 AS newer FROM jobs WHERE study_id = ? AND id > ? AND state != 'cancelled'",
                               (job.study_id, job.id)).fetchone()
            state = "superseded" if newer else "done"
            db.executemany("INSERT INTO outbox (job_id, sop_instance_uid, sop_class_uid, path) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (job_id, sop_instance_uid) DO UPDATE SET sop_class_uid = excluded.sop_class_uid, "
                           "path = excluded.path", [(job.id, uid, cls, path) for uid, cls, path in outputs])
            db.execute("UPDATE jobs SET state = ?, error = ?, updated = ?, model_seconds = ?, models = ? WHERE id = ?",
                       (state, note, now, json.dumps(model_seconds) if model_seconds else None,
                        json.dumps(models, sort_keys=True) if models else None, job.id))
            if state == "done":
                db.executemany("INSERT INTO deliveries (job_id, ae_title, host, port, state, next_attempt, created, "
                               "updated) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
                               [(job.id, ae, host, port, now, now, now) for ae, host, port in destinations])
        return state

    def replace_job_note(self, job: Job, note: str | None, replaces: str) -> bool:
        """Replace a finished job's note (``jobs.error``) ``replaces`` by ``note``, e.g. once the
        worker has written the previews that the note said were not written yet.

        Only a job still ``done`` or ``superseded`` whose note is still ``replaces`` is changed
        (not one re-queued by ``dicom-ai retry`` or re-run since); returns whether it was.
        """
        with self._write() as db:
            return db.execute("UPDATE jobs SET error = ? WHERE id = ? AND state IN ('done', 'superseded') "
                              "AND error = ?", (note, job.id, replaces)).rowcount == 1

    def fail_job(self, job: Job, error: str, max_attempts: int) -> str:
        """Record a failure of the job itself (it raised): re-queue it, or mark it failed after ``max_attempts``.

        Parameters
        ----------
        job : Job
            The job as claimed; a lost claim leaves it alone and returns ``stale``.
        error : str
            Why it failed, for ``status`` (first 2000 characters kept).
        max_attempts : int
            Failures of the job itself allowed before it is ``failed`` rather than ``queued``
            again (``pipeline.max_job_attempts``); interruptions are counted by :meth:`recover`.
        """
        now = time.time()
        with self._write() as db:
            row = self._claimed(db, job)
            if row is None:
                return "stale"
            failures = row["failures"] + 1
            state = "failed" if failures >= max_attempts else "queued"
            db.execute("UPDATE jobs SET state = ?, failures = ?, error = ?, updated = ?, enqueued = NULL WHERE id = ?",
                       (state, failures, error[:2000], now, job.id))
        return state

    def release_job(self, job: Job, reason: str) -> str:
        """Put a claimed job back in the queue without counting anything against it.

        For a job that could not run for a reason outside it (the disk is full, the job store
        cannot be written); returns ``queued``, or ``stale`` when the claim was lost.

        Parameters
        ----------
        job : Job
            The job as claimed.
        reason : str
            Why it waits, for ``status`` (first 2000 characters kept).
        """
        now = time.time()
        with self._write() as db:
            if self._claimed(db, job) is None:
                return "stale"
            db.execute("UPDATE jobs SET state = 'queued', error = ?, updated = ?, enqueued = NULL WHERE id = ?",
                       (reason[:2000], now, job.id))
        return "queued"

    def _interrupted(self, db, where: str, params: tuple, max_interruptions: int, count: bool, now: float) -> tuple[int, int]:
        """Count an interruption (``count``) for running jobs matching ``where``; fail those over
        the limit and re-queue the rest. Returns (re-queued, failed)."""
        if count:
            db.execute(f"UPDATE jobs SET interruptions = interruptions + 1 WHERE state = 'running' AND {where}", params)
        failed = db.execute(f"UPDATE jobs SET state = 'failed', error = ?, updated = ? "
                            f"WHERE state = 'running' AND interruptions >= ? AND {where}",
                            (f"the worker stopped during processing {max_interruptions} times: the study may "
                             "crash the worker (see worker_exited in node.log); dicom-ai retry re-queues it",
                             now, max_interruptions, *params)).rowcount
        requeued = db.execute(f"UPDATE jobs SET state = 'queued', updated = ?, enqueued = NULL "
                              f"WHERE state = 'running' AND {where}", (now, *params)).rowcount
        return requeued, failed

    def recover(self, max_interruptions: int = MAX_JOB_INTERRUPTIONS, count_interruption: bool = True,
                jobs: bool = True) -> dict[str, int]:
        """Re-queue jobs a worker left running and make every pending delivery due now.

        Called at node start and whenever the local worker process ended, i.e. only when no
        worker runs. A job found running was *interrupted*: when its worker died under a running
        node that is counted in its own column, not as a failure, and the job is ``failed``
        only after ``max_interruptions`` of them (a study that kills its worker every time).
        At node start (``count_interruption=False``) it is only re-queued: the node was
        stopped, which no study can cause.

        Parameters
        ----------
        max_interruptions : int
            Interruptions allowed before the job is ``failed``; default
            :data:`MAX_JOB_INTERRUPTIONS`.
        count_interruption : bool
            Whether this recovery counts an interruption for each running job.
        jobs : bool
            False: leave running jobs and delivery leases alone (workers on other hosts may hold
            them; their leases decide, :meth:`reclaim_expired`) and only make deliveries due.

        Returns
        -------
        dict
            ``jobs_requeued``, ``jobs_failed`` and ``deliveries_pending`` counts.
        """
        now = time.time()
        requeued = failed = 0
        with self._write() as db:
            if jobs:
                requeued, failed = self._interrupted(db, "1 = 1", (), max_interruptions, count_interruption, now)
            # Leases are left to expire when other processes may hold them (jobs=False).
            leases = ", lease_owner = NULL, lease_until = NULL" if jobs else ""
            due = db.execute(f"UPDATE deliveries SET next_attempt = ?{leases} WHERE state = 'pending'",
                             (now,)).rowcount
        return {"jobs_requeued": requeued, "jobs_failed": failed, "deliveries_pending": due}

    def reclaim_expired(self, lease_seconds: float, max_interruptions: int = MAX_JOB_INTERRUPTIONS,
                        now: float | None = None) -> dict[str, int]:
        """Re-queue running jobs whose worker has not renewed its lease for ``lease_seconds``.

        The worker died (SIGKILL, host down) or cannot reach the store; each such job counts an
        interruption (``max_interruptions`` of them fail it). Returns ``jobs_requeued`` and
        ``jobs_failed`` counts.
        """
        with self._write() as db:
            now = self._clock(db) if now is None else now
            requeued, failed = self._interrupted(db, "heartbeat < ?", (now - lease_seconds,), max_interruptions,
                                                 True, now)
        return {"jobs_requeued": requeued, "jobs_failed": failed}

    def jobs_to_enqueue(self, requeue_seconds: float, now: float | None = None) -> list[int]:
        """Queued jobs whose broker message was never sent, or sent more than ``requeue_seconds`` ago
        and still not claimed (a message the broker lost); oldest first."""
        now = time.time() if now is None else now
        with self._read() as db:
            return [r["id"] for r in db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' AND (enqueued IS NULL OR enqueued < ?) ORDER BY id",
                (now - requeue_seconds,)).fetchall()]

    def mark_enqueued(self, job_ids: Sequence[int], now: float | None = None) -> None:
        """Record that a broker message was sent for these jobs."""
        if not job_ids:
            return
        now = time.time() if now is None else now
        with self._write() as db:
            db.executemany("UPDATE jobs SET enqueued = ? WHERE id = ? AND state = 'queued'",
                           [(now, j) for j in job_ids])

    # -- deliveries ----------------------------------------------------------------------

    def due_deliveries(self, now: float | None = None) -> list[Delivery]:
        """Pending deliveries whose next attempt is due and that no process holds, oldest first."""
        with self._read() as db:
            lease_now = self._clock(db) if now is None else now
            now = time.time() if now is None else now
            rows = [dict(d) for d in db.execute(
                "SELECT * FROM deliveries WHERE state = 'pending' AND next_attempt <= ? "
                "AND (lease_until IS NULL OR lease_until < ?) ORDER BY id", (now, lease_now)).fetchall()]
            return [self._delivery(db, d) for d in rows]

    def _delivery(self, db, d: dict) -> Delivery:
        pending = [(r["sop_instance_uid"], r["sop_class_uid"], r["path"]) for r in db.execute(
            "SELECT o.* FROM outbox o WHERE o.job_id = ? AND o.sop_instance_uid NOT IN "
            "(SELECT sop_instance_uid FROM sent WHERE delivery_id = ?) ORDER BY o.path", (d["job_id"], d["id"])
        ).fetchall()]
        in_doubt = frozenset(r["sop_instance_uid"] for r in db.execute(
            "SELECT sop_instance_uid FROM sending WHERE delivery_id = ? AND sop_instance_uid NOT IN "
            "(SELECT sop_instance_uid FROM sent WHERE delivery_id = ?)", (d["id"], d["id"])).fetchall())
        return Delivery(d["id"], d["job_id"], d["ae_title"], d["host"], d["port"], d["attempts"], pending, in_doubt)

    def claim_delivery(self, delivery_id: int, owner: str,
                       lease_seconds: float = DELIVERY_LEASE_SECONDS) -> Delivery | None:
        """Lease a pending delivery for one attempt; returns it as it stands now, or None when
        another process holds it, or it is no longer pending.

        Parameters
        ----------
        delivery_id : int
            The delivery.
        owner : str
            Who attempts it (unique per process); the same owner may take its own lease again.
        lease_seconds : float
            How long the lease holds without renewal (:meth:`mark_sending` renews it).
        """
        with self._write() as db:
            now = self._clock(db)
            taken = db.execute("UPDATE deliveries SET lease_owner = ?, lease_until = ? WHERE id = ? AND state = 'pending' "
                               "AND (lease_until IS NULL OR lease_until < ? OR lease_owner = ?)",
                               (owner, now + lease_seconds, delivery_id, now, owner)).rowcount
            if not taken:
                return None
            d = dict(db.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone())
            return self._delivery(db, d)

    def mark_sending(self, delivery_id: int, sop_instance_uid: str,
                     lease_seconds: float = DELIVERY_LEASE_SECONDS) -> None:
        """About to C-STORE one object: from now until :meth:`mark_sent` it is in doubt (the
        delivery's lease, if any, is renewed)."""
        with self._write() as db:
            db.execute("INSERT INTO sending (delivery_id, sop_instance_uid, started) VALUES (?, ?, ?) "
                       "ON CONFLICT (delivery_id, sop_instance_uid) DO UPDATE SET started = excluded.started",
                       (delivery_id, sop_instance_uid, time.time()))
            db.execute("UPDATE deliveries SET lease_until = ? WHERE id = ? AND lease_until IS NOT NULL",
                       (self._clock(db) + lease_seconds, delivery_id))

    def clear_sending(self, delivery_id: int, sop_instance_uid: str) -> None:
        """The destination answered a failure status: the object is known not to be stored."""
        with self._write() as db:
            db.execute("DELETE FROM sending WHERE delivery_id = ? AND sop_instance_uid = ?",
                       (delivery_id, sop_instance_uid))

    def mark_sent(self, delivery_id: int, sop_instance_uid: str) -> None:
        """The destination acknowledged one object (or, asked, said it holds it)."""
        with self._write() as db:
            db.execute("INSERT INTO sent (delivery_id, sop_instance_uid, sent) VALUES (?, ?, ?) "
                       "ON CONFLICT (delivery_id, sop_instance_uid) DO NOTHING",
                       (delivery_id, sop_instance_uid, time.time()))
            db.execute("DELETE FROM sending WHERE delivery_id = ? AND sop_instance_uid = ?",
                       (delivery_id, sop_instance_uid))

    def delivery_done(self, delivery_id: int) -> None:
        with self._write() as db:
            db.execute("UPDATE deliveries SET state = 'done', error = NULL, attempts = attempts + 1, updated = ?, "
                       "lease_owner = NULL, lease_until = NULL WHERE id = ? AND state = 'pending'",
                       (time.time(), delivery_id))

    def delivery_attempt_failed(self, delivery_id: int, error: str, max_attempts: int,
                                delay_for: Callable[[int], float]) -> str:
        """Count a failed attempt and schedule the next one, or fail the delivery; returns the new state.

        Parameters
        ----------
        delivery_id : int
            The delivery.
        error : str
            Why the attempt failed, for ``status`` (first 2000 characters kept).
        max_attempts : int
            Attempts allowed before the delivery is ``failed``.
        delay_for : callable
            Seconds to wait before the next attempt, given the attempts used so far.
        """
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT attempts, state FROM deliveries WHERE id = ?" + self.FOR_UPDATE,
                             (delivery_id,)).fetchone()
            if row["state"] != "pending":
                return row["state"]
            attempts = row["attempts"] + 1
            state = "failed" if attempts >= max_attempts else "pending"
            db.execute("UPDATE deliveries SET attempts = ?, state = ?, error = ?, next_attempt = ?, updated = ?, "
                       "lease_owner = NULL, lease_until = NULL WHERE id = ?",
                       (attempts, state, error[:2000], now + delay_for(attempts), now, delivery_id))
        return state

    def retry_failed(self) -> dict[str, int]:
        """Re-queue failed deliveries (attempt count reset) and failed jobs."""
        now = time.time()
        with self._write() as db:
            d = db.execute("UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt = ?, updated = ?, "
                           "lease_owner = NULL, lease_until = NULL WHERE state = 'failed'", (now, now)).rowcount
            j = db.execute("UPDATE jobs SET state = 'queued', attempts = 0, failures = 0, interruptions = 0, "
                           "updated = ?, enqueued = NULL WHERE state = 'failed'", (now,)).rowcount
        return {"deliveries": d, "jobs": j}

    # -- retention -----------------------------------------------------------------------

    def purge_finished(self, older_than: float) -> list[tuple[int, list[str], list[str]]]:
        """Forget studies that are finished and quiet since ``older_than`` (epoch seconds).

        Finished = closed, no job queued or running, no delivery pending; quiet = nothing
        received, processed or sent since ``older_than``. Returns, per
        purged study, its job ids, spool paths and outbox paths, for the caller to delete
        the files; the rows are gone when this returns. A study sent again later is then
        processed as a new one.
        """
        with self._read() as db:
            studies = [r["id"] for r in db.execute(
                "SELECT s.id FROM studies s WHERE s.state = 'closed' AND s.last_received < ? "
                "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_id = s.id AND j.state IN ('queued', 'running')) "
                "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_id = s.id AND j.updated >= ?) "
                "AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON j.id = d.job_id "
                "                WHERE j.study_id = s.id AND (d.state = 'pending' OR d.updated >= ?))",
                (older_than, older_than, older_than)).fetchall()]
        purged = []
        for study_id in studies:
            with self._write() as db:
                db.execute("SELECT id FROM studies WHERE id = ?" + self.FOR_UPDATE, (study_id,)).fetchone()
                jobs = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE study_id = ?", (study_id,)).fetchall()]
                spool = [r["path"] for r in db.execute("SELECT path FROM instances WHERE study_id = ?",
                                                       (study_id,)).fetchall()]
                outbox: list[str] = []
                if jobs:
                    marks = ",".join("?" * len(jobs))
                    outbox = [r["path"] for r in db.execute(f"SELECT path FROM outbox WHERE job_id IN ({marks})",
                                                            tuple(jobs)).fetchall()]
                    for table in ("sent", "sending"):
                        db.execute(f"DELETE FROM {table} WHERE delivery_id IN "
                                   f"(SELECT id FROM deliveries WHERE job_id IN ({marks}))", tuple(jobs))
                    db.execute(f"DELETE FROM deliveries WHERE job_id IN ({marks})", tuple(jobs))
                    db.execute(f"DELETE FROM outbox WHERE job_id IN ({marks})", tuple(jobs))
                db.execute("DELETE FROM jobs WHERE study_id = ?", (study_id,))
                db.execute("DELETE FROM instances WHERE study_id = ?", (study_id,))
                db.execute("DELETE FROM studies WHERE id = ?", (study_id,))
            purged.append((study_id, [str(j) for j in jobs], spool + outbox))
        return purged

    # -- status --------------------------------------------------------------------------

    def set_notice(self, key: str, message: str | None) -> None:
        """Record (or clear, with None) a node-wide problem that ``status`` shows, e.g. a
        pipeline that cannot load."""
        with self._write() as db:
            if message is None:
                db.execute("DELETE FROM notices WHERE key = ?", (key,))
            else:
                db.execute("INSERT INTO notices (key, message, updated) VALUES (?, ?, ?) ON CONFLICT (key) "
                           "DO UPDATE SET message = excluded.message, updated = excluded.updated",
                           (key, message[:2000], time.time()))

    def status(self) -> dict[str, list[dict]]:
        """Studies, jobs (with the worker that ran each), deliveries and workers with their states
        and errors (UIDs, AE titles and host names only)."""
        with self._read() as db:
            studies = [dict(r) for r in db.execute(
                "SELECT s.id, s.study_uid, s.calling_ae, s.state, s.last_received, "
                "COUNT(i.sop_instance_uid) AS instances "
                "FROM studies s LEFT JOIN instances i ON i.study_id = s.id GROUP BY s.id ORDER BY s.id").fetchall()]
            jobs = [dict(r) for r in db.execute(
                "SELECT j.id, s.study_uid, s.calling_ae, j.state, j.attempts, j.failures, j.interruptions, j.error, "
                "j.created, j.updated, j.worker, j.heartbeat, j.models, "
                "(SELECT COUNT(*) FROM outbox o WHERE o.job_id = j.id) AS results "
                "FROM jobs j JOIN studies s ON s.id = j.study_id ORDER BY j.id").fetchall()]
            deliveries = [dict(r) for r in db.execute(
                "SELECT d.id, d.job_id, d.ae_title, d.host, d.port, d.state, d.attempts, d.error, d.next_attempt, "
                "(SELECT COUNT(*) FROM sent x WHERE x.delivery_id = d.id) AS sent, "
                "(SELECT COUNT(*) FROM sending x WHERE x.delivery_id = d.id) AS in_doubt, "
                "(SELECT COUNT(*) FROM outbox o WHERE o.job_id = d.job_id) AS total "
                "FROM deliveries d ORDER BY d.id").fetchall()]
            notices = [dict(r) for r in db.execute("SELECT * FROM notices ORDER BY key").fetchall()]
        workers = self.workers()
        return {"engine": self.engine, "notices": notices, "studies": studies, "jobs": jobs,
                "deliveries": deliveries, "workers": workers}


class JobStore(SqlJobStore):
    """The embedded job store: one SQLite database file (WAL, ``synchronous=FULL``)."""

    engine = "sqlite"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._migrate()

    def __repr__(self) -> str:
        return f"JobStore({str(self.path)!r})"

    # -- connection handling -------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def _migrate(self) -> None:
        """Create or upgrade the schema to :data:`SCHEMA_VERSION`; a current database is only read."""
        conn = self._conn()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise JobStoreError(f"the job store {self.path} has schema version {version}, newer than this "
                                f"dicom_ai knows ({SCHEMA_VERSION}): run the newer version, or restore a backup")
        if version == SCHEMA_VERSION:
            return
        with self._write() as db:
            # Another process may have migrated while this one waited for the lock.
            if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
                return
            # Statement by statement: executescript() would COMMIT the transaction first.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            for table, column, definition in _ADDED_COLUMNS:
                if column not in {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # A COMMIT that fails (disk full, I/O error) leaves the transaction open unless
            # SQLite rolled it back itself; either way the next write must start clean.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        yield self._conn()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
