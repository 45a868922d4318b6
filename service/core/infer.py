"""Inference requests of the Open Inference Protocol (KServe v2) with Triton's sequence extension, over the core.

Protocol-neutral: the REST (`/v2`) and gRPC (`inference.GRPCInferenceService`) adapters decode their wire format
into an `InferRequest` and encode the `InferResponse`. Sequences are sessions: `sequence_id` is the session id
(shared with `/v1` and `lstm.v1`), `sequence_start` opens it (restarting one that is still open, as Triton does),
`sequence_end` closes it after its step, and a step of an unknown sequence without START is refused with the
message Triton gives. Without a sequence id a request is stateless: each of its B sequences runs from a zero
state. Steps of this protocol join the same dynamic batches as every other step.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from service.core.dataplane import DataPlane
from service.core.sessions import Snapshot
from service.errors import InvalidInputError, ServeError, SessionExistsError, SessionNotFoundError
from service.repository import ModelVersion

INPUT, OUTPUT = "x", "y"  # NOTE: the model's own tensor names, as its graph and metadata show them
EXTENSIONS = ["sequence", "binary_tensor_data", "model_configuration", "model_repository", "parameters"]
# NOTE: request parameters this server reads; any other is refused (a typo would otherwise pass silently)
KNOWN_PARAMETERS = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output"}


@dataclass(frozen=True)
class InferRequest:
    model: str
    version: str | None
    inputs: dict[str, tuple[str, list[int], np.ndarray]]  # name -> (datatype, shape, flat data)
    outputs: list[str] | None = None  # requested output names; None: all
    id: str = ""
    sequence_id: str | None = None
    start: bool = False
    end: bool = False
    timeout: float | None = None  # seconds the request may wait in the queue (the `timeout` parameter is in µs)


@dataclass(frozen=True)
class InferResponse:
    model: str
    version: str
    id: str
    outputs: dict[str, np.ndarray]  # name -> float32 array in its full shape
    parameters: dict[str, Any] = field(default_factory=dict)


def server_version() -> str:
    try:
        return version("lstm-serve")
    except PackageNotFoundError:  # pragma: no cover - running from a tree that is not installed
        return "0"


def check_fp32(name: str, datatype: str) -> None:
    """Inputs are FP32 (an LSTM's are; other datatypes are refused before any conversion)."""
    if datatype != "FP32":
        raise InvalidInputError(f"input {name!r} must be FP32; got {datatype}")


def raw_fp32(name: str, raw: bytes | memoryview) -> np.ndarray:
    """A tensor's raw little-endian FP32 bytes (Triton's binary extension, gRPC raw_input_contents) as values."""
    if len(raw) % 4:
        raise InvalidInputError(f"input {name!r}: {len(raw)} bytes is not a whole number of FP32 values")
    return np.frombuffer(raw, "<f4").astype(np.float32, copy=False)


def sequence_key(value: Any) -> str | None:
    """The session id a sequence_id parameter names (None: no sequence): 7, 7.0 and "7" are the same sequence."""
    if isinstance(value, float) and value.is_integer() and 0 <= value < 2**53:
        value = int(value)  # NOTE: JSON's 7.0 is the integer 7 (JSON Schema says so too)
    if value is None or isinstance(value, bool) or value in (0, ""):  # NOTE: 0 and "" mean "no sequence"
        return None
    return str(value)


def sequence_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """The sequence fields of an `InferRequest` from a request's parameters (JSON values, or gRPC ones decoded);
    unknown or mistyped parameters are refused with what is accepted."""
    unknown = sorted(set(params) - KNOWN_PARAMETERS)
    if unknown:
        raise InvalidInputError(
            f"unknown request parameter(s) {', '.join(map(repr, unknown))}; this server reads "
            f"{', '.join(sorted(KNOWN_PARAMETERS))}"
        )
    out: dict[str, Any] = {}
    sid = params.get("sequence_id")
    if isinstance(sid, float) and sid.is_integer() and 0 <= sid < 2**53:
        sid = int(sid)
    if sid is not None:
        if isinstance(sid, bool) or not isinstance(sid, int | str):
            raise InvalidInputError("parameter sequence_id must be an unsigned integer or a string")
        if isinstance(sid, int) and not 0 <= sid < 2**64:
            raise InvalidInputError(f"parameter sequence_id must be a uint64; got {sid}")
        key = sequence_key(sid)
        if key is not None:
            out["sequence_id"] = key
    for flag, key in (("sequence_start", "start"), ("sequence_end", "end")):
        value = params.get(flag, False)
        if not isinstance(value, bool):
            raise InvalidInputError(f"parameter {flag} must be a boolean")
        out[key] = value
    timeout = params.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise InvalidInputError("parameter timeout must be a non-negative integer of microseconds")
        out["timeout"] = timeout / 1e6 if timeout else None
    if (out.get("start") or out.get("end")) and "sequence_id" not in out:
        raise InvalidInputError("sequence_start and sequence_end need a sequence_id (a non-zero uint64 or a string)")
    return out


def model_metadata(m: ModelVersion, versions: list[str]) -> dict[str, Any]:
    """The model's metadata as the protocol has it (the REST JSON; the gRPC adapter copies it field by field)."""
    sig = m.signature
    return {
        "name": m.name,
        "versions": versions,
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, -1, sig.features]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, -1, sig.outputs]}],
    }


