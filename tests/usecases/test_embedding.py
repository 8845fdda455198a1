"""The content-hash embedding cache in front of the models (service.usecases.embedding): several models
looked up and written together, on a real SQLite store and the real default models."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from embeddings.thread_batcher import ThreadBatcher
from service.domain.model import ListingImage
from service.domain.ports import ImageEmbedder
from service.storage import Storage
from service.usecases.embedding import CachedEmbedder, finish_together, lookup_together
from tests.conftest import SEMANTIC_MODEL
from tests.embeddings.conftest import Gated


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
    roles = {name: CachedEmbedder(models[name], storage.embeddings) for name in ("sscd_distilled", SEMANTIC_MODEL)}
    shas = [im.sha256 for im in photos]
    seen = _statements(storage)

    found = lookup_together(roles, shas)
    assert found == {"sscd_distilled": {}, SEMANTIC_MODEL: {}}
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
    assert set(lookup_together(again, shas[:2])[SEMANTIC_MODEL]) == set(shas[:2])
    assert seen == []
    assert lookup_together(again, ["1" * 64]) == {"sscd_distilled": {}, SEMANTIC_MODEL: {}}
    assert seen.count("SELECT") == 1


def test_unpersisted_work_is_not_stored(storage: Storage, photos: list[ListingImage],
                                        shared_models: tuple[Path, dict[str, Any]]) -> None:
    emb = CachedEmbedder(shared_models[1][SEMANTIC_MODEL], storage.embeddings)
    out = finish_together({SEMANTIC_MODEL: (emb, emb.start(photos, persist=False))})[SEMANTIC_MODEL]
    assert out.vectors.shape == (3, emb.embedder.dim) and out.misses == 3
    assert storage.embeddings.count() == 0
    assert emb.finish(emb.start(photos)).hits == 3  # the LRU kept them all the same


class _Broken:
    """A model whose calls fail (a model file gone bad, an out-of-memory in its runtime)."""

    def __init__(self, inner: ImageEmbedder) -> None:
        self.name, self.model_id, self.dim, self.provider = inner.name, inner.model_id, inner.dim, inner.provider

    def embed(self, images: object) -> Any:
        raise RuntimeError("the model failed")


def test_vectors_of_a_batch_that_failed_are_stored_by_the_next(storage: Storage, photos: list[ListingImage],
                                                               shared_models: tuple[Path, dict[str, Any]]) -> None:
    """One model's run failed, so the batch stored nothing: the other model's vectors (in its LRU since
    its run, on the model's thread) go to the store with the next batch that has their photos, not taken
    for hits for ever."""
    models = shared_models[1]
    batchers = [ThreadBatcher(models["sscd_distilled"], max_wait_ms=0),
                ThreadBatcher(_Broken(models[SEMANTIC_MODEL]), max_wait_ms=0),  # type: ignore[arg-type]
                ThreadBatcher(models[SEMANTIC_MODEL], max_wait_ms=0)]
    copy, broken, semantic = (CachedEmbedder(b, storage.embeddings) for b in batchers)
    try:
        with pytest.raises(RuntimeError, match="the model failed"):
            finish_together({"copy": (copy, copy.start(photos)), "semantic": (broken, broken.start(photos))})
        assert storage.embeddings.count() == 0

        found = lookup_together({"copy": copy, "semantic": semantic}, [im.sha256 for im in photos])
        done = finish_together({"copy": (copy, copy.start(photos, found=found["copy"])),
                                "semantic": (semantic, semantic.start(photos, found=found["semantic"]))})
        assert (done["copy"].hits, done["copy"].misses) == (0, 3)  # this batch stores them: its misses
        assert storage.embeddings.count(models["sscd_distilled"].model_id) == 3
        assert storage.embeddings.count(models[SEMANTIC_MODEL].model_id) == 3
        assert copy.finish(copy.start(photos)).hits == 3  # and nothing is left for a third batch to write
    finally:
        for b in batchers:
            b.close()


@pytest.fixture
def effnet(shared_models: tuple[Path, dict[str, Any]]) -> ImageEmbedder:
    model: ImageEmbedder = shared_models[1][SEMANTIC_MODEL]
    return model


@dataclass
class Held:
    """A cached embedder whose model is held busy until the test opens ``gated.gate``."""

    gated: Gated
    batcher: ThreadBatcher
    emb: CachedEmbedder


@pytest.fixture
def held(storage: Storage, effnet: ImageEmbedder) -> Iterator[Held]:
    gated = Gated(effnet)
    batcher = ThreadBatcher(gated, max_wait_ms=0)
    yield Held(gated, batcher, CachedEmbedder(batcher, storage.embeddings))
    gated.gate.set()
    batcher.close()


def _lazy(photos: list[ListingImage]) -> list[ListingImage]:
    """The photos as intake hands them over: decoded on first use."""
    return [ListingImage(im.sha256, decode=partial(getattr, im, "pixels")) for im in photos]


def test_a_prefetch_done_before_its_batch_looks_is_claimed_stored_and_counted_once(
        storage: Storage, photos: list[ListingImage], effnet: ImageEmbedder) -> None:
    batcher = ThreadBatcher(effnet, max_wait_ms=0)
    emb = CachedEmbedder(batcher, storage.embeddings)
    try:
        lazy = _lazy(photos)
        assert emb.prefetch(lazy) == 3
        assert emb.prefetch(lazy) == 0  # under way (or done): not started again
        deadline = time.monotonic() + 30
        while batcher.images_run < 3:  # the model is done before the worker looks the batch up
            assert time.monotonic() < deadline
            time.sleep(0.01)
        shas = [im.sha256 for im in lazy]
        found = lookup_together({0: emb}, shas)[0]
        assert set(found) == set(shas)  # the LRU has them...
        out = emb.finish(emb.start(lazy, found=found))
        again = emb.finish(emb.start(lazy, found=lookup_together({0: emb}, shas)[0]))
    finally:
        batcher.close()
    np.testing.assert_allclose(out.vectors, effnet.embed([im.pixels for im in photos]), atol=1e-5)
    # ... but the batch that took them counts them as its misses and writes them to the store, once.
    assert (out.hits, out.misses) == (0, 3) and (again.hits, again.misses) == (3, 0)
    assert storage.embeddings.count(effnet.model_id) == 3
    assert batcher.images_run == 3 and emb.prefetched == 3 and emb.withdrawn == 0


def test_a_prefetch_under_way_is_borrowed_by_its_batch_and_stored(
        held: Held, storage: Storage, photos: list[ListingImage], effnet: ImageEmbedder) -> None:
    emb = held.emb
    assert emb.prefetch([photos[2]]) == 1  # keeps the model busy
    assert held.gated.entered.wait(5)
    assert emb.prefetch(photos[:2]) == 2
    pending = emb.start(photos[:2], found={})
    held.gated.gate.set()
    out = emb.finish(pending)
    later = emb.finish(emb.start([photos[2]], found={}))  # the first prefetch, claimed after it was done
    assert (out.hits, out.misses) == (0, 2) and (later.hits, later.misses) == (0, 1)
    assert held.batcher.images_run == 3 and storage.embeddings.count(effnet.model_id) == 3
    np.testing.assert_allclose(out.vectors, effnet.embed([im.pixels for im in photos[:2]]), atol=1e-5)


def test_two_batches_with_the_same_new_photo_share_one_run(held: Held, photos: list[ListingImage]) -> None:
    emb = held.emb
    busy = emb.start([photos[2]], found={})
    assert held.gated.entered.wait(5)
    first = emb.start([photos[0]], found={})
    second = emb.start([photos[0], photos[1]], found={})  # photos[0] is queued: borrowed
    held.gated.gate.set()
    a, b = emb.finish(first), emb.finish(second)
    emb.finish(busy)
    assert a.vectors[0].tobytes() == b.vectors[0].tobytes()
    assert held.batcher.images_run == 3  # photos[2], then [0] and [1] once each


def test_a_photo_prefetched_while_its_batch_decodes_it_runs_once(
        held: Held, storage: Storage, photos: list[ListingImage], effnet: ImageEmbedder) -> None:
    """A request with the same new photo is queued (and prefetched) while a batch decodes that photo for
    the model: the batch takes the prefetch's run rather than submitting a second one."""
    emb = held.emb
    busy = emb.start([photos[2]], found={})
    assert held.gated.entered.wait(5)
    queued = _lazy([photos[0]])[0]

    def decode() -> Any:
        assert emb.prefetch([queued]) == 1  # not in flight yet: the prefetch starts it
        return photos[0].pixels

    pending = emb.start([ListingImage(photos[0].sha256, decode=decode)], found={})
    held.gated.gate.set()
    out = emb.finish(pending)
    emb.finish(busy)
    assert held.batcher.images_run == 2  # photos[2], then photos[0] once
    assert (out.hits, out.misses) == (0, 1) and storage.embeddings.count(effnet.model_id) == 2
    np.testing.assert_allclose(out.vectors, effnet.embed([photos[0].pixels]), atol=1e-5)


def test_a_prefetched_photo_the_store_has_is_withdrawn_from_a_busy_model(
        held: Held, storage: Storage, photos: list[ListingImage], effnet: ImageEmbedder) -> None:
    # Another worker process embedded and stored the first two photos.
    other = CachedEmbedder(effnet, storage.embeddings)
    other.finish(other.start(photos[:2]))
    emb = held.emb
    assert emb.prefetch([photos[2]]) == 1  # keeps the model busy
    assert held.gated.entered.wait(5)
    lazy = _lazy(photos[:2])
    assert emb.prefetch(lazy) == 2
    found = lookup_together({0: emb}, [im.sha256 for im in lazy])[0]
    assert set(found) == {im.sha256 for im in lazy}
    pending = emb.start(lazy, found=found)
    held.gated.gate.set()
    out = emb.finish(pending)
    emb.finish(emb.start([photos[2]], found={}))  # waits for the photo that kept the model busy
    assert (out.hits, out.misses) == (2, 0) and emb.withdrawn == 2
    assert held.batcher.images_run == 1  # only the photo the store did not have
    assert not any(im.decoded for im in lazy)  # withdrawn before any thread decoded them
    np.testing.assert_allclose(out.vectors, effnet.embed([im.pixels for im in photos[:2]]), atol=1e-5)


def test_borrowed_work_that_failed_is_redone_by_its_borrower(
        held: Held, photos: list[ListingImage], effnet: ImageEmbedder) -> None:
    """A prefetch can fail where the borrower's own attempt would not (a decode that fails once, in the
    model thread): the batch that borrowed it computes the photo itself."""
    attempts = 0

    def flaky() -> np.ndarray:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OSError("image file is truncated")
        return photos[0].pixels

    photo = ListingImage(photos[0].sha256, decode=flaky)
    emb = held.emb
    busy = emb.start([photos[2]], found={})
    assert held.gated.entered.wait(5)
    assert emb.prefetch([photo]) == 1
    borrower = emb.start([photo], found={})  # this batch's lookup missed: it borrows the prefetch
    held.gated.gate.set()
    out = emb.finish(borrower)
    emb.finish(busy)
    np.testing.assert_allclose(out.vectors, effnet.embed([photos[0].pixels]), atol=1e-5)
    assert attempts == 2 and held.batcher.images_run == 2  # photos[2], and photos[0] redone by its borrower


def test_a_batch_never_withdraws_another_batchs_own_run(
        held: Held, photos: list[ListingImage], effnet: ImageEmbedder) -> None:
    """Only a prefetch nobody has borrowed is withdrawn: a batch's own model call, or a prefetch another
    batch waits for, runs even when a later batch finds the photo stored; two such batches withdraw a
    prefetch once."""
    emb = held.emb
    busy = emb.start([photos[2]], found={})
    assert held.gated.entered.wait(5)
    own = emb.start([photos[0]], found={})  # this batch's own run of photos[0], queued
    stored = {im.sha256: np.zeros(effnet.dim, np.float32) for im in photos}
    emb.start([photos[0]], found=stored)  # a later batch that found it stored
    assert emb.prefetch([photos[1]]) == 1
    emb.start([photos[1]], found=stored)
    emb.start([photos[1]], found=stored)
    held.gated.gate.set()
    out = emb.finish(own)
    emb.finish(busy)
    np.testing.assert_allclose(out.vectors, effnet.embed([photos[0].pixels]), atol=1e-5)
    assert emb.withdrawn == 1 and held.batcher.images_run == 2  # photos[2] and photos[0]; not photos[1]
