"""Schemathesis against our own OpenAPI document, on a real server on port 0: every phase (examples, coverage,
fuzzing, stateful links) and every check (no 5xx, status codes and response bodies as documented, schema-valid
requests accepted, schema-violating ones refused, use after delete, and, with API keys on, ignored auth:
requests without the key must be refused). Seeded, so a failure replays. Zero findings is the bar."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path

import pytest

from service.app import Server
from tests.integration.conftest import ServerFactory

KEY = "fuzz-key-0123456789abcdef"


@pytest.mark.parametrize(("keys", "both"), [(False, False), (True, False), (False, True)],
                         ids=["open", "with-api-keys", "both-shipped-models"])  # fmt: skip
async def test_schemathesis_finds_nothing_with_every_check(
    make_server: ServerFactory, tmp_path: Path, keys: bool, both: bool, daily_repo: Path
) -> None:
    """One model: every check. Both shipped models (F 4 and 1): the document cannot tie a row's width to the model
    a session runs, so it leaves dimensions open and a schema-valid row may be refused (400, as documented);
    every other check holds."""
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is part of the dev install (make install-dev)"
    extra: list[str] = []
    excluded = "use_after_free,positive_data_acceptance" if both else "use_after_free"
    repo = {} if both else {"models": daily_repo}
    if keys:
        (tmp_path / "keys").write_text(KEY + "\n")
        server: Server = await make_server(api_keys_file=tmp_path / "keys", **repo)
        extra = ["-H", f"Authorization: Bearer {KEY}"]
    else:
        server = await make_server(**repo)
    proc = await asyncio.create_subprocess_exec(
        st, "run", f"http://127.0.0.1:{server.http_port}/openapi.json", "--checks", "all", "--max-examples", "40",
        # NOTE: all but use_after_free: it takes a session re-created by an import (POST /v1/sessions/{id}/state,
        # an upsert by design) or by a fork with a chosen id as "deleted resource still available", since only
        # a creation at a prefix of the path counts for it (seen: DELETE, import, GET 200). test_errors checks
        # that a deleted session is 404 on every operation
        "--exclude-checks", excluded,
        "--seed", "1", "--no-color", *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    if both:  # NOTE: its warnings say that rows of the other model's width were refused, as the docstring explains
        assert re.search(r"(\d+) generated, \1 passed", text), text[-2000:]
    else:
        assert "No issues found" in text, text[-2000:]
