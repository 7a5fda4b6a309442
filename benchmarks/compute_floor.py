"""The compute floor of the models: their FLOPs over the machine's measured matrix-multiply rate.

Shared by ``bench_turnaround.py`` (CPU) and ``bench_gpu.py`` (CUDA). Not a benchmark itself
(``make bench`` runs ``bench_*.py`` only).

* :func:`matmul_rate`: FLOP/s of a square matrix product on ``device`` in ``dtype``, measured
  now (the best sustained rate a dense kernel gets here, so FLOPs / rate is a floor no
  convolution stack can beat on this machine).
* :func:`model_flops`: FLOPs each model of a pipeline spends on a mammogram, counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products; a
  multiply-add is 2 FLOPs). The count is taken on the torch engine: ONNX Runtime runs the same
  layers on the same tiles, so it does the same arithmetic.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_rate(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                seconds: float = 1.5) -> float:
    """Sustained FLOP/s of ``n x n`` @ ``n x n`` on ``device`` in ``dtype`` (2 n^3 FLOPs each)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(8 if device.type == "cuda" else 1):
            a @ b
            count += 1
        sync()
    return 2.0 * n**3 * count / (time.perf_counter() - started)


def model_flops(models, mammograms) -> dict[str, float]:
    """FLOPs per model name, summed over ``mammograms`` (each model's ``predict``)."""
    out: dict[str, float] = {}
    for model in models:
        counter = FlopCounterMode(display=False)
        with counter:
            for mammogram in mammograms:
                model.predict(mammogram)
        out[model.identity.name] = float(counter.get_total_flops())
    return out
