"""The shipped models (the default daily one in models/seattle-weather/1, the hourly one in models/seattle-temps/1)
load, describe themselves and beat the baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from model.baselines import RidgeAR, persistence, seasonal_naive
from model.data import Scaler, Split, default_csv_path, forecast_origins, future_targets, load_csv
from model.evaluate import scores
from service.card import CARD_KEY, ModelCard
from tests.conftest import ROOT, SHIPPED_MODEL

HOURLY_MODEL = ROOT / "models" / "seattle-temps" / "1"


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


def test_hourly_model_card_says_how_its_state_splits() -> None:
    """The hourly model's state is its LSTM's units, then the highway's delay line of 47 past hours."""
    card = ModelCard.from_json((HOURLY_MODEL / "model.json").read_text())
    assert (card.name, card.target, card.horizon, card.features) == ("seattle-temps", "temp", 24, ["temp"])
    extra = card.model_extra or {}
    assert (extra["lstm_hidden_size"], extra["highway_lags"]) == (48, 48)
    assert card.hidden_size == 48 + 47
    sess = ort.InferenceSession(str(HOURLY_MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[1].shape == [card.num_layers, "B", card.hidden_size]


@pytest.mark.parametrize("model_dir", [SHIPPED_MODEL, HOURLY_MODEL], ids=["daily", "hourly"])
def test_shipped_models_beat_every_baseline_at_step_1_and_on_average(model_dir: Path) -> None:
    """Recomputed from the ONNX file on the real data (not re-read from model.json): the test MAE at step 1
    and over the horizon equals the recorded one, and is below persistence, ridge and (hourly: same hour
    yesterday) the seasonal naive forecast on the same origins."""
    card = json.loads((model_dir / "model.json").read_text())
    cfg, split = card["training"], card["dataset"]["split"]
    csv = default_csv_path(card["dataset"]["source"].split()[0].rsplit("/", 1)[-1])
    series = load_csv(csv, card["target"], tuple(card["features"]), cfg["time_col"])
    origins = forecast_origins(
        Split(series.values.shape[0], split["train"][1], split["validation"][1]), card["horizon"], cfg["context"]
    )
    assert len(origins) == card["dataset"]["test_origins"]
    actual = future_targets(series.target_values, card["horizon"])[origins]
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    xs = np.stack([series.values[t - cfg["context"] + 1 : t + 1] for t in origins]).astype(np.float32)
    zeros = np.zeros((card["num_layers"], len(origins), card["hidden_size"]), np.float32)
    y, _, _ = sess.run(None, {"x": xs, "h0": zeros, "c0": zeros})
    lstm = scores(np.asarray(y)[:, -1, :], actual)
    naive = scores(persistence(series.target_values, origins, card["horizon"]), actual)
    train_end = split["train"][1]
    scaled = Scaler.fit(series.values[:train_end], series.target_values[:train_end]).transform(series.values)
    ridge_model = RidgeAR(cfg["ar_lags"], card["horizon"], cfg["ridge_alpha"])
    ridge = scores(ridge_model.fit(scaled, series.target_values, train_end).predict(scaled, origins), actual)
    baselines = {"persistence": naive, "ridge": ridge}
    if cfg.get("season", 0) > 0:
        seasonal = seasonal_naive(series.target_values, origins, card["horizon"], cfg["season"])
        baselines["seasonal"] = scores(seasonal, actual)
    assert (model_dir == HOURLY_MODEL) == ("seasonal" in baselines)
    recorded = card["metrics"]["test"]
    for metric in ("mae_h1", "mae_mean"):
        for name, got in (("lstm", lstm), *baselines.items()):
            assert abs(got[metric] - recorded[name][metric]) < 1e-3, (name, metric, got[metric])
        for name, got in baselines.items():
            assert lstm[metric] < got[metric], (name, metric)


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


def test_readme_reports_the_hourly_model_as_recorded() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Hourly: `seattle-temps`") : readme.index("## Train your own model")]
    test = json.loads((HOURLY_MODEL / "model.json").read_text())["metrics"]["test"]
    for name in ("lstm", "persistence", "seasonal", "ridge"):
        assert f"| {test[name]['mae_h1']:.3f} | {test[name]['mae_mean']:.3f} |" in section, name


def test_readme_reports_the_hourly_backtest_as_recorded() -> None:
    from model.backtest import table

    readme = (ROOT / "README.md").read_text()
    assert table(json.loads((HOURLY_MODEL / "backtest.json").read_text())) in readme


def test_readme_reports_the_seed_spread_as_recorded() -> None:
    from model.seeds import table

    readme = (ROOT / "README.md").read_text()
    assert table(json.loads((SHIPPED_MODEL / "seeds.json").read_text())) in readme
