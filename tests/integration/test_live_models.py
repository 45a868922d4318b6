"""The live model repository: a new version copied in while clients stream goes live without a restart (old
sessions keep their version and outputs, new ones get the new version, nothing fails); a half-written or broken
version is refused and the old one keeps serving; unloading is refused while sessions need a version, unless
forced, and forced unloads end those sessions with a clear error. The repository API takes names only."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.grpc._generated.inference import grpc_service_pb2 as kpb
from service.grpc._generated.inference import grpc_service_pb2_grpc as kpb_grpc
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from tests.conftest import ROOT, SHIPPED_MODEL
from tests.integration.conftest import ServerFactory, sample, until

MODEL = "seattle-weather"
ATOL = 1e-5


def offline(path: Path, x: np.ndarray) -> np.ndarray:
    """One ONNX Runtime run of a model file over a whole [T, F] sequence from a zero state."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"x": x[None].astype(np.float32)}
    for i in sess.get_inputs()[1:]:
        feeds[i.name] = np.zeros((i.shape[0], 1, i.shape[2]), np.float32)
    return np.asarray(sess.run(["y"], feeds)[0][0])


def other_model(out: Path) -> Path:
    """A different model with the shipped model's sizes (F=4, O=7), exported by a user's own script."""
    card = __import__("json").loads((SHIPPED_MODEL / "model.json").read_text())
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "export_your_own.py"), "--out", str(out / "model.onnx"),
         "--features", "4", "--outputs", "7", "--layers", str(card["num_layers"]), "--hidden",
         str(card["hidden_size"]), "--seed", "5"],
        check=True, capture_output=True,
    )  # fmt: skip
    return out / "model.onnx"


async def _settled(reason: Any) -> str:
    """The reason a broken version gives once a poll has tried it (after its files settled)."""
    for _ in range(300):
        got: str = await reason()
        if got.startswith(f"{MODEL}/3:"):
            return got
        await asyncio.sleep(0.05)
    raise AssertionError("the broken version was never tried")


def copy_in(staging: Path, target: Path) -> None:
    """Copy a version in as the README says: into a hidden staging directory, then one rename."""
    tmp = target.parent / f".{target.name}.incoming"
    shutil.copytree(staging, tmp)
    tmp.rename(target)


