"""`make bench`: our server against its floors, measured in one run with one driver; prints the eight targets.

  .venv/bin/python bench/run.py                  # the full run (~16 min on 2 cores): JSON lines, markdown, PNG
  .venv/bin/python bench/run.py --readme         # ... and rewrite the README's performance section from it
  .venv/bin/python bench/run.py --smoke          # `make bench-smoke`: every part once, tiny, checks it works

Every figure is a ratio to a floor measured minutes apart by the same driver (bench/driver.py, its own
process) over loopback, because absolute numbers drift by tens of percent on shared machines:
  - transport floors: a bare grpc.aio echo server and a bare FastAPI echo server speaking our shapes
    (bench/floors.py); compute floor and limit: ONNX Runtime in-process at batch 1 and 256 (one thread);
  - a naive FastAPI + ONNX Runtime server, as a tutorial writes it, for scale.
A point measured while other load used more than --disturbed of a core is measured again (twice at most) and
flagged if it stays disturbed. Results go to bench/results/ (latest.jsonl, latest.md, latest.png).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable
RESULTS = ROOT / "bench" / "results"
DEFAULT_MODELS = ROOT / "models"
BENCH_MODELS = ROOT / "build" / "bench-models"
README = ROOT / "README.md"
PARTS = ["sweep", "kserve", "memory", "overload", "workers"]
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- processes ---------------------------------------------------------------------------------------------
@dataclass
class Proc:
    popen: subprocess.Popen[str]
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_floor(kind: str, *extra: str) -> Proc:
    p = subprocess.Popen([PY, str(ROOT / "bench" / "floors.py"), kind, *extra], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("PORT "):
        p.kill()
        raise RuntimeError(f"floor {kind} did not start")
    return Proc(p, {"port": int(line.split()[1])})


def start_ours(models: Path, *extra: str, env: dict[str, str] | None = None) -> Proc:
    """Our server, the real entry point, on free ports; the ports come from its log line."""
    import re

    cmd = [PY, "-m", "service.cli", "serve", "--models", str(models), "--http-port", "0", "--grpc-port", "0", *extra]
    p = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "LSTM_SERVE_LOG_LEVEL": "info", **(env or {})},
    )  # fmt: skip
    assert p.stderr is not None
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r":(\d+) \(REST.*:(\d+) \(gRPC", line)
        if m:
            # NOTE: keep reading the log in the background, or a full pipe would block the server
            import threading

            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()  # type: ignore[union-attr]
            return Proc(p, {"http": int(m[1]), "grpc": int(m[2])})
    p.kill()
    raise RuntimeError("our server did not start:\n" + "".join(seen[-20:]))


def drive(workload: str, port: int, pid: int, clients: int, seconds: float, warmup: float, model: str,
          features: int, rate: float = 0.0, batch: int = 0) -> dict[str, Any]:  # fmt: skip
    cmd = [PY, str(ROOT / "bench" / "driver.py"), "--workload", workload, "--port", str(port), "--clients",
           str(clients), "--seconds", str(seconds), "--warmup", str(warmup), "--server-pid", str(pid), "--model",
           model, "--features", str(features), "--rate", str(rate), "--batch", str(batch)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 300)
    if out.returncode != 0:
        raise RuntimeError(f"driver failed ({workload}, C={clients}):\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --- the bench model ---------------------------------------------------------------------------------------
def bench_model() -> Path:
    """A 4-feature, 64-hidden, 2-layer LSTM with 7 outputs, trained briefly by our own code on the default data
    (its quality does not matter here, only its size). One member: the trainer's default ensemble of 5 would
    make it one LSTM of 320 units per layer. A cached model of another size is trained again."""
    card = BENCH_MODELS / "bench-4x64x2" / "1" / "model.json"
    if not card.is_file() or json.loads(card.read_text())["hidden_size"] != 64:
        log("training the 4x64x2 bench model (one epoch)...")
        shutil.rmtree(BENCH_MODELS, ignore_errors=True)
        subprocess.run(
            [PY, "-m", "service.cli", "train", "--name", "bench-4x64x2", "--version", "1", "--models",
             str(BENCH_MODELS), "--hidden-size", "64", "--num-layers", "2", "--ensemble", "1", "--epochs", "1",
             "--min-epochs", "1", "--allow-worse", "--no-progress"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return BENCH_MODELS


def model_of(models: Path) -> tuple[str, int, int, int, int, Path]:
    """(name, features, hidden, layers, outputs, onnx path) of the model a repository is benchmarked on: the
    default model (seattle-weather) where there is one, else the repository's only model."""
    cards = sorted(models.glob("*/*/model.json"))
    named = [c for c in cards if c.parent.parent.name == "seattle-weather"]
    if not named and len(cards) != 1:
        raise SystemExit(f"{models} holds {len(cards)} models and no seattle-weather: which one to benchmark?")
    card_path = (named or cards)[-1]
    card = json.loads(card_path.read_text())
    return (card_path.parent.parent.name, len(card["features"]), card["hidden_size"], card["num_layers"],
            len(card["targets"]), card_path.parent / "model.onnx")  # fmt: skip


