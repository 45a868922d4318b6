"""The gRPC server: Predictor, KServe v2 (inference.GRPCInferenceService), health and reflection, on one port."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # NOTE: untyped submodule
from grpc_reflection.v1alpha import reflection

from service.auth import ApiKeys
from service.core.dataplane import DataPlane
from service.grpc._generated.inference import grpc_service_pb2 as kpb
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc.kserve import FULL_NAME as KSERVE_NAME
from service.grpc.kserve import SERVICE as KSERVE
from service.grpc.kserve import InferenceServicer
from service.grpc.servicer import AuthInterceptor, PredictorServicer, add_predictor, add_service
from service.metrics import Metrics

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Predictor"].full_name  # "lstm.v1.Predictor"


class GRPCServer:
    """grpc.aio server bound to host:port (port 0 picks a free port; `port` tells which)."""

    def __init__(
        self,
        dataplane: DataPlane,
        metrics: Metrics,
        host: str,
        port: int,
        max_message_bytes: int,
        keepalive: tuple[float, float] = (30.0, 10.0),
        auth: ApiKeys | None = None,
        tls: grpc.ServerCredentials | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.tls = tls
        self.host, self.requested_port = host, port
        every_ms, timeout_ms = (int(v * 1000) for v in keepalive)
        # NOTE: grpc core refuses messages over twice the limit with its own RESOURCE_EXHAUSTED; between the
        # limit and twice it, the servicer answers with our error (code trailer, advice) and streams go on
        known = {f"/{SERVICE_NAME}/{m.name}" for m in pb.DESCRIPTOR.services_by_name["Predictor"].methods} | {
            f"/{KSERVE_NAME}/{m.name}" for m in kpb.DESCRIPTOR.services_by_name[KSERVE].methods
        }
        self.server = grpc.aio.server(
            interceptors=[AuthInterceptor(auth, metrics, known)] if auth else [],
            options=[
                ("grpc.max_receive_message_length", 2 * max_message_bytes),
                ("grpc.max_send_message_length", 2 * max_message_bytes),
                ("grpc.so_reuseport", int(reuse_port)),
                # NOTE: ping idle connections so that the streams of a peer that vanished (no FIN) end
                ("grpc.keepalive_time_ms", every_ms),
                ("grpc.keepalive_timeout_ms", timeout_ms),
                ("grpc.http2.ping_timeout_ms", timeout_ms),  # NOTE: grpc core times keepalive acks with this
                ("grpc.keepalive_permit_without_calls", 1),
                # NOTE: clients may ping as often as we do (grpc's default would answer them with GOAWAY)
                ("grpc.http2.min_ping_interval_without_data_ms", min(every_ms, 10_000)),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        add_predictor(PredictorServicer(dataplane, metrics, max_message_bytes, auth), self.server)
        add_service(InferenceServicer(dataplane, metrics, max_message_bytes, auth), self.server, kpb, KSERVE)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                KSERVE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = 0

    async def start(self) -> int:
        try:
            address = f"{self.host}:{self.requested_port}"
            if self.tls is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, self.tls)
        except RuntimeError:  # NOTE: grpcio reports a failed bind as RuntimeError
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {self.host}:{self.requested_port} (in use?); pick another --grpc-port")
        await self.server.start()
        for name in ("", SERVICE_NAME, KSERVE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME, KSERVE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
