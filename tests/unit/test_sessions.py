"""The in-memory slab session store: lifecycle, expiry, the cap, snapshots and the cost of a session."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from service.core.scoring import Scoring
from service.core.sessions import (
    PAGE,
    Commit,
    CommitStatus,
    Lease,
    MemorySessionStore,
    Replay,
    Snapshot,
    SnapshotFileError,
    read_snapshot,
    write_snapshot,
)
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
    assert await s.count() == 1
    await s.delete(info.session_id)
    assert await s.count() == 0
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
    assert await e.count() == 2


def commits(leases: list[Lease | object], steps: list[int], replays: list[Replay | None] | None = None) -> list[Commit]:
    """The commits the batcher makes for one applied call per lease."""
    out = []
    for n, lease in enumerate(leases):
        assert isinstance(lease, Lease), lease
        out.append(Commit(lease, lease.steps + steps[n], lease.seq + 1, (replays or [None] * len(leases))[n]))
    return out


async def test_gather_commit_moves_state_and_counters() -> None:
    """Commit writes the new state of each lease back; gather returns it next time, row i for id i."""
    s, _ = store()
    for sid in ("a", "b"):
        await s.create("m/1", sid, 0.0)
    leases, h, _ = await s.gather("m/1", ["b", "a"], 1.0)
    assert h.shape == (2, 2, 8)
    assert not h.any()
    hn = np.arange(32, dtype=np.float32).reshape(2, 2, 8)
    replay = Replay(1, b"d" * 16, np.ones((1, 2), np.float32))
    ok = await s.commit("m/1", commits(leases, [3, 1], [None, replay]), hn, -hn, 2.0)
    assert ok == [CommitStatus.COMMITTED, CommitStatus.COMMITTED]
    leases2, h2, c2 = await s.gather("m/1", ["a", "b", "missing"], 3.0)
    np.testing.assert_array_equal(h2[:, 0], hn[:, 1])
    np.testing.assert_array_equal(h2[:, 1], hn[:, 0])
    assert not h2[:, 2].any()  # NOTE: the row of a session that failed is zeros, and the rows stay aligned
    np.testing.assert_array_equal(c2, -h2)
    assert isinstance(leases2[2], SessionNotFoundError)
    b = await s.info("b", 3.0)
    assert (b.steps, b.seq) == (3, 1)
    a = leases2[0]
    assert isinstance(a, Lease)
    assert a.replay is not None
    assert (a.replay.seq, a.replay.digest) == (1, b"d" * 16)
    np.testing.assert_array_equal(a.replay.outputs, replay.outputs)  # type: ignore[arg-type]


async def test_commit_is_a_compare_and_set_stale_after_a_change_gone_after_removal() -> None:
    """A reset, an import or another commit between gather and commit wins (STALE); a deleted or re-created
    session is GONE; nothing of either is written."""
    s, _ = store()
    for sid in ("a", "b", "c", "d"):
        await s.create("m/1", sid, 0.0)
    leases, _, _ = await s.gather("m/1", ["a", "b", "c", "d"], 1.0)
    await s.reset("a", 1.5)
    await s.delete("b")
    first = await s.commit("m/1", commits(leases[2:3], [1]), np.ones((2, 1, 8), np.float32), np.ones((2, 1, 8),
                           np.float32), 1.6)  # fmt: skip
    assert first == [CommitStatus.COMMITTED]
    await s.delete("d")
    await s.create("m/1", "d", 1.7)  # NOTE: the same id, another life
    ones = np.full((2, 4, 8), 7.0, np.float32)
    ok = await s.commit("m/1", commits(leases, [1, 1, 1, 1]), ones, ones, 2.0)
    assert ok == [CommitStatus.STALE, CommitStatus.GONE, CommitStatus.STALE, CommitStatus.GONE]
    _, h, _ = await s.gather("m/1", ["a", "c", "d"], 3.0)
    assert not h[:, 0].any()
    assert (h[:, 1] == 1.0).all()  # the first commit of c, not the stale second
    assert not h[:, 2].any()
    assert ((await s.info("c", 3.0)).seq, (await s.info("d", 3.0)).seq) == (1, 0)


async def test_export_import_round_trip_and_model_mismatch() -> None:
    """A snapshot restores into a new session with the same state and counters."""
    s, _ = store()
    await s.create("m/1", "a", 0.0)
    leases, _, _ = await s.gather("m/1", ["a"], 1.0)
    state = np.random.default_rng(0).standard_normal((2, 1, 8)).astype(np.float32)
    await s.commit("m/1", commits(leases, [5]), state, state * 2, 1.0)
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


@pytest.mark.parametrize(("layers", "hidden", "scored"), [(1, 48, False), (2, 128, False), (2, 240, True)])
async def test_an_idle_session_costs_its_raw_state_plus_a_small_bookkeeping(
    layers: int, hidden: int, scored: bool
) -> None:
    """All memory a session takes (traced, ids and index included) is 2*L*H*4 bytes, plus its live-scoring record
    when its model scores forecasts (horizon 7: 7*7*4 bytes of forecasts and counters), plus under 256 bytes."""
    record = Scoring(7, 1).width if scored else 0
    sig = Signature(features=4, outputs=7, layers=layers, hidden=hidden, extra=record)
    s = MemorySessionStore({"m/1": sig}, ttl=60, max_sessions=100_000)
    for _ in range(PAGE):  # NOTE: the first page; then fill whole pages so no capacity is spare
        await s.create("m/1", None, 0.0)
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    n = 15 * PAGE
    for _ in range(n):
        await s.create("m/1", None, 0.0)
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    raw = 2 * layers * hidden * 4 + record
    per_session = (after - before) / n
    assert raw <= per_session < raw + 256, per_session
    if scored:
        assert record == 7 * 7 * 4 + 7 * 4 + 2 * 7 * 8 + 17


async def test_growing_adds_pages_without_copying_existing_state() -> None:
    """Past a page of sessions the store adds a page; the arrays already holding state are not copied."""
    s, _ = store(max_sessions=10 * PAGE)
    await s.create("m/1", "first", 0.0)
    first_page = s._slabs["m/1"].pages[0].h
    for _ in range(PAGE + 1):
        await s.create("m/1", None, 0.0)
    slab = s._slabs["m/1"]
    assert len(slab.pages) == 2
    assert slab.pages[0].h is first_page
    assert await s.count("m/1") == PAGE + 2


async def test_eviction_at_the_cap_is_exact_lru_with_a_bounded_number_of_scans() -> None:
    """With evict_lru at a cap of 2,000, 2,000 more creates evict the least recently used session each time,
    in order, sessions touched by a step since are spared, and whole-store scans stay rare (amortised O(1))."""
    cap = 2000
    s, removed = store(max_sessions=cap, cap_policy="evict_lru", ttl=1e9)
    for n in range(cap):
        await s.create("m/1", f"s{n}", float(n))
    touched = {f"s{n}" for n in range(0, cap, 7)}
    leases, _, _ = await s.gather("m/1", sorted(touched), float(cap))
    assert all(isinstance(x, Lease) for x in leases)
    for n in range(cap):
        await s.create("m/1", f"new{n}", float(cap + 1 + n))
    assert len(removed) == cap
    untouched = [f"s{n}" for n in range(cap) if f"s{n}" not in touched]
    # NOTE: the untouched old ones go first, oldest first; then the touched ones (touched at the same time)
    evicted = removed_ids(s, removed, cap)
    assert evicted[: len(untouched)] == untouched
    assert set(evicted[len(untouched) :]) <= touched
    assert s.scans <= cap // (cap // 64) + 4, s.scans


def removed_ids(s: MemorySessionStore, removed: list[tuple[str, str]], n: int) -> list[str]:
    """The ids of the evicted sessions in eviction order, from the store's record of removed ids."""
    assert all(reason == "evicted" for _, reason in removed)
    return list(s._gone)[-n:]


