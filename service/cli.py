"""The `lstm-serve` command: train, export, serve and stream."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """All subcommands; training ones import torch only when they run."""
    from model.cli import add_backtest_arguments, add_export_arguments, add_seeds_arguments, add_train_arguments

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
    p = sub.add_parser(
        "backtest",
        help="rolling-origin backtest: train and score the model and both baselines on several test windows",
        description="Fold i of --folds tests on the i-th of the last F blocks of the data and trains on everything "
        "before it (the block just before its test part validates). Prints MAE per fold and its mean and range, "
        "writes backtest.json and backtest.png. Takes the flags of `train`. Needs the `train` extra (torch).",
    )
    add_backtest_arguments(p)
    p = sub.add_parser(
        "seeds",
        help="train the same recipe from several top-level seeds and show the spread of the test MAE",
        description="Train once per --seeds value (each as `train --seed S` would), score each on the same test "
        "part, print the spread (the trained models' and their single members'), write seeds.json and seeds.png. "
        "Takes the flags of `train`. Needs the `train` extra (torch).",
    )
    add_seeds_arguments(p)
    p = sub.add_parser("export", help="re-export a training checkpoint to ONNX")
    add_export_arguments(p)
    p = sub.add_parser(
        "serve",
        help="serve a model repository over REST, WebSocket and gRPC",
        description="Serve every model under --models. Each flag is also an environment variable "
        "LSTM_SERVE_<FLAG> (for example LSTM_SERVE_HTTP_PORT=8080); flags win.",
    )
    add_settings_arguments(p)
    from service.client_cli import add_stream_arguments

    p = sub.add_parser(
        "stream",
        help="pipe a CSV through a streaming session and print (or plot) the forecasts",
        description="Open a gRPC session on a running server, send the CSV's rows as time steps (columns "
        "named after the model's features), and print one line of forecasts per row as CSV.",
    )
    add_stream_arguments(p)
    from service.card_cli import add_card_arguments

    p = sub.add_parser(
        "card",
        help="show or write the model card of an ONNX file you exported yourself",
        description="Print the card the server would serve a model file with (--show), or write one into the "
        "file's metadata and beside it as model.json: feature and output names, a description. Without a card, "
        "a file is served with names x0.. and y0...",
    )
    add_card_arguments(p)
    return parser


def add_settings_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field, with its description as help; unset flags leave env/defaults alone."""
    from service.settings import Settings

    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default
        help_text = f"{field.description} (default {default}; env LSTM_SERVE_{name.upper()})"
        p.add_argument(flag, dest=name, default=None, metavar=name.split("_")[-1].upper(), help=help_text)


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.app import serve
    from service.core.sessions import SnapshotFileError
    from service.repository import ModelLoadError
    from service.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            print(f"error: {'--' + where.replace('_', '-') + ': ' if where else ''}{err['msg']}", file=sys.stderr)
        return 2
    try:
        code = serve(settings)
    except ModelLoadError as e:
        print(f"error: cannot load models: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, SnapshotFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lstm-serve` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from model.cli import run_train

        return run_train(args)
    if args.command == "seeds":
        from model.cli import run_seeds

        return run_seeds(args)
    if args.command == "backtest":
        from model.cli import run_backtest

        return run_backtest(args)
    if args.command == "export":
        from model.cli import run_export

        return run_export(args)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "stream":
        from service.client_cli import run_stream

        return run_stream(args)
    if args.command == "card":
        from service.card_cli import run_card

        return run_card(args)
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":
    sys.exit(main())
