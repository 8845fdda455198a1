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


# --------------------------------------------------------------------------------------------------
# The configured models, exported once per test session and shared by every container a test builds.

import io  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from service.settings import ModelSettings, Settings  # noqa: E402

# The default lookalike model's name: the key of its embedder in ``shared_models`` and of its indexes.
SEMANTIC_MODEL = ModelSettings().semantic_model


@pytest.fixture(scope="session")
def shared_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """(models_dir, embedders by name) for the default model roles, exported once per session."""
    from service.container import build_embedders

    root = tmp_path_factory.mktemp("models-home")
    settings = Settings(data_dir=root)
    embedders, _ = build_embedders(settings)
    return settings.models_dir, embedders


@pytest.fixture(scope="session")
def rescan_world(tmp_path_factory: pytest.TempPathFactory, grocery_dir: Path,
                 shared_models: tuple[Path, dict[str, Any]]) -> Any:
    """The small real world of the rescan and batch-scoring tests (:mod:`tests.usecases.rescan_world`),
    built once per session."""
    from tests.usecases.rescan_world import world

    return world(tmp_path_factory.mktemp("rescan-world"), grocery_dir, shared_models)


@pytest.fixture
def make_settings(tmp_path: Path, shared_models: tuple[Path, dict[str, Any]]) -> Iterator[Any]:
    """Settings on a fresh data dir whose models folder is the shared export (copied, not re-exported)."""

    def make(**overrides: Any) -> Settings:
        data = tmp_path / f"data{len(list(tmp_path.glob('data*')))}"
        data.mkdir()
        shutil.copytree(shared_models[0], data / "models", symlinks=True)
        return Settings(data_dir=data, **overrides)

    yield make


def jpeg_bytes(pixels: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()
