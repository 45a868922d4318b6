"""Real servers on port 0 (uvicorn and grpc.aio) serving the shipped ONNX model, and clients for them."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from model.data import default_csv_path, load_csv
from service.app import Server
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from service.settings import Settings
from tests.conftest import ROOT, SHIPPED_REPO

REDIS_URL = os.environ.get("LSTM_TEST_REDIS", "redis://127.0.0.1:6379/0")

ServerFactory = Callable[..., Any]


def sample(srv: Server, name: str, **labels: str) -> float:
    """A metric's value in a server's registry (0 when it has no sample yet), brought up to date as a scrape of
    /metrics would."""
    srv.dataplane.flush_metrics()
    return srv.metrics.registry.get_sample_value(name, labels) or 0.0


async def until(predicate: Any, within: float = 10.0, equals: Any = True) -> None:
    """Wait until predicate() (a value or an awaitable) equals `equals`: the server has processed what the
    client did (no fixed sleeps). A gRPC client can see a status before the server's handler has finished."""
    deadline = time.monotonic() + within
    while True:
        got = predicate()
        if inspect.isawaitable(got):
            got = await got
        if got == equals:
            return
        assert time.monotonic() < deadline, f"timed out waiting for the server (last {got!r})"
        await asyncio.sleep(0.01)


async def start_serve_process(**env: str) -> tuple[asyncio.subprocess.Process, int, int]:
    """The real entry point (`lstm-serve serve`) on ports 0 with the shipped models and LSTM_SERVE_* settings;
    returns the process and its REST and gRPC ports once it serves."""
    environ = {**os.environ, **{f"LSTM_SERVE_{k.upper()}": v for k, v in env.items()}}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "serve", "--models", str(SHIPPED_REPO), "--http-port", "0",
        "--grpc-port", "0", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env=environ,
    )  # fmt: skip
    assert proc.stderr is not None
    log = b""
    while b"(gRPC)" not in log:
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert line, log.decode()
        log += line
    http_port = int(re.findall(rb"http://127\.0\.0\.1:(\d+) \(REST", log)[0])
    grpc_port = int(re.findall(rb"127\.0\.0\.1:(\d+) \(gRPC\)", log)[0])
    return proc, http_port, grpc_port


@pytest.fixture(scope="session")
def weather() -> np.ndarray:
    """The real Seattle weather rows in the shipped model's feature order: [1461, 4]."""
    s = load_csv(default_csv_path(), "temp_max", ("precipitation", "temp_max", "temp_min", "wind"), "date")
    return s.values


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    """Start servers with settings overrides; every one is drained and stopped at the end of the test."""
    started: list[Server] = []

    async def make(**overrides: Any) -> Server:
        overrides.setdefault("models", SHIPPED_REPO)
        settings = Settings(http_port=0, grpc_port=0, log_level="warning", **overrides)
        srv = Server(settings, CollectorRegistry())
        await srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.stop()


@pytest.fixture
async def server(make_server: ServerFactory) -> Server:
    srv: Server = await make_server()
    return srv


@pytest.fixture
async def rest(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as c:
        yield c


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[pb_grpc.PredictorStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield pb_grpc.PredictorStub(channel)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own on the shared Redis, removed afterwards."""
    p = f"lstm-test-{uuid.uuid4().hex[:8]}:"
    yield p
    r = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in r.scan_iter(match=p + "*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()
