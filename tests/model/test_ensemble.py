"""Ensembles exported as one LSTM: the exported graph equals the mean of the K members trained alone (whole
sequence and step by step with the state carried), and the NumPy reference agrees with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model.export import export_checkpoint, rebuild
from model.reference import NumpyLSTM
from tests.model.conftest import tiny_checkpoint

ATOL = 1e-5
K = 3
SHAPE = {"num_layers": 2, "residual": True, "hidden_size": 6, "highway": True, "highway_lags": 3}
DELAY = 2 * 4  # NOTE: the highway's delay line, (P - 1) * F units of state after the members' K * H


@pytest.fixture(scope="module")
def ensemble_ckpt() -> dict[str, Any]:
    return tiny_checkpoint(name="tiny-ensemble", ensemble=K, **SHAPE)


@pytest.fixture(scope="module")
def members() -> list[Any]:
    """The K members, each trained alone with its own seed, as the ensemble trains them."""
    return [rebuild(tiny_checkpoint(name=f"member-{k}", seed=1337 + k, **SHAPE)) for k in range(K)]


def inputs(ckpt: dict[str, Any], steps: int) -> np.ndarray:
    sc = ckpt["scaler"]
    z = np.random.default_rng(3).standard_normal((2, steps, len(sc["mean"])))
    return (z * np.asarray(sc["std"]) + np.asarray(sc["mean"])).astype(np.float32)


def members_mean(members: list[Any], x: np.ndarray, chunks: list[int]) -> np.ndarray:
    """The mean forecast of the members, each fed the chunks in turn with its own state carried."""
    outs = []
    for m in members:
        h, c = m.zero_state(x.shape[0])
        ys, at = [], 0
        with torch.no_grad():
            for n in chunks:
                y, h, c = m(torch.from_numpy(x[:, at : at + n]), h, c)
                ys.append(y.numpy())
                at += n
        outs.append(np.concatenate(ys, axis=1))
    return np.mean(outs, axis=0)


def test_the_exported_ensemble_is_the_mean_of_its_members_whole_and_step_by_step(
    ensemble_ckpt: dict[str, Any], members: list[Any], tmp_path: Path
) -> None:
    a = ensemble_ckpt["model_args"]
    assert (a["hidden_size"], a["num_layers"]) == (K * SHAPE["hidden_size"], SHAPE["num_layers"])
    out = export_checkpoint(ensemble_ckpt, tmp_path, report=False)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = inputs(ensemble_ckpt, 24)
    zeros = np.zeros((a["num_layers"], 2, a["hidden_size"] + DELAY), np.float32)
    whole = sess.run(["y"], {"x": x, "h0": zeros, "c0": zeros})[0]
    np.testing.assert_allclose(whole, members_mean(members, x, [24]), atol=ATOL, rtol=0)
    h, c, ys, at = zeros, zeros, [], 0
    for n in (1, 5, 18):  # NOTE: a session's steps in uneven calls, the state carried by the server's way
        y, h, c = sess.run(["y", "hn", "cn"], {"x": x[:, at : at + n], "h0": h, "c0": c})
        ys.append(y)
        at += n
    np.testing.assert_allclose(np.concatenate(ys, axis=1), members_mean(members, x, [1, 5, 18]), atol=ATOL, rtol=0)
    ref = NumpyLSTM.from_state_dict(ensemble_ckpt["state_dict"], a["num_layers"], a["residual_index"])
    ry, _, _ = ref.forward(x, zeros, zeros)
    np.testing.assert_allclose(whole, ry, atol=ATOL, rtol=0)


def test_the_ensemble_checkpoint_records_every_member(ensemble_ckpt: dict[str, Any]) -> None:
    e = ensemble_ckpt["metrics"]["ensemble"]
    assert (e["members"], e["member_hidden_size"], e["member_seeds"]) == (K, SHAPE["hidden_size"], [1337, 1338, 1339])
    assert len(e["member_test"]) == K
    assert all(m["mae_mean"] > 0 for m in e["member_test"])
