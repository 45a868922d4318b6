"""The README's examples work exactly as written (only the ports are swapped for the test server's)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from service.app import Server
from service.errors import ERROR_TABLE
from service.settings import Settings
from tests.conftest import ROOT, SHIPPED_REPO

README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def blocks(lang: str, after: str) -> list[str]:
    """The code blocks of a language in the README section whose heading starts with `after`."""
    start = README.index(after)
    section = README[start : README.find("\n## ", start + 1)]
    section = section[: section.find("\n### ", 5)] if "\n### " in section[5:] else section
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def commands(block: str) -> list[str]:
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def localize(text: str, srv: Server) -> str:
    text = text.replace("localhost:8000", f"127.0.0.1:{srv.http_port}")
    text = text.replace("localhost:50051", f"127.0.0.1:{srv.grpc_port}")
    text = re.sub(r"(^|\s)\.venv/", rf"\1{ROOT}/.venv/", text)
    return re.sub(r"(^|\s)grpcurl ", rf"\1{BIN}/grpcurl ", text)


async def run(cmd: list[str], cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_curl_and_grpcurl_examples_run_in_order(server: Server, tmp_path: Path) -> None:
    """Every curl and grpcurl line of the README succeeds against a server, in the order written."""
    lines = [c for b in blocks("bash", "### curl") + blocks("bash", "### grpcurl") for c in commands(b)]
    assert len(lines) >= 12
    for line in lines:
        rc, out, err = await run(["bash", "-c", localize(line, server)], tmp_path)
        assert rc == 0, (line, out, err)
        assert '"error"' not in out, (line, out)
        assert "ERROR" not in err, (line, err)
    assert await server.store.count() == 0  # the last line deleted the demo session


async def test_what_if_examples_run_in_order_and_the_peek_leaves_the_session_alone(
    server: Server, tmp_path: Path
) -> None:
    """The peek and fork lines succeed as written; the GET after the peek shows the session as the steps left it
    (3 steps, seq 1), the fork steps from it, and the last lines delete both."""
    lines = commands(blocks("bash", "### What if?")[0])
    outs = []
    for line in lines:
        rc, out, err = await run(["bash", "-c", localize(line, server)], tmp_path)
        assert rc == 0, (line, out, err)
        assert '"error"' not in out, (line, out)
        outs.append(out)
    peeked = json.loads(outs[next(i for i, c in enumerate(lines) if "/peek" in c)])
    assert (len(peeked["outputs"]), peeked["steps"]) == (1, 3)
    after = json.loads(outs[next(i for i, c in enumerate(lines) if c.endswith("/v1/sessions/plan"))])
    assert (after["steps"], after["seq"]) == (3, 1)
    forked = json.loads(outs[next(i for i, c in enumerate(lines) if "plan-wet/steps" in c)])
    assert forked["steps"] == 5
    assert await server.store.count() == 0


async def test_python_and_websocket_examples_run(server: Server, tmp_path: Path) -> None:
    """The Python client and WebSocket examples run as written and print forecasts."""
    code = blocks("python", "### Python") + blocks("python", "### WebSocket")
    assert len(code) == 2
    rc, out, err = await run([sys.executable, "-c", localize(code[0], server)], ROOT)
    assert rc == 0, err
    assert "day 5: temp_max forecast for the next 7 days [" in out
    assert "(3, 7)" in out
    assert "(3, 2, 7) {}" in out
    rc, out, err = await run([sys.executable, "-c", localize(code[1], server)], ROOT)
    assert rc == 0, err
    assert len(out.splitlines()) == 2


async def test_stream_command_example_writes_csv_and_plot(server: Server, tmp_path: Path) -> None:
    """The `lstm-serve stream` example writes forecasts.csv and forecasts.png."""
    (block,) = [b for b in blocks("bash", "### Python") if "lstm-serve stream" in b]
    rc, _, err = await run(
        ["bash", "-c", localize(commands(block)[0], server).replace("examples/", f"{ROOT}/examples/")], tmp_path
    )
    assert rc == 0, err
    assert "live MAE by horizon (the server's scoring" in err  # NOTE: what the server scored, printed
    assert len((tmp_path / "forecasts.csv").read_text().splitlines()) == 121
    assert (tmp_path / "forecasts.png").stat().st_size > 10_000


def test_readme_error_table_matches_the_code() -> None:
    """The README's error table is the one in service/errors.py."""
    table = README.split("| code | HTTP | gRPC | when |", 1)[1].split("\n\n", 1)[0]  # NOTE: that table alone
    rows = re.findall(r"^\| (\w+) \| (\d+) \| (\w+) \|", table, re.M)
    documented = {code: (int(http), grpc) for code, http, grpc in rows if code != "code"}
    actual = {c.value: (s.http_status, s.grpc_status) for c, s in ERROR_TABLE.items()}
    assert documented == actual


