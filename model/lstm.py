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
    highway: bool = False  # a linear path from the (scaled) inputs to the outputs, beside the LSTM (LSTNet)
    highway_lags: int = 1  # P: the highway reads the last P steps' inputs (an autoregression inside the graph)

    @property
    def delay_width(self) -> int:
        """State units that hold the highway's delay line: the P - 1 previous steps' scaled inputs."""
        return (self.highway_lags - 1) * self.n_features if self.highway else 0

    @property
    def state_size(self) -> int:
        """Width of h and c in the exported contract: the LSTM's units, then the delay line."""
        return self.hidden_size + self.delay_width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LSTMForecaster(nn.Module):
    """Scaled-space LSTM: z = (x - mean) / std -> LSTM -> Linear -> p; y = p * y_std + y_mean (+ x[target]).

    With `residual_index` set, the network forecasts the change from the latest observed target value
    (persistence is its starting point) and the scaler describes that change. With `highway`, a linear map of
    the last `highway_lags` steps of z is added to p (LSTNet's autoregressive highway). Its window of past
    inputs travels in the state, so a session needs nothing but (h, c): units [0, H) of h and c are the
    LSTM's; units [H, H + (P - 1) * F) of layer 0's h hold the previous P - 1 steps of z, oldest first (a
    zero state reads as P - 1 steps at the training mean); every other extra unit is zero.

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
        # NOTE: weight [O, P * F], column p * F + f reads feature f of the p-th oldest of the last P steps
        self.skip = nn.Linear(args.highway_lags * args.n_features, args.horizon) if args.highway else None
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
        """Return zero (h0, c0), each [L, B, H + delay line]."""
        shape = (self.args.num_layers, batch, self.args.state_size)
        return torch.zeros(shape), torch.zeros(shape)

    def forward_scaled(self, z: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scaled in, scaled out (used by training): z [B, T, F] -> ([B, T, O], hn, cn)."""
        a = self.args
        if a.delay_width == 0:
            out, (hn, cn) = self.lstm(z, (h0, c0))  # out: [B, T, H]
            y = self.head(self.drop(out))  # [B, T, O]
            return (y if self.skip is None else y + self.skip(z)), hn, cn
        assert self.skip is not None
        h, lags, f = a.hidden_size, a.highway_lags, a.n_features
        out, (hn, cn) = self.lstm(z, (h0[..., :h].contiguous(), c0[..., :h].contiguous()))
        y = self.head(self.drop(out))
        u = torch.cat([h0[0, :, h:].reshape(-1, lags - 1, f), z], dim=1)  # [B, P - 1 + T, F]: the delay line, then z
        w = self.skip.weight.view(a.horizon, lags, f).transpose(1, 2)  # [O, F, P]
        y = y + nn.functional.conv1d(u.transpose(1, 2), w, self.skip.bias).transpose(1, 2)
        delay = u[:, -(lags - 1) :, :].reshape(1, -1, a.delay_width)  # the last P - 1 steps: the next delay line
        extra = torch.cat([delay, torch.zeros_like(h0[1:, :, h:])], dim=0)
        return y, torch.cat([hn, extra], dim=2), torch.cat([cn, torch.zeros_like(c0[..., h:])], dim=2)

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
