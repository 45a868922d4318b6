"""The `lstm-serve` command: train, export, serve and stream."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """All subcommands; training ones import torch only when they run."""
    from model.cli import add_export_arguments, add_train_arguments

    parser = argparse.ArgumentParser(
        prog="lstm-serve",
        description="Train LSTM forecasters and serve them with stateful streaming sessions.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train",
        help="train a model on a CSV (or the default weather data) and export it to the model repository",
        description="Train an LSTM forecaster, evaluate it against persistence and ridge baselines on the "
        "test part, and export it to ONNX in <models>/<name>/<version>/. Needs the `train` extra (torch).",
    )
    add_train_arguments(p)
    p = sub.add_parser("export", help="re-export a training checkpoint to ONNX")
    add_export_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lstm-serve` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from model.cli import run_train

        return run_train(args)
    if args.command == "export":
        from model.cli import run_export

        return run_export(args)
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":
    sys.exit(main())
