"""The servers `make bench` measures ours against, each speaking our message shapes on real ports.

  python bench/floors.py grpc-echo --outputs 7      # bare grpc.aio: Stream / Step / StepBatch / CreateSession echo
  python bench/floors.py rest-echo --outputs 7      # bare FastAPI on uvicorn (uvloop, httptools) + orjson: echo
  python bench/floors.py naive --model models/seattle-weather/1/model.onnx
                                                    # FastAPI + ONNX Runtime per request, as a tutorial writes it

The echo servers do no work beyond decoding a request and encoding an answer of the right size ([T, O]
outputs): they are the transport floors, the cost of a message on this machine. Each prints
`PORT <port>` on stdout once it listens, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response, WebSocket, WebSocketDisconnect
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb  # noqa: E402
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc  # noqa: E402


def announce(port: int) -> None:
    print(f"PORT {port}", flush=True)


# --- gRPC echo -----------------------------------------------------------------------------------------
class EchoPredictor(pb_grpc.PredictorServicer):
    """Answers with messages of our shapes: outputs [T, O] of zeros, counters counted per session."""

    def __init__(self, outputs: int) -> None:
        self.outputs = outputs

    def _matrix(self, rows: int) -> pb.Matrix:
        return pb.Matrix(rows=rows, cols=self.outputs, data=[0.0] * (rows * self.outputs))

    async def CreateSession(self, request: pb.CreateSessionRequest, context: Any) -> pb.SessionInfo:  # noqa: N802
        return pb.SessionInfo(session_id=request.session_id or "s", model=request.model, version="1")

    async def DeleteSession(self, request: pb.SessionRef, context: Any) -> pb.DeleteSessionResponse:  # noqa: N802
        return pb.DeleteSessionResponse(session_id=request.session_id)

    async def Step(self, request: pb.StepRequest, context: Any) -> pb.StepResponse:  # noqa: N802
        rows = request.inputs.rows
        return pb.StepResponse(session_id=request.session_id, outputs=self._matrix(rows), steps=rows, seq=request.seq)

    async def StepBatch(self, request: pb.StepBatchRequest, context: Any) -> pb.StepBatchResponse:  # noqa: N802
        if request.HasField("packed"):  # NOTE: answered in the packed form, as the real server does
            p = request.packed
            k, t = len(p.session_ids), p.steps
            data = bytes(k * t * self.outputs * 4)
            seq = list(p.seq) or [0] * k
            answer = pb.PackedResults(steps=t, outputs=self.outputs, data=data, total_steps=[t] * k, seq=seq)
            answer.replayed.extend([False] * k)
            return pb.StepBatchResponse(packed=answer)
        return pb.StepBatchResponse(
            results=[
                pb.StepBatchResult(
                    response=pb.StepResponse(
                        session_id=s.session_id, outputs=self._matrix(s.inputs.rows), steps=s.inputs.rows, seq=s.seq
                    )
                )
                for s in request.steps
            ]
        )

    async def Stream(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: Any
    ) -> AsyncIterator[pb.StreamResponse]:
        steps = 0
        async for req in request_iterator:
            rows = req.inputs.rows
            steps += rows
            yield pb.StreamResponse(session_id="s", outputs=self._matrix(rows), steps=steps, seq=req.seq)


async def grpc_echo(outputs: int, port: int) -> None:
    import grpc

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_PredictorServicer_to_server(EchoPredictor(outputs), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    announce(bound)
    await _until_term()
    await server.stop(0)


# --- REST echo -----------------------------------------------------------------------------------------
def rest_echo_app(outputs: int) -> Any:
    app = FastAPI()
    row = [0.0] * outputs

    def answer(session_id: str, body: dict[str, Any], steps: int) -> dict[str, Any]:
        rows = len(body.get("inputs") or ())
        return {"session_id": session_id, "outputs": [row] * rows, "steps": steps, "seq": body.get("seq") or 0,
                "replayed": False}  # fmt: skip

    @app.post("/v1/sessions", status_code=201)
    async def create(request: Request) -> Response:
        body = orjson.loads(await request.body())
        sid = body.get("session_id") or "s"
        info = {"session_id": sid, "model": body["model"], "version": "1", "steps": 0, "seq": 0, "created": 0.0,
                "last_used": 0.0, "expires": 0.0}  # fmt: skip
        return Response(orjson.dumps(info), status_code=201, media_type="application/json")

    @app.delete("/v1/sessions/{session_id}")
    async def delete(session_id: str) -> Response:
        return Response(orjson.dumps({"session_id": session_id}), media_type="application/json")

    @app.post("/v1/sessions/{session_id}/steps")
    async def step(session_id: str, request: Request) -> Response:
        body = orjson.loads(await request.body())
        return Response(orjson.dumps(answer(session_id, body, 1)), media_type="application/json")

    @app.websocket("/v1/sessions/stream")
    async def stream(ws: WebSocket) -> None:
        await ws.accept()
        steps = 0
        try:
            while True:
                body = orjson.loads(await ws.receive_text())
                steps += len(body.get("inputs") or ())
                await ws.send_text(orjson.dumps(answer("s", body, steps)).decode())
        except WebSocketDisconnect:
            return

    return app


# --- naive: FastAPI + ONNX Runtime per request ------------------------------------------------------------
class CreateBody(BaseModel):
    model: str
    session_id: str | None = None


class StepBody(BaseModel):
    inputs: list[list[float]]
    seq: int | None = None


def naive_app(model: Path) -> Any:
    """What a tutorial gives: pydantic bodies, a dict of states, one ONNX Runtime call per request."""
    import uuid

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    shape = {i.name: i.shape for i in sess.get_inputs()}
    layers, hidden = int(shape["h0"][0]), int(shape["h0"][2])
    states: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    app = FastAPI()

    @app.post("/v1/sessions", status_code=201)
    def create(body: CreateBody) -> dict[str, Any]:
        sid = body.session_id or uuid.uuid4().hex
        zero = np.zeros((layers, 1, hidden), np.float32)
        states[sid] = (zero, zero.copy())
        return {"session_id": sid, "model": body.model, "version": "1", "steps": 0, "seq": 0}

    @app.delete("/v1/sessions/{session_id}")
    def delete(session_id: str) -> dict[str, Any]:
        states.pop(session_id, None)
        return {"session_id": session_id}

    @app.post("/v1/sessions/{session_id}/steps")
    def step(session_id: str, body: StepBody) -> dict[str, Any]:
        if session_id not in states:
            raise HTTPException(404, "no such session")
        h, c = states[session_id]
        x = np.asarray(body.inputs, np.float32)[None]
        y, hn, cn = sess.run(None, {"x": x, "h0": h, "c0": c})
        states[session_id] = (hn, cn)
        return {"session_id": session_id, "outputs": y[0].tolist(), "steps": 0, "seq": body.seq or 0,
                "replayed": False}  # fmt: skip

    return app


async def serve_asgi(app: Any, port: int) -> None:
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.01)
    announce(sock.getsockname()[1])
    await _until_term()
    server.should_exit = True
    await task


async def _until_term() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main() -> None:
    import uvloop

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["grpc-echo", "rest-echo", "naive"])
    p.add_argument("--outputs", type=int, default=7, help="outputs per step (O) in the echo answers")
    p.add_argument("--model", type=Path, help="the ONNX file (naive)")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    if a.kind == "grpc-echo":
        uvloop.run(grpc_echo(a.outputs, a.port))
    elif a.kind == "rest-echo":
        uvloop.run(serve_asgi(rest_echo_app(a.outputs), a.port))
    else:
        if a.model is None:
            p.error("naive needs --model")
        uvloop.run(serve_asgi(naive_app(a.model), a.port))


if __name__ == "__main__":
    main()
