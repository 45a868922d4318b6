"""Training smoke tests: a tiny run produces a loadable, self-describing model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model.baselines import RidgeAR, seasonal_naive
from model.cli import add_train_arguments, config_from_args
from model.config import TrainConfig
from model.data import DataError, csv_path
from model.export import load_checkpoint, rebuild
from model.lstm import LSTMForecaster, ModelArgs
from model.train import TrainingFailedError, init_highway, predict_at_origins, prepare
from service.card import CARD_KEY, ModelCard
from service.cli import build_parser, main
from tests.model.conftest import TINY, tiny_checkpoint


def test_tiny_training_exports_a_model_onnxruntime_loads(tiny_repo: Path, tiny_ckpt: dict[str, Any]) -> None:
    """The exported graph has the explicit-state contract, dynamic B and T, and a valid card inside."""
    path = tiny_repo / "tiny" / "1" / "model.onnx"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    card = ModelCard.from_json({p.key: p.value for p in proto.metadata_props}[CARD_KEY])
    assert card == ModelCard.from_json((path.parent / "model.json").read_text())
    assert card.features == ["precipitation", "temp_max", "temp_min", "wind"]
    assert card.horizon == 7
    assert card.hidden_size == 8
    assert card.num_layers == 2
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x", "h0", "c0"]
    assert [o.name for o in sess.get_outputs()] == ["y", "hn", "cn"]
    assert sess.get_inputs()[0].shape == ["B", "T", 4]
    for b, t in [(1, 1), (3, 17)]:
        y, hn, cn = sess.run(
            None,
            {
                "x": np.full((b, t, 4), 10, np.float32),
                "h0": np.zeros((2, b, 8), np.float32),
                "c0": np.zeros((2, b, 8), np.float32),
            },
        )
        assert y.shape == (b, t, 7)
        assert hn.shape == cn.shape == (2, b, 8)
        assert np.isfinite(y).all()


def test_checkpoint_alone_rebuilds_the_model(tiny_ckpt: dict[str, Any], tmp_path: Path) -> None:
    """A saved checkpoint reloads (weights_only) and rebuilds the same network with nothing else."""
    torch.save(tiny_ckpt, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    a, b = rebuild(tiny_ckpt), rebuild(loaded)
    x = torch.randn(2, 5, 4) * 5 + 10
    h, c = a.zero_state(2)
    with torch.no_grad():
        torch.testing.assert_close(a(x, h, c)[0], b(x, h, c)[0])
    assert loaded["config"]["hidden_size"] == 8
    assert "scaler" in loaded
    assert "metrics" in loaded


def test_training_is_reproducible_with_a_seed() -> None:
    """Two runs with the same config give identical weights and metrics."""
    a, b = tiny_checkpoint(max_epochs=1), tiny_checkpoint(max_epochs=1)
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0)
    assert a["metrics"]["test"] == b["metrics"]["test"]


def test_training_fails_clearly_when_it_does_not_beat_persistence() -> None:
    """An untrained model (one tiny epoch at a tiny learning rate) is refused with advice."""
    with pytest.raises(TrainingFailedError, match="does not beat persistence"):
        tiny_checkpoint(max_epochs=1, lr=1e-6, require_beats_persistence=True)


def test_train_command_on_a_custom_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lstm-serve train --csv` trains on any CSV and writes the repository layout with a report."""
    rng = np.random.default_rng(0)
    t = np.arange(400)
    load = 50 + 10 * np.sin(2 * np.pi * t / 24) + rng.normal(0, 1, t.size)
    temp = 15 + 5 * np.sin(2 * np.pi * (t - 3) / 24)
    lines = ["hour,load,temp"] + [f"{i},{a:.3f},{b:.3f}" for i, a, b in zip(t, load, temp, strict=True)]
    (tmp_path / "power.csv").write_text("\n".join(lines) + "\n")
    rc = main(
        [
            "train",
            "--csv",
            str(tmp_path / "power.csv"),
            "--target",
            "load",
            "--time-col",
            "hour",
            "--horizon",
            "3",
            "--window",
            "24",
            "--context",
            "24",
            "--hidden-size",
            "8",
            "--epochs",
            "3",
            "--no-progress",
            "--allow-worse",
            "--models",
            str(tmp_path / "models"),
            "--checkpoint",
            str(tmp_path / "ckpt.pt"),
        ]
    )
    assert rc == 0
    out = tmp_path / "models" / "power" / "1"
    card = json.loads((out / "model.json").read_text())
    assert card["features"] == ["load", "temp"]
    assert card["target"] == "load"
    assert card["horizon"] == 3
    assert (out / "model.onnx").stat().st_size > 0
    assert (out / "report.png").stat().st_size > 0
    assert main(["export", str(tmp_path / "ckpt.pt"), "--models", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "power" / "1" / "model.onnx").is_file()


def test_train_command_reports_data_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad cell makes `lstm-serve train` exit 1 with the line and column, not a traceback."""
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    assert main(["train", "--csv", str(tmp_path / "bad.csv"), "--target", "b", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "line 3, column 'b': 'x' is not a number" in err
    assert "Traceback" not in err
    assert main(["train", "--csv", str(tmp_path / "bad.csv"), "--no-progress"]) == 2
    assert "--csv needs --target" in capsys.readouterr().err


def test_help_explains_every_train_flag() -> None:
    """Every flag of `lstm-serve train` has help text."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    train_parser = sub.choices["train"]  # type: ignore[attr-defined]
    for action in train_parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
    import argparse

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    cfg = config_from_args(p.parse_args([]))
    assert cfg.features == ("precipitation", "temp_max", "temp_min", "wind")
    assert cfg.time_col == "date"


def test_highway_init_starts_the_model_at_the_ridge_autoregression_on_the_same_lags() -> None:
    """With `highway_init`, before any training the exported forecaster is exactly the ridge fit (here with no
    penalty: least squares) on the last P steps, and the LSTM adds nothing yet."""
    cfg = TrainConfig(**{**TINY, "residual": True, "highway": True, "highway_lags": 5, "ridge_alpha": 0.0})
    data = prepare(cfg)
    net = LSTMForecaster(
        ModelArgs(len(data.series.features), 8, 2, cfg.horizon, 0.0, data.residual_index, True, cfg.highway_lags)
    )
    sc = data.scaler
    net.set_scaler(torch.from_numpy(sc.mean), torch.from_numpy(sc.std), sc.target_mean, sc.target_std)
    init_highway(net, data, cfg.ridge_alpha)
    got = predict_at_origins(net, data.series.values, data.origins, cfg.context)
    ridge = RidgeAR(cfg.highway_lags, cfg.horizon, 0.0).fit(
        sc.transform(data.series.values), data.series.target_values, data.split.train_end
    )
    want = ridge.predict(sc.transform(data.series.values), data.origins)
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_seasonal_naive_repeats_the_value_one_season_earlier() -> None:
    target = np.arange(100, dtype=np.float32)
    got = seasonal_naive(target, np.array([30, 50]), horizon=5, period=3)
    # step k of origin t: target[t + k - 3 * ceil(k / 3)]
    np.testing.assert_array_equal(got, [[28, 29, 30, 28, 29], [48, 49, 50, 48, 49]])
    with pytest.raises(ValueError, match="history"):
        seasonal_naive(target, np.array([1]), horizon=5, period=3)
    # NOTE: a horizon past one season reads no further back than one season
    np.testing.assert_array_equal(seasonal_naive(target, np.array([2]), horizon=4, period=3), [[0, 1, 2, 0]])


def test_a_highway_longer_than_the_training_window_is_refused_before_training() -> None:
    with pytest.raises(DataError, match=r"highway_lags \(20\) must be at most window \(16\)"):
        prepare(TrainConfig(**{**TINY, "highway": True, "highway_lags": 20, "context": 20}))


def test_csv_vega_prefix_names_a_file_shipped_in_vega_datasets() -> None:
    assert csv_path("vega:seattle-temps.csv").name == "seattle-temps.csv"
    assert csv_path("vega:seattle-temps.csv").is_file()
    with pytest.raises(DataError, match=r"seattle-weather\.csv"):
        csv_path("vega:no-such.csv")  # NOTE: the error lists the files there are


FINGERPRINT = """
import hashlib, json, os, sys
from model.config import TrainConfig
from model.train import train
cfg = TrainConfig(**{**json.loads(sys.argv[1]), "threads": 2})
ckpt = train(cfg, progress=False, log=lambda *_: None)
weights = b"".join(v.numpy().tobytes() for v in ckpt["state_dict"].values())
print(os.environ["MKL_CBWR"], hashlib.sha256(weights).hexdigest())
"""


def test_training_runs_one_cpu_independent_code_path_so_a_seed_gives_the_same_model_everywhere() -> None:
    """The package pins MKL to its COMPATIBLE path before torch runs (unpinned, MKL picks kernels by CPU and
    their rounding moves the shipped ensemble's test MAE by 0.03 between hosts); ATen's AVX2 kernels, as an
    older x86 machine runs them, train the same weights as this machine's best."""
    import os
    import subprocess
    import sys

    small = json.dumps({**TINY, "hidden_size": 16, "num_layers": 1, "max_epochs": 2, "window": 32, "context": 32})

    def fingerprint(**env: str) -> str:
        base = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY")}
        out = subprocess.run(
            [sys.executable, "-c", FINGERPRINT, small], env={**base, **env}, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()

    pinned = fingerprint()
    assert pinned.startswith("COMPATIBLE ")
    # NOTE: COMPATIBLE set before the process starts, when MKL surely reads it: the package's pin took effect
    assert fingerprint(MKL_CBWR="COMPATIBLE") == pinned
    assert fingerprint(ATEN_CPU_CAPABILITY="avx2") == pinned
