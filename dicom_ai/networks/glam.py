"""GLAM: Global-Local Activation Maps (Liu et al., MIDL 2021), network, preprocessing, inference.

Owns :class:`GlamConfig` (and the named :data:`CONFIGS`), the network modules, the GLAM input
window (:func:`glam_geometry`, :func:`glam_input`) and :class:`GlamModel`, the servable model;
training is :mod:`dicom_ai.training.glam`.

Weakly-supervised high-resolution segmentation trained from image-level labels only:

* a global module (pre-activation ResNet-22) produces benign/malignant saliency maps at three
  scales (1/16, 1/32, 1/64 of the input); their weighted sum ``S_g`` is the coarse map at 1/16,
  and the mean of their top-t% pooled values is the image-level prediction;
* a greedy, non-differentiable region proposal picks ``K`` square patches from ``S_g``;
* a local module (ResNet-34 with every stage stride removed) segments each patch at 1/4 of the
  input resolution, and top-t% pooling over all patches gives the local prediction;
* fusion: the patch maps, pasted into a zero canvas, are averaged with the upsampled ``S_g``.

Details follow nyukat/GLAM (see shared/research/models.md, section 1): Xavier/Kaiming init,
nearest-neighbour upsampling everywhere, saliency weights 0.2/0.6/0.2, t = 3 % (global) and
30 % (local), ``x = 16 i`` corner mapping.

Channel 0 of every map is benign, channel 1 malignant. Arrays are ``(rows, columns)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dicom_ai.core.errors import BundleError, ModelError
from dicom_ai.core.findings import ImageScore, ModelIdentity, ModelOutput, ProbabilityMap
from dicom_ai.imaging import Geometry, Mammogram, resize
from dicom_ai.networks.bundle import Bundle, load_bundle, load_weights, require_kind
from dicom_ai.networks.glam_authors import GlamAuthors, GlamAuthorsConfig, GlamAuthorsModel, is_authors_bundle

__all__ = [
    "GlamConfig",
    "CONFIGS",
    "GlobalNetwork",
    "LocalNetwork",
    "Glam",
    "GlamOutput",
    "CamClassifier",
    "top_t_pool",
    "mask_to_grid",
    "select_patches",
    "crop_patches",
    "fuse",
    "optimal_window",
    "glam_geometry",
    "glam_input",
    "standardise",
    "GlamModel",
    "GlamPrediction",
    "run_reference",
]

CLASSES: tuple[str, str] = ("benign", "malignant")


@dataclass(frozen=True)
class GlamConfig:
    """Every hyper-parameter of a GLAM network and of its input window.

    ``input_shape`` is the (rows, columns) window fed to the network in the canonical
    orientation; the source image is first resampled to ``pixel_spacing_mm`` so that a
    window covers the same physical area whatever the detector. Crop noise is in pixels of
    the resampled grid. ``num_patches`` is K at inference; ``train_num_patches`` K when
    training the local module.
    """

    name: str = "paper"
    input_shape: tuple[int, int] = (2944, 1920)
    pixel_spacing_mm: float = 0.07
    global_channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    global_blocks: tuple[int, ...] = (2, 2, 2, 2, 2)
    global_strides: tuple[int, ...] = (1, 2, 2, 2, 2)
    saliency_weights: tuple[float, float, float] = (0.2, 0.6, 0.2)  # S1 (1/16), S2 (1/32), S3 (1/64)
    top_t_global: float = 0.03
    patch_size: int = 512
    num_patches: int = 1
    train_num_patches: int = 1
    local_channels: tuple[int, ...] = (64, 128, 256, 512)
    local_blocks: tuple[int, ...] = (3, 4, 6, 3)
    local_in_channels: int = 3
    top_t_local: float = 0.3
    crop_noise_px: int = 100
    crop_size_noise_px: int = 100

    def __post_init__(self) -> None:
        if len(self.global_channels) != 5 or len(self.global_blocks) != 5 or len(self.global_strides) != 5:
            raise ModelError("the global network has exactly 5 stages (channels, blocks, strides)")
        if len(self.local_channels) != len(self.local_blocks):
            raise ModelError("local_channels and local_blocks must have the same length")
        if self.patch_size % 4:
            raise ModelError(f"patch_size must be a multiple of 4, got {self.patch_size}")
        if self.patch_size > min(self.input_shape):
            raise ModelError(f"patch_size {self.patch_size} exceeds the input {self.input_shape}")

    @property
    def cam_shape(self) -> tuple[int, int]:
        """Shape of the global saliency map (the stage-3 output), about 1/16 of the input."""
        return tuple(self._stage_shapes()[2])  # type: ignore[return-value]

    @property
    def patch_window(self) -> tuple[int, int]:
        """The patch size measured on the saliency map (32 x 32 for the paper config)."""
        ch, cw = self.cam_shape
        h, w = self.input_shape
        return max(1, round(self.patch_size * ch / h)), max(1, round(self.patch_size * cw / w))

    @property
    def local_map_size(self) -> int:
        """Side of a patch's local saliency map (1/4 of the patch)."""
        return self.patch_size // 4

    def _stage_shapes(self) -> list[tuple[int, int]]:
        shapes = []
        h, w = self.input_shape
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # 7x7 stride 2 pad 3
        h, w = (h - 3) // 2 + 1, (w - 3) // 2 + 1  # 3x3 max-pool stride 2, no padding
        for s in self.global_strides:
            h, w = (h - 1) // s + 1, (w - 1) // s + 1
            shapes.append((h, w))
        return shapes

    def to_dict(self) -> dict:
        """JSON-friendly form (tuples become lists), as stored in a bundle manifest."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "GlamConfig":
        """Inverse of :meth:`to_dict`; unknown keys (for example ``kind``) are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kwargs)


