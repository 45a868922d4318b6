"""Every row of the error table on REST and gRPC: the status from one table and the same message."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from service.app import Server
from service.errors import ERROR_TABLE, INTERNAL_MESSAGE, ErrorCode
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from service.settings import Settings
from tests.conftest import SHIPPED_REPO
from tests.fixtures import SHIPPED_CARD, FakeRuntime, NonFiniteRuntime, fake_repo
from tests.integration.conftest import REDIS_URL, ServerFactory, sample, until

MODEL = "seattle-weather"
LIMITS = {"max_steps_per_call": 50, "max_sessions": 4, "max_body_bytes": 64 * 1024, "grpc_max_message_bytes": 64 * 1024}

H = SHIPPED_CARD.hidden_size  # H of the shipped model (its card says)


def m(rows: list[list[float]], cols: int | None = None) -> pb.Matrix:
    flat = [v for r in rows for v in r]
    return pb.Matrix(rows=len(rows), cols=cols if cols is not None else (len(rows[0]) if rows else 0), data=flat)


async def grpc_error(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    e = info.value
    trailers = dict(e.trailing_metadata() or ())
    return e.code(), str(trailers.get("lstm-error-code", "")), e.details() or ""


# NOTE: written out here, not taken from ERROR_TABLE, so that a wrong row in the table fails these tests
EXPECTED: dict[ErrorCode, tuple[int, grpc.StatusCode]] = {
    ErrorCode.INVALID_INPUT: (400, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorCode.MALFORMED_REQUEST: (400, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorCode.PAYLOAD_TOO_LARGE: (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorCode.MODEL_NOT_FOUND: (404, grpc.StatusCode.NOT_FOUND),
    ErrorCode.MODEL_IN_USE: (409, grpc.StatusCode.FAILED_PRECONDITION),
    ErrorCode.MODEL_LOAD_FAILED: (400, grpc.StatusCode.FAILED_PRECONDITION),
    ErrorCode.SESSION_NOT_FOUND: (404, grpc.StatusCode.NOT_FOUND),
    ErrorCode.SESSION_EXISTS: (409, grpc.StatusCode.ALREADY_EXISTS),
    ErrorCode.SESSION_CORRUPT: (500, grpc.StatusCode.DATA_LOSS),
    ErrorCode.SEQ_CONFLICT: (409, grpc.StatusCode.ABORTED),
    ErrorCode.SESSION_LIMIT: (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorCode.OVERLOADED: (503, grpc.StatusCode.UNAVAILABLE),
    ErrorCode.UNAVAILABLE: (503, grpc.StatusCode.UNAVAILABLE),
    ErrorCode.DEADLINE_EXCEEDED: (504, grpc.StatusCode.DEADLINE_EXCEEDED),
    ErrorCode.MODEL_ERROR: (500, grpc.StatusCode.INTERNAL),
    ErrorCode.INTERNAL: (500, grpc.StatusCode.INTERNAL),
    ErrorCode.UNAUTHENTICATED: (401, grpc.StatusCode.UNAUTHENTICATED),
    ErrorCode.ROUTE_NOT_FOUND: (404, grpc.StatusCode.UNIMPLEMENTED),
    ErrorCode.METHOD_NOT_ALLOWED: (405, grpc.StatusCode.UNIMPLEMENTED),
}
RETRY_AFTER = {ErrorCode.SESSION_LIMIT: "1", ErrorCode.OVERLOADED: "1", ErrorCode.UNAVAILABLE: "1"}


def test_the_expected_codes_cover_every_row_of_the_table() -> None:
    """Every error code has its literal expectation here, and the table agrees with it."""
    assert set(EXPECTED) == set(ErrorCode)
    for code, (http, status) in EXPECTED.items():
        spec = ERROR_TABLE[code]
        assert (spec.http_status, spec.grpc_status) == (http, status.name), code
        assert (str(spec.retry_after) if spec.retry_after else None) == RETRY_AFTER.get(code), code


def check(code: ErrorCode, r: httpx.Response, g: tuple[grpc.StatusCode, str, str], same_message: bool = True) -> str:
    """REST and gRPC agree with the literal expectation and with each other; return the message."""
    http, status = EXPECTED[code]
    body = r.json()
    assert r.status_code == http, body
    assert body["code"] == code.value
    assert g[0] == status, g
    if same_message:
        assert g[1] == code.value
        assert g[2] == body["error"]
    assert r.headers.get("Retry-After") == RETRY_AFTER.get(code)
    for leak in ("Traceback", "/work/", ".py", "site-packages"):
        assert leak not in body["error"]
        assert leak not in g[2]
    return str(body["error"])


@pytest.fixture
async def limited(make_server: ServerFactory) -> tuple[httpx.AsyncClient, pb_grpc.PredictorStub, Server]:
    srv: Server = await make_server(**LIMITS)
    rest = httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}")
    yield rest, pb_grpc.PredictorStub(channel), srv  # type: ignore[misc]
    await rest.aclose()
    await channel.close()


Row = tuple[str, ErrorCode, Callable[[httpx.AsyncClient, str], Awaitable[httpx.Response]],
            Callable[[pb_grpc.PredictorStub, str], Awaitable[Any]], str]  # fmt: skip

ROWS: list[Row] = [
    ("wrong feature count", ErrorCode.INVALID_INPUT,
     lambda r, s: r.post(f"/v1/sessions/{s}/steps", json={"inputs": [[1, 2, 3]]}),
     lambda g, s: g.Step(pb.StepRequest(session_id=s, inputs=m([[1, 2, 3]]))), "must have 4 feature values"),
    ("NaN input", ErrorCode.INVALID_INPUT,
     lambda r, s: r.post(f"/v1/sessions/{s}/steps", content=b'{"inputs": [[0, NaN, 1, 2]]}',
                         headers={"content-type": "application/json"}),
     lambda g, s: g.Step(pb.StepRequest(session_id=s, inputs=m([[0, float("nan"), 1, 2]]))), "'temp_max' is NaN"),
    ("Infinity input", ErrorCode.INVALID_INPUT,
     lambda r, s: r.post(f"/v1/sessions/{s}/steps", content=b'{"inputs": [[0, 1, 1e999, 2]]}',
                         headers={"content-type": "application/json"}),
     lambda g, s: g.Step(pb.StepRequest(session_id=s, inputs=m([[0, 1, float("inf"), 2]]))), "is infinite"),
    ("no steps", ErrorCode.INVALID_INPUT,
     lambda r, s: r.post(f"/v1/sessions/{s}/steps", json={"inputs": []}),
     lambda g, s: g.Step(pb.StepRequest(session_id=s, inputs=m([], cols=4))), "no steps"),
    ("too many steps", ErrorCode.INVALID_INPUT,
     lambda r, s: r.post(f"/v1/sessions/{s}/steps", json={"inputs": [[0, 1, 2, 3]] * 51}),
     lambda g, s: g.Step(pb.StepRequest(session_id=s, inputs=m([[0, 1, 2, 3]] * 51))), "limit per call is 50"),
    ("bad session id", ErrorCode.INVALID_INPUT,
     lambda r, s: r.get("/v1/sessions/bad%20id"),
     lambda g, s: g.GetSession(pb.SessionRef(session_id="bad id")), "invalid session id"),
    ("session id with a trailing newline", ErrorCode.INVALID_INPUT,
     lambda r, s: r.post("/v1/sessions", json={"model": MODEL, "session_id": "abc\n"}),
     lambda g, s: g.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="abc\n")), "invalid session id"),
    ("snapshot counters beyond range", ErrorCode.INVALID_INPUT,
     lambda r, s: r.post("/v1/sessions/imported/state", json={"model": MODEL, "version": "1", "steps": 2**63,
                                                                "seq": 0, "h": [[0.0] * H], "c": [[0.0] * H]}),
     lambda g, s: g.ImportSession(pb.ImportSessionRequest(session_id="imported", snapshot=pb.SessionSnapshot(
         model=MODEL, version="1", steps=2**63, h=m([[0.0] * H]), c=m([[0.0] * H])))), "between 0 and"),
    ("step batch with many failing items", ErrorCode.INVALID_INPUT,
     lambda r, s: r.post("/v1/steps", json={"steps": [{"session_id": f"!{k}", "inputs": []} for k in range(51)]}),
     lambda g, s: g.StepBatch(pb.StepBatchRequest(steps=[
         pb.StepRequest(session_id=f"!{k}", inputs=m([], cols=4)) for k in range(51)])), "51 steps in all"),
    ("step batch over the step limit", ErrorCode.INVALID_INPUT,
     lambda r, s: r.post("/v1/steps", json={"steps": [{"session_id": s, "inputs": [[0, 1, 2, 3]] * 30},
                                                       {"session_id": "other", "inputs": [[0, 1, 2, 3]] * 30}]}),
     lambda g, s: g.StepBatch(pb.StepBatchRequest(steps=[
         pb.StepRequest(session_id=s, inputs=m([[0, 1, 2, 3]] * 30)),
         pb.StepRequest(session_id="other", inputs=m([[0, 1, 2, 3]] * 30))])), "60 steps in all"),
    ("unknown model", ErrorCode.MODEL_NOT_FOUND,
     lambda r, s: r.post("/v1/sessions", json={"model": "nope"}),
     lambda g, s: g.CreateSession(pb.CreateSessionRequest(model="nope")), "no model named 'nope'"),
    ("unknown version", ErrorCode.MODEL_NOT_FOUND,
     lambda r, s: r.get(f"/v1/models/{MODEL}", params={"version": "9"}),
     lambda g, s: g.GetModel(pb.GetModelRequest(name=MODEL, version="9")), "has no version '9'"),
    ("unknown session", ErrorCode.SESSION_NOT_FOUND,
     lambda r, s: r.post("/v1/sessions/ghost/steps", json={"inputs": [[0, 1, 2, 3]]}),
     lambda g, s: g.Step(pb.StepRequest(session_id="ghost", inputs=m([[0, 1, 2, 3]]))), "no session 'ghost'"),
    ("duplicate session", ErrorCode.SESSION_EXISTS,
     lambda r, s: r.post("/v1/sessions", json={"model": MODEL, "session_id": s}),
     lambda g, s: g.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id=s)), "already exists"),
    ("seq gap", ErrorCode.SEQ_CONFLICT,
     lambda r, s: r.post(f"/v1/sessions/{s}/steps", json={"inputs": [[0, 1, 2, 3]], "seq": 5}),
     lambda g, s: g.Step(pb.StepRequest(session_id=s, inputs=m([[0, 1, 2, 3]]), seq=5)), "expected seq 2"),
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
async def test_error_row_is_the_same_on_rest_and_grpc_and_leaves_state_untouched(
    row: Row, limited: tuple[httpx.AsyncClient, pb_grpc.PredictorStub, Server]
) -> None:
    """Each client error maps through the one table to HTTP and gRPC with one message; the session is unchanged."""
    _, code, rest_call, grpc_call, fragment = row
    rest, stub, _ = limited
    sid = (await rest.post("/v1/sessions", json={"model": MODEL, "session_id": "victim"})).json()["session_id"]
    await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.0, 12.8, 5.0, 4.7]]})
    before = (await rest.get(f"/v1/sessions/{sid}/state")).json()
    message = check(code, await rest_call(rest, sid), await grpc_error(grpc_call(stub, sid)))
    assert fragment in message
    after = (await rest.get(f"/v1/sessions/{sid}/state")).json()
    assert after == before  # h, c, steps and seq, exactly
    nxt = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.0, 10.6, 2.8, 4.5]]})
    assert nxt.status_code == 200
    assert nxt.json()["steps"] == before["steps"] + 1


async def test_session_cap_is_429_and_resource_exhausted_with_retry_after(
    limited: tuple[httpx.AsyncClient, pb_grpc.PredictorStub, Server],
) -> None:
    """At max_sessions a new session is refused on both transports; deleting one makes room."""
    rest, stub, _ = limited
    for k in range(4):
        assert (await rest.post("/v1/sessions", json={"model": MODEL, "session_id": f"s{k}"})).status_code == 201
    r = await rest.post("/v1/sessions", json={"model": MODEL})
    g = await grpc_error(stub.CreateSession(pb.CreateSessionRequest(model=MODEL)))
    assert "maximum of 4 sessions" in check(ErrorCode.SESSION_LIMIT, r, g)
    await stub.DeleteSession(pb.SessionRef(session_id="s0"))
    assert (await rest.post("/v1/sessions", json={"model": MODEL})).status_code == 201


async def test_oversized_payloads_are_413_and_resource_exhausted(
    limited: tuple[httpx.AsyncClient, pb_grpc.PredictorStub, Server],
) -> None:
    """A body over the REST limit (declared or streamed) is 413; a message over the gRPC limit is RESOURCE_EXHAUSTED."""
    rest, stub, _ = limited
    sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    big = {"inputs": [[0.0, 1.0, 2.0, 3.0]] * 5000}
    r = await rest.post(f"/v1/sessions/{sid}/steps", json=big)
    assert r.status_code == 413
    assert r.json()["code"] == "payload_too_large"

    async def chunks() -> Any:
        for _ in range(100):
            yield b" " * 1024

    r2 = await rest.post(f"/v1/sessions/{sid}/steps", content=chunks(), headers={"content-type": "application/json"})
    assert r2.status_code == 413
    big_msg = m([[0.0, 1, 2, 3]] * 5000)  # 80 kB: over the 64 kB limit, under grpc core's own 128 kB cut-off
    g = await grpc_error(stub.Step(pb.StepRequest(session_id=sid, inputs=big_msg)))
    message = check(ErrorCode.PAYLOAD_TOO_LARGE, r, g)
    assert message == "request is larger than the 65536 byte limit; send fewer steps per call"

    async def stream() -> Any:
        yield pb.StreamRequest(resume_session_id=sid, keep=True)
        yield pb.StreamRequest(inputs=big_msg)
        yield pb.StreamRequest(inputs=m([[0, 1, 2, 3]]))

    replies = [x async for x in stub.Stream(stream())]
    assert replies[1].error.code == "payload_too_large"  # in-band: the stream and its session go on
    assert replies[2].steps == 1
    assert (await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0, 1, 2, 3]]})).json()["steps"] == 2


async def test_malformed_json_is_400_not_422(rest: httpx.AsyncClient) -> None:
    """A body that is not JSON, or JSON of the wrong shape, is a 400 with our error body."""
    r = await rest.post("/v1/sessions", content=b"{not json", headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["code"]) == (400, "malformed_request")
    r = await rest.post("/v1/sessions", content=b"", headers={"content-type": "application/json"})
    assert r.json() == {"error": "request body is empty; send a JSON object", "code": "malformed_request"}
    r = await rest.post("/v1/sessions", json={"modle": MODEL})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_input")
    assert "model" in r.json()["error"]
    r = await rest.post("/v1/sessions/x/steps", json={"inputs": [["a", 1, 2, 3]]})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_input")
    r = await rest.post("/v1/sessions/x/steps", json={"inputs": [[1, 2, 3, 4], [1, 2]]})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_input")
    assert "rectangular" in r.json()["error"]
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = await rest.post("/v1/sessions/x/steps", content=deep, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["code"]) == (400, "malformed_request")
    for body in ({"inputs": [[True, False, True, 4]]}, {"inputs": [[1, 2, 3, 4]], "seq": True},
                 {"inputs": [[1, 2, 3, 4]], "seq": "2"}, {"inputs": [[1, 2, 3, 4]], "seq": 3.5}):  # fmt: skip
        r = await rest.post("/v1/sessions/x/steps", json=body)
        assert (r.status_code, r.json()["code"]) == (400, "invalid_input"), body
    # NOTE: JSON has one number type, and JSON Schema's integer includes 3.0: it is seq 3 (here: no session x)
    r = await rest.post("/v1/sessions/x/steps", json={"inputs": [[1, 2, 3, 4]], "seq": 3.0})
    assert (r.status_code, r.json()["code"]) == (404, "session_not_found")


async def test_a_body_sent_as_another_content_type_is_told_to_send_json(rest: httpx.AsyncClient) -> None:
    """A JSON body sent as a form (curl -d's default) or as text is refused on every JSON route alike with what
    to send (malformed_request, Content-Type: application/json), and nothing changes; without a Content-Type
    the body is read as JSON on every route, as FastAPI reads it."""
    sid = (await rest.post("/v1/sessions", content=b'{"model": "seattle-weather"}')).json()["session_id"]
    step = b'{"inputs": [[0.0, 12.8, 5.0, 4.7]]}'
    for kind in ("application/x-www-form-urlencoded", "text/plain"):
        for path, body in (("/v1/sessions", b'{"model": "seattle-weather"}'), (f"/v1/sessions/{sid}/steps", step),
                           (f"/v1/sessions/{sid}/peek", step)):  # fmt: skip
            r = await rest.post(path, content=body, headers={"content-type": kind})
            assert (r.status_code, r.json()["code"]) == (400, "malformed_request"), (path, kind)
            assert "Content-Type: application/json" in r.json()["error"]
            assert repr(kind) in r.json()["error"]
    assert (await rest.get(f"/v1/sessions/{sid}")).json()["steps"] == 0
    for path in (f"/v1/sessions/{sid}/steps", f"/v1/sessions/{sid}/peek"):
        r = await rest.post(path, content=step)
        assert r.status_code == 200, r.text
    assert (await rest.get(f"/v1/sessions/{sid}")).json()["steps"] == 1


async def test_routing_errors_come_from_the_table_and_method_labels_stay_bounded(
    server: Server, rest: httpx.AsyncClient
) -> None:
    """Unknown paths and methods get table codes; made-up HTTP methods do not create new metric series."""
    r = await rest.get("/v2/nothing")
    assert (r.status_code, r.json()["code"]) == (404, "route_not_found")
    r = await rest.put("/v1/models")
    assert (r.status_code, r.json()["code"]) == (405, "method_not_allowed")
    for verb in ("XMETHOD1", "XMETHOD2"):
        # NOTE: uvicorn's parser (httptools) refuses a method HTTP does not define before the app sees it
        r = await rest.request(verb, "/v1/models")
        assert r.status_code == 400
    text = (await rest.get("/metrics")).text
    assert "XMETHOD" not in text
    assert 'method="PUT /v1/models"' in text


async def test_draining_server_refuses_new_work_with_503_and_unavailable(
    server: Server, rest: httpx.AsyncClient, stub: pb_grpc.PredictorStub
) -> None:
    """Once draining, readiness is 503 and new sessions get 503 / UNAVAILABLE with the same message."""
    server.dataplane.begin_drain()
    assert (await rest.get("/readyz")).status_code == 503
    assert (await rest.get("/healthz")).status_code == 200
    r = await rest.post("/v1/sessions", json={"model": MODEL})
    g = await grpc_error(stub.CreateSession(pb.CreateSessionRequest(model=MODEL)))
    assert "shutting down" in check(ErrorCode.UNAVAILABLE, r, g)


@pytest.fixture
async def fake_server(request: pytest.FixtureRequest) -> Any:
    """A server over a fake runtime (to force model errors and overload); the transports are real."""
    runtime, overrides = request.param
    settings = Settings(models=SHIPPED_REPO, http_port=0, grpc_port=0, log_level="warning", **overrides)
    from prometheus_client import CollectorRegistry

    srv = Server(settings, CollectorRegistry(), repo=fake_repo(runtime))
    await srv.start()
    rest = httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}")
    yield rest, pb_grpc.PredictorStub(channel), srv
    await rest.aclose()
    await channel.close()
    await srv.stop()


@pytest.mark.parametrize("fake_server", [(NonFiniteRuntime(), {})], indirect=True)
async def test_non_finite_model_output_is_500_and_internal_with_state_kept(fake_server: Any) -> None:
    """A model that emits Inf gives a model error on both transports, counted as such, and does not commit state."""
    rest, stub, srv = fake_server
    sid = (await rest.post("/v1/sessions", json={"model": "fake"})).json()["session_id"]
    r = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[5000, 0, 0]]})
    g = await grpc_error(stub.Step(pb.StepRequest(session_id=sid, inputs=m([[5000, 0, 0]]))))
    assert "non-finite" in check(ErrorCode.MODEL_ERROR, r, g)
    assert (await rest.get(f"/v1/sessions/{sid}")).json()["steps"] == 0
    registry = srv.metrics.registry
    rest_labels = {"protocol": "rest", "method": "POST /v1/sessions/{session_id}/steps", "code": "500"}
    assert registry.get_sample_value("lstm_requests_total", rest_labels) == 1
    await until(lambda: sample(srv, "lstm_requests_total", protocol="grpc", method="Step", code="INTERNAL"), equals=1)


@pytest.mark.parametrize(
    "fake_server", [(FakeRuntime(delay=0.3), {"max_queue": 1, "max_batch_size": 1})], indirect=True
)
async def test_a_full_queue_is_503_and_unavailable(fake_server: Any) -> None:
    """Concurrent steps beyond the queue limit are rejected at once with a retryable error on both transports."""
    rest, stub, _ = fake_server
    sids = [(await rest.post("/v1/sessions", json={"model": "fake"})).json()["session_id"] for _ in range(8)]
    body = {"inputs": [[0.1, 0.2, 0.3]]}
    rest_calls = [rest.post(f"/v1/sessions/{s}/steps", json=body) for s in sids[:4]]
    grpc_calls = [stub.Step(pb.StepRequest(session_id=s, inputs=m([[0.1, 0.2, 0.3]]))) for s in sids[4:]]
    results = await asyncio.gather(*rest_calls, *grpc_calls, return_exceptions=True)
    rest_503 = [r for r in results[:4] if isinstance(r, httpx.Response) and r.status_code == 503]
    grpc_unavailable = [
        r for r in results[4:] if isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE
    ]
    assert len(rest_503) + len(grpc_unavailable) >= 4
    expected = "model 'fake' version 1 has its maximum of 1 step calls queued; retry shortly"
    for r in rest_503:
        assert r.json() == {"error": expected, "code": "overloaded"}
        assert r.headers["Retry-After"] == "1"
    for e in grpc_unavailable:
        assert e.details() == expected
        assert dict(e.trailing_metadata() or ())["lstm-error-code"] == "overloaded"


async def test_unexpected_errors_are_generic_on_both_transports(
    server: Server,
    rest: httpx.AsyncClient,
    stub: pb_grpc.PredictorStub,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug inside the server gives 500 / INTERNAL with a generic message: no traceback, path or detail leaks;
    the answer is counted in the metrics and the traceback is logged once, only in the server log."""

    async def broken(_: str) -> Any:
        raise RuntimeError("secret detail at /work/main/service/core/dataplane.py line 1")

    monkeypatch.setattr(server.dataplane, "get_session", broken)
    with caplog.at_level(logging.ERROR):
        r = await rest.get("/v1/sessions/anything")
        g = await grpc_error(stub.GetSession(pb.SessionRef(session_id="anything")))
    assert check(ErrorCode.INTERNAL, r, g) == INTERNAL_MESSAGE
    # NOTE: counted and timed like every answer, and logged once per failure (REST and gRPC)
    registry = server.metrics.registry
    rest_labels = {"protocol": "rest", "method": "GET /v1/sessions/{session_id}"}
    assert registry.get_sample_value("lstm_requests_total", {**rest_labels, "code": "500"}) == 1
    assert registry.get_sample_value("lstm_request_latency_seconds_count", rest_labels) == 1
    await until(lambda: sample(server, "lstm_requests_total", protocol="grpc", method="GetSession", code="INTERNAL"),
                equals=1)  # fmt: skip
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 2, [rec.getMessage() for rec in tracebacks]


async def test_step_batch_items_with_bad_shapes_fail_alone(
    rest: httpx.AsyncClient, stub: pb_grpc.PredictorStub
) -> None:
    """In a step batch, an item that cannot be decoded fails by itself; the other items are applied."""
    a = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    b = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    r = await rest.post("/v1/steps", json={"steps": [{"session_id": a, "inputs": [[0, 1, 2, 3], [1, 2]]},
                                                    {"session_id": b, "inputs": [[0, 1, 2, 3]]}]})  # fmt: skip
    results = r.json()["results"]
    assert results[0]["error"]["code"] == "invalid_input"
    assert results[1]["result"]["steps"] == 1
    g = await stub.StepBatch(pb.StepBatchRequest(steps=[
        pb.StepRequest(session_id=a, inputs=pb.Matrix(rows=2, cols=4, data=[0.0, 1, 2])),
        pb.StepRequest(session_id=b, inputs=m([[0, 1, 2, 3]]))]))  # fmt: skip
    assert g.results[0].error.code == "invalid_input"
    assert g.results[1].response.steps == 2
    assert (await rest.get(f"/v1/sessions/{a}")).json()["steps"] == 0


async def test_unknown_routes_and_methods_on_both_transports(server: Server, rest: httpx.AsyncClient) -> None:
    """An unknown REST path is 404 route_not_found; an unknown gRPC method is UNIMPLEMENTED, as in the table."""
    r = await rest.post("/v1/nope", json={})
    assert (r.status_code, r.json()["code"]) == (EXPECTED[ErrorCode.ROUTE_NOT_FOUND][0], "route_not_found")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        call = ch.unary_unary("/lstm.v1.Predictor/Nope", request_serializer=bytes, response_deserializer=bytes)
        code, _, _ = await grpc_error(call(b""))
    assert code == EXPECTED[ErrorCode.ROUTE_NOT_FOUND][1]


async def test_random_bytes_as_grpc_requests_get_invalid_argument_and_no_tracebacks(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """200 seeded random byte strings to every unary method (and as stream messages) get INVALID_ARGUMENT with
    our code, or (when the bytes happen to decode) an ordinary answer; never UNKNOWN or INTERNAL; the log
    gets no traceback and at most a few lines; the server goes on serving."""
    rng = np.random.default_rng(7)
    methods = [m.name for m in pb.DESCRIPTOR.services_by_name["Predictor"].methods if m.name != "Stream"]
    codes: dict[grpc.StatusCode, int] = {}
    trailers: set[str] = set()
    with caplog.at_level(logging.INFO):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
            for n in range(200):
                call = ch.unary_unary(f"/lstm.v1.Predictor/{methods[n % len(methods)]}",
                                      request_serializer=bytes, response_deserializer=bytes)  # fmt: skip
                data = rng.bytes(int(rng.integers(1, 64)))
                try:
                    await call(data, timeout=10)
                    codes[grpc.StatusCode.OK] = codes.get(grpc.StatusCode.OK, 0) + 1
                except grpc.aio.AioRpcError as e:
                    codes[e.code()] = codes.get(e.code(), 0) + 1
                    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        trailers.add(dict(e.trailing_metadata() or ())["lstm-error-code"])
            stream = ch.stream_stream(
                "/lstm.v1.Predictor/Stream", request_serializer=bytes, response_deserializer=bytes
            )
            first = pb.StreamRequest(open=pb.CreateSessionRequest(model="seattle-weather")).SerializeToString()
            replies = [r async for r in stream(iter([first, b"\xff\xff\xff\xff", first[:3]]))]
            assert len(replies) == 3  # NOTE: the undecodable messages were answered in-band, the stream went on
            assert pb.StreamResponse.FromString(replies[1]).error.code == "malformed_request"
            ok = await pb_grpc.PredictorStub(ch).ListModels(pb.ListModelsRequest())
            assert ok.models
    assert grpc.StatusCode.UNKNOWN not in codes
    assert grpc.StatusCode.INTERNAL not in codes
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 50, codes
    assert "malformed_request" in trailers
    assert trailers <= {"malformed_request", "invalid_input"}
    assert not [r for r in caplog.records if r.exc_info]
    assert len([r for r in caplog.records if "undecodable" in r.getMessage()]) <= 2


async def test_a_method_the_path_does_not_take_is_405_with_allow(rest: httpx.AsyncClient) -> None:
    """TRACE or PUT on a session path: 405 method_not_allowed, and Allow lists the methods it takes."""
    for method in ("PUT", "TRACE", "PATCH"):
        r = await rest.request(method, "/v1/sessions/demo")
        assert (r.status_code, r.json()["code"]) == (405, "method_not_allowed")
        assert r.headers["Allow"] == "DELETE, GET", r.headers


async def test_a_step_batch_needs_items_and_a_repeated_session_fails_alone(rest: httpx.AsyncClient) -> None:
    """An empty batch is 400; a second item for the same session gets its own error, the first one runs."""
    r = await rest.post("/v1/steps", json={"steps": []})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_input")
    sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    item = {"session_id": sid, "inputs": [[0, 1, 2, 3]]}
    results = (await rest.post("/v1/steps", json={"steps": [item, item]})).json()["results"]
    assert results[0]["result"]["steps"] == 1
    assert results[1]["error"]["code"] == "invalid_input"
    assert "one item per session" in results[1]["error"]["error"]
    assert (await rest.get(f"/v1/sessions/{sid}")).json()["steps"] == 1


async def test_random_bytes_as_json_bodies_are_400_and_never_5xx(rest: httpx.AsyncClient) -> None:
    """200 seeded random byte strings sent as application/json to every POST route: always a 4xx from the
    table (malformed_request, or invalid_input if they happen to parse), never a 5xx; the server goes on."""
    rng = np.random.default_rng(11)
    sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    paths = ["/v1/sessions", f"/v1/sessions/{sid}/steps", f"/v1/sessions/{sid}/state", f"/v1/models/{MODEL}/predict",
             "/v1/steps", f"/v1/sessions/{sid}/reset"]  # fmt: skip
    seen: dict[int, int] = {}
    for n in range(200):
        body = rng.bytes(int(rng.integers(1, 200)))
        r = await rest.post(paths[n % len(paths)], content=body, headers={"content-type": "application/json"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (r.status_code, r.text)
        if r.status_code >= 400:
            assert r.json()["code"] in {"malformed_request", "invalid_input", "session_not_found"}, r.text
    assert seen.get(400, 0) > 100, seen
    assert (await rest.get(f"/v1/sessions/{sid}")).status_code == 200


async def test_repository_errors_are_the_same_on_rest_and_grpc(make_server: ServerFactory, tmp_path: Any) -> None:
    """A version that cannot load is model_load_failed and unloading the last model is model_in_use, on the v2
    REST routes and the inference.GRPCInferenceService calls alike; the server goes on serving."""
    import shutil

    from service.grpc._generated.inference import grpc_service_pb2 as kpb
    from service.grpc._generated.inference import grpc_service_pb2_grpc as kpb_grpc

    repo = tmp_path / "models"
    shutil.copytree(SHIPPED_REPO / MODEL, repo / MODEL)
    srv = await make_server(models=repo, model_poll_s=0)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest,
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch,
    ):
        v2 = kpb_grpc.GRPCInferenceServiceStub(ch)
        message = check(
            ErrorCode.MODEL_LOAD_FAILED,
            await rest.post("/v2/repository/models/broken/load"),
            await grpc_error(v2.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="broken"))),
        )
        assert "broken/1: cannot load model.onnx" in message
        message = check(
            ErrorCode.MODEL_IN_USE,
            await rest.post(f"/v2/repository/models/{MODEL}/unload"),
            await grpc_error(v2.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=MODEL))),
        )
        assert "last model" in message
        assert (await rest.post("/v1/sessions", json={"model": MODEL})).status_code == 201


