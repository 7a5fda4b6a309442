"""The model pipeline: every configured model over every image of a study.

Owns the :class:`ImageModel` protocol, the device choice (:func:`resolve_device`) and the
:class:`Pipeline`. A model is anything with an ``identity`` and a
``predict(Mammogram) -> ModelOutput``; the shipped ones are built from bundles in models/ by
:func:`~dicom_ai.networks.registry.model_from_bundle` (importable from here too). The
pipeline decodes each source data set once, runs the models (in :data:`RUN_ORDER`), restricts every map
to the breast (:func:`restrict_to_breast`: no mark outside the breast mask or on the
pectoral muscle, by construction), and returns one ``ImageFindings`` per image for the
writers. Each image's orientation source (header or pixels, :func:`~dicom_ai.imaging.mammogram.orient`)
is logged as an ``orientation`` event and kept on its findings (``ImageFindings.orientation``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pydicom
import SimpleITK as sitk
import torch

from dicom_ai.core.device import check_device_spec
from dicom_ai.core.errors import DeviceError
from dicom_ai.core.findings import ImageFindings, ModelIdentity, ModelOutput, ProbabilityMap
from dicom_ai.imaging import Mammogram, read_mammogram
from dicom_ai.networks.bundle import load_bundle
from dicom_ai.networks.engine import bf16_autocast, cpu_bf16_plan
from dicom_ai.networks.registry import model_from_bundle

__all__ = ["DEFAULT_MODELS", "ImageModel", "Pipeline", "model_from_bundle", "resolve_device", "allowed_region",
           "restrict_to_breast", "switched_off"]

# The node's event logger by name (networks may not import node): the worker's JSON log gets
# one ``orientation`` event per image; elsewhere the record goes wherever logging sends it.
_events = logging.getLogger("dicom_ai.node.events")

#: Bundles the node runs when the configuration names none (folders under models/).
DEFAULT_MODELS: tuple[str, ...] = ("glam", "dunet", "microcalc")

#: The order the models run in on each image, by model name, whatever the configured order
#: (models not named here run after these, in the configured order). The microcalcification
#: cascade's own working set (its 0.05 mm working grid, strips and cluster labelling: 100-165 MB
#: over the worker's baseline per full-size view) is the worker's peak; run after GLAM and the
#: U-Net it sat on their three restricted full-size float32 maps (~100 MB at the all-on point),
#: before the U-Net on GLAM's two only (in-process probe of the all-on job: 1012 -> 992 MB).
#: GLAM runs before it: run right after the cascade, GLAM took 0.3-0.4 s per image instead of
#: 0.2 (measured in-process, alternating; cause not established, possibly ONNX Runtime's pool
#: still spinning), the U-Net no longer than before. The results do not depend on the order:
#: segments are ordered by finding and model (:func:`~dicom_ai.results.types.order_maps`),
#: scores by model.
RUN_ORDER: tuple[str, ...] = ("glam", "microcalc", "dunet")


class ImageModel(Protocol):
    """What the pipeline needs of a model.

    A model may also say what it produces: ``findings`` (the map keys) and ``scores`` (the
    image-score names). A model that says so, produces no score, and whose every finding its
    bundle's operating point switches off is not run (nothing it makes would be sent).
    """

    identity: ModelIdentity

    def predict(self, mammogram: Mammogram) -> ModelOutput:
        """Maps on the mammogram's stored grid, and image-level scores."""
        ...


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (first CUDA GPU if any, else CPU), ``cpu`` or ``cuda:N``; raises DeviceError."""
    check_device_spec(spec)
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} requested but no CUDA GPU is available; use 'cpu' or 'auto'")
    return device


def allowed_region(mammogram: Mammogram) -> np.ndarray:
    """Where a mark may be: the breast mask less the pectoral muscle (MLO), stored grid."""
    return mammogram.breast_mask & ~mammogram.pectoral_mask


def restrict_to_breast(output: ModelOutput, mammogram: Mammogram, allowed: np.ndarray | None = None,
                       in_place: bool = False) -> ModelOutput:
    """``output`` with every map set to 0 outside :func:`allowed_region`, and every region of
    a map at its threshold (8-connected, as the writers find them) whose centroid pixel falls
    outside the region removed, so no mark the node sends lies outside the breast.

    Why both: zeroing keeps every region pixel inside; a crescent along the skin line can
    still have its centroid outside the breast, and the centroid is what a mark "is".
    ``allowed`` is :func:`allowed_region` when the caller has it already (once per image).

    ``in_place``: a map that is float32 and writeable, and shares no memory with another map of
    ``output``, is restricted in its own array (the pipeline's, which owns the model's fresh
    output) instead of a full-size copy; the values are the same either way.
    """
    if allowed is None:
        allowed = allowed_region(mammogram)
    outside_allowed = None
    arrays = [m.probability for m in output.maps]
    maps = []
    for i, m in enumerate(output.maps):
        source = m.probability
        if (in_place and source.dtype == np.float32 and source.flags.writeable and source.shape == allowed.shape
                and not any(np.may_share_memory(source, other) for j, other in enumerate(arrays) if j != i)):
            if outside_allowed is None:
                outside_allowed = ~allowed
            prob = source
            np.copyto(prob, np.float32(0.0), where=outside_allowed)
        else:
            # Zeros, then the map where allowed: the same values as np.where(allowed, map, 0) in
            # float32, at a fraction of its cost on a full-size map.
            prob = np.zeros(source.shape, dtype=np.float32)
            np.copyto(prob, source, casting="same_kind", where=allowed)
        binary = prob >= m.threshold
        rows = binary.any(axis=1)
        r_idx = np.flatnonzero(rows)
        if r_idx.size:
            # Components of the set pixels' bounding box only (the maps are mostly empty).
            r0, r1 = int(r_idx[0]), int(r_idx[-1]) + 1
            c_idx = np.flatnonzero(binary[r0:r1].any(axis=0))
            c0 = int(c_idx[0])
            box = (slice(r0, r1), slice(c0, int(c_idx[-1]) + 1))
            crop = binary[box]
            labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(crop.astype(np.uint8)), True))
            # The set pixels of the box are the labelled ones (nonzero of the boolean crop is
            # the same pixels, in the same raster order, as nonzero of the labels, and cheaper).
            rr, cc = np.nonzero(crop)
            lab = labels[rr, cc]
            n = int(lab.max())
            count = np.bincount(lab, minlength=n + 1)
            r_mean = np.bincount(lab, rr + r0, minlength=n + 1) / np.maximum(count, 1)
            c_mean = np.bincount(lab, cc + c0, minlength=n + 1) / np.maximum(count, 1)
            outside = [k for k in range(1, n + 1)
                       if not allowed[int(round(r_mean[k])), int(round(c_mean[k]))]]
            if outside:
                prob[box][np.isin(labels, outside)] = 0.0
        maps.append(ProbabilityMap(m.finding, prob, m.threshold, m.model))
    return ModelOutput(maps=maps, scores=list(output.scores))


def switched_off(model: ImageModel) -> bool:
    """Whether nothing ``model`` makes would be sent: it declares its ``findings`` and
    ``scores``, has no score, and its operating point switches every finding off."""
    findings, scores = getattr(model, "findings", None), getattr(model, "scores", None)
    if findings is None or scores is None or scores:
        return False
    return set(findings) <= set(getattr(model.identity, "off", ()))


class Pipeline:
    """Runs a fixed list of models on each image (in :data:`RUN_ORDER`); marks are restricted to the breast."""

    def __init__(self, models: Sequence[ImageModel]):
        self.models = list(models)
        #: The order ``run`` runs them in (:data:`RUN_ORDER`; sorted is stable for the others).
        rank = {name: i for i, name in enumerate(RUN_ORDER)}
        self.run_order = sorted(self.models, key=lambda m: rank.get(getattr(m.identity, "name", ""), len(rank)))
        #: ``id()`` of the models run in bf16 (:func:`~dicom_ai.networks.engine.cpu_bf16_plan`).
        self.bf16: set[int] = set()
        self._model_seconds: dict[str, list[float]] = {}
        self._stage_seconds: dict[str, float] = {}
        #: Models not run: every map they make is switched off by the operating point and
        #: they make no image score (:func:`switched_off`).
        self.skipped = [m for m in self.models if switched_off(m)]
        for m in self.skipped:
            _events.info("model_switched_off", extra={"event_fields": {
                "model": m.identity.name, "operating_point": getattr(m.identity, "operating_point", ""),
                "findings": ",".join(m.findings)}})

    @classmethod
    def from_bundles(cls, names: Sequence[str] = DEFAULT_MODELS, device: str = "auto",
                     operating_point: str = "", precision: str = "fp32") -> "Pipeline":
        """Load bundles by name (under models/) or path onto ``device``.

        ``operating_point`` names the operating point every bundle uses (its manifest's
        ``operating_points``; "" = each bundle's default), as ``pipeline.operating_point``
        in node.toml; :func:`~dicom_ai.networks.bundle.load_bundle` raises BundleError when a
        bundle has no point of that name. ``precision`` (``pipeline.precision``): ``fp32``, or
        ``bf16`` for the models :func:`~dicom_ai.networks.engine.cpu_bf16_plan` accepts (each
        model's choice is logged as ``model_precision``).
        """
        dev = resolve_device(device)
        pipeline = cls([model_from_bundle(load_bundle(name, operating_point=operating_point), dev) for name in names])
        pipeline.bf16, fp32 = cpu_bf16_plan(pipeline.models, precision, dev)
        for model in pipeline.models:
            if precision != "fp32":
                _events.info("model_precision", extra={"event_fields": {
                    "model": model.identity.name, "precision": "bf16" if id(model) in pipeline.bf16 else "fp32",
                    "why": fp32.get(model.identity.name, "")}})
        return pipeline

    @property
    def identities(self) -> list[ModelIdentity]:
        return [m.identity for m in self.models]

    def run(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageFindings]:
        """One ImageFindings per data set, in the input order."""
        results = []
        stages = self._stage_seconds
        for ds in datasets:
            started = time.perf_counter()
            mammogram = read_mammogram(ds)
            findings = ImageFindings(sop_instance_uid=mammogram.sop_instance_uid)
            findings.orientation = mammogram.orientation
            _events.info("orientation", extra={"event_fields": {
                "sop_instance_uid": mammogram.sop_instance_uid, "source": mammogram.orientation,
                "nipple_towards": "column 0" if mammogram.faces_left else "last column"}})
            allowed = allowed_region(mammogram)
            stages["prepare"] = stages.get("prepare", 0.0) + time.perf_counter() - started
            for model in self.run_order:
                if model in self.skipped:
                    continue
                started = time.perf_counter()
                with bf16_autocast(id(model) in self.bf16):
                    output = model.predict(mammogram)
                self._model_seconds.setdefault(model.identity.name, []).append(time.perf_counter() - started)
                # Findings the bundle's operating point switches off are not sent (and so
                # not restricted either).
                off = set(getattr(model.identity, "off", ()))
                output.maps = [m for m in output.maps if m.finding not in off]
                started = time.perf_counter()
                output = restrict_to_breast(output, mammogram, allowed, in_place=True)  # the model's fresh maps
                stages["restrict"] = stages.get("restrict", 0.0) + time.perf_counter() - started
                findings.add(output)
            results.append(findings)
        return results

    def take_model_seconds(self) -> dict[str, list[float]]:
        """Wall seconds of each model's ``predict``, one per image, since the last call (then cleared).

        Keyed by model name; what the worker records with a job for the node's
        inference-time metrics.
        """
        out, self._model_seconds = self._model_seconds, {}
        return out

    def take_stage_seconds(self) -> dict[str, float]:
        """Wall seconds, summed over images, of the work around the models since the last call
        (then cleared): ``prepare`` (intensities, orientation, breast and pectoral masks) and
        ``restrict`` (marks restricted to the breast)."""
        out, self._stage_seconds = self._stage_seconds, {}
        return out
