"""The content-hash embedding cache in front of the models (service.usecases.embedding): several models
looked up and written together, on a real SQLite store and the real default models."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from service.domain.model import ListingImage
from service.storage import Storage
from service.usecases.embedding import CachedEmbedder, finish_together, lookup_together


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    st = Storage.open(f"sqlite:///{tmp_path / 'db.sqlite3'}", tmp_path / "blobs")
    yield st
    st.close()


@pytest.fixture
def photos(grocery_dir: Path) -> list[ListingImage]:
    out = []
    for p in sorted((grocery_dir / "catalogue").glob("*.jpg"))[:3]:
        with Image.open(p) as im:
            pixels = np.asarray(im.convert("RGB"))
        out.append(ListingImage(hashlib.sha256(p.read_bytes()).hexdigest(), pixels))
    return out


def _statements(storage: Storage) -> list[str]:
    """Every SQL statement the store's engine runs from now on (a real listener on the real engine)."""
    seen: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement.split()[0].upper())

    sa.event.listen(storage.db.engine, "before_cursor_execute", note)
    return seen


def test_models_are_looked_up_and_stored_together(storage: Storage, photos: list[ListingImage],
                                                   shared_models: tuple[Path, dict[str, Any]]) -> None:
    models = shared_models[1]
    roles = {name: CachedEmbedder(models[name], storage.embeddings) for name in ("sscd_distilled", "effnet")}
    shas = [im.sha256 for im in photos]
    seen = _statements(storage)

    found = lookup_together(roles, shas)
    assert found == {"sscd_distilled": {}, "effnet": {}}
    assert seen.count("SELECT") == 1  # one read for both models (a read each before)

    pending = {name: (emb, emb.start(photos, found=found[name])) for name, emb in roles.items()}
    done = finish_together(pending)
    for name, out in done.items():
        assert (out.hits, out.misses) == (0, 3)
        np.testing.assert_allclose(out.vectors, models[name].embed([im.pixels for im in photos]), atol=1e-5)
        assert storage.embeddings.count(models[name].model_id) == 3
    assert seen.count("INSERT") == 1  # both models' vectors in one statement, one transaction

    # Fresh embedders (another worker, a rescan): the store answers both in one read, bit for bit...
    again = {name: CachedEmbedder(models[name], storage.embeddings) for name in roles}
    del seen[:]
    stored = lookup_together(again, [*shas, "0" * 64])
    assert seen.count("SELECT") == 1
    for name, out in done.items():
        assert list(stored[name]) == shas
        assert np.stack([stored[name][s] for s in shas]).tobytes() == out.vectors.tobytes()
    # ... and then their in-process LRU, without a statement; a miss is asked of the store alone.
    del seen[:]
    assert set(lookup_together(again, shas[:2])["effnet"]) == set(shas[:2])
    assert seen == []
    assert lookup_together(again, ["1" * 64]) == {"sscd_distilled": {}, "effnet": {}}
    assert seen.count("SELECT") == 1


def test_unpersisted_work_is_not_stored(storage: Storage, photos: list[ListingImage],
                                        shared_models: tuple[Path, dict[str, Any]]) -> None:
    emb = CachedEmbedder(shared_models[1]["effnet"], storage.embeddings)
    out = finish_together({"effnet": (emb, emb.start(photos, persist=False))})["effnet"]
    assert out.vectors.shape == (3, emb.embedder.dim) and out.misses == 3
    assert storage.embeddings.count() == 0
    assert emb.finish(emb.start(photos)).hits == 3  # the LRU kept them all the same