async def test_a_deleted_session_is_404_on_every_operation_until_an_import_creates_it_again(
    rest: httpx.AsyncClient,
) -> None:
    """After DELETE, every operation on the session is 404 session_not_found (the fuzzer's use-after-free check
    is off because of the last line): an import is an upsert, and creates the session again."""
    sid = (await rest.post("/v1/sessions", json={"model": "seattle-weather"})).json()["session_id"]
    snap = (await rest.get(f"/v1/sessions/{sid}/state")).json()
    assert (await rest.delete(f"/v1/sessions/{sid}")).status_code == 200
    row = {"inputs": [[0.0, 12.8, 5.0, 4.7]]}
    calls = [("GET", "", None), ("GET", "/state", None), ("POST", "/steps", row), ("POST", "/peek", row),
             ("POST", "/fork", {}), ("POST", "/reset", None), ("DELETE", "", None)]  # fmt: skip
    for method, tail, body in calls:
        r = await rest.request(method, f"/v1/sessions/{sid}{tail}", json=body)
        assert (r.status_code, r.json()["code"]) == (404, "session_not_found"), (method, tail, r.text)
    again = await rest.post(f"/v1/sessions/{sid}/state", json=snap)
    assert again.status_code == 200
    assert (await rest.get(f"/v1/sessions/{sid}")).status_code == 200