def model_config(m: ModelVersion, versions: list[str], max_batch_size: int, idle_seconds: float) -> dict[str, Any]:
    """Triton's model configuration (the JSON that its tools read): a sequence model whose state the server keeps
    (`sequence_batching.state`), inputs and outputs without the batch dimension."""
    sig = m.signature
    states = [("h0", "hn", sig.hidden)] + ([("c0", "cn", sig.cell)] if sig.cell else [])
    return {
        "name": m.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": len(versions)}},
        "max_batch_size": max_batch_size,
        "input": [{"name": INPUT, "data_type": "TYPE_FP32", "dims": [-1, sig.features]}],
        "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [-1, sig.outputs]}],
        "sequence_batching": {
            "max_sequence_idle_microseconds": int(idle_seconds * 1e6),
            "control_input": [],
            "state": [
                {"input_name": i, "output_name": o, "data_type": "TYPE_FP32", "dims": [sig.layers, width]}
                for i, o, width in states
            ],
        },
        "parameters": {
            "features": {"string_value": ",".join(m.card.features)},
            "outputs": {"string_value": ",".join(m.card.targets)},
        },
    }


def _sequences(dp: DataPlane, m: ModelVersion, req: InferRequest) -> tuple[np.ndarray, bool]:
    """The request's input as [B, T, F] float32, and whether it came without the batch dimension ([T, F])."""
    sig = m.signature
    if set(req.inputs) != {INPUT}:
        raise InvalidInputError(
            f"{m.describe()} takes one input named {INPUT!r} (FP32 [1, T, {sig.features}] or [T, {sig.features}]: "
            f"{', '.join(m.card.features)}); got {sorted(req.inputs) or 'none'}"
        )
    datatype, shape, data = req.inputs[INPUT]
    check_fp32(INPUT, datatype)
    if len(shape) not in (2, 3) or any(d < 1 for d in shape):
        raise InvalidInputError(
            f"input {INPUT!r} must have shape [B, T, {sig.features}] (B = 1 in a sequence) or [T, {sig.features}], "
            f"every dimension at least 1; got {shape}"
        )
    steps = math.prod(shape[:-1])  # NOTE: Python integers: no overflow, whatever the client declares
    if steps > dp.limits.max_steps_per_call:
        raise InvalidInputError(
            f"input {INPUT!r} holds {steps} steps (B x T); the limit per request is {dp.limits.max_steps_per_call}: "
            "split it"
        )
    if math.prod(shape) != data.size:
        n = math.prod(shape)
        raise InvalidInputError(f"input {INPUT!r} has shape {shape} ({n} values) but carries {data.size}")
    x = data.reshape(shape)
    flat = x.ndim == 2
    x = x[None] if flat else x
    if x.shape[0] == 0:
        raise InvalidInputError(f"input {INPUT!r} holds no sequences (B = 0)")
    if req.sequence_id is not None and x.shape[0] != 1:
        raise InvalidInputError(
            f"a sequence request carries one sequence: input {INPUT!r} must be [1, T, {sig.features}] or "
            f"[T, {sig.features}]; got B = {x.shape[0]}"
        )
    return x, flat


