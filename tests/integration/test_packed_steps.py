"""Packed step batches over real gRPC: many sessions' steps as one array, on the shipped model, on both stores."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from service.client import AsyncClient, Client
from service.core.redis_store import RedisSessionStore
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from tests.fixtures import reference_run
from tests.integration.conftest import REDIS_URL, ServerFactory

ATOL = 1e-5
MODEL = "seattle-weather"


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_packed_steps_match_offline_runs_and_score_like_single_steps(
    make_server: ServerFactory, prefix: str, weather: np.ndarray, store: str
) -> None:
    """40 sessions at different days, stepped 32 days as packed blocks of one and three steps (with seq), give
    the offline runs' outputs; a twin stepped one call at a time ends with the same live accuracy."""
    extra = {"state_store": REDIS_URL, "redis_key_prefix": prefix} if store == "redis" else {}
    srv = await make_server(**extra)
    target = f"127.0.0.1:{srv.grpc_port}"
    starts = [20 * i for i in range(40)]
    async with AsyncClient(target) as c:
        ids = [(await c.create_session(MODEL)).session_id for _ in starts]
        twin = (await c.create_session(MODEL)).session_id
        outs: list[np.ndarray] = []
        t, seq = 0, 0
        while t < 30:
            n = 1 if t % 4 == 0 else 3
            seq += 1
            x = np.stack([weather[o + t : o + t + n] for o in starts])
            got = await c.step_packed(ids, x, np.full(len(ids), seq))
            assert not got.errors
            assert (got.steps == t + n).all()
            assert (got.seq == seq).all()
            assert not got.replayed.any()
            outs.append(got.outputs)
            await c.step(twin, weather[t : t + n])
            t += n
        y = np.concatenate(outs, axis=1)
        for i in (0, 17, 39):
            np.testing.assert_allclose(y[i], reference_run(weather[starts[i] : starts[i] + t]), atol=ATOL)
        packed, single = (await c.get_session(ids[0])).live_accuracy, (await c.get_session(twin)).live_accuracy
        assert packed.scored
        assert packed.horizons[0].count == t - 1
        assert packed == single


