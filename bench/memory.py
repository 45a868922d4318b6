"""Target 6: what an open idle session costs. Opens N sessions of the default model in the memory store and
measures the process's RSS before and after (from /proc), and how long opening them took.

  .venv/bin/python bench/memory.py                 # 1,000,000 sessions; prints one JSON line
  .venv/bin/python bench/memory.py --sessions 20000

Budget per session: its raw state (h and c: 2 x layers x hidden float32), plus its live-scoring record when
the model scores its forecasts (the server's default: horizon x horizon float32 forecasts and a few counters,
`Signature.extra` bytes), plus 256 bytes. The sessions are opened through the store's own `create` (the call
every transport ends in), with generated 32-character ids as the server makes them, and then each is given a
state and a record through gather and commit (as a step does), so that the measurement counts touched memory.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from service.core.sessions import Commit, Lease, MemorySessionStore  # noqa: E402
from service.repository import ModelRepository  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def measure(
    n: int, models: Path, live_scoring: bool = True, name: str = "seattle-weather"
) -> dict[str, float | int | bool]:
    repo = ModelRepository.load(models, 1, live_scoring)
    model = next((m for m in repo.all() if m.name == name), None)
    if model is None:
        raise SystemExit(f"no model named {name!r} in {models}; there are {', '.join(repo.names())}")
    sig = model.signature
    store = MemorySessionStore({model.key: sig}, 3600.0, n + 1, "reject", wall=time.time)
    # NOTE: ids of 32 hex characters as the server generates them, made inside the measurement (the store keeps
    # them), and made again for the gather below rather than held in a list
    salt = uuid.uuid4().int

    def sid(i: int) -> str:
        return f"{(salt + i) % (1 << 128):032x}"

    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    now = time.monotonic()
    for i in range(n):
        await store.create(model.key, sid(i), now)
    took = time.perf_counter() - t0
    # NOTE: then every session gets a non-zero state through gather and commit, as after a first step, so that
    # the pages of the state are really touched (zeroed memory is not resident until written)
    rng = np.random.default_rng(0)
    for i in range(0, n, 1024):
        chunk = [sid(j) for j in range(i, min(n, i + 1024))]
        leases, _, _ = await store.gather(model.key, chunk, now)
        record = rng.integers(1, 255, sig.extra, dtype=np.uint8).tobytes()
        commits = [Commit(lease, 1, 1, None, record) for lease in leases if isinstance(lease, Lease)]
        state = rng.standard_normal((sig.layers, len(commits), sig.hidden)).astype(np.float32)
        await store.commit(model.key, commits, state, state, now)
    gc.collect()
    after = rss_bytes()
    raw = 2 * sig.layers * sig.hidden * 4
    per = (after - before) / n
    assert await store.count(model.key) == n
    budget = raw + sig.extra + 256
    return {"sessions": n, "model": model.key, "live_scoring": live_scoring, "raw_state_bytes": raw,
            "record_bytes": sig.extra,
            "rss_bytes_per_session": round(per, 1), "budget_bytes": budget, "seconds": round(took, 2),
            "pass": per <= budget and took < 60}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=1_000_000)
    p.add_argument("--models", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="seattle-weather", help="the model whose sessions to open (default %(default)s)")
    p.add_argument("--no-live-scoring", action="store_true", help="as a server with --live-scoring false")
    a = p.parse_args()
    result = asyncio.run(measure(a.sessions, a.models, not a.no_live_scoring, a.model))
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
