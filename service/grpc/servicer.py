"""`lstm.v1.Predictor`: decode, call the DataPlane, encode. Errors map through the one error table."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from service.auth import ApiKeys
from service.core.dataplane import DataPlane, StreamMessage
from service.errors import (
    ERROR_TABLE,
    InvalidInputError,
    MalformedRequestError,
    PayloadTooLargeError,
    ServeError,
    as_serve_error,
)
from service.grpc import converters as cv
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from service.metrics import Metrics

log = logging.getLogger(__name__)
ERROR_CODE_KEY = "lstm-error-code"
R = TypeVar("R")


def grpc_status(e: ServeError) -> grpc.StatusCode:
    return grpc.StatusCode[ERROR_TABLE[e.code].grpc_status]


async def abort(context: grpc.aio.ServicerContext[Any, Any], e: ServeError) -> None:
    context.set_trailing_metadata(((ERROR_CODE_KEY, e.code.value),))
    await context.abort(grpc_status(e), e.message)


class Undecodable:
    """Stands in for a request that protobuf could not decode, so that the handler answers it with our error
    (INVALID_ARGUMENT, malformed_request) instead of grpcio's UNKNOWN and a traceback per call."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> MalformedRequestError:
        return MalformedRequestError(f"the request is not a valid {self.type_name} message; send protobuf bytes")


class _RefusalLog:
    """Logs undecodable requests at most once per interval (with a count), so that no client floods the log."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval, self.last, self.count = interval, -float("inf"), 0

    def note(self, type_name: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            log.warning("refused %d undecodable gRPC request(s) (last: %s)", self.count, type_name)
            self.last, self.count = now, 0


REFUSALS = _RefusalLog()


def lenient(message: type[Any]) -> Callable[[bytes], Any]:
    """A request deserializer that returns Undecodable instead of raising on bytes that are not the message."""
    name = message.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError:
            REFUSALS.note(name)
            return Undecodable(name)

    return deserialize


def add_predictor(servicer: PredictorServicer, server: grpc.aio.Server) -> None:
    """Register the Predictor (see `add_service`)."""
    add_service(servicer, server, pb, "Predictor")


def add_service(servicer: Any, server: grpc.aio.Server, module: Any, name: str) -> None:
    """Register a service like the generated `add_<Name>Servicer_to_server`, with lenient request
    deserializers (the method shapes and types come from the service descriptor in `module`, a *_pb2)."""
    service = module.DESCRIPTOR.services_by_name[name]
    handlers = {}
    for method in service.methods:
        request, response = getattr(module, method.input_type.name), getattr(module, method.output_type.name)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(getattr(servicer, method.name), request_deserializer=lenient(request),
                                     response_serializer=response.SerializeToString)  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def metadata_value(metadata: Any, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return str(v)
    return None


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]  # NOTE: generic in the stubs only
else:
    _Interceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_Interceptor):
    """With API keys, every method but the health service needs `authorization: Bearer <key>` metadata;
    others get UNAUTHENTICATED with our error code, counted, before any handler runs."""

    OPEN = ("/grpc.health.v1.Health/",)

    def __init__(self, auth: ApiKeys, metrics: Metrics, known: set[str]) -> None:
        self.auth, self.metrics, self.known = auth, metrics, known

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = details.method
        if method.startswith(self.OPEN):
            return await continuation(details)
        try:
            self.auth.owner(metadata_value(details.invocation_metadata, "authorization"))
        except ServeError as e:
            handler = await continuation(details)
            if handler is None:
                return handler  # NOTE: an unknown method: grpc answers UNIMPLEMENTED itself
            name = method.rsplit("/", 1)[-1]
            self.metrics.requests.labels("grpc", name if method in self.known else "other", grpc_status(e).name).inc()
            return _denied(handler, e)
        return await continuation(details)


def _denied(handler: grpc.RpcMethodHandler[Any, Any], e: ServeError) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that aborts with `e`."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await abort(context, e)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await abort(context, e)
        yield  # pragma: no cover - abort raises

    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **codec)
    return grpc.stream_stream_rpc_method_handler(streaming, **codec)


def cancelled_code(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The status of a call that grpc cancelled under us: past its deadline, or the client went away."""
    left = context.time_remaining()
    return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"