async def test_a_version_copied_in_while_clients_stream_goes_live_and_a_broken_one_never_replaces_it(
    make_server: ServerFactory, weather: np.ndarray, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(SHIPPED_MODEL, repo / MODEL / "1")
    staged = tmp_path / "staged"
    v2_file = other_model(staged)
    srv = await make_server(models=repo, model_poll_s=0.1)
    x = weather[100:160].astype(np.float32)
    want_v1, want_v2 = offline(repo / MODEL / "1" / "model.onnx", x), offline(v2_file, x)
    assert not np.allclose(want_v1, want_v2, atol=1e-3)  # NOTE: the versions really differ
    loaded = asyncio.Event()

    async def stream_on_v1(ch: grpc.aio.Channel) -> np.ndarray:
        """A stream opened before the new version, stepping through it: it keeps version 1 throughout."""
        stub = pb_grpc.PredictorStub(ch)
        sent = asyncio.Queue[int]()

        async def messages():  # type: ignore[no-untyped-def]
            yield pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL))
            for t in range(len(x)):
                if t == 20:
                    await loaded.wait()  # NOTE: the second half runs after version 2 is live
                yield pb.StreamRequest(inputs=pb.Matrix(rows=1, cols=4, data=x[t].tolist()))
                await sent.get()

        rows = []
        async for r in stub.Stream(messages()):
            assert not r.HasField("error"), r.error.message
            if r.HasField("session"):
                assert r.session.version == "1"
            if r.HasField("outputs"):
                rows.append(list(r.outputs.data))
                sent.put_nowait(1)
        return np.asarray(rows)

    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest,
    ):
        streams = [asyncio.ensure_future(stream_on_v1(ch)) for _ in range(4)]
        await until(lambda: sample(srv, "lstm_sessions_open", model=f"{MODEL}/1"), equals=4.0)
        # a half-written version 3 (truncated file) is refused and does not disturb version 1
        (repo / MODEL / "3").mkdir()
        (repo / MODEL / "3" / "model.onnx").write_bytes(v2_file.read_bytes()[:2000])
        copy_in(staged, repo / MODEL / "2")
        await until(lambda: [m.version for m in srv.repo.versions(MODEL)], within=15, equals=["1", "2"])
        loaded.set()

        async def reason_of_3() -> str:
            index = (await rest.post("/v2/repository/index")).json()
            return str(next(e["reason"] for e in index if e["version"] == "3"))

        await _settled(reason_of_3)
        index = (await rest.post("/v2/repository/index")).json()
        states = {e["version"]: e for e in index}
        assert (states["1"]["state"], states["2"]["state"], states["3"]["state"]) == ("READY", "READY", "UNAVAILABLE")
        assert "cannot load model.onnx" in states["3"]["reason"]
        r = await rest.post("/v1/sessions", json={"model": MODEL})
        assert r.json()["version"] == "2"  # NOTE: new sessions get the newest that serves
        sid = r.json()["session_id"]
        got = (await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": x.tolist()})).json()["outputs"]
        np.testing.assert_allclose(got, want_v2, atol=ATOL)
        for s in await asyncio.gather(*streams):
            np.testing.assert_allclose(s, want_v1, atol=ATOL)  # NOTE: version 1 throughout, nothing failed
        # the broken version 3 is fixed in place: the next poll that sees its files changed loads it
        shutil.copy(v2_file, repo / MODEL / "3" / "model.onnx")
        await until(lambda: [m.version for m in srv.repo.versions(MODEL)], within=15, equals=["1", "2", "3"])
    assert sample(srv, "lstm_requests_total", protocol="grpc", method="Stream", code="OK") == 4


async def test_unload_is_refused_while_sessions_need_a_version_and_forced_unload_ends_them_clearly(
    make_server: ServerFactory, weather: np.ndarray, tmp_path: Path
) -> None:
    """REST and gRPC repository calls: load by name (parameters refused), unload refused with open sessions (409
    / FAILED_PRECONDITION) and for the last model; forced, the session's next step says it was unloaded, and a
    reset moves a pinned session to the newest version. No path or traversal is taken as a name."""
    repo = tmp_path / "models"
    shutil.copytree(SHIPPED_MODEL, repo / MODEL / "1")
    srv = await make_server(models=repo, model_poll_s=0)
    x = weather[:5].astype(np.float32)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest,
    ):
        v2 = kpb_grpc.GRPCInferenceServiceStub(ch)
        other_model(repo / MODEL / "2")
        index = await v2.RepositoryIndex(kpb.RepositoryIndexRequest())
        assert [(m.version, m.state) for m in index.models] == [("1", "READY"), ("2", "UNAVAILABLE")]
        r = await rest.post(f"/v2/repository/models/{MODEL}/load", json={"parameters": {"file:2/model.onnx": "AAAA"}})
        assert (r.status_code, "load takes no parameters" in r.json()["error"]) == (400, True)
        await v2.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=MODEL))
        assert [m.version for m in srv.repo.versions(MODEL)] == ["1", "2"]
        for name in ("..", "../models", "seattle-weather/1", "%2e%2e"):
            r = await rest.post(f"/v2/repository/models/{name}/load")
            assert r.status_code in (400, 404), (name, r.status_code)

        await rest.post("/v1/sessions", json={"model": MODEL, "version": "1", "session_id": "pinned"})
        await rest.post("/v1/sessions", json={"model": MODEL, "version": "1", "session_id": "ends"})
        r = await rest.post(f"/v2/repository/models/{MODEL}/unload", json={"parameters": {"version": "1"}})
        assert (r.status_code, r.json()["code"]) == (409, "model_in_use")
        assert "2 open session(s)" in r.json()["error"]
        reset = (await rest.post("/v1/sessions/pinned/reset")).json()
        assert reset["version"] == "2"  # NOTE: a reset ends the pinning
        req = kpb.RepositoryModelUnloadRequest(model_name=MODEL)
        req.parameters["version"].string_param = "1"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await v2.RepositoryModelUnload(req)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        req.parameters["force"].bool_param = True
        await v2.RepositoryModelUnload(req)
        assert [m.version for m in srv.repo.versions(MODEL)] == ["2"]
        r = await rest.post("/v1/sessions/ends/steps", json={"inputs": x.tolist()})
        assert r.status_code == 404
        assert "its model version was unloaded" in r.json()["error"]
        r = await rest.post("/v1/sessions/pinned/steps", json={"inputs": x.tolist()})
        np.testing.assert_allclose(r.json()["outputs"], offline(repo / MODEL / "2" / "model.onnx", x), atol=ATOL)
        assert sample(srv, "lstm_sessions_removed_total", model=f"{MODEL}/1", reason="unloaded") == 1
        r = await rest.post(f"/v2/repository/models/{MODEL}/unload", json={"parameters": {"force": True}})
        assert (r.status_code, "last model" in r.json()["error"]) == (409, True)
        index_after: Any = (await rest.post("/v2/repository/index", json={"ready": True})).json()
        assert index_after == [{"name": MODEL, "version": "2", "state": "READY", "reason": ""}]


