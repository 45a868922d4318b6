"""Replicas on one Redis: every server serves every session, and a replica killed with SIGKILL loses no
applied step (clients retry on the other with their seq and get the same outputs)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import redis.asyncio as aioredis

from service.app import Server
from service.client import AsyncClient
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from tests.conftest import SHIPPED_MODEL
from tests.fixtures import reference_run
from tests.integration.conftest import ServerFactory, start_serve_process
from tests.integration.test_session_stores import REDIS_URL, free_port, private_redis

MODEL = "seattle-weather"
HOURLY = "seattle-temps"
ATOL = 1e-5


def matrix(row: np.ndarray) -> pb.Matrix:
    return pb.Matrix(rows=1, cols=4, data=[float(v) for v in row])


async def test_a_session_stepped_alternately_through_two_replicas_matches_one_offline_run(
    make_server: ServerFactory, prefix: str, weather: np.ndarray
) -> None:
    """Created on replica A over REST, stepped alternately on A (REST) and B (gRPC), read on B: the outputs are
    one offline run's, and both replicas count the session."""
    shared = {"state_store": REDIS_URL, "redis_key_prefix": prefix}
    a: Server = await make_server(**shared)
    b: Server = await make_server(**shared)
    x = weather[300:340]
    outs = []
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{a.http_port}") as rest,
        grpc.aio.insecure_channel(f"127.0.0.1:{b.grpc_port}") as channel,
    ):
        stub = pb_grpc.PredictorStub(channel)
        sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
        for k, row in enumerate(x):
            if k % 2 == 0:
                r = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": [row.tolist()], "seq": k + 1})
                assert r.status_code == 200, r.text
                outs.append(np.asarray(r.json()["outputs"], np.float32))
            else:
                reply = await stub.Step(pb.StepRequest(session_id=sid, inputs=matrix(row), seq=k + 1))
                outs.append(np.asarray(reply.outputs.data, np.float32).reshape(1, 7))
        info = await stub.GetSession(pb.SessionRef(session_id=sid))
        assert (info.steps, info.seq) == (40, 40)
        assert await a.store.count() == await b.store.count() == 1
    np.testing.assert_allclose(np.concatenate(outs), reference_run(x), atol=ATOL)


async def start_replica(prefix: str) -> tuple[asyncio.subprocess.Process, int]:
    """The real entry point with the Redis store; returns the process and its REST port."""
    proc, http_port, _ = await start_serve_process(state_store=REDIS_URL, redis_key_prefix=prefix)
    return proc, http_port


async def test_killing_a_replica_mid_traffic_loses_no_applied_step(prefix: str, weather: np.ndarray) -> None:
    """Eight clients step their sessions with seq, spread over two replica processes; one is killed with
    SIGKILL mid-way. Clients whose call failed retry it on the survivor with the same seq (a replay if it was
    applied, a first application if not). Every session ends with exactly its 30 steps and one offline run's
    outputs."""
    procs = [await start_replica(prefix), await start_replica(prefix)]
    ports = [port for _, port in procs]
    alive = [True, True]
    steps, n = 30, 8
    done, retried = [0], [0]
    third = asyncio.Event()
    try:
        async with httpx.AsyncClient(timeout=10) as client:

            async def drive(k: int) -> np.ndarray:
                start = 100 * k
                sid = (await client.post(f"http://127.0.0.1:{ports[0]}/v1/sessions", json={"model": MODEL})).json()[
                    "session_id"
                ]
                outs = []
                for t in range(steps):
                    body = {"inputs": [weather[start + t].tolist()], "seq": t + 1}
                    for attempt in range(2 * len(ports)):
                        which = (k + t + attempt) % 2
                        if not alive[which]:
                            continue
                        try:
                            r = await client.post(f"http://127.0.0.1:{ports[which]}/v1/sessions/{sid}/steps", json=body)
                        except httpx.TransportError:
                            retried[0] += 1
                            continue  # the replica died under this call: retry it elsewhere with the same seq
                        assert r.status_code == 200, r.text
                        outs.append(np.asarray(r.json()["outputs"], np.float32))
                        done[0] += 1
                        if done[0] >= n * steps // 3:
                            third.set()
                        break
                    else:
                        raise AssertionError("no replica answered")
                info = (await client.get(f"http://127.0.0.1:{ports[1]}/v1/sessions/{sid}")).json()
                assert (info["steps"], info["seq"]) == (steps, steps)
                return np.concatenate(outs)

            async def kill_first() -> None:
                await third.wait()  # NOTE: a third of the steps done, the clients still stepping
                procs[0][0].send_signal(signal.SIGKILL)
                await procs[0][0].wait()
                alive[0] = False
                assert done[0] < n * steps * 2 // 3

            results = await asyncio.gather(*(drive(k) for k in range(n)), kill_first())
        assert retried[0] >= 1  # calls were in flight on the killed replica
        for k in range(n):
            got = results[k]
            assert got is not None
            np.testing.assert_allclose(got, reference_run(weather[100 * k : 100 * k + steps]), atol=ATOL)
    finally:
        for proc, _ in procs:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