def unary(method: str, protocol: str = "grpc") -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
    """Wrap a unary handler: count it, time it, and turn any exception into a status from the error table."""

    def wrap(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        @functools.wraps(fn)
        async def handler(self: ServicerBase, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
            t0 = time.perf_counter()
            code = "OK"
            try:
                self.check_size(request)
                return await fn(self, request, context)
            except asyncio.CancelledError:
                code = cancelled_code(context)
                raise
            except Exception as exc:
                if not isinstance(exc, ServeError):
                    log.exception("unexpected error in gRPC %s", method)
                e = as_serve_error(exc)
                code = grpc_status(e).name
                await abort(context, e)
                raise  # pragma: no cover - abort raises
            finally:
                self.metrics.requests.labels(protocol, method, code).inc()
                self.metrics.request_latency.labels(protocol, method).observe(time.perf_counter() - t0)

        return handler

    return wrap


class ServicerBase:
    """What every servicer over the DataPlane shares: the caller's owner tag and the request size check."""

    protocol = "grpc"

    def __init__(
        self,
        dataplane: DataPlane,
        metrics: Metrics,
        max_message_bytes: int = 4 * 1024 * 1024,
        auth: ApiKeys | None = None,
    ) -> None:
        self.dp, self.metrics, self.max_message_bytes, self.auth = dataplane, metrics, max_message_bytes, auth
        # NOTE: labelled children looked up once per label value, not per message (.labels() is measurable)
        self._stream_messages = functools.cache(functools.partial(metrics.stream_messages.labels, self.protocol))

    def owner(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The caller's owner tag ("" without API keys); the AuthInterceptor has already refused bad keys."""
        if self.auth is None:
            return ""
        return self.auth.owner(metadata_value(context.invocation_metadata(), "authorization"))

    def check_size(self, request: Any) -> None:
        if isinstance(request, Undecodable):
            raise request.error()
        if request.ByteSize() > self.max_message_bytes:
            raise PayloadTooLargeError.over(self.max_message_bytes)


class PredictorServicer(ServicerBase, pb_grpc.PredictorServicer):
    """Thin adapter: every method is decode -> one DataPlane call -> encode."""

    @unary("Predict")
    async def Predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        model, out = await self.dp.predict(
            request.model, request.version or None, cv.to_array(request.inputs), context.time_remaining()
        )
        return pb.PredictResponse(model=model.name, version=model.version, outputs=cv.from_array(out))

    @unary("CreateSession")
    async def CreateSession(self, request: pb.CreateSessionRequest, context: Any) -> pb.SessionInfo:
        info = await self.dp.create_session(
            request.model, request.version or None, request.session_id or None, self.owner(context)
        )
        return cv.session_info(info)

    @unary("GetSession")
    async def GetSession(self, request: pb.SessionRef, context: Any) -> pb.SessionInfo:
        info = await self.dp.get_session(request.session_id, self.owner(context))
        return cv.session_info(info, self.dp.live_accuracy(info))

    @unary("Step")
    async def Step(self, request: pb.StepRequest, context: Any) -> pb.StepResponse:
        seq = request.seq if request.HasField("seq") else None
        return cv.step_response(
            await self.dp.step(
                request.session_id, cv.to_array(request.inputs), seq, context.time_remaining(), self.owner(context)
            )
        )

    @unary("ResetSession")
    async def ResetSession(self, request: pb.SessionRef, context: Any) -> pb.SessionInfo:
        return cv.session_info(await self.dp.reset_session(request.session_id, self.owner(context)))

    @unary("DeleteSession")
    async def DeleteSession(self, request: pb.SessionRef, context: Any) -> pb.DeleteSessionResponse:
        await self.dp.delete_session(request.session_id, owner=self.owner(context))
        return pb.DeleteSessionResponse(session_id=request.session_id)

    @unary("ExportSession")
    async def ExportSession(self, request: pb.SessionRef, context: Any) -> pb.SessionSnapshot:
        return cv.snapshot_to_pb(await self.dp.export_session(request.session_id, self.owner(context)))

    @unary("ImportSession")
    async def ImportSession(self, request: pb.ImportSessionRequest, context: Any) -> pb.SessionInfo:
        snap = cv.snapshot_from_pb(request.snapshot)
        return cv.session_info(await self.dp.import_session(request.session_id, snap, self.owner(context)))

    @unary("StepBatch")
    async def StepBatch(self, request: pb.StepBatchRequest, context: Any) -> pb.StepBatchResponse:
        if request.HasField("packed"):
            if request.steps:
                raise InvalidInputError("send the steps either as steps or packed, not both")
            ids, x, seq = cv.packed_steps(request.packed)
            block = await self.dp.step_block(ids, x, seq, context.time_remaining(), self.owner(context))
            return pb.StepBatchResponse(packed=cv.packed_results(block))
        items = [
            (s.session_id, cv.to_array_or_error(s.inputs), s.seq if s.HasField("seq") else None) for s in request.steps
        ]
        results = await self.dp.step_batch(items, context.time_remaining(), self.owner(context))
        return pb.StepBatchResponse(
            results=[
                pb.StepBatchResult(error=cv.error(r))
                if isinstance(r, ServeError)
                else pb.StepBatchResult(response=cv.step_response(r))
                for r in results
            ]
        )

    @unary("Peek")
    async def Peek(self, request: pb.PeekRequest, context: Any) -> pb.StepResponse:
        return cv.step_response(
            await self.dp.peek(
                request.session_id, cv.to_array(request.inputs), context.time_remaining(), self.owner(context)
            )
        )

    @unary("ForkSession")
    async def ForkSession(self, request: pb.ForkSessionRequest, context: Any) -> pb.SessionInfo:
        new_id = request.new_session_id or None
        return cv.session_info(
            await self.dp.fork_session(request.session_id, new_id, request.scored, self.owner(context))
        )

    @unary("ListModels")
    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[cv.model_info(m, self.dp.versions(m.name)) for m in self.dp.list_models()])

    @unary("GetModel")
    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.ModelInfo:
        m = self.dp.get_model(request.name, request.version or None)
        return cv.model_info(m, self.dp.versions(m.name))

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamResponse]:
        """Bidirectional session stream; per-message errors in-band, fatal ones as the stream's status."""
        t0 = time.perf_counter()
        code = "OK"

        async def messages() -> AsyncIterator[StreamMessage]:
            async for req in request_iterator:
                try:
                    self.check_size(req)
                    yield cv.stream_message(req)
                except ServeError as e:  # NOTE: a message that cannot be decoded still gets its in-band error
                    yield StreamMessage(inputs=None, error=e)

        try:
            # NOTE: aclosing: when the client goes away, the session is closed now, not at garbage collection
            async with contextlib.aclosing(self.dp.stream(messages(), self.owner(context))) as replies:
                async for reply in replies:
                    self._stream_messages(reply.error.code.value if reply.error else "ok").inc()
                    yield cv.stream_response(reply)
        except asyncio.CancelledError:
            code = cancelled_code(context)
            raise
        except Exception as exc:
            if not isinstance(exc, ServeError):
                log.exception("unexpected error in gRPC Stream")
            e = as_serve_error(exc)
            code = grpc_status(e).name
            await abort(context, e)
        finally:
            if code == "OK" and context.cancelled():  # NOTE: a client cancel can look like the end of its requests
                code = cancelled_code(context)
            self.metrics.requests.labels("grpc", "Stream", code).inc()
            self.metrics.stream_duration.labels("grpc").observe(time.perf_counter() - t0)
