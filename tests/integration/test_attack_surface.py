"""The whole attack surface, listed: every REST route and gRPC method must be on the approved list here, and
none takes a file path, URL or shared-memory handle. A new endpoint fails this test until it is reviewed."""

from __future__ import annotations

import grpc
from fastapi.routing import APIWebSocketRoute
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from starlette.routing import Route

from service.app import Server

APPROVED_REST = {
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
    ("GET", "/v1/models"), ("GET", "/v1/models/{name}"), ("POST", "/v1/models/{name}/predict"),
    ("POST", "/v1/sessions"), ("GET", "/v1/sessions/{session_id}"), ("DELETE", "/v1/sessions/{session_id}"),
    ("POST", "/v1/sessions/{session_id}/steps"), ("POST", "/v1/sessions/{session_id}/reset"),
    ("GET", "/v1/sessions/{session_id}/state"), ("POST", "/v1/sessions/{session_id}/state"),
    ("POST", "/v1/steps"), ("WEBSOCKET", "/v1/sessions/stream"),
    ("POST", "/v1/sessions/{session_id}/peek"), ("POST", "/v1/sessions/{session_id}/fork"),
    # KServe v2 (Open Inference Protocol) and Triton's extensions
    ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2"), ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/{name}/load"), ("POST", "/v2/repository/models/{name}/unload"),
    *((verb, base + tail) for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
      for verb, tail in (("GET", ""), ("GET", "/ready"), ("GET", "/config"), ("POST", "/infer"))),
    # FastAPI's own documentation pages
    ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc"),
}  # fmt: skip
APPROVED_GRPC = {
    "lstm.v1.Predictor": {"Predict", "Stream", "CreateSession", "GetSession", "Step", "ResetSession",
                          "DeleteSession", "ExportSession", "ImportSession", "StepBatch", "ListModels", "GetModel",
                          "Peek", "ForkSession"},
    "inference.GRPCInferenceService": {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                                       "ModelInfer", "ModelStreamInfer", "ModelConfig", "RepositoryIndex",
                                       "RepositoryModelLoad", "RepositoryModelUnload"},
    "grpc.health.v1.Health": {"Check", "Watch", "List"},
    "grpc.reflection.v1alpha.ServerReflection": {"ServerReflectionInfo"},
}  # fmt: skip
FORBIDDEN = ("path", "file", "url", "uri", "shm", "shared_memory", "dir", "filename")


def rest_routes(server: Server) -> set[tuple[str, str]]:
    """Every HTTP operation of the OpenAPI document, and the routes outside it (docs, WebSocket), as served."""
    routes = {(m.upper(), path) for path, ops in server.rest_app.openapi()["paths"].items() for m in ops}
    for route in server.rest_app.routes:
        if isinstance(route, APIWebSocketRoute):
            routes.add(("WEBSOCKET", route.path))
        elif isinstance(route, Route):  # NOTE: FastAPI's own pages; included routers are in the document
            routes |= {(m, route.path) for m in (route.methods or set()) - {"HEAD"}}
    return routes


def test_rest_routes_are_exactly_the_approved_ones(server: Server) -> None:
    assert rest_routes(server) == APPROVED_REST


def test_no_rest_operation_takes_a_path_url_or_handle(server: Server) -> None:
    """No parameter or body field of any operation is a file path, URL or shared-memory handle."""
    schema = server.rest_app.openapi()
    names: set[str] = set()
    for ops in schema["paths"].values():
        for op in ops.values():
            names |= {p["name"].lower() for p in op.get("parameters", [])}
    for model in schema["components"]["schemas"].values():
        names |= {n.lower() for n in model.get("properties", {})}
    assert not {n for n in names if any(word in n for word in FORBIDDEN)}, names


async def test_grpc_services_and_methods_are_exactly_the_approved_ones(server: Server) -> None:
    """Asked through reflection, as any client can: the services and their methods are the approved ones,
    and no request message has a field named like a path, URL or handle."""
    from google.protobuf import descriptor_pb2

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask():  # type: ignore[no-untyped-def]
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            for name in APPROVED_GRPC:
                yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)

        replies = [r async for r in stub.ServerReflectionInfo(ask())]
    services = {s.name for s in replies[0].list_services_response.service}
    assert services == set(APPROVED_GRPC)
    found: dict[str, set[str]] = {}
    fields: set[str] = set()
    for reply in replies[1:]:
        for blob in reply.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(blob)
            for svc in fd.service:
                full = f"{fd.package}.{svc.name}" if fd.package else svc.name
                if full in APPROVED_GRPC:
                    found[full] = {m.name for m in svc.method}
            if fd.package in ("lstm.v1", "inference"):
                fields |= {f.name.lower() for msg in fd.message_type for f in msg.field}
    assert found == APPROVED_GRPC
    assert not {n for n in fields if any(word in n for word in FORBIDDEN)}, fields