async def test_a_server_whose_redis_goes_away_answers_503_turns_unready_and_recovers(
    make_server: ServerFactory, weather: np.ndarray
) -> None:
    """Redis killed under a running server: steps get 503 unavailable with Retry-After within the timeout (never
    a 500 or a hang), the items of a step batch each say so, and /readyz turns 503; with Redis back on its
    address, the server is ready again by itself."""
    port = free_port()
    start = private_redis(port)
    proc = start()
    try:
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(50):
            with contextlib.suppress(Exception):
                r = aioredis.Redis.from_url(url)
                await r.ping()
                await r.aclose()
                break
            await asyncio.sleep(0.1)
        srv: Server = await make_server(state_store=url, redis_timeout_ms=300)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=10) as rest:
            assert (await rest.get("/readyz")).status_code == 200
            sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
            body = {"inputs": [weather[0].tolist()]}
            assert (await rest.post(f"/v1/sessions/{sid}/steps", json=body)).status_code == 200
            proc.kill()
            proc.wait()
            t0 = time.perf_counter()
            r = await rest.post(f"/v1/sessions/{sid}/steps", json=body)
            assert time.perf_counter() - t0 < 3
            assert (r.status_code, r.json()["code"], r.headers["Retry-After"]) == (503, "unavailable", "1")
            assert "Redis" in r.json()["error"]
            # NOTE: a step batch answers each item as its own call would (not the whole call with one 503)
            steps = [{"session_id": sid, "inputs": [weather[0].tolist()]}, {"session_id": "other", "inputs": [[0] * 4]}]
            r = await rest.post("/v1/steps", json={"steps": steps})
            assert r.status_code == 200, r.text
            assert [res["error"]["code"] for res in r.json()["results"]] == ["unavailable", "unavailable"]
            assert (await rest.get("/readyz")).status_code == 503
            proc = start()
            deadline = time.monotonic() + 15
            while (await rest.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "the server did not become ready again"
                await asyncio.sleep(0.1)
            sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
            assert (await rest.post(f"/v1/sessions/{sid}/steps", json=body)).status_code == 200
    finally:
        proc.kill()
        proc.wait()


async def replicas(
    make_server: ServerFactory,
    prefix: str,
    tmp: Path,
    a_versions: tuple[str, ...],
    b_versions: tuple[str, ...],
    **extra: Any,
) -> tuple[Server, Server]:
    """Replicas A and B on one Redis, serving these versions of the daily model (copies of the shipped one)."""
    made = []
    for name, versions in (("a", a_versions), ("b", b_versions)):
        for v in versions:
            shutil.copytree(SHIPPED_MODEL, tmp / name / MODEL / v)
        made.append(await make_server(models=tmp / name, state_store=REDIS_URL, redis_key_prefix=prefix, **extra))
    return made[0], made[1]


async def test_a_session_of_a_version_this_replica_has_not_loaded_is_retry_later_and_left_alone(
    make_server: ServerFactory, prefix: str, weather: np.ndarray, tmp_path: Path
) -> None:
    """Mid rolling update: replica A has loaded version 2 of the daily model, B still serves version 1 only. On B,
    every call about a session A opened on version 2 is 503 unavailable, "retry ... on the replica that loaded
    it": /v1 steps, reads and deletes, KServe infer (it was 404 "no such session", or "no version 2", and a client
    would have opened a new one); in a packed batch that row fails alone (the whole batch failed). The session is
    left alone: not counted among B's version's sessions (B's gather indexed it there, so that an unload of
    version 1 ended it), and A steps it."""
    a, b = await replicas(make_server, prefix, tmp_path, ("1", "2"), ("1",))
    x = weather[:1].tolist()
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{a.http_port}") as rest_a,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{b.http_port}") as rest_b,
        AsyncClient(f"127.0.0.1:{b.grpc_port}") as grpc_b,
    ):
        new = (await rest_a.post("/v1/sessions", json={"model": MODEL})).json()
        assert new["version"] == "2"
        fresh = new["session_id"]
        old_one = (await rest_a.post("/v1/sessions", json={"model": MODEL, "version": "1"})).json()["session_id"]
        kserve = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x}],
                  "parameters": {"sequence_id": fresh}}  # fmt: skip
        for reply in (
            await rest_b.post(f"/v1/sessions/{fresh}/steps", json={"inputs": x}),
            await rest_b.get(f"/v1/sessions/{fresh}"),
            await rest_b.delete(f"/v1/sessions/{fresh}"),
            await rest_b.post(f"/v2/models/{MODEL}/infer", json=kserve),
        ):
            assert reply.status_code == 503, reply.text
            assert "does not serve (yet)" in reply.text
        got = await grpc_b.step_packed([old_one, fresh], np.stack([weather[:1], weather[1:2]]))
        assert sorted(got.errors) == [1]
        assert got.errors[1].code == "unavailable"
        assert "does not serve (yet)" in got.errors[1].message
        assert got.steps[0] == 1
        assert await b.store.count(f"{MODEL}/1") == 1  # NOTE: old_one only
        assert await b.store.count(f"{MODEL}/2") == 1
        assert (await rest_a.get(f"/v1/sessions/{fresh}")).json()["steps"] == 0
        r = await rest_a.post(f"/v1/sessions/{fresh}/steps", json={"inputs": x})
        assert r.status_code == 200, r.text


