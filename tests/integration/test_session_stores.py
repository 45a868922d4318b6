"""One contract, two session stores: every test here runs against the in-memory store and a real Redis
(127.0.0.1:6379, or LSTM_TEST_REDIS; `make test` starts one). Times are real: Redis expires keys itself."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from service.core.redis_store import RedisSessionStore
from service.core.scoring import Scoring
from service.core.sessions import (
    COMMITTED,
    GONE,
    STALE,
    BlockCommit,
    Commit,
    CommitStatus,
    Lease,
    MemorySessionStore,
    Replay,
    SessionStore,
    Snapshot,
)
from service.errors import (
    InvalidInputError,
    SessionCorruptError,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
    UnavailableError,
)
from service.runtime import Signature
from tests.integration.conftest import REDIS_URL

SIG = Signature(features=3, outputs=2, layers=2, hidden=8)
SIGS = {"m/1": SIG, "m/2": SIG}
Factory = Callable[..., Any]


def now() -> float:
    return time.monotonic()


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    """Stores of one backend; Redis ones share a fresh key prefix per test (so they act as replicas)."""
    prefix = f"lstm-test-{uuid.uuid4().hex[:8]}:"
    made: list[SessionStore] = []

    async def make(sigs: dict[str, Signature] = SIGS, **kw: Any) -> tuple[SessionStore, list[tuple[str, str]]]:
        args: dict[str, Any] = {"ttl": 30.0, "max_sessions": 100, **kw}
        store: SessionStore
        if request.param == "memory":
            store = MemorySessionStore(dict(sigs), wall=time.time, **args)
        else:
            store = RedisSessionStore(REDIS_URL, dict(sigs), prefix=prefix, **args)
        removed: list[tuple[str, str]] = []
        store.set_removal_listener(lambda key, reason: removed.append((key, reason)))
        await store.start()
        assert store.healthy, f"no Redis answers at {REDIS_URL}: start one (make redis)"
        made.append(store)
        return store, removed

    yield make
    for store in made:
        await store.close()
    if request.param == "redis":
        r = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in r.scan_iter(match=prefix + "*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


def commits(leases: list[Any], steps: list[int], replays: list[Replay | None] | None = None) -> list[Commit]:
    out = []
    for n, lease in enumerate(leases):
        assert isinstance(lease, Lease), lease
        out.append(Commit(lease, lease.steps + steps[n], lease.seq + 1, (replays or [None] * len(leases))[n]))
    return out


async def test_create_info_delete_and_unknown_ids(make_store: Factory) -> None:
    """A created session is found with Unix times and counted; after delete it is gone with a clear error."""
    s, removed = await make_store()
    info = await s.create("m/1", None, now())
    assert len(info.session_id) == 32
    assert (info.model, info.version, info.steps, info.seq) == ("m", "1", 0, 0)
    assert abs(info.created - time.time()) < 5
    assert info.expires == pytest.approx(info.last_used + 30)
    assert (await s.info(info.session_id, now())).session_id == info.session_id
    assert await s.count() == 1
    assert await s.count("m/2") == 0
    await s.delete(info.session_id)
    assert await s.count() == 0
    assert removed == [("m/1", "deleted")]
    with pytest.raises(SessionNotFoundError, match="no session"):
        await s.info(info.session_id, now())
    with pytest.raises(SessionNotFoundError):
        await s.delete(info.session_id)


async def test_models_of_many_sessions_says_each_ones_model_or_why_it_is_gone(make_store: Factory) -> None:
    """The lookup a step batch makes for all its sessions at once answers as model_of would, session by session."""
    s, _ = await make_store()
    a = (await s.create("m/1", None, now())).session_id
    b = (await s.create("m/2", None, now())).session_id
    gone = (await s.create("m/1", None, now())).session_id
    await s.delete(gone)
    got = await s.models_of([b, "never-made", a, gone, b], now())
    assert got[0] == got[4] == "m/2"
    assert got[2] == "m/1"
    for i in (1, 3):
        assert isinstance(got[i], SessionNotFoundError)
        with pytest.raises(SessionNotFoundError) as single:
            await s.model_of(["never-made", gone][i // 2], now())
        assert str(got[i]) == str(single.value)  # NOTE: the same message, "deleted" for the deleted one
    assert "deleted" in str(got[3])
    assert await s.models_of([], now()) == []


async def test_a_redis_replica_names_versions_it_does_not_serve_and_fails_only_their_rows(prefix: str) -> None:
    """A store that serves m/1 only, beside one that serves m/2 too: lookups name m/2 (the core answers "retry,
    not served here"), and a gather of both sessions fails the m/2 row alone (it failed the whole gather)."""
    both = RedisSessionStore(REDIS_URL, dict(SIGS), ttl=30.0, max_sessions=100, prefix=prefix)
    one = RedisSessionStore(REDIS_URL, {"m/1": SIG}, ttl=30.0, max_sessions=100, prefix=prefix)
    await both.start()
    await one.start()
    try:
        a = (await both.create("m/1", None, now())).session_id
        b = (await both.create("m/2", None, now())).session_id
        assert await one.model_of(b, now()) == "m/2"
        assert await one.models_of([a, b], now()) == ["m/1", "m/2"]
        leases, _, _ = await one.gather("m/1", [a, b], now())
        assert isinstance(leases[0], Lease)
        assert isinstance(leases[1], UnavailableError)
        assert "does not serve (yet)" in leases[1].message
    finally:
        await both.close()
        await one.close()


async def test_client_chosen_ids_are_validated_and_unique(make_store: Factory) -> None:
    s, _ = await make_store()
    await s.create("m/1", "sensor-7", now())
    with pytest.raises(SessionExistsError, match="already exists"):
        await s.create("m/2", "sensor-7", now())
    for bad in ("", "x" * 10_000, "has space", "../etc"):
        with pytest.raises(InvalidInputError, match="invalid session id"):
            await s.create("m/1", bad, now())


async def test_idle_sessions_expire_once_and_say_so(make_store: Factory) -> None:
    """Idle past the TTL, a session is gone; the sweep reports the expiry once, and the error says why."""
    s, removed = await make_store(ttl=0.4)
    a = (await s.create("m/1", "idle", now())).session_id
    await s.create("m/1", "busy", now())
    for _ in range(4):
        await asyncio.sleep(0.2)
        leases, _, _ = await s.gather("m/1", ["busy"], now())  # NOTE: use keeps "busy" alive
        assert isinstance(leases[0], Lease)
    await s.expire(now())
    assert removed == [("m/1", "expired")]
    assert await s.expire(now()) == 0  # reported once
    with pytest.raises(SessionNotFoundError, match=r"expired after 0\.4 s idle"):
        await s.info(a, now())
    assert await s.count() == 1


async def test_the_cap_rejects_or_evicts_the_least_recently_used(make_store: Factory) -> None:
    """At max_sessions, 'reject' refuses; 'evict_lru' removes the least recently used, across models."""
    s, _ = await make_store(max_sessions=2)
    await s.create("m/1", "a", now())
    await s.create("m/2", "b", now())
    with pytest.raises(SessionLimitError, match="maximum of 2 sessions"):
        await s.create("m/1", "c", now())
    await s.delete("a")
    await s.create("m/1", "c", now())
    for sid in ("b", "c"):
        await s.delete(sid)  # NOTE: Redis stores of one test share their keys, as replicas do

    e, removed = await make_store(max_sessions=2, cap_policy="evict_lru")
    await e.create("m/1", "old", now())
    await asyncio.sleep(0.01)
    await e.create("m/2", "new", now())
    await asyncio.sleep(0.01)
    leases, _, _ = await e.gather("m/1", ["old"], now())  # a step touches "old": "new" is now least recent
    assert isinstance(leases[0], Lease)
    await e.create("m/1", "newest", now())
    assert removed == [("m/2", "evicted")]
    with pytest.raises(SessionNotFoundError, match="was evicted"):
        await e.info("new", now())
    assert await e.count() == 2


async def test_gather_and_commit_move_state_counters_and_replays(make_store: Factory) -> None:
    """Rows of gather line up with the ids asked (zeros for a failure); commit writes state and counters."""
    s, _ = await make_store()
    for sid in ("a", "b"):
        await s.create("m/1", sid, now())
    leases, h, _ = await s.gather("m/1", ["b", "a"], now())
    assert h.shape == (2, 2, 8)
    assert not h.any()
    hn = np.arange(32, dtype=np.float32).reshape(2, 2, 8)
    replay = Replay(1, b"d" * 16, np.ones((1, 2), np.float32))
    ok = await s.commit("m/1", commits(leases, [3, 1], [None, replay]), hn, -hn, now())
    assert ok == [CommitStatus.COMMITTED, CommitStatus.COMMITTED]
    again, h2, c2 = await s.gather("m/1", ["a", "b", "missing"], now())
    np.testing.assert_array_equal(h2[:, 0], hn[:, 1])
    np.testing.assert_array_equal(h2[:, 1], hn[:, 0])
    assert not h2[:, 2].any()
    np.testing.assert_array_equal(c2, -h2)
    assert isinstance(again[2], SessionNotFoundError)
    assert ((await s.info("b", now())).steps, (await s.info("b", now())).seq) == (3, 1)
    a = again[0]
    assert isinstance(a, Lease)
    assert a.replay is not None
    assert (a.replay.seq, a.replay.digest) == (1, b"d" * 16)
    np.testing.assert_array_equal(a.replay.outputs, replay.outputs)  # type: ignore[arg-type]


async def test_commit_is_a_compare_and_set_stale_after_a_change_gone_after_removal(make_store: Factory) -> None:
    """A reset or another commit between gather and commit wins (STALE); a deleted or re-created session is
    GONE; nothing of either is written."""
    s, _ = await make_store()
    for sid in ("a", "b", "c", "d"):
        await s.create("m/1", sid, now())
    leases, _, _ = await s.gather("m/1", ["a", "b", "c", "d"], now())
    await s.reset("a", now())
    await s.delete("b")
    one = np.ones((2, 1, 8), np.float32)
    assert await s.commit("m/1", commits(leases[2:3], [1]), one, one, now()) == [CommitStatus.COMMITTED]
    await s.delete("d")
    await s.create("m/1", "d", now())  # the same id, another life
    sevens = np.full((2, 4, 8), 7.0, np.float32)
    ok = await s.commit("m/1", commits(leases, [1, 1, 1, 1]), sevens, sevens, now())
    assert ok == [CommitStatus.STALE, CommitStatus.GONE, CommitStatus.STALE, CommitStatus.GONE]
    _, h, _ = await s.gather("m/1", ["a", "c", "d"], now())
    assert not h[:, 0].any()
    assert (h[:, 1] == 1.0).all()
    assert not h[:, 2].any()
    assert ((await s.info("c", now())).seq, (await s.info("d", now())).seq) == (1, 0)


async def test_export_restore_round_trip_and_model_mismatch(make_store: Factory) -> None:
    s, _ = await make_store()
    await s.create("m/1", "a", now())
    leases, _, _ = await s.gather("m/1", ["a"], now())
    state = np.random.default_rng(0).standard_normal((2, 1, 8)).astype(np.float32)
    await s.commit("m/1", commits(leases, [5]), state, state * 2, now())
    snap = await s.export("a", now())
    assert (snap.model, snap.version, snap.steps, snap.seq) == ("m", "1", 5, 1)
    info, created = await s.restore("copy", "m/1", snap, now())
    assert (info.steps, info.seq, created) == (5, 1, True)
    assert not (await s.restore("copy", "m/1", snap, now()))[1]
    with pytest.raises(InvalidInputError, match="between 0 and"):
        await s.restore("huge", "m/1", Snapshot("m", "1", 2**63, 0, snap.h, snap.c), now())
    with pytest.raises(SessionNotFoundError):
        await s.info("huge", now())
    _, h, c = await s.gather("m/1", ["copy"], now())
    np.testing.assert_array_equal(h[:, 0], state[:, 0])
    np.testing.assert_array_equal(c[:, 0], state[:, 0] * 2)
    await s.create("m/2", "x", now())
    with pytest.raises(InvalidInputError, match="runs m/2"):
        await s.restore("x", "m/1", Snapshot("m", "1", 0, 0, snap.h, snap.c), now())


async def test_detach_moves_ownership_without_failing_a_step_in_flight(make_store: Factory) -> None:
    """After detach, a delete by the old incarnation is refused, and a lease taken before it still commits."""
    s, _ = await make_store()
    info = await s.create("m/1", "owned", now())
    leases, _, _ = await s.gather("m/1", ["owned"], now())
    detached = await s.detach("owned", now())
    assert detached.incarnation != info.incarnation
    one = np.ones((2, 1, 8), np.float32)
    assert await s.commit("m/1", commits(leases, [1]), one, one, now()) == [CommitStatus.COMMITTED]
    with pytest.raises(SessionNotFoundError, match="replaced"):
        await s.delete("owned", info.incarnation)
    await s.delete("owned", detached.incarnation)
    assert await s.count() == 0


async def test_a_session_keeps_its_life_until_the_id_is_created_again(make_store: Factory) -> None:
    """SessionInfo.life stays through steps and a detach (a resume) and is what leases carry, one by one and
    as a block; a session created again under the id has another life."""
    s, _ = await make_store()
    info = await s.create("m/1", "lived", now())
    assert info.life
    leases, _, _ = await s.gather("m/1", ["lived"], now())
    one = np.ones((2, 1, 8), np.float32)
    await s.commit("m/1", commits(leases, [1]), one, one, now())
    detached = await s.detach("lived", now())
    assert detached.incarnation != info.incarnation
    assert detached.life == (await s.info("lived", now())).life == info.life == leases[0].life  # type: ignore[union-attr]
    await s.delete("lived")
    again = await s.create("m/1", "lived", now())
    block = await s.gather_block("m/1", ["lived", "absent"], now())
    assert again.life != info.life
    assert block.life is not None
    assert block.life.tolist() == [again.life, 0]


async def test_two_redis_stores_share_sessions_state_and_the_cap() -> None:
    """Two stores on one Redis (two replicas): a session made on one is stepped on the other, their commits
    are compare-and-set against each other, and the cap counts both."""
    prefix = f"lstm-test-{uuid.uuid4().hex[:8]}:"
    a = RedisSessionStore(REDIS_URL, SIGS, ttl=30, max_sessions=2, prefix=prefix)
    b = RedisSessionStore(REDIS_URL, SIGS, ttl=30, max_sessions=2, prefix=prefix)
    for st in (a, b):
        await st.start()
    try:
        await a.create("m/1", "shared", now())
        la, _, _ = await a.gather("m/1", ["shared"], now())
        lb, _, _ = await b.gather("m/1", ["shared"], now())
        one = np.ones((2, 1, 8), np.float32)
        assert await b.commit("m/1", commits(lb, [1]), one, one, now()) == [CommitStatus.COMMITTED]
        assert await a.commit("m/1", commits(la, [1]), one * 2, one * 2, now()) == [CommitStatus.STALE]
        _, h, _ = await a.gather("m/1", ["shared"], now())
        assert (h == 1.0).all()
        await b.create("m/2", "second", now())
        with pytest.raises(SessionLimitError):
            await a.create("m/1", "third", now())
        assert await a.count() == await b.count() == 2
    finally:
        for st in (a, b):
            await st.close()
        r = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in r.scan_iter(match=prefix + "*")]
        await r.delete(*keys)
        await r.aclose()


