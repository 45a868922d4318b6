"""`create_app(dataplane, metrics, max_body_bytes)`: the FastAPI app (REST + WebSocket), with no import-time state."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.auth import CHALLENGE, ApiKeys
from service.core.dataplane import DataPlane, StepResult, StreamMessage, StreamOpen, StreamReply
from service.errors import (
    ERROR_TABLE,
    ErrorCode,
    InvalidInputError,
    MalformedRequestError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    RouteNotFoundError,
    ServeError,
    as_serve_error,
)
from service.metrics import Metrics, exposition
from service.rest import schemas as s
from service.rest.kserve import kserve_routers

log = logging.getLogger(__name__)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_response(e: ServeError) -> JSONResponse:
    spec = ERROR_TABLE[e.code]
    headers = {"Retry-After": str(spec.retry_after)} if spec.retry_after else {}
    if e.code is ErrorCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = CHALLENGE
    return JSONResponse({"error": e.message, "code": e.code.value}, status_code=spec.http_status, headers=headers)


def _responses(*codes: ErrorCode) -> dict[int | str, dict[str, Any]]:
    """OpenAPI: the error responses a route can give, from the error table."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in (*codes, ErrorCode.MALFORMED_REQUEST, ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.INTERNAL):
        status = ERROR_TABLE[code].http_status
        entry = out.setdefault(status, {"model": s.ErrorBody, "description": ""})
        entry["description"] = ", ".join(filter(None, [entry["description"], code.value]))
    return out


class BodyLimit:
    """Refuse bodies over the limit with 413 before reading them whole (Content-Length or streamed count)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send)
            return
        # NOTE: read the body here, bounded, so that an oversize chunked body is a 413 before any parsing
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                await self.app(scope, _replay([msg]), send)
                return
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(PayloadTooLargeError.over(self.limit))(scope, receive, send)


class HeadAsGet:
    """HEAD wherever GET is served (RFC 9110): the GET route answers, with its status and headers (Content-Length
    included) and no body. Health checkers and load balancers probe with HEAD; FastAPI's routes answer it 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headless(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headless)


