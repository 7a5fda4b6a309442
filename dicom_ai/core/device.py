"""Which compute device a model runs on, as the configuration spells it.

The spelling is checked here without importing torch, so the node's configuration can be
validated in the receiving process; :func:`dicom_ai.networks.device.resolve_device` then
checks that the device is present.
"""

from __future__ import annotations

import re

from dicom_ai.core.errors import DeviceError

__all__ = ["DEVICE_SPELLINGS", "PRECISIONS", "check_device_spec", "check_precision"]

#: How a device may be written in ``pipeline.device`` and ``--device``.
DEVICE_SPELLINGS = "'auto', 'cpu' or 'cuda:N'"

_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_spec(spec: str) -> str:
    """Return ``spec`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; else raise DeviceError."""
    if not isinstance(spec, str) or not _DEVICE_RE.fullmatch(spec):
        raise DeviceError(f"device {spec!r} is not supported; use {DEVICE_SPELLINGS}")
    return spec


#: What ``pipeline.precision`` may be: ``fp32`` (the reference) or ``bf16`` (CPU, per accepted
#: model: :func:`dicom_ai.networks.engine.cpu_bf16_plan`).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def check_precision(spec: str) -> str:
    """Return ``spec`` if it is one of :data:`PRECISIONS`; else raise DeviceError."""
    if spec not in PRECISIONS:
        raise DeviceError(f"precision {spec!r} is not supported; use {' or '.join(map(repr, PRECISIONS))}")
    return spec
