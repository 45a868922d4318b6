"""Session state: server-side (h, c) per session, behind a backend-neutral store interface.

The in-memory store keeps every model version's states in pages of contiguous arrays
(`h[L, PAGE, H]`, `c[L, PAGE, H]` plus per-slot counters), so an idle session costs its
2*L*H*4 bytes of state, a few counters and one index entry, and growing never copies what is there.
A shared backend (Redis, for replicas) implements the same `SessionStore` protocol; the core and
the transports do not change.

Consistency: only the batcher of a model version moves its sessions' state (gather -> run ->
commit). Every change to a session (a committed step, reset, import, delete) moves its version,
and `commit` is a compare-and-set against the version that `gather` leased: a session that moved
meanwhile is `STALE` (not written), one that is no longer there is `GONE`. The batcher answers
those calls with the error of what won, never with a success that was not applied.

Times: `now` is the caller's clock (monotonic in the server, so that expiry does not jump with the
wall clock); `SessionInfo` carries Unix (wall-clock) times for clients, converted by the store.
"""

from __future__ import annotations

import enum
import itertools
import json
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
from numpy.typing import NDArray

from service.errors import (
    InvalidInputError,
    ServeError,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
    UnavailableError,
)
from service.runtime import F32, Signature

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# NOTE: what a store keys sessions by: a client's id, or "<owner>.<id>" with API keys (see DataPlane)
STORE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,159}")
MAX_COUNTER = 2**53  # steps and seq: exact in JSON numbers (and far below int64 and uint64 overflow)
DIGEST_BYTES = 16  # blake2b digest of a call's inputs, kept for idempotent retries
PAGE_BITS = 10
PAGE = 1 << PAGE_BITS  # slots per page of state arrays


def session_gone(session_id: str, reason: str | None, ttl: float) -> SessionNotFoundError:
    """The one answer, for every store, to a session that is not there: why, when it is known."""
    if reason == "expired":
        return SessionNotFoundError(f"session {session_id!r} was expired after {ttl:g} s idle; create a new one")
    if reason == "unloaded":
        return SessionNotFoundError(
            f"session {session_id!r} ended: its model version was unloaded; create a new session (it gets the newest)"
        )
    if reason == "evicted":
        return SessionNotFoundError(
            f"session {session_id!r} was evicted to stay under the session cap; create a new one"
        )
    return SessionNotFoundError(f"no session {session_id!r}; create one first (it may have been deleted)")


def not_served(session_id: str, model_key: str) -> UnavailableError:
    """A session of a model version that this server has not loaded (yet: another replica or worker loaded it
    first, as in a rolling update): retryable, and the session is left as it is."""
    return UnavailableError(
        f"session {session_id!r} runs {model_key}, which this server does not serve (yet): retry in a moment, or on "
        "the replica that loaded it"
    )


class SessionMovedError(SessionNotFoundError):
    """A session id now names a session of another model version (see `session_moved`)."""


def session_moved(session_id: str, model_key: str) -> SessionMovedError:
    """A queued step's session was deleted and created again on another model version meanwhile."""
    return SessionMovedError(f"session {session_id!r} now runs {model_key}; resend the step")


def session_replaced(session_id: str) -> SessionNotFoundError:
    """A step meant for one life of a session id (a stream's session) found another life of the id."""
    return SessionNotFoundError(
        f"session {session_id!r} was deleted and a new session took its id; this stream's session is gone and the "
        "step was not applied: open a new stream"
    )


def check_counters(snap: Snapshot) -> None:
    """A snapshot's steps and seq must be in the range every store keeps exactly."""
    if not (0 <= snap.steps < MAX_COUNTER and 0 <= snap.seq < MAX_COUNTER):
        raise InvalidInputError(f"snapshot steps and seq must be between 0 and {MAX_COUNTER - 1}")


def check_store_id(session_id: str) -> str:
    """A store key: a checked client id, possibly behind an owner tag (so the client's rule applies)."""
    if not STORE_ID.fullmatch(session_id):
        return check_session_id(session_id)
    return session_id


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
    """What a client may know about a session (times on the store's clock; see the module docstring)."""

    session_id: str
    model: str
    version: str
    steps: int
    seq: int
    created: float
    last_used: float
    expires: float
    # NOTE: opaque identity of this life of the id: a session re-created under the same id has another one
    incarnation: str = ""
    extra: bytes = b""  # the session's record beside its state (Signature.extra bytes; the core reads it)
    # NOTE: which life of the id this is, as a number (never 0): a session re-created under the same id has another
    # one, while the incarnation also changes when a stream resumes the session; leases carry it (Lease.life)
    life: int = 0


@dataclass(frozen=True)
class Snapshot:
    """A portable copy of a session: enough to restore it here or on another replica."""

    model: str
    version: str
    steps: int
    seq: int
    h: F32  # [L, H]
    c: F32  # [L, C]: [L, 0] for a model without a cell state (a GRU)
    extra: bytes = b""  # the record beside the state, in the server's own copies (empty on the wire)


@dataclass(frozen=True)
class Replay:
    """What is kept of the last applied call of a session that sends seq: its input digest and, when small
    enough, its outputs (None: too large to keep; a retry of it is refused with advice)."""

    seq: int
    digest: bytes
    outputs: F32 | None


@dataclass(frozen=True)
class Lease:
    """A session as one batch found it. `token` is opaque: the store's version to compare-and-set against."""

    session_id: str
    token: object
    steps: int
    seq: int
    replay: Replay | None
    extra: bytes = b""  # the session's record beside its state (Signature.extra bytes)
    life: int = 0  # which life of the id (SessionInfo.life)


@dataclass(frozen=True)
class Commit:
    """The new state's counters for one leased session: its new step total and seq, what to keep for
    a retry (None: the call carried no seq), and its new record (None: unchanged)."""

    lease: Lease
    steps: int
    seq: int
    replay: Replay | None
    extra: bytes | None = None


class CommitStatus(enum.Enum):
    COMMITTED = "committed"
    STALE = "stale"  # the session changed since it was leased (reset, import, another commit): not written
    GONE = "gone"  # the session no longer exists (deleted, expired, evicted): not written


