"""The load driver: one process, closed or open loop, against one server over loopback; prints one JSON line.

  python bench/driver.py --workload grpc-stream --port 50051 --clients 16 --seconds 5
  python bench/driver.py --workload rest-steps --port 8000 --clients 64 --rate 4000     # open loop
  python bench/driver.py --workload grpc-batch --port 50051 --batch 1024 --clients 1

Workloads (each client holds one session, one step per message unless --batch):
  grpc-stream  one bidi `Stream` per client, a step per message
  grpc-step    unary `Step` calls
  grpc-batch   unary `StepBatch`, --batch sessions per message, packed (the client's own sessions, one array)
  rest-steps   POST /v1/sessions/{id}/steps on one keep-alive HTTP/1.1 connection per client
  ws-stream    one WebSocket /v1/sessions/stream per client
  kserve-stream  one KServe v2 `ModelStreamInfer` per client, its own sequence, a step per request (as tritonclient)
  kserve-rest    POST /v2/models/{m}/infer with binary tensors and a sequence id, keep-alive (as tritonclient.http)

Closed loop: each client sends its next step when the answer to the last one arrives. Open loop
(--rate R steps/s in all): step i is due at start + i/R, client i mod C sends it, and its latency counts
from when it was due (a late send is the server's delay too: no coordinated omission). Only the window
after --warmup counts. With --server-pid, the server's CPU (that process and its children, from /proc)
and the CPU that neither it nor the driver used during the window (other load on the machine) are
measured too. Any answer that is not a success is counted by its code, never retried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.grpc._generated.inference import grpc_service_pb2 as kpb  # noqa: E402
from service.grpc._generated.inference import grpc_service_pb2_grpc as kpb_grpc  # noqa: E402
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb  # noqa: E402
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc  # noqa: E402

WORKLOADS = ["grpc-stream", "grpc-step", "grpc-batch", "rest-steps", "ws-stream", "kserve-stream", "kserve-rest"]
TICK = os.sysconf("SC_CLK_TCK")
MODEL = "seattle-weather"


# --- /proc -----------------------------------------------------------------------------------------------
def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kids.setdefault(int(fields[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def rss_mib(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def machine_busy() -> float:
    """CPU seconds all cores spent busy since boot."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / TICK


# --- a minimal keep-alive HTTP/1.1 client (the same for every REST server measured) ------------------------
class Http:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def request(self, method: str, path: str, body: bytes = b"", header_length: int = 0) -> tuple[int, bytes]:
        binary = f"Inference-Header-Content-Length: {header_length}\r\n" if header_length else ""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n{binary}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()


# --- workloads: each returns (setup, step, teardown) for one client ------------------------------------------
class Client:
    """One client's connection and session(s); `step` sends one message and waits for its answer."""

    steps_per_message = 1

    async def open(self) -> None: ...

    async def step(self) -> str:
        raise NotImplementedError

    async def close(self) -> None: ...


def row(features: int) -> list[float]:
    return [float(v) for v in np.random.default_rng().uniform(0, 10, features)]


class GrpcStream(Client):
    def __init__(self, stub: Any, features: int) -> None:
        self.stub, self.features = stub, features
        self.x = pb.Matrix(rows=1, cols=features, data=row(features))
        self.seq = 0

    async def open(self) -> None:
        self.call = self.stub.Stream()
        await self.call.write(pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL)))
        first = await self.call.read()
        if first.HasField("error"):
            raise RuntimeError(f"cannot open a stream: {first.error.message}")

    async def step(self) -> str:
        await self.call.write(pb.StreamRequest(inputs=self.x, seq=self.seq + 1))
        r = await self.call.read()
        if r.HasField("error"):
            return str(r.error.code)
        self.seq += 1
        return "ok"

    async def close(self) -> None:
        await self.call.done_writing()
        async for _ in self.call:
            pass


