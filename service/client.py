"""Python clients for the gRPC API, sync (`Client`) and asyncio (`AsyncClient`), speaking numpy.

with Client("127.0.0.1:50051") as c:
    sid = c.create_session("seattle-weather").session_id
    forecast = c.step(sid, [[0.0, 12.8, 5.0, 4.7]])        # [T=1, O=7]
    for f in c.stream("seattle-weather", rows):              # one [O] forecast per row
        ...
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from numpy.typing import ArrayLike, NDArray

from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc

F32 = NDArray[np.float32]
ERROR_CODE_KEY = "lstm-error-code"


class ClientError(Exception):
    """An error reported by the server: `code` is the machine code (e.g. "session_not_found")."""

    def __init__(self, code: str, message: str, status: grpc.StatusCode | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


def _from_rpc(e: grpc.RpcError) -> ClientError:
    call: Any = e
    trailers = dict(call.trailing_metadata() or ())
    status = call.code()
    return ClientError(str(trailers.get(ERROR_CODE_KEY, status.name.lower())), call.details() or "", status)


def _matrix(a: ArrayLike) -> tuple[pb.Matrix, bool]:
    """A [F] observation or [T, F] steps as a Matrix; also says whether the input was a single step."""
    arr = np.asarray(a, dtype=np.float32)
    single = arr.ndim == 1
    arr = arr[None, :] if single else arr
    if arr.ndim != 2:
        raise ValueError(f"inputs must be [F] or [T, F]; got shape {arr.shape}")
    return pb.Matrix(rows=arr.shape[0], cols=arr.shape[1], data=arr.reshape(-1).tolist()), single


def _step_request(session_id: str, inputs: ArrayLike, seq: int | None) -> pb.StepRequest:
    m, _ = _matrix(inputs)
    req = pb.StepRequest(session_id=session_id, inputs=m)
    if seq is not None:
        req.seq = seq
    return req


def _peek_request(session_id: str, inputs: ArrayLike) -> pb.PeekRequest:
    m, _ = _matrix(inputs)
    return pb.PeekRequest(session_id=session_id, inputs=m)


def _stream_request(obs: ArrayLike, singles: collections.deque[bool]) -> pb.StreamRequest:
    m, single = _matrix(obs)
    singles.append(single)
    return pb.StreamRequest(inputs=m)


def _stream_outputs(r: pb.StreamResponse, singles: collections.deque[bool]) -> F32:
    """A stream reply's forecasts: [O] for a single observation, [T, O] for a chunk; in-band errors raise."""
    if r.HasField("error"):
        raise ClientError(r.error.code, r.error.message)
    out = to_numpy(r.outputs)
    return out[0] if singles.popleft() else out


def to_numpy(m: pb.Matrix) -> F32:
    return np.asarray(m.data, dtype=np.float32).reshape(m.rows, m.cols)


def _batch_request(items: Iterable[tuple[str, ArrayLike] | tuple[str, ArrayLike, int | None]]) -> pb.StepBatchRequest:
    steps = []
    for item in items:
        seq = item[2] if len(item) > 2 else None  # NOTE: (id, inputs) or (id, inputs, seq)
        steps.append(_step_request(item[0], item[1], seq))
    return pb.StepBatchRequest(steps=steps)


def _batch_outputs(reply: pb.StepBatchResponse) -> list[F32 | ClientError]:
    """Per item: outputs [T, O], or the ClientError of that item (items fail alone)."""
    return [
        ClientError(r.error.code, r.error.message) if r.HasField("error") else to_numpy(r.response.outputs)
        for r in reply.results
    ]


@dataclass(frozen=True)
class Packed:
    """The answer to a packed step batch, row i for session i: outputs [K, T, O] (zeros where it failed),
    step totals, seqs and replay flags [K], and the errors of the rows that failed."""

    outputs: F32
    steps: NDArray[np.uint64]
    seq: NDArray[np.uint64]
    replayed: NDArray[np.bool_]
    errors: dict[int, ClientError]


def _packed_request(session_ids: list[str], inputs: ArrayLike, seq: ArrayLike | None) -> pb.StepBatchRequest:
    x = np.ascontiguousarray(inputs, dtype="<f4")
    if x.ndim != 3 or x.shape[0] != len(session_ids):
        raise ValueError(f"inputs must be [sessions, steps, features] with one row per session id; got {x.shape}")
    packed = pb.PackedSteps(session_ids=session_ids, steps=x.shape[1], inputs=x.tobytes())
    if seq is not None:
        packed.seq.extend(np.asarray(seq, np.uint64).tolist())
    return pb.StepBatchRequest(packed=packed)


def _packed_reply(reply: pb.StepBatchResponse) -> Packed:
    p = reply.packed
    k = len(p.total_steps)
    return Packed(
        np.frombuffer(p.data, "<f4").reshape(k, p.steps, p.outputs),
        np.fromiter(p.total_steps, np.uint64, k),
        np.fromiter(p.seq, np.uint64, k),
        np.fromiter(p.replayed, np.bool_, k),
        {int(i): ClientError(e.code, e.message) for i, e in zip(p.failed, p.errors, strict=True)},
    )


