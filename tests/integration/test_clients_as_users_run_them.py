"""Clients as users run them, over real TCP: keep-alive HTTP connections, streams that resume elsewhere,
peers that vanish without closing, calls cancelled or past their deadline, and the metrics they leave."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import websockets
from prometheus_client import CollectorRegistry

from service.app import Server
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from service.settings import Settings
from tests.conftest import SHIPPED_REPO
from tests.fixtures import SHIPPED_CARD, FakeRuntime, fake_repo
from tests.integration.conftest import REDIS_URL, ServerFactory, sample, until

MODEL = "seattle-weather"

SHIPPED_H = SHIPPED_CARD.hidden_size  # H of the shipped model (its card says)


def matrix(row: np.ndarray) -> pb.Matrix:
    return pb.Matrix(rows=1, cols=4, data=[float(v) for v in row])


async def hanging_stream(stub: pb_grpc.PredictorStub, session_id: str, row: np.ndarray) -> Any:
    """A stream that opened a session and applied one step, and whose client then sends nothing more."""

    async def reqs() -> AsyncIterator[pb.StreamRequest]:
        yield pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL, session_id=session_id))
        yield pb.StreamRequest(inputs=matrix(row))
        await asyncio.Event().wait()

    call = stub.Stream(reqs())
    await call.read()
    assert (await call.read()).seq == 1
    return call


def keep_alive_steps(port: int, sid: str, rows: np.ndarray) -> list[float]:
    """Sequential step calls on one HTTP/1.1 connection (as requests.Session or any pooled client does)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.connect()
    first_socket = conn.sock
    took = []
    try:
        for row in rows:
            body = json.dumps({"inputs": [row.tolist()]})
            t0 = time.perf_counter()
            conn.request("POST", f"/v1/sessions/{sid}/steps", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            payload = r.read()
            took.append(time.perf_counter() - t0)
            assert r.status == 200, payload
            assert conn.sock is first_socket  # NOTE: still the same connection: keep-alive really in use
    finally:
        conn.close()
    return took


async def test_rest_answers_a_keep_alive_client_without_a_nagle_stall(server: Server, weather: np.ndarray) -> None:
    """40 sequential steps on one keep-alive connection answer in well under the ~40 ms that Nagle's algorithm
    and delayed ACKs cost without TCP_NODELAY (the median was 44 ms before the fix, ~1 ms after)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}") as rest:
        sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    took = await asyncio.to_thread(keep_alive_steps, server.http_port, sid, weather[:40])
    assert statistics.median(took) < 0.015, [round(t * 1000, 1) for t in took]


async def test_a_half_open_old_stream_reaped_later_does_not_delete_the_resumed_session(
    server: Server, weather: np.ndarray
) -> None:
    """A client loses its stream (still half-open on the server), resumes the session on a new stream and goes
    on; when the old stream is finally reaped, the session lives on and keeps its steps."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.PredictorStub(channel)
        old_call = await hanging_stream(stub, "roaming", weather[0])
        new_q: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()

        async def new() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(resume_session_id="roaming")
            while (msg := await new_q.get()) is not None:
                yield msg

        new_call = stub.Stream(new())
        assert (await new_call.read()).session.steps == 1
        await new_q.put(pb.StreamRequest(inputs=matrix(weather[1])))
        assert (await new_call.read()).seq == 2
        # NOTE: any end of the old stream counts: a cancel can reach the handler as a cancellation or as the end
        # of its requests, whichever grpc sees first
        ended = sample(server, "lstm_stream_duration_seconds_count", protocol="grpc")
        old_call.cancel()  # the old stream is reaped now
        await until(lambda: sample(server, "lstm_stream_duration_seconds_count", protocol="grpc") > ended)
        await new_q.put(pb.StreamRequest(inputs=matrix(weather[2])))
        reply = await new_call.read()
        assert not reply.HasField("error"), reply.error
        assert (reply.seq, reply.steps) == (3, 3)
        await new_q.put(None)
        assert await new_call.read() is grpc.aio.EOF
        info = await stub.GetSession(pb.SessionRef(session_id="roaming"))  # a resumed session stays
        assert info.steps == 3


async def test_a_stream_never_deletes_a_later_session_that_took_its_expired_id(
    make_server: ServerFactory, weather: np.ndarray
) -> None:
    """A stream's session expires while the stream idles; another client creates a session with that id;
    when the old stream ends, the new session is untouched."""
    srv: Server = await make_server(session_ttl_s=0.2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        stub = pb_grpc.PredictorStub(channel)
        done = asyncio.Event()

        async def reqs() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL, session_id="sensor-1"))
            await done.wait()

        call = stub.Stream(reqs())
        await call.read()
        await until(lambda: sample(srv, "lstm_sessions_removed_total", model=f"{MODEL}/1", reason="expired") == 1)
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="sensor-1"))
        await stub.Step(pb.StepRequest(session_id="sensor-1", inputs=matrix(weather[0])))
        done.set()
        assert await call.read() is grpc.aio.EOF
        await until(lambda: sample(srv, "lstm_requests_total", protocol="grpc", method="Stream", code="OK") == 1)
        assert (await stub.GetSession(pb.SessionRef(session_id="sensor-1"))).steps == 1


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_streams_steps_never_reach_a_later_session_that_took_its_id(
    make_server: ServerFactory, weather: np.ndarray, prefix: str, store: str
) -> None:
    """A stream's session is deleted by another client, who creates a new session under the same id (on the
    same model, then on another one): the stream's next steps are refused in-band (session_not_found, open a
    new stream), none of them reaches the new session, and the stream goes on answering."""
    on_redis = {"state_store": REDIS_URL, "redis_key_prefix": prefix} if store == "redis" else {}
    srv: Server = await make_server(**on_redis)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        stub = pb_grpc.PredictorStub(channel)
        q: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()

        async def reqs() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL, session_id="taken"), inputs=matrix(
                weather[0]))  # fmt: skip
            while (msg := await q.get()) is not None:
                yield msg

        call = stub.Stream(reqs())
        assert (await call.read()).steps == 1
        for model in (MODEL, "seattle-temps"):
            await stub.DeleteSession(pb.SessionRef(session_id="taken"))
            await stub.CreateSession(pb.CreateSessionRequest(model=model, session_id="taken"))
            for row in weather[1:3]:
                await q.put(pb.StreamRequest(inputs=matrix(row)))
                reply = await call.read()
                assert reply.error.code == "session_not_found", reply
                assert "a new session took its id" in reply.error.message
                assert "open a new stream" in reply.error.message
            assert (await stub.GetSession(pb.SessionRef(session_id="taken"))).steps == 0
        await q.put(None)
        assert await call.read() is grpc.aio.EOF
        assert (await stub.GetSession(pb.SessionRef(session_id="taken"))).model == "seattle-temps"


