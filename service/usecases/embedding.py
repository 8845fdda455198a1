"""Embedding with a content-hash cache in front of the model.

Marketplaces re-use the same photos across many listings, so every embedding is looked up by
(image sha256, model_id) first: an in-process LRU for hot photos, then the shared store (the database,
also used by rescans), and only the misses run through the model — in one batch.

A photo is run through a model once at a time: the vectors being computed are kept by hash until they
are done (``CachedEmbedder``'s in-flight table), and a listing that needs a photo already under way
waits for that work instead of starting it again (two listings sent at once with the same new photo).

The scoring queue starts the models early: :meth:`CachedEmbedder.prefetch` hands a request's new photos
(those in neither the LRU nor the in-flight table) to the models the moment the request is queued, on
the caller's thread and without the store, so the models need not wait for a scoring thread to become
free (bench_score, c=8: ~3 % more listings/s). The batch that later takes the listing claims what the
prefetch computed, writes it to the store and counts it as its own model run. Its store lookup still
comes first: a prefetched photo the store turns out to have, and that no batch has borrowed, is
withdrawn from the model if it has not started (``Future.cancel``), so a photo another worker process
embedded is read, not computed again, whenever the model is busy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from service.domain.model import ListingImage, Vectors
from service.domain.ports import EmbeddingCache, ImageEmbedder

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class ModelTime:
    """What one image model's batcher threads and cache report (``/metrics``)."""

    busy_s: float  # wall seconds inside model calls, summed over the model's threads
    cpu_s: float  # CPU seconds of the model's threads inside them
    prefetched: int = 0  # photos handed to it as their request was queued (CachedEmbedder.prefetch)
    withdrawn: int = 0  # of those, withdrawn unrun because the store had them


@dataclass(frozen=True, slots=True)
class EmbedOutcome:
    vectors: Vectors  # (n, d), row i belongs to images[i]
    hits: int
    misses: int


@dataclass(frozen=True, slots=True)
class _Work:
    """Where one photo's vector comes from: row ``row`` of a model call's result."""

    result: Future[Vectors] | Vectors
    row: int
    borrowed: bool  # started by someone else (a prefetch, another batch): redone here if it fails


@dataclass(slots=True)
class _Flight:
    """A photo being computed: row ``row`` of the model call ``result``."""

    result: Future[Vectors]
    row: int
    prefetched: bool  # started by a prefetch, not by a batch that needs it
    claimed: bool = False  # a batch borrowed it: its vector goes to that batch, which stores it


