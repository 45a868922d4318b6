"""The protocol-neutral core with a fake runtime: batching, ordering, seq, validation, streams, drain."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from service.core.dataplane import DataPlane, Limits, StreamMessage, StreamOpen
from service.core.sessions import MemorySessionStore
from service.errors import (
    InvalidInputError,
    ModelError,
    OverloadedError,
    SeqConflictError,
    SessionNotFoundError,
    UnavailableError,
)
from service.metrics import Metrics
from tests.fixtures import FakeRuntime, NonFiniteRuntime, fake_repo


async def make_dp(runtime: FakeRuntime | None = None, **limits: float) -> tuple[DataPlane, FakeRuntime]:
    rt = runtime or FakeRuntime()
    repo = fake_repo(rt)
    store = MemorySessionStore({m.key: m.signature for m in repo.all()}, ttl=60, max_sessions=1000)
    dp = DataPlane(repo, store, Metrics(), Limits(**limits))  # type: ignore[arg-type]
    await dp.start()
    return dp, rt


def expected(x_steps: list[np.ndarray]) -> np.ndarray:
    """What FakeRuntime gives for a whole sequence run alone from zero."""
    rt = FakeRuntime()
    x = np.concatenate(x_steps)[None]
    z = np.zeros((1, 1, 4), np.float32)
    return rt.run(x.astype(np.float32), z, z)[0][0]


def rows(seed: int, n: int, t: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (t, 3)).astype(np.float32) for _ in range(n)]


async def test_concurrent_sessions_coalesce_into_batches_with_their_own_results() -> None:
    """Steps of 20 sessions that arrive together share ONNX calls, and each gets its own outputs."""
    dp, rt = await make_dp(FakeRuntime(delay=0.05), max_batch_size=64)
    sids = [(await dp.create_session("fake", None, None)).session_id for _ in range(20)]
    seqs = {sid: rows(i, 3) for i, sid in enumerate(sids)}
    for k in range(3):
        results = await asyncio.gather(*(dp.step(sid, seqs[sid][k]) for sid in sids))
        for sid, r in zip(sids, results, strict=True):
            np.testing.assert_allclose(r.outputs, expected(seqs[sid][: k + 1])[k : k + 1], atol=1e-6)
            assert (r.steps, r.seq) == (k + 1, k + 1)
    assert sum(rt.calls) == 60
    assert len(rt.calls) < 60 / 2  # most steps were batched
    assert max(rt.calls) > 1
    await dp.stop()


async def test_an_idle_server_does_not_wait_for_company() -> None:
    """A lone step runs at once even with a long max_queue_delay."""
    dp, _ = await make_dp(max_queue_delay=2.0)
    sid = (await dp.create_session("fake", None, None)).session_id
    t0 = time.perf_counter()
    for x in rows(0, 5):
        await dp.step(sid, x)
    assert time.perf_counter() - t0 < 1.0
    await dp.stop()


async def test_steps_of_one_session_apply_in_arrival_order_one_per_batch() -> None:
    """Concurrent calls on one session never share a batch and apply in the order they arrived."""
    dp, rt = await make_dp(FakeRuntime(delay=0.01))
    sid = (await dp.create_session("fake", None, None)).session_id
    xs = rows(1, 8)
    results = await asyncio.gather(*(dp.step(sid, x) for x in xs))
    assert [r.seq for r in results] == list(range(1, 9))
    np.testing.assert_allclose(np.concatenate([r.outputs for r in results]), expected(xs), atol=1e-6)
    assert rt.calls == [1] * 8
    await dp.stop()


async def test_calls_with_different_step_counts_run_in_separate_batches() -> None:
    """An LSTM cannot pad steps, so calls with T=1 and T=3 are not mixed; each result is still right."""
    dp, rt = await make_dp(FakeRuntime(delay=0.02))
    a = (await dp.create_session("fake", None, None)).session_id
    b = (await dp.create_session("fake", None, None)).session_id
    xa, xb = rows(2, 1, t=1)[0], rows(3, 1, t=3)[0]
    ra, rb = await asyncio.gather(dp.step(a, xa), dp.step(b, xb))
    np.testing.assert_allclose(ra.outputs, expected([xa]), atol=1e-6)
    np.testing.assert_allclose(rb.outputs, expected([xb]), atol=1e-6)
    assert sorted(rt.calls) == [1, 1]
    await dp.stop()


async def test_seq_retry_replays_without_moving_state_and_a_gap_is_a_conflict() -> None:
    """Resending the last applied seq returns the same outputs; a gap names the expected seq."""
    dp, _ = await make_dp()
    sid = (await dp.create_session("fake", None, None)).session_id
    x1, x2 = rows(4, 2)
    r1 = await dp.step(sid, x1, seq=1)
    again = await dp.step(sid, x1, seq=1)
    assert again.replayed
    np.testing.assert_array_equal(again.outputs, r1.outputs)
    assert (await dp.get_session(sid)).steps == 1
    with pytest.raises(SeqConflictError, match="expected seq 2"):
        await dp.step(sid, x2, seq=3)
    with pytest.raises(SeqConflictError, match="different inputs"):
        await dp.step(sid, x2, seq=1)
    with pytest.raises(InvalidInputError, match="seq must be >= 1"):
        await dp.step(sid, x2, seq=0)
    r2 = await dp.step(sid, x2, seq=2)
    np.testing.assert_allclose(r2.outputs, expected([x1, x2])[1:], atol=1e-6)
    assert (r2.seq, r2.steps) == (2, 2)
    await dp.stop()


async def test_invalid_inputs_are_refused_with_what_to_fix_and_state_untouched() -> None:
    """Wrong rank, wrong feature count, no steps, too many steps and NaN/Inf each get a clear error."""
    dp, _ = await make_dp(max_steps_per_call=10)
    sid = (await dp.create_session("fake", None, None)).session_id
    cases = [
        (np.zeros(3), "list of steps"),
        (np.zeros((1, 2)), "must have 3 feature values (f0, f1, f2)"),
        (np.zeros((0, 3)), "no steps"),
        (np.zeros((11, 3)), "11 steps; the limit per call is 10"),
        (np.array([[0, np.nan, 0]]), "step 0, feature 'f1' is NaN"),
        (np.array([[0, 0, 0], [np.inf, 0, 0]]), "step 1, feature 'f0' is infinite"),
    ]
    for x, message in cases:
        with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            await dp.step(sid, x)
    info = await dp.get_session(sid)
    assert (info.steps, info.seq) == (0, 0)
    await dp.stop()


async def test_non_finite_outputs_fail_the_call_and_keep_the_state() -> None:
    """A row whose outputs are not finite is a model error; its session's state does not move."""
    dp, _ = await make_dp(NonFiniteRuntime())
    sid = (await dp.create_session("fake", None, None)).session_id
    x1 = rows(5, 1)[0]
    await dp.step(sid, x1)
    with pytest.raises(ModelError, match="non-finite"):
        await dp.step(sid, np.full((1, 3), 5000, np.float32))
    x2 = rows(6, 1)[0]
    r = await dp.step(sid, x2)
    np.testing.assert_allclose(r.outputs, expected([x1, x2])[1:], atol=1e-6)
    assert r.steps == 2
    await dp.stop()


