"""API keys and TLS on every transport, and sessions owned by the key that made them. Real servers on port 0;
throwaway certificates made in the test (trustme)."""

from __future__ import annotations

import datetime
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import trustme
import websockets
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app import Server
from service.auth import ApiKeys, KeyFileError, owner_tag
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.grpc._generated.lstm.v1 import lstm_service_pb2_grpc as pb_grpc
from tests.integration.conftest import ServerFactory, sample, until

MODEL = "seattle-weather"
KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-fedcba9876543210"
UNAUTH = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def grpc_meta(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def row(k: int = 0) -> list[float]:
    return [0.0, 10.0 + k, 5.0, 3.0]


@pytest.fixture
async def keyed(make_server: ServerFactory, tmp_path: Path) -> Server:
    keys = tmp_path / "keys"
    keys.write_text(f"# two clients\n{KEY_A}\n\n{KEY_B}\n")
    srv: Server = await make_server(api_keys_file=keys)
    return srv


async def test_every_transport_refuses_missing_or_wrong_keys_alike_and_health_stays_open(keyed: Server) -> None:
    """No key, a wrong key, a key in another header and a malformed scheme all get the same 401 /
    UNAUTHENTICATED (REST with WWW-Authenticate; WebSocket in-band, closed 1008); health, readiness and
    metrics answer without a key; metrics count the refusals and never show a key or owner tag."""
    srv = keyed
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}") as rest:
        for headers in ({}, bearer("wrong-key-000000000000"), {"X-Api-Key": KEY_A}, {"Authorization": KEY_A},
                        {"Authorization": f"Basic {KEY_A}"}):  # fmt: skip
            r = await rest.post("/v1/sessions", json={"model": MODEL}, headers=headers)
            assert (r.status_code, r.json()) == (401, {"error": UNAUTH, "code": "unauthenticated"}), headers
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="lstm-serve"'
        assert (await rest.get("/v1/models")).status_code == 401
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await rest.get(path)).status_code == 200, path
        ok = await rest.post("/v1/sessions", json={"model": MODEL}, headers=bearer(KEY_A))
        assert ok.status_code == 201
        text = (await rest.get("/metrics")).text
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = pb_grpc.PredictorStub(ch)
        for meta in ((), grpc_meta("wrong-key-000000000000"), (("x-api-key", KEY_A),)):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ListModels(pb.ListModelsRequest(), metadata=meta)
            assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTH)
            assert dict(e.value.trailing_metadata() or ())["lstm-error-code"] == "unauthenticated"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await anext(aiter(stub.Stream(iter([pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL))]))))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await stub.ListModels(pb.ListModelsRequest(), metadata=grpc_meta(KEY_B))).models
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    async with websockets.connect(f"ws://127.0.0.1:{srv.http_port}/v1/sessions/stream") as ws:
        # NOTE: the server speaks first: the refusal, then a 1008 close
        assert json.loads(await ws.recv()) == {"error": UNAUTH, "code": "unauthenticated"}
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
    await until(lambda: sample(srv, "lstm_requests_total", protocol="grpc", method="Stream", code="UNAUTHENTICATED"),
                equals=1)  # fmt: skip
    assert sample(srv, "lstm_requests_total", protocol="grpc", method="ListModels", code="UNAUTHENTICATED") == 3
    assert sample(srv, "lstm_requests_total", protocol="rest", method="POST /v1/sessions", code="401") == 5
    for secret in (KEY_A, KEY_B, owner_tag(KEY_A), owner_tag(KEY_B)):
        assert secret not in text