async def test_a_session_damaged_in_redis_is_500_data_loss_alone_and_can_be_deleted(
    make_server: ServerFactory, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A session value cut short in Redis (by hand, or a program sharing the prefix): every operation on that
    session says it is damaged and to delete it, on both transports and for a stream that resumes it; in a batch
    its item fails alone beside a healthy one; DELETE removes it. No 'internal' error, no traceback in the log
    (a step on it answered 500 internal, and failed a whole batch with it)."""
    srv: Server = await make_server(state_store=REDIS_URL, redis_key_prefix=prefix)
    row = [0.0, 12.8, 5.0, 4.7]
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest,
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel,
    ):
        stub = pb_grpc.PredictorStub(channel)
        for sid in ("healthy", "damaged"):
            assert (await rest.post("/v1/sessions", json={"model": MODEL, "session_id": sid})).status_code == 201
        store = srv.store
        raw = await store.redis.get(prefix + "s:damaged")  # type: ignore[attr-defined]
        await store.redis.set(prefix + "s:damaged", raw[:-3], px=60_000)  # type: ignore[attr-defined]
        caplog.clear()
        r = await rest.post("/v1/sessions/damaged/steps", json={"inputs": [row]})
        message = check(ErrorCode.SESSION_CORRUPT, r, await grpc_error(
            stub.Step(pb.StepRequest(session_id="damaged", inputs=m([row])))))  # fmt: skip
        assert "damaged" in message
        assert "delete the session and open it again" in message
        for method, tail in (("GET", ""), ("GET", "/state"), ("POST", "/reset")):
            got = await rest.request(method, f"/v1/sessions/damaged{tail}")
            assert (got.status_code, got.json()["code"]) == (500, "session_corrupt"), (method, tail, got.text)
        items = [{"session_id": "healthy", "inputs": [row]}, {"session_id": "damaged", "inputs": [row]}]
        batch = (await rest.post("/v1/steps", json={"steps": items})).json()
        assert batch["results"][0]["result"]["steps"] == 1
        assert batch["results"][1]["error"]["code"] == "session_corrupt"
        stream = stub.Stream()
        await stream.write(pb.StreamRequest(resume_session_id="damaged"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream.read()
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        assert (await rest.delete("/v1/sessions/damaged")).status_code == 200
        gone = await rest.get("/v1/sessions/damaged")
        assert (gone.status_code, gone.json()["code"]) == (404, "session_not_found")
        assert (await rest.post("/v1/sessions/healthy/steps", json={"inputs": [row]})).json()["steps"] == 2
        assert await store.count() == 1
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