async def test_sessions_that_send_seq_cost_their_state_plus_bounded_replay_memory() -> None:
    """With seq in use (a replay kept for each session: digest and the outputs of one step), a session costs
    2*L*H*4 bytes plus under 256 bytes plus its kept outputs and their bookkeeping (under 128 bytes more)."""
    sig = Signature(features=4, outputs=7, layers=1, hidden=48)
    s = MemorySessionStore({"m/1": sig}, ttl=60, max_sessions=100_000)
    for _ in range(PAGE):  # NOTE: the first page; then fill whole pages so no capacity is spare
        await s.create("m/1", None, 0.0)
    n = 7 * PAGE
    outputs = np.ones((1, 7), np.float32)
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    for k in range(n):
        sid = (await s.create("m/1", None, 0.0)).session_id
        leases, _, _ = await s.gather("m/1", [sid], 1.0)
        state = np.zeros((1, 1, 48), np.float32)
        replay = Replay(1, k.to_bytes(16, "little"), outputs)
        await s.commit("m/1", commits(leases, [1], [replay]), state, state, 1.0)
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    raw = 2 * 1 * 48 * 4
    per_session = (after - before) / n
    assert raw <= per_session < raw + 256 + outputs.nbytes + 128, per_session


async def test_a_snapshot_restores_every_session_exactly_and_is_written_atomically(tmp_path: Path) -> None:
    """Sessions of three models (one without a cell state, as a GRU), with state, counters, idle time and kept
    replays, come back as they were; the file appears only whole (no temporary file is left behind)."""
    sigs = {"m/1": SIG, "m/2": Signature(features=4, outputs=3, layers=1, hidden=5),
            "g/1": Signature(features=2, outputs=2, layers=2, hidden=3, cell=0)}  # fmt: skip
    s = MemorySessionStore(sigs, ttl=100, max_sessions=100)
    rng = np.random.default_rng(0)
    for key, sid in (("m/1", "a"), ("m/1", "b"), ("m/2", "c"), ("g/1", "d")):
        await s.create(key, sid, 1.0)
        leases, _, _ = await s.gather(key, [sid], 2.0)
        sig = sigs[key]
        state = rng.standard_normal((sig.layers, 1, sig.hidden)).astype(np.float32)
        replay = Replay(1, rng.bytes(16), rng.standard_normal((2, sig.outputs)).astype(np.float32))
        cell = -state if sig.cell else np.zeros((sig.layers, 1, 0), np.float32)
        await s.commit(key, commits(leases, [2], [replay if sid != "b" else None]), state, cell, 2.0)
    path = tmp_path / "sessions.snapshot"
    assert write_snapshot(s, path, 10.0) == 4
    assert os.listdir(tmp_path) == ["sessions.snapshot"]
    t = MemorySessionStore(sigs, ttl=100, max_sessions=100)
    assert read_snapshot(t, path, 50.0) == 4
    assert (await t.info("a", 50.0)).last_used == 50.0 - 8.0  # idle time carried over (8 s at the snapshot)
    assert (await t.export("d", 50.0)).c.shape == (2, 0)
    for key, sid in (("m/1", "a"), ("m/1", "b"), ("m/2", "c"), ("g/1", "d")):
        before, after = await s.export(sid, 10.0), await t.export(sid, 50.0)
        assert (before.steps, before.seq) == (after.steps, after.seq) == (2, 1)
        np.testing.assert_array_equal(before.h, after.h)
        np.testing.assert_array_equal(before.c, after.c)
        (la,), _, _ = await s.gather(key, [sid], 10.0)
        (lb,), _, _ = await t.gather(key, [sid], 50.0)
        assert isinstance(la, Lease)
        assert isinstance(lb, Lease)
        assert (la.replay is None) == (lb.replay is None) == (sid == "b")
        if la.replay is not None and lb.replay is not None:
            assert la.replay.digest == lb.replay.digest
            np.testing.assert_array_equal(la.replay.outputs, lb.replay.outputs)  # type: ignore[arg-type]