def _open(
    model: str | None, version: str | None, session_id: str | None, resume: str | None, keep: bool
) -> pb.StreamRequest:
    first = pb.StreamRequest(keep=keep)
    if resume:
        first.resume_session_id = resume
    elif model:
        first.open.CopyFrom(pb.CreateSessionRequest(model=model, version=version or "", session_id=session_id or ""))
    else:
        raise ValueError("stream needs a model to open a session on, or resume=<session id>")
    return first


class Client:
    """Blocking client over one gRPC channel. Every method of the API, with numpy in and out."""

    def __init__(
        self, target: str = "127.0.0.1:50051", timeout: float = 30.0, channel: grpc.Channel | None = None
    ) -> None:
        self.channel = channel or grpc.insecure_channel(target)
        self.stub = pb_grpc.PredictorStub(self.channel)
        self.timeout = timeout
        self.session_id: str | None = None  # the session of the last stream

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _from_rpc(e) from None

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._call("ListModels", pb.ListModelsRequest()).models)

    def get_model(self, name: str, version: str | None = None) -> pb.ModelInfo:
        return self._call("GetModel", pb.GetModelRequest(name=name, version=version or ""))  # type: ignore[no-any-return]

    def predict(self, model: str, inputs: ArrayLike, version: str | None = None) -> F32:
        """Stateless: outputs [T, O] for a whole sequence [T, F] from a zero state."""
        m, _ = _matrix(inputs)
        return to_numpy(self._call("Predict", pb.PredictRequest(model=model, version=version or "", inputs=m)).outputs)

    def create_session(self, model: str, version: str | None = None, session_id: str | None = None) -> pb.SessionInfo:
        req = pb.CreateSessionRequest(model=model, version=version or "", session_id=session_id or "")
        return self._call("CreateSession", req)  # type: ignore[no-any-return]

    def get_session(self, session_id: str) -> pb.SessionInfo:
        return self._call("GetSession", pb.SessionRef(session_id=session_id))  # type: ignore[no-any-return]

    def step(self, session_id: str, inputs: ArrayLike, seq: int | None = None) -> F32:
        """Apply steps ([F] or [T, F]) to a session; returns the outputs [T, O]."""
        return to_numpy(self.step_full(session_id, inputs, seq).outputs)

    def step_full(self, session_id: str, inputs: ArrayLike, seq: int | None = None) -> pb.StepResponse:
        """`step` with the whole answer: outputs, steps, seq and whether it was a replay."""
        return self._call("Step", _step_request(session_id, inputs, seq))  # type: ignore[no-any-return]

    def step_batch(
        self, items: Iterable[tuple[str, ArrayLike] | tuple[str, ArrayLike, int | None]]
    ) -> list[F32 | ClientError]:
        """Steps for many sessions in one call: (session_id, inputs[, seq]) each; per item outputs or its error."""
        return _batch_outputs(self._call("StepBatch", _batch_request(items)))

    def step_packed(self, session_ids: list[str], inputs: ArrayLike, seq: ArrayLike | None = None) -> Packed:
        """T steps of each of K sessions as one array [K, T, F] (seq: none, or K values, 0 for none), run as one
        batch on the server and answered as one array: the fast way to step many sessions at once."""
        return _packed_reply(self._call("StepBatch", _packed_request(session_ids, inputs, seq)))

    def peek(self, session_id: str, inputs: ArrayLike) -> F32:
        """What-if: outputs [T, O] of hypothetical steps ([F] or [T, F]); the session is left exactly as it was."""
        return to_numpy(self._call("Peek", _peek_request(session_id, inputs)).outputs)

    def fork_session(self, session_id: str, new_session_id: str | None = None, scored: bool = False) -> pb.SessionInfo:
        """A new session from this one's current state; `scored`: its steps count as the truth (live accuracy)."""
        req = pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id or "", scored=scored)
        return self._call("ForkSession", req)  # type: ignore[no-any-return]

    def reset_session(self, session_id: str) -> pb.SessionInfo:
        return self._call("ResetSession", pb.SessionRef(session_id=session_id))  # type: ignore[no-any-return]

    def delete_session(self, session_id: str) -> None:
        self._call("DeleteSession", pb.SessionRef(session_id=session_id))

    def export_session(self, session_id: str) -> pb.SessionSnapshot:
        return self._call("ExportSession", pb.SessionRef(session_id=session_id))  # type: ignore[no-any-return]

    def import_session(self, session_id: str, snapshot: pb.SessionSnapshot) -> pb.SessionInfo:
        req = pb.ImportSessionRequest(session_id=session_id, snapshot=snapshot)
        return self._call("ImportSession", req)  # type: ignore[no-any-return]

    def stream(
        self,
        model: str | None,
        observations: Iterable[ArrayLike],
        *,
        version: str | None = None,
        session_id: str | None = None,
        resume: str | None = None,
        keep: bool = False,
    ) -> Iterator[F32]:
        """Send observations ([F] each, or [T, F] chunks) through one session; yield forecasts in order.

        A [F] observation yields an [O] forecast, a [T, F] chunk yields [T, O]. The session is deleted
        when the stream ends unless keep=True; its id is in `self.session_id`.
        """
        singles: collections.deque[bool] = collections.deque()

        def requests() -> Iterator[pb.StreamRequest]:
            yield _open(model, version, session_id, resume, keep)
            for obs in observations:
                yield _stream_request(obs, singles)

        responses = self.stub.Stream(requests())
        try:
            first = next(responses)
            self.session_id = first.session_id
            for r in responses:
                yield _stream_outputs(r, singles)
        except grpc.RpcError as e:
            raise _from_rpc(e) from None
        finally:
            responses.cancel()


