"""The Open Inference Protocol (KServe v2) with Triton's sequence extension, driven by Triton's own client
(`tritonclient`, in its own virtualenv: `make triton-venv`) against a real server, and by plain HTTP and gRPC
where a test needs what tritonclient does not send. Every output is checked against one offline ONNX Runtime
run over the whole sequence."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from service.grpc._generated.inference import grpc_service_pb2 as kpb
from service.grpc._generated.inference import grpc_service_pb2_grpc as kpb_grpc
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.fixtures import reference_run
from tests.integration.conftest import ServerFactory, sample

MODEL = "seattle-weather"
ATOL = 1e-5
TRITON_PYTHON = ROOT / "build" / "tritonclient-venv" / "bin" / "python"


def sequences(weather: np.ndarray) -> np.ndarray:
    """Six real 20-day sequences of the Seattle weather."""
    return np.stack([weather[i * 40 : i * 40 + 20] for i in range(6)]).astype(np.float32)


async def drive_tritonclient(http_port: int, grpc_port: int, seqs: np.ndarray, tmp: Path) -> dict[str, Any]:
    if not TRITON_PYTHON.exists():
        pytest.fail(f"Triton's client is not installed at {TRITON_PYTHON}: run `make triton-venv` (make test does)")
    path = tmp / "sequences.npy"
    np.save(path, seqs)
    proc = await asyncio.create_subprocess_exec(
        str(TRITON_PYTHON), str(ROOT / "tests" / "tritonclient" / "drive.py"), str(http_port), str(grpc_port), MODEL,
        str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_tritonclient_http_and_grpc_drive_sequences_and_get_the_offline_forecasts(
    make_server: ServerFactory, weather: np.ndarray, tmp_path: Path, daily_repo: Path
) -> None:
    """Health, metadata and config; a stateless infer; sequences over unary calls (int and string ids, [1, T, F]
    and [T, F]); four sequences interleaved on one stream: all equal one offline run per sequence. Errors reach
    tritonclient with the right status and a readable message; the steps count as protocol="kserve"."""
    srv = await make_server(max_queue_delay_ms=2, models=daily_repo)  # NOTE: one model: unloading it is refused
    seqs = sequences(weather)
    got = await drive_tritonclient(srv.http_port, srv.grpc_port, seqs, tmp_path)
    want = [reference_run(s) for s in seqs]
    statuses = {
        "http": {"unknown_model": "404", "wrong_shape": "400", "missing_start": "400", "after_end": "400",
                 "not_finite": "400"},
        "grpc": {"unknown_model": "StatusCode.NOT_FOUND", "wrong_shape": "StatusCode.INVALID_ARGUMENT",
                 "missing_start": "StatusCode.INVALID_ARGUMENT", "after_end": "StatusCode.INVALID_ARGUMENT",
                 "not_finite": "StatusCode.INVALID_ARGUMENT"},
    }  # fmt: skip
    for side in ("http", "grpc"):
        g = got[side]
        assert (g["live"], g["ready"], g["model_ready"]) == (True, True, True)
        assert g["server"]["name"] == "lstm-serve"
        assert {"sequence", "binary_tensor_data", "model_configuration"} <= set(g["server"]["extensions"])
        assert g["metadata"]["inputs"][0]["name"] == "x"
        assert [int(d) for d in g["metadata"]["inputs"][0]["shape"]] == [-1, -1, 4]
        assert [int(d) for d in g["metadata"]["outputs"][0]["shape"]] == [-1, -1, 7]
        assert "sequence_batching" in g["config"]
        assert int(g["config"]["max_batch_size"]) >= 1
        np.testing.assert_allclose(g["stateless"], want[0], atol=ATOL)
        np.testing.assert_allclose(g["sequence"], want[1], atol=ATOL)
        np.testing.assert_allclose(g["string_sequence"], want[1], atol=ATOL)
        errors = g["errors"]
        assert {k: v and v["status"] for k, v in errors.items()} == statuses[side]
        assert "no model named 'no-such-model'" in errors["unknown_model"]["message"]
        assert "4 feature values" in errors["wrong_shape"]["message"]
        assert "must specify the START flag" in errors["missing_start"]["message"]
        assert "must specify the START flag" in errors["after_end"]["message"]  # END closed the sequence
        assert "NaN" in errors["not_finite"]["message"]
        assert all("Traceback" not in v["message"] for v in errors.values())
        assert g["index"] == [{"name": MODEL, "version": "1", "state": "READY"}]
        assert "last model" in g["unload"]["message"]
        assert g["unload"]["status"] in ("409", "StatusCode.FAILED_PRECONDITION")
    stream = got["stream"]
    assert stream["order"] == stream["plan"]  # NOTE: answers in request order, the failed one in its place
    for i, rows in stream["sequences"].items():
        np.testing.assert_allclose(rows, want[int(i)], atol=ATOL)
    assert len(stream["errors"]) == 1
    assert "must specify the START flag" in stream["errors"][0]
    assert sample(srv, "lstm_requests_total", protocol="kserve", method="ModelInfer", code="OK") > 0
    assert sample(srv, "lstm_stream_messages_total", protocol="kserve", code="ok") == 12
    assert sample(srv, "lstm_stream_messages_total", protocol="kserve", code="invalid_input") == 1
    assert sample(srv, "lstm_requests_total", protocol="kserve", method="POST /v2/models/{name}/infer", code="200") > 0


async def test_a_sequence_is_a_session_across_v2_v1_and_lstm_v1(
    make_server: ServerFactory, weather: np.ndarray
) -> None:
    """A sequence started over /v2 REST is a session that /v1 shows and lstm.v1 steps; /v2 gRPC continues it and
    ends it. A session created over /v1 takes /v2 steps without START. One offline run gives every output."""
    srv = await make_server()
    x = weather[300:330].astype(np.float32)
    want = reference_run(x)
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest,
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch,
    ):
        v1, v2 = pb_grpc.PredictorStub(ch), kpb_grpc.GRPCInferenceServiceStub(ch)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [10, 4], "data": x[:10].tolist()}],
                "parameters": {"sequence_id": "shared-1", "sequence_start": True}}  # fmt: skip
        r = await rest.post(f"/v2/models/{MODEL}/infer", json=body)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert (out["name"], out["shape"], out["datatype"]) == ("y", [10, 7], "FP32")
        got = [np.asarray(out["data"]).reshape(10, 7)]
        info = (await rest.get("/v1/sessions/shared-1")).json()
        assert (info["model"], info["steps"]) == (MODEL, 10)
        step = await v1.Step(
            pb.StepRequest(session_id="shared-1", inputs=pb.Matrix(rows=10, cols=4, data=x[10:20].reshape(-1)))
        )
        got.append(np.asarray(step.outputs.data).reshape(10, 7))
        req = kpb.ModelInferRequest(model_name=MODEL, raw_input_contents=[x[20:].tobytes()])
        req.inputs.add(name="x", datatype="FP32", shape=[1, 10, 4])
        req.parameters["sequence_id"].string_param = "shared-1"
        req.parameters["sequence_end"].bool_param = True
        resp = await v2.ModelInfer(req)
        assert list(resp.outputs[0].shape) == [1, 10, 7]
        got.append(np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(10, 7))
        np.testing.assert_allclose(np.concatenate(got), want, atol=ATOL)
        assert (await rest.get("/v1/sessions/shared-1")).status_code == 404  # END closed it

        await rest.post("/v1/sessions", json={"model": MODEL, "session_id": "from-v1"})
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 30, 4], "data": x.tolist()}],
                "parameters": {"sequence_id": "from-v1"}}  # fmt: skip
        r = await rest.post(f"/v2/models/{MODEL}/versions/1/infer", json=body)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()["outputs"][0]["data"]).reshape(30, 7), want, atol=ATOL)


async def test_the_binary_tensor_extension_in_and_out_and_bad_framing_is_refused(
    make_server: ServerFactory, weather: np.ndarray
) -> None:
    """Binary inputs after the JSON header, binary outputs when asked; a header length past the body, sizes that
    do not add up, an unknown parameter or a wrong datatype are 400s that say what to fix."""
    srv = await make_server()
    x = weather[:8].astype(np.float32)
    raw = x.astype("<f4").tobytes()
    spec = {"name": "x", "datatype": "FP32", "shape": [1, 8, 4], "parameters": {"binary_data_size": len(raw)}}
    head = {"inputs": [spec], "parameters": {"binary_data_output": True}}
    text = json.dumps(head).encode()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest:
        url = f"/v2/models/{MODEL}/infer"
        r = await rest.post(url, content=text + raw, headers={"Inference-Header-Content-Length": str(len(text))})
        assert r.status_code == 200, r.text
        n = int(r.headers["inference-header-content-length"])
        meta = json.loads(r.content[:n])
        size = meta["outputs"][0]["parameters"]["binary_data_size"]
        y = np.frombuffer(r.content[n : n + size], "<f4").reshape(8, 7)
        np.testing.assert_allclose(y, reference_run(x), atol=ATOL)
        assert size == 8 * 7 * 4 == len(r.content) - n
        bad = {
            "header past the body": (text + raw, str(len(text) + len(raw) + 1)),
            "sizes do not add up": (text + raw + b"\0\0\0\0", str(len(text))),
        }
        for why, (content, length) in bad.items():
            r = await rest.post(url, content=content, headers={"Inference-Header-Content-Length": length})
            assert r.status_code == 400, why
            assert r.json()["error"]
        plain = {"name": "x", "datatype": "FP32", "shape": [8, 4], "data": x.tolist()}
        r = await rest.post(url, json={"inputs": [plain], "parameters": {"sequence_idd": 5}})
        assert r.status_code == 400
        assert "unknown request parameter(s) 'sequence_idd'" in r.json()["error"]
        r = await rest.post(
            url, json={"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        )
        assert (r.status_code, "must be FP32" in r.json()["error"]) == (400, True)
        r = await rest.get("/v2/models/nope/config")
        assert r.status_code == 404
        assert (await rest.get("/v2/health/live")).status_code == 200


def test_the_generated_inference_service_has_the_protocols_names_and_field_numbers() -> None:
    """Wire compatibility is names and numbers: spot-check the fields tritonclient relies on."""
    fields = {f.name: f.number for f in kpb.ModelInferRequest.DESCRIPTOR.fields}
    assert fields == {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5, "outputs": 6,
                      "raw_input_contents": 7}  # fmt: skip
    assert {f.name: f.number for f in kpb.ModelInferResponse.DESCRIPTOR.fields}["raw_output_contents"] == 6
    assert {f.name: f.number for f in kpb.ModelStreamInferResponse.DESCRIPTOR.fields} == {
        "error_message": 1, "infer_response": 2}  # fmt: skip
    assert kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == "inference.GRPCInferenceService"


def infer_request(x: np.ndarray, sid: str | None = None, start: bool = False, end: bool = False) -> Any:
    req = kpb.ModelInferRequest(model_name=MODEL, raw_input_contents=[x.astype("<f4").tobytes()])
    req.inputs.add(name="x", datatype="FP32", shape=[1, *x.shape])
    if sid is not None:
        req.parameters["sequence_id"].string_param = sid
        req.parameters["sequence_start"].bool_param = start
        req.parameters["sequence_end"].bool_param = end
    return req


async def test_a_v2_stream_batches_its_sequences_with_native_steps_and_ends_on_error_when_asked(
    make_server: ServerFactory, weather: np.ndarray
) -> None:
    """Sixteen sequences on one ModelStreamInfer stream and sixteen native sessions stepped at the same time run
    in shared batches (fewer batches than calls); with `triton_grpc_error: true` the first failed request ends
    the stream with its status instead of an in-band error_message."""
    srv = await make_server(max_queue_delay_ms=5)
    x = weather[:16].astype(np.float32)
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest,
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch,
    ):
        v2 = kpb_grpc.GRPCInferenceServiceStub(ch)
        for i in range(16):
            await rest.post("/v1/sessions", json={"model": MODEL, "session_id": f"native-{i}"})
        before = sample(srv, "lstm_batch_size_count", model=f"{MODEL}/1")

        async def v2_stream() -> list[Any]:
            async def requests():  # type: ignore[no-untyped-def]
                for i in range(16):
                    yield infer_request(x[i : i + 1], f"v2-{i}", start=True, end=True)

            return [r async for r in v2.ModelStreamInfer(requests())]

        native = [
            rest.post(f"/v1/sessions/native-{i}/steps", json={"inputs": x[i : i + 1].tolist()}) for i in range(16)
        ]
        replies, *answers = await asyncio.gather(v2_stream(), *native)
        assert all(a.status_code == 200 for a in answers)
        assert [r.error_message for r in replies] == [""] * 16
        for i, r in enumerate(replies):
            np.testing.assert_allclose(np.frombuffer(r.infer_response.raw_output_contents[0], "<f4"),
                                       reference_run(x[i : i + 1])[0], atol=ATOL)  # fmt: skip
        assert sample(srv, "lstm_batch_size_count", model=f"{MODEL}/1") - before < 32

        async def failing():  # type: ignore[no-untyped-def]
            yield infer_request(x[:2], "strict-1", start=True)
            yield infer_request(x[:2], "never-started")
            yield infer_request(x[2:4], "strict-1")

        call = v2.ModelStreamInfer(failing(), metadata=(("triton_grpc_error", "true"),))
        got: list[Any] = []

        async def read() -> None:
            async for r in call:
                got.append(r)

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must specify the START flag" in (err.value.details() or "")
        assert len(got) == 1


async def test_bad_requests_are_refused_fast_and_a_failed_start_keeps_the_open_sequence(
    make_server: ServerFactory, weather: np.ndarray
) -> None:
    """Shapes with a zero, huge or overflowing dimension and non-FP32 data are 400s at once; a START that fails
    leaves the sequence that was open under its id exactly as it was, and a START+END that fails leaves none;
    7, 7.0 and "7" name one sequence; a draining server's model is not ready (503)."""
    srv = await make_server()
    x = weather[:3].astype(np.float32)
    url = f"/v2/models/{MODEL}/infer"

    def body(shape: list[int], data: list[Any], **params: Any) -> dict[str, Any]:
        return {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": data}], "parameters": params}

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest:
        for shape, data in (([1000000, 1, 0], []), ([4294967296, 4294967296], []), ([1, 5000, 4], [0.0] * 20000)):
            r = await asyncio.wait_for(rest.post(url, json=body(shape, data)), 5)
            assert r.status_code == 400, (shape, r.text)
        r = await rest.post(url, json={"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 4],
                                                   "data": [99999999999, 0, 0, 0]}]})  # fmt: skip
        assert (r.status_code, "must be FP32" in r.json()["error"]) == (400, True)

        r = await rest.post(url, json=body([3, 4], x.tolist(), sequence_id=7, sequence_start=True))
        assert r.status_code == 200, r.text
        before = (await rest.get("/v1/sessions/7/state")).json()
        r = await rest.post(url, json=body([1, 3], [0.0, 0.0, 0.0], sequence_id=7, sequence_start=True))
        assert r.status_code == 400
        assert (await rest.get("/v1/sessions/7/state")).json() == before  # NOTE: the failed START took nothing
        r = await rest.post(url, json=body([1, 4], [0.0] * 4, sequence_id=7.0))
        assert (r.status_code, r.json()["parameters"]["sequence_steps"]) == (200, 4)
        r = await rest.post(url, json=body([1, 4], [0.0] * 4, sequence_id="7", sequence_end=True))
        assert (r.status_code, r.json()["parameters"]["sequence_steps"]) == (200, 5)
        r = await rest.post(url, json=body([1, 3], [0.0] * 3, sequence_id=8, sequence_start=True, sequence_end=True))
        assert r.status_code == 400
        assert (await rest.get("/v1/sessions/8")).status_code == 404
        assert await srv.store.count() == 0
        srv.dataplane.begin_drain()
        r = await rest.get(f"/v2/models/{MODEL}/ready")
        assert (r.status_code, r.json()["ready"]) == (503, False)


