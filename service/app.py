"""Composition root: Settings -> repository -> session store -> DataPlane -> REST and gRPC servers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Generator
from typing import Any

import grpc
import uvicorn
import uvloop
from prometheus_client import CollectorRegistry

from service.auth import ApiKeys
from service.core.dataplane import DataPlane, Limits
from service.core.live import LiveRepository
from service.core.redis_store import RedisSessionStore
from service.core.sessions import MemorySessionStore, SessionStore, read_snapshot, write_snapshot
from service.grpc.server import GRPCServer
from service.metrics import MULTIPROC_ENV, Metrics
from service.repository import ModelRepository
from service.rest.app import create_app
from service.runtime import Signature
from service.settings import Settings

log = logging.getLogger("service")


def make_store(settings: Settings, signatures: dict[str, Signature]) -> SessionStore:
    """The session store the settings ask for: in this process's memory, or in Redis (shared by replicas)."""
    if settings.state_store == "memory":
        return MemorySessionStore(
            signatures, settings.session_ttl_s, settings.max_sessions, settings.session_cap_policy, wall=time.time
        )
    return RedisSessionStore(
        settings.state_store,
        signatures,
        settings.session_ttl_s,
        settings.max_sessions,
        settings.session_cap_policy,
        timeout=settings.redis_timeout_ms / 1000,
        prefix=settings.redis_key_prefix,
    )


