"""Test doubles for the runtime (in one place) and helpers that build servers around them.

The fakes stand in only for ONNX Runtime: in unit tests of the core, and behind the real transports
where a test needs a model that is slow, blocks or fails on cue (error table, overload, races). Every
other integration test serves the real shipped ONNX model.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.card import ModelCard
from service.repository import ModelRepository, ModelVersion
from service.runtime import F32, Signature
from tests.conftest import SHIPPED_MODEL

SHIPPED_CARD = ModelCard.from_json((SHIPPED_MODEL / "model.json").read_text())


def fake_card(name: str, features: int = 3, horizon: int = 2, layers: int = 1, hidden: int = 4) -> ModelCard:
    """A valid card for a fake model of the given dimensions."""
    d = SHIPPED_CARD.to_dict()
    d.update(
        name=name,
        features=[f"f{i}" for i in range(features)],
        target="f0",
        targets=[f"f0[t+{k + 1}]" for k in range(horizon)],
        horizon=horizon,
        num_layers=layers,
        hidden_size=hidden,
        scaler={"mean": [0.0] * features, "std": [1.0] * features, "target_mean": 0.0, "target_std": 1.0},
    )
    return ModelCard.model_validate(d)


class FakeRuntime:
    """A deterministic recurrent map with the explicit-state contract: h' = tanh(0.5 h + sum(x)), c' = c + 1,
    y = h' broadcast over O plus the running step count in c. Cheap to compute by hand in tests."""

    def __init__(self, features: int = 3, outputs: int = 2, layers: int = 1, hidden: int = 4, delay: float = 0.0):
        self.signature = Signature(features, outputs, layers, hidden)
        self.delay = delay
        self.calls: list[int] = []  # batch size of every run
        self.lock = threading.Lock()

    def run(self, x: F32, h0: F32, c0: F32) -> tuple[F32, F32, F32]:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.calls.append(x.shape[0])
        h, c = h0.copy(), c0.copy()
        ys = []
        for t in range(x.shape[1]):
            h = np.tanh(0.5 * h + x[:, t, :].sum(axis=1)[None, :, None]).astype(np.float32)
            c = (c + 1).astype(np.float32)
            ys.append(np.repeat(h[-1, :, :1], self.signature.outputs, axis=1) + c[-1, :, :1])
        return np.stack(ys, axis=1).astype(np.float32), h, c


class NonFiniteRuntime(FakeRuntime):
    """Emits Inf for any batch row whose input holds a value above 1000."""

    def run(self, x: F32, h0: F32, c0: F32) -> tuple[F32, F32, F32]:
        y, h, c = super().run(x, h0, c0)
        y[(x > 1000).any(axis=(1, 2))] = np.inf
        return y, h, c


class GatedRuntime(FakeRuntime):
    """Blocks every run until released, and tells when a run has started: for races with a running batch."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.entered = threading.Event()
        self.release = threading.Event()

    def run(self, x: F32, h0: F32, c0: F32) -> tuple[F32, F32, F32]:
        self.entered.set()
        if not self.release.wait(10):
            raise TimeoutError("GatedRuntime was never released")
        return super().run(x, h0, c0)


def fake_repo(runtime: FakeRuntime | None = None, name: str = "fake") -> ModelRepository:
    rt = runtime or FakeRuntime()
    s = rt.signature
    return ModelRepository([ModelVersion(name, "1", fake_card(name, s.features, s.outputs, s.layers, s.hidden), rt)])


def reference_run(x: np.ndarray, model_dir: Path = SHIPPED_MODEL) -> np.ndarray:
    """One offline ONNX Runtime run over a whole [T, F] sequence from a zero state: outputs [T, O]."""
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    card = ModelCard.from_json((model_dir / "model.json").read_text())
    zeros = np.zeros((card.num_layers, 1, card.hidden_size), np.float32)
    y, _, _ = sess.run(None, {"x": x[None].astype(np.float32), "h0": zeros, "c0": zeros})
    return np.asarray(y[0])
