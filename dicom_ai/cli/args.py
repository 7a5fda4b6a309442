"""Argument types the ``dicom-ai`` sub-commands share: image shapes and phantom seed sets.

Each parser keeps the error text its command has always printed; argparse shows an
:class:`argparse.ArgumentTypeError` message as it is.
"""

from __future__ import annotations

import argparse
from typing import Callable, Mapping

__all__ = ["shape_type", "shape", "seed_range", "seed_list"]

_SHAPE_ERROR = "expected ROWSxCOLS, got {text!r}"


def shape_type(named: Mapping[str, tuple[int, int]] | None = None,
               error: str = _SHAPE_ERROR) -> Callable[[str], tuple[int, int]]:
    """An argparse type reading ``ROWSxCOLS`` (case-insensitive ``x``) or one of ``named``.

    ``error`` is the message of a text that is neither, formatted with ``text``.
    """
    named = dict(named or {})

    def parse(text: str) -> tuple[int, int]:
        if text in named:
            return named[text]
        try:
            rows, cols = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(error.format(text=text)) from None
        return rows, cols

    return parse


#: ``ROWSxCOLS`` -> (rows, columns).
shape = shape_type()


def seed_range(text: str) -> range:
    """``"A:B"`` -> range(A, B): the phantom study seeds to use."""
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a seed range START:STOP, got {text!r}") from None
    if stop <= start:
        raise argparse.ArgumentTypeError(f"empty seed range {text!r}")
    return range(start, stop)


def seed_list(text: str) -> list[int]:
    """``'0:6'`` -> [0..5]; ``'1,4,7'`` -> [1, 4, 7] (raises ValueError on anything else)."""
    if ":" in text:
        a, b = text.split(":")
        return list(range(int(a), int(b)))
    return [int(s) for s in text.split(",") if s]