async def test_a_full_queue_rejects_quickly_with_overloaded() -> None:
    """Beyond max_queue queued calls, new calls fail at once with a retryable error."""
    dp, _ = await make_dp(FakeRuntime(delay=0.1), max_queue=2, max_batch_size=1)
    sids = [(await dp.create_session("fake", None, None)).session_id for _ in range(6)]
    results = await asyncio.gather(*(dp.step(s, rows(7, 1)[0]) for s in sids), return_exceptions=True)
    rejected = [r for r in results if isinstance(r, OverloadedError)]
    assert len(rejected) == 4
    assert all("retry" in r.message for r in rejected)
    await dp.stop()


async def test_stateless_predict_runs_from_zero_and_batches_with_steps() -> None:
    """Predict returns every step's outputs from a zero state and leaves sessions alone."""
    dp, _ = await make_dp()
    x = np.concatenate(rows(8, 4))
    model, out = await dp.predict("fake", None, x)
    assert model.key == "fake/1"
    np.testing.assert_allclose(out, expected([x]), atol=1e-6)
    await dp.stop()


async def test_drain_refuses_new_work_and_finishes_queued_steps() -> None:
    """After begin_drain, queued steps complete and new calls get a retryable 'unavailable'."""
    dp, _ = await make_dp(FakeRuntime(delay=0.1))
    sid = (await dp.create_session("fake", None, None)).session_id
    inflight = asyncio.create_task(dp.step(sid, rows(9, 1)[0]))
    await asyncio.sleep(0.02)
    dp.begin_drain()
    assert not dp.ready
    with pytest.raises(UnavailableError, match="shutting down"):
        await dp.step(sid, rows(9, 1)[0])
    with pytest.raises(UnavailableError):
        await dp.create_session("fake", None, None)
    await asyncio.wait_for(dp.wait_idle(), 2)
    assert (await inflight).steps == 1
    await dp.stop()


