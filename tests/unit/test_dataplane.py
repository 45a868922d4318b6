"""The protocol-neutral core with a fake runtime: batching, ordering, seq, validation, streams, drain."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.batcher import INLINE_RUN_SECONDS, REPLAY_MAX_BYTES, BlockOutcome, RunCost
from service.core.dataplane import DataPlane, Limits, StepResult, StreamMessage, StreamOpen
from service.core.sessions import MemorySessionStore
from service.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelError,
    OverloadedError,
    SeqConflictError,
    ServeError,
    SessionNotFoundError,
    UnavailableError,
)
from service.metrics import Metrics
from service.repository import ModelRepository
from tests.fixtures import FakeRuntime, GatedRuntime, NonFiniteRuntime, fake_repo


async def make_dp(
    runtime: FakeRuntime | None = None, max_sessions: int = 1000, **limits: float
) -> tuple[DataPlane, FakeRuntime]:
    rt = runtime or FakeRuntime()
    repo = fake_repo(rt)
    store = MemorySessionStore({m.key: m.signature for m in repo.all()}, ttl=60, max_sessions=max_sessions)
    dp = DataPlane(repo, store, Metrics(), Limits(**limits))  # type: ignore[arg-type]
    await dp.start()
    return dp, rt


async def make_shipped_dp(shipped_repo: Path, **limits: float) -> tuple[DataPlane, Metrics]:
    """A started DataPlane over the shipped models (real ONNX Runtime, live scoring) and its metrics."""
    repo = ModelRepository.load(shipped_repo)
    store = MemorySessionStore({m.key: m.signature for m in repo.all()}, ttl=60, max_sessions=100)
    metrics = Metrics()
    dp = DataPlane(repo, store, metrics, Limits(**limits))  # type: ignore[arg-type]
    await dp.start()
    return dp, metrics


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


async def test_a_retry_of_the_last_seq_with_nothing_kept_says_so() -> None:
    """The last applied seq sent again when nothing of its call was kept (the call carried no seq; the session
    was imported with that seq) is refused as a retry that cannot be answered, with the seq to send next; not as
    a seq that 'does not follow' itself."""
    dp, _ = await make_dp()
    sid = (await dp.create_session("fake", None, None)).session_id
    x1, x2 = rows(6, 2)
    await dp.step(sid, x1)  # NOTE: no seq: the session's seq is 1, nothing kept for a retry
    await dp.import_session("copy", await dp.export_session(sid))
    for target in (sid, "copy"):
        with pytest.raises(SeqConflictError) as refused:
            await dp.step(target, x2, seq=1)
        assert "seq 1 is the last applied seq" in refused.value.message
        assert "nothing of that call is kept for a retry" in refused.value.message
        assert refused.value.message.endswith("send seq 2 for new steps")
        assert (await dp.get_session(target)).steps == 1
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
        (np.array([[0, 0, -1e39]]), "step 0, feature 'f2' is infinite or out of float32 range"),
    ]
    for x, message in cases:
        # NOTE: and no RuntimeWarning on the way (a float64 beyond float32 overflowed in the cast, logged each time)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(InvalidInputError, match=re.escape(message)):
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


async def test_a_stream_whose_messages_end_in_a_cancel_ends_and_closes_its_session() -> None:
    """grpc's request iterator raises CancelledError when it tears its call down: the stream ends with it (it
    waited for ever once the messages were read by a task of their own) and deletes the session it opened."""
    dp, _ = await make_dp()

    async def msgs() -> AsyncIterator[StreamMessage]:
        yield StreamMessage(inputs=rows(1, 1)[0], open=StreamOpen(model="fake"))
        await asyncio.sleep(0.05)
        raise asyncio.CancelledError

    replies: list[object] = []

    async def run() -> None:
        async for r in dp.stream(msgs()):
            replies.append(r)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run(), 2)
    assert len(replies) == 1
    assert await dp.store.count() == 0
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


class SwallowsOneCancel(MemorySessionStore):
    """A store whose commit swallows the first cancel that reaches it, as asyncio.wait_for does on Python 3.11 when
    the cancel lands just as the awaited call finishes (the Redis store wraps every call in wait_for)."""

    swallowed = 0

    async def commit(self, *args: Any, **kw: Any) -> Any:
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            self.swallowed += 1
        return await super().commit(*args, **kw)


async def test_a_stop_whose_cancel_a_store_call_swallows_still_stops() -> None:
    """The batch loop is cancelled until it is done: one swallowed cancel left it sleeping on an empty queue, and
    the server's stop waited for ever."""
    rt = FakeRuntime()
    repo = fake_repo(rt)
    store = SwallowsOneCancel({m.key: m.signature for m in repo.all()}, ttl=60, max_sessions=10)
    dp = DataPlane(repo, store, Metrics(), Limits())  # type: ignore[arg-type]
    await dp.start()
    sid = (await dp.create_session("fake", None, None)).session_id
    step = asyncio.create_task(dp.step(sid, rows(5, 1)[0]))
    await asyncio.sleep(0.05)  # NOTE: the step is in its commit
    t0 = time.perf_counter()
    await asyncio.wait_for(dp.stop(), 5)  # NOTE: on a hang, wait_for's own cancel ends it after 5 s
    assert time.perf_counter() - t0 < 2
    assert store.swallowed == 1
    assert (await asyncio.wait_for(step, 1)).steps == 1  # NOTE: the commit went on, and its step was answered


async def test_lone_steps_after_a_burst_wait_at_most_once_and_not_at_all_after_a_pause() -> None:
    """After a burst of 32 concurrent sessions, with a 0.3 s delay: sequential single steps right after it wait
    at most once (the first, for the burst's callers that do not come back), and none after a pause as long as
    the delay. (Before, every lone step waited until a moving average of batch sizes had decayed.)"""
    dp, rt = await make_dp(max_queue_delay=0.3, max_batch_size=64)
    sids = [(await dp.create_session("fake", None, None)).session_id for _ in range(32)]

    async def burst() -> None:
        for k in range(3):
            await asyncio.gather(*(dp.step(sid, rows(k, 1)[0]) for sid in sids))

    async def lone_steps() -> list[float]:
        took = []
        for x in rows(99, 10):
            t0 = time.perf_counter()
            await dp.step(sids[0], x)
            took.append(time.perf_counter() - t0)
        return took

    await burst()
    assert max(rt.calls) == 32  # the burst was batched
    took = await lone_steps()
    assert took[0] < 0.3 + 0.2
    assert sum(took[1:]) < 0.2, took  # NOTE: one more wait of the delay would take 0.3 s
    await burst()
    await asyncio.sleep(0.35)  # quiet, longer than the delay
    took = await lone_steps()
    assert sum(took) < 0.2, took
    await dp.stop()


async def test_queued_company_is_awaited_only_until_the_previous_batch_size_is_back() -> None:
    """With calls queued, a batch waits for as many calls as the previous batch held, then runs at once."""
    dp, rt = await make_dp(max_queue_delay=2.0, max_batch_size=64)
    sids = [(await dp.create_session("fake", None, None)).session_id for _ in range(4)]
    t0 = time.perf_counter()
    for k in range(5):
        await asyncio.gather(*(dp.step(sid, rows(k, 1)[0]) for sid in sids))
    assert time.perf_counter() - t0 < 2.0  # all four came back every round: nobody waited for the delay
    assert rt.calls == [4] * 5
    await dp.stop()