async def test_a_session_belongs_to_its_key_on_every_operation_and_transport(keyed: Server) -> None:
    """Key A's session 'demo' is not there for key B: 404 on get, step, reset, delete, export and stream
    resume over REST, gRPC and WebSocket, with A's id in the message, never the owner tag. B may open its own
    'demo' (and import over it); A's session is untouched throughout."""
    srv = keyed
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}") as rest:
        a, b = bearer(KEY_A), bearer(KEY_B)
        assert (
            await rest.post("/v1/sessions", json={"model": MODEL, "session_id": "demo"}, headers=a)
        ).status_code == 201
        assert (await rest.post("/v1/sessions/demo/steps", json={"inputs": [row()]}, headers=a)).status_code == 200
        snapshot = (await rest.get("/v1/sessions/demo/state", headers=a)).json()
        calls = [
            rest.get("/v1/sessions/demo", headers=b),
            rest.post("/v1/sessions/demo/steps", json={"inputs": [row()]}, headers=b),
            rest.post("/v1/sessions/demo/reset", headers=b),
            rest.delete("/v1/sessions/demo", headers=b),
            rest.get("/v1/sessions/demo/state", headers=b),
        ]
        for call in calls:
            r = await call
            assert (r.status_code, r.json()["code"]) == (404, "session_not_found")
            assert "'demo'" in r.json()["error"]
            assert owner_tag(KEY_A) not in r.json()["error"]
            assert owner_tag(KEY_B) not in r.json()["error"]
        batch = await rest.post("/v1/steps", json={"steps": [{"session_id": "demo", "inputs": [row()]}]}, headers=b)
        assert batch.json()["results"][0]["error"]["code"] == "session_not_found"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            stub = pb_grpc.PredictorStub(ch)
            ref = pb.SessionRef(session_id="demo")
            m = pb.Matrix(rows=1, cols=4, data=row())
            for rpc in (stub.GetSession(ref, metadata=grpc_meta(KEY_B)),
                        stub.Step(pb.StepRequest(session_id="demo", inputs=m), metadata=grpc_meta(KEY_B)),
                        stub.ResetSession(ref, metadata=grpc_meta(KEY_B)),
                        stub.DeleteSession(ref, metadata=grpc_meta(KEY_B)),
                        stub.ExportSession(ref, metadata=grpc_meta(KEY_B))):  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await rpc
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
            call = stub.Stream(iter([pb.StreamRequest(resume_session_id="demo")]), metadata=grpc_meta(KEY_B))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert (await stub.GetSession(ref, metadata=grpc_meta(KEY_A))).steps == 1
        async with websockets.connect(f"ws://127.0.0.1:{srv.http_port}/v1/sessions/stream",
                                      additional_headers=b) as ws:  # fmt: skip
            await ws.send(json.dumps({"resume": "demo"}))
            assert json.loads(await ws.recv())["code"] == "session_not_found"
        # B's own 'demo' is another session: created, imported over and stepped without touching A's
        own = await rest.post("/v1/sessions", json={"model": MODEL, "session_id": "demo"}, headers=b)
        assert (own.status_code, own.json()["session_id"]) == (201, "demo")
        assert (await rest.post("/v1/sessions/demo/state", json=snapshot, headers=b)).status_code == 200
        assert (await rest.post("/v1/sessions/demo/steps", json={"inputs": [row(1)]}, headers=b)).json()["steps"] == 2
        assert (await rest.get("/v1/sessions/demo", headers=a)).json()["steps"] == 1
        assert (await rest.get("/v1/sessions/demo", headers=b)).json()["steps"] == 2


async def test_metrics_can_require_a_key(make_server: ServerFactory, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(KEY_A + "\n")
    srv: Server = await make_server(api_keys_file=keys, metrics_auth=True)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}") as rest:
        assert (await rest.get("/metrics")).status_code == 401
        assert (await rest.get("/metrics", headers=bearer(KEY_A))).status_code == 200
        assert (await rest.get("/readyz")).status_code == 200


def test_keys_come_from_a_file_or_the_environment_and_must_be_long(tmp_path: Path) -> None:
    """Keys from LSTM_SERVE_API_KEYS (commas or spaces) work like the file's; short or missing keys are refused."""
    env_keys = ApiKeys.load(None, f"{KEY_A}, {KEY_B}")
    assert env_keys is not None
    assert env_keys.owner(f"Bearer {KEY_B}") == owner_tag(KEY_B)
    assert ApiKeys.load(None, None) is None
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(KeyFileError, match="none was found"):
        ApiKeys.load(empty, None)
    with pytest.raises(KeyFileError, match="at least 16 characters"):
        ApiKeys.load(None, "short")
    with pytest.raises(KeyFileError, match="cannot read"):
        ApiKeys.load(tmp_path / "missing", None)


