"""The short soak (60 s per session store) of `bench/soak.py` against the real entry point: RSS flat after
warm-up (< 1 MiB/min), open descriptors stable, open sessions back to 0 after the TTL, only expected answers.
`make soak` runs the 10-minute version."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_minute_of_churn_leaves_memory_descriptors_and_sessions_flat(store: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", "60", "--store", store],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["passed"]
    assert summary["answers"].get("200", 0) > 100
