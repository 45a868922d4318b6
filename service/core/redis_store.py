"""Sessions in Redis, shared by every replica: one string per session (a small header and raw float32 state),
one sorted set of session ids per model version by last use, and Lua scripts for every multi-key change.

Layout (prefix `lstm:` by default):
- `{prefix}s:{id}`: the session. `HEADER` (version, born, owner, steps, seq, created, last used), the model
  key, then h and c as raw float32 (`L*H*4` bytes each), a 16-byte replay digest (zeros: none) and the kept
  replay outputs. The key's TTL is the idle TTL, refreshed by every use.
- `{prefix}r:{id}`: the session's record beside its state (live scoring), when its model has one: the
  session's version when it was written (8 bytes), then the record. Its own key, written by the same scripts
  with the same TTL, so that the session value keeps the layout every older server reads (a rolling upgrade
  or a rollback shares one Redis); a record whose version is not the session's (an older server stepped the
  session since) is stale and reads as a fresh one.
- `{prefix}idx:{model key}`: sorted set of the model version's session ids, scored by last use (Unix time);
  it counts sessions for the cap, finds the least recently used one, and lets a sweep find expired ones.
- `{prefix}gone:{id}`: why a session id went (expired, evicted, unloaded), for an hour, for clear error messages.

Consistency: `version` is 8 random bytes written by every change; a commit or control operation is a
compare-and-set on it inside one Lua script (so two replicas can never both advance one session), and
`born` (8 random bytes at creation) tells a re-created id from the one a lease saw. A batch reads all its
sessions in one script call and commits in one: one round trip each, whatever the batch size.

The session cap holds across replicas: the create script counts every model's sorted set and inserts in
the same atomic step. Expiry: Redis drops an idle session's key by its TTL; each replica's sweep removes the
stale sorted-set entries, and the replica whose ZREM wins reports the expiry, so metrics count it once.

Multi-key scripts assume one Redis instance (or a cluster slot): keys are computed inside the scripts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import numpy as np
import redis.asyncio as aioredis
from numpy.typing import NDArray
from redis.exceptions import NoScriptError, RedisError

from service.core.sessions import (
    DIGEST_BYTES,
    BlockCommit,
    Commit,
    CommitStatus,
    Lease,
    LeaseBlock,
    Record,
    RemovalListener,
    Replay,
    SessionInfo,
    Snapshot,
    check_counters,
    check_store_id,
    commit_block_by_items,
    gather_block_by_items,
    not_served,
    session_gone,
    session_moved,
)
from service.core.tasks import stop_task
from service.errors import (
    InvalidInputError,
    ServeError,
    SessionCorruptError,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
    UnavailableError,
)
from service.runtime import F32, Signature

log = logging.getLogger(__name__)
T = TypeVar("T")
# NOTE: GATHER reads the model key's length at bytes 57-58 and the key from byte 59 (Lua, 1-based): keep in step
HEADER = struct.Struct("<8s8s8sqqddH")  # version, born, owner, steps, seq, created, last_used, len(model key)


def damaged(sid: str, why: str) -> SessionCorruptError:
    """A session value that cannot be what this store wrote (cut short, overwritten by hand, another program's key
    under our prefix): that session alone fails, and only deleting it helps."""
    return SessionCorruptError(
        f"session {sid!r} cannot be read from the session store: its stored value is damaged ({why}), so its state "
        "is lost; delete the session and open it again"
    )


def read_header(raw: bytes, sid: str = "") -> tuple[tuple[Any, ...], str]:
    """The header fields of a session value and its model key; a value too short for them, or whose model key is
    not text of the form name/version, raises SessionCorruptError (the rest is laid out by that version)."""
    if len(raw) < HEADER.size:
        raise damaged(sid, f"{len(raw)} bytes, shorter than the {HEADER.size}-byte header")
    fields = HEADER.unpack_from(raw)
    n = fields[-1]
    if len(raw) < HEADER.size + n:
        raise damaged(sid, f"{len(raw)} bytes, cut short inside its model name")
    try:
        model_key = raw[HEADER.size : HEADER.size + n].decode()
    except UnicodeDecodeError:
        raise damaged(sid, "its model name is not text") from None
    if "/" not in model_key:
        raise damaged(sid, "its model name has no version")
    return fields, model_key


def model_key_of(raw: bytes, sid: str = "") -> str:
    """The model version a session value is of, from its header (see read_header)."""
    return read_header(raw, sid)[1]


GONE_TTL_S = 3600
UNAVAILABLE = "the session store (Redis) is unavailable; retry shortly (with seq, a retry is safe)"

# KEYS: session keys; ARGV: ttl_ms, now, idx prefix, offset of the id in a key, record prefix, then per key: model
# key and '1' to mark it used (refresh its TTL and last-use score; '0': a peek, which reads without using).
# Returns per key {value, record or ''}, or false.
GATHER = """
local ttl, now, idx, off, rp = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v then
    local id = string.sub(key, off + 1)
    local r = redis.call('GET', rp .. id)
    local model = ARGV[4 + 2 * i]
    -- NOTE: a session of another version (not served here, or moved) is read, not touched or indexed here
    local same = #v >= 58 + #model and string.byte(v, 57) + 256 * string.byte(v, 58) == #model
      and string.sub(v, 59, 58 + #model) == model
    if ARGV[5 + 2 * i] == '1' and same then
      redis.call('PEXPIRE', key, ttl)
      if r then redis.call('PEXPIRE', rp .. id, ttl) end
      redis.call('ZADD', idx .. model, now, id)
    end
    out[i] = {v, r or ''}
  else
    out[i] = false
  end
end
return out
"""

# KEYS: session keys; ARGV: ttl_ms, now, idx prefix, offset of the id in a key, record prefix, then per key:
# expected version and born (16 bytes), new value (empty: delete), model key, '1' to keep the stored owner (a
# step does not change who owns the session; a resume may have changed it since the lease), and the new record
# (empty: keep the one there, tagged with the new version). Returns 1 committed, 0 stale, -1 gone, per key.
COMMIT = """
local ttl, now, idx, off, rp = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local out = {}
for i, key in ipairs(KEYS) do
  local base = 5 + (i - 1) * 5
  local want, new, model, rec = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 5]
  local v = redis.call('GET', key)
  if ARGV[base + 4] == '1' and new ~= '' and v then
    new = string.sub(new, 1, 16) .. string.sub(v, 17, 24) .. string.sub(new, 25)
  end
  if not v or string.sub(v, 9, 16) ~= string.sub(want, 9, 16) then
    out[i] = -1
  elseif string.sub(v, 1, 8) ~= string.sub(want, 1, 8) then
    out[i] = 0
  else
    local id = string.sub(key, off + 1)
    if new == '' then
      redis.call('DEL', key, rp .. id)
      redis.call('ZREM', idx .. model, id)
    else
      redis.call('SET', key, new, 'PX', ttl)
      if rec ~= '' then
        redis.call('SET', rp .. id, rec, 'PX', ttl)
      else
        local r = redis.call('GET', rp .. id)
        if r then redis.call('SET', rp .. id, string.sub(new, 1, 8) .. string.sub(r, 9), 'PX', ttl) end
      end
      redis.call('ZADD', idx .. model, now, id)
    end
    out[i] = 1
  end