def ort_limits(onnx: Path, seconds: float) -> dict[int, float]:
    """ONNX Runtime alone, in this process, one thread: session-steps per second at batch 1 and 256."""
    from service.runtime import OnnxRuntime

    rt = OnnxRuntime(onnx, threads=1)
    sig = rt.signature
    out = {}
    for b in (1, 256):
        x = np.random.default_rng(0).uniform(0, 10, (b, 1, sig.features)).astype(np.float32)
        h = np.zeros((sig.layers, b, sig.hidden), np.float32)
        for _ in range(20):
            rt.run(x, h, h)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            rt.run(x, h, h)
            n += 1
        out[b] = n * b / (time.perf_counter() - t0)
    return out


# --- measuring ----------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.rows: list[dict[str, Any]] = []
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.jsonl = (RESULTS / ("smoke.jsonl" if a.smoke else "latest.jsonl")).open("w")
        self.record({"kind": "machine", "machine": machine()})  # NOTE: so that --render names the run's machine

    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        return row

    def point(self, server: str, proc: Proc, port: int, workload: str, clients: int, model: tuple[Any, ...],
              kind: str | None = None, **kw: Any) -> dict[str, Any]:  # fmt: skip
        """One measurement, repeated while other load disturbed it (at most twice more)."""
        a = self.a
        tries = 0
        while True:
            tries += 1
            r = drive(workload, port, proc.pid, clients, a.seconds, a.warmup, model[0], model[1], **kw)
            disturbed = r.get("other_cpu_s", 0.0) / r["window_s"] > a.disturbed
            if not disturbed or a.smoke or tries == 3:
                break
            log(f"  disturbed ({r['other_cpu_s'] / r['window_s']:.2f} cores of other load): again")
        r.update(server=server, model=model[0], disturbed=disturbed, tries=tries)
        if kind:
            r["kind"] = kind  # NOTE: a point of another part (not of the sweep's tables)
        log(
            f"  {server:6s} {workload:11s} C={clients:<4d} {r['steps_per_s']:9.0f} steps/s  p50 {r['p50_ms'] or 0:7.3f}"
            f"  p99 {r['p99_ms'] or 0:7.2f} ms  cpu/step {r.get('server_cpu_ms_per_step', 0):.3f} ms  {r['codes']}"
        )
        return self.record(r)


