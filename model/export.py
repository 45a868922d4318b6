"""Export a checkpoint to ONNX with explicit state and a model card, into a model repository."""

from __future__ import annotations

import datetime as dt
import json
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from model.lstm import LSTMForecaster, ModelArgs
from service.card import CARD_KEY, CARD_SCHEMA, ModelCard

OPSET = 17


def rebuild(ckpt: dict[str, Any]) -> LSTMForecaster:
    """Rebuild the trained network from a checkpoint alone (nanoGPT style: model_args + state_dict)."""
    model = LSTMForecaster(ModelArgs(**ckpt["model_args"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def model_card(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The card that travels inside the ONNX file and beside it as model.json."""
    cfg, args, data = ckpt["config"], ckpt["model_args"], ckpt["data"]
    horizon = int(args["horizon"])
    margs = ModelArgs(**args)
    state = (
        f" The state is {margs.state_size} units wide: {margs.hidden_size} LSTM units, then (layer 0's h) the "
        f"previous {margs.highway_lags - 1} steps of scaled inputs that the linear highway reads."
        if margs.delay_width
        else ""
    )
    return {
        "schema": CARD_SCHEMA,
        "name": cfg["name"],
        "version": int(cfg["version"]),
        "description": (
            f"LSTM forecaster: at every time step, given raw values of {', '.join(data['features'])}, "
            f"forecasts {data['target']} for each of the next {horizon} steps.{state}"
        ),
        "features": list(data["features"]),
        "target": data["target"],
        "targets": [f"{data['target']}[t+{k + 1}]" for k in range(horizon)],
        "horizon": horizon,
        "hidden_size": margs.state_size,  # NOTE: the width of h and c in the contract
        "lstm_hidden_size": margs.hidden_size,
        "highway_lags": margs.highway_lags if margs.highway else 0,
        "num_layers": int(args["num_layers"]),
        "residual_index": int(args.get("residual_index", -1)),
        "inputs": {"x": "float32 [B, T, F] raw units", "h0": "float32 [L, B, H]", "c0": "float32 [L, B, H]"},
        "outputs": {"y": "float32 [B, T, O] raw units", "hn": "float32 [L, B, H]", "cn": "float32 [L, B, H]"},
        "scaler": ckpt["scaler"],
        "dataset": {k: data[k] for k in ("source", "rows", "split", "test_period", "test_origins", "context")},
        "metrics": ckpt["metrics"],
        "training": {k: cfg[k] for k in cfg if k not in {"csv", "extra"}},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def export_onnx(model: LSTMForecaster, path: Path, card: dict[str, Any]) -> None:
    """Write `x[B,T,F], h0[L,B,H], c0[L,B,H] -> y[B,T,O], hn, cn` with B and T dynamic, then check it."""
    a = model.args
    x = torch.zeros(2, 3, a.n_features)
    h0, c0 = model.zero_state(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # NOTE: the TorchScript exporter emits the native ONNX LSTM operator, which ONNX Runtime runs
        # fastest; it is deprecated in favour of the dynamo exporter, which unrolls recurrences.
        # torch is pinned in pyproject.toml, so the warnings are known and silenced here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x, h0, c0),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["x", "h0", "c0"],
            output_names=["y", "hn", "cn"],
            dynamic_axes={
                "x": {0: "B", 1: "T"},
                "h0": {1: "B"},
                "c0": {1: "B"},
                "y": {0: "B", 1: "T"},
                "hn": {1: "B"},
                "cn": {1: "B"},
            },
        )
    proto = onnx.load(str(path))
    proto.producer_name = "lstm-serve"
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, json.dumps(card, sort_keys=True)
    proto.doc_string = card["description"]
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def export_checkpoint(ckpt: dict[str, Any], repo: Path, report: bool = True) -> Path:
    """Export into `repo/<name>/<version>/` (model.onnx, model.json, report.png); return that directory."""
    card = model_card(ckpt)
    ModelCard.model_validate(card)  # NOTE: refuse to write a card that the server would not load
    out: Path = Path(repo) / card["name"] / str(card["version"])
    export_onnx(rebuild(ckpt), out / "model.onnx", card)
    (out / "model.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    if report and "report" in ckpt:
        from model.train import write_report

        write_report(ckpt, out / "report.png")
    return out


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `lstm-serve train` (plain tensors and JSON-like data only)."""
    ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt
