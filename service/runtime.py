"""The runtime interface (run one batch of steps) and its ONNX Runtime implementation.

The explicit-state contract: `x[B,T,F], h0[L,B,H], c0[L,B,C] -> y[B,T,O], hn[L,B,H], cn[L,B,C]`. A session's
state is the model's state tensors, paired by name: `h0 -> hn` always, `c0 -> cn` when the model has a second
state (an LSTM; C is its cell width, H may differ with a projection). A GRU or a plain RNN has only `h0 -> hn`:
the core then keeps an empty `c` (C = 0), so that every store, snapshot and batch treats all of them alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Signature:
    """Dimensions of the explicit-state contract (module docstring)."""

    features: int  # F
    outputs: int  # O
    layers: int  # L
    hidden: int  # H, the width of h
    cell: int = -1  # C, the width of c; -1: the same as H (an LSTM); 0: the model has no c (a GRU)
    # NOTE: bytes of a per-session record that the server keeps beside the state (live scoring, see
    # service/core/scoring.py); not part of the graph's contract, so not in `dims`
    extra: int = 0

    def __post_init__(self) -> None:
        if self.cell < 0:
            object.__setattr__(self, "cell", self.hidden)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.cell else ("h",)

    @property
    def dims(self) -> list[int]:
        return [self.features, self.outputs, self.layers, self.hidden, self.cell]


class Runtime(Protocol):
    """Runs batches for one model version. `run` is blocking and is called off the event loop."""

    signature: Signature

    def run(self, x: F32, h0: F32, c0: F32) -> tuple[F32, F32, F32]:
        """x [B, T, F], h0 [L, B, H], c0 [L, B, C] -> y [B, T, O], hn, cn (C = 0: c0 is ignored, cn is empty)."""
        ...


class ContractError(ValueError):
    """An ONNX graph that does not have the explicit-state contract; the message says what to change."""


EXPORT_HINT = (
    "export with inputs x [B, T, F], h0 [L, B, H] (and c0 for an LSTM), outputs y [B, T, O], hn (and cn), "
    "B and T as dynamic axes (see the README's 'Serve your own ONNX model')"
)


def _dim(shape: list[Any], i: int) -> int | None:
    return shape[i] if isinstance(shape[i], int) and shape[i] > 0 else None


def check_contract(inputs: dict[str, tuple[list[Any], str]], outputs: dict[str, tuple[list[Any], str]]) -> Signature:
    """The signature of a graph with the explicit-state contract, from its declared inputs and outputs
    (name -> (shape, element type)); a `ContractError` that says what to change otherwise."""
    if "c0" in inputs or "cn" in outputs:
        want_in, want_out = {"x", "h0", "c0"}, {"y", "hn", "cn"}
    else:
        want_in, want_out = {"x", "h0"}, {"y", "hn"}
    if set(inputs) != want_in or set(outputs) != want_out:
        raise ContractError(
            f"the graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}; expected x, h0, c0 -> y, hn, cn "
            f"(an LSTM) or x, h0 -> y, hn (a GRU): rename them with input_names/output_names when you export; "
            + EXPORT_HINT
        )
    for name, (shape, kind) in (*inputs.items(), *outputs.items()):
        if kind != "tensor(float)":
            raise ContractError(f"{name} is {kind}; every input and output must be float32: {EXPORT_HINT}")
        if len(shape) != 3:
            raise ContractError(f"{name} has {len(shape)} dimensions {shape}; every tensor must have 3: {EXPORT_HINT}")
    for name, batch_axis, fixed in (("x", 0, 2), ("y", 0, 2), *((n, 1, None) for n in ("h0", "hn", "c0", "cn"))):
        if name not in inputs and name not in outputs:
            continue
        shape = (inputs.get(name) or outputs[name])[0]
        if _dim(shape, batch_axis) is not None:
            raise ContractError(
                f"{name} has a fixed batch size {shape[batch_axis]}; make B a dynamic axis: {EXPORT_HINT}"
            )
        if name in ("x", "y") and _dim(shape, 1) is not None:
            raise ContractError(f"{name} has a fixed number of time steps {shape[1]}; make T a dynamic axis")
        if fixed is not None and _dim(shape, fixed) is None:
            raise ContractError(f"{name} must have a fixed last dimension (F for x, O for y); got {shape}")
    for a, b in (("h0", "hn"), ("c0", "cn")):
        if a not in inputs:
            continue
        sa, sb = inputs[a][0], outputs[b][0]
        if _dim(sa, 0) is None or _dim(sa, 2) is None:
            raise ContractError(f"{a} must have fixed layers and width [L, B, H]; got {sa}")
        if (_dim(sb, 0), _dim(sb, 2)) not in ((sa[0], sa[2]), (None, None)):
            raise ContractError(f"{b} {sb} must have the shape of {a} {sa}: a state goes out as it came in")
    h0 = inputs["h0"][0]
    cell = inputs["c0"][0] if "c0" in inputs else None
    if cell is not None and cell[0] != h0[0]:
        raise ContractError(f"h0 {h0} and c0 {cell} must have the same number of layers")
    return Signature(
        features=inputs["x"][0][2],
        outputs=outputs["y"][0][2],
        layers=h0[0],
        hidden=h0[2],
        cell=cell[2] if cell is not None else 0,
    )


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
        self.signature = check_contract(
            {i.name: (list(i.shape), i.type) for i in self.session.get_inputs()},
            {o.name: (list(o.shape), o.type) for o in self.session.get_outputs()},
        )
        self._outputs = ["y", "hn", "cn"] if self.signature.cell else ["y", "hn"]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, x: F32, h0: F32, c0: F32) -> tuple[F32, F32, F32]:
        if self.signature.cell:
            y, hn, cn = self.session.run(self._outputs, {"x": x, "h0": h0, "c0": c0})
            return y, hn, cn
        y, hn = self.session.run(self._outputs, {"x": x, "h0": h0})
        return y, hn, np.empty((hn.shape[0], hn.shape[1], 0), np.float32)

    def warmup(self) -> None:
        """Runs at load, so that the first client does not pay for lazy initialisation, and checks that the graph
        computes what it declares: a batch of 2 sequences of 3 steps must come back in the contract's shapes."""
        s = self.signature
        x = np.zeros((2, 3, s.features), np.float32)
        h, c = np.zeros((s.layers, 2, s.hidden), np.float32), np.zeros((s.layers, 2, s.cell), np.float32)
        y, hn, cn = self.run(x, h, c)
        want = ((2, 3, s.outputs), h.shape, c.shape)
        if (y.shape, hn.shape, cn.shape) != want:
            raise ContractError(
                f"run on x {list(x.shape)}, the graph returned y, hn, cn of shapes "
                f"{[list(a.shape) for a in (y, hn, cn)]}; "
                f"expected {[list(w) for w in want]}: {EXPORT_HINT}"
            )
        self.run(np.zeros((1, 1, s.features), np.float32), h[:, :1], c[:, :1])
