"""Train the forecaster: seeded, early-stopped on validation loss, evaluated against naive baselines."""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.baselines import RidgeAR, lag_matrix, persistence, seasonal_naive
from model.config import TrainConfig
from model.data import (
    F32,
    VEGA_PREFIX,
    DataError,
    Scaler,
    Series,
    Split,
    csv_path,
    forecast_origins,
    future_targets,
    load_csv,
    sliding_windows,
)
from model.evaluate import plot_report, scores
from model.lstm import LSTMForecaster, ModelArgs


class TrainingFailedError(RuntimeError):
    """The trained model is not good enough to ship (for example, it does not beat persistence)."""


@dataclass
class Prepared:
    """A loaded series with its split, scaler and the windows each part contributes."""

    series: Series
    split: Split
    scaler: Scaler
    train_x: F32  # [n, W, F] raw units
    train_y: F32  # [n, W, O] raw units
    val_x: F32
    val_y: F32
    origins: np.ndarray  # test forecast origins
    residual_index: int  # feature index of the target when the model forecasts changes, else -1


def load_series(cfg: TrainConfig) -> Series:
    """Load the configured CSV, or the Seattle weather data shipped with vega_datasets."""
    series = load_csv(csv_path(cfg.csv), cfg.target, cfg.features or None, cfg.time_col)
    if not cfg.csv:
        series.source = "vega_datasets/_data/seattle-weather.csv (daily Seattle weather, 2012-2015)"
    elif cfg.csv.startswith(VEGA_PREFIX):
        series.source = f"vega_datasets/_data/{cfg.csv[len(VEGA_PREFIX) :]}"
    return series


def prepare(cfg: TrainConfig, series: Series | None = None) -> Prepared:
    """Split chronologically, fit the scaler on the training part only, cut windows."""
    series = series or load_series(cfg)
    split = Split.chronological(len(series), cfg.train_frac, cfg.val_frac, min_part=cfg.window + cfg.horizon)
    residual_index = series.features.index(series.target) if cfg.residual and series.target in series.features else -1
    train_target = series.target_values[: split.train_end]
    if residual_index >= 0:
        # NOTE: the output scaler describes the change over the horizon, y[t + k] - y[t], on the training part
        fut = future_targets(series.target_values, cfg.horizon)[: split.train_end]
        train_target = (fut - series.target_values[: split.train_end, None])[~np.isnan(fut[:, -1])].reshape(-1)
    scaler = Scaler.fit(series.values[: split.train_end], train_target)
    tx, ty = sliding_windows(series.values, series.target_values, 0, split.train_end, cfg.window, cfg.horizon)
    vx, vy = sliding_windows(
        series.values, series.target_values, split.train_end, split.val_end, cfg.window, cfg.horizon
    )
    if cfg.context < max(cfg.ar_lags, cfg.highway_lags):
        raise DataError(
            f"context ({cfg.context}) must be at least ar_lags ({cfg.ar_lags}) and highway_lags ({cfg.highway_lags})"
        )
    if cfg.highway_lags < 1:
        raise DataError(f"highway_lags ({cfg.highway_lags}) must be at least 1")
    if cfg.highway and cfg.highway_lags > cfg.window:
        raise DataError(
            f"highway_lags ({cfg.highway_lags}) must be at most window ({cfg.window}): the loss starts once the "
            "highway's window is full"
        )
    origins = forecast_origins(split, cfg.horizon, cfg.context)
    return Prepared(series, split, scaler, tx, ty, vx, vy, origins, residual_index)


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": nn.functional.mse_loss,
    "l1": nn.functional.l1_loss,
    "huber": nn.functional.huber_loss,
}


def _loss(model: LSTMForecaster, x: torch.Tensor, y: torch.Tensor, warmup: int, kind: str) -> torch.Tensor:
    """Loss in scaled units over every step after the warm-up and every horizon output."""
    z = (x - model.x_mean) / model.x_std
    h0, c0 = model.zero_state(x.shape[0])
    pred, _, _ = model.forward_scaled(z, h0, c0)  # [B, W, O]
    target = (y - model.y_mean - model.base(x)) / model.y_std
    return LOSSES[kind](pred[:, warmup:], target[:, warmup:])


@torch.no_grad()
def predict_at_origins(model: LSTMForecaster, values: F32, origins: np.ndarray, context: int) -> F32:
    """Forecast `[n, O]` at each origin from a zero state fed the `context` rows that end there."""
    model.eval()
    xs = np.stack([values[t - context + 1 : t + 1] for t in origins])
    h0, c0 = model.zero_state(xs.shape[0])
    y, _, _ = model(torch.from_numpy(xs), h0, c0)
    out: F32 = y[:, -1, :].numpy()
    return out


