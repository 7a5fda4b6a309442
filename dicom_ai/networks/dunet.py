"""The discriminative U-Net of Tardy & Mateus (MIDL 2020) and its inference wrapper.

Owns :class:`DUNetConfig`, the network modules and :class:`DUNetModel`, the servable model
(training is :mod:`dicom_ai.training.dunet`).

A U-Net modified for full mammograms: depthwise-separable convolutions, a short residual
skip around every block, no long (encoder -> decoder) skips at the top resolution levels,
instance normalisation and leaky ReLU. The same backbone ``f`` serves three purposes:

* stage 1, restoration: ``f(T(x)) ~ x`` for a Models-Genesis distortion ``T``;
* stage 2, discriminative segmentation: ``s = x - f(x)`` (the parameter-free subtraction
  layer), trained towards the malignancy mask ``M``; ``f(x)`` is then a "reconstructed"
  image whose difference from the input is the finding, which is what makes it explainable;
* the comparison baseline, the standard head: ``p = sigmoid(f(x))``.

Image convention: the network sees the breast crop in canonical orientation (chest wall at
column 0, see :mod:`dicom_ai.imaging`), resized to ``DUNetConfig.input_shape`` or, when
``DUNetConfig.pixel_spacing_mm`` is set, resampled to that working pixel size whatever its shape
(:func:`working_grid`; such networks are trained on patches), intensities in [0, 1] with dense
tissue bright. The map goes back to the source grid either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dicom_ai.core.errors import BundleError, ModelError
from dicom_ai.core.findings import ImageScore, ModelIdentity, ModelOutput, ProbabilityMap
from dicom_ai.imaging import Geometry, Mammogram, geometry_for
from dicom_ai.networks.bundle import Bundle, load_weights, require_kind
from dicom_ai.networks.mass_rescore import (MassRescoreNet, RescoreConfig, candidate_regions, combine,
                                            rescore_regions, rescored_map)

__all__ = [
    "DUNetConfig",
    "SeparableConv2d",
    "ResidualBlock",
    "UNet",
    "DiscriminativeUNet",
    "DUNetModel",
    "HEADS",
    "top_k_score",
    "model_grid",
    "working_grid",
    "network_grid",
    "calibrate",
    "multiscale_output",
    "RESCORE_PREFIX",
]

#: Tensor-name prefix of the optional false-positive reduction stage in a bundle's weights
#: (:mod:`dicom_ai.networks.mass_rescore`; manifest entry ``rescore``).
RESCORE_PREFIX = "rescore."

#: Output heads: ``subtraction`` is the paper's method, ``sigmoid`` the standard baseline.
HEADS: tuple[str, ...] = ("subtraction", "sigmoid")


@dataclass(frozen=True)
class DUNetConfig:
    """Hyper-parameters of the network and of its input.

    ``channels[i]`` is the width at resolution level ``i`` (level 0 = input resolution;
    each further level halves rows and columns). ``top_levels_without_skip`` is how many of
    the highest-resolution levels have no long skip, so the restoration task cannot be
    solved by copying the input through a top skip. ``input_shape`` (rows, columns) must be
    divisible by ``2 ** (len(channels) - 1)``.
    """

    input_shape: tuple[int, int] = (1536, 1536)
    channels: tuple[int, ...] = (16, 32, 64, 128, 256, 256)
    top_levels_without_skip: int = 2
    negative_slope: float = 0.01
    head: str = "subtraction"
    #: Fraction of model-grid pixels averaged (the highest ones) into the image-level score.
    score_top_fraction: float = 0.005
    #: Working pixel size in mm (None: the whole breast crop is resized to ``input_shape``).
    #: When set, the network sees the breast crop resampled to this pixel size, its rows and
    #: columns rounded up to a multiple of ``2 ** (levels - 1)`` (:func:`working_grid`), and
    #: ``input_shape`` is only the training patch size: the network is fully convolutional.
    pixel_spacing_mm: float | None = None
    #: Extra working pixel sizes in mm at which the network also runs at inference (test-time
    #: scales, :func:`multiscale_output`): the head outputs there, resampled onto the
    #: ``pixel_spacing_mm`` grid, are averaged with it before calibration. Empty: one pass.
    #: Needs ``pixel_spacing_mm``.
    test_time_scales_mm: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ModelError(f"head must be one of {HEADS}, got {self.head!r}")
        if len(self.channels) < 2:
            raise ModelError("the U-Net needs at least two resolution levels")
        if not 0 <= self.top_levels_without_skip <= len(self.channels) - 1:
            raise ModelError(f"top_levels_without_skip must lie in [0, {len(self.channels) - 1}]")
        if self.pixel_spacing_mm is not None and not self.pixel_spacing_mm > 0:
            raise ModelError(f"pixel_spacing_mm must be positive, got {self.pixel_spacing_mm}")
        if self.test_time_scales_mm and self.pixel_spacing_mm is None:
            raise ModelError("test_time_scales_mm needs pixel_spacing_mm (a fully convolutional working-grid network)")
        if any(not float(v) > 0 for v in self.test_time_scales_mm):
            raise ModelError(f"test_time_scales_mm must be positive, got {self.test_time_scales_mm}")
        step = 2 ** (len(self.channels) - 1)
        if self.input_shape[0] % step or self.input_shape[1] % step:
            raise ModelError(f"input_shape {self.input_shape} must be divisible by {step} "
                             f"for {len(self.channels)} resolution levels")

    @classmethod
    def paper(cls, **overrides: object) -> "DUNetConfig":
        """The paper's input size (1536 x 1536); depth and widths are our choice (models.md 2.1)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def compact(cls, **overrides: object) -> "DUNetConfig":
        """A CPU-trainable configuration: 256 x 192 input (rows x columns), five levels, widths 8..64."""
        base = cls(input_shape=(256, 192), channels=(8, 16, 32, 64, 64), top_levels_without_skip=2)
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict:
        """JSON-ready form for a bundle manifest's ``architecture`` entry."""
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["channels"] = list(self.channels)
        d["test_time_scales_mm"] = list(self.test_time_scales_mm)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DUNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys (such as ``kind``) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "input_shape" in kwargs:
            kwargs["input_shape"] = tuple(int(v) for v in kwargs["input_shape"])
        if "channels" in kwargs:
            kwargs["channels"] = tuple(int(v) for v in kwargs["channels"])
        if "test_time_scales_mm" in kwargs:
            kwargs["test_time_scales_mm"] = tuple(float(v) for v in kwargs["test_time_scales_mm"] or ())
        if kwargs.get("pixel_spacing_mm") is not None:
            kwargs["pixel_spacing_mm"] = float(kwargs["pixel_spacing_mm"])
        return cls(**kwargs)

    @property
    def multiple(self) -> int:
        """Rows and columns of any input must be a multiple of this (``2 ** (levels - 1)``)."""
        return 2 ** (len(self.channels) - 1)


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 convolution (one filter per channel) followed by a pointwise 1x1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1,
                                   groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class ResidualBlock(nn.Module):
    """(separable conv -> InstanceNorm -> LeakyReLU) x 2 with a short residual skip.

    The first convolution carries the stride (2 on the encoder's way down). The skip is the
    identity when shape is kept, else a strided 1x1 projection.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, negative_slope: float = 0.01):
        super().__init__()
        self.conv1 = SeparableConv2d(in_channels, out_channels, stride)
        self.norm1 = nn.InstanceNorm2d(out_channels, affine=True)
        self.conv2 = SeparableConv2d(out_channels, out_channels)
        self.norm2 = nn.InstanceNorm2d(out_channels, affine=True)
        self.act = nn.LeakyReLU(negative_slope)
        if in_channels != out_channels or stride != 1:
            self.shortcut: nn.Module = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class UNet(nn.Module):
    """The backbone ``f``: (N, 1, H, W) -> (N, 1, H, W), linear output.

    Encoder level ``i`` produces ``channels[i]`` features at 1/2**i resolution. The decoder
    upsamples (bilinear x2) and, at the levels that keep a long skip, concatenates the
    encoder features before its block; ``has_long_skip[i]`` says which levels do.
    """

    def __init__(self, config: DUNetConfig):
        super().__init__()
        ch = config.channels
        slope = config.negative_slope
        self.has_long_skip = tuple(i >= config.top_levels_without_skip for i in range(len(ch) - 1))
        self.encoder = nn.ModuleList([ResidualBlock(1, ch[0], 1, slope)])
        for i in range(1, len(ch)):
            self.encoder.append(ResidualBlock(ch[i - 1], ch[i], 2, slope))
        # decoder[i] produces level i from level i + 1 (and the level-i skip when kept).
        self.decoder = nn.ModuleList(
            ResidualBlock(ch[i + 1] + (ch[i] if self.has_long_skip[i] else 0), ch[i], 1, slope)
            for i in range(len(ch) - 1)
        )
        self.out = nn.Conv2d(ch[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        h = x
        for block in self.encoder:
            h = block(h)
            features.append(h)
        h = features[-1]
        for i in range(len(self.decoder) - 1, -1, -1):
            h = F.interpolate(h, size=features[i].shape[-2:], mode="bilinear", align_corners=False)
            if self.has_long_skip[i]:
                h = torch.cat([h, features[i]], dim=1)
            h = self.decoder[i](h)
        return self.out(h)


class DiscriminativeUNet(nn.Module):
    """The backbone with one of the two heads of :data:`HEADS`.

    ``forward`` returns the raw head output: ``x - f(x)`` for ``subtraction`` (a signed
    difference image, trained towards the 0/1 mask), the logit ``f(x)`` for ``sigmoid``.
    :meth:`probability` turns it into a [0, 1] map; :meth:`reconstruct` is ``f(x)``.
    """

    def __init__(self, config: DUNetConfig):
        super().__init__()
        self.config = config
        self.unet = UNet(config)

    @property
    def head(self) -> str:
        return self.config.head

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)``: the restored image after stage 1, the "lesion-free" image after stage 2."""
        return self.unet(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.unet(x)
        return x - f if self.head == "subtraction" else f

    def probability(self, output: torch.Tensor) -> torch.Tensor:
        """Head output -> malignancy probability in [0, 1].

        The subtraction output is clipped to [0, 1] (it is trained towards the mask itself);
        the standard head applies the sigmoid to its logit.
        """
        return output.clamp(0.0, 1.0) if self.head == "subtraction" else torch.sigmoid(output)


def top_k_score(probability: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the highest ``fraction`` of pixels of each map in a (N, 1, H, W) batch -> (N,)."""
    flat = probability.flatten(1)
    k = max(1, int(round(fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


def model_grid(mammogram: Mammogram, input_shape: tuple[int, int]) -> tuple[Geometry, np.ndarray, np.ndarray]:
    """The network's view of a mammogram: geometry, image and breast mask on the model grid.

    The breast crop is taken in canonical orientation and grown to the aspect of
    ``input_shape`` (see ``preprocess.geometry_for``); training and inference both use this
    function so that they see identical inputs.
    """
    mask = mammogram.breast_mask
    geo = geometry_for(mammogram, input_shape, mask=mask)
    image = np.clip(geo.forward(mammogram.pixels), 0.0, 1.0).astype(np.float32)
    model_mask = geo.forward(mask.astype(np.float32)) > 0.5
    return geo, image, model_mask


#: Largest working grid side, in model pixels (a guard against a wrong pixel spacing in a header
#: turning one view into a multi-gigabyte tensor).
MAX_WORKING_SIDE = 4096


def working_grid(mammogram: Mammogram, pixel_spacing_mm: float, multiple: int = 16
                 ) -> tuple[Geometry, np.ndarray, np.ndarray]:
    """The breast crop resampled to a working pixel size: geometry, image and breast mask.

    The box is the breast bounding box in canonical orientation (chest wall at column 0,
    as :func:`~dicom_ai.imaging.geometry_for`), grown to whole multiples of ``multiple``
    working pixels (extra rows evenly above and below, extra columns away from the chest
    wall), so a working pixel is exactly ``pixel_spacing_mm`` up to the rounding of the box
    to source pixels.

    Parameters
    ----------
    mammogram : Mammogram
        The decoded view; ``spacing_mm`` (row, column) in mm sets the scale.
    pixel_spacing_mm : float
        Working pixel size in mm (both axes).
    multiple : int
        The working grid's rows and columns are multiples of it (the U-Net's total stride).

    Returns
    -------
    tuple
        (:class:`~dicom_ai.imaging.Geometry`, float32 image in [0, 1], boolean breast mask),
        both arrays on the working grid.
    """
    mask = mammogram.breast_mask
    rows, cols = mammogram.shape
    sr, sc = (float(v) for v in mammogram.spacing_mm)
    canonical = mask[:, ::-1] if mammogram.faces_left else mask
    if canonical.any():
        r_idx = np.flatnonzero(canonical.any(axis=1))
        c_idx = np.flatnonzero(canonical.any(axis=0))
        r0, r1, c1 = int(r_idx[0]), int(r_idx[-1]) + 1, int(c_idx[-1]) + 1
    else:
        r0, r1, c1 = 0, rows, cols
    # At least two multiples per side: the deepest level then has 2x2 pixels (InstanceNorm
    # needs more than one), so a small view (a thumbnail, a 13 mm test image) runs too.
    out_r = max(2, int(np.ceil((r1 - r0) * sr / pixel_spacing_mm / multiple))) * multiple
    out_c = max(2, int(np.ceil(c1 * sc / pixel_spacing_mm / multiple))) * multiple
    if max(out_r, out_c) > MAX_WORKING_SIDE:
        raise ModelError(f"a {rows}x{cols} image at {sr}x{sc} mm is {out_r}x{out_c} working pixels at "
                         f"{pixel_spacing_mm} mm, above {MAX_WORKING_SIDE}; check the pixel spacing in the header")
    height = int(round(out_r * pixel_spacing_mm / sr))
    width = int(round(out_c * pixel_spacing_mm / sc))
    top = (r0 + r1) // 2 - height // 2
    geo = Geometry(source_shape=(rows, cols), flip=mammogram.faces_left, box=(top, top + height, 0, width),
                   out_shape=(out_r, out_c))
    image = np.clip(geo.forward(mammogram.pixels), 0.0, 1.0).astype(np.float32)
    return geo, image, geo.forward(mask.astype(np.float32)) > 0.5


def network_grid(mammogram: Mammogram, config: DUNetConfig) -> tuple[Geometry, np.ndarray, np.ndarray]:
    """:func:`working_grid` when ``config.pixel_spacing_mm`` is set, else :func:`model_grid`."""
    if config.pixel_spacing_mm is not None:
        return working_grid(mammogram, config.pixel_spacing_mm, config.multiple)
    return model_grid(mammogram, config.input_shape)


@torch.no_grad()
def multiscale_output(network: DiscriminativeUNet, mammogram: Mammogram, geometry: Geometry, output: torch.Tensor,
                      scales_mm: tuple[float, ...]) -> torch.Tensor:
    """The head output averaged over working pixel sizes (test-time scales).

    ``output`` (1, 1, H, W) is the head output on ``geometry``'s grid (the network's
    :func:`working_grid` at ``config.pixel_spacing_mm``). At each of ``scales_mm`` the network
    runs on the breast crop resampled to that pixel size; its output goes back to the source
    grid (0 outside its box) and onto ``geometry``'s grid, both bilinear, and the mean of all
    passes is returned on ``geometry``'s grid, same shape, dtype and device as ``output``.
    A mass keeps its size in mm, so at each scale the network sees it at another size in
    pixels; averaging passes that agree on a finding keeps it and thins out the regions only
    one scale puts forward.
    """
    if not scales_mm:
        return output
    device = output.device
    passes = [output[0, 0].float().cpu().numpy()]
    for spacing in scales_mm:
        geo, image, _ = working_grid(mammogram, float(spacing), network.config.multiple)
        x = torch.from_numpy(image).to(device)[None, None]
        raw = network(x)[0, 0].float().cpu().numpy()
        passes.append(geometry.forward(geo.inverse(raw)))
    mean = np.mean(np.stack(passes), axis=0).astype(np.float32)
    return torch.from_numpy(mean)[None, None].to(device=device, dtype=output.dtype)


def calibrate(output: torch.Tensor, calibration: dict | None) -> torch.Tensor | None:
    """Platt scaling of the subtraction output: ``sigmoid(slope * (x - f(x)) + intercept)``.

    ``calibration`` is a manifest's ``calibration`` entry (``method`` ``"platt"``, ``slope``,
    ``intercept``), fitted on validation folds to the peak raw output of candidate regions;
    None (no calibration) returns None. The result does not saturate: regions whose raw
    peaks differ keep different scores, which is what lets operating points be chosen.
    """
    if not calibration:
        return None
    if calibration.get("method") != "platt":
        raise ModelError(f"unknown calibration method {calibration.get('method')!r}; this node knows 'platt'")
    return torch.sigmoid(float(calibration["slope"]) * output + float(calibration["intercept"]))


class DUNetModel:
    """The servable model: a bundle's network plus the geometry to and from the source grid.

    ``predict`` returns the lesion map (the manifest's ``finding``: ``malignant_lesion`` by
    default, ``mass`` for a bundle trained on masses of both severities) on the stored source grid (zero outside
    the breast crop) and the image-level ``malignant`` score, defined as the mean of the
    highest ``score_top_fraction`` (default 0.5 %) of the model-grid probability map. The
    score is a ranking value, not a calibrated probability.

    With a ``rescore`` network (a bundle whose manifest has a ``rescore`` entry), each
    candidate region (raw output >= the stage's level inside the breast less the pectoral
    muscle, on the working grid) is scored again from its window and features, and the map
    carries that score as the region's peak (:func:`~dicom_ai.networks.mass_rescore.rescored_map`);
    ``rescore_floor`` is then the map's candidate level, 0 outside the regions.
    """

    def __init__(self, network: DiscriminativeUNet, identity: ModelIdentity, threshold: float = 0.5,
                 device: torch.device | str = "cpu", finding: str = "malignant_lesion",
                 calibration: dict | None = None, rescore: MassRescoreNet | None = None,
                 rescore_floor: float = 1e-4):
        self.rescore = rescore.eval() if rescore is not None else None
        self.rescore_floor = float(rescore_floor)
        self.device = torch.device(device)
        #: The manifest's ``calibration`` (:func:`calibrate`), None for the clipped map.
        self.calibration = dict(calibration) if calibration else None
        self.network = network.to(self.device).eval()
        self.identity = identity
        self.threshold = float(threshold)
        #: The finding key of the lesion map: ``malignant_lesion`` (trained on malignancy, the
        #: phantom bundles) or ``mass`` (trained on masses of either severity).
        self.finding = finding
        #: What :meth:`predict` makes (see :class:`~dicom_ai.networks.pipeline.ImageModel`).
        self.findings, self.scores = (finding,), ("malignant",)

    @property
    def config(self) -> DUNetConfig:
        return self.network.config

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: torch.device | str = "cpu") -> "DUNetModel":
        """Build from a loaded :class:`~dicom_ai.networks.bundle.Bundle` of ``architecture.kind == "dunet"``.

        Raises :class:`~dicom_ai.core.errors.BundleError` for a bundle of another kind or
        weights that do not match the manifest's architecture (:func:`load_weights`).
        """
        require_kind(bundle, "dunet")
        config = DUNetConfig.from_dict(bundle.manifest["architecture"])
        entry = bundle.manifest.get("rescore")
        unet_part = {k: v for k, v in bundle.state_dict.items() if not k.startswith(RESCORE_PREFIX)}
        network = load_weights(DiscriminativeUNet(config), dataclasses.replace(bundle, state_dict=unet_part), "dunet")
        rescore, floor = None, 1e-4
        if entry:
            # The stage's tensors are the rest of the same safetensors file, checked as strictly.
            part = {k[len(RESCORE_PREFIX):]: v for k, v in bundle.state_dict.items() if k.startswith(RESCORE_PREFIX)}
            rescore = load_weights(MassRescoreNet(RescoreConfig.from_dict(entry["config"])),
                                   dataclasses.replace(bundle, state_dict=part), "dunet")
            floor = float(entry["floor"])
            if rescore.config.unet_weight > 0 and not entry.get("unet_calibration"):
                raise BundleError(f"bundle {bundle.where}: its rescore stage weighs the U-Net's calibrated score "
                                 "but the manifest's rescore entry has no unet_calibration")
        elif len(unet_part) != len(bundle.state_dict):
            raise BundleError(f"bundle {bundle.where} holds {RESCORE_PREFIX}* tensors but its manifest has no "
                             "'rescore' entry; re-export the bundle with its rescore configuration")
        finding = str(bundle.manifest.get("finding", "malignant_lesion"))  # what the manifest says it marks
        threshold = float(bundle.manifest["thresholds"].get(finding, 0.5))
        # With the stage, the U-Net's Platt map only enters through the stage's unet_weight.
        calibration = entry.get("unet_calibration") if entry else bundle.manifest.get("calibration")
        return cls(network, bundle.identity, threshold, device, finding=finding,
                   calibration=calibration, rescore=rescore, rescore_floor=floor)

    @torch.no_grad()
    def run(self, mammogram: Mammogram) -> dict[str, np.ndarray | float | Geometry]:
        """All intermediate arrays on the model grid: input, reconstruction, probability, score."""
        geo, image, _ = network_grid(mammogram, self.config)
        x = torch.from_numpy(image).to(self.device)[None, None]
        reconstruction = self.network.reconstruct(x)
        output = x - reconstruction if self.network.head == "subtraction" else reconstruction
        output = multiscale_output(self.network, mammogram, geo, output, self.config.test_time_scales_mm)
        if self.rescore is not None:
            prob = self._rescored(mammogram, geo, image, output)
        else:
            prob = calibrate(output, self.calibration)
        if prob is None:
            prob = self.network.probability(output)
        score = float(top_k_score(prob, self.config.score_top_fraction)[0])
        return {  # float(): under bf16 autocast (bench_gpu.py) the network's outputs are bf16
            "geometry": geo,
            "input": x[0, 0].float().cpu().numpy(),
            "reconstruction": reconstruction[0, 0].float().cpu().numpy(),
            "probability": prob[0, 0].float().cpu().numpy(),
            "score": min(max(score, 0.0), 1.0),
        }

    def _rescored(self, mammogram: Mammogram, geo: Geometry, image: np.ndarray, output: torch.Tensor) -> torch.Tensor:
        """The map of the false-positive reduction stage (class doc), (1, 1, H, W) on the working grid."""
        raw = output[0, 0].float().cpu().numpy()
        # Where the node lets a mark be (breast less pectoral muscle), as the stage was trained.
        allowed = geo.forward((mammogram.breast_mask & ~mammogram.pectoral_mask).astype(np.float32)) > 0.5
        regions = candidate_regions(raw, allowed, self.rescore.config.level)
        scores = rescore_regions(self.rescore, regions, raw, image, allowed)
        if self.rescore.config.unet_weight > 0:
            peaks = torch.tensor([r.peak for r in regions], dtype=torch.float32)
            scores = combine(scores, calibrate(peaks, self.calibration).numpy(), self.rescore.config.unet_weight)
        return torch.from_numpy(rescored_map(regions, scores, raw, self.rescore_floor))[None, None].to(output.device)

    def predict(self, mammogram: Mammogram) -> ModelOutput:
        """Malignancy map on the source grid and the image-level malignant score."""
        result = self.run(mammogram)
        return self._output(result)

    def predict_with_reconstruction(self, mammogram: Mammogram) -> tuple[ModelOutput, np.ndarray]:
        """As :meth:`predict`, plus ``f(x)`` mapped onto the source grid for display.

        The reconstruction is in the network's [0, 1] intensity scale, in the source's stored
        orientation, zero outside the breast crop.
        """
        result = self.run(mammogram)
        geo: Geometry = result["geometry"]  # type: ignore[assignment]
        return self._output(result), geo.inverse(result["reconstruction"])  # type: ignore[arg-type]

    def _output(self, result: dict) -> ModelOutput:
        geo: Geometry = result["geometry"]
        source = np.clip(geo.inverse(result["probability"]), 0.0, 1.0).astype(np.float32)
        return ModelOutput(
            maps=[ProbabilityMap(self.finding, source, self.threshold, self.identity)],
            scores=[ImageScore("malignant", float(result["score"]), self.identity)],
        )
