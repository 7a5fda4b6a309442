"""Processing one job: its images through the model pipeline, its findings into result objects.

The worker process (:mod:`dicom_ai.node.worker`) claims jobs and calls :func:`build_job_results`
(the result objects, durable in the outbox), records the job, then :func:`write_job_previews`;
:func:`process_job` does both at once, and ``dicom-ai infer`` uses the same functions on files. The result UIDs come from the job (fixed
when it was created), so a job that is run again after a crash writes byte-for-byte the same
objects under the same UIDs. An image the pipeline cannot decode or analyse is skipped and
named in the job's notes; the rest of the study is processed.

Received files are untrusted. Their compressed pixel data is decoded in a
:class:`~dicom_ai.node.sandbox.DecodeSandbox` (a child process under the ``[limits]`` memory
and time limits), so a codec that panics, crashes, exhausts memory or never returns costs
that image only. The attributes the result writers copy from the sources are checked against
their VRs by :class:`~dicom_ai.results.ResultsBuilder` (``results.notes``), so an invalid Patient's
Birth Date costs that attribute, not the job. Text that is stored or logged (notes, a job's
error) goes through :func:`~dicom_ai.node.logs.scrub`: it never carries a data set value.
"""

from __future__ import annotations

import ctypes
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pydicom
import SimpleITK as sitk
import torch

from dicom_ai.core.errors import DicomAIError, ImagingError
from dicom_ai.core.findings import ImageFindings
from dicom_ai.core.options import ResultOptions
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.networks.pipeline import Pipeline, resolve_device
from dicom_ai.node.config import NodeConfig
from dicom_ai.node import logs
from dicom_ai.node.jobstore import Instance, Job
from dicom_ai.node.sandbox import DecodeFailed, DecodeSandbox
from dicom_ai.node.storage import fsync_dir, write_durably
from dicom_ai.results import ResultsBuilder, StudyResults
from dicom_ai.results.sources import load_standard_tables

PipelineFactory = Callable[[Sequence[str], str], object]


#: torch intra-op threads of a CPU pipeline. The U-Net and GLAM's compact networks are too small
#: to gain from a second thread, and where other work shares the cores OpenMP's barriers wait
#: for a descheduled thread: measured on 2 shared cores (load ~3), GLAM 0.18 s per image with
#: one thread against 0.4-1.9 s with two, the U-Net 0.09 s against 0.24-1.6 s. ONNX Runtime
#: (the microcalcification networks) keeps its own pool over every core.
CPU_TORCH_THREADS = 1


#: SimpleITK (ITK) threads per filter in the process that runs the pipeline: the breast and
#: pectoral masks, the restriction to the breast and the regions' labelling run ITK filters on
#: one image at a time, too small to gain from a second thread, and ITK's threads wait on one
#: another when other work holds the cores. Measured in-process on the full-size four-view
#: study at the all-on point (prepare + restrict + regions, alternating, 5 rounds, load ~3):
#: one thread 2.7-3.1 s against 3.0-3.8 s with two (median per-round ratio 0.81); the same
#: labels, masks and regions either way (results do not depend on ITK's thread count).
SITK_THREADS = 1