@torch.no_grad()
def predict_streaming(model: LSTMForecaster, values: F32, origins: np.ndarray) -> F32:
    """Forecast at each origin after feeding the whole series from its first row (one long session)."""
    model.eval()
    h0, c0 = model.zero_state(1)
    y, _, _ = model(torch.from_numpy(values[None]), h0, c0)
    out: F32 = y[0].numpy()[origins]
    return out


@torch.no_grad()
def init_highway(model: LSTMForecaster, data: Prepared, alpha: float) -> None:
    """Start the highway at the ridge fit of the scaled training target on the last P scaled inputs, and the
    LSTM's head at zero: training starts from a linear autoregression and the LSTM learns what it misses."""
    a, skip = model.args, model.skip
    assert skip is not None
    end, lags = data.split.train_end, a.highway_lags
    z = data.scaler.transform(data.series.values[:end])
    origins = np.arange(lags - 1, end - a.horizon, dtype=np.int64)
    base = model.base(torch.from_numpy(data.series.values[origins])).numpy().astype(np.float64)  # [n, 1]
    fut = future_targets(data.series.target_values[:end], a.horizon)[origins].astype(np.float64)
    target = (fut - base - float(model.y_mean)) / float(model.y_std)
    design = np.hstack([lag_matrix(z, origins, lags), np.ones((len(origins), 1))])
    penalty = alpha * np.eye(design.shape[1])
    penalty[-1, -1] = 0.0  # NOTE: the intercept is not penalised
    coef = np.linalg.solve(design.T @ design + penalty, design.T @ target)  # [P * F + 1, O]
    skip.weight.copy_(torch.from_numpy(coef[:-1].T.astype(np.float32)))
    skip.bias.copy_(torch.from_numpy(coef[-1].astype(np.float32)))
    model.head.weight.zero_()
    model.head.bias.zero_()


@dataclass
class Fitted:
    """One trained network and how its training went."""

    model: LSTMForecaster
    best_epoch: int
    best_val: float
    history: list[dict[str, float]]


