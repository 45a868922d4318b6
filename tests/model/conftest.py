"""Fixtures for the training tests: tiny, fast training runs on the real default data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from model.config import TrainConfig
from model.export import export_checkpoint
from model.train import train

TINY = {
    "hidden_size": 8,
    "num_layers": 2,
    "window": 16,
    "context": 16,
    "warmup": 2,
    "max_epochs": 2,
    "min_epochs": 1,
    "patience": 2,
    "require_beats_persistence": False,
    "threads": 1,
    # NOTE: one plain member, as the tiny tests were written for; the variants set their own
    "ensemble": 1,
    "residual": False,
    "highway": False,
    "loss": "huber",
    "dropout": 0.1,
}


def tiny_checkpoint(**overrides: Any) -> dict[str, Any]:
    """Train a tiny model for two epochs (about a second) and return its checkpoint."""
    return train(TrainConfig(**{**TINY, **overrides}), progress=False, log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_ckpt() -> dict[str, Any]:
    return tiny_checkpoint(name="tiny")


@pytest.fixture(scope="session")
def tiny_residual_ckpt() -> dict[str, Any]:
    return tiny_checkpoint(name="tiny-residual", residual=True, num_layers=1)


@pytest.fixture(scope="session")
def tiny_highway_ckpt() -> dict[str, Any]:
    return tiny_checkpoint(name="tiny-highway", residual=True, highway=True)


@pytest.fixture(scope="session")
def tiny_ar_highway_ckpt() -> dict[str, Any]:
    """A highway over the last 4 steps: its delay line rides in the state (layer 0's h after the LSTM's units)."""
    return tiny_checkpoint(name="tiny-ar-highway", residual=True, highway=True, highway_lags=4)


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: dict[str, Any]) -> Path:
    """A model repository holding the tiny model, exported by our exporter."""
    repo = tmp_path_factory.mktemp("repo")
    export_checkpoint(tiny_ckpt, repo, report=False)
    return repo
