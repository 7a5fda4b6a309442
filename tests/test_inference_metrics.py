"""Per-model inference time reaches /metrics through the job store (issue 17)."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, generate_latest

from dicom_ai.node.jobstore import Instance, JobStore
from dicom_ai.node.metrics import JobStoreCollector
from dicom_ai.node.supervisor import make_result_uids


def test_model_seconds_recorded_with_the_job_become_a_histogram_per_model(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    for uid, view in (("1.2.3.1", "CC"), ("1.2.3.2", "MLO")):
        store.record_instance(study_uid="1.2.3", calling_ae="PACS", size=1, now=0.0,
                              instance=Instance(uid, "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.1.2.1", "L", view,
                                                str(tmp_path / uid)))
    assert store.close_ready_studies(0, 1, make_result_uids, now=10.0)
    job = store.claim_job()
    timings = {"glam": [0.2, 0.4], "dunet": [3.0, 40.0]}
    assert store.complete_job(job, [], [], model_seconds=timings) == "done"
    row = store._conn().execute("SELECT model_seconds FROM jobs WHERE id = ?", (job.id,)).fetchone()
    assert json.loads(row[0]) == timings

    registry = CollectorRegistry()
    registry.register(JobStoreCollector(tmp_path / "jobs.sqlite", tmp_path, 0))
    text = generate_latest(registry).decode()
    assert 'dicom_ai_inference_seconds_count{model="glam"} 2.0' in text
    assert 'dicom_ai_inference_seconds_bucket{le="0.25",model="glam"} 1.0' in text
    assert 'dicom_ai_inference_seconds_bucket{le="30.0",model="dunet"} 1.0' in text
    assert 'dicom_ai_inference_seconds_sum{model="dunet"} 43.0' in text


def test_the_pipeline_times_each_model_per_image_and_hands_the_times_over_once():
    from dicom_ai.networks.pipeline import Pipeline

    class Model:
        def __init__(self, name):
            from dicom_ai.core.findings import ModelIdentity
            self.identity = ModelIdentity(name=name, version="0")

        def predict(self, mammogram):
            from dicom_ai.core.findings import ModelOutput
            return ModelOutput(maps=[], scores=[])

    from _results_sources import built_small
    sources = built_small()[0]
    pipeline = Pipeline([Model("a"), Model("b")])
    pipeline.run(sources)
    seconds = pipeline.take_model_seconds()
    assert set(seconds) == {"a", "b"} and all(len(v) == len(sources) for v in seconds.values())
    assert all(s >= 0 for v in seconds.values() for s in v)
    assert pipeline.take_model_seconds() == {}