@pytest.mark.parametrize("scored", [False, True])
async def test_a_redis_session_costs_its_raw_state_plus_a_small_header(scored: bool) -> None:
    """Measured by Redis (MEMORY USAGE): a session of 2 x 48 state costs 2*L*H*4 bytes plus under 256 bytes: a
    91-byte header (counters, model key, digest), the key (53 characters here) and Redis's own bookkeeping, with
    the allocator rounding the value up to its size class (measured: 616 for 384 raw). A live-scoring record
    (horizon 7: 353 bytes) lives in a key of its own with an 8-byte version tag, and costs under 128 bytes more
    than itself (measured: 488). The index entry in the sorted set comes on top (measured separately: 140 bytes
    with a 32-character id)."""
    prefix = f"lstm-test-{uuid.uuid4().hex[:8]}:"
    record = Scoring(7, 1).width if scored else 0
    sig = Signature(features=4, outputs=7, layers=1, hidden=48, extra=record)
    s = RedisSessionStore(REDIS_URL, {"seattle-weather/1": sig}, ttl=30, max_sessions=10_000, prefix=prefix)
    await s.start()
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        ids = [(await s.create("seattle-weather/1", None, now())).session_id for _ in range(200)]
        raw = 2 * 1 * 48 * 4 + record
        used = [await s.memory_usage(sid) for sid in ids]
        assert raw <= max(used) < raw + 256 + 128 * scored, used[:5]
        index = await r.memory_usage(prefix + "idx:seattle-weather/1", samples=0)
        assert index / len(ids) < 160
    finally:
        await s.close()
        keys = [k async for k in r.scan_iter(match=prefix + "*")]
        await r.delete(*keys)
        await r.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def private_redis(port: int) -> Callable[[], subprocess.Popen[bytes]]:
    """A function that starts a redis-server of the test's own on `port` (to kill and restart it)."""
    server = shutil.which("redis-server")
    assert server, "redis-server is needed for this test (apt-get install redis-server)"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly", "no"],
                                stdout=subprocess.DEVNULL)  # fmt: skip

    return start


