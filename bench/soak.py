"""Soak: the real entry point under mixed traffic with session churn; memory, descriptors and sessions must stay flat.

  .venv/bin/python bench/soak.py --seconds 600 --store memory        # `make soak` runs this for each store
  .venv/bin/python bench/soak.py --seconds 60 --store redis          # the short version in `make test`

Clients create sessions, step them 1-100 times (REST keep-alive or a gRPC stream), then delete them or abandon
them to expire (and abandon streams mid-way). The same clients first measure the capacity (steps/s without
pacing, a few seconds); the soak then paces all their steps at half of it. The server's RSS and open file
descriptors are sampled from /proc every second. Pass: RSS slope after warm-up < 1 MiB/min, open
descriptors within +-10 of their post-warm-up median, open sessions back to 0 after the idle TTL, and only
expected answers. Prints a JSON summary; exits 1 on a failed check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb  # noqa: E402
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "seattle-weather"
TTL = 3.0


def proc_stats(pid: int) -> tuple[float, int]:
    """RSS in MiB and open descriptors of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def start_server(store: str, prefix: str) -> tuple[asyncio.subprocess.Process, int, int]:
    env = {**os.environ, "LSTM_SERVE_SESSION_TTL_S": str(TTL), "LSTM_SERVE_LOG_LEVEL": "warning"}
    if store == "redis":
        env |= {"LSTM_SERVE_STATE_STORE": os.environ.get("LSTM_TEST_REDIS", "redis://127.0.0.1:6379/0"),
                "LSTM_SERVE_REDIS_KEY_PREFIX": prefix}  # fmt: skip
    env["LSTM_SERVE_LOG_LEVEL"] = "info"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "serve", "--models", str(ROOT / "models"), "--http-port", "0",
        "--grpc-port", "0", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    log = b""
    while b"(gRPC" not in log:
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        if not line:
            raise RuntimeError(log.decode())
        log += line
    http_port = int(re.findall(rb"http://127\.0\.0\.1:(\d+) \(REST", log)[0])
    grpc_port = int(re.findall(rb"127\.0\.0\.1:(\d+) \(gRPC", log)[0])
    asyncio.get_running_loop().create_task(drain(proc.stderr))
    return proc, http_port, grpc_port


async def drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


class Pace:
    """Shared pacing of every client's steps: unlimited while measuring capacity, then a fixed rate."""

    def __init__(self) -> None:
        self.rate: float | None = None  # steps per second for all clients together; None: as fast as possible
        self.next = time.monotonic()
        self.steps = 0

    async def step(self) -> None:
        self.steps += 1
        if self.rate is None:
            await asyncio.sleep(0)
            return
        now = time.monotonic()
        self.next = max(self.next, now) + 1.0 / self.rate
        await asyncio.sleep(max(0.0, self.next - now - 1.0 / self.rate))


class Tally:
    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.unexpected: list[str] = []

    def add(self, code: str, expected: bool = True) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        if not expected and len(self.unexpected) < 20:
            self.unexpected.append(code)


async def rest_client(http_port: int, stop: float, tally: Tally, rng: random.Random, pace: Pace) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as rest:
        while time.monotonic() < stop:
            r = await rest.post("/v1/sessions", json={"model": MODEL})
            tally.add(str(r.status_code), r.status_code == 201)
            sid = r.json().get("session_id")
            for k in range(rng.randint(1, 100)):
                x = [[rng.uniform(0, 20), rng.uniform(0, 30), rng.uniform(-5, 20), rng.uniform(0, 8)]]
                r = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": x, "seq": k + 1})
                tally.add(str(r.status_code), r.status_code == 200)
                await pace.step()
            if rng.random() < 0.7:
                r = await rest.delete(f"/v1/sessions/{sid}")
                tally.add(str(r.status_code), r.status_code == 200)
            # else: abandoned, to expire after the TTL


