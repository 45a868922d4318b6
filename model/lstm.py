"""The forecaster: an LSTM over raw-unit inputs with a linear head, scaling inside the module."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from model.config import Z_MAX


@dataclass(frozen=True)
class ModelArgs:
    """What it takes to rebuild the network (stored in every checkpoint)."""

    n_features: int  # F
    hidden_size: int  # H
    num_layers: int  # L
    horizon: int  # O: outputs per time step
    dropout: float = 0.0
    residual_index: int = -1  # >= 0: forecast the change from input feature `residual_index` (the target's own column)
    highway: bool = False  # a linear path from the step's (scaled) inputs to the outputs, beside the LSTM (LSTNet)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LSTMForecaster(nn.Module):
    """Scaled-space LSTM: z = (x - mean) / std -> LSTM -> Linear -> p; y = p * y_std + y_mean (+ x[target]).

    With `residual_index` set, the network forecasts the change from the latest observed target value
    (persistence is its starting point) and the scaler describes that change.

    The scaler lives in buffers so that the exported graph takes and returns raw units.
    """

    x_mean: Tensor  # [F] buffers, registered in __init__
    x_std: Tensor  # [F]
    y_mean: Tensor  # []
    y_std: Tensor  # []

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.lstm = nn.LSTM(
            input_size=args.n_features,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            batch_first=True,
            dropout=args.dropout if args.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(args.dropout)
        self.head = nn.Linear(args.hidden_size, args.horizon)
        self.skip = nn.Linear(args.n_features, args.horizon) if args.highway else None
        self.register_buffer("x_mean", torch.zeros(args.n_features))
        self.register_buffer("x_std", torch.ones(args.n_features))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))

    def set_scaler(self, x_mean: Tensor, x_std: Tensor, y_mean: float, y_std: float) -> None:
        """Install the training-set scaler (raw units in and out from then on)."""
        self.x_mean.copy_(x_mean)
        self.x_std.copy_(x_std)
        self.y_mean.fill_(y_mean)
        self.y_std.fill_(y_std)

    def zero_state(self, batch: int) -> tuple[Tensor, Tensor]:
        """Return zero (h0, c0), each [L, B, H]."""
        shape = (self.args.num_layers, batch, self.args.hidden_size)
        return torch.zeros(shape), torch.zeros(shape)

    def forward_scaled(self, z: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scaled in, scaled out (used by training): z [B, T, F] -> ([B, T, O], hn, cn)."""
        out, (hn, cn) = self.lstm(z, (h0, c0))  # out: [B, T, H]
        y = self.head(self.drop(out))  # [B, T, O]
        return (y if self.skip is None else y + self.skip(z)), hn, cn

    def base(self, x: Tensor) -> Tensor:
        """What the scaled output is added to: the current target value (residual) or zero, [B, T, 1]."""
        k = self.args.residual_index
        if k < 0:
            return torch.zeros_like(x[..., :1])
        reach = Z_MAX * self.x_std[k]
        return x[..., k : k + 1].clamp(self.x_mean[k] - reach, self.x_mean[k] + reach)

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw units in and out: x [B, T, F], h0/c0 [L, B, H] -> y [B, T, O], hn, cn."""
        z = ((x - self.x_mean) / self.x_std).clamp(-Z_MAX, Z_MAX)
        y, hn, cn = self.forward_scaled(z, h0, c0)
        return y * self.y_std + self.y_mean + self.base(x), hn, cn
