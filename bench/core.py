"""Where a step's time goes inside the core: CPU time per batch and per session-step, in process, no transport.

  .venv/bin/python bench/core.py                # the shipped default model, batch 1 to 64
  .venv/bin/python bench/core.py --smoke        # a few rounds of each: checks that it runs

For each batch size B it measures, on real sessions of the shipped model in the in-memory store:
  - ONNX Runtime alone: `runtime.run` on a [B, 1, F] batch (the compute floor);
  - queued steps (`Batcher._execute`): what B queued step calls cost from gather to answer, as a stream or REST
    step at that load reaches it (one `_Work` and one future per call; from BLOCK_ROUTE_ROWS calls on, the batch
    runs as a block inside);
  - a packed block (`Batcher._execute_block`): the same B steps as one block, as packed StepBatch sends them;
  - the whole core per step at batch 1: `DataPlane.stream` fed by an in-process generator (no transport).
CPU time (process_time), so other load on the machine inflates it less than wall time; the Python path is
what is left when ONNX Runtime's share is taken away. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.core.batcher import _Block, _Work  # noqa: E402
from service.core.dataplane import DataPlane, Limits, StreamMessage, StreamOpen  # noqa: E402
from service.core.sessions import MemorySessionStore  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.repository import ModelRepository  # noqa: E402

MODEL = "seattle-weather"


async def cpu_per_call(fn: Callable[[], Awaitable[object]], rounds: int) -> float:
    """CPU microseconds per call of `fn`, after a warm-up."""
    for _ in range(max(3, rounds // 20)):
        await fn()
    t0 = time.process_time()
    for _ in range(rounds):
        await fn()
    return 1e6 * (time.process_time() - t0) / rounds


async def measure(models: Path, sizes: list[int], rounds: int, live_scoring: bool) -> list[str]:
    repo = ModelRepository.load(models, 1, live_scoring)
    model = repo.get(MODEL)
    sig = model.signature
    store = MemorySessionStore({m.key: m.signature for m in repo.all()}, 600, 1_000_000, "reject", wall=time.time)
    dp = DataPlane(repo, store, Metrics(), Limits())
    await dp.start()
    batcher = dp._batchers[model.key]  # NOTE: the batcher's own paths, below the queue
    loop = asyncio.get_running_loop()
    row = np.asarray([[1.0, 10.0, 5.0, 3.0][: sig.features] + [0.0] * max(0, sig.features - 4)], np.float32)
    lines = [
        f"Core cost of `{model.key}` (state {sig.hidden} wide), CPU per batch and per session-step (µs), "
        f"live scoring {'on' if live_scoring else 'off'}:",
        "",
        "| B | ONNX Runtime alone | queued steps | per step | packed block | per step | Python share (queued) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in sizes:
        sids = [(await dp.create_session(MODEL, None, None)).session_id for _ in range(b)]
        x = np.stack([row] * b)
        h = np.zeros((sig.layers, b, sig.hidden), np.float32)
        c = np.zeros((sig.layers, b, sig.cell), np.float32)

        async def ort(x: np.ndarray = x, h: np.ndarray = h, c: np.ndarray = c) -> None:
            model.runtime.run(x, h, c)

        async def items(sids: list[str] = sids) -> None:
            await batcher._execute([_Work(s, row, None, loop.create_future()) for s in sids])

        async def block(sids: list[str] = sids, x: np.ndarray = x) -> None:
            await batcher._execute_block(_Block(sids, x, None, loop.create_future()))

        t_ort = await cpu_per_call(ort, rounds)
        t_items = await cpu_per_call(items, rounds)
        t_block = await cpu_per_call(block, rounds)
        share = max(0.0, 1 - t_ort / t_items)
        lines.append(
            f"| {b} | {t_ort:.0f} | {t_items:.0f} | {t_items / b:.1f} | {t_block:.0f} | {t_block / b:.1f} | "
            f"{share:.0%} |"
        )
        for s in sids:
            await dp.delete_session(s)

    async def messages(n: int) -> AsyncIterator[StreamMessage]:
        yield StreamMessage(inputs=None, open=StreamOpen(model=MODEL))
        for _ in range(n):
            yield StreamMessage(inputs=row)

    n = rounds * 2
    t0 = time.process_time()
    async for _ in dp.stream(messages(n)):
        pass
    per_message = 1e6 * (time.process_time() - t0) / n
    lines += ["", f"`DataPlane.stream`, one session, one step per message: {per_message:.0f} µs CPU per message."]
    await dp.stop()
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=ROOT / "models")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--live-scoring", choices=["true", "false"], default="true")
    p.add_argument("--smoke", action="store_true", help="a few rounds of each: checks that it runs")
    a = p.parse_args()
    rounds = 5 if a.smoke else a.rounds
    import uvloop

    lines = uvloop.run(measure(a.models, a.sizes, rounds, a.live_scoring == "true"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
