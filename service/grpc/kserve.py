"""`inference.GRPCInferenceService`: the Open Inference Protocol (KServe v2) over gRPC, with Triton's streaming
and configuration extensions; a thin adapter over `service.core.infer`, like the REST one under `/v2`."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from service.core.infer import (
    EXTENSIONS,
    InferRequest,
    InferResponse,
    check_fp32,
    error_text,
    infer,
    load_parameters,
    model_config,
    model_metadata,
    raw_fp32,
    sequence_key,
    server_version,
    unload_parameters,
)
from service.core.infer import sequence_parameters as read_parameters
from service.core.live import LiveRepository
from service.errors import InvalidInputError, ServeError, UnavailableError, as_serve_error
from service.grpc._generated.inference import grpc_service_pb2 as kpb
from service.grpc._generated.inference import grpc_service_pb2_grpc as kpb_grpc
from service.grpc._generated.inference import model_config_pb2 as mc
from service.grpc.servicer import ServicerBase, abort, cancelled_code, grpc_status, metadata_value, unary

log = logging.getLogger(__name__)
SERVICE = "GRPCInferenceService"
FULL_NAME = kpb.DESCRIPTOR.services_by_name[SERVICE].full_name  # "inference.GRPCInferenceService"
STREAM_WINDOW = 64  # requests of one stream in flight at once (answers still go back in request order)


def _parameter(p: kpb.InferParameter | kpb.ModelRepositoryParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def decode(r: kpb.ModelInferRequest) -> InferRequest:
    """An `InferRequest` from a ModelInferRequest: tensors from raw_input_contents (as tritonclient sends them)
    or from typed contents."""
    params = {k: _parameter(v) for k, v in r.parameters.items()}
    if r.raw_input_contents and len(r.raw_input_contents) != len(r.inputs):
        raise InvalidInputError(
            f"{len(r.inputs)} inputs but {len(r.raw_input_contents)} raw_input_contents; send one per input, in order"
        )
    inputs: dict[str, tuple[str, list[int], np.ndarray]] = {}
    for i, t in enumerate(r.inputs):
        check_fp32(t.name, t.datatype)
        if r.raw_input_contents:
            data = raw_fp32(t.name, r.raw_input_contents[i])
        else:
            data = np.asarray(t.contents.fp32_contents, dtype=np.float32)
        if t.name in inputs:
            raise InvalidInputError(f"input {t.name!r} appears twice")
        inputs[t.name] = (t.datatype, list(t.shape), data)
    wanted = [o.name for o in r.outputs] or None
    return InferRequest(r.model_name, r.model_version or None, inputs, wanted, r.id, **read_parameters(params))


def encode(r: InferResponse) -> kpb.ModelInferResponse:
    """Outputs in raw_output_contents (little-endian FP32): the only place tritonclient.grpc reads them from."""
    out = kpb.ModelInferResponse(model_name=r.model, model_version=r.version, id=r.id)
    for name, arr in r.outputs.items():
        out.outputs.add(name=name, datatype="FP32", shape=list(arr.shape))
        out.raw_output_contents.append(np.ascontiguousarray(arr, dtype="<f4").tobytes())
    for k, v in r.parameters.items():
        if isinstance(v, str):
            out.parameters[k].string_param = v
        else:
            out.parameters[k].int64_param = int(v)
    return out


def config_pb(d: dict[str, Any]) -> mc.ModelConfig:
    seq = d["sequence_batching"]
    return mc.ModelConfig(
        name=d["name"], platform=d["platform"], backend=d["backend"],
        version_policy=mc.ModelVersionPolicy(
            latest=mc.ModelVersionPolicy.Latest(num_versions=d["version_policy"]["latest"]["num_versions"])
        ),
        max_batch_size=d["max_batch_size"],
        input=[mc.ModelInput(name=i["name"], data_type=mc.TYPE_FP32, dims=i["dims"]) for i in d["input"]],
        output=[mc.ModelOutput(name=o["name"], data_type=mc.TYPE_FP32, dims=o["dims"]) for o in d["output"]],
        sequence_batching=mc.ModelSequenceBatching(
            max_sequence_idle_microseconds=seq["max_sequence_idle_microseconds"],
            state=[mc.ModelSequenceBatching.State(input_name=s["input_name"], output_name=s["output_name"],
                                                  data_type=mc.TYPE_FP32, dims=s["dims"]) for s in seq["state"]],
        ),
        parameters={k: mc.ModelParameter(string_value=v["string_value"]) for k, v in d["parameters"].items()},
    )  # fmt: skip


class InferenceServicer(ServicerBase, kpb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 / Triton gRPC: decode -> `service.core.infer` -> encode; errors through the one error table."""

    protocol = "kserve"

    @unary("ServerLive", "kserve")
    async def ServerLive(self, request: kpb.ServerLiveRequest, context: Any) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    @unary("ServerReady", "kserve")
    async def ServerReady(self, request: kpb.ServerReadyRequest, context: Any) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self.dp.ready)

    @unary("ModelReady", "kserve")
    async def ModelReady(self, request: kpb.ModelReadyRequest, context: Any) -> kpb.ModelReadyResponse:
        self.dp.get_model(request.name, request.version or None)
        return kpb.ModelReadyResponse(ready=self.dp.ready)

    @unary("ServerMetadata", "kserve")
    async def ServerMetadata(self, request: kpb.ServerMetadataRequest, context: Any) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name="lstm-serve", version=server_version(), extensions=EXTENSIONS)

    @unary("ModelMetadata", "kserve")
    async def ModelMetadata(self, request: kpb.ModelMetadataRequest, context: Any) -> kpb.ModelMetadataResponse:
        m = self.dp.get_model(request.name, request.version or None)
        d = model_metadata(m, self.dp.versions(m.name))
        t = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=d["name"], versions=d["versions"], platform=d["platform"],
            inputs=[t(**i) for i in d["inputs"]], outputs=[t(**o) for o in d["outputs"]],
        )  # fmt: skip

    @unary("ModelConfig", "kserve")
    async def ModelConfig(self, request: kpb.ModelConfigRequest, context: Any) -> kpb.ModelConfigResponse:
        m = self.dp.get_model(request.name, request.version or None)
        lim = self.dp.limits
        return kpb.ModelConfigResponse(
            config=config_pb(model_config(m, self.dp.versions(m.name), lim.max_batch_size, lim.session_ttl))
        )

    @unary("ModelInfer", "kserve")
    async def ModelInfer(self, request: kpb.ModelInferRequest, context: Any) -> kpb.ModelInferResponse:
        return encode(await infer(self.dp, decode(request), self.owner(context)))

    def _repository(self, repository_name: str) -> LiveRepository:
        if repository_name:
            raise InvalidInputError(f'this server has one model repository, named ""; got {repository_name!r}')
        if self.dp.live is None:
            raise UnavailableError("this server has no model repository directory to load from")
        return self.dp.live

    @unary("RepositoryIndex", "kserve")
    async def RepositoryIndex(self, request: kpb.RepositoryIndexRequest, context: Any) -> kpb.RepositoryIndexResponse:
        entries = self._repository(request.repository_name).index(request.ready)
        index = kpb.RepositoryIndexResponse.ModelIndex
        return kpb.RepositoryIndexResponse(models=[index(**e.__dict__) for e in entries])

    @unary("RepositoryModelLoad", "kserve")
    async def RepositoryModelLoad(
        self, request: kpb.RepositoryModelLoadRequest, context: Any
    ) -> kpb.RepositoryModelLoadResponse:
        live = self._repository(request.repository_name)
        load_parameters({k: _parameter(v) for k, v in request.parameters.items()})
        await live.load(request.model_name)
        return kpb.RepositoryModelLoadResponse()

    @unary("RepositoryModelUnload", "kserve")
    async def RepositoryModelUnload(
        self, request: kpb.RepositoryModelUnloadRequest, context: Any
    ) -> kpb.RepositoryModelUnloadResponse:
        live = self._repository(request.repository_name)
        version, force = unload_parameters({k: _parameter(v) for k, v in request.parameters.items()})
        await live.unload(request.model_name, version, force)
        return kpb.RepositoryModelUnloadResponse()

    async def _one(
        self, request: Any, owner: str, after: asyncio.Future[Any] | None
    ) -> tuple[kpb.ModelStreamInferResponse, ServeError | None]:
        """One stream request; `after` is the previous request of the same sequence, which must apply first."""
        if after is not None:
            # NOTE: wait for it without taking its outcome, and without swallowing a cancel of this request
            await asyncio.wait((after,))
        rid = request.id if isinstance(request, kpb.ModelInferRequest) else ""
        try:
            self.check_size(request)
            reply = kpb.ModelStreamInferResponse(infer_response=encode(await infer(self.dp, decode(request), owner)))
        except Exception as exc:
            if not isinstance(exc, ServeError):
                log.exception("unexpected error in gRPC ModelStreamInfer")
            e = as_serve_error(exc)
            self._stream_messages(e.code.value).inc()
            model = request.model_name if isinstance(request, kpb.ModelInferRequest) else ""
            failed = kpb.ModelInferResponse(id=rid, model_name=model)
            return kpb.ModelStreamInferResponse(error_message=error_text(e), infer_response=failed), e
        self._stream_messages("ok").inc()
        return reply, None

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        """Requests run as they arrive (steps of different sequences batch together; those of one sequence apply
        in order); answers go back in request order. A failed request answers with error_message and the stream
        goes on, unless the client asked for real status codes (`triton_grpc_error: true`): then it ends with it.
        As in Triton, the end of a stream ends no sequence: END does, or the idle timeout."""
        t0 = time.perf_counter()
        code = "OK"
        strict = metadata_value(context.invocation_metadata(), "triton_grpc_error") == "true"
        owner = self.owner(context)
        answers: asyncio.Queue[asyncio.Task[tuple[kpb.ModelStreamInferResponse, ServeError | None]] | None]
        answers = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_WINDOW)  # NOTE: bounds the requests read ahead of their answers

        last: dict[str, asyncio.Task[Any]] = {}  # sequence id -> its latest request still running

        def forget(sid: str, task: asyncio.Task[Any]) -> None:
            if last.get(sid) is task:
                del last[sid]

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await slots.acquire()
                    sid = None
                    if isinstance(req, kpb.ModelInferRequest) and "sequence_id" in req.parameters:
                        sid = sequence_key(_parameter(req.parameters["sequence_id"]))
                    task = asyncio.ensure_future(self._one(req, owner, last.get(sid) if sid else None))
                    if sid:
                        last[sid] = task
                        task.add_done_callback(functools.partial(forget, sid))
                    answers.put_nowait(task)
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        pending: list[asyncio.Task[Any]] = []
        try:
            while (task := await answers.get()) is not None:
                pending.append(task)
                reply, error = await task
                pending.pop()
                slots.release()
                if error is not None and strict:
                    code = grpc_status(error).name
                    await abort(context, error)
                yield reply
            await reader  # NOTE: re-raises what ended the requests, if anything did
        except asyncio.CancelledError:
            code = cancelled_code(context)
            raise
        finally:
            reader.cancel()
            while not answers.empty():
                if (t := answers.get_nowait()) is not None:
                    pending.append(t)
            for t in pending:
                t.cancel()
            if code == "OK" and context.cancelled():
                code = cancelled_code(context)
            self.metrics.requests.labels("kserve", "ModelStreamInfer", code).inc()
            self.metrics.stream_duration.labels("kserve").observe(time.perf_counter() - t0)