async def test_a_later_call_of_a_session_stays_behind_its_earlier_call_of_another_length() -> None:
    """Queued together: b (T=1), a (T=3), a (T=1). a's T=1 call must not join b's batch ahead of a's T=3 call."""
    dp, rt = await make_dp(GatedRuntime())
    assert isinstance(rt, GatedRuntime)
    a = (await dp.create_session("fake", None, None)).session_id
    b = (await dp.create_session("fake", None, None)).session_id
    blocker = (await dp.create_session("fake", None, None)).session_id
    first = asyncio.create_task(dp.step(blocker, rows(1, 1)[0]))  # NOTE: holds the loop so the three queue up
    await asyncio.to_thread(rt.entered.wait, 5)
    xa3, xa1, xb = rows(2, 1, t=3)[0], rows(3, 1)[0], rows(4, 1)[0]
    calls = [asyncio.create_task(dp.step(b, xb)), asyncio.create_task(dp.step(a, xa3))]
    calls.append(asyncio.create_task(dp.step(a, xa1)))
    await asyncio.sleep(0)
    rt.release.set()
    await first
    rb, ra3, ra1 = await asyncio.gather(*calls)
    assert (ra3.seq, ra3.steps, ra1.seq, ra1.steps, rb.seq) == (1, 3, 2, 4, 1)
    np.testing.assert_allclose(ra1.outputs, expected([xa3, xa1])[3:], atol=1e-6)
    assert rt.calls == [1, 1, 1, 1]
    await dp.stop()


@pytest.mark.parametrize("race", ["delete", "reset"])
async def test_a_step_racing_a_delete_or_reset_is_answered_with_what_won(race: str) -> None:
    """A step whose session is deleted or reset while its batch runs is not applied and not answered as a
    success: session_not_found after a delete, seq_conflict after a reset (the session stays at zero)."""
    dp, rt = await make_dp(GatedRuntime())
    assert isinstance(rt, GatedRuntime)
    sid = (await dp.create_session("fake", None, None)).session_id
    running = asyncio.create_task(dp.step(sid, rows(1, 1)[0], seq=1))
    await asyncio.to_thread(rt.entered.wait, 5)
    if race == "delete":
        await dp.delete_session(sid)
    else:
        await dp.reset_session(sid)
    rt.release.set()
    if race == "delete":
        with pytest.raises(SessionNotFoundError, match="while this step ran; the step was not applied"):
            await running
        return
    with pytest.raises(
        SeqConflictError, match=r"was changed .* while this step ran; the step was not applied: expected seq 1$"
    ):
        await running
    info = await dp.get_session(sid)
    assert (info.steps, info.seq) == (0, 0)
    x = rows(2, 1)[0]
    np.testing.assert_allclose((await dp.step(sid, x, seq=1)).outputs, expected([x]), atol=1e-6)
    await dp.stop()


async def test_a_submit_after_stop_is_refused_at_once() -> None:
    """A call that reaches a stopped batcher gets 'unavailable' instead of waiting forever."""
    dp, _ = await make_dp()
    await dp.stop()
    with pytest.raises(UnavailableError, match="stopped"):
        await asyncio.wait_for(dp.predict("fake", None, rows(1, 1)[0]), 2)


async def test_a_stream_without_a_first_message_ends_after_the_open_timeout() -> None:
    """A stream whose client never sends its first message ends with deadline_exceeded, not never."""
    dp, _ = await make_dp(stream_open_timeout=0.2)

    async def silent() -> AsyncIterator[StreamMessage]:
        await asyncio.Event().wait()
        yield StreamMessage(inputs=None)  # pragma: no cover - never reached

    t0 = time.perf_counter()
    with pytest.raises(DeadlineExceededError, match=r"no first message within 0\.2 s"):
        _ = [r async for r in dp.stream(silent())]
    assert time.perf_counter() - t0 < 2
    await dp.stop()


async def test_expiry_follows_the_monotonic_clock_and_sessions_show_wall_time() -> None:
    """A wall-clock jump neither expires nor revives sessions; clients still see Unix times."""
    mono, wall = [100.0], [1_700_000_000.0]
    repo = fake_repo()
    store = MemorySessionStore({m.key: m.signature for m in repo.all()}, ttl=60, max_sessions=10, wall=lambda: wall[0])
    dp = DataPlane(repo, store, Metrics(), Limits(session_ttl=60), clock=lambda: mono[0])
    info = await dp.create_session("fake", None, "clocked")
    assert (info.created, info.expires) == (wall[0], wall[0] + 60)
    wall[0] += 3600  # NOTE: the wall clock jumps an hour (NTP, a VM resumed); the session was idle 0 s
    assert (await dp.get_session("clocked")).last_used == 1_700_000_000.0 + 3600
    assert (await dp.get_session("clocked")).created == 1_700_000_000.0  # NOTE: when it was made, as it was shown
    mono[0] += 61
    with pytest.raises(SessionNotFoundError, match="expired"):
        await dp.get_session("clocked")
    assert DataPlane.__init__.__defaults__ == (time.monotonic,)  # type: ignore[misc]


async def test_resume_on_a_new_stream_survives_the_old_stream_closing_later() -> None:
    """A stream that opened a session and is reaped after another stream resumed it does not delete it;
    and a stream never deletes a later session that took its id."""
    dp, _ = await make_dp()
    gate = asyncio.Event()

    async def old_stream() -> AsyncIterator[StreamMessage]:
        yield StreamMessage(inputs=rows(1, 1)[0], open=StreamOpen(model="fake", session_id="half-open"))
        await gate.wait()

    old = dp.stream(old_stream())
    assert (await anext(old)).result is not None
    resumed = [r async for r in dp.stream(msgs(StreamMessage(inputs=rows(2, 1)[0], open=StreamOpen(
        resume_session_id="half-open"))))]  # fmt: skip
    assert resumed[0].result is not None
    assert resumed[0].result.seq == 2
    gate.set()
    await old.aclose()  # the old stream is reaped now
    assert (await dp.get_session("half-open")).steps == 2

    async def first_life() -> AsyncIterator[StreamMessage]:
        yield StreamMessage(inputs=None, open=StreamOpen(model="fake", session_id="reused"))
        await gate2.wait()

    gate2 = asyncio.Event()
    life = dp.stream(first_life())
    await anext(life)
    await dp.delete_session("reused")
    await dp.create_session("fake", None, "reused")  # another client takes the id
    await life.aclose()
    assert (await dp.get_session("reused")).steps == 0  # the later session is untouched
    await dp.stop()


