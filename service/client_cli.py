"""`lstm-serve stream`: pipe a CSV through a gRPC streaming session and print or plot the forecasts."""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np

from service.client import Client, ClientError


def positive(raw: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of rows >= 1, got {raw!r}")
    return n


def add_stream_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--csv", required=True, help="CSV with a header row holding the model's feature columns (or vega:NAME.csv)"
    )
    p.add_argument("--server", default="127.0.0.1:50051", help="gRPC address of a running server (default %(default)s)")
    p.add_argument(
        "--model", default=None,
        help="model name (default: the server's only model, or the only one whose features are all CSV columns)",
    )  # fmt: skip
    p.add_argument("--version", default=None, help="model version (default: the newest)")
    p.add_argument("--time-col", default=None, help="column printed as the first output column (e.g. date)")
    p.add_argument("--limit", type=positive, default=None, help="stream only the first N rows (N >= 1)")
    p.add_argument(
        "--plot", type=Path, default=None,
        help="also draw forecasts against the actual target, and the live error the server scored, to this PNG",
    )  # fmt: skip


def pick_model(models: list[Any], path: Path) -> str | None:
    """The model to stream a CSV through when none is named: the only one served, else the only one whose
    features are all columns of the CSV (None when that is not exactly one)."""
    if len({m.name for m in models}) == 1:
        return str(models[0].name)
    try:
        with path.open(newline="", encoding="utf-8") as f:  # NOTE: as load_csv reads it
            header = {h.strip() for h in next(csv.reader(f), [])}
    except (OSError, UnicodeDecodeError):
        return str(models[0].name)  # NOTE: load_csv then says what is wrong with the file
    fits = sorted({m.name for m in models if set(m.features) <= header})
    return fits[0] if len(fits) == 1 else None