async def test_a_cancelled_v2_stream_stops_applying_the_requests_it_had_read(
    make_server: ServerFactory, weather: np.ndarray
) -> None:
    """Many large requests of one sequence on a stream, cancelled after the first answer: the requests not yet
    run are dropped, so the sequence stops growing soon after, well short of all of them."""
    srv = await make_server()
    x = np.tile(weather[:8].astype(np.float32), (512, 1))  # 4096 steps per request
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        v2 = kpb_grpc.GRPCInferenceServiceStub(ch)
        call = v2.ModelStreamInfer()
        await call.write(infer_request(x, "long", start=True))
        for _ in range(59):
            await call.write(infer_request(x, "long"))
        await call.read()
        call.cancel()
    info = await srv.dataplane.get_session("long")

    async def steps() -> int:
        return (await srv.dataplane.get_session("long")).steps

    await asyncio.sleep(0.5)
    settled = await steps()
    await asyncio.sleep(0.5)
    assert await steps() == settled  # NOTE: nothing runs any more after the cancel
    assert settled < 60 * 4096 / 2, (info.steps, settled)


async def test_a_start_whose_step_fails_leaves_the_open_sequence_and_its_live_accuracy_as_they_were(
    make_server: ServerFactory, weather: np.ndarray
) -> None:
    """A START restarts a sequence that is still open; when the START's own step then fails (here: past its 1 µs
    timeout in the queue), the old sequence comes back exactly: state, counters and live accuracy."""
    srv = await make_server()
    url = f"/v2/models/{MODEL}/infer"

    def body(x: np.ndarray, **params: Any) -> dict[str, Any]:
        return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}],
                "parameters": params}  # fmt: skip

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest:
        r = await rest.post(url, json=body(weather[:20], sequence_id=9, sequence_start=True))
        assert r.status_code == 200, r.text
        state = (await rest.get("/v1/sessions/9/state")).json()
        info = (await rest.get("/v1/sessions/9")).json()
        assert info["live_accuracy"]["horizons"][0]["count"] == 19
        r = await rest.post(url, json=body(weather[20:21], sequence_id=9, sequence_start=True, timeout=1))
        assert r.status_code == 504, r.text
        assert (await rest.get("/v1/sessions/9/state")).json() == state
        again = (await rest.get("/v1/sessions/9")).json()
        assert (again["steps"], again["live_accuracy"]) == (info["steps"], info["live_accuracy"])
