"""What-if on real servers: peek answers hypothetical steps without touching the session; fork copies a
session into an independent one. Every transport: REST, gRPC unary, gRPC stream, WebSocket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import websockets
from google.protobuf.json_format import MessageToDict

from service.app import Server
from service.errors import ServeError
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from tests.fixtures import reference_run
from tests.integration.conftest import REDIS_URL, ServerFactory, sample

MODEL = "seattle-weather"
ATOL = 1e-5


def matrix(a: np.ndarray) -> pb.Matrix:
    a = np.atleast_2d(a)
    return pb.Matrix(rows=a.shape[0], cols=a.shape[1], data=a.reshape(-1).tolist())


def array(m: pb.Matrix) -> np.ndarray:
    return np.asarray(m.data, np.float32).reshape(m.rows, m.cols)


def rain(x: np.ndarray, mm: float) -> np.ndarray:
    """The same days with the given precipitation: a what-if."""
    y = x.copy()
    y[:, 0] = mm
    return y


async def snapshot(rest: httpx.AsyncClient, sid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything a client can see of a session: its description (times, counters, live accuracy) and state.
    Times to 0.1 ms: the memory store shows its monotonic times on the wall clock, which jitters by about 1 µs
    between two reads (a use moves them by the time since the last one: milliseconds here)."""
    info = await rest.get(f"/v1/sessions/{sid}")
    state = await rest.get(f"/v1/sessions/{sid}/state")
    assert info.status_code == state.status_code == 200
    return info.json(), state.json()


TIMES = ("created", "last_used", "expires", "createdUnix", "lastUsedUnix", "expiresUnix")


def assert_same_session(a: dict[str, Any], b: dict[str, Any], used: bool = False) -> None:
    """Equal, with times within 0.1 ms (see `snapshot`); with `used`, the session may have been used since (a
    fork is a use of its origin: at the cap another session is evicted, not the origin)."""
    assert {k: v for k, v in a.items() if k not in TIMES} == {k: v for k, v in b.items() if k not in TIMES}
    for t in TIMES:
        if t in a:
            assert a[t] >= b[t] - 1e-4 if used else abs(a[t] - b[t]) < 1e-4, t


def described(info: pb.SessionInfo) -> dict[str, Any]:
    return MessageToDict(info)


async def test_a_rest_peek_answers_what_a_step_would_and_leaves_the_session_exactly_as_it_was(
    server: Server, rest: httpx.AsyncClient, weather: np.ndarray
) -> None:
    """After 60 days, peeking at a rainy week returns the outputs stepping it would (the reference run of the
    history plus that week), and the session (state, steps, seq, last use, expiry, live accuracy) is unchanged:
    its next real step gives the reference outputs."""
    sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    r = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": weather[:60].tolist(), "seq": 1})
    assert r.status_code == 200
    before = await snapshot(rest, sid)
    steps_before = sample(server, "lstm_steps_total", model=f"{MODEL}/1")
    week = rain(weather[60:67], 20.0)
    peek = await rest.post(f"/v1/sessions/{sid}/peek", json={"inputs": week.tolist()})
    assert peek.status_code == 200, peek.text
    body = peek.json()
    want = reference_run(np.concatenate([weather[:60], week]))[60:]
    np.testing.assert_allclose(body["outputs"], want, atol=ATOL)
    assert (body["session_id"], body["steps"], body["seq"], body["replayed"]) == (sid, 60, 1, False)
    after = await snapshot(rest, sid)
    assert_same_session(after[0], before[0])
    assert after[1] == before[1]
    assert sample(server, "lstm_steps_total", model=f"{MODEL}/1") == steps_before + 7  # NOTE: computed, counted
    peeks = {"protocol": "rest", "method": "POST /v1/sessions/{session_id}/peek", "code": "200"}
    assert sample(server, "lstm_requests_total", **peeks) == 1
    real = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": weather[60:61].tolist(), "seq": 2})
    np.testing.assert_allclose(real.json()["outputs"], reference_run(weather[:61])[60:], atol=ATOL)


