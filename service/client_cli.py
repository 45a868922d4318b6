"""`lstm-serve stream`: pipe a CSV through a gRPC streaming session and print or plot the forecasts."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from service.client import Client, ClientError


def add_stream_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csv", type=Path, required=True, help="CSV with a header row holding the model's feature columns")
    p.add_argument("--server", default="127.0.0.1:50051", help="gRPC address of a running server (default %(default)s)")
    p.add_argument("--model", default=None, help="model name (default: the server's only or first model)")
    p.add_argument("--version", default=None, help="model version (default: the newest)")
    p.add_argument("--time-col", default=None, help="column printed as the first output column (e.g. date)")
    p.add_argument("--limit", type=int, default=None, help="stream only the first N rows")
    p.add_argument("--plot", type=Path, default=None, help="also draw forecasts against the actual target to this PNG")


def run_stream(a: argparse.Namespace) -> int:
    from model.data import DataError, load_csv

    if a.plot:
        try:
            import matplotlib  # noqa: F401  # NOTE: checked before streaming, not after
        except ImportError:
            print("error: --plot needs matplotlib: make install-dev (or .venv/bin/pip install matplotlib)",
                  file=sys.stderr)  # fmt: skip
            return 2

    try:
        with Client(a.server) as client:
            models = client.list_models()
            if not models:
                print("error: the server has no models", file=sys.stderr)
                return 1
            name = a.model or models[0].name
            info = client.get_model(name, a.version)
            features = tuple(info.features)
            try:
                series = load_csv(a.csv, features[0], features, a.time_col)
            except DataError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            rows = series.values[: a.limit] if a.limit else series.values
            out = csv.writer(sys.stdout)
            out.writerow([a.time_col or "row", *info.outputs])
            forecasts = []
            for i, f in enumerate(client.stream(name, rows, version=a.version)):
                forecasts.append(f)
                out.writerow([series.times[i], *(f"{v:.3f}" for v in f)])
    except ClientError as e:
        hint = f"; is `lstm-serve serve` running at {a.server}?" if e.code == "unavailable" else ""
        print(f"error: {e.message or e.code}{hint}", file=sys.stderr)
        return 1
    except Exception as e:  # grpc connection problems
        print(f"error: cannot stream to {a.server}: {e}; is `lstm-serve serve` running?", file=sys.stderr)
        return 1
    if a.plot:
        actual = None
        if info.target in features:
            actual = rows[:, features.index(info.target)]
        plot_stream(a.plot, np.stack(forecasts), actual, info.target, series.times[: len(rows)])
        print(f"plot: {a.plot}", file=sys.stderr)
    return 0


def plot_stream(path: Path, forecasts: np.ndarray, actual: np.ndarray | None, target: str, times: list[str]) -> None:
    """Actual target against the 1-step-ahead forecast made the step before, plus the last full horizon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, horizon = forecasts.shape
    fig, ax = plt.subplots(figsize=(12, 4.5))
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
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
