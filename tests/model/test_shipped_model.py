"""The default model shipped in models/seattle-weather/1 loads, describes itself and beats the baselines."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from service.card import CARD_KEY, ModelCard
from tests.conftest import SHIPPED_MODEL


def test_shipped_model_card_validates_and_matches_model_json() -> None:
    """The card inside the ONNX file is valid and equals model.json beside it."""
    proto = onnx.load(str(SHIPPED_MODEL / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    inside = ModelCard.from_json({p.key: p.value for p in proto.metadata_props}[CARD_KEY])
    beside = ModelCard.from_json((SHIPPED_MODEL / "model.json").read_text())
    assert inside == beside
    assert (inside.name, inside.version, inside.target, inside.horizon) == ("seattle-weather", 1, "temp_max", 7)
    assert inside.features == ["precipitation", "temp_max", "temp_min", "wind"]
    for key in ("torch", "onnx", "opset"):
        assert key in inside.versions
    assert (SHIPPED_MODEL / "report.png").stat().st_size > 10_000


def test_shipped_model_beats_both_baselines_at_horizon_1_and_on_average() -> None:
    """The recorded test MAE is below persistence and ridge, at horizon 1 and averaged over the horizon."""
    test = json.loads((SHIPPED_MODEL / "model.json").read_text())["metrics"]["test"]
    for metric in ("mae_h1", "mae_mean"):
        assert test["lstm"][metric] < test["persistence"][metric], metric
        assert test["lstm"][metric] < test["ridge"][metric], metric


def test_shipped_model_forecasts_in_raw_units() -> None:
    """Fed a mild Seattle summer week in raw units, the model forecasts plausible temp_max values."""
    sess = ort.InferenceSession(str(SHIPPED_MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    card = ModelCard.from_json((SHIPPED_MODEL / "model.json").read_text())
    x = np.tile(np.array([[0.0, 24.0, 14.0, 3.0]], np.float32), (14, 1))[None]
    zeros = np.zeros((card.num_layers, 1, card.hidden_size), np.float32)
    y, _, _ = sess.run(None, {"x": x, "h0": zeros, "c0": zeros})
    assert y.shape == (1, 14, 7)
    assert 15.0 < float(y[0, -1].mean()) < 33.0