@dataclass(slots=True)
class PendingEmbed:
    """An embedding started by :meth:`CachedEmbedder.start`: cache hits, and the model's work on the rest."""

    images: list[ListingImage]
    found: dict[str, np.ndarray]
    work: dict[str, _Work] = field(default_factory=dict)  # the hashes the model computes, and where from
    persist: bool = True

    @property
    def todo(self) -> list[str]:
        """The hashes the model computes for this call: new vectors, written to the store."""
        return list(self.work)


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
        # Vectors being computed, by hash. An entry leaves when its call is done (the vector then in the
        # LRU), failed or cancelled.
        self._in_flight: dict[str, _Flight] = {}
        # Vectors a prefetch computed that no batch has claimed yet: the batch that takes the photo writes
        # them to the store. Bounded: a listing that never reached a worker leaves its vectors here.
        self._unstored: OrderedDict[str, np.ndarray] = OrderedDict()
        self._unstored_max = 4096
        self._in_flight_lock = threading.Lock()
        self.prefetched = 0  # photos handed to the model by prefetch
        self.withdrawn = 0  # of those, withdrawn because the store had them

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

    def prefetch(self, images: Sequence[ListingImage]) -> int:
        """Hand the photos that are neither in the LRU nor already being computed to the model, without
        waiting and without reading the store (cheap enough for an event loop); answers how many. Only
        where the model queues work itself (a :class:`~embeddings.thread_batcher.ThreadBatcher`) and the
        LRU is on: the model thread decodes the photos. Each photo is a request of its own, so that one
        that fails to decode, or that :meth:`start` withdraws, touches no other.

        What it costs: a photo the store has but this process has not seen (embedded by another worker
        process, or before a restart) is computed anyway when the model is idle; when the model is
        busy, :meth:`start` withdraws it before it runs."""
        submit = getattr(self.embedder, "submit_sources", None)
        if submit is None or self._lru.capacity <= 0:
            return 0
        started = 0
        for im in {im.sha256: im for im in images}.values():
            with self._in_flight_lock:
                # Under the lock: a run that just finished is in the LRU or unclaimed, never in neither.
                if im.sha256 in self._in_flight or im.sha256 in self._unstored or self._lru.get(im.sha256) is not None:
                    continue
                fut: Future[Vectors] = submit([im])
                self._in_flight[im.sha256] = _Flight(fut, 0, prefetched=True)
                self.prefetched += 1
            fut.add_done_callback(self._settle([im.sha256], prefetched=True))
            started += 1
        return started

    def start(self, images: Sequence[ListingImage], persist: bool = True, *,
              found: dict[str, np.ndarray] | None = None) -> PendingEmbed:
        """Look the images up and hand the misses to the model without waiting for it (when the model
        can queue work: a :class:`~embeddings.thread_batcher.ThreadBatcher`); :meth:`finish` collects.
        Starting every model before finishing any runs them side by side. ``found``: what the caller
        already looked up (:meth:`lookup` of these images), so they are not looked up again.

        A photo a prefetch computed is claimed (written to the store by this batch, and counted as its
        miss), or borrowed while still under way; another batch's run of a photo is waited for rather
        than started again. A photo in ``found`` that only a prefetch wanted is withdrawn from the model
        where the model has not started on it yet."""
        # A copy of the caller's: finish adds to it.
        found = dict(found) if found is not None else self.lookup([im.sha256 for im in images])
        work: dict[str, _Work] = {}
        new: dict[str, ListingImage] = {}
        for im in images:
            sha = im.sha256
            if sha in work or sha in new:
                continue
            withdraw: _Flight | None = None
            got: _Work | np.ndarray | None = None
            with self._in_flight_lock:
                if sha in found and not (persist and sha in self._unstored):
                    flight = self._in_flight.get(sha)
                    if flight is not None and flight.prefetched and not flight.claimed:
                        withdraw = self._in_flight.pop(sha)
                else:
                    got = self._existing(sha, persist)
            if withdraw is not None:
                self._withdraw(sha, withdraw)
            elif isinstance(got, _Work):
                found.pop(sha, None)  # (a prefetch's unclaimed vector: this batch stores it)
                work[sha] = got
            elif got is not None:  # done since the caller looked (no longer in flight)
                found[sha] = got
            elif sha not in found:
                new[sha] = im
        if new:
            self._run_new(new, work, found, persist)
        return PendingEmbed(list(images), found, work, persist)

    def _run_new(self, new: dict[str, ListingImage], work: dict[str, _Work], found: dict[str, np.ndarray],
                 persist: bool) -> None:
        """Hand ``new`` to the model (into ``work``). Where the model queues work, what a prefetch started
        or finished on one of them since :meth:`start` looked (while they were decoded) is taken instead of
        run again: the check, the submit and the table's entries are made under the lock, as a prefetch's
        are, so no photo runs twice at once."""
        pixels = {sha: im.model_pixels for sha, im in new.items()}  # decoded outside the lock
        submit = getattr(self.embedder, "submit", None)
        if submit is None:
            vectors = self.embedder.embed(list(pixels.values()))
            work.update((sha, _Work(vectors, row, borrowed=False)) for row, sha in enumerate(pixels))
            return
        with self._in_flight_lock:
            for sha in list(pixels):
                got = self._existing(sha, persist)
                if got is None:
                    continue
                if isinstance(got, _Work):
                    work[sha] = got
                else:
                    found[sha] = got
                del pixels[sha]
            if not pixels:
                return
            result: Future[Vectors] = submit(list(pixels.values()))
            for row, sha in enumerate(pixels):
                self._in_flight[sha] = _Flight(result, row, prefetched=False)
                work[sha] = _Work(result, row, borrowed=False)
        result.add_done_callback(self._settle(list(pixels), prefetched=False))

    def _existing(self, sha: str, persist: bool) -> _Work | np.ndarray | None:
        """(``_in_flight_lock`` held) What this process has of a photo the caller did not find: a
        prefetch's vector no batch claimed (taken, where the batch persists: it stores it), a run under
        way (borrowed; claimed where the batch persists, so its vector comes here, not to ``_unstored``),
        or the LRU's vector; None: nothing."""
        if persist and (done := self._unstored.pop(sha, None)) is not None:
            return _Work(done[None, :], 0, borrowed=False)
        if (flight := self._in_flight.get(sha)) is not None:
            if persist:
                flight.claimed = True
            return _Work(flight.result, flight.row, borrowed=True)
        return self._lru.get(sha)

    def _withdraw(self, sha: str, flight: _Flight) -> None:
        """Cancel a prefetch nobody else waits for (its entry already taken out of the table)."""
        if flight.result.cancel():
            with self._in_flight_lock:
                self.withdrawn += 1
            return
        with self._in_flight_lock:  # already running: back in the table until it is done
            if not flight.result.done():
                self._in_flight.setdefault(sha, flight)

    def _settle(self, shas: list[str], *, prefetched: bool) -> Callable[[Future[Vectors]], None]:
        """The done-callback of a model call for ``shas`` (their rows in order): the vectors go into the
        LRU, and a prefetch's that no batch claimed into ``_unstored`` (the next batch to take the photo
        writes them to the store), before their in-flight entries go, so a reader finds them in one or the
        other."""
        def settled(fut: Future[Vectors]) -> None:
            vectors = fut.result() if not fut.cancelled() and fut.exception() is None else None
            if vectors is not None:
                for row, sha in enumerate(shas):
                    self._lru.put(sha, vectors[row])
            with self._in_flight_lock:
                for row, sha in enumerate(shas):
                    got = self._in_flight.get(sha)
                    if got is None or got.result is not fut:
                        continue
                    del self._in_flight[sha]
                    if vectors is not None and prefetched and not got.claimed:
                        self._unstore(sha, vectors[row])
        return settled

    def _unstore(self, sha: str, vector: np.ndarray) -> None:
        """Leave ``vector`` for the next batch that takes its photo to store (``_in_flight_lock`` held).
        Bounded: past ``_unstored_max`` the oldest (an abandoned request's) stays in the LRU only."""
        self._unstored[sha] = vector
        while len(self._unstored) > self._unstored_max:
            self._unstored.popitem(last=False)

    def finish(self, pending: PendingEmbed) -> EmbedOutcome:
        return finish_together({0: (self, pending)})[0]

    def _fresh(self, pending: PendingEmbed) -> dict[str, np.ndarray]:
        """The model's vectors of the hashes it was handed (waits for them). Borrowed work that failed or
        was withdrawn (a prefetch whose photo another batch found stored) is redone here, once."""
        out: dict[str, np.ndarray] = {}
        redo: list[str] = []
        try:
            for sha, w in pending.work.items():
                if not isinstance(w.result, Future):
                    out[sha] = w.result[w.row]
                    continue
                try:
                    out[sha] = w.result.result()[w.row]
                except (CancelledError, Exception):
                    if not w.borrowed:
                        raise
                    redo.append(sha)
            if redo:
                by_sha = {im.sha256: im for im in pending.images}
                vectors = self.embedder.embed([by_sha[sha].model_pixels for sha in redo])
                out.update(zip(redo, vectors, strict=True))
        except BaseException:
            if pending.persist:
                self._keep_unstored(out)
            raise
        return out

    def _keep_unstored(self, vectors: Mapping[str, np.ndarray]) -> None:
        """Vectors this batch computed or claimed and will not store (it failed): the next batch to take
        one of their photos stores it (``_unstored``), as it would an unclaimed prefetch's. Their runs
        had put them in the LRU already, where a later batch would take them for hits and never write
        them: the store, and so other processes and stored rescans, would lack them."""
        with self._in_flight_lock:
            for sha, v in vectors.items():
                self._unstore(sha, v)

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
    new: dict[K, dict[str, np.ndarray]] = {}
    embedders = {k: emb for k, (emb, _) in work.items()}
    try:
        for k, (emb, pe) in work.items():
            new[k] = emb._fresh(pe)
        persisted = [k for k, (_, pe) in work.items() if pe.persist and new[k]]
        for store, keys in _by_store(embedders, persisted):
            vectors: dict[str, dict[str, np.ndarray]] = {}
            for k in keys:
                vectors.setdefault(embedders[k].model_id, {}).update(new[k])
            store.put_models(vectors)
    except BaseException:  # another model's run or the write failed: these are left for the next batch
        for k, got in new.items():
            if work[k][1].persist:
                embedders[k]._keep_unstored(got)
        raise
    return {k: emb._outcome(pe, new[k]) for k, (emb, pe) in work.items()}


def _by_store(embedders: Mapping[K, CachedEmbedder], keys: Sequence[K]) -> list[tuple[EmbeddingCache, list[K]]]:
    """The keys grouped by their embedder's store (those without one left out)."""
    groups: dict[int, tuple[EmbeddingCache, list[K]]] = {}
    for k in keys:
        store = embedders[k].store
        if store is not None:
            groups.setdefault(id(store), (store, []))[1].append(k)
    return list(groups.values())