def test_defaults_are_the_ones_the_readme_promises() -> None:
    """`make serve` binds 127.0.0.1 on 8000 (REST) and 50051 (gRPC) by default."""
    s = Settings(models=SHIPPED_REPO)
    assert (s.host, s.http_port, s.grpc_port) == ("127.0.0.1", 8000, 50051)
    with pytest.raises(ValueError, match="is not a directory"):
        Settings(models=ROOT / "no-such-dir")


def test_readme_configuration_table_lists_every_setting() -> None:
    """The Deploy section's table has a row for every setting, with its variable and flag."""
    for name in Settings.model_fields:
        assert f"| `LSTM_SERVE_{name.upper()}` | `--{name.replace('_', '-')}` |" in README, name


async def test_triton_client_examples_run(server: Server, tmp_path: Path) -> None:
    """The tritonclient example streams a sequence and prints a forecast per day; the /v2 curl lines open a
    sequence that /v1 shows, and end it."""
    from tests.integration.test_kserve import TRITON_PYTHON

    (code,) = blocks("python", "### Use Triton's client")
    rc, out, err = await run([str(TRITON_PYTHON), "-c", localize(code, server)], tmp_path)
    assert rc == 0, err
    assert "'name': 'x'" in out
    assert out.count("[") >= 4  # the metadata, then three 7-day forecasts
    for line in commands(blocks("bash", "### Use Triton's client")[0]):
        rc, out, err = await run(["bash", "-c", localize(line, server)], tmp_path)
        assert rc == 0, (line, err)
        assert '"error"' not in out, (line, out)
    assert await server.store.count() == 0  # END closed the curl sequence, and the stream's sequence 42


async def test_own_model_commands_run_and_their_models_load(tmp_path: Path) -> None:
    """The "Serve your own ONNX model" commands, as written, export an LSTM and a GRU that the server loads, the
    LSTM with the names that `lstm-serve card` wrote."""
    from service.repository import ModelRepository

    lines = commands(blocks("bash", "## Serve your own ONNX model")[0])
    assert len(lines) == 4
    for line in lines:
        rc, _, err = await run(["bash", "-c", re.sub(r"(^|\s)\.venv/", rf"\1{ROOT}/.venv/", line)
                                  .replace("examples/", f"{ROOT}/examples/")], tmp_path)  # fmt: skip
        assert rc == 0, (line, err)
    repo = ModelRepository.load(tmp_path / "my-models")
    assert repo.get("my-lstm").card.features == ["precipitation", "temp_max", "temp_min", "wind"]
    assert repo.get("my-gru").card.derived
    assert repo.get("my-gru").signature.cell == 0


async def test_new_version_commands_run_as_written(make_server: Any, tmp_path: Path) -> None:
    """The "New versions without a restart" commands copy version 2 in, load it, list it and unload version 1."""
    from tests.integration.test_own_models import export

    export(tmp_path / "my-models", "my-lstm", "lstm")
    srv = await make_server(models=tmp_path / "my-models", model_poll_s=0)
    lines = commands(blocks("bash", "### New versions without a restart")[0])
    assert len(lines) == 4
    outs = []
    for line in lines:
        rc, out, err = await run(["bash", "-c", localize(line, srv)], tmp_path)
        assert rc == 0, (line, err)
        assert '"error"' not in out, (line, out)
        outs.append(out)
    assert '"loaded":["2"]' in outs[1]
    assert [m.version for m in srv.repo.versions("my-lstm")] == ["2"]