class GrpcUnary(Client):
    def __init__(self, stub: Any, features: int, batch: int = 0) -> None:
        self.stub, self.features, self.batch = stub, features, batch
        self.ids: list[str] = []
        self.seq = 0
        self.steps_per_message = max(1, batch)

    async def open(self) -> None:
        for _ in range(max(1, self.batch)):
            info = await self.stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id=uuid.uuid4().hex))
            self.ids.append(info.session_id)
        x = pb.Matrix(rows=1, cols=self.features, data=row(self.features))
        self.req = pb.StepRequest(session_id=self.ids[0], inputs=x)
        # NOTE: many sessions per message go packed (one array, one batch), as a client after throughput sends them
        inputs = np.tile(np.asarray(row(self.features), "<f4"), (len(self.ids), 1)).tobytes()
        self.breq = pb.StepBatchRequest(packed=pb.PackedSteps(session_ids=self.ids, steps=1, inputs=inputs))

    async def step(self) -> str:
        import grpc

        try:
            if not self.batch:
                self.req.seq = self.seq + 1
                await self.stub.Step(self.req)
                self.seq += 1
                return "ok"
            self.breq.packed.ClearField("seq")
            self.breq.packed.seq.extend([self.seq + 1] * len(self.ids))
            r = await self.stub.StepBatch(self.breq)
        except grpc.aio.AioRpcError as e:
            return e.code().name
        if r.packed.errors:
            return str(r.packed.errors[0].code)  # NOTE: rows fail alone; a real client would resend those only
        self.seq += 1
        return "ok"

    async def close(self) -> None:
        for i in self.ids:
            await self.stub.DeleteSession(pb.SessionRef(session_id=i))


class RestSteps(Client):
    def __init__(self, port: int, features: int) -> None:
        self.http = Http("127.0.0.1", port)
        self.x = row(features)
        self.seq = 0

    async def open(self) -> None:
        await self.http.connect()
        status, body = await self.http.request("POST", "/v1/sessions", json.dumps({"model": MODEL}).encode())
        if status != 201:
            raise RuntimeError(f"cannot create a session: {status} {body[:200]!r}")
        self.path = f"/v1/sessions/{json.loads(body)['session_id']}/steps"
        self.sid_path = self.path.rsplit("/", 1)[0]

    async def step(self) -> str:
        body = b'{"inputs":[' + json.dumps(self.x).encode() + b'],"seq":' + str(self.seq + 1).encode() + b"}"
        status, answer = await self.http.request("POST", self.path, body)
        if status == 200:
            self.seq += 1
            return "ok"
        try:
            return str(json.loads(answer).get("code", status))
        except ValueError:
            return str(status)

    async def close(self) -> None:
        await self.http.request("DELETE", self.sid_path)
        await self.http.close()


class WsStream(Client):
    def __init__(self, port: int, features: int) -> None:
        self.url = f"ws://127.0.0.1:{port}/v1/sessions/stream"
        self.x = row(features)
        self.seq = 0

    async def open(self) -> None:
        import websockets

        self.ws = await websockets.connect(self.url, compression=None)
        await self.ws.send(json.dumps({"model": MODEL}))
        json.loads(await self.ws.recv())

    async def step(self) -> str:
        await self.ws.send('{"inputs":[' + json.dumps(self.x) + '],"seq":' + str(self.seq + 1) + "}")
        r = json.loads(await self.ws.recv())
        if "code" in r:
            return str(r["code"])
        self.seq += 1
        return "ok"

    async def close(self) -> None:
        await self.ws.close()