async def test_packed_rows_fail_alone_over_grpc_with_the_error_table_codes(
    stub: pb_grpc.PredictorStub, weather: np.ndarray
) -> None:
    """Rows fail alone with their code and message (unknown, repeated, NaN, seq gap); a retry replays; the
    whole request is INVALID_ARGUMENT only when it cannot be read as a block."""
    ids = [(await stub.CreateSession(pb.CreateSessionRequest(model=MODEL))).session_id for _ in range(3)]
    x = weather[:5, None, :].astype("<f4").copy()

    def packed(sids: list[str], a: np.ndarray, seq: list[int]) -> pb.StepBatchRequest:
        return pb.StepBatchRequest(
            packed=pb.PackedSteps(session_ids=sids, steps=a.shape[1], inputs=a.tobytes(), seq=seq)
        )

    first = (await stub.StepBatch(packed(ids, x[:3], [1, 1, 1]))).packed
    assert (list(first.failed), list(first.seq), first.steps, first.outputs) == ([], [1, 1, 1], 1, 7)
    x[4, 0, 1] = np.nan
    r = (await stub.StepBatch(packed([ids[0], ids[1], "nobody", ids[0], ids[2]], x, [1, 3, 0, 0, 0]))).packed
    errors = {i: (e.code, e.message) for i, e in zip(r.failed, r.errors, strict=True)}
    assert {i: code for i, (code, _) in errors.items()} == {
        1: "seq_conflict", 2: "session_not_found", 3: "invalid_input", 4: "invalid_input"
    }  # fmt: skip
    assert "expected seq 2" in errors[1][1]
    assert "in this step batch already" in errors[3][1]
    assert "must be finite" in errors[4][1]
    assert "NaN" in errors[4][1]
    data = np.frombuffer(r.data, "<f4").reshape(5, 1, 7)
    np.testing.assert_array_equal(data[0], np.frombuffer(first.data, "<f4").reshape(3, 1, 7)[0])
    assert (list(r.replayed), list(r.total_steps), list(r.seq)) == (
        [True] + [False] * 4,
        [1, 0, 0, 0, 0],
        [1] + [0] * 4,
    )
    for bad, why in [
        (pb.StepBatchRequest(packed=pb.PackedSteps(session_ids=ids, steps=1, inputs=b"\0" * 10)), "whole number"),
        (pb.StepBatchRequest(packed=pb.PackedSteps(session_ids=ids, steps=0, inputs=b"")), "steps must be >= 1"),
        (packed(ids, x[:3], [1, 2]), "2 values for 3 sessions"),
        (pb.StepBatchRequest(packed=pb.PackedSteps(session_ids=[], steps=1)), "empty"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.StepBatch(bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
        assert why in (e.value.details() or "")
    both = packed(ids, x[:3], [])
    both.steps.add(session_id=ids[0], inputs=pb.Matrix(rows=1, cols=4, data=[0.0] * 4))
    with pytest.raises(grpc.aio.AioRpcError, match="not both"):
        await stub.StepBatch(both)
    wide = np.zeros((3, 1, 5), "<f4")  # NOTE: 5 features for a model of 4: every row says so
    r = (await stub.StepBatch(packed(ids, wide, []))).packed
    assert list(r.failed) == [0, 1, 2]
    assert "feature values" in r.errors[0].message
    for sid in ids:
        assert (await stub.GetSession(pb.SessionRef(session_id=sid))).steps == 1


async def test_the_sync_client_steps_many_sessions_packed_over_a_real_server(
    make_server: ServerFactory, weather: np.ndarray
) -> None:
    srv = await make_server()

    def run() -> None:
        with Client(f"127.0.0.1:{srv.grpc_port}") as c:
            ids = [c.create_session(MODEL).session_id for _ in range(5)]
            got = c.step_packed(ids, np.stack([weather[:4]] * 5))
            np.testing.assert_allclose(got.outputs[4], reference_run(weather[:4]), atol=ATOL)
            assert got.steps.tolist() == [4] * 5
            assert not got.errors

    await asyncio.to_thread(run)


async def test_step_batches_of_many_sessions_over_rest_and_grpc_items_match_offline_runs(
    stub: pb_grpc.PredictorStub, rest: httpx.AsyncClient, weather: np.ndarray
) -> None:
    """Twelve sessions stepped by item-form batches (alternately REST /v1/steps on one keep-alive connection and
    gRPC StepBatch items, which run as blocks) give the offline runs' outputs; a bad id fails alone."""
    starts = [30 * i for i in range(12)]
    sids = [(await stub.CreateSession(pb.CreateSessionRequest(model=MODEL))).session_id for _ in starts]
    outs: list[list[np.ndarray]] = [[] for _ in starts]
    for t in range(8):
        if t % 2:
            steps = [
                {"session_id": s, "inputs": [weather[o + t].tolist()], "seq": t + 1}
                for s, o in zip(sids, starts, strict=True)
            ]
            body = {"steps": [*steps, {"session_id": "no such", "inputs": [[0, 0, 0, 0]]}]}
            results = (await rest.post("/v1/steps", json=body)).json()["results"]
            assert results[-1]["error"]["code"] == "invalid_input"
            for k, res in enumerate(results[:-1]):
                outs[k].append(np.asarray(res["result"]["outputs"], np.float32))
        else:
            reply = await stub.StepBatch(
                pb.StepBatchRequest(
                    steps=[
                        pb.StepRequest(
                            session_id=s,
                            inputs=pb.Matrix(rows=1, cols=4, data=weather[o + t].tolist()),
                            seq=t + 1,
                        )
                        for s, o in zip(sids, starts, strict=True)
                    ]
                )
            )
            for k, res in enumerate(reply.results):
                assert res.response.seq == t + 1
                outs[k].append(np.asarray(res.response.outputs.data, np.float32).reshape(1, 7))
    for k, o in enumerate(starts):
        np.testing.assert_allclose(np.concatenate(outs[k]), reference_run(weather[o : o + 8]), atol=ATOL)


async def test_a_packed_batch_on_redis_looks_its_sessions_up_in_one_round_trip(
    make_server: ServerFactory, prefix: str, weather: np.ndarray
) -> None:
    """With two models served, a packed batch finds each session's model with one MGET for all rows, not one per
    row: 1,024 rows took 0.34 s that way, and the number of Redis calls grew with the rows."""
    srv = await make_server(state_store=REDIS_URL, redis_key_prefix=prefix)
    assert len(srv.dataplane.list_models()) > 1  # NOTE: with one model served no lookup is needed at all
    assert isinstance(srv.store, RedisSessionStore)
    client, calls = srv.store.redis, []

    def counting(real: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            calls.append(args)
            return real(*args, **kw)

        return call

    # NOTE: this server's own reads (a lookup is a GET or an MGET), not the shared Redis's command counts
    client.get, client.mget = counting(client.get), counting(client.mget)  # type: ignore[method-assign]
    async with AsyncClient(f"127.0.0.1:{srv.grpc_port}") as c:
        ids = [(await c.create_session(MODEL)).session_id for _ in range(64)]
        calls.clear()
        got = await c.step_packed(ids, np.stack([weather[i : i + 1] for i in range(64)]))
        assert not got.errors
        assert len(calls) == 1
        await c.delete_session(ids[5])
        calls.clear()
        got = await c.step_packed(ids, np.stack([weather[i : i + 1] for i in range(64)]))
        assert sorted(got.errors) == [5]  # NOTE: the deleted row fails alone and says so
        assert "deleted" in got.errors[5].message
        assert len(calls) == 2  # NOTE: and why it is gone, for all missing rows at once
