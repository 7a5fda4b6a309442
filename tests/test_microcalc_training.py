"""Microcalcification training on any data set: degradation, cached patches, resumable cascade, CLI."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dicom_ai.cli import main as cli_main
from dicom_ai.cli.train import _dataset_spec, microcalc_config
from dicom_ai.data.insertion import gaussian_blur
from dicom_ai.data.phantom import power_law_field
from dicom_ai.data.sample import MASK_KEYS, Sample
from dicom_ai.imaging import mammogram_from_array
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.microcalc import MicrocalcConfig, MicrocalcModel
from dicom_ai.networks.microcalc_clusters import WINDOW, contrast_window
from dicom_ai.training.checkpoint import RunState
from dicom_ai.training.microcalc import (STRATUM_BOUNDS, Degradation, IntensityAugmentation, PatchSet,
                                         dataset_patches, degrade_resolution, extract_patches, intensity_augment,
                                         stratum_limits, train_cascade, working_grid_of)


def _speckled(rng, shape=(160, 160), n_dots=10):
    image = 0.45 + 0.05 * rng.standard_normal(shape).astype(np.float32) * 0.2
    mask = np.zeros(shape, bool)
    rr, cc = np.mgrid[:shape[0], :shape[1]]
    for _ in range(n_dots):
        r, c = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10)
        disk = (rr - r) ** 2 + (cc - c) ** 2 <= 2.0 ** 2
        mask |= disk
        image[disk] += 0.3
    return np.clip(image, 0, 1).astype(np.float32), mask


def _patches(seed=0, n=3):
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(n):
        image, mask = _speckled(rng)
        sets.append(extract_patches(image, mask, np.ones_like(mask), rng,
                                    {"on": 30, "edge": 20, "near": 20, "periphery": 30, "far": 40}))
    return PatchSet.concat(sets)


def test_degrade_resolution_blurs_specks_onto_coarse_levels():
    image = np.full((200, 160), 0.4, np.float32)
    image[100, 80] = 1.0  # a one-pixel speck at 0.05 mm
    out = degrade_resolution(image, 0.2, 0.05, bits=8)
    assert out.shape == image.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out[100, 80] < 0.6  # at 0.2 mm the speck is averaged with its 4x4 neighbourhood
    assert abs(float(np.median(out)) - 0.4) < 1 / 255  # flat tissue keeps its level (8-bit step)
    # Degradation draws are per image and seeded; share 0 never degrades.
    d = Degradation(share=0.5, spacing_mm=(0.1, 0.2))
    draws = [d.draw(0, i) for i in range(200)]
    assert draws == [d.draw(0, i) for i in range(200)]
    coarse = [v for v in draws if v is not None]
    assert 60 < len(coarse) < 140 and all(0.1 <= v <= 0.2 for v in coarse)
    assert Degradation().draw(0, 3) is None


def test_intensity_augment_keeps_range_and_padding():
    x = torch.rand(16, 1, 29, 29) * 0.8 + 0.1
    x[:, :, :, :5] = 0.0  # outside the image
    out = intensity_augment(x, torch.Generator().manual_seed(0), IntensityAugmentation())
    assert out.shape == x.shape and 0.0 <= out.min() and out.max() <= 1.0
    assert torch.all(out[:, :, :, :5] == 0) and not torch.allclose(out, x)


def test_train_cascade_resumes_where_it_stopped(tmp_path):
    torch.set_num_threads(1)
    patches, val = _patches(0), _patches(1, n=1)
    cfg = MicrocalcConfig(patch_size=29, widths=(4, 8, 8), fc_units=8)
    mined = []

    def mine(detector, segmentator):
        mined.append(1)
        return patches, patches  # any patches will do: what matters is that they are kept

    kw = dict(steps=20, hard_steps=10, batch=16, lr=2e-3, seed=3, block=10, mine=mine,
              intensity=IntensityAugmentation(), val=val, progress=False)
    whole, history, _ = train_cascade(cfg, patches, state=RunState(tmp_path / "whole"), **kw)
    assert [r["phase"] for r in history] == ["detector-1"] * 2 + ["segmentator-1"] * 2 + ["detector-2", "segmentator-2"]
    assert "detector_val_balanced_accuracy" in history[0] and "segmentator_loss" in history[2]
    assert (tmp_path / "whole" / "curves.csv").read_text().count("\n") == 1 + len(history)
    assert (tmp_path / "whole" / "curves.png").is_file()

    class Stop(Exception):
        pass

    def stop_after(n):
        def hook(record):
            if record["epoch"] == n:
                raise Stop

        return hook

    state = RunState(tmp_path / "cut")
    for n in (3, 5):  # inside the first Segmentator phase, then after mining
        with pytest.raises(Stop):
            train_cascade(cfg, patches, state=state, resume=True, on_block=stop_after(n), **kw)
    resumed, history2, counts = train_cascade(cfg, patches, state=state, resume=True, **kw)
    assert len(mined) == 2  # the resumed run read the mined negatives back instead of mining again
    assert [r["epoch"] for r in history2] == [1, 2, 3, 4, 5, 6] and counts["detector"] == len(patches)
    for role in whole:
        for key, value in whole[role].state_dict().items():
            torch.testing.assert_close(resumed[role].state_dict()[key], value, rtol=0, atol=1e-6)


class _FakeData:
    """An adapter-like list of samples with calcification masks (no patient data)."""

    def __init__(self, n=3):
        rng = np.random.default_rng(5)
        self.samples = []
        for k in range(n):
            image, mask = _speckled(rng, (120, 100), n_dots=6)
            mg = mammogram_from_array(image, "L", "CC", (0.1, 0.1))
            masks = {key: np.zeros(image.shape, bool) for key in MASK_KEYS}
            masks["calcification_malignant"] = mask
            self.samples.append(Sample(mg, masks, {"benign": False, "malignant": True}, "CC", "L", f"w{k}", "test"))
        self.records = list(range(n))

    def __getitem__(self, i):
        return self.samples[i]


def test_dataset_patches_are_cached_per_image_and_degradation(tmp_path):
    data = _FakeData()
    first = dataset_patches(data, "fake", [0, 2], tmp_path, "t1", progress=False)
    again = dataset_patches(data, "fake", [0, 2], tmp_path, "t1", progress=False)
    assert len(first) > 0 and set(first.source) == {0, 2}
    np.testing.assert_array_equal(first.images, again.images)
    assert first.masks[:, 24, 24].any()  # on-calcification patches (0.1 mm -> 0.05 mm working grid)
    degraded = dataset_patches(data, "fake", [0, 2], tmp_path, "t1", Degradation(share=1.0), progress=False)
    assert len(list(tmp_path.iterdir())) == 4 and not np.array_equal(degraded.images, first.images)


def test_dataset_spec_needs_a_folder_except_for_installed_data():
    assert _dataset_spec("hybrid:cbis-ddsm-cases") == ("hybrid:cbis-ddsm-cases", None)
    assert _dataset_spec("phantom") == ("phantom", None)
    assert _dataset_spec("hybrid:real-png-normals=/x") == ("hybrid:real-png-normals", "/x")
    for text in ("mias", "hybrid:mias-normals"):
        with pytest.raises(argparse.ArgumentTypeError, match="needs its folder"):
            _dataset_spec(text)


def _write_pngs(folder, rows=480, cols=360):
    folder.mkdir()
    for n, name in enumerate(("1_L_CC", "2_L_CC", "3_L_CC")):
        rng = np.random.default_rng(20 + n)
        r, c = np.mgrid[0:rows, 0:cols]
        inside = ((r - rows / 2) / (0.46 * rows)) ** 2 + (c / (0.85 * cols)) ** 2 < 1
        img = gaussian_blur(0.45 + 0.08 * power_law_field(rng, (rows, cols), 0.07, 3.0)
                            + rng.standard_normal((rows, cols)).astype(np.float32) * 0.01, 0.5)
        img = np.where(inside, np.clip(img, 0.05, 0.95), 0.0)
        Image.fromarray((img * 65535).round().astype(np.uint16)).save(folder / f"{name}.png")


def test_cli_trains_on_a_hybrid_folder_and_resumes(tmp_path, capsys):
    _write_pngs(tmp_path / "site-a")
    argv = ["train", "microcalc", "--dataset", f"hybrid:real-png-normals={tmp_path / 'site-a'}", "--folds", "0,1,2,3",
            "--copies", "2", "--degrade-share", "0.5", "--intensity-aug", "--patch-size", "29", "--steps", "4",
            "--hard-steps", "2", "--block", "2", "--batch", "8", "--mine-images", "1", "--no-progress",
            "--cache", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "b"),
            "--version", "0.0.9"]
    assert cli_main(argv) == 0
    bundle = load_bundle(tmp_path / "b")
    m = bundle.manifest
    assert "site-a" not in json.dumps(m)  # the command line and sources name no data folder
    assert "--dataset hybrid:real-png-normals=<folder>" in m["training"]["command"]
    src = m["training"]["sources"][0]
    assert src["dataset"] == "hybrid:real-png-normals" and src["images"] + src["held_out_images"] == 6
    assert "AGPL" in m["licence"] and m["training"]["augmentation"]["resolution"]["share"] == 0.5
    assert len(m["training"]["history"]) == 2 + 2 + 1 + 1
    assert (tmp_path / "run" / "curves.csv").is_file() and (tmp_path / "run" / "curves.png").is_file()
    assert isinstance(MicrocalcModel.from_bundle(bundle, "cpu"), MicrocalcModel)
    # A finished run resumed trains nothing more and writes the same weights.
    assert cli_main(argv + ["--resume", "--out", str(tmp_path / "b2")]) == 0
    assert load_bundle(tmp_path / "b2").manifest["weights_sha256"] == m["weights_sha256"]


def test_working_pixel_size_keeps_the_millimetre_sizes():
    # 0.05 mm is today's recipe, unchanged; 0.1 mm keeps the same distances in mm.
    assert stratum_limits(0.05) == {k: STRATUM_BOUNDS[k][1] for k in ("edge", "near", "periphery")}
    assert stratum_limits(0.1) == {"edge": 1, "near": 4, "periphery": 12}
    assert contrast_window(0.05) == WINDOW == 41 and contrast_window(0.1) == 21
    assert microcalc_config(49, "valid", 0.05) == MicrocalcConfig()
    cfg = microcalc_config(29, "valid", 0.1)
    assert (cfg.pixel_spacing_mm, cfg.min_calcification_px, cfg.patch_size, cfg.near) == (0.1, 1, 29, 4)
    assert cfg.cluster_margin_mm == MicrocalcConfig().cluster_margin_mm  # already in mm


def test_coarser_working_grid_keeps_small_specks_and_its_own_cache(tmp_path):
    # Specks of 2 x 2 source pixels at 0.05 mm: a 0.1 mm working grid keeps every one of them.
    image = np.full((200, 160), 0.4, np.float32)
    mc = np.zeros(image.shape, bool)
    for r, c in [(41, 41), (60, 91), (101, 60), (150, 121), (121, 31)]:
        mc[r:r + 2, c:c + 2] = True
    image[mc] = 0.8
    mg = mammogram_from_array(image, "L", "CC", (0.05, 0.05))
    masks = {key: np.zeros(image.shape, bool) for key in MASK_KEYS}
    masks["calcification_malignant"] = mc
    breast = np.ones(image.shape, bool)
    img_w, mc_w, _ = working_grid_of(mg, masks, breast, 0.1)
    assert img_w.shape == (100, 80)
    for r, c in [(41, 41), (60, 91), (101, 60), (150, 121), (121, 31)]:
        assert mc_w[max(r // 2 - 1, 0):r // 2 + 2, max(c // 2 - 1, 0):c // 2 + 2].any()
    # Same source at 0.05 mm: unchanged nearest-neighbour mask.
    np.testing.assert_array_equal(working_grid_of(mg, masks, breast, 0.05)[1], mc)
    data = _FakeData()
    fine = dataset_patches(data, "fake", [0], tmp_path, "t1", progress=False)
    coarse = dataset_patches(data, "fake", [0], tmp_path, "t1", progress=False, spacing_mm=0.1)
    assert len(list(tmp_path.iterdir())) == 2 and coarse.masks[:, 24, 24].any()
    assert coarse.masks.sum() < fine.masks.sum()  # the same specks cover fewer 0.1 mm pixels


def test_cli_pixel_size_flows_into_the_bundle_and_guards_degradation(tmp_path, capsys):
    _write_pngs(tmp_path / "site-a")
    base = ["train", "microcalc", "--dataset", f"hybrid:real-png-normals={tmp_path / 'site-a'}", "--folds", "0,1,2,3",
            "--copies", "1", "--patch-size", "29", "--steps", "2", "--hard-steps", "0", "--block", "2", "--batch", "8",
            "--no-progress", "--cache", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"),
            "--out", str(tmp_path / "b"), "--pixel-size", "0.1"]
    with pytest.raises(SystemExit, match="at least the working pixel size"):
        cli_main(base + ["--degrade-share", "0.5", "--degrade-mm", "0.07", "0.2"])
    with pytest.raises(SystemExit, match="phantom patches"):
        cli_main(["train", "microcalc", "--pixel-size", "0.1", "--steps", "1", "--no-progress",
                  "--out", str(tmp_path / "p")])
    assert cli_main(base + ["--degrade-share", "0.5", "--degrade-mm", "0.1", "0.2"]) == 0
    m = load_bundle(tmp_path / "b").manifest
    assert m["architecture"]["pixel_spacing_mm"] == 0.1 and m["input"]["pixel_spacing_mm"] == 0.1
    assert m["architecture"]["min_calcification_px"] == 1 and "--pixel-size 0.1" in m["training"]["command"]
    assert "to 0.1 mm" in m["input"]["resampling"]
    assert MicrocalcModel.from_bundle(load_bundle(tmp_path / "b"), "cpu").config.pixel_spacing_mm == 0.1
