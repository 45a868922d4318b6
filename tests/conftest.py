"""Shared fixtures: real data, real models exported by our own exporter."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_REPO = ROOT / "models"
SHIPPED_MODEL = SHIPPED_REPO / "seattle-weather" / "1"


@pytest.fixture(scope="session")
def shipped_repo() -> Path:
    """The model repository committed with the project."""
    return SHIPPED_REPO