class RequestMetrics:
    """Count and time every HTTP request by route and status, and answer unexpected errors with the table's
    500 here (logged once), so that they are counted like any other answer. Pure ASGI: no task per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        started = False

        async def send_counted(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception as exc:
            log.exception("unexpected error in REST handler")
            if not started:
                await error_response(as_serve_error(exc))(scope, receive, send_counted)
        finally:
            verb = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"  # NOTE: bounded label values
            method = f"{verb} {getattr(scope.get('route'), 'path', 'unmatched')}"
            protocol = "kserve" if scope["path"].startswith("/v2") else "rest"
            self.metrics.requests.labels(protocol, method, str(status)).inc()
            self.metrics.request_latency.labels(protocol, method).observe(time.perf_counter() - t0)


T = TypeVar("T")
STEPS_PATH = re.compile(r"^/v1/sessions/([^/]+)/steps$")
BATCH_PATH = "/v1/steps"
JSON_TYPES = (b"application/json", b"application/json; charset=utf-8")


class StepLane:
    """The hot routes, POST /v1/sessions/{session_id}/steps and POST /v1/steps (see `_batch`), without FastAPI's
    per-request machinery when the request is certainly valid: the body parsed once by orjson and checked by
    plain type tests, the answer encoded by orjson. Anything else (another route, another content type, a body
    the check does not accept) goes on to the FastAPI route, which answers it as documented, errors included.
    Sits inside BodyLimit (the body has arrived whole) and RequestMetrics (counted under the route's own label)."""

    def __init__(self, app: ASGIApp, dataplane: DataPlane, auth: ApiKeys | None, route: Any, batch_route: Any) -> None:
        self.app, self.dp, self.auth, self.route, self.batch_route = app, dataplane, auth, route, batch_route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            if scope["path"] == BATCH_PATH:
                await self._batch(scope, receive, send)
                return
            found = STEPS_PATH.match(scope["path"])
        if found is None:
            await self.app(scope, receive, send)
            return
        taken = await self._take(scope, receive, send, s.certain_step, self.route)
        if taken is None:
            return
        (inputs, seq), owner, wait = taken
        try:
            r = await self.dp.step(found[1], s.matrix(inputs), seq, wait, owner)
        except ServeError as e:
            await error_response(e)(scope, receive, send)
            return
        await _send_json(send, _step_reply(r))

    async def _take(
        self, scope: Scope, receive: Receive, send: Send, certain: Callable[[bytes], T | None], route: Any
    ) -> tuple[T, str, float | None] | None:
        """The body as `certain` reads it, the caller's owner and queue timeout; None when the request went on to
        the FastAPI route (the body is not certainly valid) or was answered with an error (authentication)."""
        kind, authorization, timeout = _headers(scope)
        message = await receive()
        parsed = certain(message.get("body", b"")) if kind is None or kind in JSON_TYPES else None
        if parsed is None or message.get("more_body"):
            await self.app(scope, _replay([message], receive), send)
            return None
        scope["route"] = route
        try:
            owner = "" if self.auth is None else self.auth.owner(authorization)
            return parsed, owner, queue_timeout(timeout)
        except ServeError as e:
            await error_response(e)(scope, receive, send)
            return None

    async def _batch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/steps the same way: a certainly valid body goes to the DataPlane and its answer is encoded as
        the route's StepBatchReply would be; anything else goes on to the route."""
        taken = await self._take(scope, receive, send, s.certain_batch, self.batch_route)
        if taken is None:
            return
        parsed, owner, wait = taken
        try:
            items = [(sid, s.matrix_or_error(inputs), seq) for sid, inputs, seq in parsed]
            results = await self.dp.step_batch(items, wait, owner)
        except ServeError as e:
            await error_response(e)(scope, receive, send)
            return
        await _send_json(send, {"results": [
            {"result": None, "error": {"error": r.message, "code": r.code.value}} if isinstance(r, ServeError)
            else {"result": _step_reply(r), "error": None}
            for r in results
        ]})  # fmt: skip


def _headers(scope: Scope) -> tuple[bytes | None, str | None, str | None]:
    """Content type (lowercased), authorization and request-timeout of a request."""
    kind = authorization = timeout = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind = value.lower()
        elif name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"request-timeout":
            timeout = value.decode("latin-1")
    return kind, authorization, timeout


def _step_reply(r: StepResult) -> dict[str, Any]:
    """A StepReply as the route encodes it (pydantic is the cost the lanes save)."""
    return {"session_id": r.session_id, "outputs": r.outputs.tolist(), "steps": r.steps, "seq": r.seq,
            "replayed": r.replayed}  # fmt: skip


async def _send_json(send: Send, answer: dict[str, Any]) -> None:
    body = orjson.dumps(answer)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# NOTE: the dependencies are `async def`: FastAPI runs a plain `def` one in a worker thread, a hop per request
async def _dataplane(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.dataplane
    return plane


DataPlaneDep = Annotated[DataPlane, Depends(_dataplane)]


async def _owner(request: Request) -> str:
    """The caller's owner tag from its API key ("" when authentication is off); 401 without a valid key."""
    auth: ApiKeys | None = request.app.state.auth
    return "" if auth is None else auth.owner(request.headers.get("authorization"))


Owner = Annotated[str, Depends(_owner)]
TIMEOUT_HEADER = "Request-Timeout"


async def _queue_timeout(request: Request) -> float | None:
    """The client's `Request-Timeout` header: seconds a step may wait in the queue (None: the server default)."""
    return queue_timeout(request.headers.get(TIMEOUT_HEADER))


def queue_timeout(raw: str | None) -> float | None:
    """A `Request-Timeout` value in seconds, checked (None: absent)."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 86_400:  # NOTE: also refuses nan and inf
        raise InvalidInputError(
            f"{TIMEOUT_HEADER} must be a number of seconds above 0 and below a day, 86400 (such as 0.5); "
            f"got {raw[:40]!r}"
        )
    return value


QueueTimeout = Annotated[float | None, Depends(_queue_timeout)]


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """An ASGI receive that returns the given messages first, then defers to `then` (e.g. for disconnects)."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route takes on this path (from the OpenAPI document, where all routes are)."""
    templates: list[tuple[re.Pattern[str], list[str]]] | None = getattr(app.state, "allow_templates", None)
    if templates is None:
        templates = [
            (re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(t)) + "$"), [m.upper() for m in ops])
            for t, ops in app.openapi()["paths"].items()
        ]
        app.state.allow_templates = templates
    return sorted({m for pattern, methods in templates if pattern.match(path) for m in methods})