#: glibc's mmap threshold in the process that runs the pipeline (bytes). glibc raises the
#: threshold after each large block is freed, up to 32 MiB, so an image's full-size maps and
#: masks then come from the heap and stay resident once freed; with the threshold fixed, every
#: large array goes back to the system when it is freed. Measured on the full-size phantom
#: study (bench_turnaround.py): it keeps about 35 MiB per image less resident after each image.
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def release_freed_memory_promptly() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`; returns False where the C library
    is not glibc (nothing is changed there)."""
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def load_pipeline(config: NodeConfig):
    """The configured pipeline: ``pipeline.factory`` if set, else the model bundles (on a
    CPU with torch at :data:`CPU_TORCH_THREADS` threads), in a process whose freed large
    arrays go back to the system (:func:`release_freed_memory_promptly`), whose ITK filters
    run on :data:`SITK_THREADS` thread(s) and which has read the result writers' standard
    tables (:func:`~dicom_ai.results.sources.load_standard_tables`)."""
    release_freed_memory_promptly()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(SITK_THREADS)
    load_standard_tables()  # the writers' tables, read once here rather than inside the first job
    if config.pipeline.factory:
        module, _, name = config.pipeline.factory.partition(":")
        factory = importlib.import_module(module)
        for part in name.split("."):
            factory = getattr(factory, part)
        return factory(config.pipeline.models, config.pipeline.device)
    if resolve_device(config.pipeline.device).type == "cpu":
        torch.set_num_threads(CPU_TORCH_THREADS)
    return Pipeline.from_bundles(config.pipeline.models, config.pipeline.device,
                                 operating_point=config.pipeline.operating_point,
                                 precision=config.pipeline.precision)


def destinations_for(config: NodeConfig, calling_ae: str) -> list[tuple[str, str, int]]:
    """Where a study's results go: the peer that sent it (if configured) and the extra destinations.

    A DICOMweb destination is ``(name, url, 0)`` (:func:`dicom_ai.node.stow.is_dicomweb`). Which
    objects each gets (its ``objects`` key) is decided when they are sent, by the delivery agent.
    """
    out = []
    origin = config.peer(calling_ae)
    if origin is not None:
        out.append((origin.ae_title, origin.host, origin.port))
    out += [(d.ae_title, d.url, 0) if d.url else (d.ae_title, d.host, d.port) for d in config.destinations]
    return out


def error_text(exc: BaseException) -> str:
    """``"<exception type>: <scrubbed message>"``: what may be stored, logged or printed of an error."""
    return f"{type(exc).__name__}: {logs.scrub(str(exc))}"


def skipped_note(sop_instance_uid: str, why: str, reason: str) -> str:
    """The note for an image left out of a job (``why`` already scrubbed): ``image <SOP Instance
    UID> skipped (<reason>): <why>``, ``reason`` a metric label (read back by
    :func:`~dicom_ai.node.jobstore.left_out_images`)."""
    return f"image {sop_instance_uid} skipped ({reason}): {why}"


@dataclass
class LeftOut:
    """An image of a job that could not be read or decoded."""

    sop_instance_uid: str
    reason: str        # unreadable, codec_error, decode_memory, decoder_crashed, decode_timeout, ...
    why: str           # error type and scrubbed message
    repeatable: bool   # the same file fails the same way on every try (see DecodeFailed)

    @property
    def note(self) -> str:
        return skipped_note(self.sop_instance_uid, self.why, self.reason)


def run_pipeline(pipeline, sources: list[pydicom.Dataset]) -> tuple[list[pydicom.Dataset], list[ImageFindings], list[str]]:
    """Findings for every image the pipeline can handle; returns (kept sources, findings, skipped notes).

    Each image is run once, on its own, so an image that cannot be decoded or analysed is
    skipped (and named in the notes, scrubbed of values) without running the rest of the
    study twice.

    Raises
    ------
    ImagingError
        No image of the study could be processed.
    """
    kept, findings, skipped = [], [], []
    for ds in sources:
        try:
            findings += list(pipeline.run([ds]))
            kept.append(ds)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            # Not only Exception: a Rust codec's panic (pyo3 PanicException) derives from
            # BaseException. In the node the sandbox has decoded the pixels already; this is
            # for `dicom-ai infer` and for pipelines that decode on their own.
            skipped.append(skipped_note(str(ds.SOPInstanceUID), error_text(exc), "analysis_error"))
    if not kept:
        raise ImagingError("no image of the study could be processed: " + "; ".join(skipped))
    return kept, findings, skipped


def run_into_builder(pipeline, sources: list[pydicom.Dataset], builder: ResultsBuilder,
                     timings: dict[str, float]) -> list[str]:
    """Run the pipeline image by image and add each image's findings to ``builder`` at once,
    its full-size maps released once its SEG is built; returns the skipped notes.

    As :func:`run_pipeline`, an image the pipeline cannot handle is skipped and named in the
    notes. ``timings["pipeline"]`` gets the seconds spent in the pipeline. ``sources[i]`` is
    set to None once image i has run: the writers copy from the builder's cleaned sources.

    Raises
    ------
    ImagingError
        No image of the study could be processed.
    """
    skipped, kept, seconds = [], 0, 0.0
    for i, ds in enumerate(sources):
        started = time.perf_counter()
        try:
            image_findings = list(pipeline.run([ds]))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # not only Exception: see run_pipeline
            skipped.append(skipped_note(str(ds.SOPInstanceUID), error_text(exc), "analysis_error"))
            continue
        finally:
            seconds += time.perf_counter() - started
            sources[i] = None
        kept += 1
        for f in image_findings:
            builder.add(f, release_maps=True)
    timings["pipeline"] = seconds
    if not kept:
        raise ImagingError("no image of the study could be processed: " + "; ".join(skipped))
    return skipped


def read_sources(instances: Sequence[Instance], config: NodeConfig,
                 job_id: int | None = None) -> tuple[list[pydicom.Dataset], list[LeftOut]]:
    """The job's spooled images, read and with their pixel data decoded in a sandbox.

    Parameters
    ----------
    instances
        The job's spooled instances.
    config
        ``[limits] decode_memory_mb`` and ``decode_timeout_seconds`` bound the decoding of one
        image; the sandbox's scratch folder is under the storage directory.
    job_id
        For the log lines.

    Returns
    -------
    sources : list of pydicom.Dataset
        Every image that could be read and decoded, in order, with native Pixel Data.
    left_out : list of LeftOut
        One per image left out: its SOP Instance UID, why (never a value), and whether a
        retry could change it.
    """
    sources, left_out = [], []

    def sandbox_warning(message: str, category: str, filename: str, lineno: int) -> None:
        logs.log_warning(message, category, filename, lineno)

    with DecodeSandbox(config.layout.decode_scratch, config.limits.decode_memory_mb, config.limits.decode_timeout_seconds,
                       on_warning=sandbox_warning) as sandbox:
        for instance in instances:
            try:
                ds = pydicom.dcmread(instance.path)
                sources.append(sandbox.decode(ds, instance.path))
            except OSError:
                raise  # the spool or the disk, not the image: the job is retried
            except Exception as exc:
                # A file that passed admission but pydicom cannot read, or a codec that fails on
                # its bytes, fails the same way on every try; a timeout or an outside kill may not.
                failed = isinstance(exc, DecodeFailed)
                item = LeftOut(instance.sop_instance_uid, exc.reason if failed else "unreadable", error_text(exc),
                               exc.repeatable if failed else True)
                left_out.append(item)
                logs.event("image_skipped", level="WARNING", job_id=job_id, sop_instance_uid=instance.sop_instance_uid,
                           reason=item.reason, repeatable=item.repeatable, error=item.why)
    return sources, left_out


def result_options(config: NodeConfig, revision: int = 0) -> ResultOptions:
    """The result writers' options from the ``[results]`` section.

    Results of a superseding job (``revision`` > 0, after late images) get series numbers
    10 higher per revision, so viewers list the newest results last.
    """
    r, base, step = config.results, ResultOptions(), 10 * revision
    return ResultOptions(segmentation_type=r.segmentation_type, compression=r.compression, cad_sr=r.cad_sr,
                         gsps=r.gsps, secondary_capture=r.secondary_capture,
                         seg_series_number=base.seg_series_number + step,
                         sr_series_number=base.sr_series_number + step,
                         cad_series_number=base.cad_series_number + step,
                         gsps_series_number=base.gsps_series_number + step,
                         sc_series_number=base.sc_series_number + step)


@dataclass
class JobResults:
    """What :func:`build_job_results` made of a job: its outbox entries ``(sop_instance_uid,
    sop_class_uid, path)``, its notes, and the study's results (None when there is nothing),
    which :func:`write_job_previews` draws once the job is recorded."""

    entries: list[tuple[str, str, str]]
    notes: list[str]
    results: StudyResults | None = None


def process_job(job: Job, pipeline, config: NodeConfig,
                timings: dict[str, float] | None = None) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Run one job and write its previews; returns its outbox entries ``(sop_instance_uid,
    sop_class_uid, path)`` and notes.

    :func:`build_job_results`, then :func:`write_job_previews` (its note, if any, added to the
    notes). The worker calls the two itself, recording the job and queueing its deliveries in
    between, so the results never wait for a preview.
    """
    timings = {} if timings is None else timings
    built = build_job_results(job, pipeline, config, timings)
    note = write_job_previews(built, config, job.id, timings)
    return built.entries, built.notes + ([note] if note else [])


def write_job_previews(built: JobResults, config: NodeConfig, job_id: int,
                       timings: dict[str, float] | None = None) -> str | None:
    """Write the job's preview PNGs (``pipeline.previews``) into ``<storage>/previews/job-<id>/``;
    returns a note when they could not be written (None when written, off, or nothing to draw).

    Previews are best effort: a failure is a note, never a failed job. ``timings["previews"]``
    gets the seconds spent when previews are on.
    """
    if not config.pipeline.previews or built.results is None:
        return None
    started = time.perf_counter()
    try:
        built.results.write_previews(config.layout.previews_for(job_id))
        note = None
    except Exception as exc:  # previews are a convenience for IT, never a reason to fail a job
        note = f"previews not written: {error_text(exc)}"
    if timings is not None:
        timings["previews"] = time.perf_counter() - started
    return note


def build_job_results(job: Job, pipeline, config: NodeConfig,
                      timings: dict[str, float] | None = None) -> JobResults:
    """Run one job's images through the pipeline and write its result objects into the outbox.

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
    timings
        If given, filled with wall seconds per stage: ``decode`` (reading the spool and
        decoding in the sandbox), ``pipeline`` (all images through the models), each writer
        of :attr:`~dicom_ai.results.build.StudyResults.seconds` (``regions``, ``seg``,
        ``gsps``, ``sr``, ...) and ``outbox`` (durable writes).

    Every result object is durable in ``<storage>/outbox/job-<id>/`` before this returns;
    the previews are not written (:func:`write_job_previews`). When no image could be read
    and decoded and every failure is repeatable (:class:`LeftOut`), there is nothing to make
    and nothing a retry could change: no entries, and the notes say why.

    Raises
    ------
    DicomAIError
        The job cannot be completed (no image could be processed, the results cannot be
        built); its message is the original error's type and scrubbed text.
    OSError
        The storage failed (reading the spool, writing the outbox); the job is retried.
    """
    layout = config.layout
    timings = {} if timings is None else timings
    clock = time.perf_counter
    try:
        started = clock()
        sources, left_out = read_sources(job.instances, config, job.id)
        notes = [item.note for item in left_out]
        timings["decode"] = clock() - started
        if not sources:
            if all(item.repeatable for item in left_out):
                # Another attempt would read the same bytes and fail the same way: the job ends
                # here, done with nothing to send, its notes naming each image and why.
                return JobResults([], notes)
            raise ImagingError("no image of the study could be read and decoded: " + "; ".join(notes))
        uids = ResultUIDs.from_json(job.result_uids)
        builder = ResultsBuilder(sources, uids, options=result_options(config, job.revision))
        # Each image's results are built, and its full-size maps released, as soon as its
        # models have run: the worker holds one image's maps at a time, not the study's.
        skipped = run_into_builder(pipeline, sources, builder, timings)
        results = builder.finish()
        timings.update(results.seconds)
        notes += skipped + results.notes
    except OSError:
        raise
    except Exception as exc:
        # The worker stores and logs what it catches: only the type and the scrubbed text,
        # and not chained, so no traceback carries the original message either.
        raise DicomAIError(error_text(exc)) from None
    started = clock()
    outbox = layout.outbox_for(job.id)
    outbox.mkdir(parents=True, exist_ok=True)
    entries = []
    for ds in results.datasets:
        encoded = results.encoded.get(str(ds.SOPInstanceUID))  # the bytes its check made: not encoded twice
        target = write_durably(outbox / f"{ds.SOPInstanceUID}.dcm",
                               (lambda tmp, data=encoded: tmp.write_bytes(data)) if encoded is not None else
                               (lambda tmp, ds=ds: ds.save_as(tmp, enforce_file_format=True)))
        entries.append((str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(target)))
    fsync_dir(outbox.parent)
    timings["outbox"] = clock() - started
    # The objects are on disk: only what the previews draw is kept (the images' sources and
    # segments), not the encoded objects (a few MB per SEG) while the job is recorded.
    results.datasets, results.encoded = [], {}
    return JobResults(entries, notes, results)
