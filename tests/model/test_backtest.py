"""The rolling-origin backtest: folds test on consecutive blocks at the end of the data, each trained only on
what comes before it; the last fold is the normal run; the command writes its table, JSON and plot."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

from model.backtest import backtest
from model.config import TrainConfig
from tests.conftest import ROOT
from tests.model.conftest import TINY, tiny_checkpoint


def test_folds_are_consecutive_blocks_trained_on_the_past_and_the_last_is_the_normal_run() -> None:
    result = backtest(TrainConfig(**TINY), folds=3, progress=False, log=lambda *_: None)
    folds = result["folds"]
    assert [f["fold"] for f in folds] == [1, 2, 3]
    ends = [f["rows"] for f in folds]
    assert ends[-1] == 1461  # NOTE: the whole Seattle series; earlier folds see only the rows before their end
    assert ends[0] < ends[1] < ends[2]
    assert ends[2] - ends[1] == ends[1] - ends[0]
    for a, b in itertools.pairwise(folds):
        assert a["test_period"][1] < b["test_period"][0]  # NOTE: test parts do not overlap, in time order
    normal = tiny_checkpoint(name="tiny")["metrics"]["test"]
    for m in ("lstm", "persistence", "ridge"):
        assert folds[-1][m] == normal[m]
    s = result["summary"]
    assert len(s["lstm"]["mae_by_step_mean"]) == TINY.get("horizon", 7)
    assert s["ridge"]["mae_h1"]["min"] <= s["ridge"]["mae_h1"]["mean"] <= s["ridge"]["mae_h1"]["max"]


def test_backtest_command_prints_the_table_and_writes_json_and_a_plot(tmp_path: Path) -> None:
    flags = ["--hidden-size", "8", "--window", "16", "--context", "16", "--epochs", "2", "--min-epochs", "1",
             "--patience", "2", "--threads", "1", "--no-progress"]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "backtest", "--folds", "2", "--out", str(tmp_path), *flags],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "| mean |" in r.stdout
    assert "LSTM beats ridge in" in r.stdout
    data = json.loads((tmp_path / "backtest.json").read_text())
    assert len(data["folds"]) == 2
    assert (tmp_path / "backtest.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "service.cli", "backtest", "--folds", "9", *flags],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert bad.returncode == 1
    assert "use fewer --folds" in bad.stderr


def test_seed_spread_trains_one_run_per_seed_and_plots_every_member(tmp_path: Path) -> None:
    """Two top-level seeds of a tiny 2-member recipe: two runs whose members are seeds S and S + 1, the summary
    spans exactly the recorded numbers, and the table and plot are written."""
    from model.seeds import plot, seed_spread, table

    cfg = TrainConfig(**{**TINY, "ensemble": 2})
    result = seed_spread(cfg, [3, 7], progress=False, log=lambda *_: None)
    assert [r["seed"] for r in result["runs"]] == [3, 7]
    assert [r["member_seeds"] for r in result["runs"]] == [[3, 4], [7, 8]]
    assert set(result["baselines"]) == {"persistence", "ridge"}
    h1 = [r["lstm"]["mae_h1"] for r in result["runs"]]
    assert (result["summary"]["lstm"]["mae_h1"]["min"], result["summary"]["lstm"]["mae_h1"]["max"]) == (
        min(h1),
        max(h1),
    )
    from model.seeds import distinct_members

    assert len(distinct_members(result["runs"])) == 4  # NOTE: seeds 3, 4, 7, 8
    plot(result, tmp_path / "seeds.png", "temp_max")
    assert (tmp_path / "seeds.png").stat().st_size > 10_000
    assert table(result).count("\n") == 2 + 2 + 2