def create_app(
    dataplane: DataPlane,
    metrics: Metrics,
    max_body_bytes: int,
    auth: ApiKeys | None = None,
    metrics_auth: bool = False,
) -> FastAPI:
    """Build the REST app over one DataPlane."""
    # NOTE: a body without a Content-Type is read as JSON on every route, as the step lane reads it (FastAPI
    # from 0.130 or so refuses it by default; older releases have no such switch and read it)
    lenient = {"strict_content_type": False} if "strict_content_type" in inspect.signature(FastAPI).parameters else {}
    app = FastAPI(
        title="lstm-serve",
        version="1",
        description="Stateful LSTM forecasting sessions. Values are raw units; errors are "
        '`{"error": message, "code": machine_code}`.',
        **lenient,  # type: ignore[arg-type]
    )
    app.state.dataplane = dataplane
    app.state.auth = auth
    dp = dataplane

    # --- errors ------------------------------------------------------------------------------------
    @app.exception_handler(ServeError)
    async def serve_error(_: Request, e: ServeError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(s.validation_error(e, request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # NOTE: Starlette's own errors, mapped into the table: routing, and bodies it cannot parse
        if e.status_code == 404:
            return error_response(RouteNotFoundError(f"no route {request.url.path!r}; the API is listed at /docs"))
        if e.status_code == 405:
            answer = error_response(MethodNotAllowedError(f"{request.url.path!r} does not take {request.method}"))
            allow = allowed_methods(app, request.url.path)
            if allow:
                answer.headers["Allow"] = ", ".join(allow)  # NOTE: RFC 9110: a 405 says what the path takes
            return answer
        if e.status_code == 400:
            return error_response(MalformedRequestError(s.NOT_JSON))
        log.warning("unmapped HTTP error %d: %s", e.status_code, e.detail)
        return error_response(as_serve_error(e))

    # --- health and metrics ------------------------------------------------------------------------
    ops = APIRouter(tags=["operations"])

    @ops.get("/healthz", summary="Liveness: the process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "live"}

    @ops.get(
        "/readyz", summary="Readiness: models loaded and not draining", responses=_responses(ErrorCode.UNAVAILABLE)
    )
    async def readyz(d: DataPlaneDep) -> JSONResponse:
        if d.ready:
            return JSONResponse({"status": "ready", "models": [m.key for m in d.repo.all()]})
        reason = "draining" if d.draining else "starting" if not d.started else "session store unavailable"
        return JSONResponse({"status": "not ready", "error": reason, "code": "unavailable"}, status_code=503)

    @ops.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        dependencies=[Depends(_owner)] if metrics_auth else [],
        responses=_responses(ErrorCode.UNAUTHENTICATED) if metrics_auth else None,
    )
    async def prometheus() -> Response:
        dataplane.flush_metrics()
        return Response(exposition(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- models ------------------------------------------------------------------------------------
    guarded = {"dependencies": [Depends(_owner)], "responses": _responses(ErrorCode.UNAUTHENTICATED)} if auth else {}
    models = APIRouter(prefix="/v1/models", tags=["models"], **guarded)  # type: ignore[arg-type]

    @models.get("", summary="List models (newest version of each)")
    async def list_models(d: DataPlaneDep) -> s.ModelsReply:
        return s.ModelsReply(models=[s.ModelReply.of(m, d.versions(m.name)) for m in d.list_models()])

    @models.get("/{name}", summary="Describe a model", responses=_responses(ErrorCode.MODEL_NOT_FOUND))
    async def get_model(name: str, d: DataPlaneDep, version: str | None = None) -> s.ModelReply:
        m = d.get_model(name, version)
        return s.ModelReply.of(m, d.versions(m.name))

    @models.post(
        "/{name}/predict",
        summary="Stateless: run a whole sequence from a zero state",
        responses=_responses(
            ErrorCode.INVALID_INPUT,
            ErrorCode.MODEL_NOT_FOUND,
            ErrorCode.OVERLOADED,
            ErrorCode.UNAVAILABLE,
            ErrorCode.DEADLINE_EXCEEDED,
            ErrorCode.MODEL_ERROR,
        ),
    )
    async def predict(name: str, body: s.PredictBody, d: DataPlaneDep, wait: QueueTimeout) -> s.PredictReply:
        m, out = await d.predict(name, body.version, s.matrix(body.inputs), wait)
        return s.PredictReply(model=m.name, version=m.version, outputs=out.tolist())

    # --- sessions ----------------------------------------------------------------------------------
    sessions = APIRouter(prefix="/v1/sessions", tags=["sessions"], **guarded)  # type: ignore[arg-type]
    not_found = _responses(ErrorCode.INVALID_INPUT, ErrorCode.SESSION_NOT_FOUND)

    @sessions.post(
        "",
        status_code=201,
        summary="Open a session on a model",
        responses=_responses(
            ErrorCode.INVALID_INPUT,
            ErrorCode.MODEL_NOT_FOUND,
            ErrorCode.SESSION_EXISTS,
            ErrorCode.SESSION_LIMIT,
            ErrorCode.UNAVAILABLE,
        ),
    )
    async def create_session(body: s.CreateSessionBody, d: DataPlaneDep, owner: Owner) -> s.SessionReply:
        return s.SessionReply.of(await d.create_session(body.model, body.version, body.session_id, owner))

    @sessions.get("/{session_id}", summary="Describe a session", responses=not_found)
    async def get_session(session_id: str, d: DataPlaneDep, owner: Owner) -> s.SessionReply:
        info = await d.get_session(session_id, owner)
        return s.SessionReply.of(info, d.live_accuracy(info))

    @sessions.delete("/{session_id}", summary="Delete a session", responses=not_found)
    async def delete_session(session_id: str, d: DataPlaneDep, owner: Owner) -> s.DeleteReply:
        await d.delete_session(session_id, owner=owner)
        return s.DeleteReply(session_id=session_id)

    @sessions.post(
        "/{session_id}/steps",
        summary="Apply 1..N time steps; the answer holds the outputs of every step",
        responses=_responses(
            ErrorCode.INVALID_INPUT,
            ErrorCode.SESSION_NOT_FOUND,
            ErrorCode.SEQ_CONFLICT,
            ErrorCode.UNAVAILABLE,
            ErrorCode.OVERLOADED,
            ErrorCode.DEADLINE_EXCEEDED,
            ErrorCode.MODEL_ERROR,
        ),
    )
    async def step(session_id: str, body: s.StepBody, d: DataPlaneDep, wait: QueueTimeout, owner: Owner) -> s.StepReply:
        return s.StepReply.of(await d.step(session_id, s.matrix(body.inputs), body.seq, wait, owner))

    @sessions.post(
        "/{session_id}/peek",
        summary="What-if: the outputs of hypothetical steps; the session stays exactly as it was",
        responses=_responses(
            ErrorCode.INVALID_INPUT,
            ErrorCode.SESSION_NOT_FOUND,
            ErrorCode.UNAVAILABLE,
            ErrorCode.OVERLOADED,
            ErrorCode.DEADLINE_EXCEEDED,
            ErrorCode.MODEL_ERROR,
        ),
    )
    async def peek(session_id: str, body: s.PeekBody, d: DataPlaneDep, wait: QueueTimeout, owner: Owner) -> s.StepReply:
        return s.StepReply.of(await d.peek(session_id, s.matrix(body.inputs), wait, owner))

    @sessions.post(
        "/{session_id}/fork",
        status_code=201,
        summary="A new session from this one's current state (forks and origin are independent from then on)",
        responses=_responses(
            ErrorCode.INVALID_INPUT,
            ErrorCode.SESSION_NOT_FOUND,
            ErrorCode.SESSION_EXISTS,
            ErrorCode.SESSION_LIMIT,
            ErrorCode.UNAVAILABLE,
        ),
    )
    async def fork(session_id: str, d: DataPlaneDep, owner: Owner, body: s.ForkBody | None = None) -> s.SessionReply:
        body = body or s.ForkBody()  # NOTE: every field is optional, so is the body
        return s.SessionReply.of(await d.fork_session(session_id, body.session_id, body.scored, owner))

    @sessions.post("/{session_id}/reset", summary="Reset a session's state to zero", responses=not_found)
    async def reset(session_id: str, d: DataPlaneDep, owner: Owner) -> s.SessionReply:
        return s.SessionReply.of(await d.reset_session(session_id, owner))

    @sessions.get("/{session_id}/state", summary="Export a portable snapshot", responses=not_found)
    async def export_state(session_id: str, d: DataPlaneDep, owner: Owner) -> s.SnapshotBody:
        return s.SnapshotBody.of(await d.export_session(session_id, owner))

    @sessions.post(
        "/{session_id}/state",
        summary="Import a snapshot (creates the session if needed)",
        responses=_responses(
            ErrorCode.INVALID_INPUT, ErrorCode.MODEL_NOT_FOUND, ErrorCode.SESSION_LIMIT, ErrorCode.UNAVAILABLE
        ),
    )
    async def import_state(session_id: str, body: s.SnapshotBody, d: DataPlaneDep, owner: Owner) -> s.SessionReply:
        return s.SessionReply.of(await d.import_session(session_id, body.to_snapshot(), owner))

    steps = APIRouter(prefix="/v1/steps", tags=["sessions"], **guarded)  # type: ignore[arg-type]

    @steps.post(
        "",
        summary="Steps for many sessions in one request (batched together; each item succeeds or fails alone)",
        responses=_responses(ErrorCode.INVALID_INPUT, ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED),
    )
    async def step_batch(body: s.StepBatchBody, d: DataPlaneDep, wait: QueueTimeout, owner: Owner) -> s.StepBatchReply:
        items = [(it.session_id, s.matrix_or_error(it.inputs), it.seq) for it in body.steps]
        results = await d.step_batch(items, wait, owner)
        return s.StepBatchReply(
            results=[
                s.BatchResult(error=s.ErrorBody(error=r.message, code=r.code.value))
                if isinstance(r, ServeError)
                else s.BatchResult(result=s.StepReply.of(r))
                for r in results
            ]
        )

    # --- WebSocket stream --------------------------------------------------------------------------
    @app.websocket("/v1/sessions/stream")
    async def stream(ws: WebSocket) -> None:
        """Same semantics as the gRPC Stream: JSON messages, one reply per message, errors in-band."""
        await ws.accept()
        try:
            owner = "" if auth is None else auth.owner(ws.headers.get("authorization"))
        except ServeError as denied:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await ws.send_text(_text({"error": denied.message, "code": denied.code.value}))
                await ws.close(code=1008, reason=denied.code.value)
            metrics.requests.labels("websocket", "stream", denied.code.value).inc()
            return
        t0 = time.perf_counter()
        code = "ok"

        async def messages() -> AsyncIterator[StreamMessage]:
            first = True
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                text = msg.get("text")
                if text is None:
                    yield StreamMessage(inputs=None, error=MalformedRequestError("send JSON text messages, not binary"))
                else:
                    yield ws_message(text, first, max_body_bytes)
                first = False

        try:
            async with contextlib.aclosing(dp.stream(messages(), owner)) as replies:
                async for reply in replies:
                    metrics.stream_messages.labels("websocket", reply.error.code.value if reply.error else "ok").inc()
                    await ws.send_text(_text(ws_reply(reply)))
        except WebSocketDisconnect:
            pass
        except Exception as exc:
            if not isinstance(exc, ServeError):
                log.exception("unexpected error in WebSocket stream")
            e = as_serve_error(exc)
            code = e.code.value
            # NOTE: 1013 "try again later" for retryable errors, 1008 for client errors, 1011 for ours; a fatal
            # deadline_exceeded is the client's (no first message in time), though a 504 on REST is the server's
            spec = ERROR_TABLE[e.code]
            ours = spec.http_status >= 500 and e.code is not ErrorCode.DEADLINE_EXCEEDED
            close = 1013 if spec.retry_after else 1011 if ours else 1008
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # the peer may be gone already
                await ws.send_text(_text({"error": e.message, "code": e.code.value}))
                await ws.close(code=close, reason=e.code.value)
        else:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await ws.close()
        finally:
            metrics.requests.labels("websocket", "stream", code).inc()
            metrics.stream_duration.labels("websocket").observe(time.perf_counter() - t0)

    for router in (ops, models, sessions, steps, *kserve_routers(dp, guarded, _owner, _responses)):
        app.include_router(router)
    # NOTE: outermost last: RequestMetrics counts and times everything (413s too), BodyLimit reads the body whole
    # before the step lane looks at it
    step_route = next(r for r in sessions.routes if getattr(r, "path", None) == "/v1/sessions/{session_id}/steps")
    batch_route = next(r for r in steps.routes if getattr(r, "path", None) == BATCH_PATH)
    app.add_middleware(StepLane, dataplane=dataplane, auth=auth, route=step_route, batch_route=batch_route)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(HeadAsGet)  # NOTE: so HEAD requests are counted as the GET that answers them

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document without its default 422 responses (validation errors are 400 here), with the
        served model names and a valid example, so that clients and generators can open real sessions."""
        schema = generate()
        names = dp.repo.names()
        # NOTE: one example per served model, in the order of the names: a session of names[i] takes rows[i]
        example_rows = [[0.0] * dp.get_model(name).signature.features for name in names]
        for path, operations in schema.get("paths", {}).items():
            for op in operations.values():
                op.get("responses", {}).pop("422", None)
                for param in op.get("parameters", []):
                    if path.startswith("/v1/models/") and param["name"] == "name":
                        param["schema"]["enum"] = names
                    if param["name"] == "session_id" and param["in"] == "path":
                        param["schema"].update(s.SESSION_ID_SCHEMA)
        if auth is not None:  # NOTE: the operations behind the keys say so (clients, generators, ignored-auth checks)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key: Authorization: Bearer <key>"}
            }
            for path, operations in schema.get("paths", {}).items():
                for op in operations.values():
                    if path.startswith("/v1/") or (path == "/metrics" and metrics_auth):
                        op["security"] = [{"bearer": []}]
        bodies = schema.get("components", {}).get("schemas", {})
        if "CreateSessionBody" in bodies:
            bodies["CreateSessionBody"]["properties"]["model"]["enum"] = names
            bodies["CreateSessionBody"]["examples"] = [{"model": name} for name in names]
        # NOTE: the v2 routes name their model in the path: say which names there are (the repository's too)
        on_disk = sorted({e.name for e in dp.live.index()}) if dp.live is not None else names
        for path, path_ops in schema["paths"].items():
            if path.startswith("/v2/") and "{name}" in path:
                for op in path_ops.values():
                    for param in op.get("parameters", []):
                        if param["name"] == "name":
                            known = on_disk if path.startswith("/v2/repository/") else names
                            param["schema"] = {"type": "string", "enum": known}
        for body in ("StepBody", "PredictBody", "PeekBody"):
            if body in bodies:
                bodies[body]["examples"] = [{"inputs": [row]} for row in example_rows]
        # NOTE: dimensions are stated when every served model shares them (one model, or versions alike)
        sigs = {m.runtime.signature for m in dp.repo.all()}  # NOTE: the graphs' (live scoring aside)
        if len(sigs) == 1:
            (sig,) = sigs
            row = {"minItems": sig.features, "maxItems": sig.features}
            for body, field in (("StepBody", "inputs"), ("PredictBody", "inputs"), ("PeekBody", "inputs")):
                if body in bodies:
                    bodies[body]["properties"][field]["items"].update(row)
            if "SnapshotBody" in bodies:
                for field, width in (("h", sig.hidden), ("c", sig.cell)):
                    bodies["SnapshotBody"]["properties"][field].update(
                        minItems=sig.layers, maxItems=sig.layers,
                        items={"type": "array", "items": s.NUMBER, "minItems": width, "maxItems": width},
                    )  # fmt: skip
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def ws_message(text: str, first: bool, limit: int) -> StreamMessage:
    """Decode one WebSocket JSON message; a bad one becomes an in-band error."""
    try:
        if len(text) > limit or len(raw := text.encode()) > limit:  # NOTE: the limit is in bytes, as on REST
            raise PayloadTooLargeError.over(limit)
        # NOTE: a later message that is certainly a valid step skips pydantic, as the REST step lane does
        step = None if first else s.certain_step(raw)
        if step is not None:
            return StreamMessage(inputs=s.matrix(step[0]), seq=step[1])
        msg = s.StreamBody.model_validate_json(raw)
        opened = None
        if not first and (msg.model, msg.resume, msg.session_id, msg.version, msg.keep) != (
            None,
            None,
            None,
            None,
            False,
        ):
            raise InvalidInputError("only the first stream message may open a session (model, version, session_id, "
                                    "resume, keep); later ones carry inputs and seq")  # fmt: skip
        if msg.model is not None or msg.resume is not None:
            opened = StreamOpen(
                model=msg.model, version=msg.version, session_id=msg.session_id,
                resume_session_id=msg.resume, keep=msg.keep,
            )  # fmt: skip
        return StreamMessage(inputs=s.matrix(msg.inputs), seq=msg.seq, open=opened, peek=msg.peek)
    except ServeError as e:
        return StreamMessage(inputs=None, error=e)
    except ValidationError as e:
        return StreamMessage(inputs=None, error=s.validation_error(e))


def _text(message: dict[str, Any]) -> str:
    """A WebSocket JSON text frame (orjson: a tenth of the stdlib's time per reply)."""
    return orjson.dumps(message).decode()


def ws_reply(r: StreamReply) -> dict[str, Any]:
    out: dict[str, Any] = {"session_id": r.session_id}
    if r.result is not None:
        out.update(
            outputs=r.result.outputs.tolist(), steps=r.result.steps, seq=r.result.seq, replayed=r.result.replayed
        )
    if r.error is not None:
        out.update(error=r.error.message, code=r.error.code.value)
    if r.session is not None:
        out["session"] = s.SessionReply.of(r.session).model_dump()
    return out
