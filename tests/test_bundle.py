import json

import pytest
import torch

from dicom_ai import networks
from dicom_ai.networks.bundle import BundleError, load_bundle, load_weights, save_bundle
from dicom_ai.networks.pipeline import model_from_bundle as pipeline_model_from_bundle
from dicom_ai.networks.registry import MODEL_CLASSES, model_from_bundle

MANIFEST = {"name": "toy", "version": "0.0.1", "architecture": {"kind": "toy"}, "input": {},
            "thresholds": {"malignant_lesion": 0.5}, "intended_use": "test", "training": {}}


def test_round_trip_and_identity(tmp_path):
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_bundle(tmp_path / "b", MANIFEST, sd)
    b = load_bundle(tmp_path / "b")
    assert torch.equal(b.state_dict["w"], sd["w"])
    assert b.identity.name == "toy" and b.kind == "toy"


def test_tampered_weights_are_refused(tmp_path):
    save_bundle(tmp_path / "b", MANIFEST, {"w": torch.zeros(3)})
    (tmp_path / "b" / "weights.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(BundleError, match="SHA-256"):
        load_bundle(tmp_path / "b")


def test_pickle_weights_are_refused(tmp_path):
    save_bundle(tmp_path / "b", MANIFEST, {"w": torch.zeros(3)})
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    m["weights"] = "weights.pt"
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="safetensors"):
        load_bundle(tmp_path / "b")


# --------------------------------------------------------------------------- load_weights, registry


class _Toy(torch.nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))


def test_load_weights_checks_the_kind_then_loads_strictly(tmp_path):
    save_bundle(tmp_path / "b", MANIFEST, {"w": torch.arange(3, dtype=torch.float32)})
    bundle = load_bundle(tmp_path / "b")
    toy = load_weights(_Toy(), bundle, "toy")
    assert torch.equal(toy.w.data, torch.arange(3, dtype=torch.float32))
    with pytest.raises(BundleError, match=r"is a 'toy' bundle, not a 'glam' bundle") as info:
        load_weights(_Toy(), bundle, "glam")
    assert str(tmp_path / "b") in str(info.value)


@pytest.mark.parametrize("state,words", [
    ({"w": torch.zeros(3), "extra": torch.zeros(1)}, ["unexpected (1): extra"]),
    ({}, ["missing (1): w"]),
    ({"w": torch.zeros(4)}, ["shape", "w (4,) != (3,)"]),
])
def test_load_weights_lists_what_does_not_fit(tmp_path, state, words):
    save_bundle(tmp_path / "b", MANIFEST, state)
    with pytest.raises(BundleError, match="do not match its toy architecture") as info:
        load_weights(_Toy(), load_bundle(tmp_path / "b"), "toy")
    message = str(info.value)
    assert str(tmp_path / "b") in message and "re-export" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("kind", sorted(MODEL_CLASSES))
def test_every_model_class_refuses_a_bundle_of_another_kind(tmp_path, kind):
    save_bundle(tmp_path / "b", MANIFEST, {"w": torch.zeros(3)})
    with pytest.raises(BundleError, match=f"not a '{kind}' bundle") as info:
        MODEL_CLASSES[kind].from_bundle(load_bundle(tmp_path / "b"), "cpu")
    assert str(tmp_path / "b") in str(info.value)


def test_registry_refuses_an_unknown_kind_and_is_the_pipelines(tmp_path):
    assert pipeline_model_from_bundle is model_from_bundle is networks.model_from_bundle
    save_bundle(tmp_path / "b", MANIFEST, {"w": torch.zeros(3)})
    with pytest.raises(BundleError, match="unknown architecture kind 'toy'; known: glam, dunet, microcalc"):
        model_from_bundle(load_bundle(tmp_path / "b"), "cpu")


@pytest.mark.parametrize("kind", ["glam", "dunet", "microcalc"])
def test_shipped_bundles_load_strictly(kind):
    model = model_from_bundle(load_bundle(kind), "cpu")
    assert isinstance(model, MODEL_CLASSES[kind])
