"""Three-way parity: the NumPy reference, PyTorch and ONNX Runtime agree, whole and step by step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model.export import export_checkpoint, rebuild
from model.lstm import ModelArgs
from model.reference import NumpyLSTM

ATOL = 1e-5


def implementations(ckpt: dict[str, Any], tmp_path: Path) -> tuple[NumpyLSTM, Any, ort.InferenceSession]:
    out = export_checkpoint(ckpt, tmp_path, report=False)
    net = rebuild(ckpt)
    ref = NumpyLSTM.from_state_dict(ckpt["state_dict"], net.args.num_layers, net.args.residual_index)
    assert ref.lags == net.args.highway_lags
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return ref, net, sess


def raw_inputs(ckpt: dict[str, Any], batch: int, steps: int, seed: int) -> np.ndarray:
    """Inputs in raw units around the training distribution."""
    sc = ckpt["scaler"]
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch, steps, len(sc["mean"])))
    return (z * np.asarray(sc["std"]) + np.asarray(sc["mean"])).astype(np.float32)


def random_state(ckpt: dict[str, Any], batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    a = ModelArgs(**ckpt["model_args"])
    rng = np.random.default_rng(seed)
    shape = (a.num_layers, batch, a.state_size)
    return (rng.uniform(-0.5, 0.5, shape).astype(np.float32), rng.uniform(-1, 1, shape).astype(np.float32))


def run_all(ref: NumpyLSTM, net: Any, sess: ort.InferenceSession, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> list:
    r = ref.forward(x, h, c)
    with torch.no_grad():
        t = [v.numpy() for v in net(torch.from_numpy(x), torch.from_numpy(h), torch.from_numpy(c))]
    o = sess.run(["y", "hn", "cn"], {"x": x, "h0": h, "c0": c})
    return [r, t, o]


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("variant", ["tiny_ckpt", "tiny_residual_ckpt", "tiny_highway_ckpt", "tiny_ar_highway_ckpt"])
def test_whole_sequence_agrees_across_numpy_torch_and_onnxruntime(
    batch: int, variant: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A whole sequence from a non-zero state gives the same y, hn and cn in all three implementations."""
    ckpt = request.getfixturevalue(variant)
    ref, net, sess = implementations(ckpt, tmp_path)
    x = raw_inputs(ckpt, batch, 30, seed=batch)
    h, c = random_state(ckpt, batch, seed=7)
    (ry, rh, rc), (ty, th, tc), (oy, oh, oc) = run_all(ref, net, sess, x, h, c)
    assert oy.shape == (batch, 30, ckpt["model_args"]["horizon"])
    for got in ((ty, th, tc), (oy, oh, oc)):
        np.testing.assert_allclose(got[0], ry, atol=ATOL, rtol=0)
        np.testing.assert_allclose(got[1], rh, atol=ATOL, rtol=0)
        np.testing.assert_allclose(got[2], rc, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("variant", ["tiny_ckpt", "tiny_ar_highway_ckpt"])
def test_stepwise_with_carried_state_equals_whole_sequence(
    batch: int, variant: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """One step at a time with (hn, cn) carried forward reproduces the whole-sequence run, in all three (with a
    highway over 4 steps, fewer steps per call than its window: the delay line carries the rest)."""
    ckpt = request.getfixturevalue(variant)
    ref, net, sess = implementations(ckpt, tmp_path)
    steps = 25
    x = raw_inputs(ckpt, batch, steps, seed=11)
    h0, c0 = random_state(ckpt, batch, seed=3)
    whole = run_all(ref, net, sess, x, h0, c0)
    states = [(h0, c0)] * 3
    ys: list[list[np.ndarray]] = [[], [], []]
    for t in range(steps):
        with torch.no_grad():
            torch_out = [v.numpy() for v in net(torch.from_numpy(x[:, t : t + 1]), *map(torch.from_numpy, states[1]))]
        outs = [
            ref.forward(x[:, t : t + 1], *states[0]),
            torch_out,
            sess.run(["y", "hn", "cn"], {"x": x[:, t : t + 1], "h0": states[2][0], "c0": states[2][1]}),
        ]
        for k, (y, hn, cn) in enumerate(outs):
            ys[k].append(y)
            states[k] = (np.asarray(hn, dtype=np.float32), np.asarray(cn, dtype=np.float32))
    for k in range(3):
        np.testing.assert_allclose(np.concatenate(ys[k], axis=1), whole[0][0], atol=ATOL, rtol=0)
        np.testing.assert_allclose(states[k][0], whole[0][1], atol=ATOL, rtol=0)
        np.testing.assert_allclose(states[k][1], whole[0][2], atol=ATOL, rtol=0)


def test_batch_rows_are_independent(tiny_ckpt: dict[str, Any], tmp_path: Path) -> None:
    """Each row of a batch gives what it gives alone: the property dynamic batching relies on."""
    _, _, sess = implementations(tiny_ckpt, tmp_path)
    x = raw_inputs(tiny_ckpt, 3, 6, seed=5)
    h, c = random_state(tiny_ckpt, 3, seed=9)
    y, hn, cn = sess.run(None, {"x": x, "h0": h, "c0": c})
    for b in range(3):
        yb, hb, cb = sess.run(None, {"x": x[b : b + 1], "h0": h[:, b : b + 1], "c0": c[:, b : b + 1]})
        np.testing.assert_allclose(yb[0], y[b], atol=ATOL, rtol=0)
        np.testing.assert_allclose(hb[:, 0], hn[:, b], atol=1e-6)
        np.testing.assert_allclose(cb[:, 0], cn[:, b], atol=1e-6)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # NOTE: and no overflow on the way, in the reference too
@pytest.mark.parametrize("variant", ["tiny_highway_ckpt", "tiny_ar_highway_ckpt"])
def test_extreme_finite_inputs_give_finite_forecasts_in_all_three(
    variant: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Inputs near the float32 limit saturate inside the graph: the residual and highway paths, linear in the
    inputs, give finite forecasts (and the three implementations still agree)."""
    ckpt = request.getfixturevalue(variant)
    ref, net, sess = implementations(ckpt, tmp_path)
    x = np.full((2, 3, 4), 3.0e38, np.float32)
    x[1] = -3.0e38
    h, c = random_state(ckpt, 2, seed=1)
    (ry, _, _), (ty, _, _), (oy, _, _) = run_all(ref, net, sess, x, h, c)
    for y in (ry, ty, oy):
        assert np.isfinite(y).all()
    np.testing.assert_allclose(oy, ry, rtol=1e-5)
    np.testing.assert_allclose(ty, ry, rtol=1e-5)
