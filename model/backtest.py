"""Rolling-origin backtest: the model and both baselines on several test windows spread over the data.

Fold i of F tests on the i-th of the last F blocks of the series (each as long as the usual test part), and
trains on everything before it: the block just before its test part validates (early stopping and the best
epoch, as in a normal run), the rest trains. The last fold is exactly the normal run's split. Every model is
scored on the same forecast origins within a fold; the summary gives the mean and spread over folds per
horizon step, and in how many folds the LSTM beats ridge on day 1 and on the mean over the horizon.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from model.config import TrainConfig
from model.data import DataError, Series
from model.evaluate import log_if_spread, save_figure
from model.train import load_series, train

MODELS = ("lstm", "persistence", "ridge", "seasonal")  # NOTE: seasonal only with --season


def scored(folds: list[dict[str, Any]]) -> tuple[str, ...]:
    """The models that the folds score, in MODELS order."""
    return tuple(m for m in MODELS if m in folds[0])


def truncated(series: Series, end: int) -> Series:
    return dataclasses.replace(
        series, values=series.values[:end], target_values=series.target_values[:end], times=series.times[:end]
    )


def backtest(
    cfg: TrainConfig, folds: int = 4, progress: bool = True, log: Any = print, series: Series | None = None
) -> dict[str, Any]:
    """Train and score one model per fold; return the folds and their summary (JSON-ready)."""
    from tqdm import tqdm

    series = series or load_series(cfg)
    n = len(series)
    test_len = round(n * (1 - cfg.train_frac - cfg.val_frac))
    val_len = round(n * cfg.val_frac)
    first_end = n - (folds - 1) * test_len
    if folds < 1 or first_end - test_len - val_len < cfg.window + cfg.horizon:
        raise DataError(
            f"{n} rows are too few for {folds} folds of {test_len} test rows each (the first fold would train on "
            f"{first_end - test_len - val_len}); use fewer --folds"
        )
    out: list[dict[str, Any]] = []
    for i in tqdm(range(folds), desc="backtest", unit="fold", disable=not progress):
        end = n - (folds - 1 - i) * test_len
        fold_cfg = dataclasses.replace(
            cfg, train_frac=(end - test_len - val_len) / end, val_frac=val_len / end, require_beats_persistence=False
        )
        ckpt = train(fold_cfg, progress=False, log=lambda *_: None, series=truncated(series, end))
        test = ckpt["metrics"]["test"]
        row = {"fold": i + 1, "rows": end, "test_period": ckpt["data"]["test_period"],
               "origins": ckpt["data"]["test_origins"], **{m: test[m] for m in MODELS if m in test}}  # fmt: skip
        out.append(row)
        log(
            f"fold {i + 1}/{folds} ({row['test_period'][0]} to {row['test_period'][1]}): "
            + "  ".join(f"{m} {test[m]['mae_h1']:.3f}/{test[m]['mae_mean']:.3f}" for m in scored([test]))
        )
    return {"folds": out, "summary": summarize(out), "config": cfg.to_dict()}


def summarize(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread (standard deviation, min, max) over folds, per model and horizon step."""
    summary: dict[str, Any] = {}
    for m in scored(folds):
        by_step = np.asarray([f[m]["mae_by_step"] for f in folds])  # [folds, O]
        h1, mean = by_step[:, 0], by_step.mean(axis=1)
        summary[m] = {
            "mae_by_step_mean": [round(float(v), 4) for v in by_step.mean(axis=0)],
            "mae_by_step_std": [round(float(v), 4) for v in by_step.std(axis=0)],
            "mae_h1": {"mean": round(float(h1.mean()), 4), "min": round(float(h1.min()), 4),
                       "max": round(float(h1.max()), 4)},
            "mae_mean": {"mean": round(float(mean.mean()), 4), "min": round(float(mean.min()), 4),
                         "max": round(float(mean.max()), 4)},
        }  # fmt: skip
    wins = [
        f["lstm"]["mae_h1"] < f["ridge"]["mae_h1"] and f["lstm"]["mae_mean"] < f["ridge"]["mae_mean"] for f in folds
    ]
    summary["lstm_beats_ridge_in"] = f"{sum(wins)} of {len(folds)} folds (step 1 and the horizon mean)"
    return summary


def table(result: dict[str, Any]) -> str:
    """The backtest as a markdown table: MAE day 1 / mean over the horizon per fold, then mean and range."""
    folds, s = result["folds"], result["summary"]
    models = scored(folds)
    lines = ["| fold | test period | " + " | ".join(f"{m} MAE step 1 / mean" for m in models) + " |",
             "|---|---|" + "---|" * len(models)]  # fmt: skip
    for f in folds:
        cells = " | ".join(f"{f[m]['mae_h1']:.2f} / {f[m]['mae_mean']:.2f}" for m in models)
        lines.append(f"| {f['fold']} | {f['test_period'][0]} to {f['test_period'][1]} | {cells} |")
    cells = " | ".join(f"{s[m]['mae_h1']['mean']:.2f} / {s[m]['mae_mean']['mean']:.2f}" for m in models)
    lines.append(f"| mean | | {cells} |")
    cells = " | ".join(
        f"{s[m]['mae_h1']['min']:.2f}-{s[m]['mae_h1']['max']:.2f} / {s[m]['mae_mean']['min']:.2f}-"
        f"{s[m]['mae_mean']['max']:.2f}" for m in models
    )  # fmt: skip
    lines.append(f"| range | | {cells} |")
    return "\n".join(lines) + f"\n\nLSTM beats ridge in {s['lstm_beats_ridge_in']}.\n"


def plot(result: dict[str, Any], path: Path, target: str) -> None:
    """MAE per fold (day 1 and the horizon mean) for every model, and MAE by horizon step with its spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds, s = result["folds"], result["summary"]
    models = scored(folds)
    colors = {"lstm": "tab:blue", "persistence": "tab:gray", "ridge": "tab:orange", "seasonal": "tab:green"}
    width = 0.8 / len(models)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    xs = np.arange(len(folds))
    for j, (key, title) in enumerate((("mae_h1", "step 1"), ("mae_mean", "mean over the horizon"))):
        ax = axes[j]
        for k, m in enumerate(models):
            offset = (k - (len(models) - 1) / 2) * width
            ax.bar(xs + offset, [f[m][key] for f in folds], width, color=colors[m], label=m)
        ax.set_xticks(xs, [f"{f['fold']}: {f['test_period'][0][:7]}" for f in folds], fontsize=8)
        log_if_spread(ax, [f[m][key] for f in folds for m in models])
        ax.set_ylabel(f"MAE ({target})")
        ax.set_title(f"MAE {title}, per fold")
        ax.legend(fontsize=8)
    ax = axes[2]
    for m in models:
        mean, std = np.asarray(s[m]["mae_by_step_mean"]), np.asarray(s[m]["mae_by_step_std"])
        steps = np.arange(1, len(mean) + 1)
        ax.plot(steps, mean, marker="o", color=colors[m], label=m)
        ax.fill_between(steps, mean - std, mean + std, color=colors[m], alpha=0.15)
    log_if_spread(ax, [v for m in models for v in s[m]["mae_by_step_mean"]])
    ax.set_xlabel("horizon step")
    ax.set_title("MAE by step: mean ± std over folds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
