"""Live accuracy on real servers: sessions score their own forecasts as the truth arrives, exactly as the offline
evaluation does, once per applied step, in Prometheus and per session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import httpx
import numpy as np
import pytest

from model.data import Split, forecast_origins
from model.evaluate import scores
from service.app import Server
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from tests.fixtures import SHIPPED_CARD, reference_run
from tests.integration.conftest import REDIS_URL, ServerFactory, sample

MODEL = "seattle-weather"
K = SHIPPED_CARD.horizon
TARGET = SHIPPED_CARD.features.index(SHIPPED_CARD.target)


def matrix(a: np.ndarray) -> pb.Matrix:
    a = np.atleast_2d(a)
    return pb.Matrix(rows=a.shape[0], cols=a.shape[1], data=a.reshape(-1).tolist())


def sums(info: pb.SessionInfo) -> np.ndarray:
    """[2, K] absolute error sums (model, persistence) and [K] counts from a session's live accuracy."""
    hs = info.live_accuracy.horizons
    assert [h.horizon for h in hs] == list(range(1, K + 1))
    return np.array([[h.mae * h.count if h.count else 0.0 for h in hs],
                     [h.persistence_mae * h.count if h.count else 0.0 for h in hs],
                     [h.count for h in hs]])  # fmt: skip


async def test_streaming_the_test_part_scores_what_the_offline_evaluation_scored(
    server: Server, weather: np.ndarray
) -> None:
    """Warmed on the rows before the test part, then fed the test part one day per message over a gRPC stream,
    a session's live MAE per horizon over the test origins equals the offline evaluation's on the same origins
    (the card's streaming LSTM and persistence scores, and ONNX Runtime run offline), within float rounding."""
    split = SHIPPED_CARD.dataset["split"]
    first, n = split["test"]
    origins = forecast_origins(Split(n, split["train"][1], first), K, SHIPPED_CARD.dataset["context"])
    o0, o1 = int(origins[0]), int(origins[-1])
    readings: dict[int, np.ndarray] = {}  # row r -> sums after rows [0, r] were applied
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = pb_grpc.PredictorStub(ch)
        stream = stub.Stream()
        await stream.write(pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL), inputs=matrix(weather[:first])))
        sid = (await stream.read()).session_id
        for r in range(first, n):
            await stream.write(pb.StreamRequest(inputs=matrix(weather[r])))
            reply = await stream.read()
            assert not reply.HasField("error"), reply.error
            readings[r] = sums(await stub.GetSession(pb.SessionRef(session_id=sid)))
        await stream.done_writing()
    # NOTE: horizon k scores origin t at row t + k: the origins [o0, o1] are the rows [o0 + k, o1 + k]
    got = np.array([(readings[o1 + k][:, k - 1] - readings[o0 + k - 1][:, k - 1]) for k in range(1, K + 1)]).T
    assert got[2].tolist() == [o1 - o0 + 1] * K
    live_mae, live_persistence = got[0] / got[2], got[1] / got[2]

    test = SHIPPED_CARD.metrics["test"]
    np.testing.assert_allclose(live_mae, test["lstm_streaming"]["mae_by_step"], atol=2e-4)
    np.testing.assert_allclose(live_persistence, test["persistence"]["mae_by_step"], atol=6e-5)
    y = reference_run(weather)  # NOTE: one offline ONNX Runtime run over the whole series
    actual = np.stack([weather[origins + k, TARGET] for k in range(1, K + 1)], axis=1).astype(np.float64)
    offline = scores(y[origins], actual)["mae_by_step"]
    np.testing.assert_allclose(live_mae, offline, atol=1e-4)  # NOTE: scores() rounds to 4 decimals
    persistence = np.repeat(weather[origins, TARGET][:, None], K, axis=1).astype(np.float64)
    np.testing.assert_allclose(live_persistence, np.abs(persistence - actual).mean(axis=0), rtol=1e-9)

    # the model's totals: every forecast of the session, once
    labels = {"model": MODEL, "version": "1"}
    for k in range(1, K + 1):
        total = sample(server, "lstm_forecasts_scored_total", horizon=str(k), **labels)
        assert total == n - k
        err = sample(server, "lstm_forecast_abs_error_total", horizon=str(k), **labels)
        assert err == pytest.approx(readings[n - 1][0, k - 1], rel=1e-9)
        pers = sample(server, "lstm_forecast_persistence_abs_error_total", horizon=str(k), **labels)
        assert pers == pytest.approx(readings[n - 1][1, k - 1], rel=1e-9)


