"""The ``dicom-ai`` command.

Each area registers its own subcommands (``register(subparsers)``); handlers import their
heavy dependencies lazily so ``dicom-ai --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from dicom_ai import __version__, cli_data, cli_node, train_dunet, train_glam, train_microcalc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-ai", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dicom-ai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    cli_data.register(sub)
    cli_node.register(sub)
    train = sub.add_parser("train", help="train a model and write its bundle")
    train_sub = train.add_subparsers(dest="model", metavar="MODEL")
    train_sub.required = True
    train_glam.register(train_sub)
    train_dunet.register(train_sub)
    train_microcalc.register(train_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
