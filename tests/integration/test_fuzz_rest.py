"""Schemathesis against our own OpenAPI document, on a real server on port 0: every phase (examples, coverage,
fuzzing, stateful links) and every check (no 5xx, status codes and response bodies as documented, schema-valid
requests accepted, schema-violating ones refused, use after delete, and, with API keys on, ignored auth:
requests without the key must be refused). Seeded, so a failure replays. Zero findings is the bar."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from service.app import Server
from tests.integration.conftest import ServerFactory

KEY = "fuzz-key-0123456789abcdef"


@pytest.mark.parametrize("keys", [False, True], ids=["open", "with-api-keys"])
async def test_schemathesis_finds_nothing_with_every_check(
    make_server: ServerFactory, tmp_path: Path, keys: bool
) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is part of the dev install (make install-dev)"
    extra: list[str] = []
    if keys:
        (tmp_path / "keys").write_text(KEY + "\n")
        server: Server = await make_server(api_keys_file=tmp_path / "keys")
        extra = ["-H", f"Authorization: Bearer {KEY}"]
    else:
        server = await make_server()
    proc = await asyncio.create_subprocess_exec(
        st, "run", f"http://127.0.0.1:{server.http_port}/openapi.json", "--checks", "all", "--max-examples", "40",
        # NOTE: all but use_after_free: it takes a session re-created by an import (POST /v1/sessions/{id}/state,
        # an upsert by design) or by a fork with a chosen id as "deleted resource still available", since only
        # a creation at a prefix of the path counts for it (seen: DELETE, import, GET 200). test_errors checks
        # that a deleted session is 404 on every operation
        "--exclude-checks", "use_after_free",
        "--seed", "1", "--no-color", *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "No issues found" in text, text[-2000:]