async def test_peek_refuses_what_a_step_refuses_with_the_same_errors(rest: httpx.AsyncClient) -> None:
    sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    cases = [
        (f"/v1/sessions/{sid}/peek", {"inputs": [[1.0, 2.0]]}, 400, "invalid_input", "4 feature values"),
        (f"/v1/sessions/{sid}/peek", {"inputs": []}, 400, "invalid_input", "no steps"),
        (f"/v1/sessions/{sid}/peek", {"inputs": [[1.0, 2.0, 3.0, 4.0]], "seq": 1}, 400, "invalid_input", "seq"),
        ("/v1/sessions/nobody/peek", {"inputs": [[1.0, 2.0, 3.0, 4.0]]}, 404, "session_not_found", "no session"),
    ]
    for path, body, status, code, words in cases:
        r = await rest.post(path, json=body)
        assert (r.status_code, r.json()["code"]) == (status, code), r.text
        assert words in r.json()["error"]
    nan = await rest.post(f"/v1/sessions/{sid}/peek", content=b'{"inputs": [[NaN, 1, 2, 3]]}')
    assert nan.status_code == 400
    assert (await rest.get(f"/v1/sessions/{sid}")).json()["steps"] == 0


async def test_peeks_do_not_keep_an_idle_session_alive(make_server: ServerFactory, weather: np.ndarray) -> None:
    """A session only peeked at expires when its TTL says: a peek is not a use."""
    srv = await make_server(session_ttl_s=1.0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest:
        sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
        for _ in range(4):
            await asyncio.sleep(0.3)
            r = await rest.post(f"/v1/sessions/{sid}/peek", json={"inputs": weather[:1].tolist()})
            if r.status_code == 404:
                break
        await asyncio.sleep(0.5)
        gone = await rest.get(f"/v1/sessions/{sid}")
    assert gone.status_code == 404
    assert "expired" in gone.json()["error"]


async def test_a_rest_fork_is_an_independent_copy(rest: httpx.AsyncClient, weather: np.ndarray) -> None:
    """A fork starts from the origin's state and step count (seq from 0); what it is fed never reaches the
    origin, and the origin's steps never reach it."""
    origin = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    await rest.post(f"/v1/sessions/{origin}/steps", json={"inputs": weather[:50].tolist(), "seq": 1})
    fork = await rest.post(f"/v1/sessions/{origin}/fork", json={"session_id": "rainy-week"})
    assert fork.status_code == 201, fork.text
    info = fork.json()
    assert (info["session_id"], info["model"], info["steps"], info["seq"]) == ("rainy-week", MODEL, 50, 0)
    week = rain(weather[50:57], 30.0)
    got = await rest.post("/v1/sessions/rainy-week/steps", json={"inputs": week.tolist(), "seq": 1})
    np.testing.assert_allclose(
        got.json()["outputs"], reference_run(np.concatenate([weather[:50], week]))[50:], atol=ATOL
    )
    real = await rest.post(f"/v1/sessions/{origin}/steps", json={"inputs": weather[50:57].tolist(), "seq": 2})
    np.testing.assert_allclose(real.json()["outputs"], reference_run(weather[:57])[50:], atol=ATOL)
    again = await rest.post("/v1/sessions/rainy-week/steps", json={"inputs": weather[57:58].tolist()})
    want = reference_run(np.concatenate([weather[:50], week, weather[57:58]]))[57:]
    np.testing.assert_allclose(again.json()["outputs"], want, atol=ATOL)

    taken = await rest.post(f"/v1/sessions/{origin}/fork", json={"session_id": "rainy-week"})
    assert (taken.status_code, taken.json()["code"]) == (409, "session_exists")
    missing = await rest.post("/v1/sessions/nobody/fork", json={})
    assert (missing.status_code, missing.json()["code"]) == (404, "session_not_found")
    generated = await rest.post(f"/v1/sessions/{origin}/fork", json={})
    assert generated.status_code == 201
    assert len(generated.json()["session_id"]) == 32
    bad = await rest.post(f"/v1/sessions/{origin}/fork", json={"session_id": "no spaces"})
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_input")


async def test_a_fork_scores_only_when_asked_and_a_peek_never_does(
    server: Server, rest: httpx.AsyncClient, weather: np.ndarray
) -> None:
    """What-if inputs must not count as the truth: an unscored fork (the default) and peeks add nothing to the
    model's live accuracy; a scored fork scores from the fork on, including the forecasts made before it."""
    origin = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    await rest.post(f"/v1/sessions/{origin}/steps", json={"inputs": weather[:30].tolist()})
    labels = {"model": MODEL, "version": "1", "horizon": "1"}
    scored = sample(server, "lstm_forecasts_scored_total", **labels)
    quiet = (await rest.post(f"/v1/sessions/{origin}/fork", json={"session_id": "quiet"})).json()
    await rest.post("/v1/sessions/quiet/steps", json={"inputs": rain(weather[30:40], 50.0).tolist()})
    await rest.post(f"/v1/sessions/{origin}/peek", json={"inputs": rain(weather[30:40], 50.0).tolist()})
    assert sample(server, "lstm_forecasts_scored_total", **labels) == scored
    assert (await rest.get(f"/v1/sessions/{quiet['session_id']}")).json()["live_accuracy"] == {
        "scored": False,
        "horizons": [],
    }
    await rest.post(f"/v1/sessions/{origin}/fork", json={"session_id": "real", "scored": True})
    await rest.post("/v1/sessions/real/steps", json={"inputs": weather[30:40].tolist()})
    assert sample(server, "lstm_forecasts_scored_total", **labels) == scored + 10
    real = (await rest.get("/v1/sessions/real")).json()["live_accuracy"]
    assert real["scored"] is True
    assert [h["count"] for h in real["horizons"]] == [10] * 7  # NOTE: the origin's pending forecasts resolve too
    whole = (await rest.get(f"/v1/sessions/{origin}")).json()["live_accuracy"]
    assert [h["count"] for h in whole["horizons"]] == [30 - k for k in range(1, 8)]


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        yield ch


async def test_grpc_peek_and_fork(channel: grpc.aio.Channel, weather: np.ndarray) -> None:
    """Peek and ForkSession over gRPC: the same semantics, status codes for errors."""
    stub = pb_grpc.PredictorStub(channel)
    sid = (await stub.CreateSession(pb.CreateSessionRequest(model=MODEL))).session_id
    await stub.Step(pb.StepRequest(session_id=sid, inputs=matrix(weather[:40]), seq=1))
    before = await stub.GetSession(pb.SessionRef(session_id=sid))
    week = rain(weather[40:47], 15.0)
    peek = await stub.Peek(pb.PeekRequest(session_id=sid, inputs=matrix(week)))
    want = reference_run(np.concatenate([weather[:40], week]))[40:]
    np.testing.assert_allclose(array(peek.outputs), want, atol=ATOL)
    assert (peek.steps, peek.seq) == (40, 1)
    assert_same_session(described(await stub.GetSession(pb.SessionRef(session_id=sid))), described(before))

    fork = await stub.ForkSession(pb.ForkSessionRequest(session_id=sid, new_session_id="g-fork"))
    assert (fork.session_id, fork.steps, fork.seq) == ("g-fork", 40, 0)
    got = await stub.Step(pb.StepRequest(session_id="g-fork", inputs=matrix(week)))
    np.testing.assert_allclose(array(got.outputs), want, atol=ATOL)
    after = described(await stub.GetSession(pb.SessionRef(session_id=sid)))
    assert_same_session(after, described(before), used=True)

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Peek(pb.PeekRequest(session_id=sid, inputs=matrix(weather[:1, :2])))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ForkSession(pb.ForkSessionRequest(session_id=sid, new_session_id="g-fork"))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Peek(pb.PeekRequest(session_id="nobody", inputs=matrix(weather[:1])))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_peek_on_a_grpc_stream_leaves_the_stream_session_as_it_was(
    channel: grpc.aio.Channel, weather: np.ndarray
) -> None:
    """A stream message with peek answers the what-if in order; the next real steps (with seq) continue from
    the session as it was, and a peek with a seq is refused in-band."""
    stub = pb_grpc.PredictorStub(channel)
    call = stub.Stream()
    await call.write(pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL), inputs=matrix(weather[:20]), seq=1))
    first = await call.read()
    week = rain(weather[20:27], 25.0)
    await call.write(pb.StreamRequest(inputs=matrix(week), peek=True))
    peeked = await call.read()
    assert not peeked.HasField("error"), peeked.error
    np.testing.assert_allclose(
        array(peeked.outputs), reference_run(np.concatenate([weather[:20], week]))[20:], atol=ATOL
    )
    assert (peeked.steps, peeked.seq) == (20, 1)
    await call.write(pb.StreamRequest(inputs=matrix(week), peek=True, seq=2))
    refused = await call.read()
    assert refused.error.code == "invalid_input"
    await call.write(pb.StreamRequest(inputs=matrix(weather[20:21]), seq=2))
    real = await call.read()
    assert (real.steps, real.seq) == (21, 2)
    np.testing.assert_allclose(array(real.outputs), reference_run(weather[:21])[20:], atol=ATOL)
    await call.done_writing()
    assert first.session.model == MODEL


