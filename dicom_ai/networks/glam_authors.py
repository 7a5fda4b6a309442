"""GLAM as its authors released it: the network the nyukat/GLAM checkpoints belong to.

Owns :class:`GlamAuthorsConfig`, the network :class:`GlamAuthors` (global module, greedy
region proposal, local module, fusion), :func:`check_state_dict` (the one check of a
checkpoint's tensors against :data:`~dicom_ai.networks.glam_authors_tensors.AUTHORS_TENSORS`),
:func:`synthetic_state_dict` (seeded stand-in weights for tests and benchmarks) and
:class:`GlamAuthorsModel`, the servable model the node builds from a bundle whose
``architecture`` is ``{"kind": "glam", "name": "authors", ...}``.

This is our own code, written to be *compatible* with the authors' (AGPL, not copied): the
module tree is laid out so that ``state_dict()`` has exactly the checkpoint's tensor names and
shapes (``global_network.downsampling_branch.*``, ``global_network.postprocess_module.*``,
``detection_network.dn_resnet.*``, ``detection_network.gn_conv_last.weight``), so an import
is a check, not a rename; and the forward pass does the same arithmetic in the same order
(see shared/research/models.md, section 1, and ``benchmarks/bench_glam_authors_equivalence.py``
for the measured agreement with their implementation):

* global module: pre-activation ResNet-22 (7x7/2 conv, 3x3/2 max-pool without padding, five
  stages of two BasicBlockV2, a 1x1 projection without BN on the pre-activated input of each
  stage's first block, a final BN-ReLU); sigmoid saliency maps S1, S2, S3 from the stage-3,
  stage-4 and final features (the last two upsampled nearest to ``cam_size`` before the
  sigmoid); ``S_g = 0.2 S3 + 0.6 S2 + 0.2 S1``; ``y_global`` the mean over the three scales of
  the mean of the top ``percent_k`` of each class map;
* region proposal: per-class min-max normalised ``S_g`` summed over classes, ``K`` times the
  ``crop_shape`` window (on the map grid) with the largest mean, zeroed after it is taken;
  corners mapped to the input by ``round(i / h * H)``;
* local module: ResNet-34 with every stage stride removed on the 1-channel crop repeated to 3
  channels; a sigmoid 2-class map at 1/4 of the crop;
* fusion: the local maps upsampled nearest to the crop and pasted into zeros (a later patch
  over an earlier one), averaged with ``S_g`` upsampled nearest to the input.

The blocks, the top-t% pooling and the greedy proposal are written here rather than shared
with the trained GLAM (:mod:`dicom_ai.networks.glam`): this network must keep the authors'
layout and arithmetic whatever the trained GLAM's code becomes (its masks, its own naming).

Channel 0 of every map is benign, channel 1 malignant. Arrays are ``(rows, columns)``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dicom_ai.core.errors import BundleError, ModelError
from dicom_ai.core.findings import ImageScore, ModelIdentity, ModelOutput, ProbabilityMap
from dicom_ai.imaging import Mammogram
from dicom_ai.imaging.nyu_window import NyuWindow, nyu_input
from dicom_ai.networks.bundle import Bundle, OperatingIdentity, load_weights
from dicom_ai.networks.glam_authors_tensors import AUTHORS_GLAM_COMMIT, AUTHORS_TENSORS

__all__ = [
    "ARCHITECTURE_NAME",
    "GlamAuthorsConfig",
    "GlamAuthors",
    "GlamAuthorsOutput",
    "GlamAuthorsModel",
    "check_state_dict",
    "synthetic_state_dict",
    "is_authors_bundle",
    "AUTHORS_TENSORS",
    "AUTHORS_GLAM_COMMIT",
]

_events = logging.getLogger("dicom_ai.node.events")

#: ``architecture.name`` of a GLAM bundle that holds the authors' network.
ARCHITECTURE_NAME = "authors"

CLASSES: tuple[str, str] = ("benign", "malignant")

#: Widths of the authors' networks; fixed by the checkpoint's tensor shapes, so not in the config.
_GLOBAL_WIDTHS = (16, 32, 64, 128, 256)
_GLOBAL_STRIDES = (1, 2, 2, 2, 2)
_LOCAL_WIDTHS = (64, 128, 256, 512)
_LOCAL_BLOCKS = (3, 4, 6, 3)


def _stage3_shape(input_shape: tuple[int, int]) -> tuple[int, int]:
    """Rows, columns of the global module's stage-3 output (the saliency grid) for an input."""
    h, w = input_shape
    h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # 7x7 stride 2 pad 3
    h, w = (h - 3) // 2 + 1, (w - 3) // 2 + 1  # 3x3 max-pool stride 2, no padding
    for s in _GLOBAL_STRIDES[:3]:
        h, w = (h - 1) // s + 1, (w - 1) // s + 1
    return h, w