async def test_a_redis_that_goes_away_is_unavailable_fast_and_recovers_by_itself() -> None:
    """With Redis killed, calls fail within the timeout as 'unavailable' and the store is unhealthy; when a
    Redis answers again on the same address, the store is healthy again without a restart."""
    port = free_port()
    start = private_redis(port)
    proc = start()
    s = RedisSessionStore(f"redis://127.0.0.1:{port}/0", SIGS, ttl=30, max_sessions=10, timeout=0.3,
                          health_interval=0.1)  # fmt: skip
    try:
        for _ in range(50):
            await s.start()
            if s.healthy:
                break
            await s.close()
            s = RedisSessionStore(f"redis://127.0.0.1:{port}/0", SIGS, ttl=30, max_sessions=10, timeout=0.3,
                                  health_interval=0.1)  # fmt: skip
            await asyncio.sleep(0.1)
        assert s.healthy
        await s.create("m/1", "before", now())
        proc.kill()
        proc.wait()
        t0 = time.perf_counter()
        with pytest.raises(UnavailableError, match="unavailable; retry"):
            await s.info("before", now())
        assert time.perf_counter() - t0 < 2.0
        assert not s.healthy
        proc = start()
        deadline = time.monotonic() + 10
        while not s.healthy:
            assert time.monotonic() < deadline, "the store did not recover"
            await asyncio.sleep(0.1)
        await s.create("m/1", "after", now())  # a fresh Redis: the old session went with the process
        assert (await s.info("after", now())).session_id == "after"
    finally:
        await s.close()
        proc.kill()
        proc.wait()


