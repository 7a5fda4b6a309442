"""The inference worker: a process of its own that turns queued jobs into result objects.

It claims each job from the job store, has :func:`~dicom_ai.node.processing.process_job` run
the study's spooled instances through the pipeline and write every result object into the
durable outbox ``<storage>/outbox/job-<id>/`` (temporary file, fsync, rename, directory
fsync), and then, in one job-store transaction, records the outbox and queues one delivery per
destination. The worker exits when the node that started it is gone.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from dicom_ai.node import logs
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.jobstore import JobStore
from dicom_ai.node.processing import destinations_for, load_pipeline, process_job

def serve(config: NodeConfig, parent_pid: int | None = None, poll_seconds: float = 0.2) -> None:
    """Claim and run jobs until the parent process is gone (or SIGTERM).

    Parameters
    ----------
    config
        The node configuration (from the node's ``node-config.json``).
    parent_pid
        The node's process id; the worker returns when its parent is no longer this process.
    poll_seconds
        Wait between job-store polls when no job is queued, in seconds.
    """
    store = JobStore(config.layout.jobstore)
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
        store.set_notice("worker", f"the model pipeline cannot be loaded, jobs wait: {type(exc).__name__}: {exc}")
        time.sleep(5)
        raise SystemExit(3) from None
    store.set_notice("worker", None)
    logs.event("worker_started", factory=config.pipeline.factory or "bundles",
               models=",".join(config.pipeline.models), device=config.pipeline.device,
               load_seconds=round(time.monotonic() - started, 1))
    while not stopping:
        if parent_pid is not None and os.getppid() != parent_pid:
            logs.event("worker_orphaned", level="WARNING")
            return
        job = store.claim_job()
        if job is None:
            time.sleep(poll_seconds)
            continue
        started = time.monotonic()
        logs.event("job_started", job_id=job.id, study_instance_uid=job.study_uid, calling_ae=job.calling_ae,
                   images=len(job.instances), attempt=job.attempts)
        try:
            entries, notes = process_job(job, pipeline, config)
        except Exception as exc:
            state = store.fail_job(job, f"{type(exc).__name__}: {exc}", config.pipeline.max_job_attempts)
            logs.event("job_failed", level="ERROR", job_id=job.id, study_instance_uid=job.study_uid, state=state,
                       error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc(limit=3)[-800:])
            continue
        destinations = destinations_for(config, job.calling_ae)
        state = store.complete_job(job, entries, destinations, note="; ".join(notes) or None)
        logs.event("job_finished", job_id=job.id, study_instance_uid=job.study_uid, state=state,
                   results=len(entries), destinations=",".join(d[0] for d in destinations) or "none",
                   seconds=round(time.monotonic() - started, 2), notes="; ".join(notes)[:500])
        if not destinations:
            logs.event("no_destination", level="WARNING", job_id=job.id, calling_ae=job.calling_ae,
                       hint="the caller is not a configured peer and no [[destinations]] are set")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the node dies, so no orphan keeps working."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the getppid() check in serve() still ends the worker



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dicom_ai inference worker (started by the node)")
    parser.add_argument("--config-json", required=True, help="the node's effective configuration (JSON)")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    if os.getppid() != args.parent_pid:
        return 1
    config = NodeConfig.from_json(Path(args.config_json).read_text())
    logs.configure("worker", config.logging.level, config.log_file)
    serve(config, parent_pid=args.parent_pid)
    logs.event("worker_exiting")
    # Everything is committed and fsynced; skip the interpreter teardown (seconds with
    # highdicom/SimpleITK loaded) so the node stops promptly.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