async def test_a_sessions_creation_time_is_a_wall_clock_fact_kept_across_a_snapshot(tmp_path: Path) -> None:
    """`created` is when the session was made, on the wall clock: the same on every read, after a jump of the
    wall clock, and after a snapshot restored an hour later; a file from before `created_at` gives its age."""
    wall = [1_700_000_000.25]
    s = MemorySessionStore({"m/1": SIG}, ttl=10_000, max_sessions=10, wall=lambda: wall[0])
    made = (await s.create("m/1", "a", 5.0)).created
    assert made == wall[0]
    wall[0] += 100.0  # NOTE: NTP, or a VM resumed: the monotonic clock says no time passed
    assert {(await s.info("a", 5.0)).created for _ in range(3)} == {made}
    path = tmp_path / "sessions.snapshot"
    write_snapshot(s, path, 7.0)
    wall[0] += 3600.0  # NOTE: the server was down an hour
    t = MemorySessionStore({"m/1": SIG}, ttl=10_000, max_sessions=10, wall=lambda: wall[0])
    read_snapshot(t, path, 1.0)
    assert (await t.info("a", 1.0)).created == made
    with np.load(path) as z:  # NOTE: the same file as one written before created_at: the age it gives
        old = {k: z[k] for k in z.files if not k.startswith("created_at_")}
    np.savez(path.with_suffix(".old.npz"), **old)  # type: ignore[arg-type]
    u = MemorySessionStore({"m/1": SIG}, ttl=10_000, max_sessions=10, wall=lambda: wall[0])
    read_snapshot(u, path.with_suffix(".old.npz"), 1.0)
    assert (await u.info("a", 1.0)).created == pytest.approx(wall[0] - 100.0)  # NOTE: 100 s old at the write


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "foreign model", "other dimensions", "not npz"])
async def test_a_corrupt_or_foreign_snapshot_is_refused_and_nothing_is_loaded(tmp_path: Path, damage: str) -> None:
    """A damaged file, or one of models this server does not serve as they are, is refused with what to do."""
    s = MemorySessionStore({"m/1": SIG}, ttl=100, max_sessions=100)
    for sid in ("a", "b"):
        await s.create("m/1", sid, 1.0)
    path = tmp_path / "sessions.snapshot"
    write_snapshot(s, path, 2.0)
    target = {"m/1": SIG}
    if damage == "random bytes":
        path.write_bytes(np.random.default_rng(1).bytes(4096))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-200])
    elif damage == "foreign model":
        target = {"other/1": SIG}
    elif damage == "other dimensions":
        target = {"m/1": Signature(features=3, outputs=2, layers=2, hidden=9)}
    else:
        path.write_text("hello")
    t = MemorySessionStore(target, ttl=100, max_sessions=100)
    with pytest.raises(SnapshotFileError, match=r"cannot be restored: .*; move it away to start without it"):
        read_snapshot(t, path, 3.0)
    assert await t.count() == 0
