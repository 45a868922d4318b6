"""Session state: server-side (h, c) per session, behind a small store interface.

The in-memory store keeps every model version's states in one slab of contiguous arrays
(`h[L, capacity, H]`, `c[L, capacity, H]` plus per-slot counters), so an idle session costs its
2*L*H*4 bytes of state, a few counters and one index entry. A shared backend (Redis, for replicas)
implements the same `SessionStore` protocol; the core and the transports do not change.

Consistency: only the batcher of a model version moves its sessions' state (gather -> run -> scatter).
Control operations (reset, delete, import, expiry) bump a slot's generation, and `scatter` commits
only to slots whose generation is unchanged: a step that raced a reset is answered but not committed,
exactly as if it had run just before the reset.
"""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.errors import InvalidInputError, ServeError, SessionExistsError, SessionLimitError, SessionNotFoundError
from service.runtime import F32, Signature

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_COUNTER = 2**62  # steps and seq stay far below int64 and uint64 overflow


def check_session_id(session_id: str) -> str:
    """A client-chosen id: 1-128 characters of letters, digits and . _ : - (starting with a letter or digit)."""
    if not SESSION_ID.fullmatch(session_id):
        shown = session_id if len(session_id) <= 40 else session_id[:40] + "..."
        raise InvalidInputError(
            f"invalid session id {shown!r}: use 1-128 characters of letters, digits and . _ : - "
            "starting with a letter or digit"
        )
    return session_id


@dataclass(frozen=True)
class SessionInfo:
    """What a client may know about a session."""

    session_id: str
    model: str
    version: str
    steps: int
    seq: int
    created: float
    last_used: float
    expires: float


@dataclass(frozen=True)
class Snapshot:
    """A portable copy of a session: enough to restore it here or on another replica."""

    model: str
    version: str
    steps: int
    seq: int
    h: F32  # [L, H]
    c: F32  # [L, H]


@dataclass(frozen=True)
class Replay:
    """The last applied seq of a session with its input digest and outputs, for idempotent retries."""

    seq: int
    digest: bytes
    outputs: F32


@dataclass(frozen=True)
class Lease:
    """A session's place in one batch: where to scatter its new state back, if still current."""

    session_id: str
    slot: int
    generation: int
    steps: int
    seq: int
    replay: Replay | None


RemovalListener = Callable[[str, str], None]  # (model key, reason: "expired" | "evicted" | "deleted")


class SessionStore(Protocol):
    """What the core needs from session storage."""

    async def create(self, model_key: str, session_id: str | None, now: float) -> SessionInfo: ...
    async def info(self, session_id: str, now: float) -> SessionInfo: ...
    async def model_of(self, session_id: str, now: float) -> str: ...
    async def delete(self, session_id: str) -> None: ...
    async def reset(self, session_id: str, now: float) -> SessionInfo: ...
    async def export(self, session_id: str, now: float) -> Snapshot: ...
    async def restore(
        self, session_id: str, model_key: str, snap: Snapshot, now: float
    ) -> tuple[SessionInfo, bool]: ...
    async def gather(
        self, model_key: str, session_ids: list[str], now: float
    ) -> tuple[list[Lease | ServeError], F32, F32]: ...
    async def scatter(
        self,
        model_key: str,
        leases: list[Lease],
        hn: F32,
        cn: F32,
        steps: list[int],
        replays: list[Replay | None],
        now: float,
    ) -> list[bool]: ...
    async def expire(self, now: float) -> int: ...
    def count(self, model_key: str | None = None) -> int: ...


class _Slab:
    """Contiguous state arrays for the sessions of one model version."""

    def __init__(self, sig: Signature, capacity: int = 64) -> None:
        self.sig = sig
        self.h = np.zeros((sig.layers, capacity, sig.hidden), np.float32)
        self.c = np.zeros((sig.layers, capacity, sig.hidden), np.float32)
        self.steps = np.zeros(capacity, np.int64)
        self.seq = np.zeros(capacity, np.int64)
        self.created = np.zeros(capacity, np.float64)
        self.last_used = np.zeros(capacity, np.float64)
        self.generation = np.zeros(capacity, np.int64)
        self.live = np.zeros(capacity, np.bool_)
        self.ids: list[str | None] = [None] * capacity
        self.free: list[int] = list(range(capacity - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return int(self.live.shape[0])

    def _grow(self) -> None:
        old = self.capacity
        new = old * 2
        self.h = np.concatenate([self.h, np.zeros_like(self.h)], axis=1)
        self.c = np.concatenate([self.c, np.zeros_like(self.c)], axis=1)
        for name in ("steps", "seq", "created", "last_used", "generation", "live"):
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr, np.zeros_like(arr)]))
        self.ids.extend([None] * (new - old))
        self.free.extend(range(new - 1, old - 1, -1))

    def alloc(self, session_id: str, now: float) -> int:
        if not self.free:
            self._grow()
        slot = self.free.pop()
        self.ids[slot] = session_id
        self.live[slot] = True
        self.steps[slot] = self.seq[slot] = 0
        self.created[slot] = self.last_used[slot] = now
        self.generation[slot] += 1
        return slot

    def clear_state(self, slot: int) -> None:
        self.h[:, slot, :] = 0.0
        self.c[:, slot, :] = 0.0
        self.steps[slot] = self.seq[slot] = 0
        self.generation[slot] += 1

    def release(self, slot: int) -> None:
        self.clear_state(slot)
        self.ids[slot] = None
        self.live[slot] = False
        self.free.append(slot)

    def nbytes(self) -> int:
        return sum(
            int(getattr(self, n).nbytes)
            for n in ("h", "c", "steps", "seq", "created", "last_used", "generation", "live")
        )


