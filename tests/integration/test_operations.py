"""Operations: metrics after known traffic, health and reflection, OpenAPI, the CLI and SIGTERM."""

from __future__ import annotations

import asyncio
import csv
import io
import signal
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from model.data import default_csv_path
from service.app import Server
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.fixtures import reference_run
from tests.integration.conftest import sample, start_serve_process, until

MODEL = "seattle-weather"
KEY = "seattle-weather/1"


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_exactly_the_traffic_sent(
    server: Server, rest: httpx.AsyncClient, stub: pb_grpc.PredictorStub, weather: np.ndarray
) -> None:
    """After known traffic, request counters, step and session counts and histogram counts equal what was sent."""
    rest_ids = [(await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"] for _ in range(3)]
    grpc_ids = [(await stub.CreateSession(pb.CreateSessionRequest(model=MODEL))).session_id for _ in range(2)]
    for k in range(10):
        await rest.post(f"/v1/sessions/{rest_ids[k % 3]}/steps", json={"inputs": [weather[k].tolist()]})
    for k in range(5):
        rows = weather[k : k + 2]
        m = pb.Matrix(rows=2, cols=4, data=rows.reshape(-1).tolist())
        await stub.Step(pb.StepRequest(session_id=grpc_ids[k % 2], inputs=m))
    assert (await rest.get("/v1/sessions/nobody")).status_code == 404
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetSession(pb.SessionRef(session_id="nobody"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    await rest.delete(f"/v1/sessions/{rest_ids[0]}")
    # NOTE: a gRPC error reaches the client before its handler has counted it
    await until(lambda: sample(server, "lstm_requests_total", protocol="grpc", method="GetSession", code="NOT_FOUND"),
                equals=1)  # fmt: skip
    text = (await rest.get("/metrics")).text
    s = scrape(text)
    req = "lstm_requests_total"
    assert value(s, req, protocol="rest", method="POST /v1/sessions", code="201") == 3
    assert value(s, req, protocol="grpc", method="CreateSession", code="OK") == 2
    assert value(s, req, protocol="rest", method="POST /v1/sessions/{session_id}/steps", code="200") == 10
    assert value(s, req, protocol="grpc", method="Step", code="OK") == 5
    assert value(s, req, protocol="rest", method="GET /v1/sessions/{session_id}", code="404") == 1
    assert value(s, req, protocol="grpc", method="GetSession", code="NOT_FOUND") == 1
    assert value(s, req, protocol="rest", method="DELETE /v1/sessions/{session_id}", code="200") == 1
    lat = "lstm_request_latency_seconds_count"
    assert value(s, lat, protocol="rest", method="POST /v1/sessions/{session_id}/steps") == 10
    assert value(s, lat, protocol="grpc", method="Step") == 5
    assert value(s, "lstm_steps_total", model=KEY) == 10 + 5 * 2
    assert value(s, "lstm_batch_size_sum", model=KEY) == 15
    batches = value(s, "lstm_batch_size_count", model=KEY)
    assert batches == 15  # NOTE: strictly sequential calls: one batch each
    assert value(s, "lstm_inference_seconds_count", model=KEY) == batches
    assert value(s, "lstm_queue_wait_seconds_count", model=KEY) == 15
    assert value(s, "lstm_sessions_created_total", model=KEY) == 5
    assert value(s, "lstm_sessions_removed_total", model=KEY, reason="deleted") == 1
    assert value(s, "lstm_sessions_open", model=KEY) == 4
    assert value(s, "lstm_model_info", model=MODEL, version="1", features="precipitation,temp_max,temp_min,wind",
                 horizon="7") == 1  # fmt: skip
    assert value(s, "lstm_ready") == 1
    for sid in rest_ids + grpc_ids:
        assert sid not in text  # no session ids as label values


async def test_grpc_health_and_reflection_describe_the_server(server: Server) -> None:
    """grpc.health.v1 reports SERVING for '' and lstm.v1.Predictor; reflection lists the services (grpcurl works)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "lstm.v1.Predictor", "inference.GRPCInferenceService"):  # NOTE: each service it serves
            r = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert r.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask():  # type: ignore[no-untyped-def]
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="lstm.v1.Predictor")

        replies = [r async for r in refl.ServerReflectionInfo(ask())]
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"lstm.v1.Predictor", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
        assert replies[1].file_descriptor_response.file_descriptor_proto
        await server.grpc.set_serving(False)
        for name in ("lstm.v1.Predictor", "inference.GRPCInferenceService"):
            r = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING, name


async def test_openapi_lists_every_operation_with_its_errors(rest: httpx.AsyncClient) -> None:
    """The OpenAPI document lists each REST operation and the error responses it can give, with the error body."""
    spec = (await rest.get("/openapi.json")).json()
    paths = spec["paths"]
    expected = {
        ("/v1/models", "get"), ("/v1/models/{name}", "get"), ("/v1/models/{name}/predict", "post"),
        ("/v1/sessions", "post"), ("/v1/sessions/{session_id}", "get"), ("/v1/sessions/{session_id}", "delete"),
        ("/v1/sessions/{session_id}/steps", "post"), ("/v1/sessions/{session_id}/reset", "post"),
        ("/v1/sessions/{session_id}/state", "get"), ("/v1/sessions/{session_id}/state", "post"),
        ("/v1/steps", "post"), ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"),
    }  # fmt: skip
    assert expected <= {(p, m) for p, ops in paths.items() for m in ops}
    steps = paths["/v1/sessions/{session_id}/steps"]["post"]["responses"]
    assert {"200", "400", "404", "409", "413", "500", "503"} <= set(steps)
    assert "session_not_found" in steps["404"]["description"]
    assert steps["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "429" in paths["/v1/sessions"]["post"]["responses"]
    assert "503" in paths["/v1/steps"]["post"]["responses"]
    assert "unavailable" in steps["503"]["description"]
    assert not [p for p, ops in paths.items() for op in ops.values() if "422" in op["responses"]]
    assert (await rest.get("/docs")).status_code == 200


async def test_stream_command_pipes_a_csv_through_a_session(server: Server, tmp_path: Path) -> None:
    """`lstm-serve stream --csv` prints one line of forecasts per row, equal to the offline run, and plots."""
    lines = default_csv_path().read_text().splitlines()[:41]
    (tmp_path / "week.csv").write_text("\n".join(lines) + "\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "stream", "--csv", str(tmp_path / "week.csv"),
        "--server", f"127.0.0.1:{server.grpc_port}", "--time-col", "date", "--plot", str(tmp_path / "out.png"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    table = list(csv.reader(io.StringIO(out.decode())))
    assert table[0][:2] == ["date", "temp_max[t+1]"]
    assert table[1][0] == "2012/01/01"
    got = np.asarray([[float(v) for v in row[1:]] for row in table[1:]], np.float32)
    x = np.asarray([[float(v) for v in line.split(",")[1:5]] for line in lines[1:]], np.float32)
    np.testing.assert_allclose(got, reference_run(x), atol=1e-3)
    assert (tmp_path / "out.png").stat().st_size > 10_000
    assert await server.store.count() == 0


async def test_stream_command_picks_the_model_whose_features_the_csv_holds(server: Server, tmp_path: Path) -> None:
    """With both shipped models served and no --model, the hourly CSV streams through the hourly model (24
    forecasts per row); a CSV that fits neither is refused with the models' names and what to pass."""
    assert {m.name for m in server.dataplane.repo.all()} == {"seattle-weather", "seattle-temps"}
    for csv_arg, limit in (("vega:seattle-temps.csv", "5"), (str(tmp_path / "other.csv"), "1")):
        (tmp_path / "other.csv").write_text("when,load\n1,2\n")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "stream", "--csv", csv_arg, "--limit", limit,
            "--server", f"127.0.0.1:{server.grpc_port}", "--time-col", "date",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        if csv_arg.startswith("vega:"):
            assert proc.returncode == 0, err.decode()
            table = list(csv.reader(io.StringIO(out.decode())))
            assert table[0] == ["date", *[f"temp[t+{k}]" for k in range(1, 25)]]
            assert len(table) == 6
        else:
            assert proc.returncode == 2
            assert "serves seattle-temps, seattle-weather" in err.decode()
            assert "--model NAME" in err.decode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "stream", "--csv", str(tmp_path / "missing.csv"),
        "--server", f"127.0.0.1:{server.grpc_port}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, err.decode().strip()) == (1, f"error: CSV file not found: {tmp_path / 'missing.csv'}")
    assert await server.store.count() == 0


async def test_stream_command_refuses_a_limit_below_one_row(tmp_path: Path) -> None:
    """--limit 0 streamed the whole file and a negative limit dropped rows from its end; both are refused."""
    (tmp_path / "a.csv").write_text("precipitation,temp_max,temp_min,wind\n0,1,2,3\n")
    for limit in ("0", "-2", "two"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "stream", "--csv", str(tmp_path / "a.csv"), "--limit", limit,
            "--server", "127.0.0.1:1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2, limit
        assert f"must be a whole number of rows >= 1, got {limit!r}" in err.decode()


async def test_stream_command_explains_a_missing_server(tmp_path: Path) -> None:
    """Without a server, `lstm-serve stream` exits 1 with advice, not a traceback."""
    (tmp_path / "a.csv").write_text("precipitation,temp_max,temp_min,wind\n0,1,2,3\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "stream", "--csv", str(tmp_path / "a.csv"), "--server", "127.0.0.1:1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "is `lstm-serve serve` running at 127.0.0.1:1?" in err.decode()
    assert "Traceback" not in err.decode()


async def test_serve_command_drains_on_sigterm_and_exits_zero(weather: np.ndarray) -> None:
    """The real entry point serves on port 0; on SIGTERM readiness turns false first (REST and gRPC health)
    while queued work still runs, every step call the server had queued finishes with 200, and it exits 0."""
    # NOTE: no load shedding here (max queue wait 0): this test is about the drain of what was queued
    proc, http_port, grpc_port = await start_serve_process(
        drain_seconds="20", max_batch_size="1", max_queue_wait_ms="0"
    )
    assert proc.stderr is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as rest:
            assert (await rest.get("/readyz")).status_code == 200
            n = 32  # NOTE: calls of 4,000 steps, one per batch
            sids = [(await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"] for _ in range(n)]
            body = {"inputs": weather[:4000].tolist()}
            finished: list[float] = []
            inflight = [asyncio.create_task(rest.post(f"/v1/sessions/{sid}/steps", json=body)) for sid in sids]
            for t in inflight:
                t.add_done_callback(lambda _: finished.append(time.monotonic()))
            depth = 0.0
            while depth < 6:  # NOTE: wait (no fixed sleep) until the server holds several calls in its queue
                depth = value(scrape((await rest.get("/metrics")).text), "lstm_queue_depth", model=KEY)
            proc.send_signal(signal.SIGTERM)
            ready = await rest.get("/readyz")
            unready_at = time.monotonic()
            assert (ready.status_code, ready.json()["error"]) == (503, "draining")
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            results = await asyncio.gather(*inflight)
            # NOTE: calls the server had queued finish; calls still in transit at SIGTERM are refused as unavailable
            codes = [r.status_code for r in results]
            assert set(codes) <= {200, 503}, codes
            assert codes.count(200) >= depth
            assert all(r.json()["code"] == "unavailable" for r in results if r.status_code == 503)
            assert any(at > unready_at for at in finished)  # work was still running after readiness turned false
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    rest_log = (await proc.stderr.read()).decode()
    assert "shutting down" in rest_log
    assert "stopped" in rest_log
    assert "Traceback" not in rest_log


def head_then_get(port: int, paths: list[str]) -> list[tuple[int, bytes, str | None, int, bytes]]:
    """Per path, on one keep-alive connection: HEAD (status, body, Content-Length) then GET (status, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    for path in paths:
        conn.request("HEAD", path)
        head = conn.getresponse()
        head_body, length = head.read(), head.getheader("content-length")
        conn.request("GET", path)
        got = conn.getresponse()
        out.append((head.status, head_body, length, got.status, got.read()))
    conn.close()
    return out


async def test_head_answers_wherever_get_does_with_the_gets_headers_and_no_body(server: Server) -> None:
    """Health checkers and load balancers probe with HEAD: every GET route answers it as GET would, without the
    body (the keep-alive connection stays usable); a route without GET still says which methods it has."""
    paths = ["/healthz", "/readyz", "/metrics", "/v1/models", "/v1/models/seattle-weather", "/v2/health/live"]
    answers = await asyncio.to_thread(head_then_get, server.http_port, paths)
    for path, (status, body, length, get_status, get_body) in zip(paths, answers, strict=True):
        assert (status, body, get_status) == (200, b"", 200), path
        if path != "/metrics":  # NOTE: the metrics text moves between the two requests
            assert length == str(len(get_body)), path
    ((status, body, _, _, _),) = await asyncio.to_thread(head_then_get, server.http_port, ["/v1/steps"])
    assert (status, body) == (405, b"")