# NOTE: a step block's commit status per row, as small ints in one array (see SessionStore.commit_block)
COMMITTED, STALE, GONE = 0, 1, 2
_STATUS_CODE = {CommitStatus.COMMITTED: COMMITTED, CommitStatus.STALE: STALE, CommitStatus.GONE: GONE}


@dataclass(frozen=True)
class LeaseBlock:
    """Many sessions as one batch found them, as whole arrays: row i is session_ids[i]. A row in `failed` is
    not there (its error; zeros in every array). `token` is the store's own, to compare-and-set against; what
    is kept for a retry of a row's last call is read only on demand (`replay(i)`), as few calls need it."""

    session_ids: list[str]
    failed: dict[int, ServeError]
    steps: NDArray[np.int64]  # [K]
    seq: NDArray[np.int64]  # [K]
    extra: NDArray[np.uint8]  # [K, E]: the records beside the states
    h: F32  # [L, K, H]
    c: F32  # [L, K, C]
    token: object
    replay: Callable[[int], Replay | None]
    life: NDArray[np.int64] | None = None  # [K]: which life of each id (SessionInfo.life); 0 in failed rows


@dataclass(frozen=True)
class BlockCommit:
    """New counters for some rows of a LeaseBlock (column j of the new states is row rows[j]): step totals and
    seqs, the input digests of calls that carried seq (a zero row: none, nothing is kept for a retry) and the
    outputs to keep for those retries (None: too large to keep); new records (None: unchanged)."""

    rows: NDArray[np.intp]
    steps: NDArray[np.int64]
    seq: NDArray[np.int64]
    digests: NDArray[np.uint8]  # [n, DIGEST_BYTES]
    outputs: F32 | None  # [n, T, O]
    extra: NDArray[np.uint8] | None  # [n, E]


RemovalListener = Callable[[str, str], None]  # (model key, reason: "expired" | "evicted" | "deleted" | "unloaded")
# NOTE: the new record beside the state from the one there (zeros for a new session): reset, restore and fork
# take one; without it a reset or restore zeroes the record
Record = Callable[[bytes], bytes]


class SessionStore(Protocol):
    """What the core needs from session storage. Row i of gather's arrays belongs to session_ids[i] (zeros
    for a session that failed); column i of commit's arrays belongs to commits[i]. Gather marks each session
    used (its idle time starts again) unless `touch` says False for it (a peek reads without using). A store that cannot
    answer raises `UnavailableError` (or any exception, which the core maps to it); `healthy` is False
    while it cannot. Removals (deleted, expired, evicted) are reported to the listener, once per session
    across every process that shares the store."""

    @property
    def healthy(self) -> bool: ...
    def set_removal_listener(self, listener: RemovalListener) -> None: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def create(self, model_key: str, session_id: str | None, now: float) -> SessionInfo: ...
    async def info(self, session_id: str, now: float) -> SessionInfo: ...
    async def model_of(self, session_id: str, now: float) -> str: ...
    # NOTE: many at once (a step batch): each session's model key, or the error model_of would raise for it
    async def models_of(self, session_ids: list[str], now: float) -> list[str | ServeError]: ...
    async def delete(self, session_id: str, incarnation: str | None = None) -> None: ...
    async def detach(self, session_id: str, now: float) -> SessionInfo: ...
    async def fork(self, source_id: str, session_id: str, now: float, record: Record) -> SessionInfo: ...
    async def reset(self, session_id: str, now: float, record: Record | None = None) -> SessionInfo: ...
    async def export(self, session_id: str, now: float) -> Snapshot: ...
    async def restore(
        self, session_id: str, model_key: str, snap: Snapshot, now: float, record: Record | None = None
    ) -> tuple[SessionInfo, bool]: ...
    async def gather(
        self, model_key: str, session_ids: list[str], now: float, touch: list[bool] | None = None
    ) -> tuple[list[Lease | ServeError], F32, F32]: ...
    async def commit(
        self, model_key: str, commits: list[Commit], hn: F32, cn: F32, now: float
    ) -> list[CommitStatus]: ...
    # NOTE: gather and commit for a step block, as arrays (no object per session); a store without a faster way
    # implements them with `gather_block_by_items` / `commit_block_by_items`. Statuses: COMMITTED, STALE, GONE.
    async def gather_block(self, model_key: str, session_ids: list[str], now: float) -> LeaseBlock: ...
    async def commit_block(
        self, model_key: str, block: LeaseBlock, commit: BlockCommit, hn: F32, cn: F32, now: float
    ) -> NDArray[np.int8]: ...
    async def expire(self, now: float) -> int: ...
    async def count(self, model_key: str | None = None) -> int: ...
    def add_model(self, model_key: str, sig: Signature) -> None: ...
    async def drop_model(self, model_key: str) -> int: ...


async def gather_block_by_items(
    store: SessionStore, model_key: str, session_ids: list[str], now: float, width: int
) -> LeaseBlock:
    """`gather_block` by way of `gather`, for a store with no faster way (records of `width` bytes)."""
    leases, h, c = await store.gather(model_key, session_ids, now)
    held = [lease if isinstance(lease, Lease) else None for lease in leases]
    k, blank = len(held), bytes(width)
    return LeaseBlock(
        session_ids,
        {i: lease for i, lease in enumerate(leases) if isinstance(lease, ServeError)},
        np.fromiter((lease.steps if lease else 0 for lease in held), np.int64, k),
        np.fromiter((lease.seq if lease else 0 for lease in held), np.int64, k),
        np.frombuffer(b"".join(lease.extra if lease else blank for lease in held), np.uint8).reshape(k, width),
        h,
        c,
        held,
        lambda i: None if held[i] is None else cast(Lease, held[i]).replay,
        np.fromiter((lease.life if lease else 0 for lease in held), np.int64, k),
    )