async def test_the_record_beside_the_state_moves_with_commits_and_clears_on_reset_and_restore(
    make_store: Factory,
) -> None:
    """A model with a per-session record (live scoring) gets it zeroed at create, leased with the state, written
    by a commit that carries one and kept by one that does not; reset and restore start it again."""
    sigs = {"m/1": replace(SIG, extra=5)}
    s, _ = await make_store(sigs)
    info = await s.create("m/1", "r", now())
    assert info.extra == bytes(5)
    (lease,), _, _ = await s.gather("m/1", ["r"], now())
    assert isinstance(lease, Lease)
    assert lease.extra == bytes(5)
    state = np.ones((2, 1, 8), np.float32)
    cm = Commit(lease, 1, 1, None, b"\x01\x02\x03\x04\x05")
    assert await s.commit("m/1", [cm], state, state, now()) == [CommitStatus.COMMITTED]
    (lease,), _, _ = await s.gather("m/1", ["r"], now())
    assert isinstance(lease, Lease)
    assert lease.extra == b"\x01\x02\x03\x04\x05"
    assert (await s.info("r", now())).extra == b"\x01\x02\x03\x04\x05"
    assert await s.commit("m/1", [Commit(lease, 2, 2, None)], state, state, now()) == [CommitStatus.COMMITTED]
    assert (await s.info("r", now())).extra == b"\x01\x02\x03\x04\x05"  # NOTE: None: unchanged
    assert (await s.reset("r", now())).extra == bytes(5)
    (lease,), _, _ = await s.gather("m/1", ["r"], now())
    assert isinstance(lease, Lease)
    await s.commit("m/1", [Commit(lease, 1, 1, None, b"\x09" * 5)], state, state, now())
    snap = await s.export("r", now())
    info, created = await s.restore("r", "m/1", snap, now())
    assert not created
    assert info.extra == bytes(5)