def find(rows: list[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in want.items()):
            return r
    return None


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()


def sweep(b: Bench, models: Path, clients: list[int]) -> None:
    """Every workload at every C against ours and its floor (and REST against the naive server)."""
    model = model_of(models)
    name, features, hidden, layers, outputs, onnx = model
    log(f"model {name}: {features} features, hidden {hidden}, {layers} layer(s), {outputs} outputs")
    limits = ort_limits(onnx, 1.0 if b.a.smoke else 3.0)
    for batch, steps in limits.items():
        b.record({"server": "ort", "model": name, "batch": batch, "steps_per_s": steps})
    log(f"  ort    in-process          batch 1: {limits[1]:.0f} steps/s, batch 256: {limits[256]:.0f} steps/s")
    ge, re_, naive = start_floor("grpc-echo", "--outputs", str(outputs)), start_floor("rest-echo", "--outputs",
                                                                                       str(outputs)), None  # fmt: skip
    ours = start_ours(models)
    naive = start_floor("naive", "--model", str(onnx))
    with running(ge, re_, ours, naive):
        for workload in b.a.workloads:
            for c in clients:
                floor = ge if workload.startswith("grpc") else re_
                b.point("floor", floor, floor.ports["port"], workload, c, model)
                port = ours.ports["grpc" if workload.startswith("grpc") else "http"]
                b.point("ours", ours, port, workload, c, model)
                if workload == "rest-steps":
                    b.point("naive", naive, naive.ports["port"], workload, c, model)
        k = 64 if b.a.smoke else 1024
        b.point("floor", ge, ge.ports["port"], "grpc-batch", 1, model, batch=k)
        b.point("ours", ours, ours.ports["grpc"], "grpc-batch", 1, model, batch=k)


def overload(b: Bench, models: Path) -> None:
    """Open loop at twice the capacity (closed loop, C = 64): excess refused fast, accepted steps bounded, and
    how long after the load stops a lone client is served at idle latency again."""
    model = model_of(models)
    plain = start_ours(models)
    with running(plain):
        caps = {wl: b.point("ours", plain, plain.ports[port], wl, 64, model, kind="capacity")
                for wl, port in (("grpc-stream", "grpc"), ("rest-steps", "http"))}  # fmt: skip
    # NOTE: shed what would wait over 10 ms, so that refusals come back well within 20 ms
    ours = start_ours(models, "--max-queue-wait-ms", "10")
    with running(ours):
        for workload, port in (("grpc-stream", ours.ports["grpc"]), ("rest-steps", ours.ports["http"])):
            cap = caps[workload]
            r = drive(workload, port, ours.pid, 256, b.a.seconds, b.a.warmup, model[0], model[1],
                      rate=2 * cap["steps_per_s"])  # fmt: skip
            ended = time.perf_counter()
            r.update(server="ours", model=model[0], kind="overload", capacity=cap["steps_per_s"],
                     recovered_after_s=recovery(workload, port, model[0], model[1], ended))  # fmt: skip
            log(
                f"  overload {workload}: offered {r['rate']:.0f}/s, {r['codes']}, accepted p99 from send "
                f"{r['from_send_p99_ms']} ms, refusals p99 {r['refused_from_send_p99_ms']} ms, sends late by "
                f"{r['send_late_p99_ms']} ms (p99), recovered after {r['recovered_after_s']} s"
            )
            b.record(r)


def recovery(workload: str, port: int, model: str, features: int, since: float) -> float | None:
    """Seconds from `since` until five steps in a row of one client each take under 5 ms (None: not in 30 s)."""
    import http.client

    import grpc

    from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
    from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc

    x = [[1.0] * features]
    if workload.startswith("grpc"):  # NOTE: unary Step calls on the same server as the streams
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.PredictorStub(channel)
        sid = stub.CreateSession(pb.CreateSessionRequest(model=model)).session_id
        req = pb.StepRequest(session_id=sid, inputs=pb.Matrix(rows=1, cols=features, data=x[0]))

        def step() -> bool:
            try:
                stub.Step(req, timeout=5)
            except grpc.RpcError:
                return False
            return True
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/sessions", json.dumps({"model": model}), {"Content-Type": "application/json"})
        sid = json.loads(conn.getresponse().read())["session_id"]
        body = json.dumps({"inputs": x})

        def step() -> bool:
            conn.request("POST", f"/v1/sessions/{sid}/steps", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            return r.status == 200

    good = 0
    while time.perf_counter() - since < 30:
        t0 = time.perf_counter()
        ok = step()
        good = good + 1 if ok and time.perf_counter() - t0 < 0.005 else 0
        if good == 5:
            return round(time.perf_counter() - since, 2)
        time.sleep(0.01)
    return None


# --- targets -------------------------------------------------------------------------------------------------
def ratio(x: float | None, y: float | None) -> float | None:
    return None if x is None or not y else x / y


# NOTE: (target, what was measured, worst ratio, PASS / FAIL, or None: not measurable in this run)
Result = tuple[str, str, float | None, bool | None]
# NOTE: an open-loop driver whose sends were later than this (p99) did not offer the rate it was asked for
DRIVER_LATE_MS = 100.0
VERDICT = {True: "PASS", False: "FAIL", None: "NOT MEASURED"}


def targets(rows: list[dict[str, Any]], model: str, big: list[int]) -> list[Result]:
    """(target, what, worst measured ratio, pass) for one model."""
    out: list[Result] = []

    def pair(workload: str, c: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        want = {"model": model, "workload": workload, "clients": c, "mode": "closed"}
        return find(rows, server="ours", **want), find(rows, server="floor", **want)

    for n, workload, tput, cpu in ((1, "grpc-stream", 0.9, 1.25), (2, "rest-steps", 0.85, 1.3)):
        rs, cs = [], []
        for c in big:
            o, f = pair(workload, c)
            if o and f:
                rs.append(ratio(o["steps_per_s"], f["steps_per_s"]) or 0.0)
                cs.append(ratio(o["server_cpu_ms_per_step"], f["server_cpu_ms_per_step"]) or 99.0)
        worst, cpu_worst = (min(rs) if rs else None), (max(cs) if cs else None)
        ok = worst is not None and cpu_worst is not None and worst >= tput and cpu_worst <= cpu
        out.append((f"{n}. {workload}, C >= 16", f"steps/s >= {tput} x floor; CPU/step <= {cpu} x "
                    f"(worst CPU ratio {cpu_worst or 0:.2f})", worst, ok))  # fmt: skip
    p50s, p99s = [], []
    for workload in ("grpc-stream", "rest-steps"):
        o, f = pair(workload, 1)
        if o and f:
            p50s.append(ratio(o["p50_ms"], f["p50_ms"]) or 99.0)
            p99s.append(o["p99_ms"] or 99.0)
    worst = max(p50s) if p50s else None
    ok = worst is not None and worst <= 1.5 and max(p99s) <= 1.0
    out.append(("3. C = 1, both transports", f"p50 <= 1.5 x floor; p99 <= 1 ms (worst p99 {max(p99s or [0]):.2f} ms)",
                worst, ok))  # fmt: skip
    p99r = []
    for workload in ("grpc-stream", "rest-steps"):
        for c in (64, 256):
            o, f = pair(workload, c)
            if o and f:
                p99r.append(ratio(o["p99_ms"], f["p99_ms"]) or 99.0)
    worst = max(p99r) if p99r else None
    out.append(("4. p99 at C = 64, 256", "<= 1.2 x floor's p99", worst, worst is not None and worst <= 1.2))
    sb = find(rows, server="ours", model=model, workload="grpc-batch")
    lim = find(rows, server="ort", model=model, batch=256)
    r = ratio(sb["steps_per_s"], lim["steps_per_s"]) if sb and lim else None
    out.append(("5. StepBatch, many sessions", f"session-steps/s >= 0.5 x ONNX Runtime at batch 256 "
                f"(batch {sb['batch'] if sb else '?'})", r, r is not None and r >= 0.5))  # fmt: skip
    return out


def render(rows: list[dict[str, Any]], extra: list[Result], machine: str) -> str:
    lines = [f"Measured by `make bench` on {machine}.", ""]
    for model in dict.fromkeys(r["model"] for r in rows if r.get("model") and not r.get("kind")):
        lines += [f"**{model}**", "", "| workload | C | floor steps/s | ours steps/s | ratio | floor p50 / p99 ms | "
                  "ours p50 / p99 ms | CPU/step ours / floor ms | naive steps/s |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            if r.get("server") != "ours" or r.get("model") != model or r.get("mode") != "closed" or r.get("kind"):
                continue
            f = find(rows, server="floor", model=model, workload=r["workload"], clients=r["clients"], mode="closed",
                     batch=r["batch"])  # fmt: skip
            nv = find(rows, server="naive", model=model, workload=r["workload"], clients=r["clients"])
            if f is None:
                continue
            flag = " (disturbed)" if r.get("disturbed") or f.get("disturbed") else ""
            wl = r["workload"] + (f" x{r['batch']}" if r["batch"] else "")
            lines.append(
                f"| {wl} | {r['clients']} | {f['steps_per_s']:.0f} | {r['steps_per_s']:.0f}{flag} | "
                f"{r['steps_per_s'] / f['steps_per_s']:.2f} | {f['p50_ms']:.2f} / {f['p99_ms']:.2f} | "
                f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['server_cpu_ms_per_step']:.3f} / "
                f"{f['server_cpu_ms_per_step']:.3f} | {nv['steps_per_s']:.0f} |" if nv else
                f"| {wl} | {r['clients']} | {f['steps_per_s']:.0f} | {r['steps_per_s']:.0f}{flag} | "
                f"{r['steps_per_s'] / f['steps_per_s']:.2f} | {f['p50_ms']:.2f} / {f['p99_ms']:.2f} | "
                f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['server_cpu_ms_per_step']:.3f} / "
                f"{f['server_cpu_ms_per_step']:.3f} | |"
            )  # fmt: skip
        ort = {r["batch"]: r["steps_per_s"] for r in rows if r.get("server") == "ort" and r.get("model") == model}
        if ort:
            lines += ["", f"ONNX Runtime alone (one thread): {ort.get(1, 0):.0f} steps/s at batch 1, "
                      f"{ort.get(256, 0):.0f} at batch 256.", ""]  # fmt: skip
    lines += kserve_lines(rows)
    lines += ["| target | measured (worst case) | result |", "|---|---|---|"]
    for name, what, value, ok in extra:
        lines.append(f"| {name}: {what} | {'-' if value is None else f'{value:.2f}'} | {VERDICT[ok]} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows if r.get("workload") and not r.get("kind")))
    if not models:
        return
    workloads = list(dict.fromkeys(r["workload"] for r in rows if r.get("workload") and r["workload"] != "grpc-batch"))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for j, model in enumerate(models):
        for server, style in (("floor", "--"), ("ours", "-"), ("naive", ":")):
            for k, wl in enumerate(workloads):
                pts = sorted((r["clients"], r["steps_per_s"], r["p99_ms"] or 0) for r in rows
                             if r.get("server") == server and r.get("model") == model and r.get("workload") == wl
                             and r.get("mode") == "closed" and not r.get("kind"))  # fmt: skip
                if not pts:
                    continue
                cs, tp, p99 = zip(*pts, strict=True)
                color = f"C{k}"
                axes[0][j].plot(cs, tp, style, color=color, marker="o", label=f"{wl} ({server})")
                axes[1][j].plot(cs, p99, style, color=color, marker="o", label=f"{wl} ({server})")
        axes[0][j].set(title=f"{model}: steps/s", xscale="log", xlabel="concurrent clients C")
        axes[1][j].set(title=f"{model}: p99 latency (ms)", xscale="log", yscale="log", xlabel="concurrent clients C")
        axes[0][j].legend(fontsize=7)
    fig.suptitle("ours (solid) against the transport floors (dashed) and a naive server (dotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {system}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="every part once, tiny (checks that the harness works)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured window per point")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--disturbed", type=float, default=0.3, help="cores of other load that make a point disturbed")
    p.add_argument("--workloads", nargs="+", default=["grpc-stream", "grpc-step", "rest-steps", "ws-stream"])
    p.add_argument("--readme", action="store_true", help="rewrite the README's performance section")
    p.add_argument("--only-default", action="store_true", help="skip the 4x64x2 model")
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="what to measure (default: all)")
    p.add_argument("--render", type=Path, help="measure nothing: publish the rows of an earlier run (a .jsonl)")
    a = p.parse_args()
    if a.smoke:
        a.seconds, a.warmup = 0.5, 0.2
    clients = [1, 4] if a.smoke else [1, 16, 64, 256]
    big = [4] if a.smoke else [16, 64, 256]
    if a.render is not None:
        return publish(a, [json.loads(line) for line in a.render.read_text().splitlines() if line.strip()], big)
    b = Bench(a)
    repos = [DEFAULT_MODELS] + ([] if a.only_default or a.smoke else [bench_model()])
    if "sweep" in a.parts:
        for models in repos:
            sweep(b, models, clients)
    if "kserve" in a.parts:
        kserve(b, DEFAULT_MODELS, [4] if a.smoke else [16, 64])
    if "memory" in a.parts:
        memory(b)
    if "overload" in a.parts:
        overload(b, DEFAULT_MODELS)
    if "workers" in a.parts:
        workers(b, DEFAULT_MODELS)
    return publish(a, b.rows, big)


def publish(a: argparse.Namespace, rows: list[dict[str, Any]], big: list[int]) -> int:
    """The targets, the markdown, the PNG (and with --readme the README section), from the recorded rows."""
    results: list[Result] = []
    for name in dict.fromkeys(r["model"] for r in rows if r.get("workload") and not r.get("kind")):
        results += [(f"{t} [{name}]", w, v, ok) for t, w, v, ok in targets(rows, name, big)]
    results += memory_targets(rows)
    results += overload_targets(rows)
    if any(r.get("kind") == "workers" for r in rows):
        results.append(workers_target(rows))
    ran_on = next((r["machine"] for r in rows if r.get("kind") == "machine"), None)
    text = render(rows, results, ran_on or f"{machine()} (where it was rendered: the run did not record its own)")
    out = RESULTS / ("smoke.md" if a.smoke else "latest.md")
    out.write_text(text)
    plot(rows, out.with_suffix(".png"))
    print(text)
    if a.readme and not a.smoke:
        body = README.read_text()
        start, end = body.index(MARK_START) + len(MARK_START), body.index(MARK_END)
        README.write_text(body[:start] + "\n" + text + "\n![bench](bench/results/latest.png)\n" + body[end:])
        log("README performance section rewritten")
    if a.smoke:
        return 0  # NOTE: the smoke run checks that every part works, not the numbers
    return 0 if all(ok for *_, ok in results) else 1


KSERVE_PAIRS = (("grpc-stream", "kserve-stream"), ("rest-steps", "kserve-rest"))


def kserve(b: Bench, models: Path, clients: list[int]) -> None:
    """The KServe v2 paths as Triton's clients drive them (a sequence per client, one step per request), against
    our native paths on the same server: what the protocol adapter costs."""
    model = model_of(models)
    ours = start_ours(models)
    with running(ours):
        for native, v2 in KSERVE_PAIRS:
            for c in clients:
                port = ours.ports["grpc" if native.startswith("grpc") else "http"]
                b.point("ours", ours, port, native, c, model, kind="kserve")
                b.point("ours", ours, port, v2, c, model, kind="kserve")


def kserve_lines(rows: list[dict[str, Any]]) -> list[str]:
    got = [r for r in rows if r.get("kind") == "kserve"]
    if not got:
        return []
    lines = [
        "**KServe v2 paths** (the shipped model, the same server as its native paths)",
        "",
        "| workload | C | steps/s | p50 / p99 ms | CPU/step ms | ratio to native |",
        "|---|---|---|---|---|---|",
    ]
    for native, v2 in KSERVE_PAIRS:
        for r in (r for r in got if r["workload"] == v2):
            n = find(got, workload=native, clients=r["clients"])
            ratio_text = f"{r['steps_per_s'] / n['steps_per_s']:.2f} x {native}" if n else "-"
            lines.append(f"| {v2} | {r['clients']} | {r['steps_per_s']:.0f} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | "
                         f"{r.get('server_cpu_ms_per_step', 0):.3f} | {ratio_text} |")  # fmt: skip
    return [*lines, ""]


def workers(b: Bench, models: Path) -> None:
    """Target 8: steps/s of one and of two serving processes sharing their sessions through Redis (REST, C = 64,
    so that steps of a session land on either worker)."""
    import uuid

    model = model_of(models)
    redis_url = os.environ.get("LSTM_TEST_REDIS", "redis://127.0.0.1:6379/0")
    for n in (1, 2):
        prefix = f"lstm-bench-{uuid.uuid4().hex[:8]}:"
        proc = start_ours(models, "--workers", str(n), "--state-store", redis_url, "--redis-key-prefix", prefix)
        with running(proc):
            time.sleep(1.0)  # NOTE: every worker up
            b.point(f"w{n}", proc, proc.ports["http"], "rest-steps", 64, model, kind="workers")


def workers_target(rows: list[dict[str, Any]]) -> Result:
    got = {int(r["server"][1:]): r for r in rows if r.get("kind") == "workers"}
    r = got[2]["steps_per_s"] / got[1]["steps_per_s"]
    errors = sum(v for g in got.values() for k, v in g["codes"].items() if k != "ok")
    return (
        "8. --workers 2 on Redis, rest-steps C = 64",
        f">= 1.1 x one worker's steps/s, every step ok ({got[1]['steps_per_s']:.0f} -> "
        f"{got[2]['steps_per_s']:.0f} steps/s, {errors} errors; the driver and Redis share the same cores)",
        r, errors == 0 and r >= 1.1,
    )  # fmt: skip


def memory(b: Bench) -> None:
    """Target 6, in a process of its own (bench/memory.py): without live scoring (the target as stated: state
    plus 256 B) and with it (the server's default: the scoring record counts too)."""
    n = 20_000 if b.a.smoke else 1_000_000
    for flags in (["--no-live-scoring"], []):
        cmd = [PY, str(ROOT / "bench" / "memory.py"), "--sessions", str(n), *flags]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        b.record({"kind": "memory", **r})
        log(
            f"  memory {n} sessions{' with live scoring' * r['live_scoring']}: {r['rss_bytes_per_session']:.0f} B "
            f"each (budget {r['budget_bytes']}), {r['seconds']} s"
        )


def memory_targets(rows: list[dict[str, Any]]) -> list[Result]:
    out: list[Result] = []
    for r in (r for r in rows if r.get("kind") == "memory"):
        n, scored = r["sessions"], r.get("live_scoring", False)
        what = f"raw state + {r['record_bytes']} B scoring record + 256 B" if scored else "raw state + 256 B"
        out.append((f"6{'b' * scored}. memory, {n:,} idle sessions{', live scoring' * scored}",
                    f"RSS per session <= {what} = {r['budget_bytes']} B ({r['rss_bytes_per_session']:.0f} B), "
                    f"opened in {r['seconds']} s (< 60 s)", r["rss_bytes_per_session"] / r["budget_bytes"],
                    bool(r["pass"])))  # fmt: skip
    return out


def overload_targets(rows: list[dict[str, Any]]) -> list[Result]:
    out: list[Result] = []
    for r in rows:
        if r.get("kind") != "overload":
            continue
        refused = sum(v for k, v in r["codes"].items() if k != "ok")
        rp99, ap99, rec = r.get("refused_from_send_p99_ms"), r.get("from_send_p99_ms"), r.get("recovered_after_s")
        late = r.get("send_late_p99_ms") or 0.0
        ok = bool(refused and rp99 is not None and rp99 < 20 and ap99 is not None and ap99 < 50)
        ok = ok and rec is not None and rec < 5
        # NOTE: a driver that fell this far behind offered less than the rate, and its latencies are its own
        verdict: bool | None = None if late > DRIVER_LATE_MS else ok
        out.append((
            f"7. overload, {r['workload']} at 2 x capacity ({r['rate']:.0f}/s asked)",
            f"refusals p99 < 20 ms, accepted p99 < 50 ms, recovery < 5 s: {r['codes'].get('ok', 0)} accepted, "
            f"{refused} refused, accepted p99 {ap99 or 0:.1f} ms, recovered after {rec} s"
            + (f"; the driver itself fell behind by {late:.0f} ms (p99)" if late > 20 else "")
            + (" and could not offer the rate on this machine (client and server share its cores)"
               if verdict is None else ""),
            rp99, verdict,
        ))  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())
