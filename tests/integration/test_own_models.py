"""Models a user exported with their own PyTorch code (examples/export_your_own.py, no card, no trainer): an LSTM
and a GRU are served, batched, snapshotted and moved between replicas like the shipped model; graphs that break
the explicit-state contract are refused with what to change."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import warnings
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from service.repository import ModelLoadError, ModelRepository
from tests.conftest import ROOT
from tests.integration.conftest import REDIS_URL, ServerFactory

ATOL = 1e-5
F, O, L, H = 3, 5, 2, 16  # noqa: E741


def export(repo: Path, name: str, cell: str, seed: int = 0, version: str = "1") -> Path:
    """Run the example script as a user would."""
    out = repo / name / version / "model.onnx"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "export_your_own.py"), "--out", str(out), "--cell", cell,
         "--features", str(F), "--outputs", str(O), "--layers", str(L), "--hidden", str(H), "--seed", str(seed)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def offline(path: Path, x: np.ndarray) -> np.ndarray:
    """One ONNX Runtime run over a whole [T, F] sequence from a zero state, as the user's own code would do it."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"x": x[None].astype(np.float32), "h0": np.zeros((L, 1, H), np.float32)}
    if "c0" in {i.name for i in sess.get_inputs()}:
        feeds["c0"] = np.zeros((L, 1, H), np.float32)
    return np.asarray(sess.run(["y"], feeds)[0][0])


@pytest.fixture(scope="module")
def own_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("own")
    export(repo, "my-lstm", "lstm", seed=1)
    export(repo, "my-gru", "gru", seed=2)
    return repo


@pytest.mark.parametrize("name", ["my-lstm", "my-gru"])
async def test_a_cardless_torch_lstm_or_gru_is_served_over_rest_and_grpc_and_matches_onnx_runtime(
    make_server: ServerFactory, own_repo: Path, name: str
) -> None:
    """Names come from the graph (x0.., y0..); steps in pieces over REST, a gRPC stream and a stateless predict
    all equal one offline run of the user's file."""
    srv = await make_server(models=own_repo)
    x = np.random.default_rng(7).standard_normal((12, F)).astype(np.float32)
    want = offline(own_repo / name / "1" / "model.onnx", x)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest:
        meta = (await rest.get(f"/v1/models/{name}")).json()
        assert (meta["features"], meta["outputs"]) == ([f"x{i}" for i in range(F)], [f"y{i}" for i in range(O)])
        assert meta["live_scoring"] is False  # NOTE: no card, no target: nothing to score forecasts against
        assert "names no target" in meta["live_scoring_off"]
        sid = (await rest.post("/v1/sessions", json={"model": name})).json()["session_id"]
        got = []
        for part in (x[:1], x[1:7], x[7:]):
            r = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": part.tolist()})
            assert r.status_code == 200, r.text
            got.extend(r.json()["outputs"])
        np.testing.assert_allclose(np.asarray(got), want, atol=ATOL)
        assert (await rest.get(f"/v1/sessions/{sid}")).json()["live_accuracy"] is None
        r = await rest.post(f"/v1/models/{name}/predict", json={"inputs": x.tolist()})
        np.testing.assert_allclose(np.asarray(r.json()["outputs"]), want, atol=ATOL)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = pb_grpc.PredictorStub(ch)

        async def messages():  # type: ignore[no-untyped-def]
            yield pb.StreamRequest(open=pb.CreateSessionRequest(model=name))
            for row in x:
                yield pb.StreamRequest(inputs=pb.Matrix(rows=1, cols=F, data=row.tolist()))

        replies = [r async for r in stub.Stream(messages())]
        got = np.asarray([list(r.outputs.data) for r in replies[1:]])
        np.testing.assert_allclose(got, want, atol=ATOL)