async def test_a_peek_on_a_websocket_stream(server: Server, weather: np.ndarray) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{server.http_port}/v1/sessions/stream") as ws:
        await ws.send(json.dumps({"model": MODEL, "inputs": weather[:10].tolist()}))
        json.loads(await ws.recv())
        await ws.send(json.dumps({"inputs": rain(weather[10:12], 40.0).tolist(), "peek": True}))
        peeked = json.loads(await ws.recv())
        want = reference_run(np.concatenate([weather[:10], rain(weather[10:12], 40.0)]))[10:]
        np.testing.assert_allclose(peeked["outputs"], want, atol=ATOL)
        assert peeked["steps"] == 10
        await ws.send(json.dumps({"inputs": weather[10:11].tolist()}))
        real = json.loads(await ws.recv())
        assert real["steps"] == 11
        np.testing.assert_allclose(real["outputs"], reference_run(weather[:11])[10:], atol=ATOL)


async def test_peek_and_fork_on_a_shared_redis_store(
    make_server: ServerFactory, prefix: str, weather: np.ndarray
) -> None:
    """On Redis, a fork made on one replica steps on another, and a peek there leaves the session unchanged."""
    a = await make_server(state_store=REDIS_URL, redis_key_prefix=prefix)
    b = await make_server(state_store=REDIS_URL, redis_key_prefix=prefix)
    async with httpx.AsyncClient(timeout=30) as http:
        ua, ub = f"http://127.0.0.1:{a.http_port}", f"http://127.0.0.1:{b.http_port}"
        sid = (await http.post(f"{ua}/v1/sessions", json={"model": MODEL})).json()["session_id"]
        await http.post(f"{ua}/v1/sessions/{sid}/steps", json={"inputs": weather[:25].tolist(), "seq": 1})
        before = (await http.get(f"{ub}/v1/sessions/{sid}")).json()
        peek = await http.post(f"{ub}/v1/sessions/{sid}/peek", json={"inputs": weather[25:27].tolist()})
        np.testing.assert_allclose(peek.json()["outputs"], reference_run(weather[:27])[25:], atol=ATOL)
        assert_same_session((await http.get(f"{ua}/v1/sessions/{sid}")).json(), before)
        fork = await http.post(f"{ua}/v1/sessions/{sid}/fork", json={"session_id": "shared-fork"})
        assert fork.status_code == 201
        got = await http.post(f"{ub}/v1/sessions/shared-fork/steps", json={"inputs": weather[25:27].tolist()})
        np.testing.assert_allclose(got.json()["outputs"], reference_run(weather[:27])[25:], atol=ATOL)
        assert_same_session((await http.get(f"{ub}/v1/sessions/{sid}")).json(), before, used=True)