@pytest.fixture
async def rest_client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as c:
        yield c


async def test_retries_are_not_scored_twice_and_reset_starts_again(
    server: Server, rest_client: httpx.AsyncClient, weather: np.ndarray
) -> None:
    """A retried seq (replayed, or refused as a conflict) scores nothing; reset empties the session's scores
    (the model's totals keep what was scored)."""
    rest = rest_client
    sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
    for seq in range(1, 11):
        r = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": weather[seq - 1 : seq].tolist(), "seq": seq})
        assert r.status_code == 200
    before = (await rest.get(f"/v1/sessions/{sid}")).json()["live_accuracy"]
    scored_before = sample(server, "lstm_forecasts_scored_total", model=MODEL, version="1", horizon="1")
    again = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": weather[9:10].tolist(), "seq": 10})
    assert again.json()["replayed"] is True
    other = await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": weather[3:4].tolist(), "seq": 10})
    assert other.status_code == 409
    after = (await rest.get(f"/v1/sessions/{sid}")).json()["live_accuracy"]
    assert after == before
    assert sample(server, "lstm_forecasts_scored_total", model=MODEL, version="1", horizon="1") == scored_before
    assert [h["count"] for h in before["horizons"]] == [max(0, 10 - k) for k in range(1, K + 1)]
    assert before["horizons"][-1]["mae"] is not None
    assert before["scored"] is True

    await rest.post(f"/v1/sessions/{sid}/reset")
    fresh = (await rest.get(f"/v1/sessions/{sid}")).json()["live_accuracy"]
    assert [(h["count"], h["mae"], h["persistence_mae"]) for h in fresh["horizons"]] == [(0, None, None)] * K
    assert sample(server, "lstm_forecasts_scored_total", model=MODEL, version="1", horizon="1") == scored_before
    model = (await rest.get(f"/v1/models/{MODEL}")).json()
    assert (model["live_scoring"], model["live_scoring_off"]) == (True, "")


async def test_scores_travel_with_the_session_between_replicas_on_redis(
    make_server: ServerFactory, prefix: str, weather: np.ndarray
) -> None:
    """Steps that alternate between two replicas sharing Redis score as if one server had seen them all."""
    a = await make_server(state_store=REDIS_URL, redis_key_prefix=prefix)
    b = await make_server(state_store=REDIS_URL, redis_key_prefix=prefix)
    one = await make_server()
    async with httpx.AsyncClient(timeout=30) as http:

        async def run(servers: list[Server]) -> dict[str, object]:
            base = [f"http://127.0.0.1:{s.http_port}" for s in servers]
            sid = (await http.post(f"{base[0]}/v1/sessions", json={"model": MODEL})).json()["session_id"]
            for i in range(30):
                url = f"{base[i % len(base)]}/v1/sessions/{sid}/steps"
                assert (await http.post(url, json={"inputs": weather[i : i + 1].tolist()})).status_code == 200
            info = (await http.get(f"{base[-1]}/v1/sessions/{sid}")).json()
            return dict(info["live_accuracy"])

        shared, alone = await run([a, b]), await run([one])
    assert [h["count"] for h in shared["horizons"]] == [30 - k for k in range(1, K + 1)]
    for s, o in zip(shared["horizons"], alone["horizons"], strict=True):  # type: ignore[call-overload]
        assert s["mae"] == pytest.approx(o["mae"], abs=1e-5)
        assert s["persistence_mae"] == pytest.approx(o["persistence_mae"], rel=1e-12)


async def test_with_live_scoring_off_nothing_is_scored_and_the_model_says_so(
    make_server: ServerFactory, weather: np.ndarray
) -> None:
    srv = await make_server(live_scoring=False)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as rest:
        sid = (await rest.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
        assert (await rest.post(f"/v1/sessions/{sid}/steps", json={"inputs": weather[:20].tolist()})).status_code == 200
        assert (await rest.get(f"/v1/sessions/{sid}")).json()["live_accuracy"] is None
        model = (await rest.get(f"/v1/models/{MODEL}")).json()
    assert model["live_scoring"] is False
    assert "--live-scoring false" in model["live_scoring_off"]
    assert sample(srv, "lstm_forecasts_scored_total", model=MODEL, version="1", horizon="1") == 0
