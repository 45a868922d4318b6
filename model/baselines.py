"""Naive baselines that the LSTM must beat, on exactly the same forecast origins."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from model.data import F32, future_targets

I64 = NDArray[np.int64]


def persistence(target: F32, origins: I64, horizon: int) -> F32:
    """Forecast the last observed value for every horizon step: `[n, horizon]`."""
    return np.repeat(target[origins][:, None], horizon, axis=1).astype(np.float32)


def seasonal_naive(target: F32, origins: I64, horizon: int, period: int) -> F32:
    """Forecast each future step with the value one season earlier (`period` steps; 24 for hourly data is
    "same hour yesterday"): step k of origin t is `target[t + k - period * ceil(k / period)]`, k = 1..horizon."""
    k = np.arange(1, horizon + 1)
    lag = period * -(-k // period)  # NOTE: ceil(k / period) seasons back, so every value is already observed
    if int(origins.min()) + 1 - period < 0:  # NOTE: the earliest value read is target[t + 1 - period]
        raise ValueError(f"origin {int(origins.min())} has less than {period} steps of history")
    out: F32 = target[origins[:, None] + k[None, :] - lag[None, :]].astype(np.float32)
    return out


def lag_matrix(x_scaled: F32, origins: I64, lags: int) -> NDArray[np.float64]:
    """Rows `[x[t - lags + 1], ..., x[t]]` flattened, one per origin: `[n, lags * F]`."""
    if int(origins.min()) < lags - 1:
        raise ValueError(f"origin {int(origins.min())} has fewer than {lags} steps of history")
    return np.stack([x_scaled[t - lags + 1 : t + 1].reshape(-1) for t in origins]).astype(np.float64)


class RidgeAR:
    """Ridge regression of the next `horizon` targets on the last `lags` steps of all features.

    Inputs are standardised with the training scaler; the intercept is fitted, not penalised.
    """

    def __init__(self, lags: int, horizon: int, alpha: float) -> None:
        self.lags, self.horizon, self.alpha = lags, horizon, alpha
        self.coef: NDArray[np.float64] | None = None  # [lags * F + 1, horizon], last row the intercept

    def fit(self, x_scaled: F32, target: F32, end: int) -> RidgeAR:
        """Fit on every origin whose lags and targets lie in rows [0, end) (the training part)."""
        origins = np.arange(self.lags - 1, end - self.horizon, dtype=np.int64)
        a = lag_matrix(x_scaled, origins, self.lags)
        y = future_targets(target, self.horizon)[origins].astype(np.float64)
        a1 = np.hstack([a, np.ones((a.shape[0], 1))])
        penalty = self.alpha * np.eye(a1.shape[1])
        penalty[-1, -1] = 0.0  # NOTE: the intercept is not penalised
        self.coef = np.asarray(np.linalg.solve(a1.T @ a1 + penalty, a1.T @ y), dtype=np.float64)
        return self

    def predict(self, x_scaled: F32, origins: I64) -> F32:
        """Forecast `[n, horizon]` raw target values at each origin."""
        if self.coef is None:
            raise RuntimeError("RidgeAR.predict before fit")
        a = lag_matrix(x_scaled, origins, self.lags)
        return (np.hstack([a, np.ones((a.shape[0], 1))]) @ self.coef).astype(np.float32)