async def test_gru_sessions_batch_together_and_move_between_replicas_by_snapshot_and_through_redis(
    make_server: ServerFactory, own_repo: Path, prefix: str
) -> None:
    """Sixteen GRU sessions stepped at once run in shared batches; a snapshot (h, and an empty c) exported from
    one replica and imported into another continues exactly; on a shared Redis a session stepped on one replica
    continues on the other."""
    a = await make_server(models=own_repo, state_store=REDIS_URL, redis_key_prefix=prefix, max_queue_delay_ms=5)
    b = await make_server(models=own_repo, state_store=REDIS_URL, redis_key_prefix=prefix)
    c = await make_server(models=own_repo)
    x = np.random.default_rng(3).standard_normal((16, 6, F)).astype(np.float32)
    path = own_repo / "my-gru" / "1" / "model.onnx"
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{a.http_port}", timeout=30) as ra,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{b.http_port}", timeout=30) as rb,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{c.http_port}", timeout=30) as rc,
    ):
        ids = [f"gru-{i}" for i in range(16)]
        for sid in ids:
            assert (await ra.post("/v1/sessions", json={"model": "my-gru", "session_id": sid})).status_code == 201
        firsts = await asyncio.gather(
            *(ra.post(f"/v1/sessions/{sid}/steps", json={"inputs": x[i, :3].tolist()}) for i, sid in enumerate(ids))
        )
        assert all(r.status_code == 200 for r in firsts), [
            (r.status_code, r.text) for r in firsts if r.status_code != 200
        ]
        batches = a.metrics.registry.get_sample_value("lstm_batch_size_count", {"model": "my-gru/1"}) or 0
        assert batches < 16  # NOTE: some of the sixteen shared a batch
        snap = (await ra.get("/v1/sessions/gru-0/state")).json()
        assert np.asarray(snap["h"]).shape == (L, H)
        assert snap["c"] in ([], [[]] * L)
        assert (await rc.post("/v1/sessions/moved/state", json=snap)).status_code == 200
        for i, sid, client in ((0, "moved", rc), (1, "gru-1", rb)):
            r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": x[i, 3:].tolist()})
            assert r.status_code == 200, r.text
            got = np.concatenate([np.asarray(firsts[i].json()["outputs"]), np.asarray(r.json()["outputs"])])
            np.testing.assert_allclose(got, offline(path, x[i]), atol=ATOL)
        for sid in ids:
            await ra.delete(f"/v1/sessions/{sid}")


def _export_raw(path: Path, names_in: list[str], names_out: list[str], dynamic: bool) -> None:
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(F, H, L, batch_first=True)

        def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> tuple[torch.Tensor, ...]:
            y, (hn, cn) = self.lstm(x, (h0, c0))
            return y, hn, cn

    path.parent.mkdir(parents=True, exist_ok=True)
    z = torch.zeros(L, 1, H)
    axes = {"x": {0: "B", 1: "T"}, "y": {0: "B", 1: "T"}, **{n: {1: "B"} for n in ("h0", "c0", "hn", "cn")}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(M(), (torch.zeros(1, 2, F), z, z), str(path), dynamo=False, input_names=names_in,
                          output_names=names_out, dynamic_axes=axes if dynamic else None)  # fmt: skip


def test_graphs_that_break_the_explicit_state_contract_are_refused_with_what_to_change(tmp_path: Path) -> None:
    """Wrong tensor names and a fixed batch size are load errors that name the model and say what to change."""
    _export_raw(tmp_path / "named" / "1" / "model.onnx", ["input", "h", "c"], ["output", "h_out", "c_out"], True)
    with pytest.raises(ModelLoadError, match=r"named/1: .*inputs \['c', 'h', 'input'\].*input_names/output_names"):
        ModelRepository.load(tmp_path)
    (tmp_path / "named" / "1" / "model.onnx").unlink()
    _export_raw(tmp_path / "fixed" / "1" / "model.onnx", ["x", "h0", "c0"], ["y", "hn", "cn"], False)
    with pytest.raises(ModelLoadError, match=r"fixed/1: .*fixed batch size 1; make B a dynamic axis"):
        ModelRepository.load(tmp_path)


def test_lstm_serve_card_writes_names_into_a_users_file_and_the_server_serves_them(
    own_repo: Path, tmp_path: Path
) -> None:
    """`lstm-serve card` writes feature and output names into the file (and model.json); a count that does not
    match the graph is refused and the file is left as it was."""
    import shutil

    shutil.copytree(own_repo / "my-lstm", tmp_path / "named")
    path = tmp_path / "named" / "1" / "model.onnx"
    cmd = [sys.executable, "-m", "service.cli", "card", str(path)]
    bad = subprocess.run([*cmd, "--features", "a,b"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert "takes 3 features" in bad.stderr
    assert ModelRepository.load(tmp_path).get("named").card.derived
    ok = subprocess.run([*cmd, "--features", "a,b,c", "--target", "a"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    (path.parent / "model.json").unlink()  # NOTE: the card is inside the file now
    named = ModelRepository.load(tmp_path).get("named")
    card = named.card
    assert (card.features, card.targets[0], card.derived) == (["a", "b", "c"], "a[t+1]", False)
    assert named.scoring is not None  # NOTE: with a target among its inputs, its sessions score their forecasts
    assert (named.scoring.target_index, named.scoring.horizon) == (0, O)
