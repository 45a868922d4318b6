"""Export your own PyTorch LSTM or GRU with explicit state, so that `lstm-serve serve` can run it.

Nothing here comes from lstm-serve: this is the script a user already has, plus the one `torch.onnx.export` call
that gives the graph the explicit-state contract (inputs x, h0[, c0]; outputs y, hn[, cn]; B and T dynamic).

    python examples/export_your_own.py --out my-models/my-lstm/1/model.onnx            # an LSTM
    python examples/export_your_own.py --cell gru --out my-models/my-gru/1/model.onnx  # a GRU
    lstm-serve serve --models my-models
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn


class Forecaster(nn.Module):
    """A plain recurrent forecaster: an LSTM (or GRU) and a linear head on every step."""

    def __init__(self, features: int, outputs: int, hidden: int, layers: int, cell: str = "lstm") -> None:
        super().__init__()
        self.cell = cell
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(features, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor | None = None) -> tuple[Tensor, ...]:
        if self.cell == "lstm":
            y, (hn, cn) = self.rnn(x, (h0, c0))
            return self.head(y), hn, cn
        y, hn = self.rnn(x, h0)
        return self.head(y), hn


def export(model: Forecaster, path: Path) -> None:
    """The explicit-state contract: x [B, T, F], h0 and c0 [L, B, H] -> y [B, T, O], hn, cn; B and T dynamic."""
    rnn = model.rnn
    x = torch.zeros(2, 3, rnn.input_size)
    h0 = torch.zeros(rnn.num_layers, 2, rnn.hidden_size)
    lstm = model.cell == "lstm"
    states_in, states_out = (["h0", "c0"], ["hn", "cn"]) if lstm else (["h0"], ["hn"])
    axes = {"x": {0: "B", 1: "T"}, "y": {0: "B", 1: "T"}, **{n: {1: "B"} for n in states_in + states_out}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NOTE: the TorchScript exporter is deprecated but emits ONNX's LSTM/GRU ops
        torch.onnx.export(
            model.eval(),
            (x, h0, torch.zeros_like(h0)) if lstm else (x, h0),
            str(path),
            dynamo=False,
            input_names=["x", *states_in],
            output_names=["y", *states_out],
            dynamic_axes=axes,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where to write model.onnx (<repo>/<name>/<version>/)")
    p.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    p.add_argument("--features", type=int, default=4)
    p.add_argument("--outputs", type=int, default=7)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)  # NOTE: random weights here; train your model before you export it
    export(Forecaster(a.features, a.outputs, a.hidden, a.layers, a.cell), a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
