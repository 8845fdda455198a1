"""Shared fixtures: where the real photos live, and small helpers every test package uses."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GROCERY = REPO_ROOT.parent / "shared" / "data" / "grocery-dev"


@pytest.fixture(scope="session")
def grocery_dir() -> Path:
    """The real product photos (catalogue + in-store) from ../shared/data/grocery-dev."""
    if not (GROCERY / "labels.csv").is_file():
        pytest.fail(f"real test photos not found at {GROCERY}: the repo must sit beside shared/")
    return GROCERY
