"""Dynamic batching: step calls from every session and transport coalesce into one ONNX Runtime call.

One batcher per model version runs one batch at a time: it takes queued calls in arrival order, at
most one per session and all with the same number of time steps T (an LSTM cannot pad a step without
moving its state), gathers their states, runs the model (on the event loop when the run is cheaper
than a round trip to a thread, else in the executor thread: see RunCost), and scatters the new states
back. A call that cannot join this batch keeps its place for the next one, so the steps of a session
are applied in arrival order.

When to run: a batch with room waits for the callers answered within the last `max_queue_delay` whose
next call has not come yet (closed-loop callers come back within a round trip), and runs as soon as
they are all there, or `max_queue_delay` after the oldest queued call or the newest such answer. So a
lone client never waits, after a pause of `max_queue_delay` nothing waits, and after a burst at most
the first lone call waits, once: nothing of the burst lingers in a moving average.

A call whose session changed or vanished while it ran is not committed and is answered with the error
of what won (the store's compare-and-set), never with a success that was not applied.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np
from numpy.typing import NDArray

from service.core.scoring import Scored
from service.core.sessions import (
    COMMITTED,
    DIGEST_BYTES,
    MAX_COUNTER,
    STALE,
    BlockCommit,
    Commit,
    CommitStatus,
    Lease,
    LeaseBlock,
    Replay,
    SessionMovedError,
    SessionStore,
    session_replaced,
)
from service.core.tasks import stop_task
from service.errors import (
    DeadlineExceededError,
    ModelError,
    OverloadedError,
    SeqConflictError,
    ServeError,
    SessionNotFoundError,
    UnavailableError,
)
from service.metrics import Metrics
from service.repository import ModelVersion
from service.runtime import F32

log = logging.getLogger(__name__)
# NOTE: outputs of a call with seq are kept for a retry only up to this size (about 36 steps of 7 outputs);
# a retry of a larger call is refused with advice, so a session's replay memory stays bounded
REPLAY_MAX_BYTES = 1024
# NOTE: a batch expected to run for less than this runs on the event loop: handing it to a thread and back
# costs more than the run itself (the default model runs one step in ~25 µs); longer runs go to the executor
INLINE_RUN_SECONDS = 0.0005
EXECUTOR_WAIT_CAP_SECONDS = 0.01  # NOTE: see Batcher._ran
# NOTE: a batcher with batches queued runs them back to back, without a turn of the event loop between them when
# nothing in them waits (inline runs, the memory store); after this long it lets the loop run once: the answers
# reach their callers, the sockets are read, other models' batchers run
BATCHER_TURN_SECONDS = 0.005
# NOTE: a batch of at least this many single steps runs as a block (whole-array gather, scoring and commit): the
# block path costs more per batch and less per row; this is about where it starts to win (bench/core.py)
BLOCK_ROUTE_ROWS = 16
STOPPED = "the server stopped before this step completed; retry"
# NOTE: a stop that cuts a commit short (a store that answers over the network) cannot know whether it applied
STOPPED_SAVING = (
    "the server stopped while this step was being saved, so it may have been applied: retry with its seq (the "
    "retry then replays it or applies it once), or read the session's steps before you retry without"
)
_Run = tuple[F32, F32, F32, float, float, bool]  # NOTE: y, hn, cn, wall and CPU seconds of the run, on the loop?
SCORE_FLUSH_SECONDS = 0.1  # NOTE: how stale the live-accuracy counters may be between scrapes (see flush_scores)


@dataclass(frozen=True)
class StepOutcome:
    """The result of one step call."""

    outputs: F32  # [T, O]
    steps: int  # time steps applied to the session in total (0 for a stateless prediction)
    seq: int  # seq of this call (0 for a stateless prediction)
    replayed: bool = False


@dataclass(frozen=True)
class BlockOutcome:
    """The results of a step block, row by row as whole arrays; a row in `errors` failed alone (its outputs are
    zeros and its counters 0)."""

    outputs: F32  # [K, T, O]
    steps: NDArray[np.int64]  # [K] time steps applied to the session in total
    seq: NDArray[np.int64]  # [K] seq of this call
    replayed: NDArray[np.bool_]  # [K] a retry of the last applied seq (the state did not move)
    errors: dict[int, ServeError]


class _Answer(Protocol):
    """Where a call's outcome goes: an asyncio future, or a member of a group (`submit_many`)."""

    def done(self) -> bool: ...
    def set_result(self, result: StepOutcome, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...


class _Group:
    """The outcomes of many calls submitted together, and one asyncio future for all of them."""

    __slots__ = ("future", "left", "outcomes")

    def __init__(self, n: int, future: asyncio.Future[list[StepOutcome | ServeError]]) -> None:
        self.outcomes: list[StepOutcome | ServeError | None] = [None] * n
        self.left, self.future = n, future

    def settle(self, i: int, outcome: StepOutcome | ServeError) -> None:
        if self.outcomes[i] is None:
            self.outcomes[i] = outcome
            self.left -= 1
            if not self.left and not self.future.done():
                self.future.set_result(cast("list[StepOutcome | ServeError]", self.outcomes))


class _Member:
    """One call of a group: answered into the group, with no future (or task) of its own."""

    __slots__ = ("group", "i")

    def __init__(self, group: _Group, i: int) -> None:
        self.group, self.i = group, i

    def done(self) -> bool:
        return self.group.future.done() or self.group.outcomes[self.i] is not None

    def set_result(self, result: StepOutcome, /) -> None:
        self.group.settle(self.i, result)

    def set_exception(self, exception: BaseException, /) -> None:
        assert isinstance(exception, ServeError)
        self.group.settle(self.i, exception)


def _settle(future: _Answer | asyncio.Future[BlockOutcome], outcome: StepOutcome | BlockOutcome | ServeError) -> None:
    """Answer a caller, unless it has gone (cancelled) or was answered already."""
    if future.done():
        return
    if isinstance(outcome, ServeError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)  # type: ignore[arg-type]  # NOTE: a step's future gets a StepOutcome


class _Unanswered:
    """Where the outcome of a call that is only checked, never answered, would go (see `_execute_block`)."""

    def done(self) -> bool:
        return False

    def set_result(self, result: StepOutcome, /) -> None:
        raise AssertionError("never answered")

    def set_exception(self, exception: BaseException, /) -> None:
        raise AssertionError("never answered")


_NO_ANSWER = _Unanswered()


class RunCost:
    """Expected CPU seconds of a model run on B sessions x T time steps, learned from the runs so far.

    One time step of a batch is fitted online as a fixed cost plus a cost per row, older runs forgotten
    geometrically, and a run of T steps as T of those (a little cautious: the call's own overhead is paid once). A
    small LSTM's step is mostly fixed cost (the default model: ~25 us for one row, ~3 us a row more at 64), so a
    cost per row averaged over runs of every width overestimated a full batch several times over and sent it to
    the executor thread. The fit is trusted only where it is sound: within the widths seen and with a positive
    slope. Otherwise the guess is cautious both ways: for B at least the mean width seen, the mean cost per row
    times B; narrower, the mean cost of a step of the runs seen (a narrow call may cost as much as a wide one:
    the fixed part does not shrink with the width); both times T."""

    DECAY = 0.95  # NOTE: the weight of the run before: a change of cost shows within some 20 runs

    def __init__(self) -> None:
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.widest, self.narrowest = 0, 0  # the most and the fewest rows of a run seen

    def learn(self, rows: int, steps: int, seconds: float) -> None:
        d, y = self.DECAY, seconds / steps
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + rows, d * self.sy + y
        self.sxx, self.sxy = d * self.sxx + rows * rows, d * self.sxy + rows * y
        self.widest = max(self.widest, rows)
        self.narrowest = min(self.narrowest, rows) if self.narrowest else rows

    def predict(self, rows: int, steps: int) -> float | None:
        """Expected seconds of a run of `rows` x `steps`; None before any run."""
        if not self.n:
            return None
        cautious = max(self.sy / self.n, self.sy / self.sx * rows) * steps
        spread = self.n * self.sxx - self.sx * self.sx
        if not self.narrowest <= rows <= self.widest or spread <= 1e-6 * self.n * self.sxx:
            return cautious  # NOTE: outside the widths seen, or one width only
        per_row = (self.n * self.sxy - self.sx * self.sy) / spread
        if per_row <= 0:  # NOTE: noise (or a cold first run) against a cost that barely grows with the width
            return cautious
        fixed = max((self.sy - per_row * self.sx) / self.n, 0.0)
        return (fixed + per_row * rows) * steps


@dataclass
class _Work:
    session_id: str | None  # None: stateless prediction from a zero state
    x: F32  # [T, F]
    seq: int | None
    future: _Answer
    deadline: float | None = None  # perf_counter time by which it must have started, or None
    enqueued: float = field(default_factory=time.perf_counter)
    peek: bool = False  # what-if: run on a copy of the session's state, commit nothing, touch nothing
    life: int = 0  # the life of the session id this call is for (SessionInfo.life: a stream's); 0: whichever

    def resolve(self, outcome: StepOutcome | ServeError) -> None:
        """Answer the caller, unless it has gone (cancelled) or was answered already."""
        _settle(self.future, outcome)

    @functools.cached_property
    def digest(self) -> bytes:
        return hashlib.blake2b(self.x.tobytes(), digest_size=16).digest()


@dataclass
class _Block:
    """Steps of many distinct sessions as one array (a packed step batch): run as one batch of its own."""

    session_ids: list[str]
    x: F32  # [K, T, F]
    seq: NDArray[np.uint64] | None  # [K], 0: that row has no seq
    future: asyncio.Future[BlockOutcome]
    deadline: float | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    lives: NDArray[np.int64] | None = None  # [K]: the life of each row's session id (_Work.life); None: whichever

    def resolve(self, outcome: BlockOutcome | ServeError) -> None:
        _settle(self.future, outcome)


class _BlockAnswer:
    """The answer to a block as it is filled in, chunk by chunk."""

    __slots__ = ("answered", "errors", "outputs", "replayed", "saving", "seq", "steps")

    def __init__(self, k: int, t: int, outputs: int) -> None:
        self.outputs = np.zeros((k, t, outputs), np.float32)
        self.steps, self.seq = np.zeros(k, np.int64), np.zeros(k, np.int64)
        self.replayed = np.zeros(k, np.bool_)
        self.answered = np.zeros(k, np.bool_)  # NOTE: rows with a result (committed or replayed)
        self.saving = np.zeros(k, np.bool_)  # NOTE: rows whose commit the store has been sent and not answered
        self.errors: dict[int, ServeError] = {}

    def outcome(self) -> BlockOutcome:
        return BlockOutcome(self.outputs, self.steps, self.seq, self.replayed, self.errors)

    def stopped(self) -> None:
        """The batcher stopped mid-block: rows already answered (committed, replayed) or refused keep their answers
        (their sessions moved, or nothing was to move); rows whose commit was under way may have been applied and
        say so; the others are answered as not applied."""
        stopped, unsure = UnavailableError(STOPPED), UnavailableError(STOPPED_SAVING)
        for i in np.flatnonzero(~self.answered).tolist():
            self.errors.setdefault(i, unsure if self.saving[i] else stopped)


@dataclass(frozen=True)
class _Chunk:
    """Rows of a block that are to run: block rows `idx` (= lo + rows), rows of the chunk's lease block, their
    inputs and seq, and the gathered states."""

    lo: int
    idx: NDArray[np.intp]
    rows: NDArray[np.intp]
    x: F32
    seq: NDArray[np.uint64] | None
    lease: LeaseBlock
    h: F32
    c: F32


class Batcher:
    """Queue and batch loop for one model version."""

    def __init__(
        self,
        model: ModelVersion,
        store: SessionStore,
        metrics: Metrics,
        executor: Executor,
        max_batch_size: int,
        max_queue_delay: float,
        max_queue: int,
        clock: Callable[[], float] = time.monotonic,
        max_queue_wait: float = 0.0,
        block_rows: int = 256,
    ) -> None:
        self.model, self.store, self.metrics, self.executor = model, store, metrics, executor
        self.block_rows = block_rows  # NOTE: rows of a step block per ONNX call (chunks run pipelined)
        self.max_batch_size, self.max_queue_delay, self.max_queue = max_batch_size, max_queue_delay, max_queue
        # NOTE: shed load early: refuse a call whose expected wait (queued calls x the recent time per call)
        # is over this (0: only max_queue bounds the queue)
        self.max_queue_wait = max_queue_wait
        self._per_call = 0.0  # moving average of batch time / calls in the batch (seconds), 0 until measured
        self._run_cost = RunCost()  # what an ONNX Runtime call costs by its rows and steps, learned from the runs
        self._loop_wait = 0.0  # what runs on the loop waited without computing (seconds), fading: see _ran
        self._loop_waits: deque[float] = deque(maxlen=3)  # the last runs' waits on the loop (see _ran)
        self.clock = clock
        self._pending: deque[_Work | _Block] = deque()
        self._block_rows = 0  # NOTE: queued blocks count a call per row: their rows beyond the first, in all
        self._running: list[_Work | _Block] = []  # the batch being executed
        self._saving: list[_Work] = []  # the calls of that batch whose commit the store has not answered yet
        # NOTE: the loop is looked up once: asyncio.get_running_loop() makes a getpid() system call on Python 3.11
        self._loop_ref: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None  # the batch loop sleeps on this until work arrives
        self._task: asyncio.Task[None] | None = None
        # NOTE: sessions answered within the last max_queue_delay whose next call has not come yet, oldest first
        self._awaiting: OrderedDict[str, float] = OrderedDict()
        self._stopped = False
        self._idle = asyncio.Event()
        self._idle.set()
        # NOTE: the labelled children are looked up once; .labels() per step is measurable on the hot path
        self._queue_wait = metrics.queue_wait.labels(model.key)
        self._inference = metrics.inference.labels(model.key)
        self._batch_size = metrics.batch_size.labels(model.key)
        self._steps = metrics.steps.labels(model.key)
        self._depth = metrics.queue_depth.labels(model.key)
        self._scoring = model.scoring
        horizons = range(1, self._scoring.horizon + 1) if self._scoring else range(0)
        self._scored = [
            tuple(m.labels(model.name, model.version, str(k)) for m in (metrics.forecast_error,
                  metrics.persistence_error, metrics.forecasts_scored))
            for k in horizons
        ]  # fmt: skip
        # NOTE: what batches scored, added up here and moved to the counters at most every SCORE_FLUSH_SECONDS
        # (and before /metrics answers): 3 x horizon counter increments per batch would cost more than scoring
        self._unflushed = np.zeros((3, len(self._scored)))  # model error, persistence error, count
        self._flush_timer: asyncio.TimerHandle | None = None

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._stopped = False
        self._loop_ref = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._loop(), name=f"batcher:{self.model.key}")

    async def stop(self) -> None:
        """Stop the loop; every call still queued or running, and any submitted later, gets 'unavailable'."""
        self._stopped = True
        await stop_task(self._task)  # NOTE: a store call may swallow one cancel (see stop_task)
        self.flush_scores()
        saving = {id(w) for w in self._saving}  # NOTE: a commit under way when the stop came may have applied
        for w in [*self._running, *self._pending]:
            w.resolve(UnavailableError(STOPPED_SAVING if id(w) in saving else STOPPED))
        self._pending.clear()
        self._saving = []
        self._block_rows = 0
        self._running = []
        self._depth.set(0)
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return when nothing is queued or running."""
        await self._idle.wait()

    @property
    def queued(self) -> int:
        """Calls queued (a step block counts one per session)."""
        return len(self._pending) + self._block_rows

    # --- submission --------------------------------------------------------------------------------
    def _admit(self, n: int) -> None:
        """Refuse n more calls when stopped or overloaded."""
        if self._stopped:
            raise UnavailableError("the server has stopped; retry on another replica or after restart")
        if self.queued + n > self.max_queue:
            raise OverloadedError(
                f"{self.model.describe()} has its maximum of {self.max_queue} step calls queued; retry shortly"
            )
        if self.max_queue_wait and self.queued * self._per_call > self.max_queue_wait:
            raise OverloadedError(
                f"{self.model.describe()} is overloaded: a step would wait about "
                f"{self.queued * self._per_call * 1000:.0f} ms in the queue; retry shortly"
            )

    async def submit_many(
        self, calls: list[tuple[str, F32, int | None]], deadline: float | None = None
    ) -> list[StepOutcome | ServeError]:
        """Queue validated calls of distinct sessions together and wait for all their outcomes (in order): one
        future for the lot, so that a step batch of a thousand sessions costs no thousand futures or tasks."""
        if not calls:
            return []
        self._admit(len(calls))
        assert self._loop_ref is not None, "start() the batcher first"
        group = _Group(len(calls), self._loop_ref.create_future())
        for i, (session_id, x, seq) in enumerate(calls):
            self._awaiting.pop(session_id, None)
            self._pending.append(_Work(session_id, x, seq, _Member(group, i), deadline))
        self._depth.set(self.queued)
        self._idle.clear()
        self._wake()
        return await group.future

    async def submit_block(
        self, session_ids: list[str], x: F32, seq: NDArray[np.uint64] | None, deadline: float | None = None
    ) -> BlockOutcome:
        """Queue a block: validated steps [K, T, F] of K distinct sessions (seq per row, 0 for none), run as one
        batch of its own, gathered, run and committed as whole arrays; each row succeeds or fails alone."""
        k = len(session_ids)
        self._admit(k)
        assert self._loop_ref is not None, "start() the batcher first"
        block = _Block(session_ids, x, seq, self._loop_ref.create_future(), deadline)
        self._pending.append(block)
        self._block_rows += k - 1
        self._depth.set(self.queued)
        self._idle.clear()
        self._wake()
        return await block.future

    async def submit(
        self,
        session_id: str | None,
        x: F32,
        seq: int | None,
        deadline: float | None = None,
        peek: bool = False,
        life: int = 0,
    ) -> StepOutcome:
        """Queue a validated [T, F] call and wait for its outcome; past `deadline` (perf_counter) it is
        answered deadline_exceeded without running. A `peek` runs on a copy of the session's state: its
        outcome has the session's steps and seq as they are, and the session is not changed in any way.
        With `life` (SessionInfo.life), the call is for that life of the id only: a session created again under
        the id meanwhile refuses it (session_not_found), as a stream's steps must not reach another's session."""
        self._admit(1)
        assert self._loop_ref is not None, "start() the batcher first"
        fut: asyncio.Future[StepOutcome] = self._loop_ref.create_future()
        if session_id is not None:
            self._awaiting.pop(session_id, None)
        self._pending.append(_Work(session_id, x, seq, fut, deadline, peek=peek, life=life))
        self._depth.set(self.queued)
        self._idle.clear()
        self._wake()
        return await fut

    # --- the loop ----------------------------------------------------------------------------------
    def _wake(self) -> None:
        """Wake the batch loop if it sleeps."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _sleep(self, at_most: float | None) -> None:
        """Sleep until `_wake` (or `at_most` seconds)."""
        assert self._loop_ref is not None
        self._waiter = self._loop_ref.create_future()
        timer = None if at_most is None else self._loop_ref.call_later(at_most, self._wake)
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _select(self) -> list[_Work] | _Block:
        """Take up to max_batch_size calls with the first call's T, one per session, keeping session order.
        Only the calls before the batch is full are looked at (a long queue costs nothing per batch). A block
        runs alone, when it is first in the queue (so that no call of its sessions overtakes it or is overtaken)."""
        taken: list[_Work] = []
        skipped: list[_Work | _Block] = []
        seen: set[str] = set()
        steps: int | None = None
        pending = self._pending
        while pending and len(taken) < self.max_batch_size:
            w = pending.popleft()
            if isinstance(w, _Block):
                if w.future.done() or (not taken and not skipped):
                    self._block_rows -= len(w.session_ids) - 1
                    if not w.future.done():
                        return w
                    continue
                skipped.append(w)
                seen.update(w.session_ids)
                continue
            if w.future.done():  # cancelled by its caller before it ran
                continue
            fits = steps is None or w.x.shape[0] == steps
            if fits and (w.session_id is None or w.session_id not in seen):
                taken.append(w)
                steps = w.x.shape[0]
            else:
                skipped.append(w)
            if w.session_id is not None:
                seen.add(w.session_id)  # NOTE: a later call of a skipped session must not overtake it
        pending.extendleft(reversed(skipped))  # NOTE: back in front, in their order
        return taken

    async def _gather_company(self) -> None:
        """Wait, at most max_queue_delay, for the callers answered in the last max_queue_delay to come back
        (closed-loop clients do, within a round trip). With nobody recently answered but the caller itself,
        as for a lone client or after a pause, nothing waits."""
        if self.max_queue_delay <= 0 or isinstance(self._pending[0], _Block):
            return
        now = time.perf_counter()
        awaiting = self._awaiting
        while awaiting and next(iter(awaiting.values())) < now - self.max_queue_delay:
            awaiting.popitem(last=False)  # NOTE: not back within the delay: not coming
        want = min(self.max_batch_size, len(self._pending) + len(awaiting))
        if len(self._pending) >= want:
            return
        newest = next(reversed(awaiting.values()))
        deadline = min(self._pending[0].enqueued, newest) + self.max_queue_delay
        while len(self._pending) < want:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            await self._sleep(left)

    async def _loop(self) -> None:
        # NOTE: when this loop last suspended on purpose (idle, or its own yield: BATCHER_TURN_SECONDS); waits inside
        # a batch are not counted, so after one it may yield a turn more than it had to
        resumed = time.perf_counter()
        while True:
            if not self._pending:
                self._idle.set()
                await self._sleep(None)
                resumed = time.perf_counter()
                continue
            await self._gather_company()
            batch = self._select()
            if not batch:
                continue
            block = batch if isinstance(batch, _Block) else None
            running: list[_Work | _Block] = [block] if block is not None else list(cast("list[_Work]", batch))
            self._running = running
            began = time.perf_counter()
            try:
                await (self._execute_block(block) if block is not None else self._execute(cast("list[_Work]", batch)))
            except Exception as e:  # pragma: no cover - _execute resolves its own errors
                log.exception("batch failed")
                for w in running:
                    w.resolve(e if isinstance(e, ServeError) else ModelError("inference failed"))
            self._running = []
            answered = time.perf_counter()
            calls = len(block.session_ids) if block is not None else len(running)
            per_call = (answered - began) / calls
            self._per_call = per_call if not self._per_call else 0.8 * self._per_call + 0.2 * per_call
            # NOTE: with a full batch queued, nobody waits for company; a block's client is one caller
            if block is None and len(self._pending) < self.max_batch_size:
                queued = {w.session_id for w in self._pending if isinstance(w, _Work)}  # NOTE: already here
                for w in cast("list[_Work]", batch):
                    if w.session_id is not None and w.session_id not in queued:
                        self._awaiting[w.session_id] = answered
            self._depth.set(self.queued)
            if answered - resumed > BATCHER_TURN_SECONDS:
                await asyncio.sleep(0)  # NOTE: deliver the answers, read the sockets, let other models' batchers run
                resumed = time.perf_counter()

    def _start_run(self, x: F32, h: F32, c: F32) -> asyncio.Future[_Run]:
        """Start the model on a batch: on the event loop (done at once) when it is expected to take less than
        INLINE_RUN_SECONDS, else in the executor thread (to await, or to overlap with other work)."""
        assert self._loop_ref is not None
        expected = self._run_cost.predict(x.shape[0], x.shape[1])
        if expected is not None and expected + self._loop_wait < INLINE_RUN_SECONDS:
            done: asyncio.Future[_Run] = self._loop_ref.create_future()
            try:
                done.set_result(self._timed_run(x, h, c, True))
            except Exception as e:
                done.set_exception(e)
            return done
        return self._loop_ref.run_in_executor(self.executor, self._timed_run, x, h, c, False)

    def _ran(self, took: float, cpu: float, on_loop: bool, x: F32, rows: int) -> None:
        """Count a model run of `rows` calls on x [B, T, F] that took `took` seconds, `cpu` of them on the CPU of
        the thread that ran it, and learn what a run costs the event loop: its CPU time (RunCost), plus what
        runs on the loop wait for without computing (`_loop_wait`, a moving average: for ONNX Runtime on the CPU
        next to nothing; a model that waits for a device or a lock is soon kept off the loop, and tried there
        again after some dozens of runs).

        A run in the executor also waits for the GIL after it (up to the switch interval, 5 ms, while the event
        loop is busy) and may be preempted: learning its wall time once sent every later one-step run to the
        thread to pay the wait again, and under a flood of requests the batcher then ran one step per loop turn
        and refused nearly every other one. So it teaches its CPU time, plus what it waited beyond what the GIL
        explains, at most EXECUTOR_WAIT_CAP_SECONDS (a model that waits for long stays in the executor; one
        long preemption fades as any run does).

        A run on the loop teaches the median wait of the last three there: a model that waits in every run, or in
        every other one, is caught within a few runs, while one preemption of the loop's thread (another process
        on a shared machine) is not taken for a waiting model (it sent some 18 cheap runs to the thread)."""
        self._inference.observe(took)
        waited = max(took - cpu, 0.0)
        if on_loop:
            waits = self._loop_waits
            waits.append(waited)
            typical = sorted(waits)[len(waits) // 2]  # NOTE: of two, the larger: the first waits are not doubted
            self._loop_wait = 0.8 * self._loop_wait + 0.2 * typical
            cost = cpu
        else:
            self._loop_wait *= RunCost.DECAY
            cost = cpu + min(max(waited - 2 * sys.getswitchinterval(), 0.0), EXECUTOR_WAIT_CAP_SECONDS)
        self._run_cost.learn(x.shape[0], x.shape[1], cost)
        self._batch_size.observe(rows)

    def _timed_run(self, x: F32, h: F32, c: F32, on_loop: bool) -> _Run:
        """Run the model and time only the run (not the wait for a thread): its wall and this thread's CPU time
        (ONNX Runtime's caller thread takes part in every run: with more intra-op threads its CPU time was
        measured within 0.1 % of the run's wall time)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        y, hn, cn = self.model.runtime.run(x, h, c)
        return y, hn, cn, time.perf_counter() - t0, time.thread_time() - c0, on_loop

    async def _execute(self, batch: list[_Work]) -> None:
        started = time.perf_counter()
        for w in batch:
            self._queue_wait.observe(started - w.enqueued)
        late = [w for w in batch if w.deadline is not None and w.deadline < started]
        if late:
            for w in late:
                w.resolve(
                    DeadlineExceededError(
                        f"the step waited {(started - w.enqueued) * 1000:.0f} ms in the queue, past its deadline; "
                        "it was not run and the session is unchanged: retry, or allow more time"
                    )
                )
            batch = [w for w in batch if w.deadline is None or w.deadline >= started]
        if len(batch) >= BLOCK_ROUTE_ROWS and all(
            w.session_id is not None and not w.peek and (w.seq is None or 1 <= w.seq < MAX_COUNTER) for w in batch
        ):
            await self._execute_as_block(batch)
            return
        sessions = [w for w in batch if w.session_id is not None]
        touch = [not w.peek for w in sessions] if any(w.peek for w in sessions) else None
        try:
            leases, h_s, c_s = await self.store.gather(
                self.model.key, [w.session_id or "" for w in sessions], self.clock(), touch
            )
        except Exception as e:
            for w in batch:
                w.resolve(self._store_failed(e))
            return
        # decide, per call: run it, replay it, or refuse it
        run: list[tuple[_Work, Lease | None, int]] = []  # (work, lease, row of h_s; -1 for stateless)
        for r, (w, got) in enumerate(zip(sessions, leases, strict=True)):
            if w.life and (isinstance(got, SessionMovedError) or (isinstance(got, Lease) and got.life != w.life)):
                got = session_replaced(cast(str, w.session_id))
            if isinstance(got, ServeError):
                w.resolve(got)
                continue
            verdict = None if w.peek else self._check_seq(w, got)
            if verdict is not None:
                w.resolve(verdict)
            else:
                run.append((w, got, r))
        run.extend((w, None, -1) for w in batch if w.session_id is None)
        if not run:
            return
        sig = self.model.signature
        x = run[0][0].x[None] if len(run) == 1 else np.stack([w.x for w, _, _ in run])  # [B, T, F]
        stateful = [i for i, (_, held, _) in enumerate(run) if held is not None]
        rows = [r for _, _, r in run]
        if len(stateful) == len(run) and rows == list(range(h_s.shape[1])):
            h, c = h_s, c_s  # NOTE: the usual case, every gathered session runs: no copy
        elif len(stateful) == len(run):
            h, c = h_s[:, rows, :], c_s[:, rows, :]
        else:
            h = np.zeros((sig.layers, len(run), sig.hidden), np.float32)  # NOTE: stateless rows start at zero
            c = np.zeros((sig.layers, len(run), sig.cell), np.float32)
            h[:, stateful, :] = h_s[:, [run[i][2] for i in stateful], :]
            c[:, stateful, :] = c_s[:, [run[i][2] for i in stateful], :]
        try:
            y, hn, cn, took, cpu, on_loop = await self._start_run(x, h, c)
        except Exception:
            log.exception("ONNX Runtime failed on %s", self.model.key)
            for w, _, _ in run:
                w.resolve(ModelError(f"{self.model.describe()} failed to run this batch"))
            return
        self._ran(took, cpu, on_loop, x, len(run))
        finite = self._finite_rows(y, hn, cn)
        idx = [i for i, (w, held, _) in enumerate(run) if held is not None and finite[i] and not w.peek]
        every = len(idx) == len(run)
        extras: list[bytes | None] = [None] * len(idx)
        scored: Scored | None = None
        if self._scoring is not None and idx:
            leased = [cast(Lease, run[i][1]).extra for i in idx]
            new_extras, scored = self._scoring.score(leased, x if every else x[idx], y if every else y[idx])
            extras = list(new_extras)
        commits: list[Commit] = []
        for j, i in enumerate(idx):
            w, lease = run[i][0], cast(Lease, run[i][1])
            commits.append(Commit(lease, lease.steps + w.x.shape[0], lease.seq + 1, self._replay(w, y[i]), extras[j]))
        status: dict[int, CommitStatus] = {}
        if commits:
            # NOTE: cleared when the store answers, not when a stop cancels the wait (see stop)
            self._saving = [run[i][0] for i in idx]
            try:
                h_new, c_new = (hn, cn) if every else (hn[:, idx, :], cn[:, idx, :])
                outcome = await self.store.commit(self.model.key, commits, h_new, c_new, self.clock())
            except Exception as e:
                for i in idx:
                    run[i][0].resolve(self._store_failed(e))  # NOTE: answered here; GONE below does not overwrite
                status = dict.fromkeys(idx, CommitStatus.GONE)
            else:
                status = dict(zip(idx, outcome, strict=True))
            self._saving = []
            if scored is not None:
                self._count_scored(scored, [status[i] is CommitStatus.COMMITTED for i in idx])
        steps = 0
        stale: list[tuple[_Work, Lease]] = []
        for i, (w, held, _) in enumerate(run):
            steps += w.x.shape[0]  # NOTE: computed even if not committed or its caller has gone meanwhile
            if not finite[i]:
                w.resolve(
                    ModelError(f"{self.model.describe()} produced non-finite outputs for these inputs; state unchanged")
                )
            elif held is None:
                w.resolve(StepOutcome(y[i], 0, 0))
            elif w.peek:
                w.resolve(StepOutcome(y[i], held.steps, held.seq))
            elif status[i] is CommitStatus.COMMITTED:
                w.resolve(StepOutcome(y[i], held.steps + w.x.shape[0], held.seq + 1))
            elif status[i] is CommitStatus.STALE:
                stale.append((w, held))
            else:
                w.resolve(
                    SessionNotFoundError(
                        f"session {held.session_id!r} was deleted, expired or evicted while this step ran; "
                        "the step was not applied"
                    )
                )
        self._steps.inc(steps)
        for w, held in stale:
            w.resolve(await self._stale(held.session_id))

    async def _execute_as_block(self, batch: list[_Work]) -> None:
        """Single steps of many distinct sessions (a busy batch) run as one block: gathered, scored and committed
        as whole arrays, about half the Python per row of the item path at 64 rows. Each caller gets the answer
        its own step would get (the block path answers its rows as single steps)."""
        assert self._loop_ref is not None
        ids = [cast(str, w.session_id) for w in batch]
        x = np.stack([w.x for w in batch])
        seq = None
        if any(w.seq is not None for w in batch):
            seq = np.fromiter((w.seq or 0 for w in batch), np.uint64, len(batch))  # NOTE: 0: this row has no seq
        lives = np.fromiter((w.life for w in batch), np.int64, len(batch)) if any(w.life for w in batch) else None
        block = _Block(ids, x, seq, self._loop_ref.create_future(), lives=lives)
        k, t = x.shape[0], x.shape[1]
        out = _BlockAnswer(k, t, self.model.signature.outputs)
        # NOTE: one chunk, so one ONNX call as for the item path (max_batch_size bounds it): a failed run fails the
        # whole batch, a stop mid-run commits none of it, and the batch metrics count one batch
        try:
            await self._run_block(block, out, [(0, k)])
        except asyncio.CancelledError:
            out.stopped()
            self._answer_rows(batch, out)
            raise
        except Exception:
            self._answer_rows(batch, out, decided_only=True)  # NOTE: the rest get the batch loop's answer
            raise
        self._answer_rows(batch, out)

    @staticmethod
    def _answer_rows(batch: list[_Work], out: _BlockAnswer, decided_only: bool = False) -> None:
        """Answer each call from its row; with `decided_only`, only the rows with an answer or an error."""
        steps, seq, replayed = out.steps.tolist(), out.seq.tolist(), out.replayed.tolist()
        for i, w in enumerate(batch):
            failed = out.errors.get(i)
            if failed is not None:
                w.resolve(failed)
            elif out.answered[i]:
                w.resolve(StepOutcome(out.outputs[i], steps[i], seq[i], replayed[i]))
            elif not decided_only:  # pragma: no cover - every row of a finished block has an answer or an error
                w.resolve(ModelError("inference failed"))

    async def _execute_block(self, b: _Block) -> None:
        """A step block as whole arrays, in chunks of block_rows rows (one ONNX call each), pipelined:
        while ONNX Runtime runs a chunk in its thread, the loop commits the chunk before and gathers the next, so
        the Python work hides behind the model's. Rows are distinct sessions, so chunks commute. Rows that replay,
        conflict or fail take the one-by-one path and answer as single steps would."""
        started = time.perf_counter()
        self._queue_wait.observe(started - b.enqueued)  # NOTE: one observation per block (it is one call)
        if b.deadline is not None and b.deadline < started:
            b.resolve(
                DeadlineExceededError(
                    f"the step waited {(started - b.enqueued) * 1000:.0f} ms in the queue, past its deadline; "
                    "it was not run and the session is unchanged: retry, or allow more time"
                )
            )
            return
        k, t = b.x.shape[0], b.x.shape[1]
        out = _BlockAnswer(k, t, self.model.signature.outputs)
        m = self.block_rows
        bounds = [(i, min(i + m, k)) for i in range(0, k, m)]
        try:
            await self._run_block(b, out, bounds)
        except asyncio.CancelledError:
            out.stopped()
            b.resolve(out.outcome())
            raise
        b.resolve(out.outcome())

    async def _run_block(self, b: _Block, out: _BlockAnswer, bounds: list[tuple[int, int]]) -> None:
        t = b.x.shape[1]
        ready = await self._prepare_chunk(b, out, *bounds[0])
        finishing: asyncio.Task[None] | None = None
        for n in range(len(bounds)):
            chunk = ready
            running = None if chunk is None else self._start_run(chunk.x, chunk.h, chunk.c)
            if finishing is not None:
                await finishing  # NOTE: the chunk before commits while this one runs
                finishing = None
            ready = await self._prepare_chunk(b, out, *bounds[n + 1]) if n + 1 < len(bounds) else None
            if chunk is None or running is None:
                continue
            try:
                y, hn, cn, took, cpu, on_loop = await running
            except Exception:
                log.exception("ONNX Runtime failed on %s", self.model.key)
                for i in chunk.idx.tolist():
                    out.errors[i] = ModelError(f"{self.model.describe()} failed to run this batch")
                continue
            self._ran(took, cpu, on_loop, chunk.x, len(chunk.idx))
            self._steps.inc(len(chunk.idx) * t)
            if n + 1 == len(bounds):  # NOTE: the last (or only) chunk commits at once: a task would cost a loop turn
                await self._commit_chunk(b, out, chunk, y, hn, cn)
            else:
                finishing = asyncio.ensure_future(self._commit_chunk(b, out, chunk, y, hn, cn))
        if finishing is not None:
            await finishing

    async def _prepare_chunk(self, b: _Block, out: _BlockAnswer, lo: int, hi: int) -> _Chunk | None:
        """Gather rows lo:hi of a block and decide each: run it, replay it or refuse it (None: nothing to run)."""
        ids = b.session_ids if lo == 0 and hi == len(b.session_ids) else b.session_ids[lo:hi]
        try:
            lb = await self.store.gather_block(self.model.key, ids, self.clock())
        except Exception as e:
            failed = self._store_failed(e)
            for i in range(lo, hi):
                out.errors[i] = failed
            return None
        n, t = hi - lo, b.x.shape[1]
        x = b.x[lo:hi]
        seq = None if b.seq is None else b.seq[lo:hi]
        ok = np.ones(n, np.bool_)
        for j, failed in lb.failed.items():
            moved = isinstance(failed, SessionMovedError) and b.lives is not None and b.lives[lo + j]
            out.errors[lo + j] = session_replaced(ids[j]) if moved else failed
            ok[j] = False
        if b.lives is not None and lb.life is not None:
            want = b.lives[lo:hi]
            for j in np.flatnonzero(ok & (want != 0) & (lb.life != want)).tolist():
                out.errors[lo + j] = session_replaced(ids[j])  # NOTE: another life of the id (see submit)
                ok[j] = False
        nxt = lb.seq + 1
        # NOTE: a row runs when it has no seq or the next one, and its counters stay below their maximum
        fresh = ok if seq is None else ok & ((seq == 0) | (seq == nxt.astype(np.uint64)))
        run = fresh & (nxt < MAX_COUNTER) & (lb.steps + t < MAX_COUNTER)
        for j in np.flatnonzero(ok & ~run).tolist():  # NOTE: retries, conflicts, full counters: one by one
            call_seq = None if seq is None or not seq[j] else int(seq[j])
            lease = Lease(lb.session_ids[j], None, int(lb.steps[j]), int(lb.seq[j]), lb.replay(j))
            verdict = self._check_seq(_Work(lease.session_id, x[j], call_seq, _NO_ANSWER), lease)
            if isinstance(verdict, StepOutcome):
                out.outputs[lo + j], out.steps[lo + j], out.seq[lo + j] = verdict.outputs, verdict.steps, verdict.seq
                out.replayed[lo + j] = out.answered[lo + j] = True
            else:
                out.errors[lo + j] = verdict if verdict is not None else ModelError("inference failed")
        pos = np.flatnonzero(run)
        if not len(pos):
            return None
        if len(pos) == n:
            return _Chunk(lo, pos + lo, pos, x, seq, lb, lb.h, lb.c)
        return _Chunk(lo, pos + lo, pos, x[pos], None if seq is None else seq[pos], lb, lb.h[:, pos], lb.c[:, pos])

    async def _commit_chunk(self, b: _Block, out: _BlockAnswer, chunk: _Chunk, y: F32, hn: F32, cn: F32) -> None:
        """Commit the rows of a chunk that ran and fill in their answers."""
        finite = np.asarray(self._finite_rows(y, hn, cn), np.bool_)
        for j in np.flatnonzero(~finite).tolist():
            out.errors[int(chunk.idx[j])] = ModelError(
                f"{self.model.describe()} produced non-finite outputs for these inputs; state unchanged"
            )
        keep = np.flatnonzero(finite)  # NOTE: positions among the chunk's run rows
        if not len(keep):
            return
        every = len(keep) == len(chunk.idx)
        rows = chunk.rows if every else chunk.rows[keep]  # NOTE: rows of the chunk's lease block
        ys, xs = (y, chunk.x) if every else (y[keep], chunk.x[keep])
        lb, t = chunk.lease, xs.shape[1]
        digests = np.zeros((len(rows), DIGEST_BYTES), np.uint8)
        kept = None
        if chunk.seq is not None:
            with_seq = np.flatnonzero(chunk.seq if every else chunk.seq[keep])
            if len(with_seq):  # NOTE: rows with seq keep their input digest (and small outputs) for a retry
                raw, width, blake = np.ascontiguousarray(xs).tobytes(), xs[0].nbytes, hashlib.blake2b
                hashes = b"".join([blake(raw[j * width : (j + 1) * width], digest_size=16).digest()
                                   for j in with_seq.tolist()])  # fmt: skip
                digests[with_seq] = np.frombuffer(hashes, np.uint8).reshape(-1, DIGEST_BYTES)
                kept = ys if ys[0].nbytes <= REPLAY_MAX_BYTES else None
        extra, scored = None, None
        if self._scoring is not None:
            extra, scored = self._scoring.score_rows(lb.extra[rows], xs, ys)
        new_steps, new_seq = lb.steps[rows] + t, lb.seq[rows] + 1
        out.saving[rows + chunk.lo] = True  # NOTE: cleared when the store answers, not when a stop cancels the wait
        try:
            status = await self.store.commit_block(
                self.model.key, lb, BlockCommit(rows, new_steps, new_seq, digests, kept, extra),
                hn if every else hn[:, keep, :], cn if every else cn[:, keep, :], self.clock(),
            )  # fmt: skip
        except Exception as e:
            out.saving[rows + chunk.lo] = False
            failed = self._store_failed(e)
            for r in rows.tolist():
                out.errors[chunk.lo + r] = failed
            return
        out.saving[rows + chunk.lo] = False
        done = status == COMMITTED
        if scored is not None:
            self._count_scored(scored, done.tolist())
        won = rows[done] + chunk.lo
        out.outputs[won] = ys[done]
        out.steps[won], out.seq[won] = new_steps[done], new_seq[done]
        out.answered[won] = True
        for j in np.flatnonzero(~done).tolist():
            sid = lb.session_ids[int(rows[j])]
            out.errors[chunk.lo + int(rows[j])] = (
                await self._stale(sid)
                if status[j] == STALE
                else SessionNotFoundError(
                    f"session {sid!r} was deleted, expired or evicted while this step ran; the step was not applied"
                )
            )

    def _count_scored(self, scored: Scored, committed: list[bool]) -> None:
        """Add what the applied steps scored to the metrics (steps not applied scored nothing)."""
        rows = scored.rows if all(committed) else scored.rows[committed]
        self._unflushed += rows[0] if len(rows) == 1 else rows.sum(axis=0)
        if self._flush_timer is None and self._loop_ref is not None:
            self._flush_timer = self._loop_ref.call_later(SCORE_FLUSH_SECONDS, self.flush_scores)

    def flush_scores(self) -> None:
        """Move what was scored since the last flush to the Prometheus counters."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        acc = self._unflushed
        for k, (err, per, n) in enumerate(self._scored):
            if acc[2, k]:
                err.inc(float(acc[0, k]))
                per.inc(float(acc[1, k]))
                n.inc(int(acc[2, k]))
        acc[:] = 0.0

    @staticmethod
    def _finite_rows(y: F32, hn: F32, cn: F32) -> NDArray[np.bool_] | list[bool]:
        """Per batch row: are its outputs and new state all finite? A finite sum of everything says yes for
        every row at once (a NaN or an infinity anywhere makes it non-finite); only otherwise row by row."""
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(float(y.sum()) + float(hn.sum()) + float(cn.sum())):
                return [True] * y.shape[0]
        return np.asarray(
            np.isfinite(y).all(axis=(1, 2)) & np.isfinite(hn).all(axis=(0, 2)) & np.isfinite(cn).all(axis=(0, 2))
        )

    async def _stale(self, session_id: str) -> ServeError:
        """The answer to a step whose session changed while it ran: a conflict naming the seq to send now."""
        try:
            now = await self.store.info(session_id, self.clock())
        except ServeError as e:
            return e
        return SeqConflictError(
            f"session {session_id!r} was changed (reset, imported or stepped elsewhere) while this step ran; "
            f"the step was not applied: expected seq {now.seq + 1}"
        )

    def _store_failed(self, e: Exception) -> ServeError:
        """A store failure is the store's error if it has one, else 'unavailable' (retry with seq), never a
        model error: the model did nothing wrong."""
        if isinstance(e, ServeError):
            return e
        log.error("session store failed on %s", self.model.key, exc_info=e)
        return UnavailableError("the session store did not answer; retry (with seq, a retry is safe)")

    @staticmethod
    def _replay(w: _Work, y: F32) -> Replay | None:
        """What to keep for a retry of this call: nothing without seq; outputs only when small."""
        if w.seq is None:
            return None
        # NOTE: a copy, so that a replay keeps its own outputs and not the whole batch's array
        return Replay(w.seq, w.digest, y.copy() if y.nbytes <= REPLAY_MAX_BYTES else None)

    def _check_seq(self, w: _Work, lease: Lease) -> StepOutcome | ServeError | None:
        """None: apply the call. A StepOutcome: replay of the last applied seq. An error: a seq conflict, or
        counters that would pass their maximum."""
        if w.seq is None or w.seq == lease.seq + 1:
            if lease.seq + 1 >= MAX_COUNTER or lease.steps + w.x.shape[0] >= MAX_COUNTER:
                # NOTE: a conflict with the session's state (409), not a malformed request
                return SeqConflictError(
                    f"session {lease.session_id!r} has reached the largest step count or seq ({MAX_COUNTER - 1}); "
                    "reset it, or import it with smaller counters"
                )
            return None
        if w.seq == lease.seq and lease.replay is not None and lease.replay.seq == w.seq:
            if lease.replay.digest != w.digest:
                return SeqConflictError(
                    f"seq {w.seq} was already applied to session {lease.session_id!r} with different inputs; "
                    f"send seq {lease.seq + 1} for new steps"
                )
            if lease.replay.outputs is None:
                return SeqConflictError(
                    f"seq {w.seq} was already applied to session {lease.session_id!r}, but its outputs were too "
                    f"large to keep for a retry (over {REPLAY_MAX_BYTES} bytes); send seq {lease.seq + 1} for new "
                    "steps, or keep retried calls small"
                )
            return StepOutcome(lease.replay.outputs, lease.steps, lease.seq, replayed=True)
        if w.seq == lease.seq:
            return SeqConflictError(
                f"seq {w.seq} is the last applied seq of session {lease.session_id!r}, but nothing of that call is "
                "kept for a retry (it carried no seq, or the session was imported or restored with this seq); send "
                f"seq {lease.seq + 1} for new steps"
            )
        return SeqConflictError(
            f"seq {w.seq} does not follow the last applied seq {lease.seq} of session {lease.session_id!r}; "
            f"expected seq {lease.seq + 1}"
        )
