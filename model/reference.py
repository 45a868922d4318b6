"""A NumPy LSTM written from the gate equations: the project's statement of the math.

For each layer, with x_t the input and (h, c) the state (PyTorch's gate order i, f, g, o):

    i = sigmoid(W_ii x_t + b_ii + W_hi h + b_hi)      input gate
    f = sigmoid(W_if x_t + b_if + W_hf h + b_hf)      forget gate
    g = tanh   (W_ig x_t + b_ig + W_hg h + b_hg)      candidate cell
    o = sigmoid(W_io x_t + b_io + W_ho h + b_ho)      output gate
    c_t = f * c + i * g
    h_t = o * tanh(c_t)

The output of layer l is the input of layer l + 1; the head is y_t = W h_t + b on the last layer,
plus an optional highway V [z_{t-P+1}, ..., z_t] + a over the last P scaled inputs (whose P - 1
earlier steps ride in layer 0's h after the LSTM's units: the delay line), and the scaler maps raw
units in and out (optionally the output is a change added to the latest observed target value).
Tests use this as a third implementation beside PyTorch and ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model.config import Z_MAX

F64 = NDArray[np.float64]


def sigmoid(v: F64) -> F64:
    # NOTE: the same function as 1 / (1 + exp(-v)), without exp overflowing (and warning) for v below -709
    return 0.5 * (1.0 + np.tanh(0.5 * v))


@dataclass
class LayerWeights:
    """One layer: W_ih [4H, in], W_hh [4H, H], b_ih [4H], b_hh [4H], gate blocks in order i, f, g, o."""

    w_ih: F64
    w_hh: F64
    b_ih: F64
    b_hh: F64


class NumpyLSTM:
    """Stacked LSTM + linear head + scaler, in float64, one time step at a time."""

    def __init__(
        self,
        layers: list[LayerWeights],
        head_w: F64,
        head_b: F64,
        x_mean: F64,
        x_std: F64,
        y_mean: float,
        y_std: float,
        residual_index: int = -1,
        skip: tuple[F64, F64] | None = None,
    ) -> None:
        self.layers = layers
        self.skip = skip  # the highway's [O, P * F] weight and [O] bias, if the model has one
        self.head_w, self.head_b = head_w, head_b  # [O, H], [O]
        self.x_mean, self.x_std = x_mean, x_std
        self.y_mean, self.y_std = y_mean, y_std
        self.hidden_size = layers[0].w_hh.shape[1]  # the LSTM's units; the state may be wider (the delay line)
        self.lags = 1 if skip is None else skip[0].shape[1] // x_mean.shape[0]  # P, steps the highway reads
        self.residual_index = residual_index  # >= 0: the output is a change from this input column

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any], num_layers: int, residual_index: int = -1) -> NumpyLSTM:
        """Build from a PyTorch `LSTMForecaster.state_dict()` (tensors or arrays)."""

        def a(key: str) -> F64:
            v = sd[key]
            return np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float64)

        layers = [
            LayerWeights(
                a(f"lstm.weight_ih_l{k}"), a(f"lstm.weight_hh_l{k}"), a(f"lstm.bias_ih_l{k}"), a(f"lstm.bias_hh_l{k}")
            )
            for k in range(num_layers)
        ]
        return cls(
            layers,
            a("head.weight"),
            a("head.bias"),
            a("x_mean"),
            a("x_std"),
            float(a("y_mean")),
            float(a("y_std")),
            residual_index,
            (a("skip.weight"), a("skip.bias")) if "skip.weight" in sd else None,
        )

    def cell(self, layer: LayerWeights, x_t: F64, h: F64, c: F64) -> tuple[F64, F64]:
        """One step of one layer for a batch: x_t [B, in], h/c [B, H] -> (h_t, c_t)."""
        gates = x_t @ layer.w_ih.T + layer.b_ih + h @ layer.w_hh.T + layer.b_hh  # [B, 4H]
        i, f, g, o = np.split(gates, 4, axis=1)
        i, f, g, o = sigmoid(i), sigmoid(f), np.tanh(g), sigmoid(o)
        c_t = f * c + i * g
        h_t = o * np.tanh(c_t)
        return h_t, c_t

    def forward(self, x: F64, h0: F64, c0: F64) -> tuple[F64, F64, F64]:
        """x [B, T, F] raw, h0/c0 [L, B, H (+ delay line)] -> y [B, T, O] raw, hn, cn (the ONNX graph's contract)."""
        hidden, f = self.hidden_size, self.x_mean.shape[0]
        h, c = np.array(h0, dtype=np.float64), np.array(c0, dtype=np.float64)
        z = np.clip((np.asarray(x, dtype=np.float64) - self.x_mean) / self.x_std, -Z_MAX, Z_MAX)
        past = [h[0, :, hidden + p * f : hidden + (p + 1) * f].copy() for p in range(self.lags - 1)]  # oldest first
        ys = []
        for t in range(z.shape[1]):
            inp = z[:, t, :]
            for k, layer in enumerate(self.layers):
                h[k, :, :hidden], c[k, :, :hidden] = self.cell(layer, inp, h[k, :, :hidden], c[k, :, :hidden])
                inp = h[k, :, :hidden]
            y_t = inp @ self.head_w.T + self.head_b
            if self.skip is not None:
                window = np.concatenate([*past, z[:, t, :]], axis=1)  # [B, P * F], oldest step first
                y_t = y_t + window @ self.skip[0].T + self.skip[1]
                past = [*past[1:], z[:, t, :]] if past else []
            ys.append(y_t)
        h[:, :, hidden:], c[:, :, hidden:] = 0.0, 0.0
        if past:
            h[0, :, hidden:] = np.concatenate(past, axis=1)
        y = np.stack(ys, axis=1) * self.y_std + self.y_mean
        if self.residual_index >= 0:
            k = self.residual_index
            reach = Z_MAX * self.x_std[k]
            base = np.clip(
                np.asarray(x, dtype=np.float64)[:, :, k : k + 1], self.x_mean[k] - reach, self.x_mean[k] + reach
            )
            y = y + base
        return y, h, c
