"""Processing one job: its images through the model pipeline, its findings into result objects.

The worker process (:mod:`dicom_ai.node.worker`) claims jobs and calls :func:`process_job`;
``dicom-ai infer`` uses the same functions on files. The result UIDs come from the job (fixed
when it was created), so a job that is run again after a crash writes byte-for-byte the same
objects under the same UIDs. An image the pipeline cannot decode or analyse is skipped and
named in the job's notes; the rest of the study is processed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import pydicom

from dicom_ai.core.findings import ImageFindings
from dicom_ai.core.options import ResultOptions
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.networks.pipeline import Pipeline
from dicom_ai.node.config import NodeConfig
from dicom_ai.node.jobstore import Job
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
