"""The in-memory slab session store: lifecycle, expiry, the cap, snapshots and the cost of a session."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from service.core.sessions import Lease, MemorySessionStore, Replay, Snapshot
from service.errors import InvalidInputError, SessionExistsError, SessionLimitError, SessionNotFoundError
from service.runtime import Signature

SIG = Signature(features=3, outputs=2, layers=2, hidden=8)


def store(**kw: object) -> tuple[MemorySessionStore, list[tuple[str, str]]]:
    removed: list[tuple[str, str]] = []
    args: dict[str, object] = {"ttl": 10.0, "max_sessions": 100, **kw}
    s = MemorySessionStore({"m/1": SIG}, on_removed=lambda k, r: removed.append((k, r)), **args)  # type: ignore[arg-type]
    return s, removed


async def test_create_get_delete_and_unknown_ids() -> None:
    """A created session is found, counted, and gone after delete; unknown ids are a clear 404 error."""
    s, removed = store()
    info = await s.create("m/1", None, now=1.0)
    assert len(info.session_id) == 32
    assert (info.model, info.version, info.steps, info.seq, info.expires) == ("m", "1", 0, 0, 11.0)
    assert (await s.info(info.session_id, 2.0)).session_id == info.session_id
    assert s.count() == 1
    await s.delete(info.session_id)
    assert s.count() == 0
    assert removed == [("m/1", "deleted")]
    with pytest.raises(SessionNotFoundError, match="no session"):
        await s.info(info.session_id, 3.0)


async def test_client_chosen_ids_are_validated_and_unique() -> None:
    """A duplicate id is 409; a malformed or 10k-character id is refused with the rule."""
    s, _ = store()
    await s.create("m/1", "sensor-7", 0.0)
    with pytest.raises(SessionExistsError, match="already exists"):
        await s.create("m/1", "sensor-7", 0.0)
    for bad in ("", "x" * 10_000, "has space", "../etc", "é"):
        with pytest.raises(InvalidInputError, match="invalid session id"):
            await s.create("m/1", bad, 0.0)


async def test_idle_sessions_expire_after_the_ttl() -> None:
    """A session idle past the TTL is removed by the sweep (or on access) and then reported as expired."""
    s, removed = store(ttl=5.0)
    a = (await s.create("m/1", "a", 0.0)).session_id
    b = (await s.create("m/1", "b", 0.0)).session_id
    await s.info(b, 4.0)  # NOTE: reading does not count as use
    assert await s.expire(4.9) == 0
    assert await s.expire(5.1) == 2
    assert removed == [("m/1", "expired"), ("m/1", "expired")]
    with pytest.raises(SessionNotFoundError, match="expired after 5 s idle"):
        await s.info(a, 6.0)
    c = (await s.create("m/1", "c", 10.0)).session_id
    with pytest.raises(SessionNotFoundError, match="expired"):
        await s.model_of(c, 15.5)  # lazily, without a sweep


async def test_the_cap_rejects_new_sessions_or_evicts_the_least_recently_used() -> None:
    """At max_sessions, 'reject' raises a 429-class error; 'evict_lru' removes the least recently used."""
    s, _ = store(max_sessions=2)
    await s.create("m/1", "a", 0.0)
    await s.create("m/1", "b", 0.0)
    with pytest.raises(SessionLimitError, match="maximum of 2 sessions"):
        await s.create("m/1", "c", 1.0)
    await s.delete("a")
    await s.create("m/1", "c", 1.0)

    e, removed = store(max_sessions=2, cap_policy="evict_lru")
    await e.create("m/1", "old", 0.0)
    await e.create("m/1", "new", 1.0)
    leases, _, _ = await e.gather("m/1", ["old"], 2.0)  # a step touches "old": "new" is now least recent
    assert isinstance(leases[0], Lease)
    await e.create("m/1", "newest", 3.0)
    assert removed == [("m/1", "evicted")]
    with pytest.raises(SessionNotFoundError, match="was evicted"):
        await e.info("new", 3.0)
    assert e.count() == 2


async def test_gather_scatter_moves_state_and_counters() -> None:
    """Scatter writes the new state of each lease back to its slot; gather returns it next time."""
    s, _ = store()
    for sid in ("a", "b"):
        await s.create("m/1", sid, 0.0)
    leases, h, _ = await s.gather("m/1", ["b", "a"], 1.0)
    assert h.shape == (2, 2, 8)
    assert not h.any()
    hn = np.arange(32, dtype=np.float32).reshape(2, 2, 8)
    ok = await s.scatter("m/1", leases, hn, -hn, [3, 1], [None, Replay(1, b"d", np.ones((1, 2), np.float32))], 2.0)  # type: ignore[arg-type]
    assert ok == [True, True]
    _, h2, c2 = await s.gather("m/1", ["a", "b"], 3.0)
    np.testing.assert_array_equal(h2[:, 0], hn[:, 1])
    np.testing.assert_array_equal(h2[:, 1], hn[:, 0])
    np.testing.assert_array_equal(c2, -h2)
    b = await s.info("b", 3.0)
    assert (b.steps, b.seq) == (3, 1)


async def test_scatter_skips_a_session_reset_or_deleted_meanwhile() -> None:
    """A reset between gather and scatter wins: the step is not committed and the state stays zero."""
    s, _ = store()
    await s.create("m/1", "a", 0.0)
    await s.create("m/1", "b", 0.0)
    leases, _, _ = await s.gather("m/1", ["a", "b"], 1.0)
    await s.reset("a", 1.5)
    await s.delete("b")
    ones = np.ones((2, 2, 8), np.float32)
    ok = await s.scatter("m/1", leases, ones, ones, [1, 1], [None, None], 2.0)  # type: ignore[arg-type]
    assert ok == [False, False]
    _, h, _ = await s.gather("m/1", ["a"], 3.0)
    assert not h.any()


async def test_export_import_round_trip_and_model_mismatch() -> None:
    """A snapshot restores into a new session with the same state and counters."""
    s, _ = store()
    await s.create("m/1", "a", 0.0)
    leases, _, _ = await s.gather("m/1", ["a"], 1.0)
    state = np.random.default_rng(0).standard_normal((2, 1, 8)).astype(np.float32)
    await s.scatter("m/1", leases, state, state * 2, [5], [None], 1.0)  # type: ignore[arg-type]
    snap = await s.export("a", 2.0)
    assert (snap.model, snap.version, snap.steps, snap.seq) == ("m", "1", 5, 1)
    info, created = await s.restore("copy", "m/1", snap, 3.0)
    assert (info.steps, info.seq, created) == (5, 1, True)
    _, again = await s.restore("copy", "m/1", snap, 3.0)
    assert not again
    with pytest.raises(InvalidInputError, match="between 0 and"):
        await s.restore("huge", "m/1", Snapshot("m", "1", 2**63, 0, snap.h, snap.c), 3.0)
    with pytest.raises(SessionNotFoundError):
        await s.info("huge", 3.0)  # a refused import creates nothing
    _, h, c = await s.gather("m/1", ["copy"], 4.0)
    np.testing.assert_array_equal(h[:, 0], state[:, 0])
    np.testing.assert_array_equal(c[:, 0], state[:, 0] * 2)
    two = MemorySessionStore({"m/1": SIG, "m/2": SIG}, ttl=10, max_sessions=10)
    await two.create("m/2", "x", 0.0)
    with pytest.raises(InvalidInputError, match="runs m/2"):
        await two.restore("x", "m/1", Snapshot("m", "1", 0, 0, snap.h, snap.c), 1.0)


@pytest.mark.parametrize(("layers", "hidden"), [(1, 48), (2, 128)])
async def test_an_idle_session_costs_its_raw_state_plus_a_small_bookkeeping(layers: int, hidden: int) -> None:
    """All memory a session takes (traced, ids and index included) is 2*L*H*4 bytes plus under 256 bytes."""
    sig = Signature(features=4, outputs=7, layers=layers, hidden=hidden)
    s = MemorySessionStore({"m/1": sig}, ttl=60, max_sessions=100_000)
    for _ in range(64):  # NOTE: the first slab; then fill exactly one doubling so no capacity is spare
        await s.create("m/1", None, 0.0)
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    n = 16_384 - 64
    for _ in range(n):
        await s.create("m/1", None, 0.0)
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    raw = 2 * layers * hidden * 4
    per_session = (after - before) / n
    assert raw <= per_session < raw + 256, per_session