class FreezingProxy:
    """A TCP proxy that can stop forwarding in both directions while keeping its sockets open: to the
    server, the client's machine has vanished (no FIN, no RST), as when a laptop sleeps or a NAT drops."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self.tasks.add(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while not self.frozen.is_set():
            read = asyncio.ensure_future(src.read(65536))
            frozen = asyncio.ensure_future(self.frozen.wait())
            await asyncio.wait((read, frozen), return_when=asyncio.FIRST_COMPLETED)
            frozen.cancel()
            if not read.done():
                read.cancel()
                return
            data = read.result()
            if not data:
                return
            dst.write(data)
            await dst.drain()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for w in self.writers:
            w.close()
        self.server.close()


async def test_the_stream_of_a_peer_that_vanished_ends_by_keepalive_and_frees_its_session(
    make_server: ServerFactory, weather: np.ndarray
) -> None:
    """A client behind a connection that goes silent (no FIN) loses its stream by the server's keepalive
    pings within a few seconds, and the stream's session is closed; without keepalive it lingered forever."""
    srv: Server = await make_server(grpc_keepalive_s=0.5, grpc_keepalive_timeout_s=0.5)
    proxy = FreezingProxy(srv.grpc_port)
    port = await proxy.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = await hanging_stream(pb_grpc.PredictorStub(channel), "vanishing", weather[0])
            assert await srv.store.count() == 1
            proxy.frozen.set()
            await until(lambda: srv.store.count(), within=15, equals=0)
            call.cancel()
    finally:
        await proxy.close()


