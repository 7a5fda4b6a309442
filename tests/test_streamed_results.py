"""Results built image by image (ResultsBuilder, the worker's run_into_builder): the same objects
as build_results, with each image's full-size maps released before the next image runs."""

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest

from dicom_ai.core.errors import ImagingError, ResultError
from dicom_ai.core.options import ResultOptions
from dicom_ai.core.findings import ModelIdentity, ModelOutput
from dicom_ai.core.uids import ResultUIDs
from dicom_ai.networks.pipeline import Pipeline
from dicom_ai.node.processing import run_into_builder
from dicom_ai.results import ResultsBuilder, build_results

from _results_sources import make_study, roundtrip

OPTIONS = ResultOptions(cad_sr=True, gsps=True, secondary_capture=True)


def _study():
    sources, findings = make_study()
    return sources, findings, ResultUIDs.generate([str(d.SOPInstanceUID) for d in sources])


def test_builder_with_released_maps_makes_the_same_objects():
    sources, findings, uids = _study()
    reference = build_results(sources, copy.deepcopy(findings), uids, OPTIONS)
    builder = ResultsBuilder(sources, uids, OPTIONS)
    for f in findings:
        builder.add(f, release_maps=True)
        assert all(m.probability.shape == (0, 0) for m in f.maps)
    streamed = builder.finish()
    assert [d.Modality for d in streamed.datasets] == [d.Modality for d in reference.datasets]
    assert {"SEG", "PR", "SR"} <= {d.Modality for d in streamed.datasets}
    for a, b in zip(streamed.datasets, reference.datasets):
        assert roundtrip(a) == roundtrip(b)
    assert streamed.notes == reference.notes


def test_builder_refuses_unknown_and_repeated_images():
    sources, findings, uids = _study()
    builder = ResultsBuilder(sources[:2], uids)
    builder.add(findings[0])
    with pytest.raises(ResultError, match="two findings"):
        builder.add(findings[0])
    with pytest.raises(ResultError, match="not among the sources"):
        builder.add(findings[3])
    with pytest.raises(ResultError, match="no source images"):
        ResultsBuilder([], uids)


class _Pipeline:
    """Returns the prepared findings of each image; checks that the earlier images' maps are
    already released when the next image runs (what bounds the worker's memory)."""

    def __init__(self, findings, fail=()):
        self.by_uid = {f.sop_instance_uid: f for f in findings}
        self.done, self.fail = [], set(fail)

    def run(self, datasets):
        assert all(m.probability.size == 0 for f in self.done for m in f.maps)
        uid = str(datasets[0].SOPInstanceUID)
        if uid in self.fail:
            raise ValueError("cannot analyse")
        self.done.append(self.by_uid[uid])
        return [self.by_uid[uid]]


def test_run_into_builder_streams_and_skips():
    sources, findings, uids = _study()
    reference = build_results([sources[0]] + sources[2:], copy.deepcopy([findings[0]] + findings[2:]), uids,
                              OPTIONS)
    pipeline = _Pipeline(findings, fail={str(sources[1].SOPInstanceUID)})
    builder = ResultsBuilder(sources, uids, OPTIONS)
    timings = {}
    skipped = run_into_builder(pipeline, list(sources), builder, timings)
    assert len(pipeline.done) == 3 and timings["pipeline"] >= 0.0
    assert len(skipped) == 1 and str(sources[1].SOPInstanceUID) in skipped[0] and "ValueError" in skipped[0]
    streamed = builder.finish()
    assert len(streamed.datasets) == len(reference.datasets)
    for a, b in zip(streamed.datasets, reference.datasets):
        assert roundtrip(a) == roundtrip(b)


def test_run_into_builder_with_no_image_left():
    sources, findings, uids = _study()
    pipeline = _Pipeline(findings, fail={str(d.SOPInstanceUID) for d in sources})
    with pytest.raises(ImagingError, match="no image of the study"):
        run_into_builder(pipeline, list(sources), ResultsBuilder(sources, uids), {})


def test_region_set_mask_is_the_union_of_its_regions_with_holes_filled():
    from dicom_ai.results.regions import Spacing, find_regions

    prob = np.zeros((60, 80), np.float32)
    prob[10:30, 10:30] = 0.9
    prob[12:28, 12:28] = 0.0  # a ring ...
    prob[18:21, 18:21] = 0.8  # ... with a component inside its hole, swallowed by the fill
    prob[40:50, 50:70] = 0.7
    rs = find_regions(prob, 0.5, Spacing(0.1, 0.1, "detector"))
    expected = np.zeros(prob.shape, bool)
    expected[10:30, 10:30] = True
    expected[40:50, 50:70] = True
    assert len(rs.regions) == 2 and rs.shape == prob.shape
    np.testing.assert_array_equal(rs.mask, expected)


def test_checked_encodings_are_the_files_the_outbox_writes():
    """The SEGs and presentation states are encoded once, when checked; the bytes kept are those
    ``save_as`` gives for the final object (creation values pinned first), so the outbox may
    write them instead of encoding again."""
    sources, findings, uids = _study()
    results = build_results(sources, findings, uids, OPTIONS)
    kinds = {d.Modality for d in results.datasets if str(d.SOPInstanceUID) in results.encoded}
    assert {"SEG", "PR"} <= kinds and "SR" not in kinds
    for ds in results.datasets:
        data = results.encoded.get(str(ds.SOPInstanceUID))
        if data is not None:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            assert buffer.getvalue() == data


def test_the_worker_reads_the_writers_tables_when_it_loads_its_pipeline():
    """highdicom's standard tables (about 1 s of JSON) are read by load_pipeline at worker
    start, not inside the first job. Checked in a fresh interpreter, as a worker starts: in
    this test process other tests have already read (or replaced) highdicom's caches."""
    script = (
        "from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map\n"
        "from dicom_ai.node.config import load_config\n"
        "from dicom_ai.node.processing import load_pipeline\n"
        "tables = (get_sop_class_iod_map, get_iod_module_map, get_module_attribute_map)\n"
        "before = [t.cache_info().currsize for t in tables]\n"
        "import SimpleITK as sitk\n"
        "load_pipeline(load_config(None, {'pipeline.factory': 'node_harness:stand_in_pipeline'}))\n"
        "print(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())\n"
        "print(before, [t.cache_info().currsize for t in tables])\n")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[0, 0, 0] [1, 1, 1]"
    assert out.stdout.split("\n")[-3] == "1"  # and its ITK filters run on one thread (SITK_THREADS)


def test_pipeline_runs_the_models_in_run_order():
    """Whatever the configured order, each image runs GLAM, the microcalcification model, then the
    U-Net (RUN_ORDER: the cascade's peak memory on fewer held maps), other models after them."""
    ran = []

    class Stub:
        def __init__(self, name):
            self.identity = ModelIdentity(name, "1")

        def predict(self, mammogram):
            ran.append(self.identity.name)
            return ModelOutput()

    sources, _ = make_study()
    pipeline = Pipeline([Stub(n) for n in ("dunet", "other", "microcalc", "glam")])
    pipeline.run(sources[:1])
    assert ran == ["glam", "microcalc", "dunet", "other"]
    assert [m.identity.name for m in pipeline.models] == ["dunet", "other", "microcalc", "glam"]
