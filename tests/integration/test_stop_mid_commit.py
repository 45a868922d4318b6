"""A stop that cuts a commit short (past the drain timeout, with the Redis store) answers honestly: a step whose
commit Redis may have applied says so and how to retry safely; a step that never reached the store says it was
not applied. Before, both said "not applied, retry", and a retry without seq applied the step twice."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from service.core.dataplane import DataPlane, Limits
from service.core.redis_store import RedisSessionStore
from service.errors import UnavailableError
from service.metrics import Metrics
from tests.fixtures import FakeRuntime, fake_repo
from tests.integration.conftest import REDIS_URL

MAY_HAVE = "may have been applied"
NOT_APPLIED = "stopped before this step completed"


class ReplyLost(RedisSessionStore):
    """The real Redis store whose commits apply, and whose replies then never come (a network that dies after
    the write): the commit stays under way until a stop cancels the wait."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.applied = asyncio.Event()
        self.lose = True

    async def commit(self, *args: Any, **kw: Any) -> Any:
        out = await super().commit(*args, **kw)
        await self._lost()
        return out

    async def commit_block(self, *args: Any, **kw: Any) -> Any:
        out = await super().commit_block(*args, **kw)
        await self._lost()
        return out

    async def _lost(self) -> None:
        if self.lose:
            self.lose = False  # NOTE: only the first commit loses its reply
            self.applied.set()
            await asyncio.Event().wait()


async def start(prefix: str, **limits: Any) -> tuple[DataPlane, ReplyLost]:
    rt = FakeRuntime()
    repo = fake_repo(rt)
    store = ReplyLost(REDIS_URL, {m.key: m.signature for m in repo.all()}, ttl=60, max_sessions=100, prefix=prefix)
    dp = DataPlane(repo, store, Metrics(), Limits(**limits))  # type: ignore[arg-type]
    await dp.start()
    assert store.healthy, f"no Redis answers at {REDIS_URL}: start one (make redis)"
    return dp, store


async def steps_in_redis(prefix: str, sid: str) -> int:
    """The session's step count as another replica reads it from Redis."""
    rt = FakeRuntime()
    repo = fake_repo(rt)
    other = RedisSessionStore(REDIS_URL, {m.key: m.signature for m in repo.all()}, ttl=60, max_sessions=100,
                              prefix=prefix)  # fmt: skip
    await other.start()
    try:
        return (await other.info(sid, time.monotonic())).steps
    finally:
        await other.close()


async def test_a_stop_during_a_commit_says_the_step_may_have_applied_and_a_queued_one_that_it_did_not(
    prefix: str,
) -> None:
    dp, store = await start(prefix, max_batch_size=1)
    a = (await dp.create_session("fake", None, None)).session_id
    b = (await dp.create_session("fake", None, None)).session_id
    x = np.ones((1, 3), np.float32)
    saving = asyncio.create_task(dp.step(a, x))
    await asyncio.wait_for(store.applied.wait(), 5)
    queued = asyncio.create_task(dp.step(b, x))
    await asyncio.sleep(0.05)
    await dp.stop()
    with pytest.raises(UnavailableError, match=MAY_HAVE) as e:
        await asyncio.wait_for(saving, 1)
    assert "retry with its seq" in e.value.message
    with pytest.raises(UnavailableError, match=NOT_APPLIED):
        await asyncio.wait_for(queued, 1)
    assert await steps_in_redis(prefix, a) == 1  # NOTE: it had applied: "not applied, retry" would apply it twice
    assert await steps_in_redis(prefix, b) == 0


async def test_a_stop_during_a_block_commit_tells_its_rows_from_the_rows_not_yet_saved(prefix: str) -> None:
    """A packed block in two chunks: the first chunk's commit loses its reply while the second chunk waits for it;
    the stop answers the first chunk's rows "may have been applied" and the second's "not applied"."""
    dp, store = await start(prefix, block_rows=2)
    ids = [(await dp.create_session("fake", None, None)).session_id for _ in range(4)]
    running = asyncio.create_task(dp.step_block(ids, np.ones((4, 1, 3), np.float32), None))
    await asyncio.wait_for(store.applied.wait(), 5)
    await asyncio.sleep(0.05)
    await dp.stop()
    out = await asyncio.wait_for(running, 1)
    assert sorted(out.errors) == [0, 1, 2, 3]
    assert [MAY_HAVE in out.errors[i].message for i in range(4)] == [True, True, False, False]
    assert [NOT_APPLIED in out.errors[i].message for i in range(4)] == [False, False, True, True]
    assert [await steps_in_redis(prefix, sid) for sid in ids] == [1, 1, 0, 0]
