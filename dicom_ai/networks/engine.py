"""CPU inference engines: torch (the reference) or ONNX Runtime, per network.

Owns the engine choice (:func:`resolve_engine`) and :class:`OnnxFunction`, a torch function of
one float32 tensor exported once, in memory, to ONNX and then run by ONNX Runtime's CPU
execution provider. torch stays the reference every test compares the engine with; ONNX
Runtime is used where ``benchmarks/bench_turnaround.py`` measured it faster on this kind of
machine (the microcalcification patch CNNs: their 1-16 channel convolutions run 2-4 times
faster in ONNX Runtime's kernels than in torch's on a 2-core CPU).

Nothing is read from or written to disk: the graph is traced from the bundle's own network
(whose weights came from safetensors), so loading still never runs code from a file.

Engines: ``auto`` (ONNX Runtime on the CPU when ``onnxruntime`` and ``onnx`` are installed,
else torch; always torch on a GPU), ``torch``, ``onnxruntime`` (an error when they are missing
or the device is not the CPU).
"""

from __future__ import annotations

import importlib.util
import io
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dicom_ai.core.errors import ModelError

# A dependency of the package, but an environment made before it was one (a site's pinned
# virtual environment) still loads every model: "auto" then picks torch.
ort = importlib.import_module("onnxruntime") if importlib.util.find_spec("onnxruntime") else None

__all__ = ["ENGINES", "onnxruntime_available", "resolve_engine", "OnnxFunction"]

ENGINES = ("auto", "torch", "onnxruntime")


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` (to run) and ``onnx`` (torch's exporter needs it) are installed."""
    return ort is not None and importlib.util.find_spec("onnx") is not None


def resolve_engine(engine: str, device: torch.device | str) -> str:
    """``torch`` or ``onnxruntime`` for ``engine`` (one of :data:`ENGINES`) on ``device``.

    Raises
    ------
    ModelError
        An unknown engine, or ``onnxruntime`` asked for on a GPU or without the packages.
    """
    device = torch.device(device)
    if engine not in ENGINES:
        raise ModelError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        return "onnxruntime" if device.type == "cpu" and onnxruntime_available() else "torch"
    if engine == "onnxruntime":
        if device.type != "cpu":
            raise ModelError(f"engine 'onnxruntime' runs on the CPU only, the device is {device}; use 'torch' or 'auto'")
        if not onnxruntime_available():
            raise ModelError("engine 'onnxruntime' needs the onnxruntime and onnx packages: "
                             "pip install onnxruntime onnx (or use engine 'torch')")
    return engine


class _Wrapped(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module):
        super().__init__()
        self.fn, self.owner = fn, owner  # owner registers the weights as the graph's constants

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class OnnxFunction:
    """``fn`` (float32 ``(N, C, H, W)`` -> float32 tensor, built from ``owner``'s weights) run by ONNX Runtime.

    ``example`` fixes the rank and channels; batch, rows and columns stay dynamic, so ``fn``
    must not branch on them (the tracer records one path). ``threads`` is ONNX Runtime's
    intra-op thread count (default: every core this process may run on; torch's own count is
    kept low by the node for its small networks, see ``dicom_ai.node.processing``).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module, example: torch.Tensor,
                 threads: int | None = None):
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            # The legacy (TorchScript) exporter warns that it is deprecated; the dynamo one
            # needs onnxscript and cannot keep the dilated pooling's shapes symbolic.
            warnings.simplefilter("ignore")
            torch.onnx.export(_Wrapped(fn, owner).eval(), (example,), buffer, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "oh", 3: "ow"}},
                              opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or len(os.sched_getaffinity(0)))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle ONNX Runtime threads otherwise spin for a while after each run and take the
        # cores from the torch models that run next in the same process.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Inputs change shape from image to image, so the arena would keep growing to the
        # largest tiles seen and hold that between jobs; plain allocation keeps the worker's
        # resident memory to what the image in hand needs.
        options.enable_cpu_mem_arena = False
        self._session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Run on a float32 ``(N, C, H, W)`` array; returns the output as a numpy array."""
        return self._session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]