def fit(cfg: TrainConfig, data: Prepared, seed: int, progress: bool, log: Any, desc: str = "training") -> Fitted:
    """Train one network from `seed`, early-stopped on the validation loss; the best epoch's weights."""
    from tqdm import tqdm

    series, scaler = data.series, data.scaler
    args = ModelArgs(
        len(series.features),
        cfg.hidden_size,
        cfg.num_layers,
        cfg.horizon,
        cfg.dropout,
        data.residual_index,
        cfg.highway,
        cfg.highway_lags,
    )
    model = LSTMForecaster(args)
    model.set_scaler(torch.from_numpy(scaler.mean), torch.from_numpy(scaler.std), scaler.target_mean, scaler.target_std)
    if cfg.highway and cfg.highway_init:
        init_highway(model, data, cfg.ridge_alpha)
    warmup = max(cfg.warmup, cfg.highway_lags - 1 if cfg.highway else 0)  # NOTE: no loss before the window is full
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, cfg.patience // 3))
    tx, ty = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    vx, vy = torch.from_numpy(data.val_x), torch.from_numpy(data.val_y)
    gen = torch.Generator().manual_seed(seed)
    best_val, best_state, best_epoch, bad = math.inf, copy.deepcopy(model.state_dict()), 0, 0
    history: list[dict[str, float]] = []
    min_epochs = min(cfg.min_epochs, cfg.max_epochs)
    bar = tqdm(range(1, cfg.max_epochs + 1), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(tx.shape[0], generator=gen)
        running, batches = 0.0, 0
        for i in range(0, tx.shape[0], cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = _loss(model, tx[idx], ty[idx], warmup, cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # NOTE: torch leaves Tensor.backward untyped
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            running, batches = running + loss.item(), batches + 1
        model.eval()
        with torch.no_grad():
            val = float(_loss(model, vx, vy, warmup, cfg.loss))
        sched.step(val)
        bar.set_postfix(train_loss=f"{running / batches:.4f}", val_loss=f"{val:.4f}", refresh=False)
        history.append({"epoch": epoch, "train_loss": running / batches, "val_loss": val})
        if epoch >= min_epochs and val < best_val - 1e-6:
            best_val, best_state, best_epoch, bad = val, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            bad += 1
            if epoch >= min_epochs and bad >= cfg.patience:
                bar.close()
                log(f"{desc}: early stop at epoch {epoch}: no better validation loss for {cfg.patience} epochs")
                break
    model.load_state_dict(best_state)
    model.eval()
    return Fitted(model, best_epoch, best_val, history)


def train(cfg: TrainConfig, progress: bool = True, log: Any = print, series: Series | None = None) -> dict[str, Any]:
    """Run one training (of `cfg.ensemble` members, merged into one LSTM) and its evaluation; return the
    self-describing checkpoint dict."""
    started = time.time()
    seed_everything(cfg.seed, cfg.threads)
    data = prepare(cfg, series)
    series, split, scaler = data.series, data.split, data.scaler
    log(
        f"data: {series.source}: {len(series)} rows; train {split.train_end}, "
        f"validation {split.val_end - split.train_end}, test {split.n - split.val_end}; "
        f"{data.train_x.shape[0]} training windows of {cfg.window} steps"
    )
    fitted: list[Fitted] = []
    for k in range(cfg.ensemble):
        if k:
            seed_everything(cfg.seed + k, cfg.threads)  # NOTE: member 0 is exactly the single-model run
        desc = f"member {k + 1}/{cfg.ensemble}" if cfg.ensemble > 1 else "training"
        fitted.append(fit(cfg, data, cfg.seed + k, progress, log, desc))
    if cfg.ensemble > 1:
        from model.ensemble import merge

        model = merge([f.model for f in fitted])
    else:
        model = fitted[0].model
    args = model.args
    best_epoch, best_val, history = fitted[0].best_epoch, min(f.best_val for f in fitted), fitted[0].history

    # --- evaluation on the test part, all models on the same origins ---
    origins = data.origins
    actual = future_targets(series.target_values, cfg.horizon)[origins]
    lstm_pred = predict_at_origins(model, series.values, origins, cfg.context)
    ridge = RidgeAR(cfg.ar_lags, cfg.horizon, cfg.ridge_alpha).fit(
        scaler.transform(series.values), series.target_values, split.train_end
    )
    forecasts = {
        "lstm": lstm_pred,
        "persistence": persistence(series.target_values, origins, cfg.horizon),
        "ridge": ridge.predict(scaler.transform(series.values), origins),
    }
    if cfg.season > 0:
        forecasts["seasonal"] = seasonal_naive(series.target_values, origins, cfg.horizon, cfg.season)
    metrics = {name: scores(pred, actual) for name, pred in forecasts.items()}
    metrics["lstm_streaming"] = scores(predict_streaming(model, series.values, origins), actual)
    members = [scores(predict_at_origins(f.model, series.values, origins, cfg.context), actual) for f in fitted]
    elapsed = time.time() - started
    log(
        f"best epoch {best_epoch} (validation loss {best_val:.4f}); {elapsed:.0f} s\n"
        + "\n".join(
            f"  test {name:<15} MAE h1 {m['mae_h1']:.3f}  mean {m['mae_mean']:.3f}   "
            f"RMSE h1 {m['rmse_h1']:.3f}  mean {m['rmse_mean']:.3f}"
            for name, m in metrics.items()
        )
    )
    ckpt: dict[str, Any] = {
        "model_args": args.to_dict(),
        "config": cfg.to_dict(),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "scaler": scaler.to_dict(),
        "data": {
            "source": series.source,
            "features": list(series.features),
            "target": series.target,
            "rows": len(series),
            "split": {
                "train": [0, split.train_end],
                "validation": [split.train_end, split.val_end],
                "test": [split.val_end, split.n],
            },
            "test_period": [series.times[split.val_end], series.times[-1]],
            "test_origins": len(origins),
            "context": cfg.context,
        },
        "metrics": {
            "test": metrics,
            "ensemble": {
                "members": cfg.ensemble,
                "member_hidden_size": cfg.hidden_size,
                "member_seeds": [cfg.seed + k for k in range(cfg.ensemble)],
                "member_best_epochs": [f.best_epoch for f in fitted],
                "member_test": members,
            },
            "best_epoch": best_epoch,
            "best_val_loss": round(best_val, 6),
            "epochs_run": sum(len(f.history) for f in fitted),
            "train_seconds": round(elapsed, 1),
        },
        "history": history,
        "report": {
            "times": [series.times[t] for t in origins],
            "actual": actual.tolist(),
            "forecasts": {k: v.tolist() for k, v in forecasts.items()},
        },
    }
    lstm_m, pers_m = metrics["lstm"], metrics["persistence"]
    if cfg.require_beats_persistence and not lstm_m["mae_mean"] < pers_m["mae_mean"]:
        raise TrainingFailedError(
            f"the LSTM does not beat persistence on the test part (mean MAE {lstm_m['mae_mean']:.3f} "
            f">= {pers_m['mae_mean']:.3f}); train longer, change --hidden-size/--window, or check the data"
        )
    return ckpt


def write_report(ckpt: dict[str, Any], path: Path) -> None:
    """Draw the evaluation report PNG from a checkpoint."""
    rep, cfg = ckpt["report"], ckpt["config"]
    plot_report(
        path,
        rep["times"],
        np.asarray(rep["actual"], dtype=np.float32),
        {k: np.asarray(v, dtype=np.float32) for k, v in rep["forecasts"].items()},
        {k: v for k, v in ckpt["metrics"]["test"].items() if k in rep["forecasts"]},
        cfg["target"],
        f"{cfg['name']} v{cfg['version']}: {cfg['target']}, {cfg['horizon']}-step forecast",
    )
