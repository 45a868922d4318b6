"""A planned restart with the memory store loses no session: the drain writes them to --snapshot, the next
start restores them, and a resumed session gives exactly the outputs it would have given without the restart."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np

from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.fixtures import reference_run
from tests.integration.conftest import start_serve_process

MODEL = "seattle-weather"
ATOL = 1e-5


def matrix(rows: np.ndarray) -> pb.Matrix:
    return pb.Matrix(rows=len(rows), cols=4, data=rows.reshape(-1).tolist())


async def stop(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert proc.stderr is not None
    return (await proc.stderr.read()).decode()


async def test_sessions_survive_a_planned_restart_over_rest_and_grpc(tmp_path: Path, weather: np.ndarray) -> None:
    """Half of two sequences (one on REST, one on gRPC, with seq) before SIGTERM, the other half after the
    restart: both equal one offline run; a retry of the last call before the restart replays its outputs."""
    snapshot = tmp_path / "sessions.snapshot"
    x_rest, x_grpc = weather[200:240], weather[500:540]
    proc, http_port, grpc_port = await start_serve_process(snapshot=str(snapshot))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as rest:
        await rest.post("/v1/sessions", json={"model": MODEL, "session_id": "rest-1"})
        first = await rest.post("/v1/sessions/rest-1/steps", json={"inputs": x_rest[:20].tolist(), "seq": 1})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = pb_grpc.PredictorStub(ch)
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="grpc-1"))
        g1 = await stub.Step(pb.StepRequest(session_id="grpc-1", inputs=matrix(x_grpc[:20])))
    log = await stop(proc)
    assert "wrote 2 sessions" in log
    assert snapshot.exists()

    proc, http_port, grpc_port = await start_serve_process(snapshot=str(snapshot))
    try:
        assert not snapshot.exists()  # used once: a crash later cannot bring back these old states
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as rest:
            again = await rest.post("/v1/sessions/rest-1/steps", json={"inputs": x_rest[:20].tolist(), "seq": 1})
            assert again.json()["replayed"] is True  # the retry of the last call before the restart is a replay
            assert again.json()["outputs"] == first.json()["outputs"]
            second = await rest.post("/v1/sessions/rest-1/steps", json={"inputs": x_rest[20:].tolist(), "seq": 2})
            assert second.status_code == 200, second.text
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = pb_grpc.PredictorStub(ch)
            g2 = await stub.Step(pb.StepRequest(session_id="grpc-1", inputs=matrix(x_grpc[20:])))
            assert (g2.steps, g2.seq) == (40, 2)
        got_rest = np.concatenate([np.asarray(first.json()["outputs"]), np.asarray(second.json()["outputs"])])
        np.testing.assert_allclose(got_rest, reference_run(x_rest), atol=ATOL)
        got_grpc = np.concatenate([np.asarray(g.outputs.data).reshape(-1, 7) for g in (g1, g2)])
        np.testing.assert_allclose(got_grpc, reference_run(x_grpc), atol=ATOL)
    finally:
        await stop(proc)


async def test_a_damaged_snapshot_stops_the_start_with_what_to_do(tmp_path: Path) -> None:
    """The server refuses to start on a damaged snapshot (never half-loaded) and says to move it away."""
    snapshot = tmp_path / "sessions.snapshot"
    snapshot.write_bytes(b"PK\x03\x04 not really a snapshot")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "serve", "--models", "models", "--http-port", "0",
        "--grpc-port", "0", "--snapshot", str(snapshot), stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    text = err.decode()
    assert "cannot be restored" in text
    assert "move it away to start without it" in text
    assert "Traceback" not in text
    assert snapshot.exists()
