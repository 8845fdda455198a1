"""The keypoints signal's use case: describe photos (through the keypoint cache), verify them against the
catalog's reference images, and keep the reference side of the keypoint index in step with the catalog.

Scoring calls :meth:`KeypointMatcher.features` and :meth:`KeypointMatcher.match` for the listings the
cascade sends on (``ScorerOptions.keypoints``); the catalog use case calls :meth:`add_references`,
:meth:`remove_references` and :meth:`reconcile`. Features are keyed by content hash like embeddings, so
a photo is described once, and a ``--stored`` rescan verifies the photos described before without their
pixels.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from service.domain.model import KeypointSet, ListingImage, Match, RGBImage, SignalName
from service.domain.ports import CatalogReader, KeypointCache, KeypointExtractor, KeypointIndex
from service.domain.visual import keypoint_similarity

log = logging.getLogger("counterlens.keypoints")


class KeypointMatcher:
    def __init__(self, extractor: KeypointExtractor, cache: KeypointCache, index: KeypointIndex,
                 catalog: CatalogReader, *, min_inliers: int = 8, max_matches: int = 5) -> None:
        if min_inliers < 3:
            raise ValueError(f"min_inliers must be >= 3, got {min_inliers}")
        self.extractor = extractor
        self.cache = cache
        self.index = index
        self.catalog = catalog
        self.min_inliers = min_inliers
        self.max_matches = max_matches
        # The reference side is filled by ``reconcile`` (the catalog's start-up reconciliation) or, in a
        # process that skips it (a Ray actor, a CLI command), by ``loader`` on first use, once, locked.
        self.loader: Callable[[], None] | None = None
        self._loaded = False
        self._load_lock = threading.RLock()  # reconcile takes it, also when called by the loader

    @property
    def extractor_id(self) -> str:
        return self.extractor.extractor_id

    # ------------------------------------------------------------------ listing photos

    def features(self, images: Sequence[ListingImage] | None,
                 hashes: Sequence[str]) -> dict[int, KeypointSet]:
        """Features of a listing's photos by photo index: from the cache, else described from the pixels
        (decoded now if need be) and stored. Without ``images`` (a stored rescan) only cached ones."""
        found = self.cache.get_many(self.extractor_id, hashes)
        if images is not None:
            fresh: dict[str, KeypointSet] = {}
            for im in images:
                if im.sha256 not in found and im.sha256 not in fresh:
                    fresh[im.sha256] = self.extractor.extract(im.pixels)
            if fresh:
                self.cache.put_many(self.extractor_id, fresh)
                found = {**found, **fresh}
        return {i: found[sha] for i, sha in enumerate(hashes) if sha in found}

    def match(self, features: Mapping[int, KeypointSet]) -> list[Match]:
        """Keypoint matches of the photos, one per reference (its best photo), most inliers first."""
        self._ensure_loaded()
        best: dict[int, tuple[int, int, tuple[int, int, int, int] | None]] = {}
        for photo, f in sorted(features.items()):
            for hit in self.index.verify(f, min_inliers=self.min_inliers):
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

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._load_lock:
            if not self._loaded and self.loader is not None:
                self.loader()
            self._loaded = True

    def add_references(self, refs: Sequence[tuple[int, str, RGBImage]]) -> None:
        """Describe (through the cache) and index reference images: (image id, sha256, pixels)."""
        cached = self.cache.get_many(self.extractor_id, [sha for _, sha, _ in refs])
        fresh = {sha: self.extractor.extract(px) for _, sha, px in refs if sha not in cached}
        if fresh:
            self.cache.put_many(self.extractor_id, fresh)
        for image_id, sha, _ in refs:
            self.index.add(image_id, cached.get(sha) or fresh[sha])

    def remove_references(self, image_ids: Iterable[int]) -> int:
        return self.index.remove(image_ids)

    def reconcile(self, expected: Mapping[int, str], pixels: Callable[[str], RGBImage] | None,
                  progress: Callable[[int], None] | None = None) -> int:
        """Index every expected reference (image id -> sha256) from stored features, describing from its
        stored image (``pixels(sha256)``) those the extractor has not described yet; without ``pixels``
        those are left out (logged). Answers how many were described."""
        cached = self.cache.get_many(self.extractor_id, expected.values())
        todo = sorted(i for i, sha in expected.items() if sha not in cached)
        if pixels is None:
            if todo:
                log.warning("%d references have no stored keypoints for %s: not verified until the catalog "
                            "is reconciled (counterlens serve or catalog reindex)", len(todo), self.extractor_id)
            expected = {i: sha for i, sha in expected.items() if sha in cached}
            todo = []
        if todo:
            log.info("describing %d references for %s", len(todo), self.extractor_id)
        for start in range(0, len(todo), 64):
            chunk = todo[start:start + 64]
            load = pixels
            assert load is not None  # todo is empty without pixels
            fresh = {expected[i]: self.extractor.extract(load(expected[i])) for i in chunk}
            self.cache.put_many(self.extractor_id, fresh)
            cached = {**cached, **fresh}
            if progress:
                progress(len(chunk))
        with self._load_lock:
            for image_id, sha in expected.items():
                self.index.add(image_id, cached[sha])
            self._loaded = True
        return len(todo)