async def commit_block_by_items(
    store: SessionStore, model_key: str, block: LeaseBlock, bc: BlockCommit, hn: F32, cn: F32, now: float
) -> NDArray[np.int8]:
    """`commit_block` by way of `commit` (for a block from `gather_block_by_items`)."""
    held = cast("list[Lease | None]", block.token)
    commits = []
    for j, r in enumerate(bc.rows.tolist()):
        lease = held[r]
        assert lease is not None, "only rows that were gathered are committed"
        digest = bc.digests[j]
        kept = None if bc.outputs is None else bc.outputs[j]
        replay = Replay(int(bc.seq[j]), digest.tobytes(), kept) if digest.any() else None
        extra = None if bc.extra is None else bc.extra[j].tobytes()
        commits.append(Commit(lease, int(bc.steps[j]), int(bc.seq[j]), replay, extra))
    status = await store.commit(model_key, commits, hn, cn, now)
    return np.fromiter((_STATUS_CODE[s] for s in status), np.int8, len(status))


class _Page:
    """PAGE slots of state and counters; pages are never resized, so growing copies nothing."""

    def __init__(self, sig: Signature) -> None:
        self.h = np.zeros((sig.layers, PAGE, sig.hidden), np.float32)
        self.c = np.zeros((sig.layers, PAGE, sig.cell), np.float32)  # NOTE: C = 0 for a GRU: an empty array
        self.steps = np.zeros(PAGE, np.int64)
        self.seq = np.zeros(PAGE, np.int64)
        self.created = np.zeros(PAGE, np.float64)
        self.last_used = np.zeros(PAGE, np.float64)
        self.version = np.zeros(PAGE, np.int64)  # NOTE: moves on every change, never repeats for a slot
        self.born = np.zeros(PAGE, np.int64)  # which life of a session id holds the slot
        # NOTE: moves when a stream resumes it (see MemorySessionStore.detach); 32 bits: only compared for equality
        self.owner = np.zeros(PAGE, np.uint32)
        self.digest = np.zeros((PAGE, DIGEST_BYTES), np.uint8)  # all zero: no replay kept
        self.extra = np.zeros((PAGE, sig.extra), np.uint8)  # the record beside the state (Signature.extra)
        self.live = np.zeros(PAGE, np.bool_)
        self.ids: list[str | None] = [None] * PAGE

    def nbytes(self) -> int:
        arrays = (
            self.h,
            self.c,
            self.steps,
            self.seq,
            self.created,
            self.last_used,
            self.version,
            self.born,
            self.owner,
        )
        return sum(int(a.nbytes) for a in arrays) + int(self.digest.nbytes + self.extra.nbytes + self.live.nbytes)


class _Slab:
    """The sessions of one model version: pages of slots, a free list and a live count."""

    def __init__(self, sig: Signature) -> None:
        self.sig = sig
        self.pages: list[_Page] = []
        self.free: list[int] = []
        self.live = 0

    def at(self, slot: int) -> tuple[_Page, int]:
        return self.pages[slot >> PAGE_BITS], slot & (PAGE - 1)

    def alloc(self, session_id: str, now: float, born: int) -> int:
        if not self.free:
            base = len(self.pages) * PAGE
            self.pages.append(_Page(self.sig))
            self.free.extend(range(base + PAGE - 1, base - 1, -1))
        slot = self.free.pop()
        p, i = self.at(slot)
        p.ids[i] = session_id
        p.live[i] = True
        p.steps[i] = p.seq[i] = 0
        p.created[i] = p.last_used[i] = now
        p.born[i] = born
        p.owner[i] = 0
        p.version[i] += 1
        self.live += 1
        return slot

    def clear_state(self, slot: int, record: Record | None = None) -> None:
        """Zero a slot's state and counters; its record too, or make it `record` of the one there."""
        p, i = self.at(slot)
        p.h[:, i, :] = 0.0
        p.c[:, i, :] = 0.0
        p.steps[i] = p.seq[i] = 0
        p.digest[i] = 0
        p.extra[i] = 0 if record is None else np.frombuffer(record(p.extra[i].tobytes()), np.uint8)
        p.version[i] += 1

    def release(self, slot: int) -> None:
        self.clear_state(slot)
        p, i = self.at(slot)
        p.ids[i] = None
        p.live[i] = False
        self.free.append(slot)
        self.live -= 1

    def read(self, slots: NDArray[np.int64]) -> tuple[F32, F32]:
        """The states of the given slots as [L, len(slots), H] and [L, len(slots), C] copies."""
        rows = _Rows(self, slots)
        return rows.state("h"), rows.state("c")

    def write(self, slots: NDArray[np.int64], h: F32, c: F32) -> None:
        rows = _Rows(self, slots)
        rows.put_state("h", h)
        rows.put_state("c", c)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.pages)


