"""The GLAM authors' architecture, ``dicom-ai import glam`` and the NYU preprocessing.

No download and no fetched code: the checkpoints are made here from the table of the authors'
tensor names and shapes kept in the project (seeded random values); a smaller input and crop
than the authors' keep the forward passes fast (the weights do not depend on them).
"""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F

from dicom_ai.cli import main
from dicom_ai.core.errors import BundleError, ImagingError, ModelError
from dicom_ai.imaging import mammogram_from_array
from dicom_ai.imaging.nyu_window import crop_to_breast, nyu_input, nyu_window, standardise
from dicom_ai.core.research import research_notices
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.glam import run_reference
from dicom_ai.networks.glam_authors import (AUTHORS_TENSORS, GlamAuthors, GlamAuthorsConfig, GlamAuthorsModel,
                                            check_state_dict, synthetic_state_dict)
from dicom_ai.networks.glam_import import AUTHORS_LICENCE, import_glam, read_checkpoint
from dicom_ai.networks.registry import model_from_bundle

#: A small input for the same weights: stage-3 map 32 x 20, a 32 x 32 crop (2 x 2 on the map).
SMALL = GlamAuthorsConfig(input_shape=(512, 320), cam_size=(32, 20), crop_shape=(32, 32))


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return synthetic_state_dict(3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, state):
    # The legacy (non-zip) format, as the authors' torch 1.1 wrote it.
    path = tmp_path_factory.mktemp("ckpt") / "model_sep.ckpt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, checkpoint):
    return import_glam(checkpoint, tmp_path_factory.mktemp("bundle") / "glam-authors", config=SMALL)


def test_network_has_exactly_the_authors_tensor_names_shapes_and_dtypes():
    mine = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in GlamAuthors().state_dict().items()]
    assert mine == list(AUTHORS_TENSORS)
    assert len(mine) == 352 and sum(int(np.prod(s)) for _, s, _ in AUTHORS_TENSORS) == 24_107_221


def test_config_checks_the_saliency_grid_against_the_input():
    assert GlamAuthorsConfig().map_window == (32, 32)
    with pytest.raises(ModelError, match=r"cam_size \(184, 121\) does not fit"):
        GlamAuthorsConfig(cam_size=(184, 121))
    assert GlamAuthorsConfig.from_dict({"kind": "glam", **SMALL.to_dict()}) == SMALL


