"""The protocol-neutral core used by every transport: models, predictions, sessions, steps and streams.

Transports decode their wire format into NumPy arrays and plain values, call one method here, and
encode the result; every rule (validation, limits, seq, session lifecycle) lives in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, cast

import numpy as np
from numpy.typing import NDArray

from service.core.batcher import Batcher, BlockOutcome, StepOutcome
from service.core.scoring import OFF_AT, SessionScore, restart
from service.core.sessions import (
    MAX_COUNTER,
    SESSION_ID,
    MemorySessionStore,
    SessionInfo,
    SessionStore,
    Snapshot,
    check_session_id,
    not_served,
    session_gone,
)
from service.core.tasks import stop_task
from service.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelInUseError,
    ServeError,
    SessionNotFoundError,
    UnavailableError,
)
from service.metrics import Metrics
from service.repository import ModelRepository, ModelVersion
from service.runtime import F32

if TYPE_CHECKING:
    from service.core.live import LiveRepository

log = logging.getLogger(__name__)
DRAINING_STREAM = "the server is shutting down; this stream ends here: reconnect to another server"


@dataclass(frozen=True)
class Limits:
    """The knobs of the core (a subset of the settings)."""

    max_batch_size: int = 64
    block_rows: int = 256  # rows of a packed step batch per ONNX call
    max_queue_delay: float = 0.001
    max_queue: int = 4096
    max_queue_wait: float = 0.0  # refuse a call expected to wait longer in the queue (0: only max_queue)
    max_steps_per_call: int = 4096
    session_ttl: float = 600.0
    stream_open_timeout: float = 30.0  # a stream whose first message takes longer ends with deadline_exceeded
    default_deadline: float = 0.0  # seconds a call may wait in the queue when it names no deadline (0: no limit)


@dataclass(frozen=True)
class StepResult:
    """The answer to a step call."""

    session_id: str
    outputs: F32  # [T, O]
    steps: int
    seq: int
    replayed: bool = False


@dataclass(frozen=True)
class StreamOpen:
    """The first message of a stream: open a new session (model) or resume one (resume_session_id).

    Which session a stream closes when it ends: only one it opened itself, unless `keep`, and only while
    no other stream has resumed it. A resumed session stays when the resuming stream ends (it was
    created elsewhere: another stream, REST, an import), and resuming takes it out of the opening
    stream's hands: a half-open old stream that is reaped later does not delete it. Delete it
    explicitly or let it expire. A stream never closes a later session that took the same id.
    """

    model: str | None = None
    version: str | None = None
    session_id: str | None = None  # with model: a client-chosen id for the new session
    resume_session_id: str | None = None
    keep: bool = False


@dataclass(frozen=True)
class StreamMessage:
    """One message on a stream: optional open (first message only) and steps to apply."""

    inputs: F32 | None  # [T, F], or None for no steps
    seq: int | None = None
    open: StreamOpen | None = None
    error: ServeError | None = None  # the transport could not decode this message: reply with this error
    peek: bool = False  # what-if: the outputs of these steps on a copy of the state (see DataPlane.peek)


@dataclass(frozen=True)
class StreamReply:
    """One reply per message, in order; `error` set means the message failed and the session is unchanged."""

    session_id: str
    result: StepResult | None = None
    error: ServeError | None = None
    session: SessionInfo | None = None


BLOCK_MIN_ITEMS = 8  # NOTE: from this many sessions of one shape, a step batch runs faster as a block (measured)


def plural(n: int, noun: str) -> str:
    """'1 feature value', '4 feature values'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def check_seq(seq: int | None) -> None:
    """A step's seq, when it has one, counts from 1."""
    if seq is not None and seq < 1:
        raise InvalidInputError(f"seq must be >= 1 (the first step call of a session is seq 1); got {seq}")


class _AsClient:
    """A context in which errors that name a namespaced session id name it as its client knows it. A class, not
    a generator: it is entered on every step."""

    __slots__ = ("owner", "session_id")

    def __init__(self, owner: str, session_id: str) -> None:
        self.owner, self.session_id = owner, session_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(e, ServeError):
            self.rename(e)

    def rename(self, e: ServeError) -> ServeError:
        if self.owner:
            e.message = e.message.replace(repr(f"{self.owner}.{self.session_id}"), repr(self.session_id))
            e.args = (e.message,)
        return e