async def test_a_gather_that_does_not_touch_leaves_the_idle_time_running(make_store: Factory) -> None:
    """touch=False (a peek) reads a session without using it: it still expires when its TTL says."""
    s, _ = await make_store(ttl=0.6)
    await s.create("m/1", "read", now())
    await s.create("m/1", "used", now())
    for _ in range(4):
        await asyncio.sleep(0.25)
        leases, _, _ = await s.gather("m/1", ["read", "used"], now(), touch=[False, True])
    # NOTE: 1 s after create: "read" is past its 0.6 s TTL, "used" was used 0 s ago
    assert isinstance(leases[1], Lease)
    await asyncio.sleep(0.3)
    await s.expire(now())  # NOTE: Redis says why only after a sweep (the memory store finds out on its own)
    with pytest.raises(SessionNotFoundError, match="expired"):
        await s.info("read", now())
    assert (await s.info("used", now())).session_id == "used"


async def test_a_reset_gru_session_keeps_its_layout(make_store: Factory) -> None:
    """A model without a cell state and with a record: after a reset the session reads back as new."""
    gru = {"g/1": Signature(features=3, outputs=2, layers=2, hidden=8, cell=0, extra=4)}
    s, _ = await make_store(gru)
    await s.create("g/1", "gru", now())
    (lease,), _, _ = await s.gather("g/1", ["gru"], now())
    ones = np.ones((2, 1, 8), np.float32)
    none = np.zeros((2, 1, 0), np.float32)
    assert await s.commit("g/1", [Commit(lease, 1, 1, None, b"abcd")], ones, none, now())  # type: ignore[arg-type]
    await s.reset("gru", now())
    (lease,), h, c = await s.gather("g/1", ["gru"], now())
    assert isinstance(lease, Lease)
    assert lease.extra == bytes(4)
    assert lease.steps == 0
    assert h.shape == (2, 1, 8)
    assert not h.any()
    assert c.shape == (2, 1, 0)