@pytest.mark.parametrize("n", [3, 20])  # NOTE: 20 calls at once run as a block (BLOCK_ROUTE_ROWS), 3 one by one
async def test_steps_for_one_life_of_an_id_are_refused_by_a_later_session_of_that_id(n: int) -> None:
    """Calls queued for one life of each session id (as a stream's are) run on the sessions still in that life
    and are refused (session_not_found) by sessions created again under the id, which they leave unchanged."""
    dp, rt = await make_dp()
    infos = [await dp.create_session("fake", None, f"life-{i}") for i in range(n)]
    replaced = set(range(0, n, 2))
    for i in replaced:
        await dp.delete_session(f"life-{i}")
        await dp.create_session("fake", None, f"life-{i}")
    batcher = dp._batchers["fake/1"]
    x = rows(3, n)
    got = await asyncio.gather(
        *(batcher.submit(f"life-{i}", x[i], None, life=info.life) for i, info in enumerate(infos)),
        return_exceptions=True,
    )
    assert rt.calls == [n - len(replaced)]  # NOTE: one batch, as one block or item by item
    for i, r in enumerate(got):
        if i in replaced:
            assert isinstance(r, SessionNotFoundError)
            assert "a new session took its id" in r.message
            assert (await dp.get_session(f"life-{i}")).steps == 0
        else:
            assert not isinstance(r, BaseException)
            assert r.steps == 1
    await dp.stop()


async def test_a_first_stream_message_may_not_both_open_and_resume() -> None:
    """Naming a model and a session to resume in one first message is refused, not silently resolved."""
    dp, _ = await make_dp()
    await dp.create_session("fake", None, "there")
    with pytest.raises(InvalidInputError, match="not both"):
        _ = [r async for r in dp.stream(msgs(StreamMessage(inputs=None, open=StreamOpen(
            model="fake", resume_session_id="there"))))]  # fmt: skip
    await dp.stop()


async def test_inference_time_excludes_the_wait_for_an_executor_thread() -> None:
    """lstm_inference_seconds times the ONNX run only: a step that waited 0.3 s for a busy thread records ~0."""
    dp, _ = await make_dp()
    sid = (await dp.create_session("fake", None, None)).session_id
    dp._batchers["fake/1"].executor.submit(time.sleep, 0.3)  # NOTE: the model's only ONNX Runtime thread is busy
    t0 = time.perf_counter()
    await dp.step(sid, rows(1, 1)[0])
    assert time.perf_counter() - t0 >= 0.25
    inference = dp.metrics.registry.get_sample_value("lstm_inference_seconds_sum", {"model": "fake/1"})
    assert inference is not None
    assert inference < 0.1
    await dp.stop()


