"""``dicom-ai train glam | dunet-pretrain | dunet-seg | microcalc``: train a model, write its bundle."""

from __future__ import annotations

import argparse

from dicom_ai.cli import train_dunet
from dicom_ai.training import glam as train_glam
from dicom_ai.training import microcalc as train_microcalc


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and its per-model sub-commands."""
    train = subparsers.add_parser("train", help="train a model and write its bundle")
    train_sub = train.add_subparsers(dest="model", metavar="MODEL")
    train_sub.required = True
    train_glam.register(train_sub)
    train_dunet.register(train_sub)
    train_microcalc.register(train_sub)
