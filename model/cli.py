"""`lstm-serve train` and `lstm-serve export`: command-line front ends of training and export."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.config import TrainConfig
from model.data import VEGA_PREFIX

D = TrainConfig()


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `lstm-serve train`; each default is TrainConfig's."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--csv",
        metavar="PATH",
        help="CSV file with a header row, or vega:NAME.csv for a file shipped in vega_datasets "
        "(vega:seattle-temps.csv: hourly Seattle temperatures of 2010); default: the daily Seattle weather there",
    )
    g.add_argument("--target", metavar="COL", help=f"column to forecast (default {D.target})")
    g.add_argument(
        "--features",
        metavar="COL",
        nargs="+",
        help="input columns; default: every column but --time-col (with --csv) or "
        f"{' '.join(D.features)} (default data)",
    )
    g.add_argument(
        "--time-col",
        metavar="COL",
        help=f"timestamp column, used to check order and label plots (default {D.time_col!r} "
        "for the default data, none with --csv); rows must be in chronological order",
    )
    g.add_argument(
        "--train-frac",
        type=float,
        default=D.train_frac,
        help="share of rows, from the start, that trains (default %(default)s)",
    )
    g.add_argument(
        "--val-frac",
        type=float,
        default=D.val_frac,
        help="share of rows after that which validates for early stopping; the rest tests (default %(default)s)",
    )
    g.add_argument(
        "--ar-lags", type=int, default=D.ar_lags, metavar="P",
        help="lags of every feature in the ridge autoregression baseline (default %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--season", type=int, default=D.season, metavar="S",
        help="also score the seasonal naive baseline, the value S steps earlier (24 on hourly data: same hour "
        "yesterday; default %(default)s: none)",
    )  # fmt: skip
    g = p.add_argument_group("model")
    g.add_argument(
        "--horizon",
        type=int,
        default=D.horizon,
        help="forecast this many steps ahead at every step: the O outputs (default %(default)s)",
    )
    g.add_argument("--window", type=int, default=D.window, help="time steps per training window (default %(default)s)")
    g.add_argument(
        "--context",
        type=int,
        default=D.context,
        help="history fed before each test forecast, for the LSTM and the baselines' windows (default %(default)s)",
    )
    g.add_argument(
        "--hidden-size", type=int, default=D.hidden_size, help="H, LSTM units per layer (default %(default)s)"
    )
    g.add_argument("--num-layers", type=int, default=D.num_layers, help="L, stacked LSTM layers (default %(default)s)")
    g.add_argument(
        "--highway", action=argparse.BooleanOptionalAction, default=D.highway,
        help="a linear path from the inputs to the outputs, beside the LSTM (default %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--highway-lags", type=int, default=D.highway_lags, metavar="P",
        help="the highway reads the last P steps' inputs, an autoregression inside the model; the P - 1 past steps "
        "ride in the session state, (P - 1) * F units after the LSTM's (default %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--highway-init", action=argparse.BooleanOptionalAction, default=D.highway_init,
        help="start the highway at the ridge fit on the training part and the LSTM's head at zero (default "
        "%(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--ensemble", type=int, default=D.ensemble, metavar="K",
        help="train K members (seeds seed..seed+K-1) and export them as one LSTM of hidden size K*H whose forecast "
        "is their mean (default %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--dropout",
        type=float,
        default=D.dropout,
        help="dropout before the head and between layers (default %(default)s)",
    )
    g.add_argument(
        "--residual",
        action=argparse.BooleanOptionalAction,
        default=D.residual,
        help="forecast the change from the latest target value instead of the value itself, when the target is "
        "an input (default %(default)s)",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--loss",
        choices=["mse", "l1", "huber"],
        default=D.loss,
        help="training loss in scaled units (default %(default)s)",
    )
    g.add_argument("--epochs", type=int, default=D.max_epochs, help="at most this many epochs (default %(default)s)")
    g.add_argument(
        "--min-epochs",
        type=int,
        default=D.min_epochs,
        help="keep no checkpoint before this epoch; early weights can fit validation by luck (default %(default)s)",
    )
    g.add_argument(
        "--patience",
        type=int,
        default=D.patience,
        help="early stopping: epochs without a better validation loss (default %(default)s)",
    )
    g.add_argument(
        "--batch-size", type=int, default=D.batch_size, help="windows per optimiser step (default %(default)s)"
    )
    g.add_argument("--lr", type=float, default=D.lr, help="AdamW learning rate (default %(default)s)")
    g.add_argument(
        "--seed", type=int, default=D.seed, help="random seed; the same flags give the same model (default %(default)s)"
    )
    g.add_argument("--threads", type=int, default=D.threads, help="torch CPU threads (default %(default)s)")
    g.add_argument(
        "--allow-worse", action="store_true", help="export even if the model does not beat persistence on the test part"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    g = p.add_argument_group("output")
    g.add_argument(
        "--name", help=f"model name in the repository (default {D.name} for the default data, else the CSV's file name)"
    )
    g.add_argument(
        "--version", type=int, default=D.version, help="model version in the repository (default %(default)s)"
    )
    g.add_argument(
        "--models",
        type=Path,
        default=Path("models"),
        help="model repository to write <name>/<version>/ into (default %(default)s)",
    )
    g.add_argument("--checkpoint", type=Path, help="where to save the PyTorch checkpoint (default runs/<name>/ckpt.pt)")


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    """Turn parsed flags into a TrainConfig (defaults differ between the shipped data and --csv)."""
    custom = a.csv is not None
    return TrainConfig(
        csv=a.csv,
        target=a.target or ("" if custom else D.target),
        features=tuple(a.features) if a.features else (() if custom else D.features),
        time_col=a.time_col if (custom or a.time_col) else D.time_col,
        name=a.name or (Path(a.csv.removeprefix(VEGA_PREFIX)).stem if custom else D.name),
        version=a.version,
        train_frac=a.train_frac,
        val_frac=a.val_frac,
        horizon=a.horizon,
        window=a.window,
        context=a.context,
        ar_lags=a.ar_lags,
        season=a.season,
        hidden_size=a.hidden_size,
        num_layers=a.num_layers,
        ensemble=a.ensemble,
        highway=a.highway,
        highway_lags=a.highway_lags,
        highway_init=a.highway_init,
        dropout=a.dropout,
        residual=a.residual,
        loss=a.loss,
        max_epochs=a.epochs,
        min_epochs=a.min_epochs,
        patience=a.patience,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        threads=a.threads,
        require_beats_persistence=not a.allow_worse,
    )


def add_backtest_arguments(p: argparse.ArgumentParser) -> None:
    add_train_arguments(p)
    p.add_argument("--folds", type=int, default=4, help="test windows, the last F blocks of the data (default 4)")
    p.add_argument("--out", type=Path, help="where to write backtest.json and backtest.png (default runs/<name>/)")


def add_seeds_arguments(p: argparse.ArgumentParser) -> None:
    add_train_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="top-level seeds (default 1-5)")
    p.add_argument("--out", type=Path, help="where to write seeds.json and seeds.png (default runs/<name>/)")


def run_seeds(a: argparse.Namespace) -> int:
    """Train the recipe once per top-level seed; print the spread, write JSON and a plot."""
    from model import seeds

    return run_study(
        a, "seeds", lambda cfg, progress: seeds.seed_spread(cfg, a.seeds, progress), seeds.plot, seeds.table
    )


def run_backtest(a: argparse.Namespace) -> int:
    """Train one model per fold and score it and both baselines; print the table, write JSON and a plot."""
    from model import backtest

    return run_study(
        a, "backtest", lambda cfg, progress: backtest.backtest(cfg, a.folds, progress), backtest.plot, backtest.table
    )


def run_study(
    a: argparse.Namespace,
    stem: str,
    study: Callable[[TrainConfig, bool], dict[str, Any]],
    plot: Callable[[dict[str, Any], Path, str], None],
    table: Callable[[dict[str, Any]], str],
) -> int:
    """What `backtest` and `seeds` share: check the flags, run the study, write <stem>.json and <stem>.png into
    --out (default runs/<name>/), print its table."""
    import json

    from model.data import DataError

    if a.csv is not None and not a.target:
        print("error: --csv needs --target COL (the column to forecast)", file=sys.stderr)
        return 2
    cfg = config_from_args(a)
    try:
        result = study(cfg, not a.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = a.out or Path("runs") / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{stem}.png", cfg.target)
    print(table(result))
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'}")
    return 0


def run_train(a: argparse.Namespace) -> int:
    """Train, save the checkpoint, export into the repository; exit code 0 on success."""
    import torch

    from model.data import DataError
    from model.export import export_checkpoint
    from model.train import TrainingFailedError, train

    if a.csv is not None and not a.target:
        print("error: --csv needs --target COL (the column to forecast)", file=sys.stderr)
        return 2
    cfg = config_from_args(a)
    try:
        ckpt = train(cfg, progress=not a.no_progress)
    except (DataError, TrainingFailedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ckpt_path = a.checkpoint or Path("runs") / cfg.name / "ckpt.pt"
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, ckpt_path)
    out = export_checkpoint(ckpt, a.models)
    print(f"checkpoint: {ckpt_path}\nmodel:      {out}/model.onnx (card in model.json, plot in report.png)")
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="checkpoint written by `lstm-serve train`")
    p.add_argument(
        "--models", type=Path, default=Path("models"), help="model repository to write into (default %(default)s)"
    )


def run_export(a: argparse.Namespace) -> int:
    """Rebuild a model from its checkpoint alone and export it."""
    from model.export import export_checkpoint, load_checkpoint

    out = export_checkpoint(load_checkpoint(a.checkpoint), a.models)
    print(f"model: {out}/model.onnx")
    return 0