class _Rows:
    """Slots of a slab grouped by page once, to read and write per-slot arrays (`_Page` fields) as whole arrays:
    row by row along the slot axis (`take`), never through boolean masks (several times slower)."""

    __slots__ = ("groups", "n", "one", "sig")

    def __init__(self, slab: _Slab, slots: NDArray[np.int64]) -> None:
        self.n, self.sig = len(slots), slab.sig
        self.one: tuple[_Page, int] | None = None  # NOTE: a single slot: read and written by plain slicing
        # NOTE: (page, positions in slots or None for all of them, slots within the page)
        self.groups: list[tuple[_Page, NDArray[np.intp] | None, NDArray[np.int64]]]
        if self.n == 1 and slab.pages:
            self.one = slab.at(int(slots[0]))
        if len(slab.pages) <= 1:  # NOTE: the usual case, and the cheapest (a single step pays this per batch)
            self.groups = [(slab.pages[0], None, slots)] if slab.pages else []
            return
        pages, offs = slots >> PAGE_BITS, slots & (PAGE - 1)
        if self.n <= 1 or int(pages.min()) == int(pages.max()):
            self.groups = [(slab.pages[int(pages[0]) if self.n else 0], None, offs)]
        else:
            self.groups = []
            for g in np.unique(pages).tolist():
                at = np.flatnonzero(pages == g)
                self.groups.append((slab.pages[g], at, offs[at]))

    def get(self, name: str) -> NDArray[Any]:
        """A per-slot field ([PAGE, ...] in each page) for these slots."""
        if len(self.groups) == 1 and self.groups[0][1] is None:
            page, _, offs = self.groups[0]
            return cast("NDArray[Any]", getattr(page, name).take(offs, axis=0))
        first: NDArray[Any] = getattr(self.groups[0][0], name)
        out = np.empty((self.n, *first.shape[1:]), first.dtype)
        for page, at, offs in self.groups:
            out[at] = getattr(page, name).take(offs, axis=0)
        return out

    def put(self, name: str, values: NDArray[Any] | float) -> None:
        for page, at, offs in self.groups:
            getattr(page, name)[offs] = values if at is None or not isinstance(values, np.ndarray) else values[at]

    def state(self, name: str) -> F32:
        """A state field ([L, PAGE, H] in each page) for these slots, as [L, n, H]."""
        if self.one is not None:
            page, i = self.one
            return cast("F32", getattr(page, name)[:, i : i + 1, :].copy())
        sig = self.sig
        out = np.empty((sig.layers, self.n, sig.hidden if name == "h" else sig.cell), np.float32)
        for page, at, offs in self.groups:
            arr = getattr(page, name)
            for layer in range(sig.layers):
                if at is None:
                    out[layer] = arr[layer].take(offs, axis=0)
                else:
                    out[layer, at] = arr[layer].take(offs, axis=0)
        return out

    def put_state(self, name: str, values: F32) -> None:
        if self.one is not None:
            page, i = self.one
            getattr(page, name)[:, i : i + 1, :] = values
            return
        for page, at, offs in self.groups:
            arr = getattr(page, name)
            for layer in range(self.sig.layers):
                arr[layer][offs] = values[layer] if at is None else values[layer, at]


def _incarnation(p: _Page, i: int) -> str:
    """Which life of the id holds the slot, and who owns it now (see SessionInfo.incarnation)."""
    return f"{int(p.born[i])}.{int(p.owner[i])}"


def _token(slot: int, version: int, born: int) -> tuple[int, int, int]:
    """The memory store's lease token: where the session is, its version, and which life of the id it is."""
    return slot, version, born