async def test_an_unscored_fork_stays_unscored_through_reset_and_import(
    server: Server, rest: httpx.AsyncClient, weather: np.ndarray
) -> None:
    """Reset and import start a session's live accuracy again, but a what-if fork stays a what-if fork: its
    made-up inputs never count as the truth."""
    origin = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    await rest.post(f"/v1/sessions/{origin}/steps", json={"inputs": weather[:30].tolist()})
    assert (await rest.post(f"/v1/sessions/{origin}/fork")).status_code == 201  # NOTE: no body: all defaults
    await rest.post(f"/v1/sessions/{origin}/fork", json={"session_id": "quiet"})
    labels = {"model": MODEL, "version": "1", "horizon": "1"}
    scored = sample(server, "lstm_forecasts_scored_total", **labels)
    fake = rain(weather[30:40], 80.0)
    assert (await rest.post("/v1/sessions/quiet/reset")).status_code == 200
    await rest.post("/v1/sessions/quiet/steps", json={"inputs": fake.tolist()})
    snap = (await rest.get(f"/v1/sessions/{origin}/state")).json()
    assert (await rest.post("/v1/sessions/quiet/state", json=snap)).status_code == 200
    await rest.post("/v1/sessions/quiet/steps", json={"inputs": fake.tolist()})
    assert (await rest.get("/v1/sessions/quiet")).json()["live_accuracy"] == {"scored": False, "horizons": []}
    assert sample(server, "lstm_forecasts_scored_total", **labels) == scored
    # a reset of a scored session starts its scores again, scored
    await rest.post(f"/v1/sessions/{origin}/reset")
    await rest.post(f"/v1/sessions/{origin}/steps", json={"inputs": weather[:3].tolist()})
    again = (await rest.get(f"/v1/sessions/{origin}")).json()["live_accuracy"]
    assert again["scored"] is True
    assert [h["count"] for h in again["horizons"]][:3] == [2, 1, 0]


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_fork_at_the_cap_evicts_another_session_never_its_origin(
    make_server: ServerFactory, prefix: str, store: str, weather: np.ndarray
) -> None:
    """With evict_lru at the cap, forking the least recently used session evicts the next one: the fork is a use
    of its origin. With room for one session only, the fork is refused (429) and the origin stays."""
    extra = {"state_store": REDIS_URL, "redis_key_prefix": prefix} if store == "redis" else {}
    srv = await make_server(max_sessions=2, session_cap_policy="evict_lru", **extra)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest:
        for sid in ("origin", "other"):
            await rest.post("/v1/sessions", json={"model": MODEL, "session_id": sid})
            await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": weather[:5].tolist()})
            await asyncio.sleep(0.01)
        assert (await rest.post("/v1/sessions/origin/fork", json={"session_id": "f"})).status_code == 201
        assert (await rest.get("/v1/sessions/origin")).status_code == 200
        gone = await rest.get("/v1/sessions/other")
        assert gone.status_code == 404
        assert "evicted" in gone.json()["error"]
    alone = await make_server(max_sessions=1, session_cap_policy="evict_lru", **extra)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{alone.http_port}", timeout=30) as rest:
        await rest.post("/v1/sessions", json={"model": MODEL, "session_id": "only"})
        refused = await rest.post("/v1/sessions/only/fork", json={"session_id": "f"})
        assert (refused.status_code, refused.json()["code"]) == (429, "session_limit")
        assert (await rest.get("/v1/sessions/only")).status_code == 200


