"""The inference worker: a process of its own that turns queued jobs into result objects.

For each job it reads the study's spooled instances, runs the configured pipeline, hands the
findings to the result writers (:mod:`dicom_ai.results`), writes every result object into
the durable outbox ``<storage>/outbox/job-<id>/`` (temporary file, fsync, rename, directory
fsync) and then, in one job-store transaction, records the outbox and queues one delivery per
destination. The result UIDs come from the job (fixed when it was created), so a job that is
run again after a crash writes byte-for-byte the same objects under the same UIDs.

An image the pipeline cannot decode is skipped and named in the job's note; the rest of the
study is processed. The worker exits when the node that started it is gone.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom

from dicom_ai.core.findings import ImageFindings
from dicom_ai.core.options import ResultOptions
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.networks.pipeline import Pipeline
from dicom_ai.node import logs
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.jobstore import Job, JobStore
from dicom_ai.node.storage import fsync_dir, write_durably
from dicom_ai.results import build_results

PipelineFactory = Callable[[Sequence[str], str], object]


def load_pipeline(config: NodeConfig):
    """The configured pipeline: ``pipeline.factory`` if set, else the model bundles."""
    if config.pipeline.factory:
        module, _, name = config.pipeline.factory.partition(":")
        factory = importlib.import_module(module)
        for part in name.split("."):
            factory = getattr(factory, part)
        return factory(config.pipeline.models, config.pipeline.device)
    return Pipeline.from_bundles(config.pipeline.models, config.pipeline.device)


def destinations_for(config: NodeConfig, calling_ae: str) -> list[tuple[str, str, int]]:
    """Where a study's results go: the peer that sent it (if configured) and the extra destinations."""
    out = []
    origin = config.peer(calling_ae)
    if origin is not None:
        out.append((origin.ae_title, origin.host, origin.port))
    out += [(d.ae_title, d.host, d.port) for d in config.destinations]
    return out


def run_pipeline(pipeline, sources: list[pydicom.Dataset]) -> tuple[list[pydicom.Dataset], list[ImageFindings], list[str]]:
    """Findings for every image the pipeline can handle; returns (kept sources, findings, skipped notes).

    Each image is run once, on its own, so an image that cannot be decoded or analysed is
    skipped (and named in the notes) without running the rest of the study twice.
    """
    kept, findings, skipped = [], [], []
    for ds in sources:
        try:
            findings += list(pipeline.run([ds]))
            kept.append(ds)
        except Exception as exc:
            skipped.append(f"{ds.SOPInstanceUID}: {exc}")
    if not kept:
        raise RuntimeError("no image of the study could be processed: " + "; ".join(skipped))
    return kept, findings, skipped


def result_options(config: NodeConfig, revision: int = 0) -> ResultOptions:
    """The result writers' options from the ``[results]`` section.

    Results of a superseding job (``revision`` > 0, after late images) get series numbers
    10 higher per revision, so viewers list the newest results last.
    """
    r, base, step = config.results, ResultOptions(), 10 * revision
    return ResultOptions(segmentation_type=r.segmentation_type, compression=r.compression, cad_sr=r.cad_sr,
                         seg_series_number=base.seg_series_number + step,
                         sr_series_number=base.sr_series_number + step,
                         cad_series_number=base.cad_series_number + step)


def process_job(job: Job, pipeline, config: NodeConfig) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Run one job; returns its outbox entries ``(sop_instance_uid, sop_class_uid, path)`` and notes.

    Parameters
    ----------
    job
        The claimed job: its spooled instances and its result UIDs (fixed at job creation, so
        a rerun writes the same objects).
    pipeline
        Anything with ``run(datasets) -> list[ImageFindings]`` (the model pipeline or a
        ``pipeline.factory`` object).
    config
        The node configuration: ``[results]`` options and the storage layout.

    Every result object is durable in ``<storage>/outbox/job-<id>/`` before this returns;
    previews are best effort (a failure becomes a note, never a failed job).
    """
    layout = config.layout
    sources = [pydicom.dcmread(i.path) for i in job.instances]
    sources, findings, notes = run_pipeline(pipeline, sources)
    uids = ResultUIDs.from_json(job.result_uids)
    results = build_results(sources, findings, uids, options=result_options(config, job.revision))
    outbox = layout.outbox_for(job.id)
    outbox.mkdir(parents=True, exist_ok=True)
    entries = []
    for ds in results.datasets:
        target = write_durably(outbox / f"{ds.SOPInstanceUID}.dcm",
                               lambda tmp, ds=ds: ds.save_as(tmp, enforce_file_format=True))
        entries.append((str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(target)))
    fsync_dir(outbox.parent)
    if config.pipeline.previews:
        try:
            results.write_previews(layout.previews_for(job.id))
        except Exception as exc:  # previews are a convenience for IT, never a reason to fail a job
            notes.append(f"previews not written: {exc}")
    return entries, notes


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
