"""Per-epoch training state on disk: the checkpoint a run resumes from and its curves.

Owns :class:`RunState` (folder layout, save, load) and :func:`write_curves`. A run folder holds

* ``last.safetensors``: the network's weights; its string metadata carries the network
  config, the epoch just finished and the history of per-epoch records (JSON);
* ``last.optimizer.pt``: the optimiser's state (``torch.save`` of plain tensors and numbers,
  read back with ``torch.load(weights_only=True)``, so nothing in it can run code);
* ``curves.csv`` (one row per epoch, a column per record key) and ``curves.png`` (every
  numeric column against the epoch), rewritten after each epoch.

Both checkpoint files are written to a temporary name and renamed, so a run killed while
saving resumes from the previous epoch rather than from a torn file.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ["RunState", "write_curves"]


@dataclass
class RunState:
    """The resumable state of one training run under ``folder``."""

    folder: Path

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)

    @property
    def weights(self) -> Path:
        return self.folder / "last.safetensors"

    @property
    def optimizer(self) -> Path:
        return self.folder / "last.optimizer.pt"

    def exists(self) -> bool:
        """True when both files of a finished epoch are there."""
        return self.weights.is_file() and self.optimizer.is_file()

    def save(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int, history: list[dict],
             info: dict) -> None:
        """Write weights, optimiser state, ``epoch`` (finished epochs, from 1) and ``history``.

        ``info`` is JSON-serialisable run information kept beside them (e.g. the network
        config and the stage), read back by :meth:`load`.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"epoch": str(int(epoch)), "history": json.dumps(history), "info": json.dumps(info)}
        tmp = self.weights.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(tmp), metadata=meta)
        opt_tmp = self.optimizer.with_suffix(".tmp")
        torch.save(optimizer.state_dict(), opt_tmp)
        opt_tmp.replace(self.optimizer)
        tmp.replace(self.weights)
        write_curves(self.folder, history)

    def load(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
             ) -> tuple[int, list[dict], dict]:
        """Load weights (and optimiser state) in place; returns (epoch, history, info).

        Raises FileNotFoundError when no checkpoint is there and ValueError when the weights
        do not fit ``network`` (another configuration was resumed).
        """
        if not self.weights.is_file():
            raise FileNotFoundError(f"no checkpoint {self.weights} to resume from; run once without --resume")
        with safe_open(str(self.weights), framework="pt") as fh:
            meta = fh.metadata() or {}
        try:
            network.load_state_dict(load_file(str(self.weights)))
        except RuntimeError as exc:
            raise ValueError(f"{self.weights} does not fit this network (another configuration?): {exc}") from None
        if optimizer is not None and self.optimizer.is_file():
            optimizer.load_state_dict(torch.load(self.optimizer, map_location="cpu", weights_only=True))
        return int(meta.get("epoch", 0)), json.loads(meta.get("history", "[]")), json.loads(meta.get("info", "{}"))


def write_curves(folder: Path | str, history: list[dict]) -> tuple[Path, Path | None]:
    """``curves.csv`` and ``curves.png`` of per-epoch records under ``folder``.

    Every key of any record is a CSV column (empty where a record lacks it); the PNG plots
    each numeric column against ``epoch`` in its own panel (None when matplotlib is missing
    or there is nothing numeric to plot).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for record in history:
        keys += [k for k in record if k not in keys]
    csv_path = folder / "curves.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for record in history:
            writer.writerow({k: record.get(k, "") for k in keys})
    numeric = [k for k in keys if k != "epoch" and any(isinstance(r.get(k), (int, float)) for r in history)]
    if not numeric:
        return csv_path, None
    # A bare Figure (no pyplot): no GUI backend, no global figure state in a training process.
    fig = Figure(figsize=(3.2 * len(numeric), 2.8))
    axes = fig.subplots(1, len(numeric), squeeze=False)
    for ax, key in zip(axes[0], numeric):
        pts = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(history)
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    png = folder / "curves.png"
    fig.savefig(png, dpi=80)
    return csv_path, png
