"""Dynamic batching: step calls from every session and transport coalesce into one ONNX Runtime call.

One batcher per model version runs one batch at a time: it takes queued calls in arrival order, at
most one per session and all with the same number of time steps T (an LSTM cannot pad a step without
moving its state), gathers their states, runs the model off the event loop, and scatters the new
states back. A call that cannot join this batch keeps its place for the next one, so the steps of a
session are applied in arrival order. When the server is idle a call runs at once; under load, a
partly filled batch waits up to `max_queue_delay` for company.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from service.core.sessions import Lease, Replay, SessionStore
from service.errors import ModelError, OverloadedError, SeqConflictError, ServeError, UnavailableError
from service.metrics import Metrics
from service.repository import ModelVersion
from service.runtime import F32

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutcome:
    """The result of one step call."""

    outputs: F32  # [T, O]
    steps: int  # time steps applied to the session in total (0 for a stateless prediction)
    seq: int  # seq of this call (0 for a stateless prediction)
    replayed: bool = False


@dataclass
class _Work:
    session_id: str | None  # None: stateless prediction from a zero state
    x: F32  # [T, F]
    seq: int | None
    future: asyncio.Future[StepOutcome]
    enqueued: float = field(default_factory=time.perf_counter)

    def resolve(self, outcome: StepOutcome | ServeError) -> None:
        """Answer the caller, unless it has gone (cancelled) or was answered already."""
        if self.future.done():
            return
        if isinstance(outcome, ServeError):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)

    @functools.cached_property
    def digest(self) -> bytes:
        return hashlib.blake2b(self.x.tobytes(), digest_size=16).digest()


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model, self.store, self.metrics, self.executor = model, store, metrics, executor
        self.max_batch_size, self.max_queue_delay, self.max_queue = max_batch_size, max_queue_delay, max_queue
        self.clock = clock
        self._pending: deque[_Work] = deque()
        self._running: list[_Work] = []  # the batch being executed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._recent_size = 1.0  # moving average of batch sizes: > 1 means concurrent callers
        self._idle = asyncio.Event()
        self._idle.set()
        # NOTE: the labelled children are looked up once; .labels() per step is measurable on the hot path
        self._queue_wait = metrics.queue_wait.labels(model.key)
        self._inference = metrics.inference.labels(model.key)
        self._batch_size = metrics.batch_size.labels(model.key)
        self._steps = metrics.steps.labels(model.key)

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher:{self.model.key}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for w in [*self._running, *self._pending]:
            w.resolve(UnavailableError("the server stopped before this step completed; retry"))
        self._pending.clear()
        self._running = []

    async def wait_idle(self) -> None:
        """Return when nothing is queued or running."""
        await self._idle.wait()

    @property
    def queued(self) -> int:
        return len(self._pending)

    # --- submission --------------------------------------------------------------------------------
    async def submit(self, session_id: str | None, x: F32, seq: int | None) -> StepOutcome:
        """Queue a validated [T, F] call and wait for its outcome."""
        if len(self._pending) >= self.max_queue:
            raise OverloadedError(
                f"{self.model.describe()} has its maximum of {self.max_queue} step calls queued; retry shortly"
            )
        fut: asyncio.Future[StepOutcome] = asyncio.get_running_loop().create_future()
        self._pending.append(_Work(session_id, x, seq, fut))
        self._idle.clear()
        self._wake.set()
        return await fut

    # --- the loop ----------------------------------------------------------------------------------
    def _select(self) -> list[_Work]:
        """Take up to max_batch_size calls with the first call's T, one per session, keeping session order."""
        taken: list[_Work] = []
        rest: deque[_Work] = deque()
        seen: set[str] = set()
        steps: int | None = None
        for w in self._pending:
            if w.future.done():  # cancelled by its caller before it ran
                continue
            fits = len(taken) < self.max_batch_size and (steps is None or w.x.shape[0] == steps)
            if fits and (w.session_id is None or w.session_id not in seen):
                taken.append(w)
                steps = w.x.shape[0]
            else:
                rest.append(w)
            if w.session_id is not None:
                seen.add(w.session_id)  # NOTE: a later call of a skipped session must not overtake it
        self._pending = rest
        return taken

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.max_queue_delay > 0 and self._recent_size > 1.5 and len(self._pending) < self.max_batch_size:
                # NOTE: under concurrent load, give the other callers a moment to join this batch
                oldest = self._pending[0].enqueued
                wait = self.max_queue_delay - (time.perf_counter() - oldest)
                if wait > 0:
                    await asyncio.sleep(wait)
            batch = self._select()
            if not batch:
                continue
            self._recent_size = 0.8 * self._recent_size + 0.2 * len(batch)
            self._running = batch
            try:
                await self._execute(batch)
            except Exception as e:  # pragma: no cover - _execute resolves its own errors
                log.exception("batch failed")
                for w in batch:
                    w.resolve(e if isinstance(e, ServeError) else ModelError("inference failed"))

    async def _execute(self, batch: list[_Work]) -> None:
        now = self.clock()
        started = time.perf_counter()
        for w in batch:
            self._queue_wait.observe(started - w.enqueued)
        sessions = [w for w in batch if w.session_id is not None]
        leases, h_s, c_s = await self.store.gather(self.model.key, [w.session_id or "" for w in sessions], now)
        # decide, per call: run it, replay it, or refuse it
        run: list[tuple[_Work, Lease | None, int]] = []  # (work, lease, row in h_s)
        row = 0
        for w, got in zip(sessions, leases, strict=True):
            if isinstance(got, ServeError):
                w.resolve(got)
                continue
            r, row = row, row + 1
            verdict = self._check_seq(w, got)
            if verdict is not None:
                w.resolve(verdict)
            else:
                run.append((w, got, r))
        run.extend((w, None, -1) for w in batch if w.session_id is None)
        if not run:
            return
        sig = self.model.signature
        x = np.stack([w.x for w, _, _ in run])  # [B, T, F]
        h = np.zeros((sig.layers, len(run), sig.hidden), np.float32)
        c = np.zeros_like(h)
        rows = [i for i, (_, held, _) in enumerate(run) if held is not None]
        h[:, rows, :] = h_s[:, [r for _, held, r in run if held is not None], :]  # NOTE: stateless rows stay zero
        c[:, rows, :] = c_s[:, [r for _, held, r in run if held is not None], :]
        t0 = time.perf_counter()
        try:
            y, hn, cn = await asyncio.get_running_loop().run_in_executor(self.executor, self.model.runtime.run, x, h, c)
        except Exception:
            log.exception("ONNX Runtime failed on %s", self.model.key)
            for w, _, _ in run:
                w.resolve(ModelError(f"{self.model.describe()} failed to run this batch"))
            return
        self._inference.observe(time.perf_counter() - t0)
        self._batch_size.observe(len(run))
        finite: NDArray[np.bool_] = np.asarray(
            np.isfinite(y).all(axis=(1, 2)) & np.isfinite(hn).all(axis=(0, 2)) & np.isfinite(cn).all(axis=(0, 2))
        )
        commit = [(i, w, held) for i, (w, held, _) in enumerate(run) if held is not None and finite[i]]
        if commit:
            idx = [i for i, _, _ in commit]
            await self.store.scatter(
                self.model.key,
                [held for _, _, held in commit],
                hn[:, idx, :],
                cn[:, idx, :],
                [w.x.shape[0] for _, w, _ in commit],
                # NOTE: copies, so that a replay keeps its own outputs and not the whole batch's array
                [Replay(w.seq, w.digest, y[i].copy()) if w.seq is not None else None for i, w, _ in commit],
                self.clock(),
            )
            # NOTE: a slot that a reset/delete/import changed meanwhile is not written: that operation
            # arrived later, so the step is answered as if it ran just before it.
        steps = 0
        for i, (w, held, _) in enumerate(run):
            if not finite[i]:
                w.resolve(
                    ModelError(f"{self.model.describe()} produced non-finite outputs for these inputs; state unchanged")
                )
                continue
            steps += w.x.shape[0]  # NOTE: computed (and committed) even if its caller has gone meanwhile
            if held is None:
                w.resolve(StepOutcome(y[i], 0, 0))
            else:
                w.resolve(StepOutcome(y[i], held.steps + w.x.shape[0], held.seq + 1))
        self._steps.inc(steps)

    def _check_seq(self, w: _Work, lease: Lease) -> StepOutcome | ServeError | None:
        """None: apply the call. A StepOutcome: replay of the last applied seq. An error: a seq conflict."""
        if w.seq is None or w.seq == lease.seq + 1:
            return None
        if w.seq == lease.seq and lease.replay is not None and lease.replay.seq == w.seq:
            if lease.replay.digest != w.digest:
                return SeqConflictError(
                    f"seq {w.seq} was already applied to session {lease.session_id!r} with different inputs; "
                    f"send seq {lease.seq + 1} for new steps"
                )
            return StepOutcome(lease.replay.outputs, lease.steps, lease.seq, replayed=True)
        return SeqConflictError(
            f"seq {w.seq} does not follow the last applied seq {lease.seq} of session {lease.session_id!r}; "
            f"expected seq {lease.seq + 1}"
        )