def grpc_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port, with client certificates required when a client CA is set (mutual TLS)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def uvicorn_tls(settings: Settings) -> dict[str, Any]:
    """The same TLS (and mutual TLS) for the REST port."""
    if settings.tls_cert is None:
        return {}
    out: dict[str, Any] = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    if settings.tls_client_ca is not None:
        out.update(ssl_ca_certs=str(settings.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return out


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the Server below owns SIGTERM and drains in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Server:
    """The whole service in one object; `start`/`stop` for tests, `run` for the command line."""

    def __init__(
        self, settings: Settings, registry: CollectorRegistry | None = None, repo: ModelRepository | None = None
    ) -> None:
        self.settings = settings
        self.metrics = Metrics(registry)
        self.repo = repo or ModelRepository.load(settings.models, settings.ort_threads, settings.live_scoring)
        widest = max(m.signature.outputs for m in self.repo.all())
        # NOTE: a full-size answer must fit in one message: every step's outputs as 4-byte floats, and for a step
        # batch up to one item (id and error message, ~512 bytes) per counted step
        if settings.max_steps_per_call * (widest * 5 + 512) + 4096 > settings.grpc_max_message_bytes:
            raise ValueError(
                f"max_steps_per_call={settings.max_steps_per_call} with {widest} outputs per step may not fit the "
                f"{settings.grpc_max_message_bytes}-byte gRPC message limit; lower --max-steps-per-call or raise "
                "--grpc-max-message-bytes"
            )
        self.store = make_store(settings, {m.key: m.signature for m in self.repo.all()})
        self.dataplane = DataPlane(
            self.repo,
            self.store,
            self.metrics,
            Limits(
                max_batch_size=settings.max_batch_size,
                block_rows=settings.block_rows,
                max_queue_delay=settings.max_queue_delay_ms / 1000,
                max_queue=settings.max_queue,
                max_queue_wait=settings.max_queue_wait_ms / 1000,
                max_steps_per_call=settings.max_steps_per_call,
                session_ttl=settings.session_ttl_s,
                stream_open_timeout=settings.stream_open_timeout_s,
                default_deadline=settings.default_queue_timeout_s,
            ),
        )
        self.live = LiveRepository(
            self.dataplane, settings.models, settings.ort_threads, settings.model_poll_s,
            one_of_workers=bool(os.environ.get(MULTIPROC_ENV)),  # NOTE: set by --workers for its processes
            live_scoring=settings.live_scoring,
        )  # fmt: skip
        self.dataplane.live = self.live
        # NOTE: keys from a file or the environment, never a flag (ps shows flags)
        self.auth = ApiKeys.load(settings.api_keys_file, os.environ.get("LSTM_SERVE_API_KEYS"))
        self.rest_app = create_app(
            self.dataplane, self.metrics, settings.max_body_bytes, self.auth, settings.metrics_auth
        )
        self.grpc = GRPCServer(
            self.dataplane,
            self.metrics,
            settings.host,
            settings.grpc_port,
            settings.grpc_max_message_bytes,
            keepalive=(settings.grpc_keepalive_s, settings.grpc_keepalive_timeout_s),
            auth=self.auth,
            tls=grpc_credentials(settings),
            reuse_port=settings.reuse_port,
        )
        self._uvicorn: _Uvicorn | None = None
        self._uvicorn_task: asyncio.Task[None] | None = None
        self.http_port = 0
        self.grpc_port = 0

    def _bind_http(self) -> socket.socket:
        """Bind the REST port here (not in uvicorn), so that a port in use is a clear error, not an exit."""
        host, port = self.settings.host, self.settings.http_port
        # NOTE: proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when the listening
        # socket says TCP, and without it Nagle's algorithm and delayed ACKs stall keep-alive answers ~40 ms
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.settings.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot bind REST to {host}:{port} ({e.strerror}); pick another --http-port") from None
        sock.listen(2048)
        return sock

    def _restore_snapshot(self) -> None:
        """Load the sessions of the last shutdown (all or nothing), then remove the file so it is used once."""
        path = self.settings.snapshot
        if path is None or not path.exists():
            return
        assert isinstance(self.store, MemorySessionStore)
        n = read_snapshot(self.store, path, self.dataplane.clock())
        path.unlink()
        log.info("restored %d sessions from %s", n, path)

    def _write_snapshot(self) -> None:
        path = self.settings.snapshot
        if path is None:
            return
        assert isinstance(self.store, MemorySessionStore)
        n = write_snapshot(self.store, path, self.dataplane.clock())
        log.info("wrote %d sessions to %s", n, path)

    async def start(self) -> None:
        """Bind both ports, then start the core and the listeners; readiness turns true when all are up."""
        self._restore_snapshot()
        sock = self._bind_http()
        try:
            self.grpc_port = await self.grpc.start()
        except OSError:
            sock.close()
            raise
        self.http_port = sock.getsockname()[1]
        await self.dataplane.start()
        await self.live.start()
        config = uvicorn.Config(
            self.rest_app,
            log_level=self.settings.log_level,
            lifespan="off",
            # NOTE: twice the limit, so that a message just over it gets our in-band 413, not a bare 1009 close
            ws_max_size=2 * self.settings.max_body_bytes,
            access_log=False,
            timeout_graceful_shutdown=max(1, int(self.settings.drain_seconds)),
            **uvicorn_tls(self.settings),
        )
        self._uvicorn = _Uvicorn(config)
        self._uvicorn_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]), name="uvicorn")
        while not self._uvicorn.started:
            if self._uvicorn_task.done():
                await self._uvicorn_task
                raise OSError("the REST server stopped while starting; see the log above")
            await asyncio.sleep(0.01)
        await self.grpc.set_serving(True)
        log.info(
            "serving %s on %s://%s:%d (REST, WebSocket, /metrics) and %s:%d (gRPC%s)%s",
            ", ".join(m.key for m in self.repo.all()), "https" if self.settings.tls_cert else "http",
            self.settings.host, self.http_port, self.settings.host, self.grpc_port,
            " with TLS" if self.settings.tls_cert else "", "; API keys required" if self.auth else "",
        )  # fmt: skip

    async def stop(self) -> None:
        """Drain: readiness false first, in-flight steps finish (up to drain_seconds), then close; with
        --snapshot, the sessions are written to it last."""
        deadline = time.monotonic() + self.settings.drain_seconds
        self.dataplane.begin_drain()
        await self.grpc.set_serving(False)
        await self.live.stop()  # NOTE: after readiness turned false: stopping may wait for a load in progress
        try:
            await asyncio.wait_for(self.dataplane.wait_idle(), timeout=self.settings.drain_seconds)
        except TimeoutError:
            log.warning("drain timeout after %.1f s: stopping with work still queued", self.settings.drain_seconds)
        # NOTE: streams were told to end by begin_drain; calls still open get what is left of the drain time
        await self.grpc.stop(grace=max(0.1, deadline - time.monotonic()))
        if self._uvicorn is not None and self._uvicorn_task is not None:
            self._uvicorn.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._uvicorn_task
        self._write_snapshot()  # NOTE: after the transports stopped: nothing changes the sessions any more
        await self.dataplane.stop()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain and return."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        # NOTE: what starting made (models, modules, app objects) lives as long as the process: out of the garbage
        # collector's sight, a full collection under load scans only what requests made (p99 at C = 64 went from
        # about 40 ms to 13 ms in make bench's REST run)
        gc.collect()
        gc.freeze()
        await stop.wait()
        log.info("shutting down: draining in-flight work (up to %.1f s)", self.settings.drain_seconds)
        await self.stop()
        log.info("stopped")


def serve(settings: Settings) -> int:
    """Run the service in this process (the `lstm-serve serve` command), or with --workers N > 1 as N worker
    processes under this one."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.workers > 1:
        from service.workers import supervise

        return supervise(settings)

    async def main() -> None:
        # NOTE: built inside the running loop: grpc.aio binds its server to the loop that creates it
        await Server(settings).run()

    # NOTE: uvloop under both transports: fewer CPU cycles per message than asyncio's loop (make bench)
    uvloop.run(main())
    return 0