async def test_grpc_calls_past_their_deadline_or_cancelled_are_counted_as_such(
    fake_slow_server: Server,
) -> None:
    """A unary call whose client deadline passes counts as DEADLINE_EXCEEDED, one the client cancels as
    CANCELLED; neither as OK. Latency is recorded for both."""
    srv = fake_slow_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        stub = pb_grpc.PredictorStub(channel)
        sid = (await stub.CreateSession(pb.CreateSessionRequest(model="fake"))).session_id
        x = pb.Matrix(rows=1, cols=3, data=[0.1, 0.2, 0.3])
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Step(pb.StepRequest(session_id=sid, inputs=x), timeout=0.1)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: sample(srv, "lstm_requests_total", protocol="grpc", method="Step",
                                   code="DEADLINE_EXCEEDED") == 1)  # fmt: skip
        call = stub.Step(pb.StepRequest(session_id=sid, inputs=x))
        await asyncio.sleep(0.1)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        await until(lambda: sample(srv, "lstm_requests_total", protocol="grpc", method="Step", code="CANCELLED") == 1)
    assert sample(srv, "lstm_requests_total", protocol="grpc", method="Step", code="OK") == 0
    assert sample(srv, "lstm_request_latency_seconds_count", protocol="grpc", method="Step") == 2


async def test_a_stream_whose_client_vanishes_is_counted_cancelled_not_ok(server: Server) -> None:
    """A client that opens a stream, steps once and then cancels it (the program went away) is a CANCELLED
    stream in the metrics, not an OK one, and the session it opened is gone."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = pb_grpc.PredictorStub(channel).Stream()
        await call.write(pb.StreamRequest(open=pb.CreateSessionRequest(model="seattle-weather")))
        await call.read()
        await call.write(pb.StreamRequest(inputs=pb.Matrix(rows=1, cols=4, data=[0.0, 10.0, 5.0, 3.0])))
        assert not (await call.read()).HasField("error")
        call.cancel()
    await until(lambda: sample(server, "lstm_requests_total", protocol="grpc", method="Stream", code="CANCELLED") == 1)
    assert sample(server, "lstm_requests_total", protocol="grpc", method="Stream", code="OK") == 0
    await until(server.store.count, equals=0)


@pytest.fixture
async def fake_slow_server() -> AsyncIterator[Server]:
    """A real server whose only model takes 0.5 s per batch (a fake ONNX Runtime, on cue)."""
    settings = Settings(models=SHIPPED_REPO, http_port=0, grpc_port=0, log_level="warning")
    srv = Server(settings, CollectorRegistry(), repo=fake_repo(FakeRuntime(delay=0.5)))
    await srv.start()
    yield srv
    await srv.stop()


async def test_streams_time_their_whole_life_apart_from_request_latency(server: Server, weather: np.ndarray) -> None:
    """A stream's duration goes to lstm_stream_duration_seconds, per protocol, never into the request latency."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.PredictorStub(channel)

        async def reqs() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL))
            await asyncio.sleep(0.3)
            yield pb.StreamRequest(inputs=matrix(weather[0]))

        assert len([r async for r in stub.Stream(reqs())]) == 2
    async with websockets.connect(f"ws://127.0.0.1:{server.http_port}/v1/sessions/stream") as ws:
        await ws.send(json.dumps({"model": MODEL, "inputs": [weather[0].tolist()]}))
        await ws.recv()
    await until(lambda: sample(server, "lstm_stream_duration_seconds_count", protocol="websocket") == 1)
    await until(lambda: sample(server, "lstm_stream_duration_seconds_count", protocol="grpc") == 1)
    assert sample(server, "lstm_stream_duration_seconds_sum", protocol="grpc") >= 0.3
    assert sample(server, "lstm_request_latency_seconds_count", protocol="grpc", method="Stream") == 0
    assert sample(server, "lstm_request_latency_seconds_count", protocol="websocket", method="stream") == 0


