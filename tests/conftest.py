"""Shared fixtures: real data, real models exported by our own exporter."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_REPO = ROOT / "models"
SHIPPED_MODEL = SHIPPED_REPO / "seattle-weather" / "1"


@pytest.fixture(scope="session")
def daily_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of the daily shipped model alone: for tests of what one model's server states exactly (the
    OpenAPI document's dimensions, the last model refusing to unload)."""
    repo = tmp_path_factory.mktemp("daily-repo")
    shutil.copytree(SHIPPED_MODEL, repo / "seattle-weather" / "1")
    return repo


@pytest.fixture(scope="session")
def shipped_repo() -> Path:
    """The model repository committed with the project."""
    return SHIPPED_REPO