class KServeStream(Client):
    """A Triton client's stream: one sequence, START on the first request, one step per request."""

    def __init__(self, channel: Any, features: int) -> None:
        self.stub, self.features = kpb_grpc.GRPCInferenceServiceStub(channel), features
        self.sid = uuid.uuid4().hex
        self.raw = np.asarray(row(features), "<f4").tobytes()
        self.first = True

    def request(self) -> Any:
        req = kpb.ModelInferRequest(model_name=MODEL, raw_input_contents=[self.raw])
        req.inputs.add(name="x", datatype="FP32", shape=[1, 1, self.features])
        req.parameters["sequence_id"].string_param = self.sid
        req.parameters["sequence_start"].bool_param = self.first
        req.parameters["sequence_end"].bool_param = False
        return req

    async def open(self) -> None:
        self.call = self.stub.ModelStreamInfer()
        await self.call.write(self.request())
        first = await self.call.read()
        if first.error_message:
            raise RuntimeError(f"cannot start a sequence: {first.error_message}")
        self.first = False
        self.req = self.request()

    async def step(self) -> str:
        await self.call.write(self.req)
        r = await self.call.read()
        return r.error_message.split(":", 1)[0] if r.error_message else "ok"

    async def close(self) -> None:
        await self.call.done_writing()
        async for _ in self.call:
            pass


class KServeRest(Client):
    """tritonclient.http's request: a JSON header, then the tensor's bytes (binary tensor extension)."""

    def __init__(self, port: int, features: int) -> None:
        self.http = Http("127.0.0.1", port)
        self.sid = uuid.uuid4().hex
        raw = np.asarray(row(features), "<f4").tobytes()
        self.bodies = []
        for start in (True, False):
            head = json.dumps({
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, features],
                            "parameters": {"binary_data_size": len(raw)}}],
                "parameters": {"sequence_id": self.sid, "sequence_start": start, "binary_data_output": True},
            }).encode()  # fmt: skip
            self.bodies.append((head + raw, len(head)))
        self.path = f"/v2/models/{MODEL}/infer"

    async def open(self) -> None:
        await self.http.connect()
        status, body = await self.http.request("POST", self.path, *self.bodies[0])
        if status != 200:
            raise RuntimeError(f"cannot start a sequence: {status} {body[:200]!r}")

    async def step(self) -> str:
        status, answer = await self.http.request("POST", self.path, *self.bodies[1])
        if status == 200:
            return "ok"
        try:
            return str(json.loads(answer).get("code", status))
        except ValueError:
            return str(status)

    async def close(self) -> None:
        await self.http.request("DELETE", f"/v1/sessions/{self.sid}")
        await self.http.close()


