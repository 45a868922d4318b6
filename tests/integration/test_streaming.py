"""Streaming correctness on the shipped model: every transport gives the offline ONNX Runtime outputs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import websockets

from service.app import Server
from service.client import AsyncClient, Client, ClientError
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from tests.fixtures import reference_run
from tests.integration.conftest import ServerFactory

ATOL = 1e-5
MODEL = "seattle-weather"


def matrix(a: np.ndarray) -> pb.Matrix:
    a = np.atleast_2d(a)
    return pb.Matrix(rows=a.shape[0], cols=a.shape[1], data=a.reshape(-1).tolist())


def array(m: pb.Matrix) -> np.ndarray:
    return np.asarray(m.data, np.float32).reshape(m.rows, m.cols)


async def test_grpc_stream_step_by_step_matches_one_offline_run(
    stub: pb_grpc.PredictorStub, weather: np.ndarray
) -> None:
    """90 days sent one per message over a bidirectional stream give the offline whole-sequence outputs."""
    x = weather[:90]

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        yield pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL))
        for row in x:
            yield pb.StreamRequest(inputs=matrix(row))

    replies = [r async for r in stub.Stream(requests())]
    assert replies[0].session.model == MODEL
    got = np.concatenate([array(r.outputs) for r in replies[1:]])
    np.testing.assert_allclose(got, reference_run(x), atol=ATOL)
    assert [r.steps for r in replies[1:]] == list(range(1, 91))


async def test_rest_steps_in_chunks_match_one_offline_run(rest: httpx.AsyncClient, weather: np.ndarray) -> None:
    """The same sequence over REST, in uneven chunks of 1 to 7 steps, gives the same outputs."""
    x = weather[100:190]
    sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    outs, i = [], 0
    for size in [1, 7, 3, 1, 5, 2] * 10:
        if i >= len(x):
            break
        r = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": x[i : i + size].tolist()})
        assert r.status_code == 200, r.text
        outs.append(np.asarray(r.json()["outputs"], np.float32))
        i += size
    np.testing.assert_allclose(np.concatenate(outs), reference_run(x), atol=ATOL)


async def test_websocket_stream_matches_one_offline_run(server: Server, weather: np.ndarray) -> None:
    """A browser-style WebSocket stream (JSON messages) gives the offline outputs and in-band errors."""
    x = weather[200:260]
    async with websockets.connect(f"ws://127.0.0.1:{server.http_port}/v1/sessions/stream") as ws:
        await ws.send(json.dumps({"model": MODEL, "session_id": "browser-1"}))
        first = json.loads(await ws.recv())
        assert first["session"]["session_id"] == "browser-1"
        outs = []
        for k, row in enumerate(x):
            await ws.send(json.dumps({"inputs": [row.tolist()]}))
            outs.append(json.loads(await ws.recv())["outputs"][0])
            if k == 10:
                await ws.send(json.dumps({"inputs": [[1, 2]]}))
                bad = json.loads(await ws.recv())
                assert bad["code"] == "invalid_input"
                assert "4 feature values" in bad["error"]
    np.testing.assert_allclose(np.asarray(outs, np.float32), reference_run(x), atol=ATOL)
    await asyncio.sleep(0.05)
    assert await server.store.count() == 0  # the session closed with the socket


async def test_step_batch_over_grpc_and_rest_matches_offline_runs(
    stub: pb_grpc.PredictorStub, rest: httpx.AsyncClient, weather: np.ndarray
) -> None:
    """StepBatch carries one step for each of 6 sessions per request; each session gets its own outputs."""
    starts = [0, 50, 300, 600, 900, 1200]
    sids = [(await stub.CreateSession(pb.CreateSessionRequest(model=MODEL))).session_id for _ in starts]
    outs: list[list[np.ndarray]] = [[] for _ in starts]
    for t in range(30):
        if t % 2 == 0:
            reply = await stub.StepBatch(
                pb.StepBatchRequest(
                    steps=[
                        pb.StepRequest(session_id=s, inputs=matrix(weather[o + t]))
                        for s, o in zip(sids, starts, strict=True)
                    ]
                )
            )
            for k, res in enumerate(reply.results):
                outs[k].append(array(res.response.outputs))
        else:
            body = {
                "steps": [
                    {"session_id": s, "inputs": [weather[o + t].tolist()]} for s, o in zip(sids, starts, strict=True)
                ]
            }
            r = await rest.post("/v1/steps", json=body)
            for k, res in enumerate(r.json()["results"]):
                outs[k].append(np.asarray(res["result"]["outputs"], np.float32))
    for k, o in enumerate(starts):
        np.testing.assert_allclose(np.concatenate(outs[k]), reference_run(weather[o : o + 30]), atol=ATOL)


async def test_one_session_alternating_rest_and_grpc_matches_offline_run(
    stub: pb_grpc.PredictorStub, rest: httpx.AsyncClient, weather: np.ndarray
) -> None:
    """Steps of one session alternate between REST and gRPC; the state carries across transports."""
    x = weather[400:440]
    sid = (await rest.post("/v1/sessions", json={"model": MODEL, "session_id": "both-ways"})).json()["session_id"]
    outs = []
    for t, row in enumerate(x):
        if t % 2:
            reply = await stub.Step(pb.StepRequest(session_id=sid, inputs=matrix(row)))
            outs.append(array(reply.outputs))
        else:
            r = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": [row.tolist()]})
            outs.append(np.asarray(r.json()["outputs"], np.float32))
    np.testing.assert_allclose(np.concatenate(outs), reference_run(x), atol=ATOL)


async def test_many_concurrent_sessions_are_batched_and_each_gets_its_own_outputs(
    make_server: ServerFactory, weather: np.ndarray
) -> None:
    """32 sessions with different sequences step concurrently over gRPC; batches form, outputs stay separate.
    (With a 5 ms batching budget: on a loaded machine a round trip of client and server, which share this
    process, can take longer than the default 1 ms, and then nothing is worth waiting for.)"""
    server: Server = await make_server(max_queue_delay_ms=5)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = pb_grpc.PredictorStub(channel)
    n, steps = 32, 20
    starts = [37 * k for k in range(n)]
    sids = [(await stub.CreateSession(pb.CreateSessionRequest(model=MODEL))).session_id for _ in starts]

    async def drive(sid: str, start: int) -> np.ndarray:
        outs = []
        for t in range(steps):
            reply = await stub.Step(pb.StepRequest(session_id=sid, inputs=matrix(weather[start + t])))
            outs.append(array(reply.outputs))
        return np.concatenate(outs)

    results = await asyncio.gather(*(drive(s, o) for s, o in zip(sids, starts, strict=True)))
    for got, start in zip(results, starts, strict=True):
        np.testing.assert_allclose(got, reference_run(weather[start : start + steps]), atol=ATOL)
    reg, labels = server.metrics.registry, {"model": "seattle-weather/1"}
    assert reg.get_sample_value("lstm_batch_size_sum", labels) == n * steps
    assert reg.get_sample_value("lstm_batch_size_count", labels) < n * steps / 2  # steps were coalesced
    await channel.close()


async def test_predict_is_stateless_and_matches_offline_run(
    rest: httpx.AsyncClient, stub: pb_grpc.PredictorStub, weather: np.ndarray
) -> None:
    """Predict over REST and gRPC returns every step's outputs of a whole sequence from a zero state."""
    x = weather[700:730]
    r = await rest.post(f"/v1/models/{MODEL}/predict", json={"inputs": x.tolist()})
    np.testing.assert_allclose(np.asarray(r.json()["outputs"], np.float32), reference_run(x), atol=ATOL)
    reply = await stub.Predict(pb.PredictRequest(model=MODEL, inputs=matrix(x)))
    np.testing.assert_allclose(array(reply.outputs), reference_run(x), atol=ATOL)
    assert (reply.model, reply.version) == (MODEL, "1")


