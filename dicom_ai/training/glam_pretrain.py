"""Self-supervised initialisation of GLAM's two networks: Models-Genesis restoration.

The published GLAM networks started from pretrained weights (the global module from a
BI-RADS classifier, the local one from ImageNet). Neither source is available here, so both
networks are pretrained on a task that needs no labels: restoring a mammogram window that
the modified Models-Genesis chain (:func:`dicom_ai.training.genesis.distort`: flips, gamma,
in- and out-painting inside the breast) has distorted. A small decoder is attached to each
encoder for this stage only and thrown away afterwards; :func:`load_pretrained` copies the
encoder weights into a :class:`~dicom_ai.networks.glam.Glam` before GLAM's own training,
which then sees image-level labels only.

* global network: a light U-Net-like decoder over its five stages (1/4 .. 1/64 of the
  window), upsampled to the window; loss = MSE on the standardised window inside the breast;
* local network: a 3x3 + 1x1 head on its 1/4-resolution features, upsampled to the patch;
  patches are drawn where the breast fills most of them.

Checkpoints are safetensors (weights only) with the pretraining record in the metadata.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dicom_ai.core.errors import ModelError
from dicom_ai.networks.glam import Glam, GlamConfig, GlobalNetwork, LocalNetwork, glam_geometry, standardise
from dicom_ai.training.genesis import GenesisConfig, distort

__all__ = ["GlobalRestorer", "LocalRestorer", "restoration_batch", "pretrain", "save_pretrained",
           "load_pretrained", "pretrained_record"]

_PREFIXES = ("global_net.", "local_net.")


class GlobalRestorer(nn.Module):
    """The global network plus a restoration decoder (skip connections from every stage)."""

    def __init__(self, network: GlobalNetwork, width: int = 16):
        super().__init__()
        self.network = network
        channels = network.config.global_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.smooth = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in channels)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) distorted standardised windows -> (N, 1, H, W) restored ones."""
        feats = self.network.features(x)
        y = self.lateral[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            y = F.interpolate(y, size=feats[i].shape[-2:], mode="nearest") + self.lateral[i](feats[i])
            y = F.relu(self.smooth[i](y))
        return self.out(F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False))


class LocalRestorer(nn.Module):
    """The local network's body plus a restoration head at 1/4 of the patch."""

    def __init__(self, network: LocalNetwork, width: int = 16):
        super().__init__()
        self.network = network
        self.head = nn.Sequential(nn.Conv2d(network.config.local_channels[-1], width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, 1, 1))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(M, 1, P, P) distorted standardised patches -> (M, 1, P, P) restored ones."""
        net = self.network
        x = patches.expand(-1, net.config.local_in_channels, -1, -1)
        x = net.stages(net.maxpool(F.relu(net.bn1(net.conv1(x)))))
        return F.interpolate(self.head(x), size=patches.shape[-2:], mode="bilinear", align_corners=False)


def restoration_batch(mammograms, breast_masks, indices, config: GlamConfig, rng: np.random.Generator,
                      genesis: GenesisConfig = GenesisConfig()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distorted, target, breast) tensors (B, 1, H, W) of GLAM windows.

    Each view is windowed as for GLAM (:func:`glam_geometry` with window noise from ``rng``),
    distorted in [0, 1] and then both input and target are standardised with the target's
    mean and standard deviation, so the network restores values on GLAM's input scale.
    """
    xs, ts, ms = [], [], []
    for i in indices:
        geometry = glam_geometry(mammograms[i], config, mask=breast_masks[i], rng=rng)
        window = np.clip(geometry.forward(mammograms[i].pixels), 0, 1)
        mask = geometry.forward(breast_masks[i].astype(np.float32), mode="nearest") > 0.5
        d = distort(window, mask, rng, genesis)
        target = standardise(d.target)
        mean, std = float(d.target.mean()), max(float(d.target.std()), 1e-5)
        xs.append((d.image - mean) / std)
        ts.append(target)
        ms.append(d.mask)
    stack = lambda a: torch.from_numpy(np.stack(a).astype(np.float32))[:, None]  # noqa: E731
    return stack(xs), stack(ts), stack(ms)


