"""The default model shipped in models/seattle-weather/1 loads, describes itself and beats the baselines."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from model.baselines import RidgeAR, persistence
from model.data import Scaler, Split, default_csv_path, forecast_origins, future_targets, load_csv
from model.evaluate import scores
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
    """Recomputed from the ONNX file on the real data (not re-read from model.json): the test MAE at horizon 1
    and over the horizon equals the recorded one, and is below persistence and ridge on the same origins."""
    card = json.loads((SHIPPED_MODEL / "model.json").read_text())
    cfg, split = card["training"], card["dataset"]["split"]
    series = load_csv(default_csv_path(), card["target"], tuple(card["features"]), cfg["time_col"])
    origins = forecast_origins(
        Split(series.values.shape[0], split["train"][1], split["validation"][1]), card["horizon"], cfg["context"]
    )
    assert len(origins) == card["dataset"]["test_origins"]
    actual = future_targets(series.target_values, card["horizon"])[origins]
    sess = ort.InferenceSession(str(SHIPPED_MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    xs = np.stack([series.values[t - cfg["context"] + 1 : t + 1] for t in origins]).astype(np.float32)
    zeros = np.zeros((card["num_layers"], len(origins), card["hidden_size"]), np.float32)
    y, _, _ = sess.run(None, {"x": xs, "h0": zeros, "c0": zeros})
    lstm = scores(np.asarray(y)[:, -1, :], actual)
    naive = scores(persistence(series.target_values, origins, card["horizon"]), actual)
    train_end = split["train"][1]
    scaled = Scaler.fit(series.values[:train_end], series.target_values[:train_end]).transform(series.values)
    ridge_model = RidgeAR(cfg["ar_lags"], card["horizon"], cfg["ridge_alpha"])
    ridge = scores(ridge_model.fit(scaled, series.target_values, train_end).predict(scaled, origins), actual)
    recorded = card["metrics"]["test"]
    for metric in ("mae_h1", "mae_mean"):
        for name, got in (("lstm", lstm), ("persistence", naive), ("ridge", ridge)):
            assert abs(got[metric] - recorded[name][metric]) < 1e-3, (name, metric, got[metric])
        assert lstm[metric] < naive[metric], metric
        assert lstm[metric] < ridge[metric], metric


def test_shipped_model_forecasts_in_raw_units() -> None:
    """Fed a mild Seattle summer week in raw units, the model forecasts plausible temp_max values."""
    sess = ort.InferenceSession(str(SHIPPED_MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    card = ModelCard.from_json((SHIPPED_MODEL / "model.json").read_text())
    x = np.tile(np.array([[0.0, 24.0, 14.0, 3.0]], np.float32), (14, 1))[None]
    zeros = np.zeros((card.num_layers, 1, card.hidden_size), np.float32)
    y, _, _ = sess.run(None, {"x": x, "h0": zeros, "c0": zeros})
    assert y.shape == (1, 14, 7)
    assert 15.0 < float(y[0, -1].mean()) < 33.0


def test_readme_reports_the_shipped_backtest_and_test_scores_as_recorded() -> None:
    """The README's model tables are the numbers in model.json and backtest.json (make backtest), not typed in."""
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The shipped model") : readme.index("## Train your own model")]
    card = json.loads((SHIPPED_MODEL / "model.json").read_text())
    test = card["metrics"]["test"]
    assert f"| LSTM ensemble (shipped) | {test['lstm']['mae_h1']:.2f} | {test['lstm']['mae_mean']:.2f} |" in section
    assert f"| {test['ridge']['mae_h1']:.2f} | {test['ridge']['mae_mean']:.2f} |" in section
    assert card["metrics"]["ensemble"]["members"] == 5
    result = json.loads((SHIPPED_MODEL / "backtest.json").read_text())
    for f in result["folds"]:
        cells = " | ".join(f"{f[m]['mae_h1']:.2f} / {f[m]['mae_mean']:.2f}" for m in ("lstm", "persistence", "ridge"))
        start, end = (d.replace("/", "-") for d in f["test_period"])
        assert f"| {f['fold']} | {start} to {end} | {cells} |" in section
    s = result["summary"]
    cells = " | ".join(
        f"{s[m]['mae_h1']['mean']:.2f} / {s[m]['mae_mean']['mean']:.2f}" for m in ("lstm", "persistence", "ridge")
    )
    assert f"| mean over folds | | {cells} |" in section
