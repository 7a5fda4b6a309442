"""pipeline.precision: fp32 stays the reference and the default; bf16 only for accepted bundles on
a CPU with native bf16, within bench_gpu.py's tolerances of the fp32 marks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicom_ai.core.errors import ModelError
from dicom_ai.data.phantom import generate_study
from dicom_ai.imaging import read_mammogram
from dicom_ai.networks import engine
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.pipeline import Pipeline, model_from_bundle
from dicom_ai.node.config import load_config


def test_default_is_fp32_and_the_key_is_checked():
    assert load_config(None).pipeline.precision == "fp32"
    assert load_config(None, {"pipeline.precision": "bf16"}).pipeline.precision == "bf16"
    with pytest.raises(Exception, match="pipeline.precision must be 'fp32' or 'bf16'"):
        load_config(None, {"pipeline.precision": "fp16"})


def test_plan_keeps_fp32_unless_the_bundle_version_is_accepted_and_the_cpu_has_bf16(tmp_path):
    dunet = model_from_bundle(load_bundle("dunet"), "cpu")
    version = dunet.identity.version
    assert engine.cpu_bf16_plan([dunet], "fp32", "cpu", accepted={"dunet": version}, native=True) == (set(), {})
    chosen, why = engine.cpu_bf16_plan([dunet], "bf16", "cpu", accepted={"dunet": version}, native=False)
    assert chosen == set() and "no native bf16" in why["dunet"]
    chosen, why = engine.cpu_bf16_plan([dunet], "bf16", "cpu", accepted={"dunet": version + ".other"}, native=True)
    assert chosen == set() and "not measured" in why["dunet"]
    chosen, why = engine.cpu_bf16_plan([dunet], "bf16", "cpu", accepted={"dunet": version}, native=True)
    assert chosen == {id(dunet)} and why == {}
    conv = next(m for m in dunet.network.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ModelError, match="precision"):
        engine.cpu_bf16_plan([dunet], "fp16", "cpu")
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert engine.cpu_has_native_bf16(flags)
    flags.write_text("processor: 0\nflags\t\t: fpu sse avx2\n")
    assert not engine.cpu_has_native_bf16(flags)


def test_a_bf16_model_keeps_its_marks_within_the_stated_tolerances(monkeypatch):
    """The U-Net in bf16 (as accepted) through Pipeline.run against the fp32 pipeline on one
    small phantom view: max |dp| <= 0.05 and >= 99.9 % of breast pixels on the same side of the
    threshold; and the model really ran under bf16 autocast."""
    image = generate_study(7, shape=(416, 320), normal=False).images[0]
    fp32 = Pipeline.from_bundles(["dunet"], device="cpu")
    [reference] = fp32.run([image.dataset])
    monkeypatch.setattr(engine, "BF16_CPU_ACCEPTED", {"dunet": fp32.models[0].identity.version})
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    bf16 = Pipeline.from_bundles(["dunet"], device="cpu", precision="bf16")
    assert bf16.bf16 == {id(bf16.models[0])}
    seen = []
    predict = bf16.models[0].predict
    monkeypatch.setattr(bf16.models[0], "predict", lambda m: (seen.append(torch.is_autocast_enabled("cpu")),
                                                              predict(m))[1])
    [candidate] = bf16.run([image.dataset])
    assert seen == [True]
    breast = read_mammogram(image.dataset).breast_mask
    assert reference.maps and len(reference.maps) == len(candidate.maps)
    for a, b in zip(reference.maps, candidate.maps):
        assert b.probability.dtype == np.float32
        assert float(np.max(np.abs(a.probability - b.probability))) <= 0.05
        agree = np.mean((a.probability >= a.threshold)[breast] == (b.probability >= b.threshold)[breast])
        assert agree >= 0.999
