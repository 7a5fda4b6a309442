"""The inference worker: a process of its own that turns queued jobs into result objects.

It claims each job from the job store, has :func:`~dicom_ai.node.processing.build_job_results`
run the study's spooled instances through the pipeline and write every result object into the
durable outbox ``<storage>/outbox/job-<id>/`` (temporary file, fsync, rename, directory
fsync), and then, in one job-store transaction, records the outbox and queues one delivery per
destination. Only then does it draw the preview PNGs (``pipeline.previews``), so the results
never wait for them; until they are written the job's note says so (:data:`PREVIEWS_PENDING`),
and a worker stopped before writing them leaves that note. The worker exits when the node that
started it is gone.

The same job loop runs in the Celery workers of a multi-host site
(:mod:`dicom_ai.node.dispatch`, ``dicom-ai worker``). Wherever it runs, a worker first checks
that it sees the node's storage (:func:`check_storage`: the ``storage-id`` file against the
identity the node recorded in the job store), records itself (``workers`` table) and, while a
job runs, renews the job's lease (:class:`Heartbeat`), so a job whose worker dies is re-queued
by the node after ``workers.lease_seconds`` and finished by another worker.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from dicom_ai.core.errors import StorageIdentityError
from dicom_ai.node import audit, logs
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.engines import open_jobstore
from dicom_ai.node.jobstore import Job, SqlJobStore, left_out_images
from dicom_ai.node.processing import (JobResults, build_job_results, destinations_for, load_pipeline,
                                      write_job_previews)
from dicom_ai.node.storage import PRIVATE_UMASK, is_disk_full, is_storage_error, read_storage_id

#: Longest wait between two tries while the storage cannot be written, in seconds. Each try
#: after a full disk re-runs the job's inference, so the worker also looks at the free space
#: every second and tries at once when some came back.
STORAGE_RETRY_MAX_SECONDS = 30.0

#: A finished job's note while its previews are not written yet: they are drawn after the job
#: is recorded and its deliveries queued. The worker replaces it (by the job's other notes, or
#: why the previews failed) once they are written; a worker stopped in between leaves it, so
#: ``status`` and the status page say the previews are missing while the results are complete.
PREVIEWS_PENDING = ("previews not written yet (they are drawn after the results are queued; if this stays, "
                    "the worker stopped before drawing them: the results are complete)")


class StorageTrouble:
    """Backoff and reporting while the disk is full or the job store cannot be written.

    The first error of an episode is logged (``storage_unavailable``) and, when the job store
    takes it, shown by ``dicom-ai status`` as the notice ``storage``; the first success after
    it logs ``storage_recovered`` and clears the notice.
    """

    def __init__(self, store: SqlJobStore, root: Path, reserve_bytes: int, poll_seconds: float = 1.0,
                 stopping: Callable[[], bool] = lambda: False):
        self.store = store
        self.stopping = stopping
        self.root = root
        self.reserve_bytes = reserve_bytes
        self.poll_seconds = poll_seconds
        self.failures = 0
        self._free_at_failure = 0

    def failed(self, exc: BaseException, doing: str, **fields) -> None:
        """Record one storage error while ``doing`` (an event field), then wait before the next try."""
        self.failures += 1
        error = f"{type(exc).__name__}: {exc}"
        if self.failures == 1:
            full = is_disk_full(exc)
            logs.event("storage_unavailable", level="ERROR", proc_step=doing, disk_full=full, error=error,
                       storage=str(self.root), **fields)
            try:
                self.store.set_notice("storage", ("the storage disk is full" if full else "the storage cannot be "
                                                  "written") + f" ({error}); results wait and are made when "
                                      "space returns; the SCP answers Out of Resources (0xA700)")
            except Exception:  # the notice is a courtesy; the log line above is the signal
                pass
        self._free_at_failure = self._free()
        self._wait()

    def succeeded(self) -> None:
        """The storage took a write again."""
        if self.failures:
            logs.event("storage_recovered", after_failures=self.failures)
            self.failures = 0
            try:
                self.store.set_notice("storage", None)
            except Exception:
                pass

    def _free(self) -> int:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return 0

    def _wait(self) -> None:
        delay = min(STORAGE_RETRY_MAX_SECONDS, self.poll_seconds * 2 ** (self.failures - 1))
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not self.stopping():
            time.sleep(min(self.poll_seconds, max(0.0, deadline - time.monotonic())))
            free = self._free()
            if free > self._free_at_failure and free >= self.reserve_bytes:
                return  # space came back: try now rather than at the end of the backoff


def worker_identity(name: str) -> str:
    """How a job records who ran it: ``<name>@<host> pid <pid>`` (no patient data)."""
    return f"{name}@{socket.gethostname()} pid {os.getpid()}"


def check_storage(config: NodeConfig, store: SqlJobStore) -> str:
    """Check that this process sees the storage the node writes; returns its identity.

    The node writes a random identity into ``<storage>/storage-id`` and records it in the job
    store at start (:meth:`~dicom_ai.node.jobstore.SqlJobStore.bind_storage`); a worker whose
    ``node.storage`` path holds another identity, or none, would read spool files that are not
    there and write results the node cannot send.

    Raises
    ------
    StorageIdentityError
        The identities differ, the file is missing, or the node never started with this store.
    """
    root = config.layout.root
    recorded = store.storage_id()
    local = read_storage_id(config.layout)
    if recorded is None:
        raise StorageIdentityError("the job store holds no storage identity yet: start the receiving node "
                                   "(dicom-ai serve) with this [jobstore] url once before starting workers")
    if local is None:
        raise StorageIdentityError(f"{config.layout.storage_id} does not exist, so node.storage = {str(root)!r} is "
                                   "not the node's storage on this host: mount the shared storage (NFS or similar) "
                                   "at that path, as the node sees it, then start the worker again")
    if local != recorded:
        raise StorageIdentityError(f"node.storage = {str(root)!r} holds storage id {local}, but the node using this "
                                   f"job store writes to the storage with id {recorded}: this host has another "
                                   "folder (or another server's export) mounted there")
    return local


class Heartbeat:
    """Renews a running job's lease in a thread every ``every`` seconds while the ``with`` block runs.

    A renewal that finds the claim gone (the node re-queued the job after a lease ran out, e.g.
    while this host could not reach the job store) is logged once (``job_claim_lost``); the
    job's outcome will then be refused as ``stale`` and its rerun elsewhere counts.
    """

    def __init__(self, store: SqlJobStore, job: Job, every: float):
        self.store, self.job, self.every = store, job, max(0.05, every)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        failing = lost = False
        while not self._stop.wait(self.every):
            try:
                ok = self.store.heartbeat(self.job)
            except Exception as exc:
                if not failing:
                    logs.event("heartbeat_failed", level="WARNING", job_id=self.job.id,
                               error=f"{type(exc).__name__}: {exc}"[:300])
                failing = True
                continue
            failing = False
            if not ok and not lost:
                logs.event("job_claim_lost", level="WARNING", job_id=self.job.id,
                           hint="the lease ran out (workers.lease_seconds); another worker runs the job")
                lost = True


def serve(config: NodeConfig, parent_pid: int | None = None, poll_seconds: float = 0.05) -> None:
    """Claim and run jobs until the parent process is gone (or SIGTERM).

    A full disk or a job store that cannot be written (:func:`~dicom_ai.node.storage.is_storage_error`,
    from the claim, the processing or the record) is not a failure of the job: the worker keeps
    its claim, backs off (:class:`StorageTrouble`) and runs the same job again when the storage
    takes writes; nothing is counted against ``pipeline.max_job_attempts``.

    Parameters
    ----------
    config
        The node configuration (from the node's ``node-config.json``).
    parent_pid
        The node's process id; the worker returns when its parent is no longer this process.
    poll_seconds
        Wait between job-store polls when no job is queued, in seconds. A poll is a read
        (:meth:`~dicom_ai.node.jobstore.SqlJobStore.job_waiting`); only a queued job is claimed,
        under the write lock, so a short wait costs the receiving node nothing while it writes.
    """
    store = open_jobstore(config)
    identity = worker_identity("local")
    storage_id = check_storage(config, store)
    store.register_worker("local@" + socket.gethostname(), socket.gethostname(), os.getpid(), storage_id)
    stopping = False

    def _stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    started = time.monotonic()
    try:
        pipeline = load_pipeline(config)
    except Exception as exc:
        # Jobs stay queued; the node restarts the worker; the log and `status` say what to fix.
        logs.event("pipeline_load_failed", level="ERROR", error=f"{type(exc).__name__}: {exc}",
                   factory=config.pipeline.factory or "bundles", models=",".join(config.pipeline.models))
        try:
            store.set_notice("worker", f"the model pipeline cannot be loaded, jobs wait: {type(exc).__name__}: {exc}")
        except Exception:
            pass
        time.sleep(5)
        raise SystemExit(3) from None
    trouble = StorageTrouble(store, config.layout.root, config.node.reserve_free_mb * 1024 * 1024,
                             stopping=lambda: stopping)
    try:
        store.set_notice("worker", None)
    except Exception as exc:
        if not is_storage_error(exc):
            raise
    logs.event("worker_started", factory=config.pipeline.factory or "bundles",
               models=",".join(config.pipeline.models), device=config.pipeline.device,
               load_seconds=round(time.monotonic() - started, 1))
    while not stopping:
        if parent_pid is not None and os.getppid() != parent_pid:
            logs.event("worker_orphaned", level="WARNING")
            return
        try:
            job = store.claim_job(worker=identity) if store.job_waiting() else None
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            trouble.failed(exc, "claim")
            continue
        trouble.succeeded()
        if job is None:
            time.sleep(poll_seconds)
            continue
        run_claimed_job(job, pipeline, config, store, trouble, lambda: stopping)


def run_claimed_job(job: Job, pipeline, config: NodeConfig, store: SqlJobStore, trouble: StorageTrouble,
                    stopping: Callable[[], bool]) -> None:
    """Process one claimed job and record its outcome, renewing its lease while it runs; then
    draw its previews (the job is no longer running then: no lease to renew)."""
    with Heartbeat(store, job, config.workers.lease_seconds / 3):
        recorded = _run_job(job, pipeline, config, store, trouble, stopping)
    if recorded is not None:
        _write_previews(job, *recorded, config, store, trouble, stopping)


def _run_job(job: Job, pipeline, config: NodeConfig, store: SqlJobStore, trouble: StorageTrouble,
             stopping: Callable[[], bool]) -> tuple[JobResults, str] | None:
    """Process one claimed job and record its outcome, waiting out storage errors on the way;
    returns what the previews need (the results and the note recorded) when they are to be drawn."""
    started = time.monotonic()
    logs.event("job_started", job_id=job.id, study_instance_uid=job.study_uid, calling_ae=job.calling_ae,
               images=len(job.instances), attempt=job.attempts)
    built: JobResults | None = None
    timings = getattr(pipeline, "take_model_seconds", dict)
    stage_timings = getattr(pipeline, "take_stage_seconds", dict)
    timings()  # what an earlier, failed attempt left
    stage_timings()
    stages: dict[str, float] = {}
    while built is None:
        try:
            stages.clear()
            built = build_job_results(job, pipeline, config, stages)
        except Exception as exc:
            if is_storage_error(exc):
                _remove_partial_outbox(config, job)
                trouble.failed(exc, "process", job_id=job.id)
                if stopping():
                    return  # still claimed: the node's recovery re-queues it
                continue
            error = f"{type(exc).__name__}: {exc}"
            state = _record(lambda: store.fail_job(job, error, config.pipeline.max_job_attempts),
                            "record_failure", job, trouble, stopping)
            if state is _STOPPED:
                return  # still claimed: the node's recovery re-queues it
            logs.event("job_failed", level="ERROR", job_id=job.id, study_instance_uid=job.study_uid, state=state,
                       error=error, trace=traceback.format_exc(limit=3)[-800:])
            return
    entries, notes = built.entries, built.notes
    # A job with no result objects (every image left out for a reason a retry cannot change)
    # has nothing to deliver.
    destinations = destinations_for(config, job.calling_ae) if entries else []
    previews = bool(config.pipeline.previews and built.results is not None)
    note = "; ".join(notes + ([PREVIEWS_PENDING] if previews else [])) or None
    model_seconds = timings()
    stages.update(stage_timings())
    # Where a job's time went, for an engineer asking why results are late (seconds; models
    # summed over images; the stages overlap no other stage except pipeline, which holds
    # prepare, the models and restrict).
    logs.event("job_timing", job_id=job.id, images=len(job.instances),
               **{f"{k}_seconds": round(v, 3) for k, v in sorted(stages.items())},
               **{f"model_{k}_seconds": round(sum(v), 3) for k, v in sorted(model_seconds.items())})
    # The outbox files are durable; only the record is missing after a storage error: retry just that.
    state = _record(lambda: store.complete_job(job, entries, destinations, note=note, model_seconds=model_seconds,
                                               models=model_versions(pipeline, model_seconds)),
                    "record_results", job, trouble, stopping)
    if state is _STOPPED:
        return None
    trouble.succeeded()
    logs.event("job_finished", job_id=job.id, study_instance_uid=job.study_uid, state=state,
               results=len(entries), destinations=",".join(d[0] for d in destinations) or "none",
               seconds=round(time.monotonic() - started, 2), notes="; ".join(notes)[:500],
               models=",".join(f"{k} {v}" for k, v in sorted(model_versions(pipeline, model_seconds).items())))
    if not destinations and entries:
        logs.event("no_destination", level="WARNING", job_id=job.id, calling_ae=job.calling_ae,
                   hint="the caller is not a configured peer and no [[destinations]] are set")
    _audit_left_out(job, "; ".join(notes) or None, state)
    if previews and state in ("done", "superseded"):  # a stale job's rerun draws them
        return built, note
    return None


def _write_previews(job: Job, built: JobResults, pending_note: str, config: NodeConfig, store: SqlJobStore,
                    trouble: StorageTrouble, stopping: Callable[[], bool]) -> None:
    """Draw a recorded job's previews, then replace its note :data:`PREVIEWS_PENDING` by the
    job's other notes (and why the previews failed, if they did)."""
    seconds: dict[str, float] = {}
    failed = write_job_previews(built, config, job.id, seconds)
    built.results = None  # the sources' pixels and the segments: no longer needed
    final = "; ".join(built.notes + ([failed] if failed else [])) or None
    if _record(lambda: store.replace_job_note(job, final, pending_note), "record_previews", job, trouble,
               stopping) is _STOPPED:
        return
    trouble.succeeded()
    logs.event("previews_written" if failed is None else "previews_failed", level="INFO" if failed is None else
               "WARNING", job_id=job.id, seconds=round(seconds.get("previews", 0.0), 3),
               **({"error": failed} if failed else {}))


#: What :func:`_record` returns when the worker stopped before the job store took the write.
_STOPPED = object()


def _record(write: Callable[[], object], doing: str, job: Job, trouble: StorageTrouble,
            stopping: Callable[[], bool]) -> object:
    """``write()``'s value (a job-store write for ``job``), tried again while it fails with a
    storage error (:class:`StorageTrouble` reports and backs off, as ``doing``); :data:`_STOPPED`
    when the worker is stopping before it succeeded. Any other error is raised."""
    while True:
        try:
            return write()
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            trouble.failed(exc, doing, job_id=job.id)
            if stopping():
                return _STOPPED


def _audit_left_out(job: Job, note: str | None, state: str) -> None:
    """An audit message naming the images the job left out and why (SOP Instance UIDs and reasons)."""
    left_out = left_out_images(note)
    if not left_out or state not in ("done", "superseded"):
        return
    classes: dict[str, int] = {}
    for instance in job.instances:
        classes[instance.sop_class_uid] = classes.get(instance.sop_class_uid, 0) + 1
    try:
        audit.instances_left_out(audit.StudyObject(job.study_uid, classes),
                                 f"{len(left_out)} of {len(job.instances)} image(s) left out of the analysis: "
                                 + "; ".join(f"{uid} ({reason})" for uid, reason in left_out))
    except Exception as exc:  # the audit trail never fails a job; audit.py reports a sink that is down
        logs.event("audit_failed", level="ERROR", job_id=job.id, error=type(exc).__name__)


def model_versions(pipeline, ran: dict | None = None) -> dict[str, str]:
    """Model name -> version (``@operating point`` when the bundle has one) of the models that
    made a job's results: those that ran (``ran``, the pipeline's per-model timings), or every
    model of the pipeline when it keeps no timings."""
    identities = getattr(pipeline, "identities", None)  # Pipeline: a property; a stand-in may have one identity
    if identities is None:
        identities = [pipeline.identity] if hasattr(pipeline, "identity") else []
    out = {}
    for ident in identities:
        if ran and ident.name not in ran:
            continue  # switched off at the operating point: it made nothing
        point = getattr(ident, "operating_point", "")
        out[ident.name] = f"{ident.version}@{point}" if point else str(ident.version)
    return out


def _remove_partial_outbox(config: NodeConfig, job: Job) -> None:
    """Delete temporary files a write cut short left in the job's outbox: they hold space a
    full disk needs back, and the rerun writes them again."""
    try:
        for tmp in config.layout.outbox_for(job.id).glob("*.tmp"):
            tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the node dies, so no orphan keeps working.

    The node starts the worker through :data:`~dicom_ai.node.supervisor.WORKER_BOOT`, which
    sets the signal before any import; set again here for a worker started otherwise."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the getppid() check in serve() still ends the worker


def lower_priority(nice: int) -> int:
    """Lower this process's CPU scheduling priority to niceness ``nice`` (0-19; never raises it).

    Inference is batch work; receiving a C-STORE is what a modality waits on. On a host whose
    cores the worker shares with the receiving node, a niceness of 10 gives the receiver about
    ten times the worker's CPU share whenever both want it, while an idle receiver leaves the
    worker every cycle. Returns the niceness now in force.

    Linux keeps a niceness per thread, and ``setpriority(PRIO_PROCESS, 0)`` changes only the
    calling one: the threads the imports have already started (numpy's OpenBLAS pool, ONNX
    Runtime's) are lowered here too, by their thread ids; threads started later inherit it."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError as exc:  # a sandbox may forbid it: run at the inherited priority, say so
            logs.event("worker_priority_unchanged", level="WARNING", nice=current, wanted=nice, error=str(exc))
            return current
    now = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = []  # no /proc: the calling thread only
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < now:
                os.setpriority(os.PRIO_PROCESS, tid, now)
        except OSError:
            pass  # the thread has ended meanwhile
    return now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dicom_ai inference worker (started by the node)")
    parser.add_argument("--config-json", required=True, help="the node's effective configuration (JSON)")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    # Before any file is made: results, previews and log lines hold or point at patient data.
    os.umask(PRIVATE_UMASK)
    _die_with_parent()
    if os.getppid() != args.parent_pid:
        return 1
    config = NodeConfig.from_json(Path(args.config_json).read_text())
    logs.configure("worker", config.logging.level, config.log_file)
    logs.event("worker_priority", nice=lower_priority(config.workers.nice))
    audit.configure(config)  # the images a job leaves out are audited where the job runs
    try:
        serve(config, parent_pid=args.parent_pid)
    except StorageIdentityError as exc:
        logs.event("storage_mismatch", level="ERROR", error=str(exc))
        time.sleep(5)  # the node restarts the worker; do not spin
        return 3
    logs.event("worker_exiting")
    # Everything is committed and fsynced; skip the interpreter teardown (seconds with
    # highdicom/SimpleITK loaded) so the node stops promptly.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
