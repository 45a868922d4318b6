"""K members as one LSTM: block-diagonal weights (hidden size K*H, layer by layer) and a head that averages them.

The merged network is an ordinary `LSTMForecaster`, so the serving contract, batching and session state stay
as they are (the state is simply K*H wide). Member k owns hidden units [k*H, (k+1)*H) of every layer: its
input weights read the features (layer 1) or its own slice of the layer below, its recurrent weights read its
own slice, and the head is the members' heads side by side, divided by K; the highways are averaged and share one
delay line (it holds the same past inputs for every member). Scaling is linear, so averaging the
scaled outputs averages the raw forecasts; the members must share the scaler (the same training data).
"""

from __future__ import annotations

import torch

from model.lstm import LSTMForecaster, ModelArgs


def merge(members: list[LSTMForecaster]) -> LSTMForecaster:
    """One LSTMForecaster whose outputs are the mean of the members' (exactly, up to float rounding)."""
    first = members[0].args
    for m in members[1:]:
        a = m.args
        if (a.n_features, a.hidden_size, a.num_layers, a.horizon, a.residual_index, a.highway_lags) != (
            first.n_features, first.hidden_size, first.num_layers, first.horizon, first.residual_index,
            first.highway_lags,
        ):  # fmt: skip
            raise ValueError("ensemble members must have the same sizes, residual and highway settings")
        for name in ("x_mean", "x_std", "y_mean", "y_std"):
            if not torch.equal(getattr(m, name), getattr(members[0], name)):
                raise ValueError("ensemble members must share the scaler (train them on the same data)")
    k, h = len(members), first.hidden_size
    if any(m.args.highway != first.highway for m in members):
        raise ValueError("ensemble members must all have a highway, or none")
    args = ModelArgs(
        first.n_features, k * h, first.num_layers, first.horizon, 0.0, first.residual_index, first.highway,
        first.highway_lags,
    )  # fmt: skip
    out = LSTMForecaster(args)
    with torch.no_grad():
        for layer in range(first.num_layers):
            w_ih = torch.zeros_like(getattr(out.lstm, f"weight_ih_l{layer}"))  # [4KH, F or KH]
            w_hh = torch.zeros_like(getattr(out.lstm, f"weight_hh_l{layer}"))  # [4KH, KH]
            b_ih = torch.zeros_like(getattr(out.lstm, f"bias_ih_l{layer}"))
            b_hh = torch.zeros_like(getattr(out.lstm, f"bias_hh_l{layer}"))
            for j, m in enumerate(members):
                mi, mh = getattr(m.lstm, f"weight_ih_l{layer}"), getattr(m.lstm, f"weight_hh_l{layer}")
                bi, bh = getattr(m.lstm, f"bias_ih_l{layer}"), getattr(m.lstm, f"bias_hh_l{layer}")
                cols = slice(None) if layer == 0 else slice(j * h, (j + 1) * h)
                for gate in range(4):  # NOTE: PyTorch stacks the gates i, f, g, o, each H rows
                    rows = slice(gate * k * h + j * h, gate * k * h + (j + 1) * h)
                    src = slice(gate * h, (gate + 1) * h)
                    w_ih[rows, cols] = mi[src]
                    w_hh[rows, j * h : (j + 1) * h] = mh[src]
                    b_ih[rows], b_hh[rows] = bi[src], bh[src]
            getattr(out.lstm, f"weight_ih_l{layer}").copy_(w_ih)
            getattr(out.lstm, f"weight_hh_l{layer}").copy_(w_hh)
            getattr(out.lstm, f"bias_ih_l{layer}").copy_(b_ih)
            getattr(out.lstm, f"bias_hh_l{layer}").copy_(b_hh)
        out.head.weight.copy_(torch.cat([m.head.weight for m in members], dim=1) / k)
        out.head.bias.copy_(torch.stack([m.head.bias for m in members]).mean(dim=0))
        if out.skip is not None:  # NOTE: the linear paths are averaged too
            out.skip.weight.copy_(torch.stack([m.skip.weight for m in members if m.skip]).mean(dim=0))
            out.skip.bias.copy_(torch.stack([m.skip.bias for m in members if m.skip]).mean(dim=0))
        m0 = members[0]
        out.set_scaler(m0.x_mean, m0.x_std, float(m0.y_mean), float(m0.y_std))
    return out.eval()
