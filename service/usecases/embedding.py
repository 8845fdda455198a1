"""Embedding with a content-hash cache in front of the model.

Marketplaces re-use the same photos across many listings, so every embedding is looked up by
(image sha256, model_id) first: an in-process LRU for hot photos, then the shared store (the database,
also used by rescans), and only the misses run through the model — in one batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from service.domain.model import ListingImage, Vectors
from service.domain.ports import EmbeddingCache, ImageEmbedder

K = TypeVar("K")


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
        return lookup_together({0: self}, sha256s)[0]

    def _from_lru(self, sha256s: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
        """The hashes' vectors in the in-process LRU, and the hashes it does not have."""
        found: dict[str, np.ndarray] = {}
        missing: list[str] = []
        for sha in dict.fromkeys(sha256s):
            v = self._lru.get(sha)
            if v is None:
                missing.append(sha)
            else:
                found[sha] = v
        return found, missing

    def _remember(self, vectors: dict[str, np.ndarray]) -> None:
        for sha, v in vectors.items():
            self._lru.put(sha, v)

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
        return finish_together({0: (self, pending)})[0]

    def _fresh(self, pending: PendingEmbed) -> dict[str, np.ndarray]:
        """The model's vectors of the hashes it was handed (waits for them)."""
        if not pending.todo:
            return {}
        assert pending.work is not None
        fresh = pending.work.result() if isinstance(pending.work, Future) else pending.work
        return {sha: fresh[i] for i, sha in enumerate(pending.todo)}

    def _outcome(self, pending: PendingEmbed, new: dict[str, np.ndarray]) -> EmbedOutcome:
        images, found = pending.images, pending.found
        if not images:
            return EmbedOutcome(np.zeros((0, self.embedder.dim), np.float32), 0, 0)
        self._remember(new)
        found.update(new)
        vectors = np.stack([found[im.sha256] for im in images]).astype(np.float32, copy=False)
        return EmbedOutcome(vectors, hits=len(images) - len(pending.todo), misses=len(pending.todo))


def lookup_together(embedders: Mapping[K, CachedEmbedder], sha256s: Sequence[str]) -> dict[K, dict[str, np.ndarray]]:
    """:meth:`CachedEmbedder.lookup` of the same hashes in several embedders, with one read of the store
    for all of them (the embedders of a service share one): the scoring queue looks up every model's
    vectors of a batch, and each read was a statement and a transaction of its own."""
    out: dict[K, dict[str, np.ndarray]] = {}
    missing: dict[K, list[str]] = {}
    for key, emb in embedders.items():
        out[key], missing[key] = emb._from_lru(sha256s)
    for store, keys in _by_store(embedders, [k for k in missing if missing[k]]):
        wanted: dict[str, set[str]] = {}
        for k in keys:
            wanted.setdefault(embedders[k].model_id, set()).update(missing[k])
        stored = store.get_models(wanted)
        for k in keys:
            of_model = stored.get(embedders[k].model_id, {})
            got = {sha: of_model[sha] for sha in missing[k] if sha in of_model}
            embedders[k]._remember(got)
            out[k].update(got)
    return out


def finish_together(work: Mapping[K, tuple[CachedEmbedder, PendingEmbed]]) -> dict[K, EmbedOutcome]:
    """:meth:`CachedEmbedder.finish` of several embedders' pending work, the new vectors written to the
    store in one transaction (rather than one per model)."""
    new = {k: emb._fresh(pe) for k, (emb, pe) in work.items()}
    embedders = {k: emb for k, (emb, _) in work.items()}
    persisted = [k for k, (_, pe) in work.items() if pe.persist and new[k]]
    for store, keys in _by_store(embedders, persisted):
        vectors: dict[str, dict[str, np.ndarray]] = {}
        for k in keys:
            vectors.setdefault(embedders[k].model_id, {}).update(new[k])
        store.put_models(vectors)
    return {k: emb._outcome(pe, new[k]) for k, (emb, pe) in work.items()}


def _by_store(embedders: Mapping[K, CachedEmbedder], keys: Sequence[K]) -> list[tuple[EmbeddingCache, list[K]]]:
    """The keys grouped by their embedder's store (those without one left out)."""
    groups: dict[int, tuple[EmbeddingCache, list[K]]] = {}
    for k in keys:
        store = embedders[k].store
        if store is not None:
            groups.setdefault(id(store), (store, []))[1].append(k)
    return list(groups.values())