#: The published architecture, and a width/resolution-reduced one that trains on a CPU.
#: Compact keeps every structural element (5 pre-activation stages, 3 saliency scales,
#: ResNet-34 block counts without strides) at 1/7.5 of the resolution (0.525 mm pixels, a
#: 202 x 134 mm window, the paper's 206 x 134 mm at 0.07 mm) and 1/2 (global) or 1/8
#: (local) of the width; the patch covers the same 34 mm.
CONFIGS: dict[str, GlamConfig] = {
    "paper": GlamConfig(),
    "compact": GlamConfig(
        name="compact",
        input_shape=(384, 256),
        pixel_spacing_mm=0.525,
        global_channels=(8, 16, 32, 64, 128),
        patch_size=64,
        train_num_patches=2,
        local_channels=(8, 16, 32, 64),
        crop_noise_px=13,
        crop_size_noise_px=13,
    ),
}


# --------------------------------------------------------------------------- network


class _PreActBlock(nn.Module):
    """BasicBlockV2: BN-ReLU-conv3x3(s)-BN-ReLU-conv3x3; projection on the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int, project: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.downsample = nn.Conv2d(cin, cout, 1, stride, bias=False) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class _BasicBlock(nn.Module):
    """torchvision's post-activation BasicBlock; stride 1 (the local network has no strides)."""

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
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


def top_t_pool(maps: torch.Tensor, t: float) -> torch.Tensor:
    """Mean of the top ``round(t * n)`` values of each (sample, class) over the trailing dims.

    ``maps`` is (N, C, ...) of probabilities; returns (N, C).
    """
    flat = maps.flatten(2)
    k = max(1, int(round(t * flat.shape[-1])))
    return flat.topk(k, dim=-1).values.mean(dim=-1)