async def infer(dp: DataPlane, req: InferRequest, owner: str = "") -> InferResponse:
    """Run one inference request; every failure is a `ServeError` and leaves the session as it was."""
    model = dp.get_model(req.model, req.version)
    if req.outputs is not None and any(o != OUTPUT for o in req.outputs):
        bad = sorted(set(req.outputs) - {OUTPUT})
        raise InvalidInputError(f"{model.describe()} has one output, {OUTPUT!r}; no output named {', '.join(bad)}")
    x, flat = _sequences(dp, model, req)
    params: dict[str, Any] = {}
    if req.sequence_id is None:
        if req.start or req.end:
            raise InvalidInputError("sequence_start and sequence_end need a sequence_id")
        runs = await asyncio.gather(*(dp.predict(model.name, model.version, seq, req.timeout) for seq in x))
        y = np.stack([out for _, out in runs])
    else:
        sid = req.sequence_id
        if req.start:
            dp.validate_inputs(model, x[0])  # NOTE: before the start ends a sequence still open under this id
            model, undo = await _start(dp, model, sid, owner)
            try:
                result = await dp.step(sid, x[0], None, req.timeout, owner)
            except ServeError:
                await undo()  # NOTE: a START that fails leaves things as they were
                raise
        else:
            pinned: list[ModelVersion] = []
            try:
                result = await dp.step(sid, x[0], None, req.timeout, owner, expect=_pin(dp, req, sid, pinned))
            except SessionNotFoundError as e:
                raise _not_open(model, sid, e) from None
            model = pinned[0]
        y = result.outputs[None]
        params = {"sequence_id": sid, "sequence_steps": result.steps}
        if req.end:
            with contextlib.suppress(SessionNotFoundError):
                await dp.delete_session(sid, None, owner)
    return InferResponse(model.name, model.version, req.id, {OUTPUT: y[0] if flat else y}, params)


async def _start(
    dp: DataPlane, model: ModelVersion, sid: str, owner: str
) -> tuple[ModelVersion, Callable[[], Awaitable[None]]]:
    """START: a new session for the sequence; one still open under that id ends first (Triton ends it early).
    Returns the version it runs and how to undo the start if its step fails (the old session comes back)."""
    old: Snapshot | None = None
    try:
        info = await dp.create_session(model.name, model.version, sid, owner)
    except SessionExistsError:
        with contextlib.suppress(SessionNotFoundError):
            old = await dp.export_session(sid, owner)
            await dp.delete_session(sid, None, owner)
        info = await dp.create_session(model.name, model.version, sid, owner)

    async def undo() -> None:
        with contextlib.suppress(ServeError):
            await dp.delete_session(sid, info.incarnation, owner)
            if old is not None:
                await dp.import_session(sid, old, owner)

    return dp.get_model(info.model, info.version), undo


def _not_open(model: ModelVersion, sid: str, e: SessionNotFoundError) -> InvalidInputError:
    """An unknown sequence, refused with the message Triton gives, and why it is gone if known."""
    why = (
        "it expired, idle for longer than max_sequence_idle_microseconds" if "expired" in e.message
        else "it was evicted to stay under the session cap" if "evicted" in e.message
        else "it never started, or it has ended"
    )  # fmt: skip
    return InvalidInputError(
        f"inference request for sequence {sid} to model {model.name!r} must specify the START flag on the first "
        f"request of the sequence; sequence {sid} is not open: {why}"
    )


def _pin(dp: DataPlane, req: InferRequest, sid: str, pinned: list[ModelVersion]) -> Callable[[str], None]:
    """The check of an open sequence's model version, made on the step's own lookup of the session (no second
    one): it must be the model the request names (and its version, if named); the version goes in `pinned`."""

    def check(key: str) -> None:
        name, version = key.split("/", 1)
        if name != req.model or (req.version and version != req.version):
            asked = f"{req.model}" + (f" version {req.version}" if req.version else "")
            raise InvalidInputError(
                f"sequence {sid} runs model {name!r} version {version}, not {asked}: send its steps to that "
                "model, or start a new sequence"
            )
        pinned.append(dp.get_model(name, version))

    return check


def unload_parameters(params: dict[str, Any]) -> tuple[str | None, bool]:
    """The version and force of a repository unload request (our parameters; Triton's unload_dependents is taken
    and means nothing here: a model has no dependents)."""
    allowed = {"version", "force", "unload_dependents"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise InvalidInputError(f"unknown unload parameter(s) {', '.join(map(repr, unknown))}; accepted: "
                                f"{', '.join(sorted(allowed))}")  # fmt: skip
    version, force = params.get("version"), params.get("force", False)
    if "version" in params and not isinstance(version, str):  # NOTE: an explicit null too: leave it out instead
        raise InvalidInputError('parameter version must be a string such as "2"')
    if not isinstance(force, bool) or not isinstance(params.get("unload_dependents", False), bool):
        raise InvalidInputError("parameters force and unload_dependents must be booleans")
    return version, force


def load_parameters(params: dict[str, Any]) -> None:
    """A repository load takes no parameters: it loads only what is under --models (Triton's config and file:
    overrides would let a client write model files; they are refused)."""
    if params:
        raise InvalidInputError(
            f"load takes no parameters (got {', '.join(map(repr, sorted(params)))}): this server loads only the "
            "versions in its model repository directory"
        )


def error_text(e: ServeError) -> str:
    """The message a protocol error carries (the REST `error` field, gRPC details and stream `error_message`)."""
    return f"{e.code}: {e.message}"
