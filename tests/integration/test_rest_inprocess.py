"""The REST app in-process (httpx ASGI transport, no socket) over the real model and DataPlane."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.core.dataplane import DataPlane, Limits
from service.core.sessions import MemorySessionStore
from service.metrics import Metrics
from service.repository import ModelRepository
from service.rest.app import create_app
from tests.conftest import SHIPPED_REPO
from tests.fixtures import SHIPPED_CARD, reference_run
from tests.integration.conftest import ServerFactory

SHIPPED_H = SHIPPED_CARD.hidden_size  # H of the shipped model (its card says)


@pytest.fixture
async def client(daily_repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    repo = ModelRepository.load(daily_repo)  # NOTE: one model, so that the OpenAPI document states its dimensions
    store = MemorySessionStore({m.key: m.signature for m in repo.all()}, ttl=60, max_sessions=10)
    metrics = Metrics()
    dp = DataPlane(repo, store, metrics, Limits())
    await dp.start()
    app = create_app(dp, metrics, max_body_bytes=1024 * 1024)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://in-process") as c:
        yield c
    await dp.stop()


async def test_session_steps_in_process_match_offline_run(client: httpx.AsyncClient, weather: np.ndarray) -> None:
    """Create, step in chunks, read and delete a session without any network; outputs match the offline run."""
    x = weather[10:40]
    sid = (await client.post("/v1/sessions", json={"model": "seattle-weather"})).json()["session_id"]
    outs = []
    for i in range(0, 30, 10):
        r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": x[i : i + 10].tolist()})
        outs.append(np.asarray(r.json()["outputs"], np.float32))
    np.testing.assert_allclose(np.concatenate(outs), reference_run(x), atol=1e-5)
    assert (await client.get(f"/v1/sessions/{sid}")).json()["steps"] == 30
    assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 200
    r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": x[:1].tolist()})
    assert (r.status_code, r.json()["code"]) == (404, "session_not_found")


async def test_with_both_shipped_models_the_document_lists_both_and_leaves_their_dimensions_open() -> None:
    """The shipped repository serves two models of different F and H: the OpenAPI document names both and
    states no row width or state shape that one of them would refuse."""
    repo = ModelRepository.load(SHIPPED_REPO)
    store = MemorySessionStore({m.key: m.signature for m in repo.all()}, ttl=60, max_sessions=10)
    metrics = Metrics()
    dp = DataPlane(repo, store, metrics, Limits())
    schema = create_app(dp, metrics, max_body_bytes=1024 * 1024).openapi()
    bodies = schema["components"]["schemas"]
    assert bodies["CreateSessionBody"]["properties"]["model"]["enum"] == ["seattle-temps", "seattle-weather"]
    row = bodies["StepBody"]["properties"]["inputs"]["items"]
    assert "maxItems" not in row
    assert row["minItems"] == 1
    assert "maxItems" not in bodies["SnapshotBody"]["properties"]["h"].get("items", {})
    # NOTE: an example per model, in the same order: a session of each takes the row of its example
    assert bodies["CreateSessionBody"]["examples"] == [{"model": "seattle-temps"}, {"model": "seattle-weather"}]
    assert bodies["StepBody"]["examples"] == [{"inputs": [[0.0]]}, {"inputs": [[0.0, 0.0, 0.0, 0.0]]}]


async def test_models_and_readiness_in_process(client: httpx.AsyncClient) -> None:
    """The model list, model details and readiness answer in-process."""
    models = (await client.get("/v1/models")).json()["models"]
    assert [m["name"] for m in models] == ["seattle-weather"]
    assert models[0]["features"] == ["precipitation", "temp_max", "temp_min", "wind"]
    assert (
        models[0]["card"]["metrics"]["test"]["lstm"]["mae_h1"] < models[0]["card"]["metrics"]["test"]["ridge"]["mae_h1"]
    )
    assert (await client.get("/readyz")).json()["status"] == "ready"


async def test_openapi_states_the_constraints_the_server_enforces(make_server: ServerFactory, daily_repo: Path) -> None:
    """Session ids (pattern, 1-128 characters), at least one step of at least one value, the served model names
    and valid examples are in the document, so that conforming clients and generators are not refused."""
    server = await make_server(models=daily_repo)
    schema = server.rest_app.openapi()
    bodies = schema["components"]["schemas"]
    sid = bodies["CreateSessionBody"]["properties"]["session_id"]
    assert (sid["pattern"], sid["maxLength"], sid["minLength"]) == ("^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", 128, 1)
    assert bodies["CreateSessionBody"]["properties"]["model"]["enum"] == ["seattle-weather"]
    steps = bodies["StepBody"]["properties"]["inputs"]
    assert (steps["minItems"], steps["items"]["minItems"], steps["items"]["maxItems"]) == (1, 4, 4)  # F of the model
    assert steps["items"]["items"]["exclusiveMaximum"] == 3.4028235677973366e38  # what float32 keeps finite
    h = bodies["SnapshotBody"]["properties"]["h"]
    assert (h["minItems"], h["items"]["minItems"]) == (1, SHIPPED_H)  # [L, H] of the model
    assert bodies["StepBody"]["examples"] == [{"inputs": [[0.0, 0.0, 0.0, 0.0]]}]
    assert bodies["StepBatchBody"]["properties"]["steps"]["minItems"] == 1
    params = schema["paths"]["/v1/sessions/{session_id}/steps"]["post"]["parameters"]
    path_sid = next(p for p in params if p["name"] == "session_id")
    assert path_sid["schema"]["maxLength"] == 128
    model = next(p for p in schema["paths"]["/v1/models/{name}"]["get"]["parameters"] if p["name"] == "name")
    assert model["schema"]["enum"] == ["seattle-weather"]
    assert not any("422" in op.get("responses", {}) for ops in schema["paths"].values() for op in ops.values())


async def test_a_batch_item_with_a_seq_past_every_counter_is_a_conflict_of_its_own(
    client: httpx.AsyncClient, weather: np.ndarray
) -> None:
    """A /v1/steps item whose seq is 2**64 (JSON has no bound) gets 409 seq_conflict in its own result, and the
    other items of the batch are answered, whether the batch is small or large enough to run as one block."""
    for n in (7, 8):
        sids = [
            (await client.post("/v1/sessions", json={"model": "seattle-weather"})).json()["session_id"]
            for _ in range(n)
        ]
        body = {"steps": [{"session_id": s, "inputs": [weather[0].tolist()], "seq": 2**64 if i == 0 else 1}
                          for i, s in enumerate(sids)]}  # fmt: skip
        r = await client.post("/v1/steps", json=body)
        assert r.status_code == 200, r.text
        first, *others = r.json()["results"]
        assert first["error"]["code"] == "seq_conflict"
        assert all(o["result"]["seq"] == 1 for o in others)
        for sid in sids:  # NOTE: this app holds at most 10 sessions
            await client.delete(f"/v1/sessions/{sid}")


async def test_the_batch_lane_answers_as_the_documented_route_does(
    client: httpx.AsyncClient, weather: np.ndarray
) -> None:
    """POST /v1/steps through the fast lane (application/json) and through the FastAPI route (another spelling
    of the JSON content type, which the lane leaves alone) give the same status and body as JSON values: item
    results, per-item errors (unknown, invalid id, repeated, ragged), an empty batch, a seq past 64 bits."""
    made = [await client.post("/v1/sessions", json={"model": "seattle-weather"}) for _ in range(9)]
    sids = [m.json()["session_id"] for m in made]
    items = [{"session_id": s, "inputs": [weather[i].tolist()], "seq": 1} for i, s in enumerate(sids)]
    odd = [{"session_id": "nobody", "inputs": [[0, 0, 0, 0]]}, {"session_id": "bad id!", "inputs": [[0, 0, 0, 0]]}]
    bodies = [
        {"steps": [*items, *odd]},
        {"steps": [*items[:3], {"session_id": sids[3], "inputs": [[0, 0, 0, 0], [0, 0]]}, items[0]]},
        {"steps": []},
        {"steps": [{"session_id": sids[0], "inputs": [[0.5, 1, 2, 3]], "seq": 2**64}]},
    ]
    for body in bodies:
        answers = []
        for kind in ("application/json", "application/json;charset=utf-8"):  # NOTE: lane, then route
            for sid in sids:
                await client.post(f"/v1/sessions/{sid}/reset")
            r = await client.post("/v1/steps", content=json.dumps(body), headers={"content-type": kind})
            answers.append((r.status_code, r.json()))
        assert answers[0] == answers[1], body