def test_imported_checkpoint_runs_and_gives_the_reference_outputs(bundle_dir, checkpoint, state):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["architecture"]["kind"] == "glam" and manifest["architecture"]["name"] == "authors"
    assert manifest["research_only"] is True and "not for clinical use" in manifest["intended_use"]
    assert manifest["licence"]["text"] == AUTHORS_LICENCE == (bundle_dir / "LICENSE.txt").read_text()
    assert "Liu" in manifest["citation"] and "2106.07049" in manifest["citation"]
    assert manifest["provenance"]["checkpoint_file"] == "model_sep.ckpt"
    assert len(manifest["provenance"]["checkpoint_sha256"]) == 64
    assert manifest["version"].startswith("model_sep-")
    assert "re-choose" in manifest["operating_points"]["rule"]
    # The weights are the checkpoint's, unchanged.
    loaded = load_bundle(bundle_dir).state_dict
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    x = np.random.default_rng(0).standard_normal((2, 1, *SMALL.input_shape)).astype(np.float32)
    ref = run_reference(str(bundle_dir), x)
    assert ref["y_global"].shape == (2, 2) and ref["saliency_global"].shape == (2, 2, 32, 20)
    assert ref["saliency_fused"].shape == (2, 2, 512, 320) and ref["patch_locations"].shape == (2, 1, 2)
    assert ref["patch_locations"].dtype == np.float64
    assert ((0 < ref["y_global"]) & (ref["y_global"] < 1)).all()

    # The arithmetic, recomputed from the network's intermediate maps.
    net = GlamAuthors(SMALL)
    net.load_state_dict(check_state_dict(state, "test"))
    with torch.inference_mode():
        out = net.eval()(torch.from_numpy(x))
    np.testing.assert_array_equal(out.saliency_fused.numpy(), ref["saliency_fused"])
    s_g = 0.2 * out.s3 + 0.6 * out.s2 + 0.2 * out.s1
    assert torch.equal(out.saliency_global, s_g)
    k = round(0.03 * 32 * 20)
    pooled = [s.flatten(2).topk(k, -1).values.mean(-1) for s in (out.s1, out.s2, out.s3)]
    torch.testing.assert_close(out.y_global, sum(pooled) / 3, rtol=0, atol=1e-7)
    for b in range(2):
        m = s_g[b]
        m = ((m - m.amin((1, 2), keepdim=True)) / (m.amax((1, 2), keepdim=True) - m.amin((1, 2), keepdim=True))).sum(0)
        pooled_map = F.avg_pool2d(m[None, None], 2, stride=1)[0, 0]
        i, j = divmod(int(pooled_map.flatten().argmax()), pooled_map.shape[1])
        assert ref["patch_locations"][b, 0].tolist() == [i * 16.0, j * 16.0]
        r, c = int(ref["patch_locations"][b, 0, 0]), int(ref["patch_locations"][b, 0, 1])
        g_up = F.interpolate(s_g[b:b + 1], size=(512, 320), mode="nearest")[0].numpy()
        fused = ref["saliency_fused"][b]
        outside = np.ones((512, 320), bool)
        outside[r:r + 32, c:c + 32] = False
        np.testing.assert_array_equal(fused[:, outside], g_up[:, outside] / 2)
        local = F.interpolate(out.patch_maps[b, 0][None], size=(32, 32), mode="nearest")[0].numpy()
        np.testing.assert_allclose(fused[:, r:r + 32, c:c + 32], (local + g_up[:, r:r + 32, c:c + 32]) / 2, atol=1e-7)


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_checkpoint_with_a_missing_extra_or_misshaped_tensor_is_refused_by_name(tmp_path, state, change):
    bad = dict(state)
    name = "detection_network.dn_resnet.layer3.4.conv2.weight"
    if change == "missing":
        del bad[name]
    elif change == "extra":
        name = "global_network.postprocess_module.gn_conv_4.weight"
        bad[name] = torch.zeros(2, 64, 1, 1)
    else:
        bad[name] = torch.zeros(256, 256, 1, 3)
    path = tmp_path / "bad.ckpt"
    torch.save(bad, path)
    label = {"missing": "missing", "extra": "unexpected", "shape": "wrong shape"}[change]
    with pytest.raises(BundleError, match=rf"{label} \(1\): {name.replace('.', '[.]')}"):
        import_glam(path, tmp_path / "out", config=SMALL)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_batch_norm_counters_are_filled_and_recorded(tmp_path, state):
    counters = [n for n, _, dt in AUTHORS_TENSORS if n.endswith("num_batches_tracked")]
    path = tmp_path / "no_counters.ckpt"
    torch.save({k: v for k, v in state.items() if k not in counters}, path)
    out = import_glam(path, tmp_path / "b", config=SMALL)
    assert json.loads((out / "manifest.json").read_text())["provenance"]["filled_with_zeros"] == sorted(counters)


