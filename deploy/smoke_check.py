"""Checks a running deployment as a user would (run by deploy/smoke.sh with the project's .venv python).

  python deploy/smoke_check.py --rest http://127.0.0.1:8000 --grpc 127.0.0.1:50051 \
      [--prometheus http://127.0.0.1:9090] [--replicas 2]

- streams one sequence over REST (session steps with seq) and one over the gRPC stream, and compares both
  with one offline ONNX Runtime run of the shipped model (atol 1e-5);
- leaves known traffic behind for the dashboard: a deleted session and an unknown-session error;
- with --prometheus: waits for a real scrape, then runs every panel query of the provisioned Grafana
  dashboard through Prometheus's HTTP API and fails on a query error or an empty result;
- with --replicas N: checks that N replicas served steps of the same sessions (through the load balancer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.data import default_csv_path, load_csv  # noqa: E402
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb  # noqa: E402
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "seattle-weather"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "lstm-serve.json"


def reference(x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(ROOT / "models" / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    # NOTE: the state's sizes from the graph ([L, B, H]), not assumed: the shipped model changes with retraining
    state = {i.name: np.zeros((i.shape[0], 1, i.shape[2]), np.float32) for i in sess.get_inputs() if i.name != "x"}
    y, _, _ = sess.run(None, {"x": x[None].astype(np.float32), **state})
    return np.asarray(y[0])


def weather() -> np.ndarray:
    return load_csv(default_csv_path(), "temp_max", ("precipitation", "temp_max", "temp_min", "wind"), "date").values


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        sys.exit(1)


def rest_sequence(rest: httpx.Client, x: np.ndarray) -> np.ndarray:
    sid = rest.post("/v1/sessions", json={"model": MODEL}).json()["session_id"]
    outs = []
    for k, row in enumerate(x):
        r = rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": [row.tolist()], "seq": k + 1})
        if r.status_code != 200:
            check(False, f"REST step {k + 1}: {r.status_code} {r.text}")
        outs.append(np.asarray(r.json()["outputs"], np.float32))
    rest.delete(f"/v1/sessions/{sid}")
    return np.concatenate(outs)


def grpc_sequence(target: str, x: np.ndarray) -> np.ndarray:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.PredictorStub(channel)

        def requests() -> Any:
            yield pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL))
            for row in x:
                yield pb.StreamRequest(inputs=pb.Matrix(rows=1, cols=4, data=[float(v) for v in row]))

        replies = list(stub.Stream(requests(), timeout=60))
    return np.concatenate([np.asarray(r.outputs.data, np.float32).reshape(1, 7) for r in replies[1:]])


def prometheus_query(base: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error')}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rest", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--prometheus")
    ap.add_argument("--replicas", type=int, default=1)
    args = ap.parse_args()
    data = weather()
    with httpx.Client(base_url=args.rest, timeout=30) as rest:
        deadline = time.monotonic() + 90
        while True:
            try:
                if rest.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() >= deadline:
                check(False, "the service became ready within 90 s")
            time.sleep(0.5)
        check(True, f"ready at {args.rest}")
        x = data[400:440]
        got = rest_sequence(rest, x)
        check(bool(np.allclose(got, reference(x), atol=1e-5)), "REST session of 40 steps equals the offline ONNX run")
        got = grpc_sequence(args.grpc, x)
        check(bool(np.allclose(got, reference(x), atol=1e-5)), "gRPC stream of 40 steps equals the offline ONNX run")
        missing = rest.get("/v1/sessions/no-such-session")
        check(missing.status_code == 404, "an unknown session is 404")
        if args.prometheus:
            check_prometheus(args.prometheus, rest, args.grpc, data, args.replicas)
    return 0


def check_prometheus(base: str, rest: httpx.Client, grpc_target: str, data: np.ndarray, replicas: int) -> None:
    """Traffic until every dashboard query returns data (rates need two scrapes 5 s apart; at most 60 s)."""
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]

    def serving() -> int:
        served = prometheus_query(base, "count(sum by (instance) (increase(lstm_steps_total[1m])) > 0)")
        return int(float(served[0]["value"][1])) if served else 0

    deadline = time.monotonic() + 90
    empty, n, k = exprs, 0, 0
    while (empty or n != replicas) and time.monotonic() < deadline:
        x = data[10 * (k % 100) : 10 * (k % 100) + 10]
        rest_sequence(rest, x)
        grpc_sequence(grpc_target, x)
        rest.get("/v1/sessions/no-such-session")
        k += 1
        try:
            empty = [e for e in exprs if not prometheus_query(base, e)]
        except RuntimeError as err:
            check(False, f"dashboard query fails: {err}")
        n = serving()
    check(not empty, f"all {len(exprs)} dashboard queries return data from a real scrape (empty: {empty})")
    check(n == replicas, f"{replicas} replica(s) served steps through one address (saw {n})")
    total = prometheus_query(base, "sum(lstm_steps_total)")[0]["value"][1]
    print(f"ok   Prometheus has lstm_steps_total = {total} from {replicas} target(s)")


if __name__ == "__main__":
    sys.exit(main())
