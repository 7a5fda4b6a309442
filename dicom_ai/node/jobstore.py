"""The durable job store: instances, studies, jobs, result outbox and deliveries (SQLite, WAL).

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

The interface the node uses is small on purpose (record_instance, close_ready_studies,
claim_job, complete_job, fail_job, due_deliveries, mark_sent, delivery_attempt_failed, ...)
and the SQL is plain, so the store can move to PostgreSQL for a multi-host site without a
rewrite of its callers. Every write is one transaction (BEGIN IMMEDIATE); the database runs
in WAL mode with ``synchronous=FULL`` so a committed row survives power loss.

The schema version is ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`); opening an older
database adds what is missing (tables, columns) in one transaction. Opening a database that
is already current only reads, so a node whose disk is full can still start.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: The four standard screening views (laterality, view).
STANDARD_VIEWS = frozenset({("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")})

#: ``PRAGMA user_version`` of the current schema. 1: the first schema (never written, read as
#: 0); 2: ``jobs.failures``, ``jobs.interruptions`` and the ``sending`` table; 3:
#: ``jobs.model_seconds`` (JSON: model name -> seconds per image).
SCHEMA_VERSION = 3

#: Default of ``pipeline.max_job_interruptions``: interruptions (the worker died under a running
#: node while the job ran) before a job is marked failed. Far larger than
#: ``pipeline.max_job_attempts`` on purpose: kills are rarely the job's fault (decoding is
#: sandboxed, image size capped; a crash storm of 15 worker kills can all land on one job whose
#: worker never gets to finish it), but a study that kills its worker every time (a crash the
#: sandbox did not contain, the kernel's OOM killer) must end as failed rather than loop for ever.
MAX_JOB_INTERRUPTIONS = 50

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
"""