class MemorySessionStore:
    """Sessions in process memory: one slab per model version, an id index, idle expiry and a cap."""

    def __init__(
        self,
        signatures: dict[str, Signature],
        ttl: float,
        max_sessions: int,
        cap_policy: str = "reject",
        on_removed: RemovalListener | None = None,
    ) -> None:
        self._slabs = {key: _Slab(sig) for key, sig in signatures.items()}
        self._keys = list(self._slabs)  # model index -> model key
        # NOTE: one int per session, (model index << 32) | slot, keeps the index to a dict entry and the id
        self._index: dict[str, int] = {}
        self._replays: dict[str, Replay] = {}  # only for sessions that send seq
        self._gone: OrderedDict[str, str] = OrderedDict()  # recently expired/evicted ids -> reason
        self.ttl, self.max_sessions, self.cap_policy = ttl, max_sessions, cap_policy
        self._on_removed = on_removed or (lambda key, reason: None)

    # --- lookups ---------------------------------------------------------------------------------
    def _locate(self, session_id: str, now: float) -> tuple[str, _Slab, int]:
        where = self._index.get(session_id)
        if where is None:
            reason = self._gone.get(session_id)
            if reason:
                raise SessionNotFoundError(f"session {session_id!r} was {reason}; create a new one")
            raise SessionNotFoundError(f"no session {session_id!r}; create one first (it may have been deleted)")
        key, slot = self._keys[where >> 32], where & 0xFFFFFFFF
        slab = self._slabs[key]
        if now - slab.last_used[slot] > self.ttl:
            self._remove(session_id, "expired")
            raise SessionNotFoundError(f"session {session_id!r} was {self._gone[session_id]}; create a new one")
        return key, slab, slot

    def _info(self, session_id: str, key: str, slab: _Slab, slot: int) -> SessionInfo:
        name, version = key.split("/", 1)
        last = float(slab.last_used[slot])
        return SessionInfo(
            session_id=session_id,
            model=name,
            version=version,
            steps=int(slab.steps[slot]),
            seq=int(slab.seq[slot]),
            created=float(slab.created[slot]),
            last_used=last,
            expires=last + self.ttl,
        )

    def _remove(self, session_id: str, reason: str) -> None:
        where = self._index.pop(session_id)
        key, slot = self._keys[where >> 32], where & 0xFFFFFFFF
        self._slabs[key].release(slot)
        self._replays.pop(session_id, None)
        if reason != "deleted":
            self._gone[session_id] = (
                f"expired after {self.ttl:g} s idle" if reason == "expired" else "evicted to stay under the session cap"
            )
            while len(self._gone) > 10_000:
                self._gone.popitem(last=False)
        self._on_removed(key, reason)

    def _evict_lru(self) -> None:
        best: tuple[float, str] | None = None
        for slab in self._slabs.values():
            if not slab.live.any():
                continue
            used = np.where(slab.live, slab.last_used, np.inf)
            slot = int(np.argmin(used))
            sid = slab.ids[slot]
            if sid is not None and (best is None or used[slot] < best[0]):
                best = (float(used[slot]), sid)
        if best is not None:
            self._remove(best[1], "evicted")

    # --- SessionStore ----------------------------------------------------------------------------
    async def create(self, model_key: str, session_id: str | None, now: float) -> SessionInfo:
        if session_id is None:
            session_id = uuid.uuid4().hex
        else:
            check_session_id(session_id)
            if session_id in self._index:
                try:
                    self._locate(session_id, now)  # NOTE: an expired holder of the id frees it
                except SessionNotFoundError:
                    pass
                else:
                    raise SessionExistsError(f"session {session_id!r} already exists; resume it, or delete it first")
        if len(self._index) >= self.max_sessions:
            await self.expire(now)
        if len(self._index) >= self.max_sessions:
            if self.cap_policy == "evict_lru":
                self._evict_lru()
            else:
                raise SessionLimitError(
                    f"the server holds its maximum of {self.max_sessions} sessions; delete unused sessions "
                    "or retry later"
                )
        self._gone.pop(session_id, None)
        slab = self._slabs[model_key]
        slot = slab.alloc(session_id, now)
        self._index[session_id] = (self._keys.index(model_key) << 32) | slot
        return self._info(session_id, model_key, slab, slot)

    async def info(self, session_id: str, now: float) -> SessionInfo:
        key, slab, slot = self._locate(session_id, now)
        return self._info(session_id, key, slab, slot)

    async def model_of(self, session_id: str, now: float) -> str:
        return self._locate(session_id, now)[0]

    async def delete(self, session_id: str) -> None:
        self._locate(session_id, float("-inf"))  # NOTE: -inf: deleting an idle session is not an expiry
        self._remove(session_id, "deleted")

    async def reset(self, session_id: str, now: float) -> SessionInfo:
        key, slab, slot = self._locate(session_id, now)
        slab.clear_state(slot)
        slab.last_used[slot] = now
        self._replays.pop(session_id, None)
        return self._info(session_id, key, slab, slot)

    async def export(self, session_id: str, now: float) -> Snapshot:
        key, slab, slot = self._locate(session_id, now)
        name, version = key.split("/", 1)
        return Snapshot(
            name, version, int(slab.steps[slot]), int(slab.seq[slot]),
            slab.h[:, slot, :].copy(), slab.c[:, slot, :].copy(),
        )  # fmt: skip

    async def restore(self, session_id: str, model_key: str, snap: Snapshot, now: float) -> tuple[SessionInfo, bool]:
        """Write a snapshot into a session, creating it if needed; returns the session and whether it is new."""
        check_session_id(session_id)
        if not (0 <= snap.steps < MAX_COUNTER and 0 <= snap.seq < MAX_COUNTER):
            raise InvalidInputError(f"snapshot steps and seq must be between 0 and {MAX_COUNTER - 1}")
        created = False
        try:
            key, slab, slot = self._locate(session_id, now)
        except SessionNotFoundError:
            await self.create(model_key, session_id, now)
            key, slab, slot = self._locate(session_id, now)
            created = True
        if key != model_key:
            raise InvalidInputError(
                f"session {session_id!r} runs {key}; the snapshot is of {model_key}: delete the session first"
            )
        slab.clear_state(slot)
        slab.h[:, slot, :] = snap.h
        slab.c[:, slot, :] = snap.c
        slab.steps[slot], slab.seq[slot], slab.last_used[slot] = snap.steps, snap.seq, now
        self._replays.pop(session_id, None)
        return self._info(session_id, key, slab, slot), created

    async def gather(
        self, model_key: str, session_ids: list[str], now: float
    ) -> tuple[list[Lease | ServeError], F32, F32]:
        slab = self._slabs[model_key]
        leases: list[Lease | ServeError] = []
        slots: list[int] = []
        for sid in session_ids:
            try:
                key, _, slot = self._locate(sid, now)
            except ServeError as e:
                leases.append(e)
                continue
            if key != model_key:  # pragma: no cover - the core routes by the session's model
                leases.append(SessionNotFoundError(f"session {sid!r} is not on {model_key}"))
                continue
            slab.last_used[slot] = now  # NOTE: a queued step keeps its session from expiring mid-batch
            leases.append(
                Lease(sid, slot, int(slab.generation[slot]), int(slab.steps[slot]), int(slab.seq[slot]),
                      self._replays.get(sid))
            )  # fmt: skip
            slots.append(slot)
        return leases, slab.h[:, slots, :], slab.c[:, slots, :]

    async def scatter(
        self,
        model_key: str,
        leases: list[Lease],
        hn: F32,
        cn: F32,
        steps: list[int],
        replays: list[Replay | None],
        now: float,
    ) -> list[bool]:
        slab = self._slabs[model_key]
        committed: list[bool] = []
        for i, lease in enumerate(leases):
            ok = bool(slab.generation[lease.slot] == lease.generation and slab.ids[lease.slot] == lease.session_id)
            if ok:
                slab.h[:, lease.slot, :] = hn[:, i, :]
                slab.c[:, lease.slot, :] = cn[:, i, :]
                slab.steps[lease.slot] += steps[i]
                slab.seq[lease.slot] += 1
                slab.last_used[lease.slot] = now
                replay = replays[i]
                if replay is not None:
                    self._replays[lease.session_id] = replay
                else:
                    self._replays.pop(lease.session_id, None)
            committed.append(ok)
        return committed

    async def expire(self, now: float) -> int:
        """Remove every session idle for longer than the TTL; return how many."""
        removed = 0
        for slab in self._slabs.values():
            idle = np.nonzero(slab.live & (now - slab.last_used > self.ttl))[0]
            for slot in idle:
                sid = slab.ids[int(slot)]
                if sid is not None:
                    self._remove(sid, "expired")
                    removed += 1
        return removed

    def count(self, model_key: str | None = None) -> int:
        if model_key is None:
            return len(self._index)
        return int(self._slabs[model_key].live.sum())

    def state_bytes(self) -> int:
        """Bytes held by the slabs (state arrays and counters), for capacity planning and tests."""
        return sum(s.nbytes() for s in self._slabs.values())
