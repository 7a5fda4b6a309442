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

Precision on the CPU (``pipeline.precision``, :func:`cpu_bf16_plan`): ``fp32`` (the reference,
the default) or ``bf16``: a model then runs under ``torch.autocast("cpu", bfloat16)`` with its
networks in channels-last, but only where the processor has native bf16 (``avx512_bf16`` or
``amx_bf16``) and only for a bundle version listed in :data:`BF16_CPU_ACCEPTED`, i.e. measured by
``benchmarks/bench_cpu_precision.py`` within ``bench_gpu.py``'s tolerances of its fp32 marks and
faster than the fp32 path the node would run instead; every other model stays fp32, and why is
returned to be logged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dicom_ai.core.device import check_precision
from dicom_ai.core.errors import DeviceError, ModelError

# A dependency of the package, but an environment made before it was one (a site's pinned
# virtual environment) still loads every model: "auto" then picks torch.
ort = importlib.import_module("onnxruntime") if importlib.util.find_spec("onnxruntime") else None

__all__ = ["BF16_CPU_ACCEPTED", "ENGINES", "OnnxFunction", "bf16_autocast", "cpu_bf16_plan", "cpu_has_native_bf16",
           "model_networks", "onnxruntime_available", "resolve_engine"]

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
    kept low by the node for its small networks, see ``dicom_ai.node.processing``). ``arena``:
    ONNX Runtime's own memory arena (off by default, see below); a function called many times on
    regions of bounded size (the microcalcification strips) turns it on: in the node's worker every
    allocation above 128 KiB is a fresh mmap (``release_freed_memory_promptly``), so without the
    arena each call page-faults all its intermediate buffers anew.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module, example: torch.Tensor,
                 threads: int | None = None, arena: bool = False):
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
        options.enable_cpu_mem_arena = arena
        self._session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Run on a float32 ``(N, C, H, W)`` array; returns the output as a numpy array."""
        return self._session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]


#: Bundles (name -> version) whose bf16 CPU path was measured within ``bench_gpu.TOLERANCES``
#: of their fp32 marks on every image and faster than their fp32 path, by
#: ``benchmarks/bench_cpu_precision.py`` (``benchmarks/results/cpu_precision.json``). A new
#: bundle version runs fp32 until it is measured again.
BF16_CPU_ACCEPTED: dict[str, str] = {}


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this processor computes in bf16 natively (``avx512_bf16`` or ``amx_bf16`` flags)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def model_networks(model) -> list[nn.Module]:
    """The torch networks a model runs (``network``, or a cascade's ``detector`` and ``segmentator``)."""
    return [m for m in (getattr(model, "network", None), getattr(model, "detector", None),
                        getattr(model, "segmentator", None)) if isinstance(m, nn.Module)]


def cpu_bf16_plan(models: Sequence, precision: str, device: torch.device | str,
                  accepted: dict[str, str] | None = None,
                  native: bool | None = None) -> tuple[set[int], dict[str, str]]:
    """Which of ``models`` run in bf16 under ``precision`` (``fp32`` or ``bf16``) on ``device``.

    Returns the ``id()`` of each model to run in bf16 (its networks are put in channels-last
    here; a model with a ``set_precision`` method, the microcalcification cascade, is switched
    to its gated path ``bf16-gated`` instead) and, per model left in fp32 although bf16 was
    asked for, why. ``accepted`` defaults
    to :data:`BF16_CPU_ACCEPTED`, ``native`` to :func:`cpu_has_native_bf16`.
    """
    try:
        if check_precision(precision) == "fp32":
            return set(), {}
    except DeviceError as exc:
        raise ModelError(str(exc)) from None
    accepted = BF16_CPU_ACCEPTED if accepted is None else accepted
    names = [m.identity.name for m in models]
    if torch.device(device).type != "cpu":
        return set(), dict.fromkeys(names, "bf16 is a CPU setting here; the GPU path is benchmarks/bench_gpu.py")
    if not (cpu_has_native_bf16() if native is None else native):
        return set(), dict.fromkeys(names, "this processor has no native bf16 (avx512_bf16 / amx_bf16)")
    chosen, fp32 = set(), {}
    for model in models:
        name, version = model.identity.name, model.identity.version
        if accepted.get(name) != version:
            fp32[name] = (f"{name} {version} is not measured within the bf16 tolerances and faster "
                          "(benchmarks/bench_cpu_precision.py)")
        elif callable(getattr(model, "set_precision", None)):
            # A cascade with its own gated bf16 path (microcalc): bf16 networks, every decision
            # its marks depend on taken again in float32 by its engine.
            model.set_precision("bf16-gated")
            chosen.add(id(model))
        elif getattr(model, "engine", "torch") != "torch" or not model_networks(model):
            fp32[name] = f"{name} does not run its networks in torch here"
        else:
            for net in model_networks(model):
                net.to(memory_format=torch.channels_last)
            chosen.add(id(model))
    return chosen, fp32


def bf16_autocast(enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast("cpu", dtype=torch.bfloat16)`` when ``enabled``, else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