# --- the loop ------------------------------------------------------------------------------------------------
async def run(a: argparse.Namespace) -> dict[str, Any]:
    import grpc

    channels: list[Any] = []

    def stub() -> Any:
        # NOTE: a channel per 16 clients: one HTTP/2 connection per client costs the client more than the server
        if len(channels) * 16 <= len(clients):
            options = [("grpc.use_local_subchannel_pool", 1)]
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{a.port}", options=options))
        return pb_grpc.PredictorStub(channels[-1])

    clients: list[Client] = []
    for _ in range(a.clients):
        c: Client
        if a.workload == "grpc-stream":
            c = GrpcStream(stub(), a.features)
        elif a.workload == "grpc-step":
            c = GrpcUnary(stub(), a.features)
        elif a.workload == "grpc-batch":
            c = GrpcUnary(stub(), a.features, a.batch)
        elif a.workload == "rest-steps":
            c = RestSteps(a.port, a.features)
        elif a.workload == "kserve-stream":
            stub()  # NOTE: the same channel sharing as the other gRPC workloads
            c = KServeStream(channels[-1], a.features)
        elif a.workload == "kserve-rest":
            c = KServeRest(a.port, a.features)
        else:
            c = WsStream(a.port, a.features)
        clients.append(c)
    for i in range(0, len(clients), 32):
        await asyncio.gather(*(c.open() for c in clients[i : i + 32]))

    t_start = time.perf_counter()
    w_start, w_end = t_start + a.warmup, t_start + a.warmup + a.seconds
    lat_ok: list[float] = []
    lat_err: list[float] = []
    codes: Counter[str] = Counter()
    # NOTE: open loop: latency from the send too, and how late the sends were (a driver that cannot keep up the
    # rate is the bottleneck itself, and says so)
    sent_ok: list[float] = []
    sent_err: list[float] = []
    late: list[float] = []
    sent = 0

    async def closed(c: Client) -> None:
        nonlocal sent
        while True:
            t0 = time.perf_counter()
            if t0 >= w_end:
                return
            code = await c.step()
            t1 = time.perf_counter()
            if t0 >= w_start and t1 <= w_end:
                (lat_ok if code == "ok" else lat_err).append(t1 - t0)
                codes[code] += 1
                sent += 1

    async def opened(k: int, c: Client) -> None:
        nonlocal sent
        j = 0
        while True:
            due = t_start + (k + j * len(clients)) / a.rate
            j += 1
            if due >= w_end:
                return
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            t0 = time.perf_counter()
            code = await c.step()
            t1 = time.perf_counter()
            if due >= w_start and t1 <= w_end + 5:
                (lat_ok if code == "ok" else lat_err).append(t1 - due)
                (sent_ok if code == "ok" else sent_err).append(t1 - t0)
                late.append(t0 - due)
                codes[code] += 1
                sent += 1

    pids = tree(a.server_pid) if a.server_pid else []
    measured: dict[str, float] = {}

    async def sample() -> None:
        await asyncio.sleep(max(0.0, w_start - time.perf_counter()))
        measured.update(srv=cpu_seconds(pids), me=time.process_time(), busy=machine_busy(), t=time.perf_counter())
        await asyncio.sleep(max(0.0, w_end - time.perf_counter()))
        measured.update(
            srv=cpu_seconds(pids) - measured["srv"], me=time.process_time() - measured["me"],
            busy=machine_busy() - measured["busy"], t=time.perf_counter() - measured["t"], rss=rss_mib(pids),
        )  # fmt: skip

    jobs = [closed(c) for c in clients] if a.rate <= 0 else [opened(k, c) for k, c in enumerate(clients)]
    await asyncio.gather(sample(), *jobs)
    for i in range(0, len(clients), 32):
        await asyncio.gather(*(c.close() for c in clients[i : i + 32]), return_exceptions=True)
    for ch in channels:
        await ch.close()

    per_msg = clients[0].steps_per_message
    ok = codes.get("ok", 0)
    window = measured["t"]

    def q(v: list[float], p: float) -> float | None:
        return float(np.quantile(v, p) * 1000) if v else None

    out: dict[str, Any] = {
        "workload": a.workload,
        "clients": a.clients,
        "mode": "open" if a.rate > 0 else "closed",
        "rate": a.rate,
        "batch": a.batch,
        "messages_per_s": ok / window,
        "steps_per_s": ok * per_msg / window,
        "p50_ms": q(lat_ok, 0.5),
        "p99_ms": q(lat_ok, 0.99),
        "refused_p99_ms": q(lat_err, 0.99),
        "from_send_p99_ms": q(sent_ok, 0.99),
        "refused_from_send_p99_ms": q(sent_err, 0.99),
        "send_late_p99_ms": q(late, 0.99),
        "codes": dict(codes),
        "driver_cpu_s": measured["me"],
        "window_s": window,
    }
    if pids:
        out.update(
            server_cpu_s=measured["srv"],
            server_cpu_ms_per_step=measured["srv"] * 1000 / max(1, ok * per_msg),
            server_rss_mib=measured["rss"],
            # NOTE: busy CPU on the machine that was neither the server nor this driver: other load
            other_cpu_s=max(0.0, measured["busy"] - measured["srv"] - measured["me"]),
        )
    return out


def main() -> None:
    global MODEL
    import uvloop

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", required=True, choices=WORKLOADS)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--seconds", type=float, default=5.0, help="measured window")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=0.0, help="open loop: messages per second in all (0: closed loop)")
    p.add_argument("--batch", type=int, default=0, help="grpc-batch: sessions per StepBatch message")
    p.add_argument("--features", type=int, default=4)
    p.add_argument("--model", default="seattle-weather", help="the model to open sessions on")
    p.add_argument("--server-pid", type=int, default=0)
    a = p.parse_args()
    MODEL = a.model
    print(json.dumps(uvloop.run(run(a))), flush=True)


if __name__ == "__main__":
    main()
