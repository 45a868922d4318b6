"""`--workers N`: N processes behind the same two ports, sessions shared through Redis, metrics summed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np

from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from tests.conftest import SHIPPED_REPO
from tests.fixtures import reference_run
from tests.integration.conftest import REDIS_URL, start_serve_process
from tests.integration.test_replicas import ATOL, MODEL, matrix

ROOT = Path(__file__).resolve().parents[2]


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.append(int(d))
    return out


def cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[11]) + int(stat[12])


async def test_two_workers_share_the_ports_and_every_session(prefix: str, weather: np.ndarray) -> None:
    """Two workers behind one REST and one gRPC port: a session stepped 40 times, each time on a new
    connection (REST and gRPC alternately), gives one offline run's outputs though the kernel spread the
    connections over both workers (each used CPU); /metrics on any connection counts all 40 steps; SIGTERM
    drains both and the command exits 0."""
    proc, http_port, grpc_port = await start_serve_process(workers="2", state_store=REDIS_URL, redis_key_prefix=prefix)
    try:
        await asyncio.sleep(1.0)  # NOTE: the second worker's log line may come just after the first's
        pids = children(proc.pid)
        assert len(pids) == 2, pids
        before = {p: cpu_ticks(p) for p in pids}
        x = weather[100:140]
        outs = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as rest:
            sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
        for k, row in enumerate(x):
            if k % 2 == 0:
                # NOTE: a new connection each time, so that the kernel picks a worker each time
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as rest:
                    r = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": [row.tolist()], "seq": k + 1})
                assert r.status_code == 200, r.text
                outs.append(np.asarray(r.json()["outputs"], np.float32))
            else:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                    reply = await pb_grpc.PredictorStub(channel).Step(
                        pb.StepRequest(session_id=sid, inputs=matrix(row), seq=k + 1)
                    )
                outs.append(np.asarray(reply.outputs.data, np.float32).reshape(1, 7))
        np.testing.assert_allclose(np.concatenate(outs), reference_run(x), atol=ATOL)
        used = {p: cpu_ticks(p) - before[p] for p in pids}
        assert all(t > 0 for t in used.values()), used
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as rest:
            text = (await rest.get("/metrics")).text
            # NOTE: a repository call would reach one worker only: refused, with what to do instead
            r = await rest.post(f"/v2/repository/models/{MODEL}/unload", json={"parameters": {"version": "1"}})
            assert (r.status_code, "would change one worker only" in r.json()["error"]) == (400, True)
        steps_route = 'method="POST /v1/sessions/{session_id}/steps"'
        assert f'lstm_requests_total{{code="200",{steps_route},protocol="rest"}} 20.0' in text
        assert 'lstm_requests_total{code="OK",method="Step",protocol="grpc"} 20.0' in text
        assert 'lstm_steps_total{model="seattle-weather/1"} 40.0' in text
        assert "lstm_ready 1.0" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert children(proc.pid) == []


def test_workers_without_a_shared_store_are_refused_with_advice() -> None:
    """More than one worker on the memory store would split the sessions: refused at start, saying what to do."""
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--models", str(SHIPPED_REPO), "--workers", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--workers 2 needs a shared session store" in out.stderr
    assert "--state-store redis://" in out.stderr
