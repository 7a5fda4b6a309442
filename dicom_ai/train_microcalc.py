"""Subcommands of `dicom-ai` for this area (placeholder until its issue lands)."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's subcommands; each sets `handler=` to a function taking the args."""