async def msgs(*items: StreamMessage) -> AsyncIterator[StreamMessage]:
    for m in items:
        yield m


async def test_stream_opens_steps_reports_errors_in_band_and_closes_the_session() -> None:
    """One reply per message; a bad message gets an in-band error; the session is deleted at the end."""
    dp, _ = await make_dp()
    xs = rows(10, 2)
    replies = [
        r
        async for r in dp.stream(
            msgs(
                StreamMessage(inputs=None, open=StreamOpen(model="fake", session_id="st-1")),
                StreamMessage(inputs=xs[0]),
                StreamMessage(inputs=np.zeros((1, 5), np.float32)),
                StreamMessage(inputs=xs[1]),
            )
        )
    ]
    assert replies[0].session is not None
    assert replies[0].result is None
    assert replies[2].error is not None
    assert replies[2].error.code.value == "invalid_input"
    np.testing.assert_allclose(
        np.concatenate([replies[1].result.outputs, replies[3].result.outputs]),  # type: ignore[union-attr]
        expected(xs),
        atol=1e-6,
    )
    with pytest.raises(SessionNotFoundError):
        await dp.get_session("st-1")
    kept = [r async for r in dp.stream(msgs(StreamMessage(inputs=xs[0], open=StreamOpen(model="fake", keep=True))))]
    assert (await dp.get_session(kept[0].session_id)).steps == 1
    resumed = [
        r
        async for r in dp.stream(
            msgs(StreamMessage(inputs=xs[1], open=StreamOpen(resume_session_id=kept[0].session_id, keep=True)))
        )
    ]
    np.testing.assert_allclose(resumed[0].result.outputs, expected(xs)[1:], atol=1e-6)  # type: ignore[union-attr]
    with pytest.raises(InvalidInputError, match="first stream message"):
        _ = [r async for r in dp.stream(msgs(StreamMessage(inputs=xs[0])))]
    await dp.stop()


async def test_stopping_fails_running_and_queued_steps_instead_of_hanging() -> None:
    """A stop that cuts a drain short answers every waiting caller with a retryable error."""
    dp, _ = await make_dp(FakeRuntime(delay=0.3), max_batch_size=1)
    a = (await dp.create_session("fake", None, None)).session_id
    b = (await dp.create_session("fake", None, None)).session_id
    running = asyncio.create_task(dp.step(a, rows(11, 1)[0]))
    queued = asyncio.create_task(dp.step(b, rows(12, 1)[0]))
    await asyncio.sleep(0.05)
    await dp.stop()
    for task in (running, queued):
        with pytest.raises(UnavailableError, match="stopped before this step completed"):
            await asyncio.wait_for(task, 1)
