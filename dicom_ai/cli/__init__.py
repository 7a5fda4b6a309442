"""cli: the ``dicom-ai`` command, every sub-command of it, and ``make demo``.

Owns argument parsing and what each sub-command prints: ``serve``, ``check-config``, ``status``, ``retry``
(audited),
``infer``, ``echo`` (:mod:`~dicom_ai.cli.node`), ``phantom``, ``preview``, ``evaluate``
(:mod:`~dicom_ai.cli.data`), ``train glam | dunet-pretrain | dunet-seg | microcalc``
(:mod:`~dicom_ai.cli.train`), ``import glam`` (:mod:`~dicom_ai.cli.importer`) and the demo (:mod:`~dicom_ai.cli.demo`).

May import: every other part. Handlers import what they need when they run, so that
``dicom-ai --help`` is fast and ``dicom-ai serve`` (the receiving process) never loads torch;
this is the only place in the package where imports are made inside functions.
"""

from __future__ import annotations

import argparse
import sys

from dicom_ai import __version__
from dicom_ai.cli import data, importer, node, train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``dicom-ai`` argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="dicom-ai", description="The ``dicom-ai`` command.")
    parser.add_argument("--version", action="version", version=f"dicom-ai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    data.register(sub)
    node.register(sub)
    train.register(sub)
    importer.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # pydicom's warnings and log records quote raw element values: every command prints them
    # as scrubbed JSON lines, never as they are.
    from dicom_ai.node.logs import capture_warnings

    capture_warnings()
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