# --- TLS ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA with a server certificate for 127.0.0.1 and a client certificate, a foreign CA with its own client
    certificate, and an expired server certificate, as PEM files."""
    d = tmp_path_factory.mktemp("pki")
    ca, foreign = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    expired = ca.issue_cert("127.0.0.1", not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
                            not_after=datetime.datetime(2020, 2, 1, tzinfo=datetime.UTC))  # fmt: skip
    client, foreign_client = ca.issue_cert("client@example"), foreign.issue_cert("client@example")
    blobs = {
        "ca": ca.cert_pem, "foreign_ca": foreign.cert_pem,
        "server_cert": server.cert_chain_pems[0], "server_key": server.private_key_pem,
        "expired_cert": expired.cert_chain_pems[0], "expired_key": expired.private_key_pem,
        "client_cert": client.cert_chain_pems[0], "client_key": client.private_key_pem,
        "foreign_cert": foreign_client.cert_chain_pems[0], "foreign_key": foreign_client.private_key_pem,
    }  # fmt: skip
    files: dict[str, Any] = {}
    for name, blob in blobs.items():
        path = d / f"{name}.pem"
        blob.write_to_path(str(path))
        files[name] = path
    return files


def client_ssl(pki: dict[str, Any], ca: str = "ca", cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki[ca]))
    if cert is not None:
        ctx.load_cert_chain(str(pki[f"{cert}_cert"]), str(pki[f"{cert}_key"]))
    return ctx


def grpc_creds(pki: dict[str, Any], ca: str = "ca", cert: str | None = None) -> grpc.ChannelCredentials:
    chain = (pki[f"{cert}_key"].read_bytes(), pki[f"{cert}_cert"].read_bytes()) if cert else (None, None)
    return grpc.ssl_channel_credentials(pki[ca].read_bytes(), *chain)


async def grpc_call(port: int, creds: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """ListModels over a channel with these credentials (None: plain text): OK or the failure code."""
    channel = (
        grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) if creds else grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    )
    async with channel:
        try:
            await pb_grpc.PredictorStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def rest_call(port: int, verify: ssl.SSLContext | bool, scheme: str = "https") -> int | str:
    try:
        async with httpx.AsyncClient(verify=verify, timeout=5) as c:
            return (await c.get(f"{scheme}://127.0.0.1:{port}/v1/models")).status_code
    except (httpx.TransportError, ssl.SSLError) as e:
        return type(e).__name__


async def test_tls_serves_both_transports_and_refuses_plain_text_and_untrusted_peers(
    make_server: ServerFactory, pki: dict[str, Any]
) -> None:
    """With a certificate: REST over HTTPS and gRPC over TLS work for a client that trusts the CA; plain text to
    either port fails; a client trusting another CA refuses the server."""
    srv: Server = await make_server(tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    assert await rest_call(srv.http_port, client_ssl(pki)) == 200
    assert await grpc_call(srv.grpc_port, grpc_creds(pki)) == grpc.StatusCode.OK
    assert isinstance(await rest_call(srv.http_port, False, scheme="http"), str)  # plain text to the TLS port
    assert await grpc_call(srv.grpc_port, None) == grpc.StatusCode.UNAVAILABLE
    assert isinstance(await rest_call(srv.http_port, client_ssl(pki, ca="foreign_ca")), str)
    assert await grpc_call(srv.grpc_port, grpc_creds(pki, ca="foreign_ca")) == grpc.StatusCode.UNAVAILABLE


async def test_an_expired_server_certificate_is_refused_by_clients(
    make_server: ServerFactory, pki: dict[str, Any]
) -> None:
    srv: Server = await make_server(tls_cert=pki["expired_cert"], tls_key=pki["expired_key"])
    assert isinstance(await rest_call(srv.http_port, client_ssl(pki)), str)
    assert await grpc_call(srv.grpc_port, grpc_creds(pki)) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(
    make_server: ServerFactory, pki: dict[str, Any]
) -> None:
    """With --tls-client-ca: a client certificate from that CA works on both transports; none, or one from a
    foreign CA, fails the handshake."""
    srv: Server = await make_server(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    assert await rest_call(srv.http_port, client_ssl(pki, cert="client")) == 200
    assert await grpc_call(srv.grpc_port, grpc_creds(pki, cert="client")) == grpc.StatusCode.OK
    for cert in (None, "foreign"):
        assert isinstance(await rest_call(srv.http_port, client_ssl(pki, cert=cert)), str), cert
        assert await grpc_call(srv.grpc_port, grpc_creds(pki, cert=cert)) == grpc.StatusCode.UNAVAILABLE, cert


async def test_keys_and_tls_together_on_a_stream(
    make_server: ServerFactory, pki: dict[str, Any], tmp_path: Path
) -> None:
    """A gRPC stream over TLS with a key answers every step; without the key it is refused."""
    keys = tmp_path / "keys"
    keys.write_text(KEY_A + "\n")
    srv: Server = await make_server(tls_cert=pki["server_cert"], tls_key=pki["server_key"], api_keys_file=keys)
    async with grpc.aio.secure_channel(f"127.0.0.1:{srv.grpc_port}", grpc_creds(pki)) as ch:
        stub = pb_grpc.PredictorStub(ch)

        async def reqs() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL))
            for k in range(3):
                yield pb.StreamRequest(inputs=pb.Matrix(rows=1, cols=4, data=row(k)))

        replies = [r async for r in stub.Stream(reqs(), metadata=grpc_meta(KEY_A))]
        assert [r.seq for r in replies[1:]] == [1, 2, 3]
        assert np.asarray(replies[-1].outputs.data).shape == (7,)
        call = stub.Stream(iter([pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL))]))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.read()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