async def test_python_clients_stream_observations_as_numpy(server: Server, weather: np.ndarray) -> None:
    """The sync and asyncio clients stream an iterable of rows and yield one [O] forecast per row."""
    x = weather[800:850]
    target = f"127.0.0.1:{server.grpc_port}"

    def sync_run() -> np.ndarray:
        with Client(target) as c:
            assert MODEL in [m.name for m in c.list_models()]
            return np.stack(list(c.stream(MODEL, x)))

    got = await asyncio.to_thread(sync_run)
    assert got.shape == (50, 7)
    np.testing.assert_allclose(got, reference_run(x), atol=ATOL)
    async with AsyncClient(target) as ac:
        agot = np.stack([f async for f in ac.stream(MODEL, x)])
        sid = (await ac.create_session(MODEL)).session_id
        first = await ac.step(sid, x[:10])
    np.testing.assert_allclose(agot, reference_run(x), atol=ATOL)
    np.testing.assert_allclose(first, reference_run(x[:10]), atol=ATOL)


async def test_a_stream_the_client_abandons_closes_its_session(server: Server, weather: np.ndarray) -> None:
    """Cancelling a gRPC stream mid-way (client gone) deletes its session promptly; kept sessions stay."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.PredictorStub(channel)
        for keep in (False, True):
            gate = asyncio.Event()

            async def requests(keep: bool = keep, gate: asyncio.Event = gate) -> AsyncIterator[pb.StreamRequest]:
                yield pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL), keep=keep)
                yield pb.StreamRequest(inputs=matrix(weather[0]))
                await gate.wait()  # NOTE: never set: the client hangs until it cancels

            call = stub.Stream(requests())
            await call.read()
            await call.read()
            assert await server.store.count() == 1

            def streams_ended() -> float:
                name = "lstm_stream_duration_seconds_count"
                return server.metrics.registry.get_sample_value(name, {"protocol": "grpc"}) or 0.0

            ended = streams_ended()
            call.cancel()
            # NOTE: wait until the server has processed the cancel (its stream ended), then look at the session
            deadline = time.monotonic() + 10
            while streams_ended() == ended:
                assert time.monotonic() < deadline, "the server never saw the cancel"
                await asyncio.sleep(0.01)
            assert await server.store.count() == (0 if not keep else 1)


async def test_websocket_misuse_gets_in_band_errors_and_keeps_the_session(
    make_server: Any, weather: np.ndarray
) -> None:
    """Wrong types, binary frames, deep nesting and oversize messages are answered in-band; the stream goes on."""
    srv: Server = await make_server(max_body_bytes=64 * 1024)
    async with websockets.connect(f"ws://127.0.0.1:{srv.http_port}/v1/sessions/stream") as ws:
        await ws.send(json.dumps({"model": MODEL, "session_id": "ws-misuse", "keep": True}))
        assert json.loads(await ws.recv())["session"]["session_id"] == "ws-misuse"
        bad: list[str | bytes] = [
            json.dumps({"model": ["x"]}),
            json.dumps({"inputs": [[0, 1, 2, 3]], "seq": "1"}),
            json.dumps({"inputs": [[True, 1, 2, 3]]}),
            json.dumps({"inputs": [[0, 1, 2, 3]], "extra": 1}),
            b"\x00\x01binary",
            '{"inputs": ' + "[" * 10_000 + "]" * 10_000 + "}",  # deep but under the size limit
            json.dumps({"inputs": [[0.0, 1.0, 2.0, 3.0]] * 4000}),  # ~96 kB: over the 64 kB limit
            "not json",
            json.dumps({"inputs": [], "pad": "€" * 30_000}, ensure_ascii=False),  # 30k characters, 90 kB of UTF-8
            json.dumps({"inputs": [[0, 1, 2, 3]], "session_id": "other"}),  # opening fields after the first
            json.dumps({"inputs": [[0, 1, 2]], "seq": 1}),  # well-formed steps of the wrong width
            json.dumps({"inputs": [[0, 1, 2, 3]], "seq": 0}),
            '{"inputs": [[NaN, 1, 2, 3]]}',
            json.dumps({"inputs": [[0, 1, 2, 3], [0, 1]]}),
        ]
        codes = []
        for message in bad:
            await ws.send(message)
            codes.append(json.loads(await ws.recv())["code"])
        assert (
            codes
            == ["invalid_input"] * 4
            + ["malformed_request", "malformed_request", "payload_too_large", "malformed_request", "payload_too_large"]
            + ["invalid_input"] * 5
        )
        for _ in range(2):  # NOTE: the retry of a step with its seq is answered from the session, not applied again
            await ws.send(json.dumps({"inputs": [weather[0].tolist()], "seq": 1}))
            reply = json.loads(await ws.recv())
    np.testing.assert_allclose(np.asarray(reply["outputs"], np.float32), reference_run(weather[:1]), atol=ATOL)
    assert (reply["steps"], reply["seq"], reply["replayed"]) == (1, 1, True)
    assert await srv.store.count() == 1  # kept (keep was a real boolean)
    async with websockets.connect(f"ws://127.0.0.1:{srv.http_port}/v1/sessions/stream") as ws:
        await ws.send(json.dumps({"model": MODEL, "keep": "false"}))
        first = json.loads(await ws.recv())
        assert first["code"] == "invalid_input"
        assert "keep" in first["error"]


async def test_drain_ends_open_streams_with_unavailable(server: Server, weather: np.ndarray) -> None:
    """On drain, idle gRPC and WebSocket streams end at once with 'unavailable' instead of holding shutdown."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.PredictorStub(channel)
        gate = asyncio.Event()

        async def requests() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL))
            await gate.wait()  # NOTE: an idle client

        async def silent() -> AsyncIterator[pb.StreamRequest]:
            await gate.wait()  # NOTE: connected, but the first message never comes
            yield pb.StreamRequest()

        call = stub.Stream(requests())
        await call.read()
        unopened = stub.Stream(silent())
        ws_url = f"ws://127.0.0.1:{server.http_port}/v1/sessions/stream"
        async with websockets.connect(ws_url) as ws, websockets.connect(ws_url) as ws_unopened:
            await ws.send(json.dumps({"model": MODEL}))
            await ws.recv()
            await asyncio.sleep(0.05)
            server.dataplane.begin_drain()
            for c in (call, unopened):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await asyncio.wait_for(c.read(), 2)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in (e.value.details() or "")
            for w in (ws, ws_unopened):
                last = json.loads(await asyncio.wait_for(w.recv(), 2))
                assert last["code"] == "unavailable"
        gate.set()