class DataPlane:
    """One instance per server, shared by REST, gRPC and WebSocket."""

    def __init__(
        self,
        repo: ModelRepository,
        store: SessionStore,
        metrics: Metrics,
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # NOTE: `clock` (monotonic) orders and expires sessions; the store shows their times as Unix times
        self.repo, self.store, self.metrics, self.limits, self.clock = repo, store, metrics, limits, clock
        store.set_removal_listener(self._on_removed)
        self.live: LiveRepository | None = None  # NOTE: the repository API's backend, set by the server
        self._unloading = asyncio.Lock()  # NOTE: one unload at a time: each checks, awaits, then acts
        self._unloaded: set[str] = set()  # model keys unloaded here (their sessions ended)
        self._batchers: dict[str, Batcher] = {}
        for m in repo.all():
            self._add_batcher(m)
        self._expiry_task: asyncio.Task[None] | None = None
        self.draining = False
        self._stream_waits: set[asyncio.Future[None]] = set()  # NOTE: streams waiting for a message (see begin_drain)
        self.started = False

    def _add_batcher(self, m: ModelVersion) -> Batcher:
        """A batcher, with an ONNX Runtime thread of its own, for a model version; its metrics start here."""
        lim = self.limits
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{m.key}")
        b = Batcher(m, self.store, self.metrics, executor, lim.max_batch_size, lim.max_queue_delay, lim.max_queue,
                    self.clock, lim.max_queue_wait, lim.block_rows)  # fmt: skip
        self._batchers[m.key] = b
        self.metrics.model_info.labels(m.name, m.version, ",".join(m.card.features), str(m.card.horizon)).set(1)
        self.metrics.sessions_open.labels(m.key).set(0)
        return b

    # --- live model repository ---------------------------------------------------------------------
    def add_model(self, m: ModelVersion) -> None:
        """Serve a newly loaded version: new sessions of its model get it (the newest); open ones keep theirs."""
        if m.key in self._batchers:
            raise InvalidInputError(f"{m.describe()} is loaded already")
        self._unloaded.discard(m.key)
        self.store.add_model(m.key, m.signature)
        b = self._add_batcher(m)
        if self.started:
            b.start()
        self.repo.add(m)

    async def remove_model(self, name: str, version: str, force: bool = False) -> int:
        """Stop serving a version. Refused while sessions run on it, unless `force`: then they end (their next
        call says the version was unloaded) and queued steps are answered unavailable. Returns sessions ended."""
        async with self._unloading:
            return await self._remove_model(name, version, force)

    async def _remove_model(self, name: str, version: str, force: bool) -> int:
        m = self.get_model(name, version)
        if len(self._batchers) == 1:
            raise ModelInUseError(f"{m.describe()} is the last model this server serves; load another one first")
        n = await self.store.count(m.key)
        if n and not force:
            raise ModelInUseError(
                f"{m.describe()} has {n} open session(s); unload it with force to end them, or once they are "
                "deleted or expired (a reset moves a session to the newest version)"
            )
        self.repo.remove(m.name, m.version)  # NOTE: first, so that no new session or call picks it
        self._unloaded.add(m.key)
        b = self._batchers.pop(m.key)
        await b.stop()
        b.executor.shutdown(wait=False, cancel_futures=True)
        ended = await self.store.drop_model(m.key)
        with contextlib.suppress(KeyError):
            self.metrics.model_info.remove(m.name, m.version, ",".join(m.card.features), str(m.card.horizon))
        self.metrics.sessions_open.labels(m.key).set(0)
        log.info("unloaded %s (%d session(s) ended)", m.key, ended)
        return ended

    def _batcher(self, key: str, session_id: str) -> Batcher:
        """The batcher of a session's model version: a version unloaded here has ended the session; one that this
        server has not loaded (yet: another replica or worker loaded it first) is a retryable unavailable."""
        b = self._batchers.get(key)
        if b is None:
            # NOTE: an unload here ended the version's sessions in this process's store; in a shared one a session of
            # it that lives was opened since on a replica that serves it
            if key in self._unloaded and isinstance(self.store, MemorySessionStore):
                raise session_gone(session_id, "unloaded", self.limits.session_ttl)
            raise not_served(session_id, key)
        return b

    def flush_metrics(self) -> None:
        """Bring the counters that the batchers add up between batches (live accuracy) up to date: before
        /metrics answers, so that a scrape sees every step answered before it."""
        for b in list(self._batchers.values()):
            b.flush_scores()

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.start()
        for b in self._batchers.values():
            b.start()
        self._expiry_task = asyncio.create_task(self._expire_loop(), name="session-expiry")
        self.started = True
        self.metrics.ready.set(1)

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and self.store.healthy

    def begin_drain(self) -> None:
        """Refuse new work from now on; work already queued still runs; open streams end."""
        self.draining = True
        for waiting in self._stream_waits:  # NOTE: wakes every stream waiting for its next message: it ends
            if not waiting.done():
                waiting.set_result(None)
        self.metrics.ready.set(0)

    async def wait_idle(self) -> None:
        await asyncio.gather(*(b.wait_idle() for b in self._batchers.values()))

    async def stop(self) -> None:
        await stop_task(self._expiry_task)
        for b in list(self._batchers.values()):
            await b.stop()
            b.executor.shutdown(wait=False, cancel_futures=True)
        await self.store.close()
        self.started = False
        self.metrics.ready.set(0)

    async def _expire_loop(self) -> None:
        period = min(5.0, max(0.05, self.limits.session_ttl / 4))
        while True:
            await asyncio.sleep(period)
            try:
                await self.store.expire(self.clock())
                await self._update_open()
            except Exception as e:  # NOTE: keep sweeping whatever one sweep hit (a store that is down, say)
                log.warning("session expiry sweep failed: %s", e)

    def _accepting(self) -> None:
        if self.draining:
            raise UnavailableError("the server is shutting down; retry on another replica or after restart")

    # --- models ------------------------------------------------------------------------------------
    def list_models(self) -> list[ModelVersion]:
        """The default (newest) version of every model."""
        return [self.repo.get(name) for name in self.repo.names()]

    def get_model(self, name: str, version: str | None = None) -> ModelVersion:
        return self.repo.get(name, version or None)

    def versions(self, name: str) -> list[str]:
        return [m.version for m in self.repo.versions(name)]

    def validate_inputs(self, model: ModelVersion, x: np.ndarray) -> F32:
        """Check a [T, F] array of raw inputs against the model and the limits; return it as float32."""
        sig = model.signature
        if x.ndim != 2:
            raise InvalidInputError(
                f"inputs must be a list of steps, each a list of {plural(sig.features, 'number')} ([T, F]); "
                f"got {x.ndim} dimension(s)"
            )
        t, f = x.shape
        if t == 0:
            raise InvalidInputError("inputs hold no steps; send at least one step of feature values")
        if t > self.limits.max_steps_per_call:
            raise InvalidInputError(
                f"inputs hold {t} steps; the limit per call is {self.limits.max_steps_per_call}: split them"
            )
        if f != sig.features:
            raise InvalidInputError(
                f"each step must have {plural(sig.features, 'feature value')} ({', '.join(model.card.features)}) for "
                f"{model.describe()}; got {f}"
            )
        if x.dtype != np.float32 and not np.issubdtype(x.dtype, np.number):
            raise InvalidInputError("inputs must be numbers")
        if x.dtype == np.float32:
            x32 = np.ascontiguousarray(x)
        else:
            with np.errstate(over="ignore"):  # NOTE: beyond float32 becomes inf, refused below with what it was
                x32 = np.ascontiguousarray(x, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(x32.sum()):  # NOTE: one reduction says "all finite" in the usual case
                return x32
        bad = ~np.isfinite(x32)  # NOTE: a NaN or an infinity, or only a sum that overflowed
        if bad.any():
            step, feat = (int(v) for v in np.argwhere(bad)[0])
            raise InvalidInputError(
                f"inputs must be finite numbers; step {step}, feature {model.card.features[feat]!r} is "
                f"{'NaN' if np.isnan(x32[step, feat]) else 'infinite or out of float32 range'}"
            )
        return x32

    # --- stateless ---------------------------------------------------------------------------------
    def deadline(self, queue_timeout: float | None) -> float | None:
        """The perf_counter time by which a call must have started, from the client's timeout in seconds
        (None: the server default; no deadline if that is 0)."""
        if queue_timeout is None:
            queue_timeout = self.limits.default_deadline or None
        return None if queue_timeout is None else time.perf_counter() + queue_timeout

    async def predict(
        self, name: str, version: str | None, inputs: np.ndarray, queue_timeout: float | None = None
    ) -> tuple[ModelVersion, F32]:
        """Run a whole sequence from a zero state; return the model used and outputs [T, O]."""
        self._accepting()
        model = self.get_model(name, version)
        x = self.validate_inputs(model, inputs)
        out = await self._batchers[model.key].submit(None, x, None, self.deadline(queue_timeout))
        return model, out.outputs

    # --- sessions ----------------------------------------------------------------------------------
    # NOTE: `owner` (an API key's tag, "" without authentication) namespaces session ids: the store keys a
    # session as "<owner>.<id>", so another key's session of the same id is simply not there (404). Clients
    # only ever see their own id, in answers and in error messages.
    @staticmethod
    def _scoped(owner: str, session_id: str) -> str:
        check_session_id(session_id)
        return f"{owner}.{session_id}" if owner else session_id

    @staticmethod
    def _unscoped(owner: str, info: SessionInfo) -> SessionInfo:
        return replace(info, session_id=info.session_id[len(owner) + 1 :]) if owner else info

    @staticmethod
    def _as_client(owner: str, session_id: str) -> _AsClient:
        """Errors name the session as the client knows it, never by its namespaced key."""
        return _AsClient(owner, session_id)

    async def create_session(
        self, name: str, version: str | None, session_id: str | None, owner: str = ""
    ) -> SessionInfo:
        self._accepting()
        model = self.get_model(name, version)
        sid = uuid.uuid4().hex if session_id is None else session_id  # NOTE: "" is an invalid id, not "generate"
        with self._as_client(owner, sid):
            info = await self.store.create(model.key, self._scoped(owner, sid), self.clock())
        self.metrics.sessions_created.labels(model.key).inc()
        await self._update_open()
        return self._unscoped(owner, info)

    async def get_session(self, session_id: str, owner: str = "") -> SessionInfo:
        with self._as_client(owner, session_id):
            return self._unscoped(owner, await self.store.info(self._scoped(owner, session_id), self.clock()))

    def live_accuracy(self, info: SessionInfo) -> SessionScore | None:
        """How well a session's forecasts did as the truth arrived (None: its model does not score them)."""
        try:
            m = self.get_model(info.model, info.version)
        except ServeError:  # NOTE: unloaded since the session was read
            return None
        return None if m.scoring is None else m.scoring.summary(info.extra)

    async def delete_session(self, session_id: str, incarnation: str | None = None, owner: str = "") -> None:
        """Delete a session; with `incarnation`, only that life of the id (see `SessionInfo.incarnation`)."""
        with self._as_client(owner, session_id):
            await self.store.delete(self._scoped(owner, session_id), incarnation)
        await self._update_open()

    async def reset_session(self, session_id: str, owner: str = "") -> SessionInfo:
        """Zero a session's state and counters. A session on an older version than its model's newest moves to the
        newest (its state is zero either way): the end of its pinning."""
        scoped = self._scoped(owner, session_id)
        with self._as_client(owner, session_id):
            info = await self.store.reset(scoped, self.clock(), restart)  # NOTE: an unscored fork stays unscored
            newest = self.repo.get(info.model)
            if newest.version != info.version:
                self._accepting()
                await self.store.delete(scoped, info.incarnation)
                unscored = len(info.extra) > OFF_AT and bool(info.extra[OFF_AT])
                info = await self.store.create(newest.key, scoped, self.clock())
                if unscored and info.extra:
                    info = await self.store.reset(scoped, self.clock(), lambda r: restart(r, off=True))
                self.metrics.sessions_created.labels(newest.key).inc()
                await self._update_open()
            return self._unscoped(owner, info)

    async def export_session(self, session_id: str, owner: str = "") -> Snapshot:
        with self._as_client(owner, session_id):
            return await self.store.export(self._scoped(owner, session_id), self.clock())

    async def import_session(self, session_id: str, snapshot: Snapshot, owner: str = "") -> SessionInfo:
        """Restore a snapshot into a session, creating it if needed; shapes are checked against the model."""
        self._accepting()
        model = self.get_model(snapshot.model, snapshot.version)
        sig = model.signature
        if not sig.cell and snapshot.c.size == 0:  # NOTE: a model without a cell state: any empty c will do
            snapshot = replace(snapshot, c=np.zeros((sig.layers, 0), np.float32))
        for name, arr, width in (("h", snapshot.h, sig.hidden), ("c", snapshot.c, sig.cell)):
            if arr.shape != (sig.layers, width):
                raise InvalidInputError(
                    f"snapshot {name} must be [{sig.layers}, {width}] (layers, width) for "
                    f"{model.describe()}; got {list(arr.shape)}"
                )
            if not np.isfinite(arr).all():
                raise InvalidInputError(f"snapshot {name} holds non-finite values")
        # NOTE: the server's own copy (a KServe START undone) comes back exactly; one from the wire starts the record
        # again, as an unscored fork stays unscored
        exact = len(snapshot.extra) == sig.extra > 0
        record = (lambda _: snapshot.extra) if exact else restart
        with self._as_client(owner, session_id):
            info, created = await self.store.restore(
                self._scoped(owner, session_id), model.key, snapshot, self.clock(), record
            )
        if created:
            self.metrics.sessions_created.labels(model.key).inc()
        await self._update_open()
        return self._unscoped(owner, info)

    async def _update_open(self) -> None:
        """Set the open-sessions gauge from the store (for a shared store: all sessions, every replica). Only a
        gauge: a store that cannot answer now leaves it as it was, and the operation that called this stands."""
        try:
            for key in list(self._batchers):  # NOTE: a copy: a version may be loaded or unloaded meanwhile
                self.metrics.sessions_open.labels(key).set(await self.store.count(key))
        except ServeError as e:
            log.warning("cannot count open sessions: %s", e.message)

    def _on_removed(self, model_key: str, reason: str) -> None:
        self.metrics.sessions_removed.labels(model_key, reason).inc()

    # --- steps -------------------------------------------------------------------------------------
    async def step(
        self,
        session_id: str,
        inputs: np.ndarray,
        seq: int | None = None,
        queue_timeout: float | None = None,
        owner: str = "",
        expect: Callable[[str], None] | None = None,
        peek: bool = False,
    ) -> StepResult:
        """Apply 1..N steps to a session in arrival order; the answer holds the outputs of every step.

        `queue_timeout`: seconds the call may wait in the queue; past it the call is answered deadline_exceeded
        without running (the session unchanged). `expect` is called with the session's model key before the
        step is queued, and may refuse it by raising (a KServe sequence pinned to a model, say).
        """
        self._accepting()
        scoped = self._scoped(owner, session_id)
        with self._as_client(owner, session_id):
            key = await self.store.model_of(scoped, self.clock())
            if expect is not None:
                self._batcher(key, session_id)  # NOTE: a version not served here says so before a pin compares it
                expect(key)
            return await self._step(key, scoped, session_id, inputs, seq, queue_timeout, peek)

    async def _step(
        self,
        key: str,
        scoped: str,
        session_id: str,
        inputs: np.ndarray,
        seq: int | None,
        queue_timeout: float | None,
        peek: bool = False,
        life: int = 0,
    ) -> StepResult:
        """A step of a session known to run model `key` (the batch checks it again: it may have changed since);
        with `peek`, on a copy of its state (see `peek`); with `life`, of that life of the id only (a stream's)."""
        check_seq(seq)
        batcher = self._batcher(key, session_id)
        x = self.validate_inputs(batcher.model, inputs)
        out: StepOutcome = await batcher.submit(scoped, x, seq, self.deadline(queue_timeout), peek=peek, life=life)
        return StepResult(session_id, out.outputs, out.steps, out.seq, out.replayed)

    async def peek(
        self, session_id: str, inputs: np.ndarray, queue_timeout: float | None = None, owner: str = ""
    ) -> StepResult:
        """What-if: the outputs of 1..N hypothetical steps on a copy of a session's state. The session stays exactly
        as it was: state, steps, seq, idle time and live accuracy. Batched, limited and refused like a step."""
        return await self.step(session_id, inputs, None, queue_timeout, owner, peek=True)

    async def fork_session(
        self, session_id: str, new_session_id: str | None = None, scored: bool = False, owner: str = ""
    ) -> SessionInfo:
        """A new session from another's current state and step count (seq from 0), under a new or chosen id. The
        fork keeps the origin's pending forecasts; its steps are scored as the truth only when `scored` (a fork is
        for what-if). Forks and their origin are independent from then on."""
        self._accepting()
        scoped = self._scoped(owner, session_id)
        new_id = uuid.uuid4().hex if new_session_id is None else new_session_id
        new_scoped = self._scoped(owner, new_id)
        with self._as_client(owner, session_id), self._as_client(owner, new_id):
            key = await self.store.model_of(scoped, self.clock())
            scoring = self._batcher(key, session_id).model.scoring

            def record(extra: bytes) -> bytes:
                return extra if scoring is None else scoring.fork(extra, scored)

            info = await self.store.fork(scoped, new_scoped, self.clock(), record)
            if key not in self._batchers:  # NOTE: its version was unloaded while the fork was made: not a session
                with contextlib.suppress(ServeError):
                    await self.store.delete(new_scoped, info.incarnation)
                raise session_gone(session_id, "unloaded", self.limits.session_ttl)
        self.metrics.sessions_created.labels(key).inc()
        await self._update_open()
        return self._unscoped(owner, info)

    async def _models_of(self, scoped: list[str]) -> list[str | ServeError]:
        """Each session's model key, or its error; a store that fails fails every row alone (each row of a batch
        answers as its own call would), not the whole call."""
        try:
            return await self.store.models_of(scoped, self.clock())
        except ServeError as e:
            return [e] * len(scoped)

    async def step_batch(
        self,
        items: Sequence[tuple[str, np.ndarray | ServeError, int | None]],
        queue_timeout: float | None = None,
        owner: str = "",
    ) -> list[StepResult | ServeError]:
        """Steps for many sessions at once; they join the same batches. Each item succeeds or fails alone.

        An item whose inputs the transport could not decode arrives as its error. The steps of all
        items together count against max_steps_per_call, which bounds the size of the answer.
        """
        self._accepting()
        ids = [sid for sid, _, _ in items]
        if not ids:
            raise InvalidInputError("the step batch holds no items; send at least one {session_id, inputs}")
        seen: set[str] = set()
        repeated: list[bool] = []
        for sid in ids:
            repeated.append(sid in seen)
            seen.add(sid)
        # NOTE: every item counts at least one step, failed ones too, so that the answer stays bounded
        total = sum(max(1, x.shape[0]) if isinstance(x, np.ndarray) and x.ndim >= 1 else 1 for _, x, _ in items)
        if total > self.limits.max_steps_per_call:
            raise InvalidInputError(
                f"the step batch holds {total} steps in all (items count at least one each); the limit per call "
                f"is {self.limits.max_steps_per_call}: split it"
            )

        uniform = self._as_block(items)
        if uniform is not None:  # NOTE: many items of one shape run as a block: the same answers, as whole arrays
            block = await self.step_block(*uniform, queue_timeout, owner)
            return [
                block.errors[i] if i in block.errors
                else StepResult(sid, block.outputs[i], int(block.steps[i]), int(block.seq[i]), bool(block.replayed[i]))
                for i, sid in enumerate(uniform[0])
            ]  # fmt: skip
        results: list[StepResult | ServeError | None] = [None] * len(items)
        # NOTE: with one model version served, every session runs it (its batch checks that): no lookup per item
        only = next(iter(self._batchers)) if len(self._batchers) == 1 else None
        keys: dict[int, str | ServeError] = {}
        if only is None:  # NOTE: one store call for all items (a round trip each on Redis made a big batch slow)
            valid = [(i, self._scoped(owner, sid)) for i, (sid, _, _) in enumerate(items)
                     if SESSION_ID.fullmatch(sid) is not None]  # fmt: skip
            found = await self._models_of([scoped for _, scoped in valid])
            keys = {i: key for (i, _), key in zip(valid, found, strict=True)}
        groups: dict[str, list[tuple[int, str, F32, int | None]]] = {}  # model key -> (item, scoped id, x, seq)
        for i, ((sid, x, seq), again) in enumerate(zip(items, repeated, strict=True)):
            try:
                if again:  # NOTE: a later item of a session already in the batch fails alone; the first one runs
                    raise InvalidInputError(f"session {sid!r} is in this step batch already: one item per session")
                if isinstance(x, ServeError):
                    raise x
                scoped = self._scoped(owner, sid)
                check_seq(seq)
                with self._as_client(owner, sid):
                    key = only or keys[i]
                    if isinstance(key, ServeError):
                        raise key
                x32 = self.validate_inputs(self._batcher(key, sid).model, x)
                groups.setdefault(key, []).append((i, scoped, x32, seq))
            except ServeError as e:
                results[i] = e
        deadline = self.deadline(queue_timeout)
        for key, calls in groups.items():
            # NOTE: the items of a model go to its batcher together, with one future for all of them
            try:
                batcher = self._batchers.get(key)
                if batcher is None:  # NOTE: unloaded while this batch was decoded
                    raise UnavailableError("the model version of these sessions was unloaded")
                outcomes = await batcher.submit_many([(s, x, q) for _, s, x, q in calls], deadline)
            except ServeError as e:
                outcomes = [e] * len(calls)
            for (i, _, _, _), out in zip(calls, outcomes, strict=True):
                sid = items[i][0]
                if isinstance(out, ServeError):
                    results[i] = self._as_client(owner, sid).rename(out)
                else:
                    results[i] = StepResult(sid, out.outputs, out.steps, out.seq, out.replayed)
        assert all(r is not None for r in results)  # NOTE: every item failed early or went to a batcher
        return cast("list[StepResult | ServeError]", results)

    def _as_block(
        self, items: Sequence[tuple[str, np.ndarray | ServeError, int | None]]
    ) -> tuple[list[str], np.ndarray, NDArray[np.uint64] | None] | None:
        """A step batch as a block (ids, [K, T, F], seq or None) when that is faster and answers the same: at least
        BLOCK_MIN_ITEMS items, all decoded to float32 arrays of one [T, F] shape with T >= 1, every seq absent or
        in 1..MAX_COUNTER, and every served model with the same number of outputs (one answer array, one width)."""
        if len(items) < BLOCK_MIN_ITEMS or len({b.model.signature.outputs for b in self._batchers.values()}) > 1:
            return None
        first = items[0][1]
        if not isinstance(first, np.ndarray) or first.ndim != 2 or not first.shape[0]:
            return None
        shape, seqs = first.shape, [seq for _, _, seq in items]
        if not all(isinstance(x, np.ndarray) and x.shape == shape and x.dtype == np.float32 for _, x, _ in items):
            return None  # NOTE: other dtypes come only from in-process callers; the item path checks each
        # NOTE: 0 means "no seq" in a block (an error here); a seq past the counters' range is a conflict, per item
        if any(seq is not None and not 1 <= seq <= MAX_COUNTER for seq in seqs):
            return None
        with_seq = any(seq is not None for seq in seqs)
        x = np.stack([cast(np.ndarray, x) for _, x, _ in items])
        seq = np.fromiter((seq or 0 for seq in seqs), np.uint64, len(seqs)) if with_seq else None
        return [sid for sid, _, _ in items], x, seq

    async def step_block(
        self,
        session_ids: list[str],
        inputs: np.ndarray,
        seq: NDArray[np.uint64] | None = None,
        queue_timeout: float | None = None,
        owner: str = "",
    ) -> BlockOutcome:
        """Steps of many sessions as one [K, T, F] array (a packed step batch): T steps for each of K distinct
        sessions, seq per row (0: none). Decoded, gathered, run and committed as whole arrays; each row succeeds
        or fails alone (the answers a step of its own would get), and the results come back as arrays."""
        self._accepting()
        k = len(session_ids)
        if not k:
            raise InvalidInputError("the packed step batch holds no sessions; send at least one session id")
        if inputs.ndim != 3 or inputs.shape[0] != k:
            raise InvalidInputError(
                f"packed inputs must be [sessions, steps, features] with one row per session id ({k}); "
                f"got shape {list(inputs.shape)}"
            )
        t = inputs.shape[1]
        if t == 0:
            raise InvalidInputError("packed inputs hold no steps; send at least one step per session")
        if k * t > self.limits.max_steps_per_call:
            raise InvalidInputError(
                f"the packed step batch holds {k} x {t} = {k * t} steps; the limit per call is "
                f"{self.limits.max_steps_per_call}: split it"
            )
        if seq is not None and len(seq) != k:
            raise InvalidInputError(
                f"seq must be empty or hold one value per session ({k}, 0 for none); got {len(seq)}"
            )
        if not np.issubdtype(inputs.dtype, np.number):
            raise InvalidInputError("inputs must be numbers")
        x = np.ascontiguousarray(inputs, dtype=np.float32)
        errors: dict[int, ServeError] = {}
        # NOTE: the usual rows (valid, distinct ids) cost a regex match and a set insertion each; the others fail alone
        valid = SESSION_ID.fullmatch
        checked = [valid(sid) is not None for sid in session_ids]
        if not all(checked) or len(set(session_ids)) < k:
            seen: set[str] = set()
            for i, sid in enumerate(session_ids):
                try:
                    if sid in seen:  # NOTE: a later row of a session already in the batch fails alone
                        raise InvalidInputError(f"session {sid!r} is in this step batch already: one item per session")
                    seen.add(sid)
                    check_session_id(sid)
                except ServeError as e:
                    errors[i] = e
        scoped = [f"{owner}.{sid}" for sid in session_ids] if owner else session_ids
        groups: dict[str, list[int]] = {}
        if len(self._batchers) == 1:  # NOTE: one model version served: every session runs it (the block checks)
            groups[next(iter(self._batchers))] = [i for i in range(k) if i not in errors] if errors else list(range(k))
        else:
            asked = [i for i in range(k) if i not in errors] if errors else list(range(k))
            keys = await self._models_of([scoped[i] for i in asked])  # NOTE: one store call
            for i, key in zip(asked, keys, strict=True):
                try:
                    if isinstance(key, ServeError):
                        raise key
                    if key not in self._batchers:
                        self._batcher(key, session_ids[i])  # NOTE: raises what this server says of that version
                    groups.setdefault(key, []).append(i)
                except ServeError as e:
                    errors[i] = e  # NOTE: renamed for the client at the end
        groups = {key: rows for key, rows in groups.items() if rows}
        with np.errstate(over="ignore", invalid="ignore"):
            all_finite = bool(np.isfinite(x.sum()))  # NOTE: one reduction says "all finite" in the usual case
        if not all_finite:
            bad = set(np.flatnonzero(~np.isfinite(x).all(axis=(1, 2))).tolist())
            for key, rows in groups.items():
                for i in bad.intersection(rows):
                    try:
                        self.validate_inputs(self._batchers[key].model, x[i])  # NOTE: says which value, and raises
                    except ServeError as e:
                        errors[i] = e
                groups[key] = [i for i in rows if i not in bad]
            groups = {key: rows for key, rows in groups.items() if rows}
        # NOTE: one answer array has one width: rows of a model with another number of outputs than the first
        # row's fail alone (a block of sessions of several model versions is rare; send those separately)
        widths = {key: self._batchers[key].model.signature.outputs for key in groups}
        sig_out = next(iter(widths.values()), 0)
        for key in [key for key, width in widths.items() if width != sig_out]:
            for i in groups.pop(key):
                errors[i] = InvalidInputError(
                    f"session {session_ids[i]!r} runs {self._batchers[key].model.describe()}, whose {widths[key]} "
                    f"outputs differ from the {sig_out} of this packed batch's first session: send it separately"
                )
        deadline = self.deadline(queue_timeout)
        outputs = np.zeros((k, t, sig_out), np.float32)
        steps_out, seq_out = np.zeros(k, np.int64), np.zeros(k, np.int64)
        replayed = np.zeros(k, np.bool_)

        async def run(key: str, rows: list[int]) -> None:
            batcher = self._batchers.get(key)
            model = batcher.model if batcher is not None else None
            try:
                if batcher is None or model is None:  # NOTE: unloaded while this batch was decoded
                    raise UnavailableError("the model version of these sessions was unloaded")
                self.validate_inputs(model, x[rows[0]])  # NOTE: the shape against this model: once for all rows
                every = len(rows) == k
                got = await batcher.submit_block(
                    scoped if every else [scoped[i] for i in rows],
                    x if every else x[rows],
                    None if seq is None else (seq if every else seq[rows]),
                    deadline,
                )
            except ServeError as e:
                for i in rows:
                    errors[i] = e
                return
            at = np.asarray(rows)
            outputs[at], steps_out[at], seq_out[at], replayed[at] = got.outputs, got.steps, got.seq, got.replayed
            for j, failed in got.errors.items():
                errors[rows[j]] = failed

        await asyncio.gather(*(run(key, rows) for key, rows in groups.items()))
        for i, failed in errors.items():
            self._as_client(owner, session_ids[i]).rename(failed)
        return BlockOutcome(outputs, steps_out, seq_out, replayed, errors)

    # --- streams -----------------------------------------------------------------------------------
    async def stream(
        self, messages: AsyncIterator[StreamMessage], owner: str = ""
    ) -> AsyncGenerator[StreamReply, None]:
        """One session per stream: the first message opens or resumes it; one reply per message, in order.

        A failure to open the session raises (the stream ends with that error); later per-message
        errors come back in the reply and the stream goes on. When the stream ends, the session it
        opened is deleted unless the first message asked to keep it; a resumed one stays (`StreamOpen`).
        The first message must come within `stream_open_timeout`.
        """
        try:
            first = await asyncio.wait_for(self._next_unless_draining(messages), self.limits.stream_open_timeout)
        except TimeoutError:
            raise DeadlineExceededError(
                f"no first message within {self.limits.stream_open_timeout:g} s; send it as soon as the stream opens"
            ) from None
        if first is None:
            return
        if first.error is not None:
            raise first.error
        opened = first.open
        if opened is None:
            raise InvalidInputError("the first stream message must open a session (model) or resume one (session id)")
        if opened.resume_session_id and opened.model:
            raise InvalidInputError(
                "the first stream message must either open a session (model) or resume one, not both"
            )
        if opened.resume_session_id:
            # NOTE: the resumed session changes hands: the stream that opened it no longer closes it
            rid = opened.resume_session_id
            with self._as_client(owner, rid):
                info = self._unscoped(owner, await self.store.detach(self._scoped(owner, rid), self.clock()))
            owned = False
        elif opened.model:
            info = await self.create_session(opened.model, opened.version, opened.session_id, owner)
            owned = not opened.keep
        else:
            raise InvalidInputError("the first stream message must name a model to open, or a session id to resume")
        sid = info.session_id
        # NOTE: the stream knows its session's model and id: no lookup per message (each batch checks the session)
        key = self.get_model(info.model, info.version).key
        scoped = self._scoped(owner, sid)
        try:
            # NOTE: and its life: a session created again under the id (after a delete) is not this stream's
            life = info.life
            yield await self._stream_step(sid, first, info, owner, key, scoped, life)
            while True:
                msg = await self._next_unless_draining(messages)
                if msg is None:
                    return
                if msg.error is not None:
                    yield StreamReply(sid, error=msg.error)
                    continue
                if msg.open is not None:
                    yield StreamReply(sid, error=InvalidInputError("only the first stream message may open a session"))
                    continue
                yield await self._stream_step(sid, msg, None, owner, key, scoped, life)
        finally:
            if owned:  # NOTE: only the life of the id that this stream created, never a later one
                with contextlib.suppress(SessionNotFoundError):
                    await self.delete_session(sid, info.incarnation, owner)

    async def _next_unless_draining(self, messages: AsyncIterator[StreamMessage]) -> StreamMessage | None:
        """The next message, None at the end of the stream; a drain ends the wait with 'unavailable'.

        The wait for the message runs in a task of its own: when grpc cancels the call (the client went away),
        the cancel reaches this stream's task here, and the call ends as cancelled (grpc's request iterator
        would turn a cancel inside it into a plain end of the requests)."""
        if self.draining:
            raise UnavailableError(DRAINING_STREAM)
        nxt = asyncio.ensure_future(anext(messages, None))
        # NOTE: the stream's task waits on a plain future that the message's arrival or a drain completes: no task
        # and no asyncio.wait per message (about 15 us less per message than waiting on a drain task as well)
        waiting: asyncio.Future[None] = nxt.get_loop().create_future()  # NOTE: get_running_loop() makes a syscall

        def arrived(_: object) -> None:
            if not waiting.done():
                waiting.set_result(None)

        nxt.add_done_callback(arrived)
        self._stream_waits.add(waiting)
        try:
            await waiting
        finally:
            self._stream_waits.discard(waiting)
            if not nxt.done():
                # NOTE: a message still in transit when the drain starts is neither applied nor answered
                nxt.cancel()
        if not nxt.done():
            raise UnavailableError(DRAINING_STREAM)
        return nxt.result()

    async def _stream_step(
        self, sid: str, msg: StreamMessage, info: SessionInfo | None, owner: str, key: str, scoped: str, life: int
    ) -> StreamReply:
        if msg.open is not None and (msg.inputs is None or msg.inputs.size == 0):
            return StreamReply(sid, session=info)  # NOTE: an open without steps just reports the session
        inputs = msg.inputs if msg.inputs is not None else np.zeros((0, 0), np.float32)
        try:
            self._accepting()
            with self._as_client(owner, sid):
                if msg.peek and msg.seq is not None:
                    raise InvalidInputError("a peek changes nothing, so it carries no seq: leave seq out")
                result = await self._step(key, scoped, sid, inputs, msg.seq, None, msg.peek, life)
        except ServeError as e:
            return StreamReply(sid, error=e, session=info)
        return StreamReply(sid, result=result, session=info)
