"""Microcalcification Detector and Segmentator CNNs (Valvano et al., arXiv 1809.03788).

Owns the method's config (:class:`MicrocalcConfig`), the patch CNN with its dense inference,
the patch taxonomy used to train it, the clustering of calcifications, and the whole-image
:class:`MicrocalcModel` (training is :mod:`dicom_ai.training.microcalc`).

Two small patch CNNs work at the method's pixel size of 0.05 mm:

* the **Detector** says whether a patch contains a microcalcification (MC) anywhere
  (positive = patch classes C1, C2, C3; negative = C4);
* the **Segmentator** says whether the *central pixel* of a patch is MC
  (positive = C1; negative = C2, C3, C4 -- C2/C3 are the hard negatives near MCs).

Patch taxonomy, for a patch of ``P`` pixels centred on pixel ``c`` (windows are square):

* C1 -- ``c`` is an MC pixel;
* C2 -- ``c`` is not MC, but an MC pixel lies in the central window of half-size
  ``near = P // 6`` pixels (8 px = 0.4 mm for P = 49);
* C3 -- an MC pixel lies in the patch but outside the central window;
* C4 -- no MC pixel in the patch.

Both networks are plain CNNs (conv-conv-pool, conv-conv-pool, conv) whose fully
connected head is written as convolutions (an ``F x F`` convolution, then ``1 x 1``), so they
run on regions of any size. Dense inference replaces the max-pools after the output stride
by stride-1 pools and dilates every later layer ("a trous"), which gives, for the "valid"
variant, *exactly* the output of visiting every patch one by one, at a fraction of the cost.
The "same" variant zero-pads every convolution at the *patch* border during training; run
densely, that padding happens only at the region border, so its dense output approximates
(does not equal) patch-by-patch inference -- ``bench_microcalc_image.py`` measures the gap.

Whole-image inference (:class:`MicrocalcModel`): crop to the breast, resample to 0.05 mm,
run the Detector densely at an output stride of 4 px (0.2 mm), run the Segmentator at
stride 1 only on tiles where the Detector fired, group calcifications into clusters
(>= 3 within linking distance 5 mm, i.e. about 1 cm^2), and map the maps back onto the
stored source grid.

Coordinates are ``(row, column)`` pixels; sizes in the config are in working-grid pixels
(0.05 mm) unless the name ends in ``_mm``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn
import torch.nn.functional as F

from matplotlib.path import Path as _PolygonPath

from dicom_ai.core.errors import ModelError
from dicom_ai.core.findings import ModelIdentity, ModelOutput, ProbabilityMap
from dicom_ai.imaging import Mammogram, resize
from dicom_ai.networks.bundle import Bundle, load_weights, require_kind
from dicom_ai.networks.engine import OnnxFunction, resolve_engine
from dicom_ai.networks.microcalc_clusters import (WINDOW, ClusterConfig, calibrated, candidate_clusters, components,
                                                 convex_hull, group_clusters)

__all__ = [
    "MicrocalcConfig",
    "PatchCNN",
    "Cluster",
    "MicrocalcResult",
    "MicrocalcModel",
    "patch_classes",
    "patch_class",
    "role_targets",
    "group_clusters",
    "sliding_window_logits",
]

#: Patch classes of the taxonomy.
C1, C2, C3, C4 = 1, 2, 3, 4
ROLES = ("detector", "segmentator")


@dataclass(frozen=True)
class MicrocalcConfig:
    """Hyper-parameters of both networks and of the whole-image cascade.

    ``patch_size`` is odd (29, 39 or 49 in the paper); ``padding`` is ``"same"`` or
    ``"valid"``. Inputs are [0, 1] intensities, standardised by the fixed ``input_mean`` and
    ``input_std`` (a per-patch standardisation would break dense inference). ``widths`` are the channels of the three convolution stages, ``fc_units``
    the width of the fully connected layer (an ``F x F`` convolution). The Detector runs at
    ``detector_stride`` output stride (a power of two up to 4).
    """

    patch_size: int = 49
    padding: str = "valid"
    widths: tuple[int, int, int] = (8, 16, 32)
    fc_units: int = 64
    dropout: float = 0.5
    input_mean: float = 0.5
    input_std: float = 0.25
    pixel_spacing_mm: float = 0.05
    detector_stride: int = 4
    detector_threshold: float = 0.5
    calcification_threshold: float = 0.5
    min_calcification_px: int = 3
    cluster_link_mm: float = 5.0
    cluster_min_count: int = 3
    cluster_margin_mm: float = 0.5
    cluster_threshold: float = 0.5
    tile: int = 512

    def __post_init__(self) -> None:
        if self.patch_size % 2 != 1 or self.patch_size < 15:
            raise ModelError(f"patch_size must be odd and >= 15, got {self.patch_size}")
        if self.padding not in ("same", "valid"):
            raise ModelError(f"padding must be 'same' or 'valid', got {self.padding!r}")
        if self.detector_stride not in (1, 2, 4):
            raise ModelError(f"detector_stride must be 1, 2 or 4, got {self.detector_stride}")
        if self.head_size < 1:
            raise ModelError(f"patch_size {self.patch_size} is too small for 'valid' convolutions")

    @property
    def near(self) -> int:
        """Half-size of the central window that separates C2 from C3, in pixels."""
        return self.patch_size // 6

    @property
    def head_size(self) -> int:
        """Side of the feature map the fully connected layer sees (its kernel size)."""
        size = self.patch_size
        shrink = 0 if self.padding == "same" else 2
        for op in _PLAN:
            size = size - shrink if op == "conv" else size // 2
        return size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MicrocalcConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "widths" in kwargs:
            kwargs["widths"] = tuple(int(w) for w in kwargs["widths"])
        return cls(**kwargs)


# The body, in order; each "conv" is a 3x3 convolution followed by ReLU.
_PLAN = ("conv", "conv", "pool", "conv", "conv", "pool", "conv")
_NUM_POOLS = _PLAN.count("pool")


class PatchCNN(nn.Module):
    """A patch classifier (2 logits) whose head is convolutional, so it also runs densely.

    ``forward`` takes patches ``(N, 1, P, P)`` and returns logits ``(N, 2)``;
    :meth:`dense_logits` takes a region ``(N, 1, H, W)`` and returns the logits of every
    patch whose top-left corner lies on the ``stride`` grid.
    """

    def __init__(self, config: MicrocalcConfig):
        super().__init__()
        self.config = config
        w0, w1, w2 = config.widths
        channels = [(1, w0), (w0, w0), (w0, w1), (w1, w1), (w1, w2)]
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 3) for cin, cout in channels)
        self.fc = nn.Conv2d(w2, config.fc_units, config.head_size)
        self.out = nn.Conv2d(config.fc_units, 2, 1)
        self.drop = nn.Dropout(config.dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        if patches.shape[-2:] != (p, p):
            raise ModelError(f"expected {p}x{p} patches, got {tuple(patches.shape[-2:])}")
        return self.dense_logits(patches, stride=2**_NUM_POOLS)[:, :, 0, 0]

    def dense_logits(self, region: torch.Tensor, stride: int = 1) -> torch.Tensor:
        """Logits ``(N, 2, (H-P)//stride+1, (W-P)//stride+1)``; entry (i, j) is the patch at
        top-left ``(i*stride, j*stride)`` of ``region``."""
        p = self.config.patch_size
        if stride not in (1, 2, 4) or stride > 2**_NUM_POOLS:
            raise ModelError(f"stride must be 1, 2 or 4, got {stride}")
        rows, cols = region.shape[-2:]
        if rows < p or cols < p:
            raise ModelError(f"region {rows}x{cols} is smaller than one {p}x{p} patch")
        n_r, n_c = (rows - p) // stride + 1, (cols - p) // stride + 1
        return self.dense_body(region, stride)[:, :, :n_r, :n_c]

    def dense_body(self, region: torch.Tensor, stride: int) -> torch.Tensor:
        """:meth:`dense_logits` before its crop to whole patches (strided pools may leave one
        more row or column): no branch on the region's size, so it exports to ONNX with
        dynamic shapes (:class:`~dicom_ai.networks.engine.OnnxFunction`)."""
        x, dilation = self.dense_features(region, stride)
        x = F.relu(F.conv2d(x, self.fc.weight, self.fc.bias, dilation=dilation))
        return self.out(self.drop(x))

    def dense_features(self, region: torch.Tensor, stride: int,
                       low: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
        """The part of :meth:`dense_body` before the fully connected layer, and that layer's
        dilation: logits (i, j) are ``out(relu(fc(features[:, :, i + dilation*a, j + dilation*b])))``
        over ``a, b = 0 .. head_size - 1``. ``low`` (e.g. ``torch.bfloat16``): every convolution
        after the first runs in that dtype, channels-last (:meth:`dense_body_bf16`)."""
        same = self.config.padding == "same"
        # A fixed pointwise affine map keeps dense and patch-wise results identical.
        x = (region - self.config.input_mean) / self.config.input_std
        dilation, reached, convs = 1, 1, iter(self.convs)
        for op in _PLAN:
            if op == "conv":
                conv = next(convs)
                cast = low is not None and conv is not self.convs[0]
                x = F.relu(F.conv2d(x, conv.weight.to(low) if cast else conv.weight,
                                    conv.bias.to(low) if cast else conv.bias,
                                    padding=dilation if same else 0, dilation=dilation))
                if low is not None and not cast:
                    x = x.to(low).contiguous(memory_format=torch.channels_last)
            elif reached < stride:
                x = F.max_pool2d(x, 2, 2)
                reached *= 2
            else:
                # Stride-1 pooling keeps every offset; later layers dilate to skip the same
                # pixels the strided network would have dropped, so results are identical.
                x = F.max_pool2d(x, 2, stride=1, dilation=dilation)
                dilation *= 2
        return x, dilation

    def dense_body_bf16(self, region: torch.Tensor, stride: int) -> torch.Tensor:
        """:meth:`dense_body` with every layer after the first in bf16 (channels-last), float32
        logits out. The first convolution (1 -> 8 channels, cheap) stays float32 so the input's
        grey levels are not rounded to bf16's 8-bit mantissa before any contrast is formed.
        Ignores any autocast around it (it casts explicitly)."""
        bf = torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            x, dilation = self.dense_features(region, stride, low=bf)
            x = F.relu(F.conv2d(x, self.fc.weight.to(bf), self.fc.bias.to(bf), dilation=dilation))
            return F.conv2d(x, self.out.weight.to(bf), self.out.bias.to(bf)).float()

    def head_at(self, features: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, dilation: int) -> torch.Tensor:
        """Class-1 probability of the patches at output positions ``(rows[k], cols[k])`` of one
        region's ``features`` ``(C, H, W)`` (:meth:`dense_features`): the fully connected layer
        and the output layer only there. Equals :meth:`dense_logits`' softmax to float32 rounding."""
        k = self.config.head_size
        width = features.shape[-1]
        offsets = dilation * (torch.arange(k)[:, None] * width + torch.arange(k)[None, :]).reshape(-1)
        windows = features.reshape(features.shape[0], -1)[:, (rows * width + cols)[None, :] + offsets[:, None]]
        hidden = F.relu(self.fc.weight.reshape(self.fc.out_channels, -1) @ windows.reshape(-1, len(rows))
                        + self.fc.bias[:, None])
        logits = self.out.weight[:, :, 0, 0] @ hidden + self.out.bias[:, None]
        return torch.sigmoid(logits[1] - logits[0])


def sliding_window_logits(net: PatchCNN, region: torch.Tensor, stride: int = 1,
                          batch: int = 1024) -> torch.Tensor:
    """The naive reference: cut every patch out and classify it on its own.

    Same output layout as :meth:`PatchCNN.dense_logits`; used by the tests and the speed
    benchmark, never by the node.

    Parameters
    ----------
    net
        The Detector or Segmentator.
    region
        (N, 1, rows, cols) working-grid (0.05 mm) intensities; only patches wholly inside
        ``region`` are classified (no padding).
    stride
        Step between patch centres, in working-grid pixels.
    batch
        Patches classified per forward pass (memory only; the result does not depend on it).

    Returns
    -------
    torch.Tensor
        (N, 2, n_r, n_c) logits; entry (i, j) is the patch whose upper-left pixel is
        ``(i*stride, j*stride)`` of ``region``, i.e. centred on ``(i*stride + P//2, j*stride + P//2)``.
    """
    p = net.config.patch_size
    n, _, rows, cols = region.shape
    n_r, n_c = (rows - p) // stride + 1, (cols - p) // stride + 1
    out = torch.empty(n, 2, n_r, n_c, dtype=region.dtype)
    for b in range(n):
        patches = F.unfold(region[b:b + 1], p, stride=stride)[0].T.reshape(-1, 1, p, p)
        logits = torch.cat([net(patches[i:i + batch]) for i in range(0, len(patches), batch)])
        out[b] = logits.T.reshape(2, n_r, n_c)
    return out


# --------------------------------------------------------------------------------------------
# Patch taxonomy


def box_any(mask: np.ndarray, half: int) -> np.ndarray:
    """Whether any pixel of the (2*half+1)^2 window centred on each pixel of a boolean mask
    is set (outside the array counts as unset). Separable, and only computed around set pixels."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(mask)
    if half == 0 or not mask.any():
        return mask.copy()
    r_idx, c_idx = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, r1 = max(r_idx[0] - half, 0), min(r_idx[-1] + half + 1, mask.shape[0])
    c0, c1 = max(c_idx[0] - half, 0), min(c_idx[-1] + half + 1, mask.shape[1])
    m = torch.from_numpy(mask[r0:r1, c0:c1].astype(np.float32))[None, None]
    k = 2 * half + 1
    with torch.no_grad():
        m = F.max_pool2d(F.pad(m, (half, half, 0, 0)), (1, k), stride=1)
        m = F.max_pool2d(F.pad(m, (0, 0, half, half)), (k, 1), stride=1)
    out[r0:r1, c0:c1] = m[0, 0].numpy() > 0
    return out


def patch_classes(mask: np.ndarray, patch_size: int, near: int | None = None) -> np.ndarray:
    """Class (1..4 = C1..C4) of the patch centred on every pixel of an MC ``mask``.

    Parameters
    ----------
    mask
        Boolean (rows, columns) MC mask on the working grid; outside the image counts as no MC.
    patch_size
        Patch side ``P`` in working-grid pixels (odd).
    near
        Half-size of the central window that makes a patch C2, in pixels; ``patch_size // 6``
        when None.

    Returns
    -------
    numpy.ndarray
        uint8 (rows, columns): the class of the patch centred on each pixel.
    """
    if patch_size % 2 != 1:
        raise ModelError(f"patch_size must be odd, got {patch_size}")
    near = patch_size // 6 if near is None else near
    any_near = box_any(mask, near)
    any_patch = box_any(mask, patch_size // 2)
    centre = np.asarray(mask, dtype=bool)
    classes = np.full(centre.shape, C4, dtype=np.uint8)
    classes[any_patch] = C3
    classes[any_near] = C2
    classes[centre] = C1
    return classes


def patch_class(mask_patch: np.ndarray, near: int | None = None) -> int:
    """Class (1..4) of one square, odd-sized patch from its MC mask."""
    size = mask_patch.shape[0]
    if mask_patch.shape != (size, size) or size % 2 != 1:
        raise ModelError(f"expected a square patch of odd size, got shape {mask_patch.shape}")
    return int(patch_classes(mask_patch, size, near)[size // 2, size // 2])


def role_targets(classes: np.ndarray | torch.Tensor, role: str):
    """Binary targets for a role: Detector C1-C3 -> 1, Segmentator C1 -> 1."""
    if role == "detector":
        return classes <= C3
    if role == "segmentator":
        return classes == C1
    raise ModelError(f"role must be one of {ROLES}, got {role!r}")


# --------------------------------------------------------------------------------------------
# Clusters


@dataclass
class Cluster:
    """A group of >= 3 calcifications.

    ``polygon`` is the convex hull (with a margin) as ``(row, col)`` vertices in source-grid
    pixels; ``centroid`` likewise. ``score`` is the mean of the three highest calcification
    probabilities in the cluster.
    """

    centroid: tuple[float, float]
    score: float
    count: int
    polygon: np.ndarray


def fill_polygon(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the pixels whose centres lie inside a (row, col) polygon.

    ``polygon`` is ``(n, 2)`` vertices in (row, column) pixels of the grid of ``shape``
    (pixel ``(r, c)`` has its centre at ``(r, c)``); matplotlib's even-odd point-in-path test.
    """
    mask = np.zeros(shape, dtype=bool)
    if len(polygon) < 3:
        return mask
    r0 = max(int(np.floor(polygon[:, 0].min())), 0)
    r1 = min(int(np.ceil(polygon[:, 0].max())) + 1, shape[0])
    c0 = max(int(np.floor(polygon[:, 1].min())), 0)
    c1 = min(int(np.ceil(polygon[:, 1].max())) + 1, shape[1])
    if r1 <= r0 or c1 <= c0:
        return mask
    rr, cc = np.mgrid[r0:r1, c0:c1]
    inside = _PolygonPath(polygon).contains_points(np.stack([rr.ravel(), cc.ravel()], axis=1))
    mask[r0:r1, c0:c1] = inside.reshape(rr.shape)
    return mask


# --------------------------------------------------------------------------------------------
# Whole-image model

#: Rank of the Detector's fully connected layer in the candidate pass (:class:`DetectorEstimate`).
CANDIDATE_RANK = 8

#: Logit margin of the candidate pass (off unless a model is given it: ``candidate_margin``): the
#: exact Detector runs where the rank-8 estimate of its
#: logit difference is at least ``logit(detector_threshold) - CANDIDATE_MARGIN``. The largest
#: shortfall of the estimate on a patch the shipped Detector fires on was 1.53 logits over 24
#: full-field phantom views (six seeds), so 2.0 leaves 0.47; at 2.0 the exact layer runs on
#: 6-12 % of the patches there (2.5: 21-38 %). Checked on real images by
#: benchmarks/bench_microcalc_cascade.py (benchmarks/results/microcalc_cascade.json): recall 1.0
#: on mini-MIAS, but one fired patch of 8004 missed on the shared FFDM images (needs 2.2) and
#: 7 of 10120 on CBIS-DDSM (needs 2.4), and it saves only a few per cent of the Detector's time
#: (its full-resolution first convolutions, not the fully connected layer, dominate), so the node
#: runs the Detector densely.
CANDIDATE_MARGIN = 2.0

#: A Detector tile with more candidates than this fraction runs densely (no saving left there);
#: so does the rest of an image once its tiles so far have had that many (a model that is
#: unsure everywhere, such as microcalc 0.2.0 on phantoms, would pay the pass for nothing).
CANDIDATE_DENSE_FRACTION = 0.35


#: Rows of the Segmentator's strips (:meth:`MicrocalcModel._segmentator_strips`) and the largest
#: gap between fired columns of a strip that still shares one run (a run's halo costs about
#: this much). Chosen by time on the full-size phantom study (16 / 8 against 8, 32 rows and a
#: 32-column gap; benchmarks/profile_microcalc.py).
SEG_STRIP = 16
SEG_STRIP_GAP = 8

#: ONNX Runtime's memory arena for the two networks' sessions (see :class:`OnnxFunction`).
ONNX_ARENA = True

#: Rows and largest width of the Detector's strips (:meth:`MicrocalcModel._detector_strips`), and
#: the largest width of a Segmentator run: the largest call sets what ONNX Runtime's arena keeps
#: resident (:data:`ONNX_ARENA`). 256 x 512 / 256 left the node's worker at 1041 MB at the all-on
#: point, 128 x 512 / 128 at 1013 MB (bench_turnaround; target 1024), about 1 s slower per study.
DETECTOR_STRIP = 128
DETECTOR_STRIP_MAX_WIDTH = 512
SEG_STRIP_MAX_WIDTH = 128

#: Precisions of :class:`MicrocalcModel` on the CPU: ``fp32`` (the reference) or ``bf16-gated``:
#: both networks first run in bf16 (:meth:`PatchCNN.dense_body_bf16`), and every decision the
#: marks depend on is then taken on float32 values of the reference engine (see
#: :data:`BF16_DETECTOR_MARGIN`, :data:`BF16_SEGMENTATOR_MARGIN`).
PRECISIONS = ("fp32", "bf16-gated")

#: Detector patches whose bf16 logit difference is within this many logits of firing are
#: classified again in float32 by the model's engine; the others keep the bf16 decision. The
#: largest |bf16 - fp32| Detector logit difference on breast patches was 0.30 (a CBIS-DDSM view;
#: phantoms 0.09-0.15, mini-MIAS 0.11-0.14, shared FFDM 0.16; benchmarks/bench_microcalc_precision.py,
#: results/microcalc_precision.json, run at margin 0.45), so 1.0 is 3.3 times it. The shipped
#: Detector's logits sit close to firing (on the phantom study 60 % of breast patches within 1.0),
#: which is why this path is slower than float32 here (results/cpu_precision.json).
BF16_DETECTOR_MARGIN = 1.0

#: Near patches are classified again in blocks of this many Detector outputs a side: a block
#: with more than :data:`BF16_DETECTOR_BLOCK_PATCHES` of them runs densely in float32 (about
#: that many patches classified alone cost as much as the block), the others patch by patch.
BF16_DETECTOR_BLOCK = 32
BF16_DETECTOR_BLOCK_PATCHES = 24

#: Segmentator tiles with a fired pixel whose bf16 logit difference is at or within this many
#: logits below :attr:`MicrocalcModel.exact_floor` are computed again in float32 (as are the tiles
#: the cluster stage reads background from): 3.9 times the largest |bf16 - fp32| Segmentator
#: logit difference on fired pixels, 0.26 (same benchmark).
BF16_SEGMENTATOR_MARGIN = 1.0


def zero_padded_crop(image: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """``image[r0:r1, c0:c1]`` with zeros where the box leaves the image (the values of
    ``np.pad(image)`` with constant 0, cropped), without a padded copy of the whole image: a
    view inside, a small copy at the border. Bounds in image pixels, half-open, may be negative."""
    rows, cols = image.shape
    if r0 >= 0 and c0 >= 0 and r1 <= rows and c1 <= cols:
        return image[r0:r1, c0:c1]
    out = np.zeros((r1 - r0, c1 - c0), dtype=image.dtype)
    a0, a1, b0, b1 = max(r0, 0), min(r1, rows), max(c0, 0), min(c1, cols)
    if a0 < a1 and b0 < b1:
        out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = image[a0:a1, b0:b1]
    return out


def fire_logit(threshold: float) -> float:
    """The logit difference ``logit1 - logit0`` at which a two-class softmax reaches ``threshold``."""
    if threshold <= 0.0:
        return -math.inf
    if threshold >= 1.0:
        return math.inf
    return math.log(threshold / (1.0 - threshold))


class DetectorEstimate(nn.Module):
    """The Detector's features with a cheap estimate of its logit difference beside them.

    The fully connected layer (an ``F x F`` convolution from 32 to 64 channels, about 80 % of
    the Detector's arithmetic at stride 4) is replaced by its best rank-``rank`` approximation
    (truncated SVD of its weights): ``F x F`` to ``rank`` channels, then ``1 x 1`` to 64. The
    estimate ``logit1 - logit0`` then costs about ``rank / 64`` of the exact layer.
    ``forward`` returns ``(N, C + 1, H, W)``: the features of
    :meth:`PatchCNN.dense_features` and, in the last channel, the estimate (top-left aligned,
    zero-padded to the features' size).
    """

    def __init__(self, detector: "PatchCNN", stride: int, rank: int = CANDIDATE_RANK):
        super().__init__()
        self.detector, self.stride = detector, stride
        fc = detector.fc
        weight = fc.weight.detach().reshape(fc.out_channels, -1).double()
        u, sv, vt = torch.linalg.svd(weight, full_matrices=False)
        self.register_buffer("down", vt[:rank].float().reshape(rank, *fc.weight.shape[1:]))
        self.register_buffer("up", (u[:, :rank] * sv[:rank]).float()[:, :, None, None])
        out = detector.out.weight.detach()[:, :, 0, 0]
        self.register_buffer("diff", (out[1] - out[0])[None, :, None, None].clone())
        self.register_buffer("diff_bias", (detector.out.bias.detach()[1] - detector.out.bias.detach()[0]).reshape(1))

    def forward(self, region: torch.Tensor) -> torch.Tensor:
        feats, dilation = self.detector.dense_features(region, self.stride)
        hidden = F.relu(F.conv2d(F.conv2d(feats, self.down, dilation=dilation), self.up, self.detector.fc.bias))
        estimate = F.conv2d(hidden, self.diff, self.diff_bias)
        reach = (self.detector.config.head_size - 1) * dilation
        return torch.cat([feats, F.pad(estimate, (0, reach, 0, reach))], 1)



@dataclass
class MicrocalcResult:
    """Everything the cascade produced for one image, on the stored source grid."""

    calcification: np.ndarray
    cluster_map: np.ndarray
    clusters: list[Cluster]
    timings_s: dict = field(default_factory=dict)
    detector_fraction: float = 0.0


class MicrocalcModel:
    """The Detector -> Segmentator cascade behind the node's model interface."""

    #: What :meth:`predict` makes (the pipeline skips a model whose every finding is off).
    findings = ("calcification", "calcification_cluster")
    scores: tuple[str, ...] = ()

    def __init__(self, detector: PatchCNN, segmentator: PatchCNN, identity: ModelIdentity,
                 thresholds: dict | None = None, device: torch.device | str = "cpu", engine: str = "auto",
                 candidate_margin: float | None = None, clusters: ClusterConfig | None = None):
        if detector.config != segmentator.config:
            raise ModelError("Detector and Segmentator must share one MicrocalcConfig")
        self.config = detector.config
        self.device = torch.device(device)
        self.detector = detector.to(self.device).eval()
        self.segmentator = segmentator.to(self.device).eval()
        #: ``torch`` (the reference) or ``onnxruntime`` (:func:`~dicom_ai.networks.engine.resolve_engine`).
        self.engine = resolve_engine(engine, self.device)
        self._onnx: dict[tuple[str, int], OnnxFunction] = {}
        self._estimate = DetectorEstimate(self.detector, self.config.detector_stride).eval()
        if self.engine == "onnxruntime":
            # Exported now (about a second), so loading the model pays it, not the first image.
            example = torch.zeros(1, 1, 2 * self.config.patch_size, 2 * self.config.patch_size)
            for role, stride in (("detector", self.config.detector_stride), ("segmentator", 1)):
                net = self.detector if role == "detector" else self.segmentator
                self._onnx[(role, stride)] = OnnxFunction(
                    lambda x, net=net, stride=stride: net.dense_body(x, stride), net, example, arena=ONNX_ARENA)
        if self.engine == "onnxruntime" and candidate_margin is not None:
            example = torch.zeros(1, 1, 2 * self.config.patch_size, 2 * self.config.patch_size)
            self._onnx[("detector-estimate", self.config.detector_stride)] = OnnxFunction(
                self._estimate, self._estimate, example)
        self.identity = identity
        #: Logit margin of the Detector's candidate pass (:data:`CANDIDATE_MARGIN`); None (the
        #: default) runs the Detector densely everywhere (the reference path).
        self.candidate_margin: float | None = candidate_margin
        #: Figures of the last :meth:`detector_map` / :meth:`dense_cascade` call.
        self.last_stats: dict[str, float] = {}
        #: One of :data:`PRECISIONS` (:meth:`set_precision`).
        self.precision = "fp32"
        #: torch threads while the bf16 networks run (None: leave the process's setting).
        self.bf16_threads: int | None = None
        thresholds = thresholds or {}
        self.calcification_threshold = float(thresholds.get("calcification", self.config.calcification_threshold))
        self.cluster_threshold = float(thresholds.get("calcification_cluster", self.config.cluster_threshold))
        #: The cluster stage of microcalc >= 0.3 (sized calcifications, cluster model, per
        #: pixel-size calibration); None: the 0.1/0.2 stage of :meth:`_clusters`.
        self.clusters = clusters

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: torch.device | str = "cpu", engine: str = "auto") -> "MicrocalcModel":
        """Build from a :class:`~dicom_ai.networks.bundle.Bundle` of kind ``microcalc`` whose
        state dict holds exactly the ``detector.*`` and ``segmentator.*`` tensors; ``engine``
        as :func:`~dicom_ai.networks.engine.resolve_engine` (``auto``: ONNX Runtime on the CPU).

        Raises :class:`~dicom_ai.core.errors.BundleError` for a bundle of another kind or
        weights that do not match the manifest's architecture (:func:`load_weights`).
        """
        require_kind(bundle, "microcalc")
        config = MicrocalcConfig.from_dict(bundle.manifest["architecture"])
        nets = load_weights(nn.ModuleDict({role: PatchCNN(config) for role in ROLES}), bundle, "microcalc")
        clusters = bundle.manifest["architecture"].get("clusters")
        return cls(nets["detector"], nets["segmentator"], bundle.identity,
                   bundle.manifest.get("thresholds"), device, engine,
                   clusters=ClusterConfig.from_dict(clusters) if clusters else None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Both networks' tensors under ``detector.`` and ``segmentator.`` prefixes."""
        sd = {f"detector.{k}": v for k, v in self.detector.state_dict().items()}
        sd.update({f"segmentator.{k}": v for k, v in self.segmentator.state_dict().items()})
        return sd

    # -- the node interface ------------------------------------------------------------------

    def predict(self, mammogram: Mammogram) -> ModelOutput:
        """'calcification' probability and 'calcification_cluster' score maps on the source grid."""
        result = self.analyse(mammogram)
        return ModelOutput(maps=[
            ProbabilityMap("calcification", result.calcification, self.calcification_threshold, self.identity),
            ProbabilityMap("calcification_cluster", result.cluster_map, self.cluster_threshold, self.identity),
        ])

    def analyse(self, mammogram: Mammogram, mask: np.ndarray | None = None) -> MicrocalcResult:
        """Run the cascade on one image and return maps, clusters and timings.

        ``mask`` is the breast mask on the source grid (computed when None).
        """
        cfg = self.config
        t0 = time.perf_counter()
        rows, cols = mammogram.shape
        if mask is None:
            mask = mammogram.breast_mask
        if not mask.any():
            return MicrocalcResult(np.zeros((rows, cols), dtype=np.float32), np.zeros((rows, cols), dtype=np.float32),
                                   [], {"total": time.perf_counter() - t0})
        image, work_mask, (r0, r1, c0, c1) = self.working_grid(mammogram, mask)
        work_shape = image.shape
        sr, sc = (float(s) for s in mammogram.spacing_mm)
        t1 = time.perf_counter()
        prob, fired = self.dense_cascade(image, work_mask)
        del work_mask
        t2 = time.perf_counter()
        # The cluster stage (the model's memory peak: its labelling of the map) runs before the
        # source-grid maps exist, and the working image goes before they are made.
        clusters = self._clusters(prob, (sr, sc), (r0, c0), image)
        del image
        prob_src = np.zeros((rows, cols), dtype=np.float32)
        # Nearest keeps the networks' own values; an antialiased shrink would dilute
        # 2-pixel calcifications below the operating point.
        prob_src[r0:r1, c0:c1] = resize(prob, (r1 - r0, c1 - c0), mode="nearest")
        del prob
        cluster_src = np.zeros((rows, cols), dtype=np.float32)
        for cl in sorted(clusters, key=lambda c: c.score):
            inside = fill_polygon(cl.polygon, (rows, cols))
            cluster_src[inside] = np.maximum(cluster_src[inside], cl.score)
        t3 = time.perf_counter()
        return MicrocalcResult(prob_src, cluster_src, clusters,
                               {"resample": t1 - t0, "cascade": t2 - t1, "clusters": t3 - t2,
                                "total": t3 - t0, "working_shape": list(work_shape)},
                               detector_fraction=fired)

    def working_grid(self, mammogram: Mammogram, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
        """The breast's bounding box resampled to the working grid (``pixel_spacing_mm``).

        Returns the working image (bilinear), the breast mask on it (nearest), and the box
        ``(r0, r1, c0, c1)`` (half-open, source-grid pixels) it was cut from; ``mask`` must
        have a set pixel.
        """
        cfg = self.config
        r_idx, c_idx = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        r0, r1, c0, c1 = int(r_idx[0]), int(r_idx[-1]) + 1, int(c_idx[0]), int(c_idx[-1]) + 1
        sr, sc = (float(s) for s in mammogram.spacing_mm)
        work_shape = (max(1, round((r1 - r0) * sr / cfg.pixel_spacing_mm)),
                      max(1, round((c1 - c0) * sc / cfg.pixel_spacing_mm)))
        image = resize(mammogram.pixels[r0:r1, c0:c1], work_shape)
        work_mask = resize(mask[r0:r1, c0:c1].astype(np.float32), work_shape, mode="nearest") > 0.5
        return image, work_mask, (r0, r1, c0, c1)

    # -- the dense cascade on the 0.05 mm working grid ------------------------------------------

    def patch_probability(self, role: str, regions: np.ndarray, stride: int, logit_diff: bool = False) -> np.ndarray:
        """Class-1 probability ``(N, n_r, n_c)`` of every patch of ``regions`` ``(N, rows, cols)``
        on the ``stride`` grid (layout of :meth:`PatchCNN.dense_logits`), by this model's engine;
        ``logit_diff``: ``logit1 - logit0`` instead."""
        net = self.detector if role == "detector" else self.segmentator
        if self.engine == "torch":
            with torch.no_grad():
                x = torch.from_numpy(np.ascontiguousarray(regions, dtype=np.float32))[:, None].to(self.device)
                if logit_diff:
                    logits = net.dense_logits(x, stride=stride).float()
                    return (logits[:, 1] - logits[:, 0]).cpu().numpy()
                # float(): under bf16 autocast (bench_gpu.py) the logits come back in bf16.
                return torch.softmax(net.dense_logits(x, stride=stride).float(), 1)[:, 1].cpu().numpy()
        fn = self._onnx.get((role, stride))
        if fn is None:
            fn = self._onnx[(role, stride)] = OnnxFunction(lambda x: net.dense_body(x, stride), net,
                                                           torch.zeros(1, 1, *regions.shape[-2:]))
        p = self.config.patch_size
        rows, cols = regions.shape[-2:]
        if rows < p or cols < p:
            raise ModelError(f"region {rows}x{cols} is smaller than one {p}x{p} patch")
        n_r, n_c = (rows - p) // stride + 1, (cols - p) // stride + 1
        logits = fn(regions[:, None])[:, :, :n_r, :n_c]
        if logit_diff:
            return logits[:, 1] - logits[:, 0]
        # Two-class softmax, as torch.softmax computes it for the reference engine.
        return (1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))).astype(np.float32)

    def set_precision(self, precision: str, threads: int | None = None) -> None:
        """Run the cascade in ``precision`` (one of :data:`PRECISIONS`); ``threads``: torch's
        thread count while the bf16 networks run (None keeps the process's)."""
        if precision not in PRECISIONS:
            raise ModelError(f"microcalc precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and self.device.type != "cpu":
            raise ModelError("the gated bf16 path is a CPU path; on a GPU use bf16 autocast (bench_gpu.py)")
        self.precision, self.bf16_threads = precision, threads

    @property
    def exact_floor(self) -> float:
        """Lowest calcification probability whose exact value the outputs depend on everywhere:
        the map's threshold (its regions) and the cluster stage's component threshold. (The
        cluster stage also reads "below its background floor" in windows around its
        calcifications; :meth:`dense_cascade` computes those tiles in float32 too.)"""
        floors = [self.calcification_threshold]
        if self.clusters is not None:
            floors.append(self.clusters.threshold)
        return min(floors)

    def _bf16_logit_diff(self, role: str, regions: np.ndarray, stride: int) -> np.ndarray:
        """``logit1 - logit0`` ``(N, n_r, n_c)`` of every patch of ``regions`` by the bf16 body."""
        net = self.detector if role == "detector" else self.segmentator
        p = self.config.patch_size
        n_r, n_c = (regions.shape[-2] - p) // stride + 1, (regions.shape[-1] - p) // stride + 1
        x = torch.from_numpy(np.ascontiguousarray(regions, dtype=np.float32))[:, None]
        logits = net.dense_body_bf16(x, stride)[:, :, :n_r, :n_c]
        return (logits[:, 1] - logits[:, 0]).numpy()

    def _fp32_patches(self, role: str, patches: np.ndarray, stride: int) -> np.ndarray:
        """Float32 probability of each single patch ``(N, P, P)`` by this model's engine, in
        chunks (the reference arithmetic on a patch-sized region)."""
        out = [self.patch_probability(role, patches[k:k + 256], stride)[:, 0, 0] for k in range(0, len(patches), 256)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _detector_bf16_gated(self, region: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        """Detector probability of one region's patches (layout of :meth:`patch_probability`):
        bf16, except that breast patches (``wanted``, top-left aligned) within
        :data:`BF16_DETECTOR_MARGIN` of firing are classified again in float32, so which of them
        fire is float32's decision."""
        s, p = self.config.detector_stride, self.config.patch_size
        d = self._bf16_logit_diff("detector", region[None], s)[0]
        near = np.zeros(d.shape, dtype=bool)
        h, w = min(d.shape[0], wanted.shape[0]), min(d.shape[1], wanted.shape[1])
        near[:h, :w] = wanted[:h, :w]
        near &= np.abs(d - fire_logit(self.config.detector_threshold)) <= BF16_DETECTOR_MARGIN
        out = (1.0 / (1.0 + np.exp(-d))).astype(np.float32)
        rr, cc = np.nonzero(near)
        windows = np.lib.stride_tricks.sliding_window_view(region, (p, p))
        b, alone = BF16_DETECTOR_BLOCK, []
        with torch.autocast("cpu", enabled=False):
            for i0 in range(0, d.shape[0], b):
                for j0 in range(0, d.shape[1], b):
                    block = near[i0:i0 + b, j0:j0 + b]
                    count = int(block.sum())
                    if count > BF16_DETECTOR_BLOCK_PATCHES:
                        h_b, w_b = block.shape
                        sub = region[i0 * s:(i0 + h_b - 1) * s + p, j0 * s:(j0 + w_b - 1) * s + p]
                        out[i0:i0 + h_b, j0:j0 + w_b] = self.patch_probability("detector", sub[None], s)[0][:h_b, :w_b]
                        self.last_stats["fp32_blocks"] = self.last_stats.get("fp32_blocks", 0) + 1
                    elif count:
                        bi, bj = np.nonzero(block)
                        alone.append((bi + i0, bj + j0))
            if alone:
                ai, aj = np.concatenate([a for a, _ in alone]), np.concatenate([b_ for _, b_ in alone])
                out[ai, aj] = self._fp32_patches("detector", windows[ai * s, aj * s], s)
        self.last_stats["bf16_points"] = self.last_stats.get("bf16_points", 0) + int(wanted[:h, :w].sum())
        self.last_stats["fp32_points"] = self.last_stats.get("fp32_points", 0) + len(rr)
        return out

    def features_and_estimate(self, regions: np.ndarray) -> np.ndarray:
        """:class:`DetectorEstimate` of ``regions`` ``(N, rows, cols)`` by this model's engine."""
        if self.engine == "torch":
            with torch.no_grad():
                x = torch.from_numpy(np.ascontiguousarray(regions, dtype=np.float32))[:, None].to(self.device)
                return self._estimate(x).float().cpu().numpy()
        fn = self._onnx.get(("detector-estimate", self.config.detector_stride))
        if fn is None:
            example = torch.zeros(1, 1, 2 * self.config.patch_size, 2 * self.config.patch_size)
            fn = self._onnx[("detector-estimate", self.config.detector_stride)] = OnnxFunction(
                self._estimate, self._estimate, example)
        return fn(regions[:, None])

    def _detector_candidates(self, region: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        """Detector probability of one region's patches (layout of :meth:`patch_probability`):
        exact where the estimate says it may fire and ``wanted`` (boolean, top-left aligned:
        the patches centred in the breast) is set, 0 elsewhere."""
        cfg, s = self.config, self.config.detector_stride
        p = cfg.patch_size
        n_r, n_c = (region.shape[0] - p) // s + 1, (region.shape[1] - p) // s + 1
        both = self.features_and_estimate(region[None])[0]
        candidates = np.zeros((n_r, n_c), dtype=bool)
        h, w = min(n_r, wanted.shape[0]), min(n_c, wanted.shape[1])
        candidates[:h, :w] = wanted[:h, :w]
        candidates &= both[-1, :n_r, :n_c] >= fire_logit(cfg.detector_threshold) - self.candidate_margin
        count, points = int(candidates.sum()), int(wanted.sum())
        self.last_stats["candidate_tiles"] = self.last_stats.get("candidate_tiles", 0) + 1
        self.last_stats["candidates"] = self.last_stats.get("candidates", 0) + count
        self.last_stats["detector_points"] = self.last_stats.get("detector_points", 0) + points
        if count > CANDIDATE_DENSE_FRACTION * points:
            self.last_stats["dense_tiles"] = self.last_stats.get("dense_tiles", 0) + 1
            return self.patch_probability("detector", region[None], s)[0]
        out = np.zeros((n_r, n_c), dtype=np.float32)
        if count:
            rr, cc = np.nonzero(candidates)
            with torch.no_grad():
                out[rr, cc] = self.detector.head_at(torch.from_numpy(both[:-1]), torch.from_numpy(rr),
                                                    torch.from_numpy(cc), 2 ** _NUM_POOLS // s).float().numpy()
        return out

    @torch.no_grad()
    def detector_map(self, image: np.ndarray, mask: np.ndarray | None = None, breast_only: bool = False) -> np.ndarray:
        """Detector probability on the stride grid: entry (i, j) is the patch centred on pixel
        ``(i*stride, j*stride)`` of ``image``. Tiles without breast pixels are skipped (0).

        With :attr:`candidate_margin` set, the candidate pass (:class:`DetectorEstimate`) runs
        first on each tile and the exact fully connected layer only on breast patches where the
        estimate is within the margin of firing; every other entry is 0.

        ``breast_only`` (what the cascade needs): only the entries of breast grid points are
        the Detector's (bit for bit), others may be 0; with ONNX Runtime on the dense float32
        path this runs on strips (:meth:`_detector_strips`), less work than tiles.
        """
        cfg, s, half = self.config, self.config.detector_stride, self.config.patch_size // 2
        rows, cols = image.shape
        n_r, n_c = -(-rows // s), -(-cols // s)
        self.last_stats = {}
        if (breast_only and mask is not None and self.candidate_margin is None and self.precision == "fp32"
                and self.engine == "onnxruntime"):
            return self._detector_strips(image, mask)
        out = np.zeros((n_r, n_c), dtype=np.float32)
        tile = cfg.tile - cfg.tile % s
        for tr in range(0, rows, tile):
            for tc in range(0, cols, tile):
                if mask is not None and not mask[tr:tr + tile, tc:tc + tile].any():
                    continue
                region = zero_padded_crop(image, tr - half, tr + tile + half, tc - half, tc + tile + half)
                stats = self.last_stats
                dense = self.candidate_margin is None or (
                    stats.get("candidate_tiles", 0) >= 2
                    and stats.get("candidates", 0) > CANDIDATE_DENSE_FRACTION * stats.get("detector_points", 0))
                if self.precision == "bf16-gated":
                    wanted = (np.ones((-(-min(tile, rows - tr) // s), -(-min(tile, cols - tc) // s)), dtype=bool)
                              if mask is None else mask[tr:tr + tile:s, tc:tc + tile:s])
                    p = self._detector_bf16_gated(region, wanted)
                elif dense:
                    p = self.patch_probability("detector", region[None], s)[0]
                else:
                    wanted = (np.ones((-(-min(tile, rows - tr) // s), -(-min(tile, cols - tc) // s)), dtype=bool)
                              if mask is None else mask[tr:tr + tile:s, tc:tc + tile:s])
                    p = self._detector_candidates(region, wanted)
                i0, j0 = tr // s, tc // s
                h, w = min(p.shape[0], n_r - i0), min(p.shape[1], n_c - j0)
                out[i0:i0 + h, j0:j0 + w] = p[:h, :w]
        return out

    def _detector_strips(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The dense Detector on strips of :data:`DETECTOR_STRIP` rows, each from its first to
        its last breast grid column: the breast's patches, not whole 512-pixel tiles (on the
        phantom study about 0.8 of the tiles' patches). Same values there as the tiles: ONNX
        Runtime's result for a patch does not depend on the region around it (the strips start
        on the stride grid; tests/test_microcalc_precision.py checks it bit for bit)."""
        s, half, p = self.config.detector_stride, self.config.patch_size // 2, self.config.patch_size
        rows, cols = image.shape
        grid = mask[::s, ::s]
        out = np.zeros(grid.shape, dtype=np.float32)
        step = DETECTOR_STRIP // s
        for i0 in range(0, grid.shape[0], step):
            columns = np.flatnonzero(grid[i0:i0 + step].any(axis=0))
            if not len(columns):
                continue
            i1 = min(i0 + step, grid.shape[0])
            # In pieces of at most DETECTOR_STRIP_MAX_WIDTH pixels: the largest call sets ONNX
            # Runtime's arena (what stays resident).
            for j0 in range(int(columns[0]), int(columns[-1]) + 1, DETECTOR_STRIP_MAX_WIDTH // s):
                j1 = min(j0 + DETECTOR_STRIP_MAX_WIDTH // s, int(columns[-1]) + 1)
                region = zero_padded_crop(image, i0 * s - half, (i1 - 1) * s - half + p, j0 * s - half,
                                          (j1 - 1) * s - half + p)
                out[i0:i1, j0:j1] = self.patch_probability("detector", region[None], s)[0]
        return out

    @torch.no_grad()
    def dense_cascade(self, image: np.ndarray, mask: np.ndarray | None = None,
                      seg_tile: int = 32, seg_strip: int | None = None) -> tuple[np.ndarray, float]:
        """MC probability per pixel of ``image`` (0.05 mm grid), and the fraction of the
        image the Segmentator must cover.

        The Segmentator runs on the fired pixels' column runs of ``seg_strip``-row strips (or
        on ``seg_tile``-pixel tiles that overlap a patch where the Detector fired); every other
        pixel is 0.

        Parameters
        ----------
        image
            (rows, columns) intensities in [0, 1] on the 0.05 mm working grid (the breast crop
            of the stored source image, not flipped).
        mask
            Boolean breast mask on the same grid; pixels outside get 0. None: everywhere.
        seg_tile
            Side of the Segmentator's tiles in working-grid pixels when it runs on tiles
            (``seg_strip=0`` or the gated bf16 path; speed only: 32 covers the fired patches
            more tightly than 64; on the phantom study 0.09 of the image instead of 0.15).
        seg_strip
            Rows of the Segmentator's strips (:meth:`_segmentator_strips`; None:
            :data:`SEG_STRIP`, 0: tiles). Same values as tiles bit for bit, less work; ONNX
            Runtime only (torch's convolutions round differently for other region sizes, by
            about 1e-7, so the torch engine, the GPU's, keeps its tiles).

        Returns
        -------
        tuple[numpy.ndarray, float]
            float32 (rows, columns) probability, and the fraction of the image the Segmentator
            must cover (breast pixels within a fired Detector patch), the same for every path
            and engine; the pixels it computed are ``last_stats["segmentator_pixels"]``.
        """
        previous = torch.get_num_threads()
        if self.precision == "bf16-gated" and self.bf16_threads:
            torch.set_num_threads(self.bf16_threads)
        try:
            return self._dense_cascade(image, mask, seg_tile, SEG_STRIP if seg_strip is None else seg_strip)
        finally:
            torch.set_num_threads(previous)

    def _dense_cascade(self, image: np.ndarray, mask: np.ndarray | None, seg_tile: int,
                       seg_strip: int) -> tuple[np.ndarray, float]:
        cfg, s, half = self.config, self.config.detector_stride, self.config.patch_size // 2
        rows, cols = image.shape
        det = self.detector_map(image, mask, breast_only=True)
        if mask is not None:
            grid_mask = mask[::s, ::s][:det.shape[0], :det.shape[1]]
            det = np.where(grid_mask, det, 0.0)
        fired = np.zeros((rows, cols), dtype=bool)
        for i, j in zip(*np.nonzero(det >= cfg.detector_threshold)):
            r, c = i * s, j * s
            fired[max(r - half, 0):r + half + 1, max(c - half, 0):c + half + 1] = True
        if mask is not None:
            fired &= mask  # outside the breast the map is 0 anyway: no tile for it
        if self.precision == "fp32" and self.engine == "onnxruntime" and seg_strip:
            return self._segmentator_strips(image, fired, seg_strip)
        prob = np.zeros((rows, cols), dtype=np.float32)
        padded = np.pad(image, ((half, half + seg_tile), (half, half + seg_tile)))
        tiles = [(tr, tc) for tr in range(0, rows, seg_tile) for tc in range(0, cols, seg_tile)
                 if fired[tr:tr + seg_tile, tc:tc + seg_tile].any()]
        batch, gated, exact = 16, self.precision == "bf16-gated", set()
        for k in range(0, len(tiles), batch):
            chunk = tiles[k:k + batch]
            x = np.stack([padded[tr:tr + seg_tile + 2 * half, tc:tc + seg_tile + 2 * half] for tr, tc in chunk])
            p = (self._segmentator_bf16_gated(x, chunk, fired, seg_tile, exact) if gated
                 else self.patch_probability("segmentator", x, 1))
            for (tr, tc), pt in zip(chunk, p):
                h, w = min(seg_tile, rows - tr), min(seg_tile, cols - tc)
                prob[tr:tr + h, tc:tc + w] = pt[:h, :w]
        prob[~fired] = 0.0
        if gated:
            # The components above the floor are float32's already; the background windows
            # around them are made float32 too, so the cluster stage reads the reference map.
            todo = sorted(self._background_tiles(prob, seg_tile).intersection(tiles) - exact)
            for k in range(0, len(todo), batch):
                chunk = todo[k:k + batch]
                x = np.stack([padded[tr:tr + seg_tile + 2 * half, tc:tc + seg_tile + 2 * half] for tr, tc in chunk])
                with torch.autocast("cpu", enabled=False):
                    p = self.patch_probability("segmentator", x, 1)
                for (tr, tc), pt in zip(chunk, p):
                    h, w = min(seg_tile, rows - tr), min(seg_tile, cols - tc)
                    prob[tr:tr + h, tc:tc + w] = np.where(fired[tr:tr + h, tc:tc + w], pt[:h, :w], 0.0)
            self.last_stats.update(seg_tiles=len(tiles), seg_fp32_tiles=len(exact) + len(todo),
                                   seg_background_tiles=len(todo))
        self.last_stats["segmentator_pixels"] = len(tiles) * seg_tile * seg_tile
        return prob, float(fired.mean())

    def _segmentator_strips(self, image: np.ndarray, fired: np.ndarray, strip: int) -> tuple[np.ndarray, float]:
        """The Segmentator on ``strip``-row strips of ``image``, each only over the column runs
        that hold fired pixels (runs closer than :data:`SEG_STRIP_GAP` merged); 0 elsewhere.

        Same values as the tiled path: ONNX Runtime's result for an output pixel does not
        depend on the size of the region around it (tests/test_microcalc_precision.py checks
        it bit for bit; torch's does, by about 1e-7), and every fired pixel lies in one run. Less work than 32-pixel tiles: the
        fully connected layer (about 90 % of a pixel's arithmetic) runs on fired columns of each
        strip, not on whole tiles, and long runs share their convolution halo.
        """
        half = self.config.patch_size // 2
        rows, cols = image.shape
        prob = np.zeros((rows, cols), dtype=np.float32)
        computed = 0
        for tr in range(0, rows, strip):
            columns = np.flatnonzero(fired[tr:tr + strip].any(axis=0))
            if not len(columns):
                continue
            breaks = np.flatnonzero(np.diff(columns) > SEG_STRIP_GAP)
            h = min(strip, rows - tr)
            runs = [(int(a), int(b)) for a, b in zip(np.r_[columns[0], columns[breaks + 1]], np.r_[columns[breaks], columns[-1]] + 1)]
            # Long runs in pieces: the largest call sets ONNX Runtime's arena (what stays resident).
            runs = [(c, min(c + SEG_STRIP_MAX_WIDTH, b)) for a, b in runs for c in range(a, b, SEG_STRIP_MAX_WIDTH)]
            for c0, c1 in runs:
                region = zero_padded_crop(image, tr - half, tr + h + half, c0 - half, c1 + half)
                p = self.patch_probability("segmentator", region[None], 1)[0]
                prob[tr:tr + h, c0:c1] = p[:h, :c1 - c0]
                computed += h * (c1 - c0)
        prob[~fired] = 0.0
        self.last_stats["segmentator_pixels"] = computed
        return prob, float(fired.mean())

    def _segmentator_bf16_gated(self, x: np.ndarray, tiles: list[tuple[int, int]], fired: np.ndarray,
                                seg_tile: int, exact: set[tuple[int, int]]) -> np.ndarray:
        """Segmentator probability of a batch of tiles ``x`` (layout of :meth:`patch_probability`):
        bf16, except that every tile with a fired pixel at or within
        :data:`BF16_SEGMENTATOR_MARGIN` logits below :attr:`exact_floor` is computed again in
        float32 by the model's engine (whole tile, the reference arithmetic) and added to ``exact``."""
        d = self._bf16_logit_diff("segmentator", x, 1)
        out = (1.0 / (1.0 + np.exp(-d))).astype(np.float32)
        floor = fire_logit(self.exact_floor) - BF16_SEGMENTATOR_MARGIN
        again = []
        for k, (tr, tc) in enumerate(tiles):
            f = fired[tr:tr + seg_tile, tc:tc + seg_tile]
            if (d[k, :f.shape[0], :f.shape[1]][f] >= floor).any():
                again.append(k)
                exact.add((tr, tc))
        if again:
            with torch.autocast("cpu", enabled=False):
                out[again] = self.patch_probability("segmentator", x[again], 1)
        return out

    def _background_tiles(self, prob: np.ndarray, seg_tile: int) -> set[tuple[int, int]]:
        """Segmentator tiles within the cluster stage's contrast window (:data:`WINDOW`) of a
        calcification it may group: there it reads which pixels are below its background floor."""
        if self.clusters is None:
            return set()
        half, out = WINDOW // 2, set()
        for c in components(prob, self.clusters.threshold):
            r, k = int(round(c.centroid[0])), int(round(c.centroid[1]))
            for tr in range(max(r - half, 0) // seg_tile * seg_tile, r + half + 1, seg_tile):
                for tc in range(max(k - half, 0) // seg_tile * seg_tile, k + half + 1, seg_tile):
                    out.add((tr, tc))
        return out

    def _clusters(self, prob: np.ndarray, spacing: tuple[float, float], origin: tuple[int, int],
                  image: np.ndarray | None = None) -> list[Cluster]:
        """Clusters from a working-grid probability map (and the working-grid ``image``, which
        the cluster stage of :attr:`clusters` needs), with polygons on the source grid."""
        cfg = self.config
        if self.clusters is not None and image is not None:
            return self._scored_clusters(prob, image, spacing, origin)
        comps = components(prob, self.calcification_threshold, cfg.min_calcification_px)
        if len(comps) < cfg.cluster_min_count:
            return []
        px = cfg.pixel_spacing_mm
        centroids_mm = np.array([c.centroid for c in comps]) * px
        scale = np.array([px / spacing[0], px / spacing[1]])  # working px -> source px
        offset = np.array(origin, dtype=np.float64)
        clusters = []
        for group in group_clusters(centroids_mm, cfg.cluster_min_count, cfg.cluster_link_mm):
            peaks = np.sort([comps[g].peak for g in group])[::-1]
            pts = np.concatenate([comps[g].pixels for g in group]).astype(np.float64)
            margin = cfg.cluster_margin_mm / px + 0.5
            ring = np.stack([np.cos(np.linspace(0, 2 * math.pi, 16, endpoint=False)),
                             np.sin(np.linspace(0, 2 * math.pi, 16, endpoint=False))], 1) * margin
            hull = convex_hull(pts)
            polygon = convex_hull((hull[:, None, :] + ring[None]).reshape(-1, 2))
            centroid = np.mean([comps[g].centroid for g in group], axis=0)
            clusters.append(Cluster(centroid=tuple(centroid * scale + offset),
                                    score=float(np.mean(peaks[:3])), count=len(group),
                                    polygon=polygon * scale + offset))
        return clusters

    def _scored_clusters(self, prob: np.ndarray, image: np.ndarray, spacing: tuple[float, float],
                         origin: tuple[int, int]) -> list[Cluster]:
        """Clusters of :mod:`~dicom_ai.networks.microcalc_clusters` (score: the cluster model,
        calibrated for the image's pixel-size class by its finest source spacing)."""
        cc, px = self.clusters, self.config.pixel_spacing_mm
        scale = np.array([px / spacing[0], px / spacing[1]])
        offset = np.array(origin, dtype=np.float64)
        margin = cc.margin_mm / px + 0.5
        angles = np.linspace(0, 2 * math.pi, 16, endpoint=False)
        ring = np.stack([np.cos(angles), np.sin(angles)], 1) * margin
        out = []
        for group, _, score in candidate_clusters(prob, image, px, cc):
            pts = np.concatenate([c.pixels for c in group]).astype(np.float64)
            hull = convex_hull(pts)
            polygon = convex_hull((hull[:, None, :] + ring[None]).reshape(-1, 2))
            centroid = np.mean([c.centroid for c in group], axis=0)
            out.append(Cluster(centroid=tuple(centroid * scale + offset),
                               score=calibrated(score, min(spacing), cc), count=len(group),
                               polygon=polygon * scale + offset))
        return out