async def test_sync_and_async_clients_offer_every_operation(server: Server, weather: np.ndarray) -> None:
    """Both clients create, step (with seq), batch, reset, export, import and delete, and raise coded errors."""
    target = f"127.0.0.1:{server.grpc_port}"
    x = weather[300:306]

    def sync_run() -> None:
        with Client(target) as c:
            assert c.get_model(MODEL).horizon == 7
            sid = c.create_session(MODEL, session_id="sync-1").session_id
            first = c.step_full(sid, x[:3], seq=1)
            assert (first.steps, first.seq, first.replayed) == (3, 1, False)
            assert c.step_full(sid, x[:3], seq=1).replayed
            snap = c.export_session(sid)
            c.import_session("sync-2", snap)
            outs = c.step_batch([(sid, x[3:6]), ("sync-2", x[3:6], 2), ("nobody", x[3:6])])
            np.testing.assert_allclose(outs[0], reference_run(x)[3:], atol=ATOL)  # type: ignore[arg-type]
            np.testing.assert_allclose(outs[1], reference_run(x)[3:], atol=ATOL)  # type: ignore[arg-type]
            assert isinstance(outs[2], ClientError)
            assert outs[2].code == "session_not_found"
            assert c.reset_session(sid).steps == 0
            assert c.get_session(sid).steps == 0
            c.delete_session(sid)
            with pytest.raises(ClientError) as e:
                c.get_session(sid)
            assert (e.value.code, e.value.status) == ("session_not_found", grpc.StatusCode.NOT_FOUND)

    await asyncio.to_thread(sync_run)
    async with AsyncClient(target) as ac:
        assert (await ac.get_model(MODEL)).name == MODEL
        sid = (await ac.create_session(MODEL)).session_id
        assert (await ac.step_full(sid, x[:3], seq=1)).steps == 3
        snap = await ac.export_session(sid)
        assert (await ac.import_session("async-2", snap)).steps == 3
        outs = await ac.step_batch([(sid, x[3:6]), ("async-2", x[3:6])])
        for out in outs:
            np.testing.assert_allclose(out, reference_run(x)[3:], atol=ATOL)  # type: ignore[arg-type]
        assert (await ac.reset_session(sid)).steps == 0
        assert (await ac.get_session(sid)).steps == 0
        await ac.delete_session(sid)
        with pytest.raises(ClientError, match="session_not_found"):
            await ac.step(sid, x[:1])


