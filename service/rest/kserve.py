"""The Open Inference Protocol (KServe v2) over REST, under `/v2`: a thin adapter over `service.core.infer`.

JSON tensors and Triton's binary tensor extension (`Inference-Header-Content-Length`, `binary_data_size`,
`binary_data_output`), which `tritonclient.http` uses by default. Errors are the error table's, with the body
`{"error": message, "code": machine_code}` that the protocol asks for (plus our code).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.core.dataplane import DataPlane
from service.core.infer import (
    EXTENSIONS,
    InferRequest,
    InferResponse,
    check_fp32,
    infer,
    load_parameters,
    model_config,
    model_metadata,
    raw_fp32,
    server_version,
    unload_parameters,
)
from service.core.infer import sequence_parameters as read_parameters
from service.core.live import LiveRepository
from service.errors import ErrorCode, InvalidInputError, MalformedRequestError, UnavailableError

HEADER_LENGTH = "inference-header-content-length"


REQUEST_KEYS = {"id", "inputs", "outputs", "parameters"}
INPUT_KEYS = {"name", "datatype", "shape", "parameters", "data"}
OUTPUT_KEYS = {"name", "parameters"}


def _only(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    """Unknown keys are refused (a typo would otherwise pass silently), with the ones that are accepted."""
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise InvalidInputError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; accepted: {sorted(allowed)}"
        )


def _numbers(data: Any, depth: int = 0) -> list[float] | None:
    """A flat or nested (up to 3 levels) JSON list of numbers, flattened in row-major order; None for anything
    else (booleans and strings are not numbers here)."""
    if not isinstance(data, list) or depth > 3:
        return None
    if all(type(v) in (int, float) for v in data):
        return data
    out: list[float] = []
    for v in data:
        inner = _numbers(v, depth + 1)
        if inner is None:
            return None
        out.extend(inner)
    return out


def _tensor(spec: Any, raw: memoryview | None) -> tuple[str, tuple[str, list[int], np.ndarray]]:
    """One input tensor from its JSON spec, with its bytes when the binary extension carried them."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise InvalidInputError("every input must be an object with a name, a datatype, a shape and data")
    _only(spec, INPUT_KEYS, f"input {spec['name']!r}")
    _only(spec.get("parameters") or {}, {"binary_data_size"}, f"the parameters of input {spec['name']!r}")
    name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    if (
        not isinstance(datatype, str)
        or not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    ):
        raise InvalidInputError(f"input {name!r} needs a datatype (such as FP32) and a shape (a list of integers)")
    check_fp32(name, datatype)
    if raw is not None:
        data = raw_fp32(name, raw)
    else:
        if "data" not in spec:
            raise InvalidInputError(f"input {name!r} has no data (nor a binary_data_size parameter)")
        flat = _numbers(spec["data"])
        if flat is None:
            raise InvalidInputError(f"input {name!r}: data must be a flat or nested list of numbers")
        with np.errstate(over="ignore"):  # NOTE: beyond float32 becomes inf, which the core refuses
            data = np.asarray(flat, dtype=np.float32)
    return name, (datatype, shape, data)