def _patches(x: torch.Tensor, t: torch.Tensor, m: torch.Tensor, size: int, per_image: int,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random patches of (x, t, m) whose breast cover is at least half (else the best of 20 tries)."""
    out = ([], [], [])
    h, w = x.shape[-2:]
    for b in range(x.shape[0]):
        for _ in range(per_image):
            best, corner = -1.0, (0, 0)
            for _ in range(20):
                r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
                cover = float(m[b, 0, r:r + size, c:c + size].float().mean())
                if cover > best:
                    best, corner = cover, (r, c)
                if cover >= 0.5:
                    break
            r, c = corner
            for k, a in enumerate((x, t, m)):
                out[k].append(a[b, :, r:r + size, c:c + size])
    return tuple(torch.stack(o) for o in out)  # type: ignore[return-value]


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return ((pred - target) ** 2 * m).sum() / m.sum().clamp_min(1.0)


def pretrain(net: Glam, mammograms, breast_masks, *, epochs_global: int, epochs_local: int, batch_size: int = 16,
             lr: float = 1e-3, seed: int = 0, patches_per_image: int = 2, progress: bool = True,
             genesis: GenesisConfig = GenesisConfig()) -> list[dict]:
    """Restoration pretraining of ``net.global_net`` then ``net.local_net``, in place.

    Parameters
    ----------
    net
        The GLAM network whose encoders are trained (the decoders are built here and dropped).
    mammograms, breast_masks
        Views (stored grid) and their breast masks; no labels are read.
    epochs_global, epochs_local
        Passes over the views for each network.
    batch_size
        Views per step (the local stage takes ``patches_per_image`` patches of each).
    lr
        Adam learning rate, cosine-annealed to 1/20 of it over each stage.
    seed
        Epoch ``e`` of stage ``s`` draws its order, windows and distortions from ``(seed, s, e)``.

    Returns
    -------
    list of dict
        One record per epoch: stage, epoch, mean masked MSE, and the MSE of the identity
        (distorted input returned unchanged) on the same batches for scale.
    """
    history = []
    config = net.config
    for s_idx, (stage, epochs) in enumerate((("global", epochs_global), ("local", epochs_local))):
        if epochs <= 0:
            continue
        model = GlobalRestorer(net.global_net) if stage == "global" else LocalRestorer(net.local_net)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        steps = epochs * ((len(mammograms) + batch_size - 1) // batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps, eta_min=lr / 20)
        model.train()
        for epoch in range(epochs):
            rng = np.random.default_rng([seed, 0x6E5, s_idx, epoch])
            torch.manual_seed(int(rng.integers(2**31)))
            order = rng.permutation(len(mammograms))
            t0, total, identity, n = time.time(), 0.0, 0.0, 0
            bar = tqdm(range(0, len(order), batch_size), desc=f"pretrain {stage} {epoch + 1}/{epochs}",
                       disable=not progress, file=sys.stderr)
            for start in bar:
                idx = order[start:start + batch_size]
                x, t, m = restoration_batch(mammograms, breast_masks, idx, config, rng, genesis)
                if stage == "local":
                    x, t, m = _patches(x, t, m, config.patch_size, patches_per_image, rng)
                loss = _masked_mse(model(x), t, m)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.item() * len(idx)
                identity += _masked_mse(x, t, m).item() * len(idx)
                n += len(idx)
                bar.set_postfix(mse=f"{loss.item():.4f}")
            record = {"stage": f"pretrain_{stage}", "epoch": epoch + 1, "restoration_mse": round(total / n, 5),
                      "identity_mse": round(identity / n, 5), "seconds": round(time.time() - t0, 1)}
            history.append(record)
            print(json.dumps(record), file=sys.stderr)
    net.eval()
    return history


def save_pretrained(path: str | Path, net: Glam, history: list[dict], data_note: str) -> Path:
    """Write the encoders of ``net`` (global_net.*, local_net.*) with the pretraining record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if k.startswith(_PREFIXES)}
    record = {"task": "Models-Genesis restoration (dicom_ai.training.genesis.distort), no labels",
              "config": net.config.name, "data": data_note, "history": history}
    save_file(tensors, str(path), metadata={"pretraining": json.dumps(record)})
    return path


def pretrained_record(path: str | Path) -> dict:
    """The pretraining record stored in a file written by :func:`save_pretrained`."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "pretraining" not in meta:
        raise ModelError(f"{path}: not a GLAM pretraining file (no 'pretraining' metadata); "
                         "write one with `dicom-ai train glam-pretrain`")
    return json.loads(meta["pretraining"])


def load_pretrained(net: Glam, path: str | Path) -> dict:
    """Copy the pretrained encoder weights of ``path`` into ``net``; returns the record.

    Raises :class:`~dicom_ai.core.errors.ModelError` when the file is not a pretraining file
    or was made for a different configuration (names or shapes differ).
    """
    record = pretrained_record(path)
    state = net.state_dict()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if key not in state or state[key].shape != tensor.shape:
                raise ModelError(f"{path}: weight {key} does not fit GLAM config {net.config.name!r} "
                                 f"(pretrained for {record.get('config')!r})")
            state[key] = tensor
    net.load_state_dict(state)
    return record