end
return out
"""

# KEYS[1]: session key, KEYS[2]: its gone key, KEYS[3]: its record key; ARGV: value, ttl_ms, now, cap, evict
# (1/0), idx prefix, key prefix, gone prefix, model key, id, record ('' for none), record prefix, an id to mark
# used and never evict ('' for none: a fork's origin, of the same model), then every model key (for the cap).
# Returns {status, evicted model, evicted id}: 1 created, -1 exists, -2 at the cap. Expired sorted-set entries
# met on the way are removed (the sweep reports them).
CREATE = """
local value, ttl, now, cap, evict = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local idx, kp, gp, model, id = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local rec, rp, keep = ARGV[11], ARGV[12], ARGV[13]
if redis.call('EXISTS', KEYS[1]) == 1 then return {-1, '', ''} end
if keep ~= '' and redis.call('PEXPIRE', kp .. keep, ttl) == 1 then
  redis.call('PEXPIRE', rp .. keep, ttl)
  redis.call('ZADD', idx .. model, now, keep)
end
local n = 0
for i = 14, #ARGV do n = n + redis.call('ZCARD', idx .. ARGV[i]) end
local ev_model, ev_id = '', ''
while n >= cap do
  local best_model, best_id, best_score = nil, nil, nil
  for i = 14, #ARGV do
    local first = redis.call('ZRANGE', idx .. ARGV[i], 0, 1, 'WITHSCORES')
    if first[1] == keep then table.remove(first, 1); table.remove(first, 1) end
    if first[1] and (best_score == nil or tonumber(first[2]) < best_score) then
      best_model, best_id, best_score = ARGV[i], first[1], tonumber(first[2])
    end
  end
  if best_id == nil then return {-2, '', ''} end
  if redis.call('EXISTS', kp .. best_id) == 0 then
    redis.call('ZREM', idx .. best_model, best_id)
    redis.call('SET', gp .. best_id, 'expired', 'EX', 3600)
    n = n - 1
  elseif evict == '1' then
    redis.call('DEL', kp .. best_id, rp .. best_id)
    redis.call('ZREM', idx .. best_model, best_id)
    redis.call('SET', gp .. best_id, 'evicted', 'EX', 3600)
    ev_model, ev_id = best_model, best_id
    n = n - 1
  else
    return {-2, '', ''}
  end