def mask_to_grid(mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """An input-grid breast mask (N, 1, H, W) as a {0, 1} float mask on a coarser map grid.

    A map cell is breast when any part of its footprint is: a lesion at the skin line must
    stay selectable. ``None`` (no mask known) stays ``None``.
    """
    if mask is None:
        return None
    return (F.adaptive_max_pool2d(mask.float(), shape) > 0).float()


@dataclass
class GlobalOutput:
    """The global module's maps (N, 2, *cam_shape), all probabilities, and prediction (N, 2)."""

    s1: torch.Tensor
    s2: torch.Tensor
    s3: torch.Tensor
    saliency: torch.Tensor
    prediction: torch.Tensor


class GlobalNetwork(nn.Module):
    """Pre-activation ResNet-22 with saliency heads at 1/16, 1/32 and 1/64 of the input."""

    def __init__(self, config: GlamConfig):
        super().__init__()
        self.config = config
        ch = config.global_channels
        self.conv1 = nn.Conv2d(1, ch[0], 7, 2, 3, bias=False)
        self.maxpool = nn.MaxPool2d(3, 2, 0)
        stages = []
        cin = ch[0]
        for cout, blocks, stride in zip(ch, config.global_blocks, config.global_strides):
            layers = [_PreActBlock(cin, cout, stride, project=True)]
            layers += [_PreActBlock(cout, cout, 1, project=False) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.final_bn = nn.BatchNorm2d(ch[-1])
        self.saliency1 = nn.Conv2d(ch[2], 2, 1, bias=False)
        self.saliency2 = nn.Conv2d(ch[3], 2, 1, bias=False)
        self.saliency3 = nn.Conv2d(ch[4], 2, 1, bias=False)
        # Unused by the forward pass; kept so checkpoints match the released state dict layout.
        self.combine = nn.Conv2d(6, 2, 1, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the 5 stages (the last after the final BN-ReLU)."""
        out = self.maxpool(self.conv1(x))
        feats = []
        for stage in self.stages:
            out = stage(out)
            feats.append(out)
        feats[-1] = F.relu(self.final_bn(feats[-1]))
        return feats

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> GlobalOutput:
        """``x`` (N, 1, H, W) standardised; ``mask`` (N, 1, H, W) breast mask or None.

        With a mask, the saliency maps are zero outside the breast, so top-t% pooling, the
        L1 term and patch selection only see breast: the background of a standardised
        window is flat and would otherwise attract the pooled positions.
        """
        feats = self.features(x)
        size = feats[2].shape[-2:]
        s1 = torch.sigmoid(self.saliency1(feats[2]))
        s2 = torch.sigmoid(F.interpolate(self.saliency2(feats[3]), size=size, mode="nearest"))
        s3 = torch.sigmoid(F.interpolate(self.saliency3(feats[4]), size=size, mode="nearest"))
        inside = mask_to_grid(mask, tuple(size))
        if inside is not None:
            s1, s2, s3 = s1 * inside, s2 * inside, s3 * inside
        w1, w2, w3 = self.config.saliency_weights
        saliency = w1 * s1 + w2 * s2 + w3 * s3
        t = self.config.top_t_global
        prediction = (top_t_pool(s1, t) + top_t_pool(s2, t) + top_t_pool(s3, t)) / 3
        return GlobalOutput(s1=s1, s2=s2, s3=s3, saliency=saliency, prediction=prediction)


class LocalNetwork(nn.Module):
    """ResNet-34 body with every stage stride removed; a sigmoid saliency map at 1/4 of a patch."""

    def __init__(self, config: GlamConfig):
        super().__init__()
        self.config = config
        ch = config.local_channels
        self.conv1 = nn.Conv2d(config.local_in_channels, ch[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(ch[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        cin = ch[0]
        for cout, blocks in zip(ch, config.local_blocks):
            stages.append(nn.Sequential(*[_BasicBlock(cin if i == 0 else cout, cout) for i in range(blocks)]))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.saliency = nn.Conv2d(ch[-1], 2, 1, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(M, 1, P, P) standardised crops -> (M, 2, P/4, P/4) probabilities."""
        x = patches.expand(-1, self.config.local_in_channels, -1, -1)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return torch.sigmoid(self.saliency(self.stages(x)))


def select_patches(saliency: torch.Tensor, k: int, window: tuple[int, int]) -> torch.Tensor:
    """Greedy region proposal on the global map; returns (N, k, 2) upper-left corners (row, col).

    Each class channel is min-max normalised per image, the channels are summed, and k times
    the ``window`` with the highest mean is taken (ties: first in row-major order) and zeroed
    on the map. Corners are in saliency-map pixels.

    Parameters
    ----------
    saliency
        (N, C, h, w) global saliency maps on the saliency (1/16 input) grid, canonical
        orientation.
    k
        Number of patches per image.
    window
        Patch size (rows, columns) in saliency-map pixels (``GlamConfig.patch_window``).

    Returns
    -------
    torch.Tensor
        long (N, k, 2) upper-left (row, column) corners in saliency-map pixels.
    """
    with torch.no_grad():
        s = saliency.detach().float()
        n = s.shape[0]
        lo = s.flatten(2).min(-1).values[..., None, None]
        hi = s.flatten(2).max(-1).values[..., None, None]
        m = ((s - lo) / (hi - lo).clamp_min(1e-12)).sum(1, keepdim=True)
        wh, ww = window
        corners = torch.zeros(n, k, 2, dtype=torch.long, device=s.device)
        for j in range(k):
            pooled = F.avg_pool2d(m, (wh, ww), stride=1)
            flat = pooled.flatten(1).argmax(1)
            rows, cols = flat // pooled.shape[-1], flat % pooled.shape[-1]
            corners[:, j, 0], corners[:, j, 1] = rows, cols
            for b in range(n):
                m[b, :, rows[b]:rows[b] + wh, cols[b]:cols[b] + ww] = 0
    return corners


def _corners_to_input(corners: torch.Tensor, config: GlamConfig) -> torch.Tensor:
    """Saliency-map corners -> input-pixel corners (x = round(i / h_cam * H)), kept inside."""
    (ch, cw), (h, w) = config.cam_shape, config.input_shape
    p = config.patch_size
    rows = torch.round(corners[..., 0].double() / ch * h).long().clamp(0, h - p)
    cols = torch.round(corners[..., 1].double() / cw * w).long().clamp(0, w - p)
    return torch.stack([rows, cols], dim=-1)


def crop_patches(x: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """Crop (N*k, C, size, size) patches from (N, C, H, W) at input-pixel corners (N, k, 2).

    Parameters
    ----------
    x
        (N, C, H, W) network inputs (or masks) on the input grid.
    corners
        long (N, k, 2) upper-left (row, column) corners in input pixels, each patch inside
        the input (as :func:`_corners_to_input` keeps them).
    size
        Patch side in input pixels.

    Returns
    -------
    torch.Tensor
        (N*k, C, size, size), image-major (all k patches of image 0 first).
    """
    out = []
    for b in range(x.shape[0]):
        for r, c in corners[b].tolist():
            out.append(x[b, :, r:r + size, c:c + size])
    return torch.stack(out)


@dataclass
class GlamOutput:
    """What :class:`Glam` returns for a batch of N images with k patches each.

    ``patch_corners`` are input pixels (N, k, 2); ``patch_maps`` (N, k, 2, P/4, P/4);
    ``local_prediction`` (N, 2) is top-t% pooled over all patches of an image; ``mask`` the
    input-grid breast mask (N, 1, H, W) the network was given, or None.
    """

    global_: GlobalOutput
    patch_corners: torch.Tensor
    patch_maps: torch.Tensor
    local_prediction: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def prediction(self) -> torch.Tensor:
        """Image-level probabilities (N, 2): the global prediction, as in the released code."""
        return self.global_.prediction


class Glam(nn.Module):
    """The full GLAM network: global module, patch selection, local module."""

    def __init__(self, config: GlamConfig):
        super().__init__()
        self.config = config
        self.global_net = GlobalNetwork(config)
        self.local_net = LocalNetwork(config)

    def forward(self, x: torch.Tensor, num_patches: int | None = None,
                global_output: GlobalOutput | None = None, mask: torch.Tensor | None = None) -> GlamOutput:
        """Global module, patch selection and local module on a batch.

        Parameters
        ----------
        x
            (N, 1, *input_shape) standardised images on the network grid, canonical orientation.
        num_patches
            Patches per image; ``config.num_patches`` (K) when None.
        global_output
            A global module output already computed for ``x`` (training reuses it); computed
            when None.
        mask
            (N, 1, *input_shape) breast mask on the same grid, or None: the whole window counts.
        """
        cfg = self.config
        k = cfg.num_patches if num_patches is None else num_patches
        g = self.global_net(x, mask) if global_output is None else global_output
        corners = _corners_to_input(select_patches(g.saliency, k, cfg.patch_window), cfg)
        patches = crop_patches(x, corners, cfg.patch_size)
        maps = self.local_net(patches)
        if mask is not None:
            maps = maps * mask_to_grid(crop_patches(mask, corners, cfg.patch_size), tuple(maps.shape[-2:]))
        maps = maps.reshape(x.shape[0], k, *maps.shape[1:])
        local_pred = top_t_pool(maps.transpose(1, 2), cfg.top_t_local)
        return GlamOutput(global_=g, patch_corners=corners, patch_maps=maps, local_prediction=local_pred, mask=mask)


def fuse(output: GlamOutput, config: GlamConfig) -> torch.Tensor:
    """The final map (N, 2, *input_shape): (pasted patch maps + upsampled global map) / 2.

    Patch maps are upsampled (nearest) to the patch size and pasted into a zero canvas, a
    later patch overwriting an earlier one; outside the patches the result is S_g / 2. With
    a breast mask, pixels outside it are 0 (the coarse maps' edge cells straddle the skin).
    """
    n = output.patch_maps.shape[0]
    h, w = config.input_shape
    p = config.patch_size
    canvas = output.patch_maps.new_zeros(n, 2, h, w)
    for b in range(n):
        for j, (r, c) in enumerate(output.patch_corners[b].tolist()):
            canvas[b, :, r:r + p, c:c + p] = F.interpolate(output.patch_maps[b, j][None], size=(p, p),
                                                          mode="nearest")[0]
    global_up = F.interpolate(output.global_.saliency, size=(h, w), mode="nearest")
    fused = (canvas + global_up) / 2
    return fused if output.mask is None else fused * output.mask.to(fused.dtype)


class CamClassifier(nn.Module):
    """Baseline: the same global backbone, global average pooling and a linear head (CAM).

    The class activation map is the head applied at every position of the last (1/64)
    feature map; the image logit is its spatial mean, so ``sigmoid(cam)`` is the map
    whose average is the prediction's logit.
    """

    def __init__(self, config: GlamConfig):
        super().__init__()
        self.config = config
        self.backbone = GlobalNetwork(config)
        self.head = nn.Conv2d(config.global_channels[-1], 2, 1, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (prediction (N, 2) probabilities, CAM logits (N, 2, h/64, w/64))."""
        cam = self.head(self.backbone.features(x)[-1])
        return torch.sigmoid(cam.mean(dim=(2, 3))), cam


# --------------------------------------------------------------------------- preprocessing


def standardise(x: np.ndarray) -> np.ndarray:
    """Per-image z-score over the whole window, background included (GLAM's normalisation)."""
    x = np.asarray(x, dtype=np.float32)
    return ((x - x.mean()) / max(float(x.std()), 1e-5)).astype(np.float32)


def optimal_window(mask: np.ndarray, window: tuple[int, int], view: str = "CC") -> tuple[int, int]:
    """Upper-left corner (row, col) of the ``window`` holding most breast pixels of ``mask``.

    Exhaustive over every placement inside the image (integral image, step 1); ties go to
    the placement whose centre is closest to the breast's centre of mass. Along an axis
    where the image is smaller than the window, CC views are centred (padding above and
    below), MLO views keep the top (padding below), and columns keep the chest wall at 0.

    Parameters
    ----------
    mask
        Boolean breast mask (rows, columns) in canonical orientation, on the grid the window
        is counted in (GLAM: the ``pixel_spacing_mm`` grid).
    window
        Window size (rows, columns) in pixels of that grid.
    view
        ``CC`` or ``MLO`` (anything else is treated as MLO), for the padding rule above.

    Returns
    -------
    tuple[int, int]
        Upper-left (row, column) in pixels of ``mask``'s grid; negative when the window is
        centred on an image shorter than it.
    """
    rows, cols = mask.shape
    h, w = window
    m = mask.astype(np.int64)
    integral = np.zeros((rows + 1, cols + 1), dtype=np.int64)
    integral[1:, 1:] = m.cumsum(0).cumsum(1)
    if rows >= h:
        r0s = np.arange(rows - h + 1)
        r1s = r0s + h
    else:
        start = -((h - rows) // 2) if view.upper() == "CC" else 0
        r0s, r1s = np.array([start]), np.array([start + h])
    if cols >= w:
        c0s = np.arange(cols - w + 1)
        c1s = c0s + w
    else:
        c0s, c1s = np.array([0]), np.array([w])
    ri0, ri1 = np.clip(r0s, 0, rows), np.clip(r1s, 0, rows)
    ci0, ci1 = np.clip(c0s, 0, cols), np.clip(c1s, 0, cols)
    counts = (integral[ri1][:, ci1] - integral[ri0][:, ci1] - integral[ri1][:, ci0] + integral[ri0][:, ci0])
    best = counts == counts.max()
    if m.any():
        ys, xs = np.nonzero(m)
        com = (ys.mean(), xs.mean())
    else:
        com = (rows / 2, cols / 2)
    cand_r, cand_c = np.nonzero(best)
    dist = (r0s[cand_r] + h / 2 - com[0]) ** 2 + (c0s[cand_c] + w / 2 - com[1]) ** 2
    i = int(np.argmin(dist))
    return int(r0s[cand_r[i]]), int(c0s[cand_c[i]])


def glam_geometry(
    mammogram: Mammogram,
    config: GlamConfig,
    mask: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> Geometry:
    """The source -> network-input geometry of one view for ``config``.

    The canonical (facing right) image is considered at ``config.pixel_spacing_mm``; on that
    grid the ``input_shape`` window holding most breast is chosen (:func:`optimal_window`),
    and its box is expressed in source pixels, so :class:`dicom_ai.imaging.Geometry`
    does the flip, crop, pad and resample, and maps outputs back with ``inverse``. With
    ``rng`` the window gets GLAM's training noise: a shift of up to ``crop_noise_px`` and
    an independent change of each border of up to ``crop_size_noise_px`` (scaled by the
    aspect ratio on the short axis), then a resize back to ``input_shape``.

    Parameters
    ----------
    mammogram
        The decoded view; ``spacing_mm`` (row, column, mm) sets the scale to the GLAM grid.
    config
        ``input_shape`` (rows, columns, network pixels) and ``pixel_spacing_mm``; the noise
        amplitudes ``crop_noise_px`` / ``crop_size_noise_px`` are in network pixels.
    mask
        Boolean breast mask on the *stored* source grid (``mammogram.breast_mask`` when None).
    rng
        Training noise generator; None (inference) for the deterministic window.

    Returns
    -------
    Geometry
        ``box`` half-open ``(r0, r1, c0, c1)`` in source pixels of the canonical image,
        ``out_shape`` the config's ``input_shape``.
    """
    rows, cols = mammogram.shape
    fr = mammogram.spacing_mm[0] / config.pixel_spacing_mm
    fc = mammogram.spacing_mm[1] / config.pixel_spacing_mm
    if mask is None:
        mask = mammogram.breast_mask
    canonical = mask[:, ::-1] if mammogram.faces_left else mask
    grid = (max(1, int(round(rows * fr))), max(1, int(round(cols * fc))))
    small = resize(canonical.astype(np.float32), grid, mode="nearest") > 0.5
    h, w = config.input_shape
    r0, c0 = optimal_window(small, (h, w), mammogram.view)
    r1, c1 = float(r0 + h), float(c0 + w)
    r0f, c0f = float(r0), float(c0)
    if rng is not None:
        n = config.crop_noise_px
        dr, dc = rng.integers(-n, n + 1, size=2)
        r0f, r1f, c0f, c1f = r0f + dr, r1 + dr, c0f + dc, c1 + dc
        s = config.crop_size_noise_px
        short = w / h
        r0f += rng.uniform(-s, s)
        r1f += rng.uniform(-s, s)
        c0f += rng.uniform(-s, s) * short
        c1f += rng.uniform(-s, s) * short
        r1, c1 = r1f, c1f
    box = (int(round(r0f / fr)), int(round(r1 / fr)), int(round(c0f / fc)), int(round(c1 / fc)))
    if box[1] <= box[0] or box[3] <= box[2]:
        raise ModelError(f"degenerate GLAM window {box} for an image of shape {mammogram.shape}")
    return Geometry(source_shape=(rows, cols), flip=mammogram.faces_left, box=box, out_shape=(h, w))


def glam_input(
    mammogram: Mammogram,
    config: GlamConfig,
    mask: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """The standardised network input and breast mask (both ``input_shape``) and the geometry.

    ``mask`` is the source image's breast mask (computed when None); the returned mask is
    it carried through the same window, as the network's ``mask`` argument.

    Parameters
    ----------
    mammogram, config, mask, rng
        As for :func:`glam_geometry` (``mask`` on the stored source grid).

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray, Geometry]
        float32 z-scored image and boolean mask, both ``config.input_shape`` (rows, columns)
        on the network grid in canonical orientation, and the geometry that maps network
        outputs back onto the stored source grid.
    """
    if mask is None:
        mask = mammogram.breast_mask
    geometry = glam_geometry(mammogram, config, mask=mask, rng=rng)
    window_mask = geometry.forward(mask.astype(np.float32), mode="nearest") > 0.5
    return standardise(geometry.forward(mammogram.pixels)), window_mask, geometry


# --------------------------------------------------------------------------- inference


class GlamModel:
    """A trained GLAM network behind the pipeline's ``predict(Mammogram) -> ModelOutput``."""

    def __init__(self, network: Glam, identity: ModelIdentity, thresholds: dict[str, float],
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        if self.device.type == "cuda":
            # CPU stays contiguous: channels-last backward corrupted the heap on torch 2.13 CPU.
            self.network = self.network.to(memory_format=torch.channels_last)
        self.config = network.config
        self.identity = identity
        self.thresholds = thresholds

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: torch.device | str = "cpu") -> "GlamModel":
        """Build from a :class:`~dicom_ai.networks.bundle.Bundle` whose architecture kind is ``glam``.

        A bundle whose ``architecture.name`` is ``authors`` (the authors' checkpoint, imported
        by ``dicom-ai import glam``) gets :class:`~dicom_ai.networks.glam_authors.GlamAuthorsModel`.
        Raises :class:`~dicom_ai.core.errors.BundleError` for a bundle of another kind or
        weights that do not match the manifest's architecture (:func:`load_weights`).
        """
        require_kind(bundle, "glam")
        if is_authors_bundle(bundle):
            return GlamAuthorsModel.from_bundle(bundle, device)  # type: ignore[return-value]
        network = load_weights(Glam(GlamConfig.from_dict(bundle.manifest["architecture"])), bundle, "glam")
        thresholds = {k: float(v) for k, v in bundle.manifest["thresholds"].items()}
        return cls(network, bundle.identity, thresholds, device)

    def run(self, mammogram: Mammogram, mask: np.ndarray | None = None) -> "GlamPrediction":
        """Everything GLAM computes for one view, on the network's input grid.

        ``mask`` is the source image's breast mask, computed when None."""
        x, window_mask, geometry = glam_input(mammogram, self.config, mask=mask)
        t = torch.from_numpy(x)[None, None].to(self.device)
        m = torch.from_numpy(window_mask)[None, None].to(self.device)
        if self.device.type == "cuda":
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.device.type == "cuda"):
            out = self.network(t, mask=m)
            fused = fuse(out, self.config)
            global_up = F.interpolate(out.global_.saliency, size=self.config.input_shape, mode="nearest")
        return GlamPrediction(fused=fused[0].float().cpu().numpy(), global_map=global_up[0].float().cpu().numpy(),
                              scores=out.prediction[0].float().cpu().numpy(),
                              local_scores=out.local_prediction[0].float().cpu().numpy(),
                              patch_corners=out.patch_corners[0].cpu().numpy(), geometry=geometry)

    def to_output(self, prediction: "GlamPrediction") -> ModelOutput:
        """The fused maps mapped back onto the source grid, and the image-level scores."""
        maps = []
        for channel, finding in ((0, "benign_lesion"), (1, "malignant_lesion")):
            prob = np.clip(prediction.geometry.inverse(prediction.fused[channel], mode="bilinear", fill=0.0), 0, 1)
            maps.append(ProbabilityMap(finding=finding, probability=prob.astype(np.float32),
                                       threshold=self.thresholds.get(finding, 0.5), model=self.identity))
        scores = [ImageScore(name=name, value=float(np.clip(prediction.scores[i], 0.0, 1.0)), model=self.identity)
                  for i, name in enumerate(CLASSES)]
        return ModelOutput(maps=maps, scores=scores)

    def predict(self, mammogram: Mammogram) -> ModelOutput:
        """Benign and malignant lesion maps on the source grid, and image-level scores.

        The maps are zeroed outside the breast mask: a lesion cannot lie in the background,
        and the weakly supervised maps otherwise put regions there (patch edges).
        """
        inside = mammogram.breast_mask
        output = self.to_output(self.run(mammogram, mask=inside))
        for m in output.maps:
            m.probability = np.where(inside, m.probability, 0.0).astype(np.float32)
        return output


@dataclass
class GlamPrediction:
    """One view's GLAM results on the input grid, with the geometry that maps them back.

    ``fused`` and ``global_map`` are (2, *input_shape) probabilities (benign, malignant);
    ``scores`` the global image-level prediction and ``local_scores`` the local one (2,);
    ``patch_corners`` (K, 2) the selected patches' upper-left input pixels.
    """

    fused: np.ndarray
    global_map: np.ndarray
    scores: np.ndarray
    local_scores: np.ndarray
    patch_corners: np.ndarray
    geometry: Geometry


def run_reference(bundle_dir: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The authors' GLAM outputs for their input ``x``, from an ``authors`` bundle (for checking).

    Parameters
    ----------
    bundle_dir
        Folder (or name under models/) of a bundle written by ``dicom-ai import glam``.
    x
        float32 (N, 1, *input_shape) standardised images facing right, as the authors' model
        reads them ((N, 1, 2944, 1920) for the imported configuration).

    Returns
    -------
    dict
        numpy arrays: ``y_global`` (N, 2) float32 image-level probabilities (benign,
        malignant); ``saliency_global`` (N, 2, *cam_size) float32; ``saliency_fused``
        (N, 2, *input_shape) float32; ``patch_locations`` (N, K, 2) float64 upper-left
        (row, column) input pixels, the numbers the authors' model holds in its
        ``patch_locations`` after a forward pass.

    Raises
    ------
    BundleError
        Not a GLAM bundle of the authors' architecture, or weights that do not fit it.
    """
    bundle = load_bundle(bundle_dir)
    require_kind(bundle, "glam")
    if not is_authors_bundle(bundle):
        raise BundleError(f"bundle {bundle.where} is not an authors' GLAM bundle (architecture.name 'authors'); "
                          "run_reference reproduces the authors' network only")
    network = load_weights(GlamAuthors(GlamAuthorsConfig.from_dict(bundle.manifest["architecture"])), bundle, "glam")
    with torch.inference_mode():
        out = network.eval()(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return {"y_global": out.y_global.numpy(), "saliency_global": out.saliency_global.numpy(),
            "saliency_fused": out.saliency_fused.numpy(), "patch_locations": out.patch_locations}
