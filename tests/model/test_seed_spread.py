"""Seed robustness on a reduced budget: the default recipe (a 5-member ensemble) trained from three other
top-level seeds, at most 12 epochs per member (where every member's best epoch falls on this data), stays
within the issue's bounds on the final test part. The full check over five seeds is the README's command."""

from __future__ import annotations

import pytest

from model.config import TrainConfig
from model.train import train


@pytest.mark.slow
def test_three_other_seeds_give_models_within_the_bounds() -> None:
    got = []
    for seed in (1, 2, 3):
        ckpt = train(TrainConfig(seed=seed, max_epochs=12), progress=False, log=lambda *_: None)
        lstm = ckpt["metrics"]["test"]["lstm"]
        got.append((lstm["mae_h1"], lstm["mae_mean"]))
    assert all(h1 <= 2.20 and mean <= 2.95 for h1, mean in got), got
    assert max(h1 for h1, _ in got) - min(h1 for h1, _ in got) < 0.1, got  # NOTE: single models spread 0.4