end
redis.call('SET', KEYS[1], value, 'PX', ttl)
if rec ~= '' then redis.call('SET', KEYS[3], rec, 'PX', ttl) else redis.call('DEL', KEYS[3]) end
redis.call('ZADD', idx .. model, now, id)
redis.call('DEL', KEYS[2])
return {1, ev_model, ev_id}
"""

# KEYS[1]: a model's sorted set; ARGV: key prefix, gone prefix, cutoff (now - ttl), limit, now, ttl_ms. Removes
# entries older than the cutoff whose session key is gone (Redis expired it) and returns their ids; an entry
# whose key still exists (clocks of replicas apart) gets its score back from the key's remaining TTL.
SWEEP = """
local kp, gp = ARGV[1], ARGV[2]
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
local gone = {}
for _, id in ipairs(ids) do
  local left = redis.call('PTTL', kp .. id)
  if left < 0 then
    if redis.call('ZREM', KEYS[1], id) == 1 then
      redis.call('SET', gp .. id, 'expired', 'EX', 3600)
      table.insert(gone, id)
    end
  else
    redis.call('ZADD', KEYS[1], tonumber(ARGV[5]) - (tonumber(ARGV[6]) - left) / 1000, id)
  end
end
return gone
"""


# KEYS[1]: a session key, KEYS[2]: its record key; ARGV: the damaged value as read, the id, idx prefix, then every
# model key. Deletes the session if its value is still that one (a writer that replaced it wins); returns 1 or 0.
PURGE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
for i = 4, #ARGV do redis.call('ZREM', ARGV[3] .. ARGV[i], ARGV[2]) end
return 1
"""


@dataclass
class _State:
    """A decoded session value."""

    version: bytes
    born: bytes
    owner: bytes
    steps: int
    seq: int
    created: float
    last_used: float
    model_key: str
    h: F32
    c: F32
    digest: bytes
    outputs: F32 | None
    extra: bytes = b""

    def token(self) -> bytes:
        return self.version + self.born

    def incarnation(self) -> str:
        return f"{self.born.hex()}.{self.owner.hex()}"

    def life(self) -> int:
        """`born` as the number SessionInfo.life and Lease.life carry (never 0)."""
        return int.from_bytes(self.born, "little", signed=True) or 1


