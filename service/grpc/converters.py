"""Proto <-> domain mapping for the gRPC adapter (no logic beyond shape bookkeeping)."""

from __future__ import annotations

import json

import numpy as np
from numpy.typing import NDArray

from service.core.batcher import BlockOutcome
from service.core.dataplane import StepResult, StreamMessage, StreamOpen, StreamReply
from service.core.scoring import SessionScore
from service.core.sessions import SessionInfo, Snapshot
from service.errors import InvalidInputError, ServeError
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.repository import ModelVersion


def to_array(m: pb.Matrix, what: str = "inputs") -> np.ndarray:
    """A Matrix as a [rows, cols] float32 array; rows x cols must equal the number of values."""
    n = len(m.data)
    if m.rows * m.cols != n:
        raise InvalidInputError(
            f"{what} declare {m.rows} x {m.cols} = {m.rows * m.cols} values but carry {n}; "
            "set rows (steps) and cols (features) to match data"
        )
    return np.asarray(m.data, dtype=np.float32).reshape(m.rows, m.cols)


def to_array_or_error(m: pb.Matrix) -> np.ndarray | ServeError:
    """`to_array`, with a decoding error returned rather than raised (for items that fail alone)."""
    try:
        return to_array(m)
    except ServeError as e:
        return e


def from_array(a: np.ndarray) -> pb.Matrix:
    rows, cols = a.shape
    return pb.Matrix(rows=rows, cols=cols, data=a.reshape(-1).tolist())


def packed_steps(p: pb.PackedSteps) -> tuple[list[str], np.ndarray, NDArray[np.uint64] | None]:
    """PackedSteps as (ids, inputs [K, T, F] float32, seq [K] or None); F follows from the number of bytes."""
    k, t, n = len(p.session_ids), p.steps, len(p.inputs)
    if not k:
        raise InvalidInputError("packed.session_ids is empty; send at least one session id")
    if t < 1:
        raise InvalidInputError("packed.steps must be >= 1: the number of time steps for every session")
    if n % (4 * k * t):
        raise InvalidInputError(
            f"packed.inputs holds {n} bytes, not a whole number of float32 values for {k} sessions x {t} steps "
            "x F features; send K x T x F little-endian float32 values"
        )
    x = np.frombuffer(p.inputs, "<f4").reshape(k, t, n // (4 * k * t))
    if p.seq and len(p.seq) != k:
        raise InvalidInputError(f"packed.seq holds {len(p.seq)} values for {k} sessions: send none or one each")
    seq = np.fromiter(p.seq, np.uint64, k) if p.seq else None
    return list(p.session_ids), x, seq


def packed_results(r: BlockOutcome) -> pb.PackedResults:
    _, t, o = r.outputs.shape
    failed = sorted(r.errors)
    return pb.PackedResults(
        steps=t,
        outputs=o,
        data=r.outputs.astype("<f4", copy=False).tobytes(),
        total_steps=r.steps.tolist(),
        seq=r.seq.tolist(),
        replayed=r.replayed.tolist(),
        failed=failed,
        errors=[error(r.errors[i]) for i in failed],
    )


def session_info(info: SessionInfo, accuracy: SessionScore | None = None) -> pb.SessionInfo:
    out = pb.SessionInfo(
        session_id=info.session_id,
        model=info.model,
        version=info.version,
        steps=info.steps,
        seq=info.seq,
        created_unix=info.created,
        last_used_unix=info.last_used,
        expires_unix=info.expires,
    )
    if accuracy is not None:
        out.live_accuracy.scored = accuracy.scored
        for h in accuracy.horizons:
            out.live_accuracy.horizons.add(
                horizon=h.horizon, count=h.count, mae=h.mae, persistence_mae=h.persistence_mae
            )
    return out


def step_response(r: StepResult) -> pb.StepResponse:
    return pb.StepResponse(
        session_id=r.session_id, outputs=from_array(r.outputs), steps=r.steps, seq=r.seq, replayed=r.replayed
    )


def error(e: ServeError) -> pb.Error:
    return pb.Error(code=e.code.value, message=e.message)


def snapshot_to_pb(s: Snapshot) -> pb.SessionSnapshot:
    return pb.SessionSnapshot(
        model=s.model, version=s.version, steps=s.steps, seq=s.seq, h=from_array(s.h), c=from_array(s.c)
    )


def snapshot_from_pb(s: pb.SessionSnapshot) -> Snapshot:
    if not s.model:
        raise InvalidInputError("snapshot.model is required")
    if not s.version:
        # NOTE: never the newest silently: a state only means something on the version that made it
        raise InvalidInputError("snapshot.version is required: import the snapshot as ExportSession returned it")
    return Snapshot(s.model, s.version, s.steps, s.seq, to_array(s.h, "snapshot h"), to_array(s.c, "snapshot c"))


def model_info(m: ModelVersion, versions: list[str]) -> pb.ModelInfo:
    card = m.card
    return pb.ModelInfo(
        name=m.name,
        version=m.version,
        versions=versions,
        features=card.features,
        target=card.target,
        outputs=card.targets,
        horizon=card.horizon,
        hidden_size=card.hidden_size,
        num_layers=card.num_layers,
        card_json=json.dumps(card.to_dict(), sort_keys=True),
        live_scoring=m.scoring is not None,
        live_scoring_off=m.scoring_off,
    )


def stream_message(req: pb.StreamRequest) -> StreamMessage:
    start = req.WhichOneof("start")
    opened: StreamOpen | None = None
    if start == "open":
        o = req.open
        opened = StreamOpen(model=o.model, version=o.version or None, session_id=o.session_id or None, keep=req.keep)
    elif start == "resume_session_id":
        opened = StreamOpen(resume_session_id=req.resume_session_id, keep=req.keep)
    inputs = to_array(req.inputs) if req.HasField("inputs") else None
    return StreamMessage(inputs=inputs, seq=req.seq if req.HasField("seq") else None, open=opened, peek=req.peek)


def stream_response(r: StreamReply) -> pb.StreamResponse:
    out = pb.StreamResponse(session_id=r.session_id)
    if r.result is not None:
        out.outputs.CopyFrom(from_array(r.result.outputs))
        out.steps, out.seq, out.replayed = r.result.steps, r.result.seq, r.result.replayed
    if r.error is not None:
        out.error.CopyFrom(error(r.error))
    if r.session is not None:
        out.session.CopyFrom(session_info(r.session))
    return out