async def test_concurrent_steps_on_one_session_apply_one_at_a_time_in_some_order(
    rest: httpx.AsyncClient, stub: pb_grpc.PredictorStub, weather: np.ndarray
) -> None:
    """20 concurrent steps on one session over REST and gRPC are serialised: replayed in seq order they are
    exactly the offline run, and the final state holds all 20 steps."""
    sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    x = weather[900:920]

    async def via_rest(k: int) -> tuple[int, int, np.ndarray]:
        r = (await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": [x[k].tolist()]})).json()
        return r["seq"], k, np.asarray(r["outputs"], np.float32)

    async def via_grpc(k: int) -> tuple[int, int, np.ndarray]:
        r = await stub.Step(pb.StepRequest(session_id=sid, inputs=matrix(x[k])))
        return r.seq, k, array(r.outputs)

    results = await asyncio.gather(*(via_rest(k) if k % 2 else via_grpc(k) for k in range(20)))
    results.sort(key=lambda r: r[0])
    assert [r[0] for r in results] == list(range(1, 21))
    order = [k for _, k, _ in results]
    np.testing.assert_allclose(np.concatenate([o for _, _, o in results]), reference_run(x[order]), atol=ATOL)
    assert (await rest.get(f"/v1/sessions/{sid}")).json()["steps"] == 20


async def test_a_message_that_breaks_the_stream_comes_after_the_answer_to_the_one_before(
    make_server: ServerFactory,
) -> None:
    """A message over grpc's receive limit ends the call (RESOURCE_EXHAUSTED), but every step applied before it
    has been answered: a client of a kept session then knows what was applied. (Read ahead, the next message's
    read failed the call while the step before still ran: applied, never answered.)"""
    srv = await make_server(grpc_max_message_bytes=64 * 1024, max_steps_per_call=64)

    def rows(n: int) -> pb.Matrix:
        return pb.Matrix(rows=n, cols=4, data=[0.1] * (4 * n))

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        yield pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL, session_id="kept-1"), keep=True)
        yield pb.StreamRequest(inputs=rows(1))
        yield pb.StreamRequest(inputs=rows(20_000))  # NOTE: 320 kB, over the 128 kB that grpc receives
        await asyncio.Event().wait()

    seen: list[str] = []

    async def read_all(call: Any) -> None:
        async for reply in call:
            seen.append(reply.error.code or f"steps={reply.steps}")

    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await read_all(pb_grpc.PredictorStub(channel).Stream(requests()))
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert seen == ["steps=0", "steps=1"]
    assert (await srv.dataplane.get_session("kept-1")).steps == 1