# Columns added after the first schema: (table, column, definition).
_ADDED_COLUMNS = [
    ("jobs", "failures", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "interruptions", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "model_seconds", "TEXT"),
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


class JobStore:
    """One SQLite database file; safe to use from several threads and processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._migrate()

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
        if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
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

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- receiving -----------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """The spool path of an already recorded instance, or None."""
        row = self._conn().execute("SELECT path FROM instances WHERE sop_instance_uid = ?",
                                   (sop_instance_uid,)).fetchone()
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
        with self._write() as db:
            if db.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?",
                          (instance.sop_instance_uid,)).fetchone():
                return False
            db.execute("INSERT INTO studies (study_uid, calling_ae, state, last_received) VALUES (?, ?, 'open', ?) "
                       "ON CONFLICT (study_uid, calling_ae) DO UPDATE SET state = 'open', last_received = ?",
                       (study_uid, calling_ae, now, now))
            study_id = db.execute("SELECT id FROM studies WHERE study_uid = ? AND calling_ae = ?",
                                  (study_uid, calling_ae)).fetchone()["id"]
            db.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (instance.sop_instance_uid, study_id, instance.sop_class_uid, instance.transfer_syntax,
                        instance.laterality, instance.view, instance.path, size, now))
            db.execute("UPDATE jobs SET state = 'cancelled', error = 'a later instance arrived before processing "
                       "started', updated = ? WHERE study_id = ? AND state = 'queued'", (now, study_id))
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
        conn = self._conn()
        candidates = conn.execute("SELECT id, last_received FROM studies WHERE state = 'open' AND last_received <= ?",
                                  (now - min(grace_seconds, idle_seconds),)).fetchall()
        created = []
        for study in candidates:
            rows = conn.execute("SELECT sop_instance_uid, laterality, view FROM instances WHERE study_id = ? "
                                "ORDER BY received, sop_instance_uid", (study["id"],)).fetchall()
            views = {(r["laterality"], r["view"]) for r in rows}
            quiet = now - study["last_received"]
            if not (quiet >= idle_seconds or (STANDARD_VIEWS <= views and quiet >= grace_seconds)):
                continue
            uids = [r["sop_instance_uid"] for r in rows]
            result_uids = make_result_uids(uids)
            with self._write() as db:
                # Re-check inside the transaction: an instance may have arrived meanwhile.
                cur = db.execute("SELECT state, last_received FROM studies WHERE id = ?", (study["id"],)).fetchone()
                if cur["state"] != "open" or cur["last_received"] != study["last_received"]:
                    continue
                db.execute("UPDATE studies SET state = 'closed' WHERE id = ?", (study["id"],))
                db.execute("UPDATE deliveries SET state = 'superseded', error = 'a newer job covers the study', "
                           "updated = ? WHERE state = 'pending' AND job_id IN (SELECT id FROM jobs WHERE study_id = ?)",
                           (now, study["id"]))
                job_id = db.execute("INSERT INTO jobs (study_id, state, instance_uids, result_uids, created, updated) "
                                    "VALUES (?, 'queued', ?, ?, ?, ?)",
                                    (study["id"], json.dumps(uids), result_uids, now, now)).lastrowid
            created.append(int(job_id))
        return created

    # -- jobs (worker side) ----------------------------------------------------------------

    def claim_job(self) -> Job | None:
        """Take the oldest queued job and mark it running under a fresh claim token."""
        token = uuid.uuid4().hex
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', claim_token = ?, attempts = attempts + 1, updated = ? "
                       "WHERE id = ?", (token, now, row["id"]))
            # Read inside the transaction: a read that fails undoes the claim, rather than
            # leaving a job running that no worker knows it holds.
            return self.job(row["id"])

    def job(self, job_id: int) -> Job:
        conn = self._conn()
        row = conn.execute("SELECT j.*, s.study_uid, s.calling_ae FROM jobs j JOIN studies s ON s.id = j.study_id "
                           "WHERE j.id = ?", (job_id,)).fetchone()
        uids = json.loads(row["instance_uids"])
        by_uid = {r["sop_instance_uid"]: r for r in conn.execute(
            f"SELECT * FROM instances WHERE sop_instance_uid IN ({','.join('?' * len(uids))})", uids)}
        instances = [Instance(u, by_uid[u]["sop_class_uid"], by_uid[u]["transfer_syntax"], by_uid[u]["laterality"],
                              by_uid[u]["view"], by_uid[u]["path"]) for u in uids]
        revision = conn.execute("SELECT COUNT(*) FROM jobs WHERE study_id = ? AND id < ? AND state != 'cancelled'",
                                (row["study_id"], job_id)).fetchone()[0]
        return Job(id=row["id"], study_id=row["study_id"], study_uid=row["study_uid"], calling_ae=row["calling_ae"],
                   instances=instances, result_uids=row["result_uids"], attempts=row["attempts"],
                   claim_token=row["claim_token"] or "", revision=int(revision))

    def complete_job(self, job: Job, outputs: Sequence[tuple[str, str, str]],
                     destinations: Sequence[tuple[str, str, int]], note: str | None = None,
                     model_seconds: dict[str, list[float]] | None = None) -> str:
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

        Returns
        -------
        str
            The job's final state: ``done``, ``superseded`` (a newer job of the study exists;
            nothing is queued), or ``stale`` (the claim was lost, e.g. after a node restart).
        """
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT state, claim_token FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row["state"] != "running" or row["claim_token"] != job.claim_token:
                return "stale"
            newer = db.execute("SELECT 1 FROM jobs WHERE study_id = ? AND id > ? AND state != 'cancelled'",
                               (job.study_id, job.id)).fetchone()
            state = "superseded" if newer else "done"
            db.executemany("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?)",
                           [(job.id, uid, cls, path) for uid, cls, path in outputs])
            db.execute("UPDATE jobs SET state = ?, error = ?, updated = ?, model_seconds = ? WHERE id = ?",
                       (state, note, now, json.dumps(model_seconds) if model_seconds else None, job.id))
            if state == "done":
                db.executemany("INSERT INTO deliveries (job_id, ae_title, host, port, state, next_attempt, created, "
                               "updated) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
                               [(job.id, ae, host, port, now, now, now) for ae, host, port in destinations])
        return state

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
            row = db.execute("SELECT state, claim_token, failures FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row["state"] != "running" or row["claim_token"] != job.claim_token:
                return "stale"
            failures = row["failures"] + 1
            state = "failed" if failures >= max_attempts else "queued"
            db.execute("UPDATE jobs SET state = ?, failures = ?, error = ?, updated = ? WHERE id = ?",
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
            row = db.execute("SELECT state, claim_token FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row["state"] != "running" or row["claim_token"] != job.claim_token:
                return "stale"
            db.execute("UPDATE jobs SET state = 'queued', error = ?, updated = ? WHERE id = ?",
                       (reason[:2000], now, job.id))
        return "queued"

    def recover(self, max_interruptions: int = MAX_JOB_INTERRUPTIONS, count_interruption: bool = True) -> dict[str, int]:
        """Re-queue jobs a worker left running and make every pending delivery due now.

        Called at node start and whenever the worker process ended, i.e. only when no worker
        runs. A job found running was *interrupted*: when its worker died under a running
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

        Returns
        -------
        dict
            ``jobs_requeued``, ``jobs_failed`` and ``deliveries_pending`` counts.
        """
        now = time.time()
        with self._write() as db:
            if count_interruption:
                db.execute("UPDATE jobs SET interruptions = interruptions + 1 WHERE state = 'running'")
            failed = db.execute("UPDATE jobs SET state = 'failed', error = ?, updated = ? "
                                "WHERE state = 'running' AND interruptions >= ?",
                                (f"the worker stopped during processing {max_interruptions} times: the study may "
                                 "crash the worker (see worker_exited in node.log); dicom-ai retry re-queues it",
                                 now, max_interruptions)).rowcount
            requeued = db.execute("UPDATE jobs SET state = 'queued', updated = ? WHERE state = 'running'",
                                  (now,)).rowcount
            due = db.execute("UPDATE deliveries SET next_attempt = ? WHERE state = 'pending'", (now,)).rowcount
        return {"jobs_requeued": requeued, "jobs_failed": failed, "deliveries_pending": due}

    # -- deliveries ----------------------------------------------------------------------

    def due_deliveries(self, now: float | None = None) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, oldest first."""
        now = time.time() if now is None else now
        conn = self._conn()
        out = []
        for d in conn.execute("SELECT * FROM deliveries WHERE state = 'pending' AND next_attempt <= ? ORDER BY id",
                              (now,)).fetchall():
            pending = [(r["sop_instance_uid"], r["sop_class_uid"], r["path"]) for r in conn.execute(
                "SELECT o.* FROM outbox o WHERE o.job_id = ? AND o.sop_instance_uid NOT IN "
                "(SELECT sop_instance_uid FROM sent WHERE delivery_id = ?) ORDER BY o.path", (d["job_id"], d["id"]))]
            in_doubt = frozenset(r["sop_instance_uid"] for r in conn.execute(
                "SELECT sop_instance_uid FROM sending WHERE delivery_id = ? AND sop_instance_uid NOT IN "
                "(SELECT sop_instance_uid FROM sent WHERE delivery_id = ?)", (d["id"], d["id"])))
            out.append(Delivery(d["id"], d["job_id"], d["ae_title"], d["host"], d["port"], d["attempts"], pending,
                                in_doubt))
        return out

    def mark_sending(self, delivery_id: int, sop_instance_uid: str) -> None:
        """About to C-STORE one object: from now until :meth:`mark_sent` it is in doubt."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO sending VALUES (?, ?, ?)", (delivery_id, sop_instance_uid, time.time()))

    def clear_sending(self, delivery_id: int, sop_instance_uid: str) -> None:
        """The destination answered a failure status: the object is known not to be stored."""
        with self._write() as db:
            db.execute("DELETE FROM sending WHERE delivery_id = ? AND sop_instance_uid = ?",
                       (delivery_id, sop_instance_uid))

    def mark_sent(self, delivery_id: int, sop_instance_uid: str) -> None:
        """The destination acknowledged one object (or, asked, said it holds it)."""
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO sent VALUES (?, ?, ?)", (delivery_id, sop_instance_uid, time.time()))
            db.execute("DELETE FROM sending WHERE delivery_id = ? AND sop_instance_uid = ?",
                       (delivery_id, sop_instance_uid))

    def delivery_done(self, delivery_id: int) -> None:
        with self._write() as db:
            db.execute("UPDATE deliveries SET state = 'done', error = NULL, attempts = attempts + 1, updated = ? "
                       "WHERE id = ? AND state = 'pending'", (time.time(), delivery_id))

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
            row = db.execute("SELECT attempts, state FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
            if row["state"] != "pending":
                return row["state"]
            attempts = row["attempts"] + 1
            state = "failed" if attempts >= max_attempts else "pending"
            db.execute("UPDATE deliveries SET attempts = ?, state = ?, error = ?, next_attempt = ?, updated = ? "
                       "WHERE id = ?", (attempts, state, error[:2000], now + delay_for(attempts), now, delivery_id))
        return state

    def retry_failed(self) -> dict[str, int]:
        """Re-queue failed deliveries (attempt count reset) and failed jobs."""
        now = time.time()
        with self._write() as db:
            d = db.execute("UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt = ?, updated = ? "
                           "WHERE state = 'failed'", (now, now)).rowcount
            j = db.execute("UPDATE jobs SET state = 'queued', attempts = 0, failures = 0, interruptions = 0, "
                           "updated = ? WHERE state = 'failed'", (now,)).rowcount
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
        conn = self._conn()
        studies = [r["id"] for r in conn.execute(
            "SELECT s.id FROM studies s WHERE s.state = 'closed' AND s.last_received < ? "
            "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_id = s.id AND j.state IN ('queued', 'running')) "
            "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_id = s.id AND j.updated >= ?) "
            "AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON j.id = d.job_id "
            "                WHERE j.study_id = s.id AND (d.state = 'pending' OR d.updated >= ?))",
            (older_than, older_than, older_than))]
        purged = []
        for study_id in studies:
            with self._write() as db:
                jobs = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE study_id = ?", (study_id,))]
                spool = [r["path"] for r in db.execute("SELECT path FROM instances WHERE study_id = ?", (study_id,))]
                marks = ",".join("?" * len(jobs))
                outbox = [r["path"] for r in db.execute(f"SELECT path FROM outbox WHERE job_id IN ({marks})", jobs)]
                for table in ("sent", "sending"):
                    db.execute(f"DELETE FROM {table} WHERE delivery_id IN "
                               f"(SELECT id FROM deliveries WHERE job_id IN ({marks}))", jobs)
                db.execute(f"DELETE FROM deliveries WHERE job_id IN ({marks})", jobs)
                db.execute(f"DELETE FROM outbox WHERE job_id IN ({marks})", jobs)
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
                db.execute("INSERT OR REPLACE INTO notices VALUES (?, ?, ?)", (key, message[:2000], time.time()))

    def status(self) -> dict[str, list[dict]]:
        """Studies, jobs and deliveries with their states and errors (UIDs and AE titles only)."""
        conn = self._conn()
        studies = [dict(r) for r in conn.execute(
            "SELECT s.id, s.study_uid, s.calling_ae, s.state, s.last_received, COUNT(i.sop_instance_uid) AS instances "
            "FROM studies s LEFT JOIN instances i ON i.study_id = s.id GROUP BY s.id ORDER BY s.id")]
        jobs = [dict(r) for r in conn.execute(
            "SELECT j.id, s.study_uid, s.calling_ae, j.state, j.attempts, j.failures, j.interruptions, j.error, "
            "j.created, j.updated, "
            "(SELECT COUNT(*) FROM outbox o WHERE o.job_id = j.id) AS results "
            "FROM jobs j JOIN studies s ON s.id = j.study_id ORDER BY j.id")]
        deliveries = [dict(r) for r in conn.execute(
            "SELECT d.id, d.job_id, d.ae_title, d.host, d.port, d.state, d.attempts, d.error, d.next_attempt, "
            "(SELECT COUNT(*) FROM sent x WHERE x.delivery_id = d.id) AS sent, "
            "(SELECT COUNT(*) FROM sending x WHERE x.delivery_id = d.id) AS in_doubt, "
            "(SELECT COUNT(*) FROM outbox o WHERE o.job_id = d.job_id) AS total "
            "FROM deliveries d ORDER BY d.id")]
        notices = [dict(r) for r in conn.execute("SELECT * FROM notices ORDER BY key")]
        return {"notices": notices, "studies": studies, "jobs": jobs, "deliveries": deliveries}
