"""`--workers N`: N serving processes on one host, sharing both ports (SO_REUSEPORT) and a Redis session store.

This process binds nothing that serves: it picks the ports (when 0 was asked for), starts the workers with
every setting passed explicitly, sums their metrics through Prometheus's multiprocess mode (each worker's
/metrics shows the total), forwards SIGTERM/SIGINT so that each drains, and exits 0 when all have. A worker
that dies is started again, unless it died within its first seconds (then all stop: a crash loop is the
operator's to see). The kernel spreads connections over the workers; a gRPC stream lives in one of them,
while REST and unary calls of one session may land on any, which is why a shared store is required.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from service.metrics import MULTIPROC_ENV
from service.settings import Settings

log = logging.getLogger("service.workers")
CRASH_LOOP_SECONDS = 10.0


def shared_port(host: str, port: int) -> tuple[int, socket.socket | None]:
    """The port the workers share: `port`, or for 0 a free one, held (bound, not listening) until they bind."""
    if port:
        return port, None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock.getsockname()[1], sock


def worker_env(settings: Settings, http_port: int, grpc_port: int, metrics_dir: str) -> dict[str, str]:
    """Every setting as an LSTM_SERVE_* variable (nothing left to the worker's own environment), one worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTM_SERVE_") or k == "LSTM_SERVE_API_KEYS"}
    values = settings.model_dump() | {"workers": 1, "reuse_port": True, "http_port": http_port,
                                      "grpc_port": grpc_port}  # fmt: skip
    for name, value in values.items():
        if value is not None:
            env[f"LSTM_SERVE_{name.upper()}"] = str(value)
    env[MULTIPROC_ENV] = metrics_dir
    return env


def supervise(settings: Settings) -> int:
    """Run `settings.workers` workers until SIGTERM or SIGINT; the exit code is 0 when they all drained cleanly."""
    http_port, hold_http = shared_port(settings.host, settings.http_port)
    grpc_port, hold_grpc = shared_port(settings.host, settings.grpc_port)
    metrics_dir = tempfile.mkdtemp(prefix="lstm-serve-metrics-")
    env = worker_env(settings, http_port, grpc_port, metrics_dir)
    cmd = [sys.executable, "-m", "service.cli", "serve"]
    stopping = False
    workers: dict[int, tuple[subprocess.Popen[bytes], float]] = {}  # slot -> (process, when it started)

    def stop(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True
        for p, _started in workers.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for slot in range(settings.workers):
            workers[slot] = (subprocess.Popen(cmd, env=env), time.monotonic())
        log.info("%d workers on REST port %d and gRPC port %d (pids %s)", settings.workers, http_port, grpc_port,
                 ", ".join(str(p.pid) for p, _ in workers.values()))  # fmt: skip
        time.sleep(1.0)
        for held in (hold_http, hold_grpc):  # NOTE: the workers hold the ports now
            if held is not None:
                held.close()
        code = 0
        while workers:
            time.sleep(0.2)
            for slot, (p, began) in list(workers.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del workers[slot]
                _forget(metrics_dir, p.pid)
                if stopping:
                    code = code or rc
                elif time.monotonic() - began < CRASH_LOOP_SECONDS:
                    log.error("worker %d exited with %d within %.0f s of its start: stopping all", p.pid, rc,
                              CRASH_LOOP_SECONDS)  # fmt: skip
                    code = rc or 1
                    stop(signal.SIGTERM, None)
                else:
                    log.error("worker %d exited with %d: starting another", p.pid, rc)
                    workers[slot] = (subprocess.Popen(cmd, env=env), time.monotonic())
        return code
    finally:
        for p, _ in workers.values():
            if p.poll() is None:
                p.kill()
        for held in (hold_http, hold_grpc):
            if held is not None:
                held.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _forget(metrics_dir: str, pid: int) -> None:
    """A worker that exited no longer counts in the live gauges (its counters still add up)."""
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