async def test_a_fork_that_races_a_forced_unload_leaves_no_session_behind(
    make_server: ServerFactory, prefix: str, tmp_path: Path
) -> None:
    """On Redis, a fork whose version is unloaded while it reads the origin ends like the origin (unloaded),
    and no session of the unloaded version is left in Redis."""
    import shutil

    import redis.asyncio as aioredis

    from tests.conftest import SHIPPED_MODEL

    repo = tmp_path / "models"
    for v in ("1", "2"):
        shutil.copytree(SHIPPED_MODEL, repo / MODEL / v)
    srv = await make_server(models=repo, state_store=REDIS_URL, redis_key_prefix=prefix)
    dp, store = srv.dataplane, srv.store
    await dp.create_session(MODEL, "1", "src")
    reading, go = asyncio.Event(), asyncio.Event()
    load = store._load  # type: ignore[attr-defined]

    async def slow_load(sid: str) -> Any:  # NOTE: the real read, held until the unload has run
        st = await load(sid)
        if sid == "src" and not reading.is_set():
            reading.set()
            await go.wait()
        return st

    store._load = slow_load  # type: ignore[attr-defined]
    fork = asyncio.create_task(dp.fork_session("src", "orphan"))
    await reading.wait()
    assert await dp.remove_model(MODEL, "1", force=True) == 1
    go.set()
    with pytest.raises(ServeError) as e:
        await fork
    assert e.value.code.value in ("session_not_found", "unavailable")
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert not await r.exists(f"{prefix}s:orphan")
        assert await r.zscore(f"{prefix}idx:{MODEL}/1", "orphan") is None
    finally:
        await r.aclose()