class RedisSessionStore:
    """The `SessionStore` protocol over Redis (see the module docstring for the layout and guarantees)."""

    def __init__(
        self,
        url: str,
        signatures: dict[str, Signature],
        ttl: float,
        max_sessions: int,
        cap_policy: str = "reject",
        timeout: float = 0.5,
        prefix: str = "lstm:",
        health_interval: float = 1.0,
    ) -> None:
        self.url, self.sigs, self.ttl, self.max_sessions, self.cap_policy = (
            url,
            signatures,
            ttl,
            max_sessions,
            cap_policy,
        )
        self.timeout, self.health_interval = timeout, health_interval
        self.kp, self.gp, self.ip, self.rp = f"{prefix}s:", f"{prefix}gone:", f"{prefix}idx:", f"{prefix}r:"
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False, health_check_interval=0
        )
        self._scripts = {name: (src, "") for name, src in (("gather", GATHER), ("commit", COMMIT),
                         ("create", CREATE), ("sweep", SWEEP), ("purge", PURGE))}  # fmt: skip
        self._healthy = False
        self._checked = False
        self._health_task: asyncio.Task[None] | None = None
        self._closing = False
        self._on_removed: RemovalListener = lambda key, reason: None

    # --- lifecycle and health ------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._healthy

    def set_removal_listener(self, listener: RemovalListener) -> None:
        self._on_removed = listener

    async def start(self) -> None:
        """Connect (a Redis that is down now is not fatal: readiness stays false until it answers)."""
        self._closing = False
        await self._check_health()
        if not self._healthy:
            log.warning("Redis at %s does not answer yet; not ready until it does", self._safe_url())
        self._health_task = asyncio.create_task(self._health_loop(), name="redis-health")

    async def close(self) -> None:
        self._closing = True
        # NOTE: a cancel that lands as the health check's wait_for finishes is swallowed: that hung close() now and then
        await stop_task(self._health_task, self.health_interval + self.timeout)
        await self.redis.aclose()

    def _safe_url(self) -> str:
        """The URL without a password, for logs."""
        return self.url.split("@")[-1]

    async def _check_health(self) -> None:
        was = self._healthy
        try:
            await asyncio.wait_for(self.redis.ping(), self.timeout)
            self._healthy = True
        except (RedisError, OSError, TimeoutError):
            self._healthy = False
        if was != self._healthy and self._checked:  # NOTE: the first check is start()'s to report
            log.warning("Redis at %s is %s", self._safe_url(), "back" if self._healthy else "unavailable")
        self._checked = True

    async def _health_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.health_interval)
            await self._check_health()

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation with a bounded time; failures become 'unavailable' (503, retryable)."""
        try:
            return await asyncio.wait_for(op(), self.timeout * 2)
        except (RedisError, OSError, TimeoutError) as e:
            self._healthy = False
            log.warning("Redis operation failed: %s", e)
            raise UnavailableError(UNAVAILABLE) from None

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        src, sha = self._scripts[name]

        async def run() -> Any:
            nonlocal sha
            if sha:
                try:
                    return await self.redis.evalsha(sha, len(keys), *keys, *args)
                except NoScriptError:
                    pass
            sha = await self.redis.script_load(src)
            self._scripts[name] = (src, sha)
            return await self.redis.evalsha(sha, len(keys), *keys, *args)

        return await self._call(run)

    # --- encoding --------------------------------------------------------------------------------------
    def _encode(self, st: _State) -> bytes:
        model = st.model_key.encode()
        head = HEADER.pack(st.version, st.born, st.owner, st.steps, st.seq, st.created, st.last_used, len(model))
        out = b"" if st.outputs is None else st.outputs.astype(np.float32).tobytes()
        return b"".join((head, model, st.h.astype(np.float32).tobytes(), st.c.astype(np.float32).tobytes(),
                         st.digest, out))  # fmt: skip

    @staticmethod
    def _record(st: _State) -> bytes:
        """The value of the session's record key: its version, then the record ('' for a model without one)."""
        return st.version + st.extra if st.extra else b""

    def _decode(self, raw: bytes, record: bytes = b"", sid: str = "") -> _State:
        (version, born, owner, steps, seq, created, last_used, n), model_key = read_header(raw, sid)
        at = HEADER.size + n
        sig = self.sigs.get(model_key)
        if sig is None:  # NOTE: not "no such session": it lives, on a version another replica loaded first
            raise not_served(sid, model_key)
        size = sig.layers * sig.hidden * 4
        rest = len(raw) - at - size - sig.layers * sig.cell * 4 - DIGEST_BYTES
        if rest < 0 or rest % (4 * sig.outputs) or steps < 0 or seq < 0:
            raise damaged(sid, f"{len(raw)} bytes do not hold a state of {model_key}")
        h = np.frombuffer(raw, np.float32, sig.layers * sig.hidden, at).reshape(sig.layers, sig.hidden)
        c = np.frombuffer(raw, np.float32, sig.layers * sig.cell, at + size).reshape(sig.layers, sig.cell)
        at += size + sig.layers * sig.cell * 4
        digest = raw[at : at + DIGEST_BYTES]
        rest = raw[at + DIGEST_BYTES :]
        outputs = np.frombuffer(rest, np.float32).reshape(-1, sig.outputs) if rest else None
        # NOTE: a record of another version (an older server stepped the session) or width starts again, empty
        fresh = len(record) == 8 + sig.extra and record[:8] == version
        extra = record[8:] if fresh else bytes(sig.extra)
        return _State(version, born, owner, steps, seq, created, last_used, model_key, h, c, digest, outputs, extra)

    def _info(self, sid: str, st: _State) -> SessionInfo:
        name, version = st.model_key.split("/", 1)
        return SessionInfo(sid, name, version, st.steps, st.seq, st.created, st.last_used, st.last_used + self.ttl,
                           st.incarnation(), st.extra, st.life())  # fmt: skip

    @staticmethod
    def _new_version() -> bytes:
        return os.urandom(8)

    # --- reads -----------------------------------------------------------------------------------------
    async def _not_found(self, sid: str) -> SessionNotFoundError:
        reason = await self._call(lambda: self.redis.get(self.gp + sid))
        return session_gone(sid, cast(bytes, reason).decode() if reason else None, self.ttl)

    async def _load(self, sid: str) -> _State:
        raw, record = await self._call(lambda: self.redis.mget(self.kp + sid, self.rp + sid))
        if raw is None:
            raise await self._not_found(sid)
        return self._decode(cast(bytes, raw), cast(bytes, record or b""), sid)

    async def _cas(self, sid: str, old: _State, new: _State | None) -> CommitStatus:
        """Compare-and-set one session (None: delete it) against the version it was read at."""
        value = b"" if new is None else self._encode(new)
        record = b"" if new is None else self._record(new)
        got = await self._script(
            "commit", [self.kp + sid], [int(self.ttl * 1000), time.time(), self.ip, len(self.kp), self.rp,
                                        old.token(), value, old.model_key, "0", record],
        )  # fmt: skip
        return {1: CommitStatus.COMMITTED, 0: CommitStatus.STALE}.get(int(got[0]), CommitStatus.GONE)

    async def _update(self, sid: str, change: Callable[[_State], _State | None]) -> tuple[_State, _State | None]:
        """Read, change and compare-and-set a session (None: delete it), retrying when another writer got there
        first; returns the state it changed and the new one."""
        for _ in range(20):
            st = await self._load(sid)
            new = change(st)
            status = await self._cas(sid, st, new)
            if status is CommitStatus.COMMITTED:
                return st, new
            if status is CommitStatus.GONE:
                raise await self._not_found(sid)
        raise UnavailableError(f"session {sid!r} is changing too fast to update; retry")

    async def _replace(self, sid: str, change: Callable[[_State], _State]) -> SessionInfo:
        _, new = await self._update(sid, change)
        assert new is not None
        return self._info(sid, new)

    # --- SessionStore ----------------------------------------------------------------------------------
    async def create(self, model_key: str, session_id: str | None, now: float) -> SessionInfo:
        sid = uuid.uuid4().hex if session_id is None else check_store_id(session_id)
        sig = self.sigs.get(model_key)
        if sig is None:  # NOTE: its model version was unloaded while this create was on its way
            raise UnavailableError(f"{model_key} was just unloaded; create the session again (on the newest version)")
        wall = time.time()
        h, c = np.zeros((sig.layers, sig.hidden), np.float32), np.zeros((sig.layers, sig.cell), np.float32)
        st = _State(self._new_version(), os.urandom(8), bytes(8), 0, 0, wall, wall, model_key, h, c,
                    bytes(DIGEST_BYTES), None, bytes(sig.extra))  # fmt: skip
        return await self._insert(sid, st)

    async def _insert(self, sid: str, st: _State, spare: str = "") -> SessionInfo:
        """Write a new session, atomically with the cap (at it: evict the least recently used but `spare`, or
        refuse)."""
        got = await self._script(
            "create", [self.kp + sid, self.gp + sid, self.rp + sid],
            [self._encode(st), int(self.ttl * 1000), st.created, self.max_sessions,
             "1" if self.cap_policy == "evict_lru" else "0", self.ip, self.kp, self.gp, st.model_key, sid,
             self._record(st), self.rp, spare, *self.sigs],
        )  # fmt: skip
        status = int(got[0])
        if status == -1:
            raise SessionExistsError(f"session {sid!r} already exists; resume it, or delete it first")
        if status == -2:
            raise SessionLimitError(
                f"the server holds its maximum of {self.max_sessions} sessions; delete unused sessions or retry later"
            )
        if got[2]:
            self._on_removed(got[1].decode(), "evicted")
        return self._info(sid, st)

    async def info(self, session_id: str, now: float) -> SessionInfo:
        return self._info(session_id, await self._load(session_id))

    async def model_of(self, session_id: str, now: float) -> str:
        """Read from the value's header alone: a session of a version this server does not serve (yet) still
        names it, so that the core answers "retry", not "no such session" (a rolling update loads a version on
        one replica before the next)."""
        raw = await self._call(lambda: self.redis.get(self.kp + session_id))
        if raw is None:
            raise await self._not_found(session_id)
        return model_key_of(cast(bytes, raw), session_id)

    async def models_of(self, session_ids: list[str], now: float) -> list[str | ServeError]:
        """One MGET for all (a round trip per session made a packed batch of 1,024 sessions take 0.3 s); of each
        value only the header is decoded (see model_of). Missing sessions say why in a second MGET, of their
        tombstones."""
        if not session_ids:
            return []
        raws = await self._call(lambda: self.redis.mget([self.kp + sid for sid in session_ids]))
        out: list[str | ServeError] = []
        missing: list[int] = []
        for i, raw in enumerate(raws):
            if raw is None:
                missing.append(i)
                out.append("")
            else:
                try:
                    out.append(model_key_of(cast(bytes, raw), session_ids[i]))
                except SessionCorruptError as e:  # NOTE: this session alone fails
                    out.append(e)
        if missing:
            reasons = await self._call(lambda: self.redis.mget([self.gp + session_ids[i] for i in missing]))
            for i, reason in zip(missing, reasons, strict=True):
                out[i] = session_gone(session_ids[i], cast(bytes, reason).decode() if reason else None, self.ttl)
        return out

    async def delete(self, session_id: str, incarnation: str | None = None) -> None:
        def drop(st: _State) -> None:
            if incarnation is not None and st.incarnation() != incarnation:
                raise SessionNotFoundError(f"session {session_id!r} was replaced by a newer one of the same id")

        try:
            st, _ = await self._update(session_id, drop)
        except SessionCorruptError:
            await self._purge(session_id)
            return
        self._on_removed(st.model_key, "deleted")

    async def _purge(self, sid: str) -> None:
        """Delete a session whose value is damaged (its incarnation cannot be read: any delete removes it)."""
        for _ in range(20):
            raw = cast("bytes | None", await self._call(lambda: self.redis.get(self.kp + sid)))
            if raw is None:
                raise await self._not_found(sid)
            try:
                self._decode(raw, b"", sid)
            except SessionCorruptError:
                pass
            else:  # NOTE: written meanwhile, and readable again: an ordinary delete
                await self.delete(sid)
                return
            try:
                model_key = model_key_of(raw, sid)
            except SessionCorruptError:
                model_key = ""
            if await self._script("purge", [self.kp + sid, self.rp + sid], [raw, sid, self.ip, *self.sigs]):
                self._on_removed(model_key if model_key in self.sigs else "unknown", "deleted")
                return
        raise UnavailableError(f"session {sid!r} is changing too fast to delete; retry")

    async def fork(self, source_id: str, session_id: str, now: float, record: Record) -> SessionInfo:
        """A new session from the source's state as read now; the cap applies, and the fork is a use of the
        source (so that at the cap it is not the one evicted)."""
        sid = check_store_id(session_id)
        src = await self._load(source_id)
        if src.model_key not in self.sigs:  # NOTE: its model version was unloaded while the source was read
            raise UnavailableError(f"{src.model_key} was just unloaded; fork a session of the newest version")
        wall = time.time()
        st = _State(self._new_version(), os.urandom(8), bytes(8), src.steps, 0, wall, wall, src.model_key, src.h,
                    src.c, bytes(DIGEST_BYTES), None, record(src.extra))  # fmt: skip
        return await self._insert(sid, st, spare=source_id)

    async def detach(self, session_id: str, now: float) -> SessionInfo:
        # NOTE: the version stays, so that a step in flight still commits: only the owner changes
        return await self._replace(session_id, lambda st: replace(st, owner=os.urandom(8)))

    async def reset(self, session_id: str, now: float, record: Record | None = None) -> SessionInfo:
        def zero(st: _State) -> _State:
            z = np.zeros_like(st.h)
            return replace(st, version=self._new_version(), steps=0, seq=0, h=z, c=np.zeros_like(st.c),
                           last_used=time.time(), digest=bytes(DIGEST_BYTES), outputs=None,
                           extra=bytes(len(st.extra)) if record is None else record(st.extra))  # fmt: skip

        return await self._replace(session_id, zero)

    async def export(self, session_id: str, now: float) -> Snapshot:
        st = await self._load(session_id)
        name, version = st.model_key.split("/", 1)
        return Snapshot(name, version, st.steps, st.seq, st.h.copy(), st.c.copy(), st.extra)

    async def restore(
        self, session_id: str, model_key: str, snap: Snapshot, now: float, record: Record | None = None
    ) -> tuple[SessionInfo, bool]:
        check_store_id(session_id)
        check_counters(snap)
        created = False
        try:
            current = await self._load(session_id)
        except SessionNotFoundError:
            try:
                await self.create(model_key, session_id, now)
                created = True
            except SessionExistsError:
                pass  # NOTE: another replica created it meanwhile: write over it below
            current = await self._load(session_id)
        if current.model_key != model_key:
            raise InvalidInputError(
                f"session {session_id!r} runs {current.model_key}; the snapshot is of {model_key}: delete the session "
                "first"
            )

        def write(st: _State) -> _State:
            return replace(st, version=self._new_version(), steps=snap.steps, seq=snap.seq, h=snap.h, c=snap.c,
                           last_used=time.time(), digest=bytes(DIGEST_BYTES), outputs=None,
                           extra=bytes(len(st.extra)) if record is None else record(st.extra))  # fmt: skip

        return await self._replace(session_id, write), created

    async def gather(
        self, model_key: str, session_ids: list[str], now: float, touch: list[bool] | None = None
    ) -> tuple[list[Lease | ServeError], F32, F32]:
        sig = self.sigs[model_key]
        h = np.zeros((sig.layers, len(session_ids), sig.hidden), np.float32)
        c = np.zeros((sig.layers, len(session_ids), sig.cell), np.float32)
        if not session_ids:
            return [], h, c
        marks = ["1" if touch is None or t else "0" for t in (touch or [True] * len(session_ids))]
        raws = await self._script(
            "gather", [self.kp + sid for sid in session_ids],
            [int(self.ttl * 1000), time.time(), self.ip, len(self.kp), self.rp,
             *(v for mark in marks for v in (model_key, mark))],
        )  # fmt: skip
        leases: list[Lease | ServeError] = []
        for n, (sid, raw) in enumerate(zip(session_ids, raws, strict=True)):
            if not raw:
                leases.append(await self._not_found(sid))
                continue
            try:
                key = model_key_of(raw[0], sid)
                if key != model_key:  # NOTE: this row alone fails; a version not served here cannot be decoded here
                    leases.append(session_moved(sid, key) if key in self.sigs else not_served(sid, key))
                    continue
                st = self._decode(raw[0], raw[1], sid)
            except SessionCorruptError as e:
                leases.append(e)
                continue
            h[:, n, :], c[:, n, :] = st.h, st.c
            replay = Replay(st.seq, st.digest, st.outputs) if any(st.digest) else None
            leases.append(Lease(sid, st, st.steps, st.seq, replay, st.extra, st.life()))
        return leases, h, c

    async def commit(self, model_key: str, commits: list[Commit], hn: F32, cn: F32, now: float) -> list[CommitStatus]:
        if not commits:
            return []
        wall = time.time()
        args: list[Any] = [int(self.ttl * 1000), wall, self.ip, len(self.kp), self.rp]
        keys = []
        versions = os.urandom(8 * len(commits))  # NOTE: one system call, not one per session (9 % of a big batch)
        for i, cm in enumerate(commits):
            old = cast(_State, cm.lease.token)  # NOTE: our own token, see gather
            replay = cm.replay
            new = _State(
                versions[8 * i : 8 * i + 8], old.born, old.owner, cm.steps, cm.seq, old.created, wall, model_key,
                hn[:, i, :], cn[:, i, :], replay.digest if replay else bytes(DIGEST_BYTES),
                replay.outputs if replay else None, old.extra if cm.extra is None else cm.extra,
            )  # fmt: skip
            keys.append(self.kp + cm.lease.session_id)
            args += [old.token(), self._encode(new), model_key, "1", self._record(new)]
        got = await self._script("commit", keys, args)
        return [{1: CommitStatus.COMMITTED, 0: CommitStatus.STALE}.get(int(g), CommitStatus.GONE) for g in got]

    async def gather_block(self, model_key: str, session_ids: list[str], now: float) -> LeaseBlock:
        # NOTE: one script call either way; the per-session work is the decoding of what Redis returns
        return await gather_block_by_items(self, model_key, session_ids, now, self.sigs[model_key].extra)

    async def commit_block(
        self, model_key: str, block: LeaseBlock, commit: BlockCommit, hn: F32, cn: F32, now: float
    ) -> NDArray[np.int8]:
        return await commit_block_by_items(self, model_key, block, commit, hn, cn, now)

    async def expire(self, now: float) -> int:
        """Report sessions whose keys Redis expired (once across replicas) and drop their index entries."""
        removed = 0
        cutoff = time.time() - self.ttl
        for key in self.sigs:
            gone = await self._script(
                "sweep", [self.ip + key], [self.kp, self.gp, cutoff, 1000, cutoff + self.ttl, int(self.ttl * 1000)]
            )
            for _ in gone:
                self._on_removed(key, "expired")
            removed += len(gone)
        return removed

    async def count(self, model_key: str | None = None) -> int:
        keys = [model_key] if model_key is not None else list(self.sigs)
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.zcard(self.ip + key)
        return sum(int(n) for n in await self._call(pipe.execute))

    def add_model(self, model_key: str, sig: Signature) -> None:
        """Serve a newly loaded model version (live model repository)."""
        self.sigs[model_key] = sig

    async def drop_model(self, model_key: str) -> int:
        """End every session of an unloaded model version, for every replica (they answer "unloaded" from now on);
        return how many."""
        if model_key not in self.sigs:
            return 0
        raw: list[bytes] = await self._call(lambda: self.redis.zrange(self.ip + model_key, 0, -1))  # type: ignore[arg-type,return-value]
        ids = [i.decode() for i in raw]
        for at in range(0, len(ids), 1000):
            chunk = ids[at : at + 1000]
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(*(self.kp + sid for sid in chunk), *(self.rp + sid for sid in chunk))
            for sid in chunk:
                pipe.set(self.gp + sid, "unloaded", ex=3600)
            pipe.zrem(self.ip + model_key, *chunk)
            await self._call(pipe.execute)
        for _ in ids:
            self._on_removed(model_key, "unloaded")
        del self.sigs[model_key]
        return len(ids)

    async def memory_usage(self, session_id: str) -> int:
        """Bytes Redis uses for a session's key and value (MEMORY USAGE), for capacity planning and tests."""
        total = 0
        for key in (self.kp + session_id, self.rp + session_id):
            used: int | None = await self._call(lambda key=key: self.redis.memory_usage(key, samples=0))  # type: ignore[misc]
            total += int(used or 0)
        return total