class AsyncClient:
    """asyncio client over one grpc.aio channel: the methods of `Client`, awaited."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float = 30.0) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.PredictorStub(self.channel)
        self.timeout = timeout
        self.session_id: str | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _from_rpc(e) from None

    async def list_models(self) -> list[pb.ModelInfo]:
        return list((await self._call("ListModels", pb.ListModelsRequest())).models)

    async def get_model(self, name: str, version: str | None = None) -> pb.ModelInfo:
        return await self._call("GetModel", pb.GetModelRequest(name=name, version=version or ""))  # type: ignore[no-any-return]

    async def predict(self, model: str, inputs: ArrayLike, version: str | None = None) -> F32:
        m, _ = _matrix(inputs)
        reply = await self._call("Predict", pb.PredictRequest(model=model, version=version or "", inputs=m))
        return to_numpy(reply.outputs)

    async def create_session(
        self, model: str, version: str | None = None, session_id: str | None = None
    ) -> pb.SessionInfo:
        req = pb.CreateSessionRequest(model=model, version=version or "", session_id=session_id or "")
        return await self._call("CreateSession", req)  # type: ignore[no-any-return]

    async def get_session(self, session_id: str) -> pb.SessionInfo:
        return await self._call("GetSession", pb.SessionRef(session_id=session_id))  # type: ignore[no-any-return]

    async def step(self, session_id: str, inputs: ArrayLike, seq: int | None = None) -> F32:
        return to_numpy((await self.step_full(session_id, inputs, seq)).outputs)

    async def step_full(self, session_id: str, inputs: ArrayLike, seq: int | None = None) -> pb.StepResponse:
        return await self._call("Step", _step_request(session_id, inputs, seq))  # type: ignore[no-any-return]

    async def step_batch(
        self, items: Iterable[tuple[str, ArrayLike] | tuple[str, ArrayLike, int | None]]
    ) -> list[F32 | ClientError]:
        return _batch_outputs(await self._call("StepBatch", _batch_request(items)))

    async def step_packed(self, session_ids: list[str], inputs: ArrayLike, seq: ArrayLike | None = None) -> Packed:
        return _packed_reply(await self._call("StepBatch", _packed_request(session_ids, inputs, seq)))

    async def peek(self, session_id: str, inputs: ArrayLike) -> F32:
        return to_numpy((await self._call("Peek", _peek_request(session_id, inputs))).outputs)

    async def fork_session(
        self, session_id: str, new_session_id: str | None = None, scored: bool = False
    ) -> pb.SessionInfo:
        req = pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id or "", scored=scored)
        return await self._call("ForkSession", req)  # type: ignore[no-any-return]

    async def reset_session(self, session_id: str) -> pb.SessionInfo:
        return await self._call("ResetSession", pb.SessionRef(session_id=session_id))  # type: ignore[no-any-return]

    async def delete_session(self, session_id: str) -> None:
        await self._call("DeleteSession", pb.SessionRef(session_id=session_id))

    async def export_session(self, session_id: str) -> pb.SessionSnapshot:
        return await self._call("ExportSession", pb.SessionRef(session_id=session_id))  # type: ignore[no-any-return]

    async def import_session(self, session_id: str, snapshot: pb.SessionSnapshot) -> pb.SessionInfo:
        req = pb.ImportSessionRequest(session_id=session_id, snapshot=snapshot)
        return await self._call("ImportSession", req)  # type: ignore[no-any-return]

    async def stream(
        self,
        model: str | None,
        observations: Iterable[ArrayLike] | AsyncIterable[ArrayLike],
        *,
        version: str | None = None,
        session_id: str | None = None,
        resume: str | None = None,
        keep: bool = False,
    ) -> AsyncIterator[F32]:
        """The asyncio twin of `Client.stream` (observations may be a sync or async iterable)."""
        singles: collections.deque[bool] = collections.deque()

        async def requests() -> AsyncIterator[pb.StreamRequest]:
            yield _open(model, version, session_id, resume, keep)
            if isinstance(observations, AsyncIterable):
                async for obs in observations:
                    yield _stream_request(obs, singles)
            else:
                for obs in observations:
                    yield _stream_request(obs, singles)

        call = self.stub.Stream(requests())
        try:
            first = True
            async for r in call:
                if first:
                    self.session_id, first = r.session_id, False
                    continue
                yield _stream_outputs(r, singles)
        except grpc.RpcError as e:
            raise _from_rpc(e) from None
        finally:
            call.cancel()