def old_server_decode(raw: bytes, sig: Signature) -> tuple[int, int, np.ndarray, np.ndarray]:
    """How servers before the live-scoring record read a session value (service/core/redis_store.py at 30e2f29):
    header, model key, h, c, digest, then outputs (steps, seq, h, c returned)."""
    header = struct.Struct("<8s8s8sqqddH")
    _, _, _, steps, seq, _, _, n = header.unpack_from(raw)
    at = header.size + n
    raw[header.size : at].decode()
    size = sig.layers * sig.hidden * 4
    h = np.frombuffer(raw, np.float32, sig.layers * sig.hidden, at).reshape(sig.layers, sig.hidden)
    c = np.frombuffer(raw, np.float32, sig.layers * sig.cell, at + size).reshape(sig.layers, sig.cell)
    rest = raw[at + size + sig.layers * sig.cell * 4 + 16 :]
    if rest:
        np.frombuffer(rest, np.float32).reshape(-1, sig.outputs)
    return steps, seq, h, c


async def test_redis_session_values_keep_the_layout_older_servers_read(prefix: str) -> None:
    """A rolling upgrade or a rollback shares one Redis: a session that a server with live scoring stepped (with
    seq, so with kept outputs) still reads as older servers read it; the record is in a key of its own."""
    sig = replace(SIG, extra=6)
    s = RedisSessionStore(REDIS_URL, {"m/1": sig}, ttl=30, max_sessions=10, prefix=prefix)
    await s.start()
    try:
        await s.create("m/1", "new", now())
        (lease,), _, _ = await s.gather("m/1", ["new"], now())
        state = np.full((2, 1, 8), 0.25, np.float32)
        replay = Replay(1, bytes(range(16)), np.ones((1, 2), np.float32))
        await s.commit("m/1", [Commit(lease, 3, 1, replay, b"abcdef")], state, -state, now())  # type: ignore[arg-type]
        raw = await s.redis.get(prefix + "s:new")
        steps, seq, h, c = old_server_decode(raw, sig)
        assert (steps, seq) == (3, 1)
        np.testing.assert_array_equal(h, state[:, 0])
        np.testing.assert_array_equal(c, -state[:, 0])
        assert (await s.info("new", now())).extra == b"abcdef"
    finally:
        await s.close()