def run_stream(a: argparse.Namespace) -> int:
    from model.data import DataError, csv_path, load_csv

    if a.plot:
        try:
            import matplotlib  # noqa: F401  # NOTE: checked before streaming, not after
        except ImportError:
            print("error: --plot needs matplotlib: make install-dev (or .venv/bin/pip install matplotlib)",
                  file=sys.stderr)  # fmt: skip
            return 2
    try:
        path = csv_path(a.csv)
        if not path.is_file():
            raise DataError(f"CSV file not found: {path}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    try:
        with Client(a.server) as client:
            models = client.list_models()
            if not models:
                print("error: the server has no models", file=sys.stderr)
                return 1
            name = a.model or pick_model(models, path)
            if name is None:
                names = ", ".join(sorted({m.name for m in models}))
                print(f"error: the server serves {names}, and the CSV's columns fit more than one or none of "
                      "them; pass --model NAME", file=sys.stderr)  # fmt: skip
                return 2
            info = client.get_model(name, a.version)
            features = tuple(info.features)
            try:
                series = load_csv(path, features[0], features, a.time_col)
            except DataError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            rows = series.values if a.limit is None else series.values[: a.limit]
            out = csv.writer(sys.stdout)
            out.writerow([a.time_col or "row", *info.outputs])
            forecasts = []
            accuracy = None
            # NOTE: the session is kept past the stream to read what the server scored, then deleted (also when
            # the stream fails half-way)
            try:
                for i, f in enumerate(client.stream(name, rows, version=a.version, keep=True)):
                    forecasts.append(f)
                    out.writerow([series.times[i], *(f"{v:.3f}" for v in f)])
                if client.session_id and info.live_scoring:
                    accuracy = client.get_session(client.session_id).live_accuracy
            finally:
                if client.session_id:
                    with contextlib.suppress(Exception):  # NOTE: the first error is the one to report
                        client.delete_session(client.session_id)
    except ClientError as e:
        hint = f"; is `lstm-serve serve` running at {a.server}?" if e.code == "unavailable" else ""
        print(f"error: {e.message or e.code}{hint}", file=sys.stderr)
        return 1
    except Exception as e:  # grpc connection problems
        print(f"error: cannot stream to {a.server}: {e}; is `lstm-serve serve` running?", file=sys.stderr)
        return 1
    live = None
    if accuracy is not None and accuracy.scored and any(h.count for h in accuracy.horizons):
        live = [(h.horizon, h.mae, h.persistence_mae) for h in accuracy.horizons if h.count]
        print("live MAE by horizon (the server's scoring; persistence in brackets): "
              + ", ".join(f"{k}: {m:.3f} ({p:.3f})" for k, m, p in live), file=sys.stderr)  # fmt: skip
    elif not info.live_scoring:
        print(f"no live accuracy: {info.live_scoring_off}", file=sys.stderr)
    if a.plot:
        actual = None
        if info.target in features:
            actual = rows[:, features.index(info.target)]
        plot_stream(a.plot, np.stack(forecasts), actual, info.target, series.times[: len(rows)], live)
        print(f"plot: {a.plot}", file=sys.stderr)
    return 0


def plot_stream(
    path: Path,
    forecasts: np.ndarray,
    actual: np.ndarray | None,
    target: str,
    times: list[str],
    live: list[tuple[int, float, float]] | None = None,
) -> None:
    """Actual target against the 1-step-ahead forecast made the step before, plus the last full horizon; with the
    actual values, the running 1-step error as it arrived; with the server's live accuracy, MAE by horizon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, horizon = forecasts.shape
    panels = 1 + (actual is not None and n > 1) + (live is not None)
    fig, axes = plt.subplots(1, panels, figsize=(12 + 4 * (panels - 1), 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [3] + [1.3] * (panels - 1)})  # fmt: skip
    ax = axes[0, 0]
    xs = np.arange(n)
    if actual is not None:
        ax.plot(xs, actual, color="black", lw=1.3, label=f"actual {target}")
    ax.plot(xs[1:], forecasts[:-1, 0], color="tab:blue", lw=1.1, label="forecast 1 step ahead")
    ax.plot(np.arange(n, n + horizon), forecasts[-1], color="tab:red", marker="o", lw=1.5,
            label=f"last forecast: next {horizon} steps")  # fmt: skip
    ticks = np.linspace(0, n - 1, min(6, n)).astype(int)
    ax.set_xticks(ticks, [times[i] for i in ticks], rotation=15, fontsize=8)
    ax.set_ylabel(target)
    ax.legend(fontsize=8)
    ax.set_title(f"Streaming forecasts of {target} ({n} steps through one session)")
    at = 1
    if actual is not None and n > 1:
        # NOTE: the error of each 1-step forecast when its truth arrived, and of persistence, as running means
        err = np.abs(forecasts[:-1, 0].astype(np.float64) - actual[1:])
        pers = np.abs(actual[:-1].astype(np.float64) - actual[1:])
        seen = np.arange(1, n)
        ex = axes[0, at]
        ex.plot(xs[1:], np.cumsum(err) / seen, color="tab:blue", lw=1.2, label="LSTM, 1 step ahead")
        ex.plot(xs[1:], np.cumsum(pers) / seen, color="tab:gray", ls=":", lw=1.2, label="persistence")
        ex.set_xticks(ticks, [times[i] for i in ticks], rotation=15, fontsize=7)
        ex.set_title("Live error: running MAE as the truth arrived", fontsize=10)
        ex.legend(fontsize=8)
        at += 1
    if live is not None:
        lx = axes[0, at]
        ks = [k for k, _, _ in live]
        lx.plot(ks, [m for _, m, _ in live], color="tab:blue", marker="o", label="LSTM")
        lx.plot(ks, [p for _, _, p in live], color="tab:gray", ls=":", marker="o", label="persistence")
        lx.set_xlabel("horizon (steps ahead)")
        lx.set_title("Live MAE by horizon (server-side)", fontsize=10)
        lx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