def decode(body: bytes, header_length: str | None, model: str, version: str | None) -> tuple[InferRequest, bool]:
    """An `InferRequest` from a JSON body, or a JSON header followed by binary tensors; and whether the answer
    should carry its outputs as binary."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise MalformedRequestError(
                f"{HEADER_LENGTH} is {header_length!r}, but the body holds {len(body)} bytes; it must be the length "
                "of the JSON header in front of the binary tensors"
            )
        n = int(header_length)
    else:
        n = len(body)
    try:
        head = orjson.loads(body[:n])
    except orjson.JSONDecodeError:
        raise MalformedRequestError("the inference request is not valid JSON") from None
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
        raise InvalidInputError('the inference request must be a JSON object with "inputs": [...]')
    _only(head, REQUEST_KEYS, "the inference request")
    params = head.get("parameters", {})
    if not isinstance(params, dict) or any(not isinstance(p, dict) for p in (head["inputs"])):
        raise InvalidInputError("parameters must be a JSON object, and every input an object")
    if any(not isinstance(p.get("parameters", {}), dict) for p in head["inputs"]):
        raise InvalidInputError("the parameters of an input must be a JSON object")
    binary_out = params.get("binary_data_output", False) is True
    rest = memoryview(body)[n:]
    inputs: dict[str, tuple[str, list[int], np.ndarray]] = {}
    for spec in head["inputs"]:
        size = (spec.get("parameters") or {}).get("binary_data_size") if isinstance(spec, dict) else None
        raw = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > len(rest):
                raise InvalidInputError(
                    f"input {spec.get('name')!r}: binary_data_size {size!r} does not fit the {len(rest)} bytes left "
                    "in the body"
                )
            raw, rest = rest[:size], rest[size:]
        name, tensor = _tensor(spec, raw)
        if name in inputs:
            raise InvalidInputError(f"input {name!r} appears twice")
        inputs[name] = tensor
    if len(rest):
        raise InvalidInputError(f"{len(rest)} bytes after the last binary tensor; check binary_data_size")
    outputs = head.get("outputs")
    wanted = None
    if "outputs" in head:
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
        ):
            raise InvalidInputError('"outputs" must be a list of objects with a name')
        for o in outputs:
            _only(o, OUTPUT_KEYS, f"output {o['name']!r}")
            if not isinstance(o.get("parameters", {}), dict):
                raise InvalidInputError(f"the parameters of output {o['name']!r} must be a JSON object")
            _only(o.get("parameters") or {}, {"binary_data"}, f"the parameters of output {o['name']!r}")
        wanted = [o["name"] for o in outputs]
        binary_out = binary_out or any((o.get("parameters") or {}).get("binary_data") is True for o in outputs)
    rid = head.get("id", "")
    if not isinstance(rid, str):
        raise InvalidInputError("id must be a string")
    return InferRequest(model, version, inputs, wanted, rid, **read_parameters(params)), binary_out


def encode(r: InferResponse, binary: bool) -> Response:
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, arr in r.outputs.items():
        out: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(arr.shape)}
        if binary:
            raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = arr.reshape(-1).tolist()
        outputs.append(out)
    head: dict[str, Any] = {"model_name": r.model, "model_version": r.version, "outputs": outputs}
    if r.id:
        head["id"] = r.id
    if r.parameters:
        head["parameters"] = r.parameters
    text = orjson.dumps(head)
    if not binary:
        return Response(text, media_type="application/json")
    return Response(
        b"".join([text, *chunks]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(text))},
    )


def infer_body_schema(features: int | None, outputs: int | None) -> dict[str, Any]:
    """OpenAPI: the JSON form of an inference request, one step (`[1, F]`) per request, so that every request the
    document allows is one the server takes (the binary extension, more steps and continuing a sequence without
    START are described in the README). With models of different sizes, F is left open."""
    number = {"type": "number", "exclusiveMinimum": -3.4028235677973366e38, "exclusiveMaximum": 3.4028235677973366e38}
    data: dict[str, Any] = {"type": "array", "items": number}
    shape: dict[str, Any] = {"type": "array", "items": {"type": "integer"}}
    if features is not None:
        data.update(minItems=features, maxItems=features)
        shape.update(prefixItems=[{"const": 1}, {"const": features}], minItems=2, maxItems=2)
    sequence_id = {"oneOf": [
        {"type": "integer", "minimum": 1, "maximum": 2**64 - 1},
        {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
    ]}  # fmt: skip
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "datatype", "shape", "data"],
                "properties": {"name": {"const": "x"}, "datatype": {"const": "FP32"}, "shape": shape, "data": data},
            }},
            "outputs": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["name"],
                "properties": {"name": {"const": "y"}}}},
            "parameters": {
                "type": "object", "additionalProperties": False,
                "properties": {"sequence_id": sequence_id, "sequence_start": {"const": True},
                               "sequence_end": {"type": "boolean"}},
                "dependentRequired": {"sequence_id": ["sequence_start"], "sequence_end": ["sequence_id"],
                                      "sequence_start": ["sequence_id"]},
            },
        },
    }  # fmt: skip


def kserve_routers(
    dp: DataPlane,
    guarded: dict[str, Any],
    owner_of: Callable[[Request], Awaitable[str]],
    responses: Callable[..., dict[int | str, dict[str, Any]]],
) -> list[APIRouter]:
    """Health (open, like /healthz and /readyz), then server and model routes (behind the API keys, if any)."""
    health = APIRouter(prefix="/v2/health", tags=["kserve v2"])

    @health.get("/live", summary="KServe v2: the server is live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @health.get(
        "/ready", summary="KServe v2: every model is loaded and the server takes work",
        responses=responses(ErrorCode.UNAVAILABLE),
    )  # fmt: skip
    async def ready() -> JSONResponse:
        if dp.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "error": "not ready", "code": "unavailable"}, status_code=503)

    v2 = APIRouter(prefix="/v2", tags=["kserve v2"], **guarded)

    @v2.get("", summary="KServe v2: server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "lstm-serve", "version": server_version(), "extensions": EXTENSIONS}

    # NOTE: every handler takes (name, version, request); `_variants` makes the two routes of each
    async def metadata(name: str, version: str | None, _: Request) -> dict[str, Any]:
        return model_metadata(dp.get_model(name, version), dp.versions(name))

    async def model_ready(name: str, version: str | None, _: Request) -> JSONResponse:
        dp.get_model(name, version)  # NOTE: unknown: the table's 404
        if dp.ready:
            return JSONResponse({"name": name, "ready": True})
        # NOTE: the protocol says "not ready" with a non-200 status (tritonclient looks at the status only)
        return JSONResponse({"name": name, "ready": False, "error": "not ready", "code": "unavailable"}, 503)

    async def config(name: str, version: str | None, _: Request) -> dict[str, Any]:
        m = dp.get_model(name, version)
        return model_config(m, dp.versions(name), dp.limits.max_batch_size, dp.limits.session_ttl)

    async def model_infer(name: str, version: str | None, request: Request) -> Response:
        owner = await owner_of(request)
        req, binary = decode(await request.body(), request.headers.get(HEADER_LENGTH), name, version)
        return encode(await infer(dp, req, owner), binary)

    def repository() -> LiveRepository:
        if dp.live is None:
            raise UnavailableError("this server has no model repository directory to load from")
        return dp.live

    async def body_of(request: Request, allowed: set[str]) -> dict[str, Any]:
        """A repository call's optional JSON object body (an empty body: {}), with only the keys allowed."""
        body = await request.body()
        if not body.strip():
            return {}
        try:
            head = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise MalformedRequestError("the request body is not valid JSON") from None
        if not isinstance(head, dict):
            raise InvalidInputError("the request body must be a JSON object")
        _only(head, allowed, "the request")
        return head

    async def params_of(request: Request) -> dict[str, Any]:
        params = (await body_of(request, {"parameters"})).get("parameters", {})
        if not isinstance(params, dict):
            raise InvalidInputError('"parameters" must be a JSON object')
        return params

    params_body = {"type": "object", "additionalProperties": False, "properties": {"parameters": {
        "type": "object", "additionalProperties": False,
        "properties": {"version": {"type": "string", "enum": sorted({m.version for m in dp.repo.all()}, key=int)},
                       "force": {"type": "boolean"},
                       "unload_dependents": {"type": "boolean"}}}}}  # fmt: skip

    @v2.post(
        "/repository/index", summary="Triton: every model version in the repository, and whether it serves",
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False, "properties": {"ready": {"type": "boolean"}}}}}}},
        responses=responses(ErrorCode.INVALID_INPUT),
    )  # fmt: skip
    async def repository_index(request: Request) -> list[dict[str, str]]:
        ready = (await body_of(request, {"ready"})).get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInputError('"ready" must be true or false')
        return [v.__dict__ for v in repository().index(ready)]

    @v2.post(
        "/repository/models/{name}/load", summary="Triton: load the versions of a model that are not served yet",
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False,
            "properties": {"parameters": {"type": "object", "maxProperties": 0}}}}}}},
        responses=responses(ErrorCode.INVALID_INPUT, ErrorCode.MODEL_NOT_FOUND, ErrorCode.MODEL_LOAD_FAILED),
    )  # fmt: skip
    async def repository_load(name: str, request: Request) -> dict[str, Any]:
        load_parameters(await params_of(request))
        return {"name": name, "loaded": await repository().load(name)}

    @v2.post(
        "/repository/models/{name}/unload",
        summary="Triton: unload a model (parameters: version, force to end its open sessions)",
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": params_body}}}},
        responses=responses(ErrorCode.INVALID_INPUT, ErrorCode.MODEL_NOT_FOUND, ErrorCode.MODEL_IN_USE),
    )  # fmt: skip
    async def repository_unload(name: str, request: Request) -> dict[str, Any]:
        version, force = unload_parameters(await params_of(request))
        versions, ended = await repository().unload(name, version, force)
        return {"name": name, "unloaded": versions, "sessions_ended": ended}

    sigs = {m.runtime.signature for m in dp.repo.all()}  # NOTE: the graphs' (live scoring aside)
    (sig,) = sigs if len(sigs) == 1 else (None,)
    body = infer_body_schema(sig.features if sig else None, sig.outputs if sig else None)
    infer_doc: dict[str, Any] = {
        "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {"schema": body}}}},
        "responses": responses(
            ErrorCode.INVALID_INPUT, ErrorCode.MODEL_NOT_FOUND, ErrorCode.SESSION_LIMIT, ErrorCode.OVERLOADED,
            ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.MODEL_ERROR,
        ),
    }  # fmt: skip
    unknown = {"responses": responses(ErrorCode.MODEL_NOT_FOUND)}
    ready_doc = {"responses": responses(ErrorCode.MODEL_NOT_FOUND, ErrorCode.UNAVAILABLE)}
    for tail, fn, verb, summary, doc in (
        ("", metadata, "GET", "KServe v2: model metadata", unknown),
        ("/ready", model_ready, "GET", "KServe v2: is the model ready", ready_doc),
        ("/config", config, "GET", "Triton: the model configuration", unknown),
        ("/infer", model_infer, "POST", "KServe v2: inference (JSON, or Triton's binary tensors)", infer_doc),
    ):
        for newest, handler in _variants(fn).items():
            path = "/models/{name}" + ("" if newest else "/versions/{version}") + tail
            v2.add_api_route(path, handler, methods=[verb], summary=summary, **doc)
    return [health, v2]


def _variants(fn: Callable[..., Awaitable[Any]]) -> dict[bool, Callable[..., Awaitable[Any]]]:
    """The handler for `/models/{name}...` (the newest version) and for `/models/{name}/versions/{version}...`."""

    async def newest(name: str, request: Request) -> Any:
        return await fn(name, None, request)

    async def versioned(name: str, version: str, request: Request) -> Any:
        return await fn(name, version, request)

    return {True: newest, False: versioned}