async def test_redis_values_written_before_the_record_existed_read_with_an_empty_one() -> None:
    """A rolling upgrade: sessions that older servers wrote or stepped (no record, or a record of an earlier
    version of the session) still step, with a fresh record."""
    prefix = f"lstm-test-{uuid.uuid4().hex[:8]}:"
    old = RedisSessionStore(REDIS_URL, {"m/1": SIG}, ttl=30, max_sessions=10, prefix=prefix)
    new = RedisSessionStore(REDIS_URL, {"m/1": replace(SIG, extra=6)}, ttl=30, max_sessions=10, prefix=prefix)
    try:
        await old.start()
        await new.start()
        await old.create("m/1", "before", now())
        (lease,), _, _ = await old.gather("m/1", ["before"], now())
        state = np.full((2, 1, 8), 0.5, np.float32)
        await old.commit("m/1", [Commit(lease, 3, 1, None)], state, state, now())  # type: ignore[arg-type]
        (lease,), h, _ = await new.gather("m/1", ["before"], now())
        assert isinstance(lease, Lease)
        assert lease.steps == 3
        assert lease.extra == bytes(6)
        assert np.array_equal(h, state)
        await new.commit("m/1", [Commit(lease, 4, 2, None, b"123456")], h, h, now())
        assert (await new.info("before", now())).extra == b"123456"
        assert (await old.info("before", now())).extra == b""  # NOTE: a record of another width: not shown
        # an older server steps the session: a new version in the value, the record key untouched
        raw = await new.redis.get(prefix + "s:before")
        await new.redis.set(prefix + "s:before", os.urandom(8) + raw[8:], px=30_000)
        (lease,), _, _ = await new.gather("m/1", ["before"], now())
        assert isinstance(lease, Lease)
        assert lease.extra == bytes(6)  # NOTE: stale: scored again from here
    finally:
        for st in (old, new):
            await st.close()
        r = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in r.scan_iter(match=prefix + "*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


async def test_a_damaged_redis_value_fails_its_session_alone_and_a_delete_removes_it(prefix: str) -> None:
    """Values cut short (in the header, in the model name, in the state), emptied, or with a model name that is not
    text: every read of such a session says it is damaged and what to do, a lookup or gather of many sessions fails
    those rows alone (it failed the whole call with an internal error), and deleting it removes it with its record
    and index entry (the delete read the value first, and failed the same way)."""
    store = RedisSessionStore(REDIS_URL, {"m/1": replace(SIG, extra=4)}, ttl=30.0, max_sessions=100, prefix=prefix)
    removed: list[tuple[str, str]] = []
    store.set_removal_listener(lambda key, reason: removed.append((key, reason)))
    await store.start()
    try:
        ids = ["ok", "short", "in-name", "in-state", "empty", "not-text"]
        for sid in ids:
            await store.create("m/1", sid, now())
        raw = await store.redis.get(prefix + "s:ok")
        damage = {"short": raw[:20], "in-name": raw[:60], "in-state": raw[:-5], "empty": b"",
                  "not-text": raw[:58] + b"\xff" * (len(raw) - 58)}  # fmt: skip
        for sid, value in damage.items():
            await store.redis.set(prefix + "s:" + sid, value, px=30_000)
        looked = await store.models_of(ids, now())
        leases, _, _ = await store.gather("m/1", ids, now())
        assert looked[0] == looked[3] == "m/1"  # NOTE: a lookup reads the header alone, which is whole there
        assert isinstance(leases[0], Lease)
        for sid, got, lease in zip(ids[1:], looked[1:], leases[1:], strict=True):
            for e in (lease,) if sid == "in-state" else (got, lease):
                assert isinstance(e, SessionCorruptError), (sid, e)
                assert f"session {sid!r}" in e.message
                assert "delete the session and open it again" in e.message
            with pytest.raises(SessionCorruptError):
                await store.info(sid, now())
        with pytest.raises(SessionCorruptError):
            await store.model_of("short", now())
        for sid in damage:
            await store.delete(sid)
            with pytest.raises(SessionNotFoundError):
                await store.info(sid, now())
        assert await store.count() == 1
        assert await store.redis.zrange(prefix + "idx:m/1", 0, -1) == [b"ok"]
        assert [k async for k in store.redis.scan_iter(match=prefix + "r:*")] == [(prefix + "r:ok").encode()]
        # NOTE: counted under its model where the header still names one
        assert removed == [(key, "deleted") for key in ("unknown", "unknown", "m/1", "unknown", "unknown")]
    finally:
        await store.close()


async def test_a_block_gathers_and_commits_what_single_leases_would(make_store: Factory) -> None:
    """gather_block/commit_block on many sessions: states, counters, records and replays as gather/commit keep
    them; a row whose session was reset meanwhile is STALE and one deleted is GONE (neither written); missing
    sessions and another model's are failed rows with zeros."""
    sigs = {"m/1": replace(SIG, extra=3), "m/2": SIG}
    s, _ = await make_store(sigs, max_sessions=2000)
    ids = [f"b{i}" for i in range(1100)]  # NOTE: more than a page of memory-store slots
    for sid in ids:
        await s.create("m/1", sid, now())
    await s.create("m/2", "other", now())
    block = await s.gather_block("m/1", [*ids, "nobody", "other"], now())
    assert set(block.failed) == {1100, 1101}
    assert isinstance(block.failed[1100], SessionNotFoundError)
    assert "now runs m/2" in block.failed[1101].message
    assert not block.h.any()
    assert block.steps.tolist() == [0] * 1102
    assert block.replay(0) is None
    k = 1100
    rows = np.arange(k)
    h = np.arange(2 * k * 8, dtype=np.float32).reshape(2, k, 8)
    digests = np.zeros((k, 16), np.uint8)
    digests[::2] = 7  # NOTE: even rows carried seq: their digest and outputs are kept for a retry
    outputs = np.full((k, 1, 2), 0.5, np.float32)
    extra = np.tile(np.array([1, 2, 3], np.uint8), (k, 1))
    await s.reset("b1", now())
    await s.delete("b2")
    status = await s.commit_block(
        "m/1", block, BlockCommit(rows, np.full(k, 4), np.full(k, 1), digests, outputs, extra), h, -h, now()
    )
    assert status[1] == STALE
    assert status[2] == GONE
    assert (status[3:] == COMMITTED).all()
    assert status[0] == COMMITTED
    (lease0, lease1, lease3), hs, cs = await s.gather("m/1", ["b0", "b1", "b3"], now())
    assert isinstance(lease0, Lease)
    assert isinstance(lease1, Lease)
    assert isinstance(lease3, Lease)
    assert (lease0.steps, lease0.seq, lease0.extra, lease3.extra) == (4, 1, b"\x01\x02\x03", b"\x01\x02\x03")
    assert lease1.steps == 0
    assert not hs[:, 1].any()
    np.testing.assert_array_equal(hs[:, 0], h[:, 0])
    np.testing.assert_array_equal(cs[:, 2], -h[:, 3])
    assert lease0.replay is not None
    assert lease0.replay.digest == bytes([7] * 16)
    assert lease3.replay is None
    np.testing.assert_array_equal(lease0.replay.outputs, outputs[0])
    again = await s.gather_block("m/1", ["b1099", "b0"], now())
    assert again.steps.tolist() == [4, 4]
    assert not again.failed
    replay = again.replay(1)
    assert replay is not None
    assert replay.seq == 1
    assert replay.digest == bytes([7] * 16)
    np.testing.assert_array_equal(again.h[:, 0], h[:, 1099])
