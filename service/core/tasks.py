"""Stopping the core's background tasks (batch loops, expiry, repository polling, Redis health checks)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop_task(task: asyncio.Task[Any] | None, interval: float = 0.1) -> None:
    """Cancel `task` until it is done, then wait for it. Cancelled once, a task may run on for ever: on Python 3.11
    a cancel that lands as an `asyncio.wait_for` inside it finishes is swallowed (the Redis store wraps every call
    in one), and a loop then sleeps on instead of ending. So the cancel is sent again every `interval` seconds."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=interval)
    with contextlib.suppress(asyncio.CancelledError):
        await task