def test_wrapped_state_dict_is_accepted_and_other_objects_are_refused(tmp_path, state):
    torch.save({"state_dict": state}, tmp_path / "wrapped.ckpt")
    tensors, wrapper = read_checkpoint(tmp_path / "wrapped.ckpt")
    assert wrapper == "state_dict" and set(tensors) == set(state)
    torch.save([torch.zeros(1)], tmp_path / "list.ckpt")
    with pytest.raises(BundleError, match="holds a list, not a state_dict"):
        read_checkpoint(tmp_path / "list.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(BundleError, match="cannot be read as a torch checkpoint"):
        read_checkpoint(tmp_path / "junk.ckpt")


class _Payload:
    """Unpickling this calls ``open(path, "w")``: the marker file appears if the payload runs."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_that_would_run_code_is_refused_without_running(tmp_path, state, zip_format, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "model_joint.ckpt"
    torch.save({**state, "extra": _Payload(str(marker))}, evil, _use_new_zipfile_serialization=zip_format)
    # The payload is live: an unrestricted load runs it (a control, in another file).
    control = tmp_path / "control-ran"
    torch.save({"x": _Payload(str(control))}, tmp_path / "control.ckpt", _use_new_zipfile_serialization=zip_format)
    torch.load(tmp_path / "control.ckpt", weights_only=False)
    assert control.exists()

    rc = main(["import", "glam", "--checkpoint", str(evil), "--out", str(tmp_path / "bundle")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "refused" in err and "nothing in it was executed" in err and "open" in err
    assert not marker.exists()
    assert not (tmp_path / "bundle").exists()


def test_cli_import_writes_a_bundle(tmp_path, checkpoint, capsys):
    rc = main(["import", "glam", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--name", "nyu-glam",
               "--version", "sep-1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "nyu-glam sep-1" in printed and "RESEARCH ONLY" in printed
    bundle = load_bundle(tmp_path / "b")
    assert bundle.identity.name == "nyu-glam" and bundle.manifest["architecture"]["input_shape"] == [2944, 1920]
    assert bundle.manifest["operating_point"]["name"] == "uncalibrated"


def test_bundle_runs_in_the_node_pipeline_and_makes_a_seg_on_a_phantom_study(bundle_dir, tmp_path, caplog):
    import highdicom as hd

    from dicom_ai.core.options import ResultOptions
    from dicom_ai.core.uids import ResultUIDs
    from dicom_ai.data.phantom import generate_study
    from dicom_ai.networks.pipeline import Pipeline
    from dicom_ai.results import build_results

    with caplog.at_level(logging.WARNING, logger="dicom_ai.node.events"):
        pipeline = Pipeline.from_bundles([str(bundle_dir)], device="cpu", operating_point="fp1")
    assert isinstance(pipeline.models[0], GlamAuthorsModel)
    (event,) = [r for r in caplog.records if r.getMessage() == "research_only_model"]
    assert event.levelno == logging.WARNING and "NYU non-commercial" in event.event_fields["licence"]
    (notice,) = research_notices([str(bundle_dir), "glam"])  # the shipped glam is not research-only
    assert "RESEARCH ONLY" in notice and "NYU non-commercial" in notice

    study = generate_study(11, shape=(416, 320))
    sources = [im.dataset for im in study.images]
    findings = pipeline.run(sources)
    for f, ds in zip(findings, sources):
        assert {m.finding for m in f.maps} == {"benign_lesion", "malignant_lesion"}
        for m in f.maps:
            assert m.probability.shape == (ds.Rows, ds.Columns) and m.threshold == 0.5
        assert {s.name for s in f.scores} == {"benign", "malignant"}
    assert max(float(m.probability.max()) for f in findings for m in f.maps) >= 0.5
    uids = ResultUIDs.generate([str(d.SOPInstanceUID) for d in sources])
    results = build_results(sources, findings, uids, ResultOptions()).datasets
    segs = [d for d in results if d.Modality == "SEG"]
    assert segs
    for seg in segs:
        buf = io.BytesIO()
        seg.save_as(buf, enforce_file_format=True)
        buf.seek(0)
        read = hd.seg.segread(buf)
        assert read.number_of_segments >= 1
        assert seg.SegmentSequence[0].SegmentAlgorithmName == "glam-authors"
    (sr,) = [d for d in results if d.Modality == "SR"]
    assert "research" in _sr_text(sr).lower()


def _sr_text(ds: pydicom.Dataset) -> str:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(str(item.get("TextValue", "")))
        out.append(_sr_text(item))
    return " ".join(out)


# --------------------------------------------------------------------------- NYU preprocessing


def _breast(rows: int = 700, cols: int = 520, faces_left: bool = False) -> np.ndarray:
    """A half-ellipse breast on a zero background, chest wall at column 0 (or the last column)."""
    rr, cc = np.mgrid[:rows, :cols]
    img = (((rr - rows / 2) / (rows * 0.42)) ** 2 + (cc / (cols * 0.8)) ** 2 <= 1).astype(np.float32)
    img *= 0.5 + 0.5 * np.random.default_rng(1).random((rows, cols), dtype=np.float32)
    img[5:15, 400:410] = 0.7  # a speck: removed by the erosion, outside the box's largest component
    return img[:, ::-1].copy() if faces_left else img


def _iterate_cross(mask: np.ndarray, n: int, erode: bool) -> np.ndarray:
    m = np.pad(mask, 1, constant_values=False)
    for _ in range(n):
        c, up, down, left, right = m[1:-1, 1:-1], m[:-2, 1:-1], m[2:, 1:-1], m[1:-1, :-2], m[1:-1, 2:]
        inner = (c & up & down & left & right) if erode else (c | up | down | left | right)
        m = np.pad(inner, 1, constant_values=False)
    return m[1:-1, 1:-1]


@pytest.mark.parametrize("faces_left", [False, True])
def test_crop_box_window_and_inverse_for_both_orientations(faces_left):
    img = _breast(faces_left=faces_left)
    box = crop_to_breast(img, faces_left).box
    # The same box by iterating the 4-neighbour cross 100 times each way (the authors' scipy calls);
    # the speck does not survive the erosion.
    opened = _iterate_cross(_iterate_cross(img > 0, 100, erode=True), 100, erode=False)
    rows, cols = np.flatnonzero(opened.any(axis=1)), np.flatnonzero(opened.any(axis=0))
    top, bottom = max(rows[0] - 50, 0), min(rows[-1] + 1 + 50, img.shape[0])
    left, right = (max(cols[0] - 50, 0), cols[-1] + 1) if faces_left else (cols[0], min(cols[-1] + 1 + 50, img.shape[1]))
    assert box == (top, bottom, left, right)
    window = nyu_window(img, "CC", faces_left, (768, 512))
    x = window.forward(img)
    canonical = img[:, ::-1] if faces_left else img
    # Facing right: chest wall in the first input column.
    assert x[:, 0].sum() > 0 and x.shape == (768, 512)
    back = window.inverse(x)
    top, bottom, left, right = box
    inside = np.zeros(img.shape, bool)
    inside[top:bottom, left:right] = True
    np.testing.assert_array_equal(back[inside & (back > 0)], img[inside & (back > 0)])
    assert (back[~inside] == 0).all()
    assert np.isclose(canonical[box[0]:box[1]].sum(), x.sum())


def test_mlo_window_keeps_the_bottom_and_pads_below():
    img = _breast(rows=600, cols=500)
    window = nyu_window(img, "MLO", False, (768, 512))
    x = window.forward(img)
    top, bottom, left, right = window.breast.box
    crop = img[top:bottom, left:right]
    assert window.window[:3] == (0, 768, 0)  # the crop's first row and column; zeros below and to the right
    np.testing.assert_array_equal(x[:crop.shape[0], :crop.shape[1]], crop)
    assert (x[crop.shape[0]:] == 0).all() and (x[:, crop.shape[1]:] == 0).all()


def test_standardise_is_the_authors_z_score_and_nyu_input_ignores_an_intensity_offset():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(standardise(x), (x - x.mean()) / x.std(), rtol=1e-6)
    assert (standardise(np.ones((4, 4), np.float32)) == 0).all()
    img = _breast()
    a, _ = nyu_input(mammogram_from_array(img, "L", "CC", faces_left=False), (768, 512))
    b, _ = nyu_input(mammogram_from_array(img * 0.5 + 0.25, "L", "CC", faces_left=False), (768, 512))
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert abs(float(a.mean())) < 1e-4 and abs(float(a.std()) - 1) < 1e-3


def test_empty_image_is_a_clear_error():
    with pytest.raises(ImagingError, match="no breast found"):
        crop_to_breast(np.zeros((300, 200), np.float32), False)


# --------------------------------------------------------------------------- node integration


def test_research_only_bundle_is_named_by_check_config_status_page_and_start_up_log(bundle_dir, tmp_path, capsys):
    import sys
    import urllib.request

    sys.path.insert(0, os.path.dirname(__file__))
    from node_harness import free_port, start_node, wait_for, write_node_config

    port, http = free_port(), free_port()
    cfg = write_node_config(tmp_path / "node.toml", tmp_path / "storage", port, [("PACS", 1)],
                            pipeline={"factory": "", "models": [str(bundle_dir)]})
    cfg.write_text(cfg.read_text() + f"[http]\nport = {http}\n")
    assert main(["check-config", "--config", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert "RESEARCH ONLY" in captured.err and "NYU non-commercial" in captured.err
    assert "RESEARCH ONLY" not in captured.out  # the effective configuration stays plain JSON
    json.loads(captured.out.split("\n", 1)[1])

    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        def page() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                return ""
        wait_for(lambda: "RESEARCH ONLY" in page(), 30, "the research notice on the status page")
        assert "NYU non-commercial" in page() and "PROBLEM" not in page()
        log = (tmp_path / "node.log").read_text()
        assert "research_only_model" in log and "NYU non-commercial" in log
    finally:
        node.stop()
    # `dicom-ai status`: a note, not a problem (the exit status stays 0 for a healthy node).
    assert main(["status", "--config", str(cfg)]) == 0
    assert "NOTE (research): model glam-authors" in capsys.readouterr().out