async def test_polling_leaves_an_unloaded_version_alone_and_a_broken_directory_blocks_no_other(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """An API unload is not undone by the next poll (a load brings the version back); a model.json that is not
    even text fails its own version only, with the reason in the index, and the versions after it load."""
    repo = tmp_path / "models"
    shutil.copytree(SHIPPED_MODEL, repo / MODEL / "1")
    other_model(repo / "other" / "1")
    srv = await make_server(models=repo, model_poll_s=0.1)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest:
        assert (await rest.post("/v2/repository/models/other/unload")).status_code == 200
        (repo / "aaa" / "1").mkdir(parents=True)
        shutil.copy(repo / "other" / "1" / "model.onnx", repo / "aaa" / "1" / "model.onnx")
        (repo / "aaa" / "1" / "model.json").write_bytes(b"\xff\xfe not utf-8")
        other_model(repo / "zzz" / "1")
        await until(lambda: "zzz" in srv.repo.names(), within=15)
        assert "other" not in srv.repo.names()  # NOTE: still unloaded, several polls later
        index = {(e["name"], e["version"]): e for e in (await rest.post("/v2/repository/index")).json()}
        assert index[("other", "1")]["reason"].startswith("unloaded")
        assert "aaa/1: cannot read model.json" in index[("aaa", "1")]["reason"]
        r = await rest.post("/v2/repository/models/aaa/load")
        assert (r.status_code, r.json()["code"]) == (400, "model_load_failed")
        assert (await rest.post("/v2/repository/models/other/load")).json()["loaded"] == ["1"]


async def test_loads_and_unloads_racing_with_sessions_on_redis_give_no_server_error(
    make_server: ServerFactory, tmp_path: Path, prefix: str
) -> None:
    """Sessions created and deleted while a second model is loaded and unloaded over and over (the Redis store
    yields on every count): every answer is a success or a documented error, never a 500; two unloads of one
    version at once: one unloads, the other is told it is not there."""
    from tests.integration.conftest import REDIS_URL

    repo = tmp_path / "models"
    shutil.copytree(SHIPPED_MODEL, repo / MODEL / "1")
    other_model(repo / "other" / "1")
    srv = await make_server(models=repo, model_poll_s=0, state_store=REDIS_URL, redis_key_prefix=prefix)
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest:

        async def sessions() -> None:
            for _ in range(60):
                r = await rest.post("/v1/sessions", json={"model": MODEL})
                statuses.append(r.status_code)
                if r.status_code == 201:
                    statuses.append((await rest.delete(f"/v1/sessions/{r.json()['session_id']}")).status_code)

        async def cycles() -> None:
            for _ in range(6):
                statuses.append((await rest.post("/v2/repository/models/other/unload")).status_code)
                statuses.append((await rest.post("/v2/repository/models/other/load")).status_code)

        await asyncio.gather(sessions(), sessions(), cycles())
        assert set(statuses) <= {200, 201}, statuses
        twice = await asyncio.gather(*(rest.post("/v2/repository/models/other/unload") for _ in range(2)))
        assert sorted(r.status_code for r in twice) == [200, 404]
