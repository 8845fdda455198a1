"""Fixtures of the use-case tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.container import Container, build_container
from tests.usecases.rescan_world import World, fresh_data_dir, settings


@pytest.fixture
def container(rescan_world: World, tmp_path: Path) -> Iterator[Container]:
    """A container on a data dir of its own holding the seeded catalog (models shared)."""
    c = build_container(settings(fresh_data_dir(rescan_world, tmp_path / "data")),
                        embedders=rescan_world.embedders)
    yield c
    c.close()