async def test_a_session_of_a_version_unloaded_here_but_served_elsewhere_is_retry_not_ended(
    make_server: ServerFactory, prefix: str, weather: np.ndarray, tmp_path: Path
) -> None:
    """B unloads version 1 (forced) while A still serves it; a session A opens on version 1 afterwards lives. B
    answers its step as it answers a read: 503 "retry, or on the replica that loaded it" (the step said 404
    "ended: its model version was unloaded; create a new session")."""
    a, b = await replicas(make_server, prefix, tmp_path, ("1", "2"), ("1", "2"), model_poll_s=0)
    x = weather[:1].tolist()
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{a.http_port}") as rest_a,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{b.http_port}") as rest_b,
    ):
        r = await rest_b.post(
            f"/v2/repository/models/{MODEL}/unload", json={"parameters": {"version": "1", "force": True}}
        )
        assert r.status_code == 200, r.text
        sid = (await rest_a.post("/v1/sessions", json={"model": MODEL, "version": "1"})).json()["session_id"]
        for reply in (await rest_b.post(f"/v1/sessions/{sid}/steps", json={"inputs": x}),
                      await rest_b.get(f"/v1/sessions/{sid}")):  # fmt: skip
            assert reply.status_code == 503, reply.text
            assert "does not serve (yet)" in reply.text
        r = await rest_a.post(f"/v1/sessions/{sid}/steps", json={"inputs": x})
        assert r.status_code == 200, r.text