async def test_a_grpc_stream_without_a_first_message_ends_with_deadline_exceeded(make_server: ServerFactory) -> None:
    """A client that opens a stream and sends nothing is told so after the open timeout."""
    srv: Server = await make_server(stream_open_timeout_s=0.3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        hang = asyncio.Event()

        async def nothing() -> AsyncIterator[pb.StreamRequest]:
            await hang.wait()
            yield pb.StreamRequest()  # pragma: no cover - never reached

        call = pb_grpc.PredictorStub(channel).Stream(nothing())
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(call.read(), 10)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no first message within 0.3 s" in (e.value.details() or "")


async def test_a_websocket_without_a_first_message_is_told_so_and_closed_as_a_client_error(
    make_server: ServerFactory,
) -> None:
    """The in-band deadline_exceeded, then close code 1008 (policy: the client's doing), not 1011 (a server
    error, which it was)."""
    srv: Server = await make_server(stream_open_timeout_s=0.3)
    async with websockets.connect(f"ws://127.0.0.1:{srv.http_port}/v1/sessions/stream") as ws:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["code"] == "deadline_exceeded"
        assert "no first message within 0.3 s" in reply["error"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "deadline_exceeded")


async def test_websocket_first_message_with_model_and_resume_is_refused(server: Server) -> None:
    """{"model", "resume"} together is ambiguous: the stream ends with invalid_input, and nothing is opened."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}") as rest:
        await rest.post("/v1/sessions", json={"model": MODEL, "session_id": "existing"})
    async with websockets.connect(f"ws://127.0.0.1:{server.http_port}/v1/sessions/stream") as ws:
        await ws.send(json.dumps({"model": MODEL, "resume": "existing"}))
        reply = json.loads(await ws.recv())
        assert reply["code"] == "invalid_input"
        assert "not both" in reply["error"]
    assert await server.store.count() == 1


async def test_grpc_import_without_a_version_is_refused(server: Server) -> None:
    """An imported state belongs to the version that made it: an empty version is an error, not the newest."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.PredictorStub(channel)
        zeros = pb.Matrix(rows=1, cols=SHIPPED_H, data=[0.0] * SHIPPED_H)
        snap = pb.SessionSnapshot(model=MODEL, version="", h=zeros, c=zeros)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ImportSession(pb.ImportSessionRequest(session_id="imported", snapshot=snap))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "snapshot.version is required" in (e.value.details() or "")
    assert await server.store.count() == 0


async def test_deadlines_from_grpc_and_the_rest_header_keep_late_steps_from_running(
    fake_slow_server: Server,
) -> None:
    """Behind a 0.5 s batch, a gRPC step with a 0.2 s deadline and a REST step with Request-Timeout: 0.2 are
    not run (504 deadline_exceeded on REST): their sessions stay at 0 steps. A malformed header is a 400."""
    srv = fake_slow_server
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=10) as rest,
    ):
        stub = pb_grpc.PredictorStub(channel)
        sids = [(await stub.CreateSession(pb.CreateSessionRequest(model="fake"))).session_id for _ in range(3)]
        x = pb.Matrix(rows=1, cols=3, data=[0.1, 0.2, 0.3])
        blocker = asyncio.ensure_future(stub.Step(pb.StepRequest(session_id=sids[0], inputs=x)))
        await until(lambda: sample(srv, "lstm_queue_depth", model="fake/1"), equals=1)
        late_grpc = stub.Step(pb.StepRequest(session_id=sids[1], inputs=x), timeout=0.2)
        late_rest = rest.post(f"/v1/sessions/{sids[2]}/steps", json={"inputs": [[0.1, 0.2, 0.3]]},
                              headers={"Request-Timeout": "0.2"})  # fmt: skip
        results = await asyncio.gather(late_grpc, late_rest, return_exceptions=True)
        assert isinstance(results[0], grpc.aio.AioRpcError)
        assert results[0].code() == grpc.StatusCode.DEADLINE_EXCEEDED
        r = results[1]
        assert isinstance(r, httpx.Response)
        assert (r.status_code, r.json()["code"]) == (504, "deadline_exceeded")
        await blocker
        await until(lambda: sample(srv, "lstm_queue_depth", model="fake/1"), equals=0)
        for sid in sids[1:]:
            assert (await stub.GetSession(pb.SessionRef(session_id=sid))).steps == 0
        bad = await rest.post(f"/v1/sessions/{sids[1]}/steps", json={"inputs": [[0.1, 0.2, 0.3]]},
                              headers={"Request-Timeout": "soon"})  # fmt: skip
        assert (bad.status_code, bad.json()["code"]) == (400, "invalid_input")
        assert "Request-Timeout" in bad.json()["error"]
        long = await rest.post(f"/v1/sessions/{sids[1]}/steps", json={"inputs": [[0.1, 0.2, 0.3]]},
                               headers={"Request-Timeout": "99999999999"})  # fmt: skip
        assert (long.status_code, long.json()["code"]) == (400, "invalid_input")
        assert "above 0 and below a day, 86400" in long.json()["error"]  # NOTE: not only "above 0"
