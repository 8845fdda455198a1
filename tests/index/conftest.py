"""Fixtures of the index tests: synthetic clustered embeddings shared per session (they are read-only)."""

from __future__ import annotations

import pytest

from service.settings import IndexSettings
from tests.index.oracle import Embeddings, mixture

DIM = 64


@pytest.fixture(scope="session")
def clustered() -> Embeddings:
    """4,000 catalog vectors in 40 clusters and 200 queries from the same mixture, 64-d."""
    return mixture(4000, DIM, clusters=40, queries=200, seed=7)


@pytest.fixture
def approx_settings() -> IndexSettings:
    """Settings under which a few thousand vectors already get an approximate index."""
    return IndexSettings(exact_max=1000, approximate="hnsw", hnsw_m=16, hnsw_ef_construction=80, hnsw_ef_search=64)