class MemorySessionStore:
    """Sessions in process memory: one slab per model version, an id index, idle expiry and a cap.

    Create, delete and eviction are O(1) amortised: pages are added without copying, the live count is
    kept, and at the cap the oldest session comes from a list of the oldest found by one vectorised scan,
    refreshed only when it runs out (a candidate used since the scan is skipped, so the oldest one goes).
    """

    def __init__(
        self,
        signatures: dict[str, Signature],
        ttl: float,
        max_sessions: int,
        cap_policy: str = "reject",
        on_removed: RemovalListener | None = None,
        wall: Callable[[], float] | None = None,
    ) -> None:
        # NOTE: wall: the Unix clock that SessionInfo shows; None shows times on the `now` clock as they are
        self.wall = wall
        self._slabs = {key: _Slab(sig) for key, sig in signatures.items()}
        self._keys = list(self._slabs)  # model index -> model key
        self._key_index = {key: i for i, key in enumerate(self._keys)}
        # NOTE: one int per session, (model index << 40) | slot, keeps the index to a dict entry and the id
        self._index: dict[str, int] = {}
        self._outputs: dict[str, bytes] = {}  # replay outputs, only for sessions that send seq
        self._gone: OrderedDict[str, str] = OrderedDict()  # recently expired/evicted ids -> "expired" | "evicted"
        # NOTE: (session id, version, last use) of the oldest sessions at the last scan, oldest last
        self._evict_candidates: list[tuple[str, int, float]] = []
        self._births = itertools.count(1)
        self.scans = 0  # full scans for the oldest sessions (at the cap); amortised over len/64 creates each
        self.ttl, self.max_sessions, self.cap_policy = ttl, max_sessions, cap_policy
        self._on_removed = on_removed or (lambda key, reason: None)

    @property
    def healthy(self) -> bool:
        return True

    def set_removal_listener(self, listener: RemovalListener) -> None:
        self._on_removed = listener

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release: the memory goes with the process."""

    # --- lookups ---------------------------------------------------------------------------------
    @staticmethod
    def _slot_id(slab: _Slab, slot: int) -> str:
        p, i = slab.at(slot)
        sid = p.ids[i]
        assert sid is not None
        return sid

    def _where(self, session_id: str) -> tuple[str, _Slab, int] | None:
        where = self._index.get(session_id)
        if where is None:
            return None
        key = self._keys[where >> 40]
        return key, self._slabs[key], where & ((1 << 40) - 1)

    def _locate(self, session_id: str, now: float) -> tuple[str, _Slab, int]:
        found = self._where(session_id)
        if found is None:
            raise session_gone(session_id, self._gone.get(session_id), self.ttl)
        _, slab, slot = found
        p, i = slab.at(slot)
        if now - p.last_used[i] > self.ttl:
            self._remove(session_id, "expired")
            raise session_gone(session_id, "expired", self.ttl)
        return found

    def _info(self, session_id: str, key: str, slab: _Slab, slot: int, now: float) -> SessionInfo:
        name, version = key.split("/", 1)
        p, i = slab.at(slot)
        last = float(p.last_used[i]) + (self._wall_now(now) - now)  # NOTE: on the clock SessionInfo shows
        return SessionInfo(
            session_id=session_id,
            model=name,
            version=version,
            steps=int(p.steps[i]),
            seq=int(p.seq[i]),
            created=float(p.created[i]),
            last_used=last,
            expires=last + self.ttl,
            incarnation=_incarnation(p, i),
            extra=p.extra[i].tobytes(),
            life=int(p.born[i]),
        )

    def _remove(self, session_id: str, reason: str) -> None:
        found = self._where(session_id)
        assert found is not None
        key, slab, slot = found
        del self._index[session_id]
        slab.release(slot)
        self._outputs.pop(session_id, None)
        if reason != "deleted":
            self._gone[session_id] = reason
            while len(self._gone) > 10_000:
                self._gone.popitem(last=False)
        self._on_removed(key, reason)

    def _oldest(self) -> str | None:
        """The least recently used session: O(1) amortised over one vectorised scan of all of them."""
        while True:
            if not self._evict_candidates:
                self._find_oldest(max(16, len(self._index) // 64))
                if not self._evict_candidates:
                    return None
            sid, version, used = self._evict_candidates[-1]
            found = self._where(sid)
            if found is not None:
                p, i = found[1].at(found[2])
                if int(p.version[i]) == version and float(p.last_used[i]) == used:
                    return sid  # NOTE: untouched since the scan, so still the oldest
            self._evict_candidates.pop()

    def _find_oldest(self, n: int) -> None:
        self.scans += 1
        found: list[tuple[float, str, int]] = []
        for slab in self._slabs.values():
            for p in slab.pages:
                k = min(n, int(p.live.sum()))
                if k == 0:
                    continue
                used = np.where(p.live, p.last_used, np.inf)
                for i in np.argpartition(used, k - 1)[:k]:
                    sid = p.ids[int(i)]
                    if sid is not None:
                        found.append((float(used[i]), sid, int(p.version[i])))
        found.sort(reverse=True)  # NOTE: taken from the end: oldest first
        self._evict_candidates = [(sid, version, used) for used, sid, version in found[-n:]]

    def _make_room(self, now: float) -> None:
        """At the cap: remove the oldest session if it has expired, else evict it or refuse (by policy)."""
        oldest = self._oldest()
        if oldest is not None:
            found = self._where(oldest)
            assert found is not None
            p, i = found[1].at(found[2])
            if now - p.last_used[i] > self.ttl:
                self._remove(oldest, "expired")
                return
            if self.cap_policy == "evict_lru":
                self._remove(oldest, "evicted")
                return
        raise SessionLimitError(
            f"the server holds its maximum of {self.max_sessions} sessions; delete unused sessions or retry later"
        )

    # --- SessionStore ----------------------------------------------------------------------------
    async def create(self, model_key: str, session_id: str | None, now: float) -> SessionInfo:
        slab = self._slabs.get(model_key)
        if slab is None:  # NOTE: its model version was unloaded while this create was on its way
            raise UnavailableError(f"{model_key} was just unloaded; create the session again (on the newest version)")
        if session_id is None:
            session_id = uuid.uuid4().hex
        else:
            check_store_id(session_id)
            if session_id in self._index:
                try:
                    self._locate(session_id, now)  # NOTE: an expired holder of the id frees it
                except SessionNotFoundError:
                    pass
                else:
                    raise SessionExistsError(f"session {session_id!r} already exists; resume it, or delete it first")
        if len(self._index) >= self.max_sessions:
            self._make_room(now)
        self._gone.pop(session_id, None)
        slot = slab.alloc(session_id, now, next(self._births))
        self._index[session_id] = (self._key_index[model_key] << 40) | slot
        p, i = slab.at(slot)
        p.created[i] = self._wall_now(now)  # NOTE: a fact of the wall clock: read as it is, kept by snapshots
        return self._info(session_id, model_key, slab, slot, now)

    def _wall_now(self, now: float) -> float:
        """The time SessionInfo shows for `now` (the store's clock): the wall clock's, when there is one."""
        return now if self.wall is None else self.wall()

    async def info(self, session_id: str, now: float) -> SessionInfo:
        key, slab, slot = self._locate(session_id, now)
        return self._info(session_id, key, slab, slot, now)

    async def model_of(self, session_id: str, now: float) -> str:
        return self._locate(session_id, now)[0]

    async def models_of(self, session_ids: list[str], now: float) -> list[str | ServeError]:
        out: list[str | ServeError] = []
        for sid in session_ids:
            try:
                out.append(self._locate(sid, now)[0])
            except ServeError as e:
                out.append(e)
        return out

    async def delete(self, session_id: str, incarnation: str | None = None) -> None:
        """Delete a session; with `incarnation`, only that life of the id (another one is left alone)."""
        _, slab, slot = self._locate(session_id, float("-inf"))  # NOTE: -inf: deleting an idle one is no expiry
        if incarnation is not None:
            p, i = slab.at(slot)
            if _incarnation(p, i) != incarnation:
                raise SessionNotFoundError(f"session {session_id!r} was replaced by a newer one of the same id")
        self._remove(session_id, "deleted")

    async def fork(self, source_id: str, session_id: str, now: float, record: Record) -> SessionInfo:
        """A new session `session_id` with the source's model, state and step count (seq 0, no replay), and the
        record `record` makes of the source's. The cap applies as to a create; the fork is a use of the source,
        so that at the cap another session is evicted, never the source (a source alone at the cap: refused)."""
        key, slab, slot = self._locate(source_id, now)
        p, i = slab.at(slot)
        h, c, steps, extra = p.h[:, i, :].copy(), p.c[:, i, :].copy(), int(p.steps[i]), p.extra[i].tobytes()
        if len(self._index) >= self.max_sessions == 1:  # NOTE: the source is the one session there is
            raise SessionLimitError(
                f"the server holds its maximum of {self.max_sessions} sessions; delete unused sessions or retry later"
            )
        p.last_used[i] = now
        await self.create(key, session_id, now)
        _, slab, slot = self._locate(session_id, now)
        q, j = slab.at(slot)
        q.h[:, j, :], q.c[:, j, :], q.steps[j] = h, c, steps
        q.extra[j] = np.frombuffer(record(extra), np.uint8)
        q.version[j] += 1
        return self._info(session_id, key, slab, slot, now)

    async def detach(self, session_id: str, now: float) -> SessionInfo:
        """Give the session a new incarnation (state untouched), so that a holder of the old one, such as
        the stream that opened it, no longer deletes it: a resumed session changes hands."""
        key, slab, slot = self._locate(session_id, now)
        p, i = slab.at(slot)
        p.owner[i] += 1
        return self._info(session_id, key, slab, slot, now)

    async def reset(self, session_id: str, now: float, record: Record | None = None) -> SessionInfo:
        key, slab, slot = self._locate(session_id, now)
        slab.clear_state(slot, record)
        p, i = slab.at(slot)
        p.last_used[i] = now
        self._outputs.pop(session_id, None)
        return self._info(session_id, key, slab, slot, now)

    async def export(self, session_id: str, now: float) -> Snapshot:
        key, slab, slot = self._locate(session_id, now)
        name, version = key.split("/", 1)
        p, i = slab.at(slot)
        return Snapshot(name, version, int(p.steps[i]), int(p.seq[i]), p.h[:, i, :].copy(), p.c[:, i, :].copy(),
                        p.extra[i].tobytes())  # fmt: skip

    async def restore(
        self, session_id: str, model_key: str, snap: Snapshot, now: float, record: Record | None = None
    ) -> tuple[SessionInfo, bool]:
        """Write a snapshot into a session, creating it if needed; returns the session and whether it is new."""
        check_store_id(session_id)
        check_counters(snap)
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
        slab.clear_state(slot, record)
        p, i = slab.at(slot)
        p.h[:, i, :] = snap.h
        p.c[:, i, :] = snap.c
        p.steps[i], p.seq[i], p.last_used[i] = snap.steps, snap.seq, now
        self._outputs.pop(session_id, None)
        return self._info(session_id, key, slab, slot, now), created

    async def gather(
        self, model_key: str, session_ids: list[str], now: float, touch: list[bool] | None = None
    ) -> tuple[list[Lease | ServeError], F32, F32]:
        slab = self._slabs[model_key]
        leases: list[Lease | ServeError] = []
        slots = [0] * len(session_ids)
        missing: list[int] = []
        for n, sid in enumerate(session_ids):
            try:
                key, _, slot = self._locate(sid, now)
            except ServeError as e:
                leases.append(e)
                missing.append(n)
                continue
            if key != model_key:  # NOTE: deleted and re-created on another model while this call was queued
                leases.append(session_moved(sid, key))
                missing.append(n)
                continue
            p, i = slab.at(slot)
            if touch is None or touch[n]:
                p.last_used[i] = now  # NOTE: a queued step keeps its session from expiring mid-batch
            replay = None
            if p.digest[i].any():
                out = self._outputs.get(sid)
                outputs = None if out is None else np.frombuffer(out, np.float32).reshape(-1, slab.sig.outputs)
                replay = Replay(int(p.seq[i]), p.digest[i].tobytes(), outputs)
            leases.append(
                Lease(sid, _token(slot, int(p.version[i]), int(p.born[i])), int(p.steps[i]), int(p.seq[i]), replay,
                      p.extra[i].tobytes(), int(p.born[i]))
            )  # fmt: skip
            slots[n] = slot
        h, c = slab.read(np.asarray(slots, np.int64))
        if missing:
            h[:, missing, :] = 0.0
            c[:, missing, :] = 0.0
        return leases, h, c

    async def commit(self, model_key: str, commits: list[Commit], hn: F32, cn: F32, now: float) -> list[CommitStatus]:
        slab = self._slabs[model_key]
        status: list[CommitStatus] = []
        written: list[int] = []
        slots: list[int] = []
        for n, cm in enumerate(commits):
            slot, version, born = cast("tuple[int, int, int]", cm.lease.token)  # NOTE: our own, see _token
            found = self._where(cm.lease.session_id)
            p, i = slab.at(slot)
            if found is None or found[2] != slot or found[0] != model_key or int(p.born[i]) != born:
                status.append(CommitStatus.GONE)
                continue
            if int(p.version[i]) != version:
                status.append(CommitStatus.STALE)
                continue
            p.steps[i], p.seq[i], p.last_used[i] = cm.steps, cm.seq, now
            p.version[i] += 1
            if cm.extra is not None:
                p.extra[i] = np.frombuffer(cm.extra, np.uint8)
            if cm.replay is None:
                p.digest[i] = 0
                self._outputs.pop(cm.lease.session_id, None)
            else:
                p.digest[i] = np.frombuffer(cm.replay.digest, np.uint8)
                if cm.replay.outputs is None:
                    self._outputs.pop(cm.lease.session_id, None)
                else:
                    self._outputs[cm.lease.session_id] = cm.replay.outputs.tobytes()
            status.append(CommitStatus.COMMITTED)
            written.append(n)
            slots.append(slot)
        if len(written) == len(commits):  # NOTE: the usual case: every row is written, no copy of the states
            slab.write(np.asarray(slots, np.int64), hn, cn)
        elif written:
            slab.write(np.asarray(slots, np.int64), hn[:, written, :], cn[:, written, :])
        return status

    async def gather_block(self, model_key: str, session_ids: list[str], now: float) -> LeaseBlock:
        """`gather` as arrays: one index lookup per session, everything else whole-array."""
        slab = self._slabs[model_key]
        if not slab.pages:  # NOTE: no session was ever created on this version: every row fails as gather says
            leases, h, c = await self.gather(model_key, session_ids, now)
            errors = {i: e for i, e in enumerate(leases) if isinstance(e, ServeError)}
            assert len(errors) == len(session_ids)
            k, none = len(session_ids), np.zeros(len(session_ids), np.int64)
            extra = np.zeros((k, slab.sig.extra), np.uint8)
            return LeaseBlock(session_ids, errors, none, none, extra, h, c, None, lambda i: None)
        k, get = len(session_ids), self._index.get
        where = np.fromiter((get(sid, -1) for sid in session_ids), np.int64, k)
        ok = (where >> 40) == self._key_index[model_key]  # NOTE: -1 (not there) and other models' sessions fail
        slots = np.where(ok, where & ((1 << 40) - 1), 0)
        rows = _Rows(slab, slots)
        ok &= now - rows.get("last_used") <= self.ttl
        failed: dict[int, ServeError] = {}
        for i in np.flatnonzero(~ok).tolist():  # NOTE: the rare rows, one by one: the errors `gather` gives
            sid = session_ids[i]
            try:
                key = self._locate(sid, now)[0]  # NOTE: removes an expired one and says so
            except ServeError as e:
                failed[i] = e
            else:
                failed[i] = session_moved(sid, key)
        if failed:
            slots = np.where(ok, slots, 0)
            rows = _Rows(slab, slots)
        good = rows if not failed else _Rows(slab, slots[ok])
        good.put("last_used", now)  # NOTE: a queued step keeps its session from expiring mid-batch
        steps, seq, digest, extra = rows.get("steps"), rows.get("seq"), rows.get("digest"), rows.get("extra")
        version, born = rows.get("version"), rows.get("born")
        h, c = rows.state("h"), rows.state("c")
        if failed:
            bad = ~ok
            for a in (steps, seq, digest, extra, version, born):
                a[bad] = 0
            h[:, bad, :] = 0.0
            c[:, bad, :] = 0.0
        outputs = slab.sig.outputs

        def replay(i: int) -> Replay | None:
            if not digest[i].any():
                return None
            out = self._outputs.get(session_ids[i])
            kept = None if out is None else np.frombuffer(out, np.float32).reshape(-1, outputs)
            return Replay(int(seq[i]), digest[i].tobytes(), kept)

        return LeaseBlock(session_ids, failed, steps, seq, extra, h, c, (slots, version, born, digest), replay, born)

    async def commit_block(
        self, model_key: str, block: LeaseBlock, bc: BlockCommit, hn: F32, cn: F32, now: float
    ) -> NDArray[np.int8]:
        """`commit` as arrays: a row whose slot's version is still the leased one is written (versions never
        repeat for a slot, so an equal one means nothing happened to it); the others are told apart one by one."""
        slab = self._slabs.get(model_key)
        n = len(bc.rows)
        if slab is None:  # NOTE: unloaded while the block ran
            return np.full(n, GONE, np.int8)
        slots_all, versions, borns, digests = cast(
            "tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.uint8]]", block.token
        )
        slots = slots_all[bc.rows]
        rows = _Rows(slab, slots)
        current = rows.get("version")
        same = current == versions[bc.rows]
        status = np.zeros(n, np.int8)  # NOTE: COMMITTED
        for j in np.flatnonzero(~same).tolist():
            sid, slot = block.session_ids[int(bc.rows[j])], int(slots[j])
            found = self._where(sid)
            p, i = slab.at(slot)
            moved = found is None or found[0] != model_key or found[2] != slot or int(p.born[i]) != borns[bc.rows[j]]
            status[j] = GONE if moved else STALE
        w = np.flatnonzero(same)
        if len(w) == 0:
            return status
        put = rows if len(w) == n else _Rows(slab, slots[w])
        put.put("steps", bc.steps[w])
        put.put("seq", bc.seq[w])
        put.put("last_used", now)
        put.put("version", current[w] + 1)
        put.put("digest", bc.digests[w])
        if bc.extra is not None:
            put.put("extra", bc.extra[w])
        kept: NDArray[np.bool_] = np.asarray(bc.digests.any(axis=1)) & same
        had: NDArray[np.bool_] = np.asarray(digests[bc.rows].any(axis=1)) & same
        ids = block.session_ids
        outputs = bc.outputs
        store = kept if outputs is not None else np.zeros_like(kept)  # NOTE: outputs small enough to keep
        if outputs is not None and store.any():  # NOTE: only sessions that send seq keep outputs for a retry
            keep = np.flatnonzero(store)
            raw, width = np.ascontiguousarray(outputs[keep]).tobytes(), outputs[0].nbytes
            self._outputs.update(
                (ids[r], raw[j * width : (j + 1) * width]) for j, r in enumerate(bc.rows[keep].tolist())
            )
        for r in bc.rows[(had | kept) & ~store].tolist():
            self._outputs.pop(ids[r], None)
        put.put_state("h", hn if len(w) == n else hn[:, w, :])
        put.put_state("c", cn if len(w) == n else cn[:, w, :])
        return status

    async def expire(self, now: float) -> int:
        """Remove every session idle for longer than the TTL; return how many."""
        removed = 0
        for slab in self._slabs.values():
            for p in slab.pages:
                for i in np.nonzero(p.live & (now - p.last_used > self.ttl))[0]:
                    sid = p.ids[int(i)]
                    if sid is not None:
                        self._remove(sid, "expired")
                        removed += 1
        return removed

    async def count(self, model_key: str | None = None) -> int:
        if model_key is None:
            return len(self._index)
        slab = self._slabs.get(model_key)
        return 0 if slab is None else slab.live

    def add_model(self, model_key: str, sig: Signature) -> None:
        """Serve a newly loaded model version (live model repository)."""
        if model_key in self._slabs:
            return
        self._slabs[model_key] = _Slab(sig)
        if model_key not in self._key_index:  # NOTE: a key keeps its index for good: ids in _index point at it
            self._key_index[model_key] = len(self._keys)
            self._keys.append(model_key)

    async def drop_model(self, model_key: str) -> int:
        """End every session of an unloaded model version (they answer "unloaded" from now on); return how many."""
        slab = self._slabs.get(model_key)
        if slab is None:
            return 0
        ids = [sid for p in slab.pages for sid in p.ids if sid is not None]
        for sid in ids:
            self._remove(sid, "unloaded")
        del self._slabs[model_key]
        return len(ids)

    def state_bytes(self) -> int:
        """Bytes held by the slabs (state arrays and counters), for capacity planning and tests."""
        return sum(s.nbytes() for s in self._slabs.values())


SNAPSHOT_FORMAT = "lstm-serve-sessions"


class SnapshotFileError(RuntimeError):
    """A session snapshot file cannot be used; the message says why and what to do."""


def write_snapshot(store: MemorySessionStore, path: Path, now: float) -> int:
    """Write every session of the store to `path` atomically (temporary file, fsync, rename); return how many."""
    arrays: dict[str, np.ndarray] = {}
    models: dict[str, list[int]] = {}
    total = 0
    wall_now = store._wall_now(now)
    for k, (key, slab) in enumerate(store._slabs.items()):
        sig = slab.sig
        models[key] = sig.dims
        live = [n * PAGE + np.nonzero(p.live)[0] for n, p in enumerate(slab.pages)]
        slots = np.concatenate(live).astype(np.int64) if live else np.zeros(0, np.int64)
        ids = [store._slot_id(slab, int(s)) for s in slots]
        h, c = slab.read(slots)
        pick = [slab.at(int(s)) for s in slots]
        outputs = [store._outputs.get(sid, b"") for sid in ids]
        arrays.update({
            f"ids_{k}": np.asarray(ids, dtype="<U128"),
            f"h_{k}": h, f"c_{k}": c,
            f"steps_{k}": np.asarray([p.steps[i] for p, i in pick], np.int64),
            f"seq_{k}": np.asarray([p.seq[i] for p, i in pick], np.int64),
            f"idle_{k}": np.asarray([now - p.last_used[i] for p, i in pick], np.float64),
            # NOTE: created_at: when, on the wall clock; created: how long before the write (files of format 1
            # before created_at, and the servers that wrote them, read only that)
            f"created_at_{k}": np.asarray([p.created[i] for p, i in pick], np.float64),
            f"created_{k}": np.asarray([p.created[i] - wall_now for p, i in pick], np.float64),
            f"digest_{k}": np.asarray([p.digest[i] for p, i in pick], np.uint8).reshape(-1, DIGEST_BYTES),
            f"extra_{k}": np.asarray([p.extra[i] for p, i in pick], np.uint8).reshape(len(pick), sig.extra),
            f"outlen_{k}": np.asarray([len(o) // 4 for o in outputs], np.int64),
            f"outputs_{k}": np.frombuffer(b"".join(outputs), np.float32),
        })  # fmt: skip
        total += len(ids)
    meta = {"format": SNAPSHOT_FORMAT, "version": 1, "models": models, "sessions": total}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return total


def read_snapshot(store: MemorySessionStore, path: Path, now: float) -> int:
    """Restore every session of a snapshot into an empty store, all or nothing; return how many.

    A file that is not a snapshot, is damaged, or holds sessions of models this server does not serve with
    the same dimensions is refused with a `SnapshotFileError` before anything is loaded.
    """

    def refuse(why: str) -> SnapshotFileError:
        return SnapshotFileError(
            f"session snapshot {path.name!r} cannot be restored: {why}; move it away to start without it"
        )

    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # NOTE: our handle: closed on errors too
            meta = json.loads(bytes(z["meta"]).decode())
            if not isinstance(meta, dict) or meta.get("format") != SNAPSHOT_FORMAT or meta.get("version") != 1:
                raise refuse("it is not an lstm-serve session snapshot (format 1)")
            loaded = {name: z[name] for name in z.files}
    except SnapshotFileError:
        raise
    except Exception as e:
        raise refuse(f"the file is damaged or not a snapshot ({type(e).__name__})") from None
    rows: list[tuple[str, str, F32, F32, int, int, float, float, bytes, bytes, bytes]] = []
    try:
        for k, (key, dims) in enumerate(meta["models"].items()):
            slab = store._slabs.get(key)
            if slab is None:
                raise refuse(f"it holds sessions of {key}, which this server does not serve")
            sig = slab.sig
            dims = list(dims) + list(dims[3:4]) * (len(dims) == 4)  # NOTE: files from before C: an LSTM, C = H
            if dims != sig.dims:
                raise refuse(f"its sessions of {key} have other dimensions than the model served now")
            ids = [str(v) for v in loaded[f"ids_{k}"]]
            n = len(ids)
            h, c = loaded[f"h_{k}"].astype(np.float32), loaded[f"c_{k}"].astype(np.float32)
            if (
                h.shape != (sig.layers, n, sig.hidden)
                or c.shape != (sig.layers, n, sig.cell)
                or not (np.isfinite(h).all() and np.isfinite(c).all())
            ):
                raise refuse(f"the states of {key} have the wrong shape or are not finite")
            outlen, outputs = loaded[f"outlen_{k}"], loaded[f"outputs_{k}"].astype(np.float32)
            ends = np.cumsum(outlen)
            if int(ends[-1] if n else 0) != outputs.size:
                raise refuse(f"the kept outputs of {key} do not add up")
            # NOTE: records beside the state of another width (older files, live scoring switched): they start again
            extra = loaded.get(f"extra_{k}")
            if extra is None or extra.shape != (n, sig.extra):
                extra = np.zeros((n, sig.extra), np.uint8)
            created_at = loaded.get(f"created_at_{k}")
            if created_at is None or created_at.shape != (n,):  # NOTE: a file from before created_at
                created_at = store._wall_now(now) + loaded[f"created_{k}"].astype(np.float64)
            for i, sid in enumerate(ids):
                check_store_id(sid)
                out = outputs[int(ends[i] - outlen[i]) : int(ends[i])].tobytes()
                rows.append((sid, key, h[:, i, :], c[:, i, :], int(loaded[f"steps_{k}"][i]),
                             int(loaded[f"seq_{k}"][i]), float(loaded[f"idle_{k}"][i]),
                             float(created_at[i]), loaded[f"digest_{k}"][i].tobytes(), out,
                             extra[i].astype(np.uint8).tobytes()))  # fmt: skip
    except SnapshotFileError:
        raise
    except Exception as e:
        raise refuse(f"its contents are inconsistent ({type(e).__name__})") from None
    if len({r[0] for r in rows}) != len(rows) or any(sid in store._index for sid, *_ in rows):
        raise refuse("it repeats session ids, or the store already holds some of them")
    if len(rows) + len(store._index) > store.max_sessions:
        raise refuse(f"it holds {len(rows)} sessions, over --max-sessions {store.max_sessions}")
    for sid, key, h1, c1, steps, seq, idle, created, digest, out, extra_row in rows:
        slab = store._slabs[key]
        slot = slab.alloc(sid, now - idle, next(store._births))
        store._index[sid] = (store._key_index[key] << 40) | slot
        p, i = slab.at(slot)
        p.h[:, i, :], p.c[:, i, :] = h1, c1
        p.steps[i], p.seq[i], p.created[i] = steps, seq, created
        p.digest[i] = np.frombuffer(digest, np.uint8)
        p.extra[i] = np.frombuffer(extra_row, np.uint8)
        if out:
            store._outputs[sid] = out
    return len(rows)
