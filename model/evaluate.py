"""Forecast metrics (MAE, RMSE by horizon step) and the evaluation report plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model.data import F32


def scores(pred: F32, actual: F32) -> dict[str, Any]:
    """MAE and RMSE at horizon 1, averaged over the horizon, and per horizon step."""
    err = pred.astype(np.float64) - actual.astype(np.float64)  # [n, O]
    mae_k = np.abs(err).mean(axis=0)
    rmse_k = np.sqrt((err**2).mean(axis=0))
    return {
        "mae_h1": round(float(mae_k[0]), 4),
        "rmse_h1": round(float(rmse_k[0]), 4),
        "mae_mean": round(float(mae_k.mean()), 4),
        "rmse_mean": round(float(rmse_k.mean()), 4),
        "mae_by_step": [round(float(v), 4) for v in mae_k],
        "rmse_by_step": [round(float(v), 4) for v in rmse_k],
    }


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write as PNG (creating the directory) and close: the end of every plot here."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def log_if_spread(ax: Any, values: list[float]) -> None:
    """A logarithmic y axis when the values span more than 10x: a weak baseline would otherwise flatten the
    others into one line."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 10 * min(positive):
        ax.set_yscale("log")


def plot_report(
    path: Path,
    times: list[str],
    actual: F32,
    forecasts: dict[str, F32],
    metrics: dict[str, dict[str, Any]],
    target: str,
    title: str,
    stretch: int = 120,
) -> None:
    """Draw forecast against actual (horizon 1 over a stretch of the test part) and MAE by horizon step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    n = min(stretch, actual.shape[0])
    xs = np.arange(n)
    ax1.plot(xs, actual[:n, 0], color="black", lw=1.5, label="actual")
    styles = {"lstm": ("tab:blue", "-"), "persistence": ("tab:gray", ":"), "ridge": ("tab:orange", "--"),
              "seasonal": ("tab:green", "-.")}  # fmt: skip
    for name, pred in forecasts.items():
        color, ls = styles.get(name, ("tab:green", "-"))
        ax1.plot(xs, pred[:n, 0], color=color, ls=ls, lw=1.2, label=f"{name} (1 step ahead)")
    ticks = np.linspace(0, n - 1, 6).astype(int)
    ax1.set_xticks(ticks, [times[i] for i in ticks], rotation=20, fontsize=8)
    ax1.set_ylabel(target)
    ax1.set_title(f"Test part: 1-step-ahead forecast vs actual ({n} steps)")
    ax1.legend(fontsize=8)
    for name, m in metrics.items():
        color, ls = styles.get(name, ("tab:green", "-"))
        steps = np.arange(1, len(m["mae_by_step"]) + 1)
        ax2.plot(steps, m["mae_by_step"], color=color, ls=ls, marker="o", label=f"{name} (mean {m['mae_mean']:.2f})")
    log_if_spread(ax2, [v for m in metrics.values() for v in m["mae_by_step"]])
    ax2.set_xlabel("horizon step")
    ax2.set_ylabel(f"MAE ({target})")
    ax2.set_title("Test MAE by horizon step")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, path)
