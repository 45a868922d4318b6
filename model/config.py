"""Hyperparameters of a training run, in one dataclass (nanoGPT style: a comment per field)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_FEATURES = ("precipitation", "temp_max", "temp_min", "wind")
# NOTE: inputs saturate 10,000 training standard deviations out in the exported graph, so that any finite input
# gives a finite forecast (the residual and highway paths are linear in the inputs); nothing real comes near it
Z_MAX = 1e4


@dataclass
class TrainConfig:
    """Everything a training run needs; the defaults train the shipped model in about a minute on 2 cores."""

    # --- data ---
    csv: str | None = None  # path to a CSV file; None means the Seattle weather data shipped in vega_datasets
    target: str = "temp_max"  # the column to forecast
    features: tuple[str, ...] = DEFAULT_FEATURES  # input columns (the target may be one of them)
    time_col: str | None = "date"  # optional timestamp column, used for sorting checks and plot labels
    name: str = "seattle-weather"  # model name in the repository (models/<name>/<version>/)
    version: int = 1  # model version in the repository
    train_frac: float = 0.70  # chronological split: first 70 % trains
    val_frac: float = 0.15  # next 15 % validates (early stopping); the rest is the test part
    # --- windows ---
    horizon: int = 7  # O: at every step, forecast the target for each of the next `horizon` steps
    window: int = 56  # length T of a training window (time steps fed from a zero state)
    warmup: int = 7  # the first `warmup` steps of a window carry no loss (the state is still cold)
    context: int = 56  # history the evaluation feeds before each forecast origin (same windows for all models)
    ar_lags: int = 14  # lags of all features in the ridge autoregressive baseline
    season: int = 0  # > 0: also score the seasonal naive baseline, the value `season` steps earlier (24: hourly)
    ridge_alpha: float = 1.0  # L2 penalty of the ridge baseline (on standardised inputs)
    # --- model ---
    hidden_size: int = 48  # H: LSTM hidden units per layer
    num_layers: int = 1  # L: stacked LSTM layers
    # NOTE: residual, highway, l1, dropout 0.3 and 5 members: chosen on the rolling-origin backtest of the default
    # data (README "The shipped model"), where each helped the day-1 and mean MAE over the folds
    residual: bool = True  # forecast the change from the latest target value (when the target is an input)
    dropout: float = 0.3  # dropout on the LSTM output before the head (and between layers when L > 1)
    highway: bool = True  # a linear path from the inputs to the outputs beside the LSTM (LSTNet's highway)
    highway_lags: int = 1  # P: the highway reads the last P steps (their P - 1 past steps ride in the state)
    highway_init: bool = False  # start the highway at the ridge solution on the training part and the head at zero
    ensemble: int = 5  # K members (seeds seed..seed+K-1) exported as one LSTM of hidden size K*H (model/ensemble.py)
    # --- optimisation ---
    loss: str = "l1"  # training loss in scaled units: mse, l1 or huber (l1: the MAE that forecasts are judged by)
    batch_size: int = 32  # windows per optimiser step
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    max_epochs: int = 80  # upper bound on passes over the training windows
    min_epochs: int = 5  # keep no checkpoint before this epoch (epoch-1 weights can fit validation by luck)
    patience: int = 25  # stop after this many epochs without a better validation loss
    grad_clip: float = 1.0  # clip the global gradient norm to this value
    seed: int = 1337  # seeds python, numpy and torch: the same config gives the same model
    threads: int = 2  # torch intra-op threads
    require_beats_persistence: bool = True  # fail the run if the test MAE (mean over horizon) is not below persistence
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into the model card

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy (tuples become lists)."""
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Rebuild a config from `to_dict` output."""
        d = dict(d)
        d["features"] = tuple(d["features"])
        return cls(**d)