async def test_replays_keep_small_outputs_and_refuse_a_retry_of_a_large_call() -> None:
    """The outputs of a call with seq are kept for a retry up to REPLAY_MAX_BYTES; a retry of a larger call is
    refused with advice, and the session moves on with the next seq."""
    dp, _ = await make_dp()
    sid = (await dp.create_session("fake", None, None)).session_id
    big = rows(1, 1, t=REPLAY_MAX_BYTES // 8 + 1)[0]  # NOTE: 2 outputs of 4 bytes per step: just over the limit
    await dp.step(sid, big, seq=1)
    with pytest.raises(SeqConflictError, match="too large to keep for a retry"):
        await dp.step(sid, big, seq=1)
    r = await dp.step(sid, rows(2, 1)[0], seq=2)
    again = await dp.step(sid, rows(2, 1)[0], seq=2)
    assert again.replayed
    np.testing.assert_array_equal(again.outputs, r.outputs)
    await dp.stop()


async def test_a_failing_session_store_is_unavailable_not_a_model_error() -> None:
    """When the store cannot be read or written, steps get a retryable 'unavailable', not a 500."""
    dp, _ = await make_dp()
    sid = (await dp.create_session("fake", None, None)).session_id

    async def down(*_: object) -> None:
        raise ConnectionError("store down")

    for method in ("gather", "commit"):
        original = getattr(dp.store, method)
        setattr(dp.store, method, down)
        with pytest.raises(UnavailableError, match="session store did not answer"):
            await dp.step(sid, rows(1, 1)[0])
        setattr(dp.store, method, original)
    assert (await dp.step(sid, rows(1, 1)[0])).seq == 1  # nothing was committed by the failed calls
    await dp.stop()


async def test_a_session_whose_next_call_is_already_queued_is_not_awaited() -> None:
    """Pipelined calls on one session run back to back: the batcher does not wait for a caller that is
    already queued (here with a 0.5 s delay, 8 calls take far less than one delay)."""
    dp, rt = await make_dp(max_queue_delay=0.5)
    sid = (await dp.create_session("fake", None, None)).session_id
    t0 = time.perf_counter()
    results = await asyncio.gather(*(dp.step(sid, x) for x in rows(5, 8)))
    assert time.perf_counter() - t0 < 0.4
    assert [r.seq for r in results] == list(range(1, 9))
    assert rt.calls == [1] * 8
    await dp.stop()


async def test_a_step_that_waited_past_its_deadline_is_not_run() -> None:
    """A call still queued when its deadline passes is answered deadline_exceeded and the session does not move;
    the server default applies to calls that name no deadline."""
    dp, rt = await make_dp(GatedRuntime(), default_deadline=0.05)
    assert isinstance(rt, GatedRuntime)
    blocker = (await dp.create_session("fake", None, None)).session_id
    late = (await dp.create_session("fake", None, None)).session_id
    running = asyncio.create_task(dp.step(blocker, rows(1, 1)[0], queue_timeout=10))
    await asyncio.to_thread(rt.entered.wait, 5)
    own = asyncio.create_task(dp.step(late, rows(2, 1)[0], seq=1, queue_timeout=0.05))
    default = asyncio.create_task(dp.predict("fake", None, rows(3, 1)[0]))
    patient = asyncio.create_task(dp.step(late, rows(4, 1)[0], queue_timeout=10))
    await asyncio.sleep(0.2)
    rt.release.set()
    assert (await running).seq == 1
    for task in (own, default):
        with pytest.raises(DeadlineExceededError, match="past its deadline; it was not run"):
            await task
    assert (await patient).seq == 1  # the first step that ran on this session: the late one never applied
    assert rt.calls == [1, 1]
    await dp.stop()


async def test_overload_is_shed_at_once_and_accepted_steps_wait_boundedly() -> None:
    """With 50 ms per call and a 0.2 s queue-wait bound, 20 calls at once: those expected to wait longer are
    refused at once (overloaded, well under 20 ms), the accepted ones finish within the bound plus their own
    run, and a call after the burst is served at once."""
    dp, _ = await make_dp(FakeRuntime(delay=0.05), max_batch_size=1, max_queue_wait=0.2)
    sids = [(await dp.create_session("fake", None, None)).session_id for _ in range(21)]
    await dp.step(sids[0], rows(0, 1)[0])  # NOTE: measures the time per call

    messages: list[str] = []

    async def timed(sid: str) -> tuple[bool, float]:
        t0 = time.perf_counter()
        try:
            await dp.step(sid, rows(1, 1)[0])
        except OverloadedError as e:
            messages.append(e.message)
            return False, time.perf_counter() - t0
        return True, time.perf_counter() - t0

    results = await asyncio.gather(*(timed(sid) for sid in sids[1:]))
    accepted = [t for ok, t in results if ok]
    refused = [t for ok, t in results if not ok]
    assert all("is overloaded: a step would wait about" in m for m in messages)
    assert 3 <= len(accepted) <= 7, results
    assert max(refused) < 0.02
    assert max(accepted) < 0.2 + 0.2  # the bound, plus a run and the batcher's own time
    assert (await dp.step(sids[0], rows(2, 1)[0])).seq == 2
    await dp.stop()


async def test_a_step_batch_of_many_sessions_runs_in_full_batches_and_each_item_gets_its_own_answer() -> None:
    """300 sessions in one step batch (plus a bad item, a repeated session and an unknown one) run as full
    batches of max_batch_size in order; each session gets the outputs of its own run from zero, each bad
    item its own error, and a second batch with seq continues every session."""
    dp, rt = await make_dp(max_batch_size=64)
    sids = [(await dp.create_session("fake", None, f"s{i}")).session_id for i in range(300)]
    xs = [rows(i, 1)[0] for i in range(300)]
    items: list[tuple[str, np.ndarray | ServeError, int | None]] = [(s, x, None) for s, x in zip(sids, xs, strict=True)]
    await dp.create_session("fake", None, "extra")
    items += [("s0", xs[0], None), ("extra", np.zeros((1, 5), np.float32), None), ("nobody", xs[0], None)]
    rt.calls.clear()
    got = await dp.step_batch(items)
    assert rt.calls == [64, 64, 64, 64, 44]  # NOTE: the unknown session fills a place of the last batch, not a run
    for x, r in zip(xs, got[:300], strict=True):
        assert isinstance(r, StepResult)
        assert (r.steps, r.seq) == (1, 1)
        np.testing.assert_allclose(r.outputs, expected([x]), atol=1e-6)
    repeated, bad, unknown = got[300:]
    assert isinstance(repeated, InvalidInputError)
    assert "in this step batch already" in repeated.message
    assert isinstance(bad, InvalidInputError)
    assert "feature values" in bad.message
    assert isinstance(unknown, SessionNotFoundError)
    again = await dp.step_batch([(s, x, 2) for s, x in zip(sids, xs, strict=True)])
    for x, r in zip(xs, again, strict=True):
        assert isinstance(r, StepResult)
        assert (r.steps, r.seq) == (2, 2)
        np.testing.assert_allclose(r.outputs, expected([x, x])[1:], atol=1e-6)
    await dp.stop()


async def test_counters_never_pass_their_maximum() -> None:
    """A session imported at the largest seq refuses a further step (reset it) instead of overflowing the
    documented range; after a reset it steps again."""
    from service.core.sessions import MAX_COUNTER, Snapshot

    dp, _ = await make_dp()
    zeros = np.zeros((1, 4), np.float32)
    await dp.import_session("full", Snapshot("fake", "1", 0, MAX_COUNTER - 1, zeros, zeros))
    with pytest.raises(SeqConflictError, match="largest step count or seq"):
        await dp.step("full", rows(1, 1)[0])
    assert (await dp.get_session("full")).seq == MAX_COUNTER - 1
    await dp.reset_session("full")
    assert (await dp.step("full", rows(1, 1)[0])).seq == 1
    await dp.stop()


def block_error_codes(out: BlockOutcome) -> dict[int, str]:
    return {i: e.code.value for i, e in out.errors.items()}


async def test_a_packed_block_spanning_pages_runs_in_chunks_of_block_rows_and_matches_single_steps() -> None:
    """1,500 sessions (two pages of slots) stepped as one [K, T, F] block run in ONNX calls of block_rows rows
    (pipelined); each row gets its own run's outputs and counters, as single steps of the same sessions do."""
    dp, rt = await make_dp(max_sessions=2000, block_rows=64)
    k = 1500
    sids = [(await dp.create_session("fake", None, f"p{i}")).session_id for i in range(k)]
    twins = [(await dp.create_session("fake", None, f"q{i}")).session_id for i in range(3)]
    x1 = np.stack(rows(1, k, t=2))
    rt.calls.clear()
    got = await dp.step_block(sids, x1, np.full(k, 1, np.uint64))
    assert rt.calls == [64] * 23 + [28]
    assert not got.errors
    assert (got.steps == 2).all()
    assert (got.seq == 1).all()
    assert not got.replayed.any()
    x2 = np.stack(rows(2, k, t=1))
    again = await dp.step_block(sids, x2, None)
    assert (again.steps == 3).all()
    assert (again.seq == 2).all()
    for i in (0, 1023, 1024, k - 1):  # NOTE: both pages, and the rows at their edge
        np.testing.assert_allclose(got.outputs[i], expected([x1[i]]), atol=1e-6)
        np.testing.assert_allclose(again.outputs[i], expected([x1[i], x2[i]])[2:], atol=1e-6)
    for j, twin in enumerate(twins):  # NOTE: the same calls one at a time give the same answers
        a = await dp.step(twin, x1[j], seq=1)
        b = await dp.step(twin, x2[j])
        np.testing.assert_array_equal(a.outputs, got.outputs[j])
        np.testing.assert_array_equal(b.outputs, again.outputs[j])
        assert (b.steps, b.seq) == (3, 2)
    await dp.stop()


async def test_packed_rows_fail_alone_as_single_steps_would_and_leave_their_sessions_unchanged() -> None:
    """In one block: a retry of the last seq replays its outputs, other rows get the error a single step of
    theirs gets (unknown, repeated or invalid id, NaN, a seq gap, a retry with other inputs, full counters),
    and only the good rows move their sessions."""
    from service.core.sessions import MAX_COUNTER, Snapshot

    dp, _ = await make_dp()
    for name in ("good", "retry", "gap", "other", "nan"):
        await dp.create_session("fake", None, name)
    zeros = np.zeros((1, 4), np.float32)
    await dp.import_session("full", Snapshot("fake", "1", 0, MAX_COUNTER - 1, zeros, zeros))
    first = rows(1, 1)[0]
    r = await dp.step("retry", first, seq=1)
    await dp.step("other", first, seq=1)
    ids = ["good", "retry", "nobody", "good", "bad id!", "gap", "other", "nan", "full"]
    x = np.stack([rows(10 + i, 1)[0] for i in range(len(ids))])
    x[1] = first  # NOTE: the same inputs as seq 1: a retry
    x[7, 0, 1] = np.nan
    seq = np.array([1, 1, 0, 0, 0, 5, 1, 0, 0], np.uint64)
    out = await dp.step_block(ids, x, seq)
    assert block_error_codes(out) == {
        2: "session_not_found", 3: "invalid_input", 4: "invalid_input", 5: "seq_conflict", 6: "seq_conflict",
        7: "invalid_input", 8: "seq_conflict",
    }  # fmt: skip
    assert "in this step batch already" in out.errors[3].message
    assert "different inputs" in out.errors[6].message
    assert "NaN" in out.errors[7].message
    assert "largest step count or seq" in out.errors[8].message
    assert out.replayed.tolist() == [False, True] + [False] * 7
    np.testing.assert_array_equal(out.outputs[1], r.outputs)
    assert (out.steps[:2].tolist(), out.seq[:2].tolist()) == ([1, 1], [1, 1])
    assert not out.outputs[2:].any()
    assert not out.steps[2:].any()
    for sid, (steps, seq_now) in {
        "good": (1, 1),
        "retry": (1, 1),
        "gap": (0, 0),
        "other": (1, 1),
        "nan": (0, 0),
    }.items():
        info = await dp.get_session(sid)
        assert (info.steps, info.seq) == (steps, seq_now), sid
    for bad in (np.zeros((2, 1, 3), np.float32), np.zeros((1, 0, 3), np.float32), np.zeros((1, 1, 5), np.float32)):
        got = dp.step_block(["good"], bad)
        if bad.shape[0] != 1:
            with pytest.raises(InvalidInputError, match="one row per session id"):
                await got
        elif bad.shape[1] == 0:
            with pytest.raises(InvalidInputError, match="no steps"):
                await got
        else:
            assert "feature values" in (await got).errors[0].message
    with pytest.raises(InvalidInputError, match="limit per call"):
        await dp.step_block(["good"], np.zeros((1, 5000, 3), np.float32))
    await dp.stop()


@pytest.mark.parametrize("race", ["delete", "reset"])
async def test_a_block_racing_a_delete_or_reset_answers_that_row_with_what_won(race: str) -> None:
    """A session deleted or reset while its block runs is not written and its row says why; the other rows
    are applied."""
    dp, rt = await make_dp(GatedRuntime())
    assert isinstance(rt, GatedRuntime)
    ids = [(await dp.create_session("fake", None, f"r{i}")).session_id for i in range(3)]
    running = asyncio.create_task(dp.step_block(ids, np.stack(rows(1, 3)), np.ones(3, np.uint64)))
    await asyncio.to_thread(rt.entered.wait, 5)
    await (dp.delete_session(ids[1]) if race == "delete" else dp.reset_session(ids[1]))
    rt.release.set()
    out = await running
    assert block_error_codes(out) == {1: "session_not_found" if race == "delete" else "seq_conflict"}
    assert "while this step ran" in out.errors[1].message
    assert [(await dp.get_session(s)).steps for s in (ids[0], ids[2])] == [1, 1]
    if race == "reset":
        assert (await dp.get_session(ids[1])).steps == 0
    await dp.stop()


async def test_a_block_keeps_its_place_among_single_steps_of_its_sessions() -> None:
    """Queued behind a single step of one of its sessions and ahead of another, a block runs between them."""
    dp, rt = await make_dp(GatedRuntime())
    assert isinstance(rt, GatedRuntime)
    ids = [(await dp.create_session("fake", None, f"o{i}")).session_id for i in range(3)]
    blocker = (await dp.create_session("fake", None, None)).session_id
    first = asyncio.create_task(dp.step(blocker, rows(1, 1)[0]))
    await asyncio.to_thread(rt.entered.wait, 5)
    before = asyncio.create_task(dp.step(ids[0], rows(2, 1)[0], seq=1))
    block = asyncio.create_task(dp.step_block(ids, np.stack(rows(3, 3)), np.array([2, 1, 1], np.uint64)))
    await asyncio.sleep(0)
    after = asyncio.create_task(dp.step(ids[0], rows(4, 1)[0], seq=3))
    await asyncio.sleep(0)
    rt.release.set()
    await first
    b, out, a = await asyncio.gather(before, block, after)
    assert (b.seq, out.seq.tolist(), a.seq) == (1, [2, 1, 1], 3)
    assert not out.errors
    assert rt.calls == [1, 1, 3, 1]
    await dp.stop()


async def test_a_block_larger_than_the_queue_is_overloaded_and_one_past_its_deadline_is_not_run() -> None:
    """A block counts one queued call per row; every row of a refused or late block says so, none ran."""
    dp, rt = await make_dp(GatedRuntime(), max_queue=4, default_deadline=0.05)
    assert isinstance(rt, GatedRuntime)
    ids = [(await dp.create_session("fake", None, f"d{i}")).session_id for i in range(5)]
    refused = await dp.step_block(ids, np.stack(rows(1, 5)))  # NOTE: as items of a step batch, each row says so
    assert block_error_codes(refused) == dict.fromkeys(range(5), "overloaded")
    blocker = (await dp.create_session("fake", None, None)).session_id
    first = asyncio.create_task(dp.step(blocker, rows(1, 1)[0], queue_timeout=10))
    await asyncio.to_thread(rt.entered.wait, 5)
    late = asyncio.create_task(dp.step_block(ids[:3], np.stack(rows(2, 3))))
    await asyncio.sleep(0.1)
    rt.release.set()
    await first
    assert {e.code.value for e in (await late).errors.values()} == {"deadline_exceeded"}
    assert [(await dp.get_session(s)).steps for s in ids] == [0] * 5
    await dp.stop()


async def test_a_block_of_unknown_sessions_on_a_version_without_sessions_is_not_found() -> None:
    """Before any session exists on the model version, a block's unknown ids are session_not_found, as a single
    step says (not 'unavailable' from an empty slab)."""
    dp, _ = await make_dp()
    with pytest.raises(SessionNotFoundError):
        await dp.step("nobody", rows(1, 1)[0])
    out = await dp.step_block(["nobody", "none"], np.stack(rows(1, 2)))
    assert block_error_codes(out) == {0: "session_not_found", 1: "session_not_found"}
    await dp.stop()


async def test_stopping_mid_block_keeps_the_answers_of_rows_already_committed() -> None:
    """A batcher stopped while a later chunk of a block runs answers the rows of committed chunks with their
    results (their sessions moved) and only the others 'unavailable' (not applied: a retry is safe)."""
    dp, _ = await make_dp(FakeRuntime(delay=0.3), block_rows=1)
    ids = [(await dp.create_session("fake", None, f"m{i}")).session_id for i in range(3)]
    running = asyncio.create_task(dp.step_block(ids, np.stack(rows(1, 3))))
    for _ in range(500):  # NOTE: until the first chunk (one row) is committed, at most 5 s
        if (await dp.get_session(ids[0])).steps:
            break
        await asyncio.sleep(0.01)
    await dp._batchers["fake/1"].stop()
    out = await running
    assert block_error_codes(out) == {1: "unavailable", 2: "unavailable"}
    assert (out.steps[0], out.seq[0]) == (1, 1)
    assert [(await dp.get_session(s)).steps for s in ids] == [1, 0, 0]


async def test_a_block_across_models_with_different_outputs_fails_the_other_rows_alone() -> None:
    """One answer array has one width: rows of a model with another number of outputs than the first row's fail
    alone with what to do; the rows of the first row's model are answered with their own outputs."""
    narrow, wide = FakeRuntime(outputs=2), FakeRuntime(outputs=3)
    a, b = fake_repo(narrow, "narrow").get("narrow"), fake_repo(wide, "wide").get("wide")
    repo = ModelRepository([a, b])
    store = MemorySessionStore({m.key: m.signature for m in repo.all()}, ttl=60, max_sessions=10)
    dp = DataPlane(repo, store, Metrics(), Limits())
    await dp.start()
    for name, sid in (("narrow", "n"), ("narrow", "twin"), ("wide", "w")):
        await dp.create_session(name, None, sid)
    x = np.stack(rows(1, 2))
    out = await dp.step_block(["n", "w"], x)
    assert block_error_codes(out) == {1: "invalid_input"}
    assert "send it separately" in out.errors[1].message
    assert out.outputs.shape == (2, 1, 2)
    np.testing.assert_array_equal(out.outputs[0], (await dp.step("twin", x[0])).outputs)
    assert (await dp.get_session("w")).steps == 0
    await dp.stop()


async def test_a_step_batch_of_many_items_of_one_shape_answers_item_by_item_as_the_item_path_does() -> None:
    """Twelve items of one [T, F] shape (which run as one block, in one ONNX call) answer item by item as the item
    path does: outputs and counters, a replayed retry, a seq gap, a repeated session and an unknown one."""
    dp, rt = await make_dp()
    sids = [(await dp.create_session("fake", None, f"u{i}")).session_id for i in range(9)]
    xs = rows(7, 12, t=2)
    first = await dp.step("u0", xs[0], seq=1)
    items: list[tuple[str, np.ndarray | ServeError, int | None]] = [
        (s, x, None) for s, x in zip(sids, xs, strict=False)
    ]
    items[0] = ("u0", xs[0], 1)  # NOTE: a retry of seq 1 with the same inputs
    items[1] = ("u1", xs[1], 3)  # NOTE: a gap
    items += [("u2", xs[9], None), ("nobody", xs[10], None), ("u8", xs[11], 1)]
    rt.calls.clear()
    got = await dp.step_batch(items)
    assert rt.calls == [7]  # NOTE: one run for the seven items that apply (u2 to u8), as a block
    replay, gap, *fresh = got[:9]
    assert isinstance(replay, StepResult)
    assert replay.replayed
    np.testing.assert_array_equal(replay.outputs, first.outputs)
    assert isinstance(gap, SeqConflictError)
    assert "expected seq 1" in gap.message
    for x, r in zip(xs[2:9], fresh, strict=True):
        assert isinstance(r, StepResult)
        assert (r.steps, r.seq) == (2, 1)
        np.testing.assert_allclose(r.outputs, expected([x]), atol=1e-6)
    repeated, unknown, last = got[9:]
    assert isinstance(repeated, InvalidInputError)
    assert "in this step batch already" in repeated.message
    assert isinstance(unknown, SessionNotFoundError)
    assert isinstance(last, InvalidInputError)  # NOTE: u8 is repeated too (its first item ran)
    await dp.stop()


async def test_item_batches_that_could_run_as_a_block_answer_as_the_item_path_at_its_edges() -> None:
    """Batches of eight or more items of one shape answer exactly as seven do (the item path): sessions of two
    served models with different numbers of outputs all step, a deadline says what a single step's says, and an
    odd dtype from an in-process caller fails alone."""
    narrow, wide = fake_repo(FakeRuntime(outputs=2), "narrow").get("narrow"), fake_repo(FakeRuntime(outputs=3), "wide")
    repo = ModelRepository([narrow, wide.get("wide")])
    store = MemorySessionStore({m.key: m.signature for m in repo.all()}, ttl=60, max_sessions=100)
    dp = DataPlane(repo, store, Metrics(), Limits())
    await dp.start()
    for i in range(8):
        await dp.create_session("narrow" if i < 4 else "wide", None, f"s{i}")
    xs = rows(1, 8)

    async def answers(n: int, odd: np.ndarray | None = None, **kw: float) -> list[str]:
        for i in range(8):
            await dp.reset_session(f"s{i}")
        items: list[tuple[str, np.ndarray | ServeError, int | None]] = [
            (f"s{i}", odd if odd is not None and i == 1 else xs[i], None) for i in range(n)
        ]
        got = await dp.step_batch(items, **kw)
        return [r.message.split(" ms")[-1] if isinstance(r, ServeError) else f"{r.outputs.shape}" for r in got][:7]

    assert await answers(8) == await answers(7)
    assert "(1, 3)" in await answers(8)  # NOTE: the wide sessions' own outputs, not padded or refused
    assert await answers(8, queue_timeout=-1) == await answers(7, queue_timeout=-1)
    odd = np.ones((1, 3), np.bool_)
    assert (await answers(8, odd))[1] == (await answers(7, odd))[1] == "inputs must be numbers"
    await dp.stop()


async def test_a_one_feature_model_asks_for_one_feature_value_in_the_singular(shipped_repo: Path) -> None:
    """The hourly shipped model takes one feature: its shape errors say '1 feature value (temp)', in words a user
    reads without stumbling, and the state is untouched."""
    dp, _ = await make_shipped_dp(shipped_repo)
    sid = (await dp.create_session("seattle-temps", None, None)).session_id
    with pytest.raises(InvalidInputError, match=r"each step must have 1 feature value \(temp\) for"):
        await dp.step(sid, np.zeros((1, 2), np.float32))
    with pytest.raises(InvalidInputError, match=r"each a list of 1 number \(\[T, F\]\)"):
        await dp.step(sid, np.zeros(3, np.float32))
    assert (await dp.get_session(sid)).steps == 0
    await dp.stop()


async def test_a_busy_batch_answers_every_step_as_it_would_be_answered_alone(shipped_repo: Path) -> None:
    """Twenty sessions stepping together run as one block (whole-array gather, scoring and commit); every answer
    (outputs, counters, a replayed retry, a seq conflict, an unknown session) and every session's state and live
    accuracy afterwards equal those of the same calls made one at a time on a twin server."""
    rng = np.random.default_rng(7)  # NOTE: weather-like rows: precipitation, temp_max, temp_min, wind
    rows_of = [rng.normal([3, 15, 8, 3], [4, 6, 4, 1.5], (6, 4)).astype(np.float32) for _ in range(20)]

    async def twin() -> tuple[DataPlane, Metrics]:
        dp, metrics = await make_shipped_dp(shipped_repo, max_batch_size=64)
        for i in range(20):
            await dp.create_session("seattle-weather", None, f"s{i}")
        return dp, metrics

    def calls(k: int) -> list[tuple[str, np.ndarray, int | None]]:
        out: list[tuple[str, np.ndarray, int | None]] = [(f"s{i}", rows_of[i][k : k + 1], k + 1) for i in range(20)]
        if k >= 1:
            out[3] = ("s3", rows_of[3][k - 1 : k], k)  # NOTE: a retry of the last applied seq: replayed
            out[5] = ("s5", rows_of[5][k : k + 1], k + 5)  # NOTE: a seq that does not follow: a conflict
        out[7] = ("s7", rows_of[7][k : k + 1], None)  # NOTE: no seq
        out.append(("nobody", rows_of[0][k : k + 1], None))  # NOTE: an unknown session
        return out

    async def answer(dp: DataPlane, sid: str, x: np.ndarray, seq: int | None) -> tuple[object, ...]:
        try:
            r = await dp.step(sid, x, seq)
        except ServeError as e:
            return (type(e).__name__, e.message)
        return (r.outputs, r.steps, r.seq, r.replayed)

    together, metrics = await twin()
    alone, _ = await twin()
    key = together.get_model("seattle-weather").key
    for k in range(5):
        got = await asyncio.gather(*(answer(together, *c) for c in calls(k)))
        want = [await answer(alone, *c) for c in calls(k)]
        for g, w in zip(got, want, strict=True):
            if isinstance(w[0], str):
                assert g == w
            else:
                np.testing.assert_allclose(g[0], w[0], rtol=1e-5, atol=1e-5)
                assert g[1:] == w[1:]
    count = metrics.registry.get_sample_value("lstm_batch_size_count", {"model": key})
    total = metrics.registry.get_sample_value("lstm_batch_size_sum", {"model": key})
    assert count is not None
    assert total is not None
    assert total / count >= 16  # NOTE: the steps did run together
    for i in range(20):
        a, b = await together.export_session(f"s{i}"), await alone.export_session(f"s{i}")
        assert (a.steps, a.seq) == (b.steps, b.seq)
        np.testing.assert_allclose(a.h, b.h, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.c, b.c, rtol=1e-5, atol=1e-5)
        sa = together.live_accuracy(await together.get_session(f"s{i}"))
        sb = alone.live_accuracy(await alone.get_session(f"s{i}"))
        assert sa is not None
        assert sb is not None
        assert [h.count for h in sa.horizons] == [h.count for h in sb.horizons]
        for ha, hb in zip(sa.horizons, sb.horizons, strict=True):
            assert (ha.mae is None) == (hb.mae is None)
            if ha.mae is not None and hb.mae is not None:
                assert ha.mae == pytest.approx(hb.mae, rel=1e-5, abs=1e-5)
    await together.stop()
    await alone.stop()


async def test_a_busy_batch_is_one_model_call_even_past_the_block_rows() -> None:
    """A batch of queued steps larger than `block_rows` still runs as one ONNX call (as the item path does), so a
    failed run fails the whole batch and the batch metrics count one batch."""
    dp, rt = await make_dp(FakeRuntime(delay=0.05), max_batch_size=64, block_rows=8)
    sids = [(await dp.create_session("fake", None, None)).session_id for _ in range(24)]
    results = await asyncio.gather(*(dp.step(sid, rows(i, 1)[0]) for i, sid in enumerate(sids)))
    assert rt.calls == [24]  # NOTE: all 24 queue before the batcher runs: one batch, one call
    assert [r.steps for r in results] == [1] * 24
    await dp.stop()


class RecordingRuntime(FakeRuntime):
    """Records the thread and the end of every run. A run may first wait `wait` seconds without computing (as a
    run in the executor waits for the GIL behind a busy event loop, or any run for a device or a lock): every
    `every`-th run, or only the first (`once`); and it may compute (busy CPU) for `fixed + per_step * T` seconds."""

    def __init__(
        self, wait: float = 0.0, every: int = 1, once: bool = False, fixed: float = 0.0, per_step: float = 0.0
    ) -> None:
        super().__init__()
        self.wait, self.every, self.once, self.fixed, self.per_step = wait, every, once, fixed, per_step
        self.threads: list[int] = []
        self.waited: list[bool] = []
        self.ended: list[float] = []

    def run(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import threading

        wait = bool(self.wait) and (not self.waited if self.once else len(self.waited) % self.every == 0)
        if wait:
            time.sleep(self.wait)
        until = time.perf_counter() + self.fixed + self.per_step * x.shape[1]
        while time.perf_counter() < until:
            pass
        self.waited.append(wait)
        self.threads.append(threading.get_ident())
        out = super().run(x, h0, c0)
        self.ended.append(time.perf_counter())
        return out


async def test_a_run_that_waited_in_its_thread_does_not_send_later_single_steps_to_the_thread() -> None:
    """A run in the executor that waited there (for the GIL, behind a busy event loop: up to the 5 ms switch
    interval) once taught the batcher that a step costs that much, so every later one-step run took the thread and
    paid the wait again; under a flood of requests the server then refused nearly every step. The cost it learns
    is the run's CPU time, where the wait is no more than the GIL can explain."""
    import threading

    dp, rt = await make_dp(RecordingRuntime(wait=0.004, once=True))
    sid = (await dp.create_session("fake", None, None)).session_id
    await dp.step(sid, rows(0, 1)[0])  # NOTE: nothing learned yet: the first run takes the executor, and waits
    for x in rows(1, 3):
        await dp.step(sid, x)
    loop_thread = threading.get_ident()
    assert rt.threads[0] != loop_thread
    assert rt.threads[1:] == [loop_thread] * 3  # NOTE: a cheap run is cheaper on the loop than a thread hop
    await dp.stop()


async def test_a_slow_model_keeps_running_in_the_executor() -> None:
    """A model that waits in its run for longer than the GIL can explain (for a device or a lock: here it sleeps
    30 ms and computes next to nothing) is costed at its wall time and never blocks the event loop."""
    import threading

    dp, rt = await make_dp(RecordingRuntime())
    rt.delay = 0.03
    sid = (await dp.create_session("fake", None, None)).session_id
    for x in rows(1, 4):
        await dp.step(sid, x)
    assert threading.get_ident() not in rt.threads
    await dp.stop()


async def test_a_busy_batch_costs_no_more_event_loop_turns_than_a_small_one() -> None:
    """A batch of 16 or more steps runs as a block; its only chunk commits at once instead of in a task of its
    own, which cost one more turn of the event loop for every caller (under a flood of requests a turn is tens of
    milliseconds, so the estimated queue wait doubled and the server refused steps it could serve)."""
    dp, _ = await make_dp(RecordingRuntime(), max_queue_delay=0)  # NOTE: no waiting for company
    sids = [(await dp.create_session("fake", None, None)).session_id for _ in range(20)]
    for _ in range(30):  # NOTE: these runs teach the batcher that a run of 20 steps is cheap: on the loop from now on
        await asyncio.gather(*(dp.step(sid, rows(0, 1)[0]) for sid in sids))

    async def turns_until_answered(n: int) -> int:
        turns = 0
        steps = asyncio.gather(*(dp.step(sid, rows(i, 1)[0]) for i, sid in enumerate(sids[:n])))
        while not steps.done():
            await asyncio.sleep(0)
            turns += 1
        await steps
        return turns

    small, busy = await turns_until_answered(4), await turns_until_answered(20)
    assert busy <= small, (small, busy)
    await dp.stop()


def test_run_cost_is_fitted_as_a_fixed_cost_plus_a_cost_per_row_and_scaled_by_the_steps() -> None:
    """Runs of 1 and 64 rows (25 us fixed, 3 us a row) predict 16 rows, and T steps cost T times one; beyond the
    widths seen, with one width only, or with a slope that is not positive, the guess is the average cost per
    row (which never makes a bigger run look cheaper per row than those seen)."""
    cost = RunCost()
    assert cost.predict(1, 1) is None
    for _ in range(10):
        cost.learn(1, 1, 25e-6 + 3e-6)
        cost.learn(64, 1, 25e-6 + 64 * 3e-6)
    assert cost.predict(16, 1) == pytest.approx(25e-6 + 16 * 3e-6, rel=1e-6)
    assert cost.predict(16, 100) == pytest.approx(100 * (25e-6 + 16 * 3e-6), rel=1e-6)
    assert cost.predict(128, 1) == pytest.approx(128 * cost.sy / cost.sx)  # NOTE: wider than any run seen
    alone = RunCost()
    alone.learn(2, 1, 1e-4)
    assert alone.predict(2, 4) == pytest.approx(4e-4)
    wide = RunCost()  # NOTE: full batches only: a narrow call may cost as much per step, not 1/64 of it
    for _ in range(5):
        wide.learn(64, 1, 200e-6)
    assert wide.predict(1, 140) == pytest.approx(140 * 200e-6)
    cold = RunCost()  # NOTE: a slow first run of one row, then full batches: the slope comes out negative
    cold.learn(1, 1, 5e-3)
    for _ in range(5):
        cold.learn(64, 1, 200e-6)
    assert cold.predict(1, 4096) == pytest.approx(4096 * cold.sy / cold.n)


async def test_a_full_batch_of_a_model_whose_runs_cost_the_same_at_any_size_runs_on_the_event_loop() -> None:
    """After runs of one and of a few steps, a batch of 64 steps is expected to cost what it costs (about the
    same), not 64 times a one-step run, so it runs on the loop instead of paying a round trip to the thread."""
    import threading

    dp, rt = await make_dp(RecordingRuntime(fixed=150e-6), max_batch_size=64)
    sids = [(await dp.create_session("fake", None, None)).session_id for _ in range(64)]
    for _ in range(20):  # NOTE: ~30 runs: the first (cold) runs' weight has faded
        await dp.step(sids[0], rows(0, 1)[0])
    for _ in range(10):
        await asyncio.gather(*(dp.step(sid, rows(1, 1)[0]) for sid in sids[:4]))
    for _ in range(2):  # NOTE: a width never seen runs in the executor, as a cautious guess; now it has been seen
        await asyncio.gather(*(dp.step(sid, rows(1, 1)[0]) for sid in sids))
    rt.threads.clear()
    await asyncio.gather(*(dp.step(sid, rows(2, 1)[0]) for sid in sids))
    assert rt.threads == [threading.get_ident()]
    await dp.stop()


async def test_a_long_call_after_one_step_runs_stays_in_the_executor() -> None:
    """One call of 400 steps after one-step runs is expected to cost 400 of them (20 ms), not one: it runs in the
    executor thread instead of blocking the event loop."""
    import threading

    dp, rt = await make_dp(RecordingRuntime(per_step=50e-6))
    sids = [(await dp.create_session("fake", None, None)).session_id for _ in range(4)]
    for _ in range(20):
        await dp.step(sids[0], rows(0, 1)[0])
    for _ in range(10):
        await asyncio.gather(*(dp.step(sid, rows(1, 1)[0]) for sid in sids))
    rt.threads.clear()
    await dp.step(sids[0], np.concatenate(rows(2, 400)))
    assert rt.threads
    assert threading.get_ident() not in rt.threads
    await dp.stop()


async def test_a_model_that_waits_in_every_run_is_kept_off_the_event_loop() -> None:
    """Its CPU time is tiny, but a run on the loop that waited 3 ms shows what a run costs the loop: the runs
    after it take the executor thread, and the loop is tried again only after some runs."""
    import threading

    dp, rt = await make_dp(RecordingRuntime(wait=0.003))
    sid = (await dp.create_session("fake", None, None)).session_id
    for x in rows(0, 12):
        await dp.step(sid, x)
    on_loop = [t == threading.get_ident() for t in rt.threads]
    assert sum(on_loop) <= 2, on_loop
    assert not any(a and b for a, b in itertools.pairwise(on_loop)), on_loop
    await dp.stop()


async def test_a_model_that_waits_in_every_other_run_is_kept_off_the_event_loop() -> None:
    """A wait of 8 ms in every other run is caught as well (a check for two waits in a row never saw it)."""
    import threading

    dp, rt = await make_dp(RecordingRuntime(wait=0.008, every=2))
    sid = (await dp.create_session("fake", None, None)).session_id
    for x in rows(0, 40):
        await dp.step(sid, x)
    blocked = [t == threading.get_ident() and w for t, w in zip(rt.threads, rt.waited, strict=True)]
    assert sum(blocked) <= 3, blocked
    await dp.stop()


async def test_one_preempted_run_on_the_loop_does_not_send_cheap_runs_to_the_thread() -> None:
    """A single run on the loop that took 5 ms more than its CPU time (the loop's thread preempted by another
    process, as on a shared machine) leaves later one-step runs on the loop (it sent some 18 to the thread);
    a model that waits shows it again, and is kept off the loop within two more runs. Run times as measured."""
    dp, _ = await make_dp()
    batcher = dp._batchers["fake/1"]
    x = np.zeros((1, 1, 3), np.float32)

    def on_loop() -> bool:
        expected = batcher._run_cost.predict(1, 1)
        return expected is not None and expected + batcher._loop_wait < INLINE_RUN_SECONDS

    for _ in range(8):
        batcher._ran(30e-6, 30e-6, True, x, 1)  # NOTE: took, CPU time, on the loop
    assert on_loop()
    batcher._ran(5.03e-3, 30e-6, True, x, 1)  # NOTE: preempted once
    assert on_loop()
    batcher._ran(30e-6, 30e-6, True, x, 1)
    batcher._ran(8.03e-3, 30e-6, True, x, 1)  # NOTE: and now waits in every run
    batcher._ran(8.03e-3, 30e-6, True, x, 1)
    assert not on_loop()
    await dp.stop()


async def test_one_long_wait_in_the_executor_keeps_cheap_runs_off_the_loop_only_briefly() -> None:
    """A run that waited a second in the executor (a long preemption, a stall) counts at most a capped wait, so
    one-step runs are back on the event loop within some 20 runs (it took some 200 before)."""
    import threading

    dp, rt = await make_dp(RecordingRuntime(wait=1.0, once=True))
    sid = (await dp.create_session("fake", None, None)).session_id
    for x in rows(0, 30):
        await dp.step(sid, x)
    assert rt.threads[0] != threading.get_ident()
    assert rt.threads[-1] == threading.get_ident()
    await dp.stop()


async def test_a_long_queue_of_batches_lets_the_event_loop_run_between_them() -> None:
    """Batches that run on the loop back to back (no await in them suspends) still let the loop run every few
    milliseconds: the first callers have their answers before the last batch of the queue has run."""
    dp, rt = await make_dp(RecordingRuntime(), max_batch_size=8)
    sids = [(await dp.create_session("fake", None, None)).session_id for _ in range(8)]
    for _ in range(20):  # NOTE: the batcher learns that a run is cheap: it runs on the loop from then on
        await asyncio.gather(*(dp.step(sid, rows(0, 1)[0]) for sid in sids))
    rt.ended.clear()
    answered: list[float] = []

    async def step(sid: str, x: np.ndarray) -> None:
        await dp.step(sid, x)
        answered.append(time.perf_counter())

    # NOTE: 8 sessions x 150 calls each: 150 batches of 8, at least 10 ms of batch work in all
    await asyncio.gather(*(step(sid, x) for x in rows(1, 150) for sid in sids))
    assert len(rt.ended) == 150
    assert min(answered) < rt.ended[-1]
    await dp.stop()