@dataclass(frozen=True)
class GlamAuthorsConfig:
    """The hyper-parameters of the authors' GLAM (``src/scripts/run_model.py`` values by default).

    ``input_shape`` (rows, columns, input pixels) is the fixed window the network reads;
    ``cam_size`` the saliency grid (rows, columns), which must be the stage-3 output size of
    ``input_shape``; ``crop_shape`` the local module's patch in input pixels;
    ``top_k_per_class`` the number of patches K (one set shared by both classes, despite the
    name); ``percent_k`` the top fraction pooled per global map and
    ``detection_pooling_percent_k`` the one pooled over all patch maps; ``saliency_weights``
    the weights of S1 (1/16), S2 (1/32), S3 (1/64) in ``S_g``. The network's widths are the
    checkpoint's and are not configurable. A smaller ``input_shape``/``crop_shape`` runs the
    same weights faster (tests); only the defaults reproduce the authors' outputs.
    """

    name: str = ARCHITECTURE_NAME
    input_shape: tuple[int, int] = (2944, 1920)
    cam_size: tuple[int, int] = (184, 120)
    top_k_per_class: int = 1
    crop_shape: tuple[int, int] = (512, 512)
    percent_k: float = 0.03
    detection_pooling_percent_k: float = 0.3
    saliency_weights: tuple[float, float, float] = (0.2, 0.6, 0.2)

    def __post_init__(self) -> None:
        if self.name != ARCHITECTURE_NAME:
            raise ModelError(f"GlamAuthorsConfig.name must be {ARCHITECTURE_NAME!r}, got {self.name!r}")
        expected = _stage3_shape(self.input_shape)
        if tuple(self.cam_size) != expected:
            raise ModelError(f"cam_size {tuple(self.cam_size)} does not fit input_shape {tuple(self.input_shape)}: "
                             f"the global module's stage-3 map is {expected}")
        ch, cw = self.crop_shape
        if ch % 4 or cw % 4 or ch < 16 or cw < 16:
            raise ModelError(f"crop_shape {tuple(self.crop_shape)} must be multiples of 4, at least 16")
        if ch > self.input_shape[0] or cw > self.input_shape[1]:
            raise ModelError(f"crop_shape {tuple(self.crop_shape)} exceeds input_shape {tuple(self.input_shape)}")
        wh, ww = self.map_window
        if not (1 <= wh <= self.cam_size[0] and 1 <= ww <= self.cam_size[1]):
            raise ModelError(f"crop_shape {tuple(self.crop_shape)} is {wh}x{ww} on the {tuple(self.cam_size)} "
                             "saliency map; it must be at least 1x1 and fit the map")
        if self.top_k_per_class < 1:
            raise ModelError(f"top_k_per_class must be at least 1, got {self.top_k_per_class}")
        for key in ("percent_k", "detection_pooling_percent_k"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ModelError(f"{key} must be in (0, 1], got {getattr(self, key)}")

    @property
    def map_window(self) -> tuple[int, int]:
        """``crop_shape`` measured on the saliency grid (32 x 32 by default), as the authors round it."""
        (h, w), (H, W) = self.cam_size, self.input_shape
        return int(np.round(self.crop_shape[0] * h / H)), int(np.round(self.crop_shape[1] * w / W))

    def to_dict(self) -> dict:
        """JSON-friendly form (tuples become lists), as stored in a bundle manifest."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "GlamAuthorsConfig":
        """Inverse of :meth:`to_dict`; unknown keys (for example ``kind``) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------- network


class _PreActBlock(nn.Module):
    """BasicBlockV2: BN-ReLU-conv3x3(s)-BN-ReLU-conv3x3, plus the shortcut; the projection (a 1x1
    conv without BN, on the pre-activated input) is stored as ``downsample.0`` as in the checkpoint."""

    def __init__(self, cin: int, cout: int, stride: int, project: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False)) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class _BasicBlock(nn.Module):
    """torchvision's post-activation BasicBlock at stride 1; projection conv+BN where the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
                           if cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + identity)


def _top_pool(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """(N, C, ...) -> (N, C): the mean of the top ``int(round(fraction * n))`` values of each map."""
    flat = maps.flatten(2)
    return flat.topk(max(1, int(round(fraction * flat.shape[-1]))), dim=-1).values.mean(dim=-1)


def _greedy_corners(saliency: torch.Tensor, k: int, window: tuple[int, int]) -> np.ndarray:
    """(N, k, 2) upper-left (row, column) saliency-grid corners of the greedy region proposal.

    Each class map min-max normalised per image, the classes summed; k times the ``window``
    with the largest mean (first in row-major order on ties) is taken and zeroed.
    """
    s = saliency.detach().float()
    lo = s.flatten(2).min(-1).values[..., None, None]
    hi = s.flatten(2).max(-1).values[..., None, None]
    m = ((s - lo) / (hi - lo)).sum(1, keepdim=True)
    wh, ww = window
    corners = np.zeros((s.shape[0], k, 2), dtype=np.int64)
    for j in range(k):
        pooled = F.avg_pool2d(m, (wh, ww), stride=1)
        flat = pooled.flatten(1).max(1).indices
        for b in range(s.shape[0]):
            r, c = divmod(int(flat[b]), pooled.shape[-1])
            corners[b, j] = r, c
            m[b, :, r:r + wh, c:c + ww] = 0
    return corners


class _DownsamplingBranch(nn.Module):
    """Pre-activation ResNet-22 body; returns the 5 stage outputs, the last after BN-ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.first_conv = nn.Conv2d(1, _GLOBAL_WIDTHS[0], 7, 2, 3, bias=False)
        self.first_pool = nn.MaxPool2d(3, 2, 0)
        stages, cin = [], _GLOBAL_WIDTHS[0]
        for cout, stride in zip(_GLOBAL_WIDTHS, _GLOBAL_STRIDES):
            stages.append(nn.Sequential(_PreActBlock(cin, cout, stride, True), _PreActBlock(cout, cout, 1, False)))
            cin = cout
        self.layer_list = nn.ModuleList(stages)
        self.final_bn = nn.BatchNorm2d(_GLOBAL_WIDTHS[-1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.first_pool(self.first_conv(x))
        feats = []
        for stage in self.layer_list:
            h = stage(h)
            feats.append(h)
        feats[-1] = F.relu(self.final_bn(h))
        return feats


class _SaliencyHeads(nn.Module):
    """The three 1x1 class heads; ``combine`` is in the checkpoint but the forward pass never uses it."""

    def __init__(self) -> None:
        super().__init__()
        self.gn_conv_1 = nn.Conv2d(_GLOBAL_WIDTHS[2], 2, 1, bias=False)
        self.gn_conv_2 = nn.Conv2d(_GLOBAL_WIDTHS[3], 2, 1, bias=False)
        self.gn_conv_last = nn.Conv2d(_GLOBAL_WIDTHS[4], 2, 1, bias=False)
        self.combine = nn.Conv2d(6, 2, 1, bias=False)

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """S1, S2, S3 (N, 2, *stage-3 size) probabilities from the stage-3, stage-4 and final features."""
        size = feats[2].shape[-2:]
        s1 = torch.sigmoid(self.gn_conv_1(feats[2]))
        s2 = torch.sigmoid(F.interpolate(self.gn_conv_2(feats[3]), size=size, mode="nearest"))
        s3 = torch.sigmoid(F.interpolate(self.gn_conv_last(feats[4]), size=size, mode="nearest"))
        return s1, s2, s3


class _GlobalNetwork(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.downsampling_branch = _DownsamplingBranch()
        self.postprocess_module = _SaliencyHeads()


class _LocalResNet(nn.Module):
    """ResNet-34 body without stage strides (3 input channels, the crop repeated)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, _LOCAL_WIDTHS[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(_LOCAL_WIDTHS[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = _LOCAL_WIDTHS[0]
        for i, (cout, blocks) in enumerate(zip(_LOCAL_WIDTHS, _LOCAL_BLOCKS)):
            setattr(self, f"layer{i + 1}",
                    nn.Sequential(*[_BasicBlock(cin if b == 0 else cout, cout) for b in range(blocks)]))
            cin = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class _DetectionNetwork(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dn_resnet = _LocalResNet()
        self.gn_conv_last = nn.Conv2d(_LOCAL_WIDTHS[-1], 2, 1, bias=False)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(M, 1, ch, cw) crops -> (M, 2, ch/4, cw/4) probabilities."""
        return torch.sigmoid(self.gn_conv_last(self.dn_resnet(crops.expand(-1, 3, -1, -1))))


@dataclass
class GlamAuthorsOutput:
    """What :class:`GlamAuthors` computes for a batch of N inputs with K patches each.

    ``y_global`` (N, 2) the image-level prediction (the released scores; probabilities,
    not calibrated); ``s1``, ``s2``, ``s3`` and ``saliency_global`` (N, 2, *cam_size);
    ``patch_locations`` float64 numpy (N, K, 2): upper-left (row, column) input pixels, as
    the authors' model holds them; ``patch_maps`` (N, K, 2, ch/4, cw/4); ``y_local`` (N, 2)
    the local prediction (computed but not used at inference, as in the authors' code);
    ``saliency_fused`` (N, 2, *input_shape) the final map.
    """

    y_global: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    s3: torch.Tensor
    saliency_global: torch.Tensor
    patch_locations: np.ndarray
    patch_maps: torch.Tensor
    y_local: torch.Tensor
    saliency_fused: torch.Tensor


class GlamAuthors(nn.Module):
    """The authors' GLAM; ``state_dict()`` names and shapes are :data:`AUTHORS_TENSORS`."""

    def __init__(self, config: GlamAuthorsConfig = GlamAuthorsConfig()):
        super().__init__()
        # Initial values do not matter: every tensor comes from the checkpoint.
        self.config = config
        self.global_network = _GlobalNetwork()
        self.detection_network = _DetectionNetwork()

    def forward(self, x: torch.Tensor) -> GlamAuthorsOutput:
        """``x`` (N, 1, *input_shape): standardised images facing right (see :mod:`dicom_ai.imaging.nyu_window`)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != tuple(cfg.input_shape):
            raise ModelError(f"the authors' GLAM reads (N, 1, {cfg.input_shape[0]}, {cfg.input_shape[1]}) inputs, "
                             f"got {tuple(x.shape)}")
        n, _, rows, cols = x.shape
        s1, s2, s3 = self.global_network.postprocess_module(self.global_network.downsampling_branch(x))
        w1, w2, w3 = cfg.saliency_weights
        saliency = w3 * s3 + w2 * s2 + w1 * s1  # the authors' order of the terms (float rounding)
        t = cfg.percent_k
        y_global = (_top_pool(s1, t) + _top_pool(s2, t) + _top_pool(s3, t)) / 3

        k = cfg.top_k_per_class
        corners = _greedy_corners(saliency, k, cfg.map_window)
        (h, w) = cfg.cam_size
        # float64 numpy, np.around, as the authors' _convert_crop_position (half to even).
        locations = np.stack([np.around(corners[..., 0] / h * rows), np.around(corners[..., 1] / w * cols)], axis=-1)
        crops = _crop(x, locations, cfg.crop_shape)
        maps = self.detection_network(crops)
        maps = maps.reshape(n, k, *maps.shape[1:])
        y_local = _top_pool(maps.transpose(1, 2), cfg.detection_pooling_percent_k)

        ch, cw = cfg.crop_shape
        canvas = x.new_zeros(n, 2, rows, cols)
        for b in range(n):
            for j in range(k):
                r, c = int(locations[b, j, 0]), int(locations[b, j, 1])
                canvas[b, :, r:r + ch, c:c + cw] = F.interpolate(maps[b, j][None], size=(ch, cw), mode="nearest")[0]
        fused = (canvas + F.interpolate(saliency, size=(rows, cols), mode="nearest")) / 2
        return GlamAuthorsOutput(y_global=y_global, s1=s1, s2=s2, s3=s3, saliency_global=saliency,
                                 patch_locations=locations, patch_maps=maps, y_local=y_local, saliency_fused=fused)


def _crop(x: torch.Tensor, locations: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """(N*K, 1, *shape) crops at upper-left input pixels ``locations`` (N, K, 2), image-major.

    The corner mapping keeps every crop inside the input for the authors' configuration;
    should one not fit (another ``crop_shape``), the part outside is the image minimum, as
    the authors fill it, and the part inside is placed where it belongs in the crop.
    """
    ch, cw = shape
    rows, cols = x.shape[-2:]
    out = []
    for b in range(x.shape[0]):
        for r, c in locations[b].astype(np.int64).tolist():
            crop = x[b, 0, r:r + ch, c:c + cw]
            if crop.shape != (ch, cw):
                full = x[b, 0].min().expand(ch, cw).clone()
                full[:crop.shape[0], :crop.shape[1]] = crop
                crop = full
            out.append(crop)
    return torch.stack(out)[:, None]


# --------------------------------------------------------------------------- checkpoints


def check_state_dict(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, checked against :data:`AUTHORS_TENSORS`; returns them float32/int64.

    Every float tensor of the table must be present with its shape, and nothing else may
    be. The BN ``num_batches_tracked`` counters are the one exception: they are training
    bookkeeping (the eval-mode arithmetic never reads them), so a checkpoint saved without
    them gets zeros, and the caller records which (key ``filled`` of the result's
    provenance, see :mod:`dicom_ai.cli.importer`).

    Raises
    ------
    BundleError
        Naming every missing, unexpected or mis-shaped tensor (first five of each kind with
        the counts) and ``where`` (the file).
    """
    expected = {name: (shape, dtype) for name, shape, dtype in AUTHORS_TENSORS}
    missing = sorted(k for k in expected if k not in tensors and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in tensors if k not in expected)
    reshaped = sorted(f"{k} {tuple(tensors[k].shape)} (expected {expected[k][0]})"
                      for k in tensors if k in expected and tuple(tensors[k].shape) != expected[k][0])
    wrong_type = sorted(f"{k} {tensors[k].dtype}" for k in tensors
                        if k in expected and expected[k][1] == "float32" and not tensors[k].is_floating_point())
    if missing or unexpected or reshaped or wrong_type:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", reshaped), ("not floating point", wrong_type)) if keys]
        raise BundleError(f"{where} is not a checkpoint of the authors' GLAM (nyukat/GLAM model_sep/model_joint): "
                          f"{'; '.join(parts)}. Use the file as the authors distribute it.")
    out = {}
    for name, (shape, dtype) in expected.items():
        if name in tensors:
            out[name] = tensors[name].detach().to(torch.float32 if dtype == "float32" else torch.int64).contiguous()
        else:
            out[name] = torch.zeros(shape, dtype=torch.int64)
    return out


def synthetic_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded stand-in weights with the checkpoint's names and shapes (tests and benchmarks only).

    Not a model: convolutions ~ N(0, 1/fan_in), BN scale in [0.5, 1.5], shift, running mean
    in [-0.1, 0.1] and running variance in [0.5, 1.5], so activations stay in a range where
    the sigmoid maps vary (ties in top-k and arg-max would make comparisons trivial).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, dtype in AUTHORS_TENSORS:
        if dtype != "float32":
            out[name] = torch.zeros(shape, dtype=torch.int64)
        elif name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
            out[name] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) == 1:
            out[name] = (torch.rand(shape, generator=g) - 0.5) * 0.2
        else:
            fan_in = int(np.prod(shape[1:]))
            out[name] = torch.randn(shape, generator=g) / np.sqrt(fan_in)
    return out


# --------------------------------------------------------------------------- inference


def is_authors_bundle(bundle: Bundle) -> bool:
    """Whether a GLAM bundle holds the authors' network (``architecture.name == "authors"``)."""
    return dict(bundle.manifest.get("architecture") or {}).get("name") == ARCHITECTURE_NAME


#: Leads the operating-point text of a research-only bundle, which the SR writers state with each
#: finding and in the algorithm parameters.
RESEARCH_NOTE = "RESEARCH ONLY, not for clinical use"


def _research_identity(identity: ModelIdentity) -> OperatingIdentity:
    """``identity`` whose operating target starts with :data:`RESEARCH_NOTE` (so every SR says so),
    whatever target a site wrote when it re-chose its thresholds."""
    target = getattr(identity, "operating_target", "")
    if target.startswith(RESEARCH_NOTE):
        return identity  # type: ignore[return-value]
    if not isinstance(identity, OperatingIdentity):
        identity = OperatingIdentity(name=identity.name, version=identity.version, family=identity.family)
    return dataclasses.replace(identity, operating_target=f"{RESEARCH_NOTE}; {target}" if target else RESEARCH_NOTE)


class GlamAuthorsModel:
    """The authors' GLAM behind the pipeline's ``predict(Mammogram) -> ModelOutput``.

    The view is prepared as the authors' pipeline would hand it over
    (:func:`dicom_ai.imaging.nyu_window.nyu_input`); the fused map is placed back onto the
    stored source pixels (no resampling: the window is a crop of the source grid).
    """

    def __init__(self, network: GlamAuthors, identity: ModelIdentity, thresholds: dict[str, float],
                 device: torch.device | str = "cpu", licence: str = "", intended_use: str = ""):
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.config = network.config
        self.identity = identity
        self.thresholds = thresholds
        self.licence = licence
        self.intended_use = intended_use

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: torch.device | str = "cpu") -> "GlamAuthorsModel":
        """Build from a GLAM bundle whose ``architecture.name`` is ``authors``.

        Logs a warning naming the weights' licence: such a bundle is for research only.

        Raises
        ------
        BundleError
            Another kind or architecture, or tensors that do not fit (:func:`load_weights`).
        """
        if not is_authors_bundle(bundle):
            raise BundleError(f"bundle {bundle.where} is not an authors' GLAM bundle "
                              f"(architecture.name must be {ARCHITECTURE_NAME!r})")
        try:
            config = GlamAuthorsConfig.from_dict(bundle.manifest["architecture"])
        except ModelError as exc:
            raise BundleError(f"bundle {bundle.where}: {exc}") from exc
        network = load_weights(GlamAuthors(config), bundle, "glam")
        thresholds = {k: float(v) for k, v in bundle.manifest["thresholds"].items()}
        licence = str(dict(bundle.manifest.get("licence") or {}).get("name", ""))
        identity = bundle.identity
        if bundle.manifest.get("research_only", False):
            identity = _research_identity(identity)
        model = cls(network, identity, thresholds, device, licence=licence,
                    intended_use=str(bundle.manifest.get("intended_use", "")))
        # The worker's JSON log (the node's event logger by name: networks may not import node).
        _events.warning("research_only_model", extra={"event_fields": {
            "model": bundle.manifest["name"], "version": str(bundle.manifest["version"]),
            "licence": licence or "not stated", "intended_use": model.intended_use or "research use only"}})
        return model

    def run(self, mammogram: Mammogram) -> tuple[GlamAuthorsOutput, NyuWindow]:
        """The network's outputs for one view (batch of one) and the window that maps them back."""
        x, window = nyu_input(mammogram, self.config.input_shape)
        t = torch.from_numpy(x)[None, None].to(self.device)
        with torch.inference_mode():
            out = self.network(t)
        return out, window

    def predict(self, mammogram: Mammogram) -> ModelOutput:
        """Benign and malignant fused maps on the stored source grid, and the image-level scores.

        Source pixels outside the authors' window (cropped away or past it) get 0.
        """
        out, window = self.run(mammogram)
        fused = out.saliency_fused[0].float().cpu().numpy()
        maps = []
        for channel, finding in ((0, "benign_lesion"), (1, "malignant_lesion")):
            prob = np.clip(window.inverse(fused[channel], fill=0.0), 0.0, 1.0).astype(np.float32)
            maps.append(ProbabilityMap(finding=finding, probability=prob,
                                       threshold=self.thresholds.get(finding, 0.5), model=self.identity))
        y = out.y_global[0].float().cpu().numpy()
        scores = [ImageScore(name=name, value=float(np.clip(y[i], 0.0, 1.0)), model=self.identity)
                  for i, name in enumerate(CLASSES)]
        return ModelOutput(maps=maps, scores=scores)