async def grpc_client(grpc_port: int, stop: float, tally: Tally, rng: random.Random, pace: Pace) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = pb_grpc.PredictorStub(ch)
        while time.monotonic() < stop:
            n = rng.randint(1, 100)
            vanish = rng.random() < 0.3

            async def reqs(n: int = n) -> Any:
                yield pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL), keep=rng.random() < 0.2)
                for _ in range(n):
                    row = [rng.uniform(0, 20), rng.uniform(0, 30), rng.uniform(-5, 20), rng.uniform(0, 8)]
                    yield pb.StreamRequest(inputs=pb.Matrix(rows=1, cols=4, data=row))
                    await pace.step()

            call = stub.Stream(reqs())
            got = 0
            try:
                async for reply in call:
                    got += 1
                    tally.add("stream-error" if reply.HasField("error") else "stream-ok", not reply.HasField("error"))
                    if vanish and got > n // 2:
                        call.cancel()  # NOTE: the client goes away mid-stream
                        break
            except grpc.aio.AioRpcError as e:
                tally.add(e.code().name, e.code() == grpc.StatusCode.CANCELLED and vanish)


async def open_sessions(http_port: int) -> float:
    async with httpx.AsyncClient(timeout=10) as c:
        text = (await c.get(f"http://127.0.0.1:{http_port}/metrics")).text
    return sum(float(v) for v in re.findall(r"^lstm_sessions_open\{[^}]*\} (\S+)$", text, re.M))


async def soak(seconds: float, store: str, clients: int) -> dict[str, Any]:
    prefix = f"lstm-soak-{uuid.uuid4().hex[:8]}:"
    proc, http_port, grpc_port = await start_server(store, prefix)
    tally, samples = Tally(), []
    t0 = stop = 0.0
    rng = random.Random(7)

    async def sampler() -> None:
        while time.monotonic() < stop:  # NOTE: t0 and stop are set before the sampler starts
            rss, fds = proc_stats(proc.pid)
            samples.append((time.monotonic() - t0, rss, fds))
            await asyncio.sleep(1.0)

    pace = Pace()

    def clients_until(until: float) -> list[Any]:
        out = [rest_client(http_port, until, tally, random.Random(rng.random()), pace) for _ in range(clients // 2)]
        return out + [
            grpc_client(grpc_port, until, tally, random.Random(rng.random()), pace) for _ in range(clients // 2)
        ]

    try:
        # NOTE: capacity first, with the same clients and no pacing; then the soak at half of it
        probe = min(10.0, seconds / 6)
        await asyncio.gather(*clients_until(time.monotonic() + probe))
        capacity = pace.steps / probe
        pace.rate, pace.steps = capacity / 2, 0
        t0 = time.monotonic()
        stop = t0 + seconds
        await asyncio.gather(sampler(), *clients_until(stop))
        achieved = pace.steps / seconds
        deadline = time.monotonic() + TTL + 10  # NOTE: the TTL, then a sweep (every TTL/4)
        left = await open_sessions(http_port)
        while left and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            left = await open_sessions(http_port)
    finally:
        proc.terminate()
        await proc.wait()
    warm = [s for s in samples if s[0] >= max(seconds * 0.25, min(20.0, seconds / 2))]  # NOTE: warm-up
    t, rss, fds = (np.asarray(v, float) for v in zip(*warm, strict=True))
    slope = float(np.polyfit(t / 60.0, rss, 1)[0]) if len(t) > 2 else 0.0
    median_fds = float(np.median(fds))
    checks = {
        "rss slope < 1 MiB/min after warm-up": slope < 1.0,
        "open fds within +-10 of their median": bool(np.abs(fds - median_fds).max() <= 10),
        "open sessions back to 0 after the TTL": left == 0,
        "only expected answers": not tally.unexpected,
        "traffic happened": sum(tally.codes.values()) > 100,
    }
    return {
        "store": store, "seconds": seconds, "capacity_steps_per_s": round(capacity),
        "load_steps_per_s": round(achieved), "answers": tally.codes, "unexpected": tally.unexpected,
        "rss_mib": [round(float(rss.min()), 1), round(float(rss.max()), 1)], "rss_slope_mib_per_min": round(slope, 3),
        "fds": [int(fds.min()), int(fds.max())], "sessions_left": left, "checks": checks,
        "passed": all(checks.values()),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--store", choices=["memory", "redis"], default="memory")
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    result = asyncio.run(soak(args.seconds, args.store, args.clients))
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
