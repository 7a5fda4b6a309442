"""GLAM's self-supervised initialisation: restoration learns, encoders round-trip, mismatches refuse."""

import sys
from pathlib import Path

import pytest
import torch

from dicom_ai.core.errors import ModelError
from dicom_ai.networks.glam import Glam
from dicom_ai.training.glam_pretrain import load_pretrained, pretrain, pretrained_record, save_pretrained

sys.path.insert(0, str(Path(__file__).parent))
from test_glam_train import TINY, _toy_data  # noqa: E402


def test_restoration_beats_the_identity_and_the_encoders_round_trip(tmp_path):
    torch.manual_seed(0)
    net = Glam(TINY)
    data = _toy_data(16)
    history = pretrain(net, data.mammograms, data.breast_masks, epochs_global=6, epochs_local=3, batch_size=8,
                       lr=3e-3, progress=False)
    last_global = [h for h in history if h["stage"] == "pretrain_global"][-1]
    # The network restores the distorted windows better than returning them unchanged.
    assert last_global["restoration_mse"] < last_global["identity_mse"]
    path = save_pretrained(tmp_path / "pre.safetensors", net, history, "toy")
    fresh = Glam(TINY)
    record = load_pretrained(fresh, path)
    assert record["config"] == "tiny" and record["history"] == history
    for key, value in net.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    assert "no labels" in pretrained_record(path)["task"]


def test_a_file_of_another_configuration_or_kind_is_refused(tmp_path):
    from dataclasses import replace

    from safetensors.torch import save_file

    net = Glam(TINY)
    path = save_pretrained(tmp_path / "pre.safetensors", net, [], "toy")
    wider = Glam(replace(TINY, name="wider", global_channels=(8, 8, 8, 8, 8)))
    with pytest.raises(ModelError, match="does not fit"):
        load_pretrained(wider, path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="not a GLAM pretraining file"):
        load_pretrained(net, tmp_path / "other.safetensors")
