"""The keypoints signal's use case: describe photos (through the keypoint cache), verify them against the
catalog's reference images, and keep the reference side of the keypoint index in step with the catalog.

Scoring calls :meth:`KeypointMatcher.verify` for the listings the cascade sends on
(``ScorerOptions.keypoints``); the catalog use case calls :meth:`add_references`, :meth:`remove_references`
and :meth:`reconcile`. Features are keyed by content hash like embeddings, so a photo is described once,
and a ``--stored`` rescan verifies the photos described before without their pixels.

A photo's verification is remembered twice: in an in-process LRU, and in the keypoint cache under a
fingerprint of the indexed references (:attr:`KeypointMatcher.references_id`), so a process that starts
(a ``--stored`` rescan, a restarted server) reuses what an earlier one verified until the references
change. Verifying costs ~25 ms a photo (the descriptor search, RANSAC); reading it back well under 1 ms.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

from service.domain.model import KeypointSet, ListingImage, Match, RGBImage, SignalName
from service.domain.ports import (
    CatalogReader,
    KeypointCache,
    KeypointExtractor,
    KeypointIndex,
    VerifiedReference,
)
from service.domain.visual import keypoint_similarity
from service.usecases.load_once import LoadOnce

log = logging.getLogger("counterlens.keypoints")


class KeypointMatcher:
    def __init__(self, extractor: KeypointExtractor, cache: KeypointCache, index: KeypointIndex,
                 catalog: CatalogReader, *, min_inliers: int = 8, max_matches: int = 5,
                 lru_size: int = 50_000) -> None:
        if min_inliers < 3:
            raise ValueError(f"min_inliers must be >= 3, got {min_inliers}")
        self.extractor = extractor
        self.cache = cache
        self.index = index
        self.catalog = catalog
        self.min_inliers = min_inliers
        self.max_matches = max_matches
        # The reference side is filled by ``reconcile`` (the catalog's start-up reconciliation) or, in a
        # process that skips it (a Ray actor, a CLI command), by ``loading.loader`` on first use, once, locked.
        self.loading = LoadOnce()
        self.lru_size = lru_size
        self._verified: OrderedDict[str, list[VerifiedReference]] = OrderedDict()
        self._generation = 0  # bumped whenever the reference set changes
        self._indexed: dict[int, str] = {}  # the references in the index: image id -> sha256
        self._references_id: str | None = self._fingerprint()
        self._lru_lock = threading.Lock()

    @property
    def extractor_id(self) -> str:
        return self.extractor.extractor_id

    @property
    def references_id(self) -> str | None:
        """A fingerprint of what a verification depends on: the indexed references (ids and contents),
        the index's parameters and ``min_inliers``. Equal in every process that indexed the same catalog.
        None while the index is being changed (and after a change failed half-way): verifications are
        then neither read from nor written to the cache."""
        return self._references_id

    def _fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.index.params_id}|min_inliers={self.min_inliers}".encode())
        for image_id, sha in sorted(self._indexed.items()):
            h.update(f"|{image_id}:{sha}".encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ listing photos

    def verify(self, images: Sequence[ListingImage] | None,
               hashes: Sequence[str]) -> tuple[list[Match], int]:
        """Keypoint matches of a listing's photos, one per reference (its best photo), most inliers first,
        and how many photos could not be verified (no pixels and no stored features: a stored rescan of
        a photo the cascade never sent on).

        A photo's verification is remembered by its hash until the reference set changes (the LRU, then
        the keypoint cache), so a photo seen again costs neither its features nor a search; otherwise its
        features come from the cache, else from the pixels (decoded now if need be), and the features and
        the verification are stored."""
        self.loading.ensure()
        hits: dict[int, Sequence[VerifiedReference]] = {}
        todo: dict[str, list[int]] = {}
        with self._lru_lock:
            generation, references = self._generation, self._references_id
            for i, sha in enumerate(hashes):
                remembered = self._verified.get(sha)
                if remembered is not None:
                    self._verified.move_to_end(sha)
                    hits[i] = remembered
                else:
                    todo.setdefault(sha, []).append(i)
        missing = 0
        if todo:
            # One read for what is stored (verifications, else features) and one write for what is new.
            stored, features = self.cache.recall(self.extractor_id, references, list(todo))
            for sha, verified in stored.items():
                self._remember(sha, verified, generation)
                for i in todo.pop(sha):
                    hits[i] = verified
            described: dict[str, KeypointSet] = {}
            if images is not None:
                for sha, rows in todo.items():
                    if sha not in features:
                        described[sha] = features[sha] = self.extractor.extract(images[rows[0]].pixels)
            fresh: dict[str, list[VerifiedReference]] = {}
            for sha, rows in todo.items():
                if (found := features.get(sha)) is None:
                    missing += len(rows)
                    continue
                verified = fresh[sha] = list(self.index.verify(found, min_inliers=self.min_inliers))
                for i in rows:
                    hits[i] = verified
                self._remember(sha, verified, generation)
            # A verification made while the references changed is not stored (the features are).
            current = references if references is not None and self._current(generation) else None
            if described or (fresh and current is not None):
                self.cache.put_verified_with(self.extractor_id, current, described, fresh)
        return self._matches(hits), missing

    def warm(self) -> None:
        """Load the references (if this process has not) and build the index's search structure, so
        that no listing's verification waits for either."""
        self.loading.ensure()
        self.index.build()

    def remembers(self, hashes: Iterable[str]) -> bool:
        """Whether every photo's verification is remembered here (then :meth:`verify` costs nothing)."""
        with self._lru_lock:
            return all(sha in self._verified for sha in hashes)

    def verifiable(self, hashes: Iterable[str]) -> set[str]:
        """The photos among ``hashes`` that :meth:`verify` can verify without their pixels: remembered
        here, or described in the keypoint cache. A stored rescan asks it for a page of listings at
        once, so that a listing none of whose photos was ever described skips the cascade's question
        whether to verify it (there is nothing to verify it with). The described photos' stored
        verifications are remembered on the way (one query per 500 photos), so that the page's
        :meth:`verify` calls find them here instead of querying the keypoint cache one listing at a time."""
        wanted = list(dict.fromkeys(hashes))
        with self._lru_lock:
            known = {sha for sha in wanted if sha in self._verified}
        rest = [sha for sha in wanted if sha not in known]
        described = self.cache.described(self.extractor_id, rest) if rest else set()
        if described:
            self.loading.ensure()
            with self._lru_lock:
                generation, references = self._generation, self._references_id
            self._stored(list(described), generation, references)
        return known | described

    def _stored(self, hashes: list[str], generation: int,
                references: str | None) -> dict[str, list[VerifiedReference]]:
        """The verifications of ``hashes`` stored against ``references`` (absent: none stored, or the
        references are being changed), remembered here."""
        if references is None:
            return {}
        got = self.cache.get_verified(self.extractor_id, references, hashes)
        for sha, verified in got.items():
            self._remember(sha, verified, generation)
        return got

    def _current(self, generation: int) -> bool:
        with self._lru_lock:
            return generation == self._generation

    def _remember(self, sha: str, verified: list[VerifiedReference], generation: int) -> None:
        with self._lru_lock:
            if generation != self._generation:
                return  # the references changed during the search: do not keep a stale answer
            self._verified[sha] = verified
            while len(self._verified) > self.lru_size:
                self._verified.popitem(last=False)

    def _change(self, apply: Callable[[], None], indexed: Mapping[int, str] | None = None,
                removed: Iterable[int] = ()) -> None:
        """Change the index (``apply``): ``indexed`` are (re)indexed, ``removed`` leave it.

        The generation moves and the fingerprint is None *before* the index changes, so a verification
        running meanwhile is neither remembered nor stored under the old fingerprint (its answer may
        come from the new index); the new fingerprint is set once the index holds the change. If
        ``apply`` fails, the fingerprint stays None (nothing stored) until a later change succeeds."""
        with self._lru_lock:
            self._generation += 1
            self._references_id = None
            self._verified.clear()
        apply()
        with self._lru_lock:
            self._indexed.update(indexed or {})
            for image_id in removed:
                self._indexed.pop(int(image_id), None)
            self._references_id = self._fingerprint()
            self._generation += 1
            self._verified.clear()

    def _matches(self, hits: Mapping[int, Sequence[VerifiedReference]]) -> list[Match]:
        best: dict[int, tuple[int, int, tuple[int, int, int, int] | None]] = {}
        for photo, verified in sorted(hits.items()):
            for hit in verified:
                if hit.image_id not in best or hit.inliers > best[hit.image_id][0]:
                    best[hit.image_id] = (hit.inliers, photo, hit.box)
        if not best:
            return []
        refs = self.catalog.references(best)
        out = [Match(reference=refs[i], signal=SignalName.KEYPOINTS, similarity=keypoint_similarity(n),
                     image_index=photo, box=box)
               for i, (n, photo, box) in best.items() if i in refs]  # a deleted reference is skipped
        out.sort(key=lambda m: (-m.similarity, m.reference.image_id))
        return out[: self.max_matches]

    # ------------------------------------------------------------------ reference images

    def _describe(self, shas: Iterable[str], pixels: Callable[[str], RGBImage | None] | None,
                  progress: Callable[[int], None] | None = None) -> tuple[dict[str, KeypointSet], int]:
        """Features by sha256: the stored ones, and, with ``pixels``, the others described now from
        ``pixels(sha256)`` and stored (64 at a time; where it answers None, an image that cannot be
        read, there are none). Answers them and how many were described now."""
        wanted = list(dict.fromkeys(shas))
        found = dict(self.cache.get_many(self.extractor_id, wanted))
        todo = [sha for sha in wanted if sha not in found] if pixels is not None else []
        described = 0
        for start in range(0, len(todo), 64):
            assert pixels is not None
            chunk = todo[start:start + 64]
            fresh = {sha: self.extractor.extract(px) for sha in chunk if (px := pixels(sha)) is not None}
            self.cache.put_many(self.extractor_id, fresh)
            found.update(fresh)
            described += len(fresh)
            if progress:
                progress(len(chunk))
        return found, described

    def add_references(self, refs: Sequence[tuple[int, str, RGBImage]]) -> None:
        """Describe (through the cache) and index reference images: (image id, sha256, pixels)."""
        by_sha = {sha: px for _, sha, px in refs}
        found, _ = self._describe(by_sha, by_sha.__getitem__)
        def apply() -> None:
            for image_id, sha, _ in refs:
                self.index.add(image_id, found[sha])

        self._change(apply, indexed={image_id: sha for image_id, sha, _ in refs})

    def remove_references(self, image_ids: Iterable[int]) -> int:
        ids = [int(i) for i in image_ids]
        removed = [0]

        def apply() -> None:
            removed[0] = self.index.remove(ids)

        self._change(apply, removed=ids)
        return removed[0]

    def reconcile(self, expected: Mapping[int, str], pixels: Callable[[str], RGBImage | None] | None,
                  progress: Callable[[int], None] | None = None) -> int:
        """Make the index hold the expected references (image id -> sha256): those it lacks are added from
        stored features, describing from its stored image (``pixels(sha256)``) those the extractor has
        not described yet (without ``pixels``, or where it answers None, an unreadable image, they are
        left out, logged), and indexed ones no longer expected are removed. Answers how many images were
        described."""
        with self._lru_lock:
            have = dict(self._indexed)
        todo = {i: sha for i, sha in expected.items() if have.get(i) != sha}  # only what is not indexed yet
        stale = [i for i in have if i not in expected]  # deleted since (by another process)
        found, described = self._describe(todo.values(), pixels, progress)
        left_out = sum(sha not in found for sha in todo.values())
        if left_out:
            log.warning("%d references have no stored keypoints for %s: not verified until the catalog "
                        "is reconciled (counterlens serve or catalog reindex)", left_out, self.extractor_id)
        indexed = {image_id: sha for image_id, sha in todo.items() if sha in found}

        def apply() -> None:
            if stale:
                self.index.remove(stale)
            for image_id, sha in indexed.items():
                self.index.add(image_id, found[sha])

        with self.loading.lock:
            self._change(apply, indexed=indexed, removed=stale)
            self.loading.done = True
        return described
