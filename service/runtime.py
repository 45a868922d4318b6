"""The runtime interface (run one batch of steps) and its ONNX Runtime implementation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Signature:
    """Dimensions of the explicit-state contract `x[B,T,F], h0[L,B,H], c0[L,B,H] -> y[B,T,O], hn, cn`."""

    features: int  # F
    outputs: int  # O
    layers: int  # L
    hidden: int  # H


class Runtime(Protocol):
    """Runs batches for one model version. `run` is blocking and is called off the event loop."""

    signature: Signature

    def run(self, x: F32, h0: F32, c0: F32) -> tuple[F32, F32, F32]:
        """x [B, T, F], h0/c0 [L, B, H] -> y [B, T, O], hn, cn."""
        ...


class OnnxRuntime:
    """ONNX Runtime session for a model file with the explicit-state contract."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # NOTE: no spinning; the event loop and other models share these cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        ins = {i.name: i.shape for i in self.session.get_inputs()}
        outs = {o.name: o.shape for o in self.session.get_outputs()}
        if set(ins) != {"x", "h0", "c0"} or set(outs) != {"y", "hn", "cn"}:
            raise ValueError(
                f"{path.name} does not have the explicit-state contract: inputs {sorted(ins)}, outputs "
                f"{sorted(outs)}; expected x, h0, c0 -> y, hn, cn (export it with `lstm-serve train`)"
            )
        f, o, layers, hidden = ins["x"][2], outs["y"][2], ins["h0"][0], ins["h0"][2]
        if not all(isinstance(v, int) for v in (f, o, layers, hidden)):
            raise ValueError(f"{path.name}: F, O, L and H must be fixed dimensions")
        self.signature = Signature(features=f, outputs=o, layers=layers, hidden=hidden)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, x: F32, h0: F32, c0: F32) -> tuple[F32, F32, F32]:
        y, hn, cn = self.session.run(["y", "hn", "cn"], {"x": x, "h0": h0, "c0": c0})
        return y, hn, cn

    def warmup(self) -> None:
        """One run at load, so that the first client does not pay for lazy initialisation."""
        s = self.signature
        zeros = np.zeros((s.layers, 1, s.hidden), np.float32)
        self.run(np.zeros((1, 1, s.features), np.float32), zeros, zeros)
