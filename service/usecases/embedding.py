"""Embedding with a content-hash cache in front of the model.

Marketplaces re-use the same photos across many listings, so every embedding is looked up by
(image sha256, model_id) first: an in-process LRU for hot photos, then the shared store (the database,
also used by rescans), and only the misses run through the model — in one batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from service.domain.model import ListingImage, Vectors
from service.domain.ports import EmbeddingCache, ImageEmbedder


@dataclass(frozen=True, slots=True)
class EmbedOutcome:
    vectors: Vectors  # (n, d), row i belongs to images[i]
    hits: int
    misses: int


@dataclass(slots=True)
class PendingEmbed:
    """An embedding started by :meth:`CachedEmbedder.start`: cache hits, and the model's work on the rest."""

    images: list[ListingImage]
    found: dict[str, np.ndarray]
    todo: list[str]  # hashes handed to the model, in the order of its rows
    work: Future[Vectors] | Vectors | None
    persist: bool


class _Lru:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: str, value: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)


class CachedEmbedder:
    """An :class:`ImageEmbedder` with the two-level content-hash cache in front of it."""

    def __init__(self, embedder: ImageEmbedder, store: EmbeddingCache | None, lru_size: int = 20_000) -> None:
        self.embedder = embedder
        self.store = store
        self._lru = _Lru(lru_size)

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    def lookup(self, sha256s: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors for the given hashes (LRU, then the store); misses are simply absent."""
        found: dict[str, np.ndarray] = {}
        missing: list[str] = []
        for sha in dict.fromkeys(sha256s):
            v = self._lru.get(sha)
            if v is None:
                missing.append(sha)
            else:
                found[sha] = v
        if missing and self.store is not None:
            stored = self.store.get_many(self.model_id, missing)
            for sha, v in stored.items():
                self._lru.put(sha, v)
            found.update(stored)
        return found

    # A photo's size, stored beside its embeddings (as a 2-d "vector" under a model id of its own), lets
    # a stored rescan recompute the crop grid of a photo whose pixels it does not have.
    GEOMETRY_MODEL = "geometry@1"

    def remember_geometry(self, sha256: str, width: int, height: int) -> None:
        if self.store is not None:
            self.store.put_many(self.GEOMETRY_MODEL, {sha256: np.array([width, height], np.float32)})

    def geometry(self, sha256s: Sequence[str]) -> dict[str, tuple[int, int]]:
        if self.store is None:
            return {}
        got = self.store.get_many(self.GEOMETRY_MODEL, sha256s)
        return {k: (int(v[0]), int(v[1])) for k, v in got.items()}

    def embed(self, images: Sequence[ListingImage], persist: bool = True) -> EmbedOutcome:
        return self.finish(self.start(images, persist))

    def start(self, images: Sequence[ListingImage], persist: bool = True, *,
              found: dict[str, np.ndarray] | None = None) -> PendingEmbed:
        """Look the images up and hand the misses to the model without waiting for it (when the model
        can queue work: a :class:`~embeddings.thread_batcher.ThreadBatcher`); :meth:`finish` collects.
        Starting every model before finishing any runs them side by side. ``found``: what the caller
        already looked up (:meth:`lookup` of these images), so they are not looked up again."""
        # A copy of the caller's: finish adds to it.
        found = dict(found) if found is not None else self.lookup([im.sha256 for im in images])
        todo: dict[str, ListingImage] = {}
        for im in images:
            if im.sha256 not in found and im.sha256 not in todo:
                todo[im.sha256] = im
        work: Future[Vectors] | Vectors | None = None
        if todo:
            pixels = [im.pixels for im in todo.values()]
            submit = getattr(self.embedder, "submit", None)
            work = submit(pixels) if submit is not None else self.embedder.embed(pixels)
        return PendingEmbed(list(images), found, list(todo), work, persist)

    def finish(self, pending: PendingEmbed) -> EmbedOutcome:
        images, found = pending.images, pending.found
        if not images:
            return EmbedOutcome(np.zeros((0, self.embedder.dim), np.float32), 0, 0)
        if pending.todo:
            assert pending.work is not None
            fresh = pending.work.result() if isinstance(pending.work, Future) else pending.work
            new = {sha: fresh[i] for i, sha in enumerate(pending.todo)}
            if pending.persist and self.store is not None:
                self.store.put_many(self.model_id, new)
            for sha, v in new.items():
                self._lru.put(sha, v)
            found.update(new)
        vectors = np.stack([found[im.sha256] for im in images]).astype(np.float32, copy=False)
        return EmbedOutcome(vectors, hits=len(images) - len(pending.todo), misses=len(pending.todo))
