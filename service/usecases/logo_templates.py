"""Logo search by template (silhouette and colour): the use case around a :class:`LogoLocator`.

Scoring calls :meth:`LogoTemplateMatcher.find` for the listings the cascade sends on
(``ScorerOptions.logo_templates``), with the brands the listing is already tied to, or for every logo;
the catalog use case keeps the logo side in step (:meth:`add_references`, :meth:`remove_references`,
:meth:`reconcile`). Templates are cheap to make, so they are not stored: they are rebuilt from the
logos' stored images when a process starts. A photo's answer is remembered by its hash (and the brands
asked about) until the logos change, so a re-used photo is searched once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from service.domain.model import ListingImage, Match, RGBImage, SignalName
from service.domain.ports import CatalogReader, LocatedLogo, LogoLocator
from service.usecases.load_once import LoadOnce

log = logging.getLogger("counterlens.logo_templates")

TEMPLATE = "template"
"""``Match.method`` of the matches found here."""

LOGO_TEMPLATE_VERSION = "silhouette-colour@1"
"""Reported in ``model_versions``: bump when the locator's scores change meaning."""


class LogoTemplateMatcher:
    def __init__(self, locator: LogoLocator, catalog: CatalogReader, *, max_matches: int = 5,
                 lru_size: int = 20_000) -> None:
        self.locator = locator
        self.catalog = catalog
        self.max_matches = max_matches
        self.lru_size = lru_size
        self._brand_of: dict[int, str] = {}  # indexed logo image id -> brand
        # Filled by ``reconcile`` (start-up) or, in a process that skips it (a Ray actor, a CLI
        # command), by ``loading.loader`` on first use, once, locked.
        self.loading = LoadOnce()
        self._found: OrderedDict[tuple[str, frozenset[str] | None], list[LocatedLogo]] = OrderedDict()
        self._generation = 0  # bumped whenever the logos change
        self._lock = threading.Lock()  # guards _brand_of, _found and _generation

    def __len__(self) -> int:
        self.loading.ensure()
        return len(self.locator)

    def brands(self) -> frozenset[str]:
        """The brands with at least one logo indexed."""
        self.loading.ensure()
        with self._lock:
            return frozenset(self._brand_of.values())

    # ------------------------------------------------------------------ listing photos

    def find(self, images: Sequence[ListingImage], brands: Collection[str] | None = None) -> list[Match]:
        """``logo`` matches (method "template") of the photos, one per logo (its best photo), best first;
        ``brands``: look only for these brands' logos (None: every logo)."""
        self.loading.ensure()
        wanted = frozenset(brands) if brands is not None else None
        # The logos to look for and the generation they belong to, read together: an answer is only
        # remembered if no logo changed since, so a logo added meanwhile is never cached as absent.
        with self._lock:
            generation = self._generation
            ids = ([i for i, b in self._brand_of.items() if b in wanted] if wanted is not None else None)
        if ids is not None and not ids:
            return []
        best: dict[int, tuple[float, int, LocatedLogo]] = {}
        for photo, image in enumerate(images):
            for hit in self._locate(image, wanted, ids, generation):
                if hit.image_id not in best or hit.score > best[hit.image_id][0]:
                    best[hit.image_id] = (hit.score, photo, hit)
        if not best:
            return []
        refs = self.catalog.references(best)
        out = [Match(reference=refs[i], signal=SignalName.LOGO, similarity=score, image_index=photo,
                     box=hit.box, method=TEMPLATE)
               for i, (score, photo, hit) in best.items() if i in refs]  # a deleted logo is skipped
        out.sort(key=lambda m: (-m.similarity, m.reference.image_id))
        return out[: self.max_matches]

    def _locate(self, image: ListingImage, wanted: frozenset[str] | None, ids: Sequence[int] | None,
                generation: int) -> list[LocatedLogo]:
        key = (image.sha256, wanted)
        with self._lock:
            hit = self._found.get(key) if generation == self._generation else None
            if hit is not None:
                self._found.move_to_end(key)
                return hit
        found = self.locator.locate(image.pixels, only=ids)
        with self._lock:
            if generation == self._generation:  # else the logos changed during the search: do not keep it
                self._found[key] = found
                while len(self._found) > self.lru_size:
                    self._found.popitem(last=False)
        return found

    def _forget(self) -> None:
        with self._lock:
            self._generation += 1
            self._found.clear()

    # ------------------------------------------------------------------ logo references

    def add_references(self, refs: Sequence[tuple[int, str, RGBImage]]) -> int:
        """Index logo references: (image id, brand, pixels). Answers how many could be indexed (a logo
        that is not a mark on a plain background cannot: it is still searched by embedding)."""
        added = 0
        for image_id, brand, pixels in refs:
            if self.locator.add(image_id, pixels):
                with self._lock:
                    self._brand_of[image_id] = brand
                added += 1
            else:
                log.info("logo %d of %s is not a mark on a plain background: no template", image_id, brand)
        self._forget()
        return added

    def remove_references(self, image_ids: Iterable[int]) -> int:
        ids = list(image_ids)
        with self._lock:
            for i in ids:
                self._brand_of.pop(i, None)
        removed = self.locator.remove(ids)
        self._forget()
        return removed

    def reconcile(self, expected: Mapping[int, tuple[str, str]],
                  pixels: Callable[[str], RGBImage | None]) -> int:
        """Index every expected logo (image id -> (brand, sha256)) from its stored image, and drop the
        indexed ones no longer expected. ``pixels(sha256)`` is None for an image that cannot be read or
        decoded: that logo is left out, since one bad blob must not stop the service, nor fail every
        score of a lazily loading process. Answers how many are indexed. (A logo deleted while this runs
        may be indexed again; its matches are dropped, since the catalog no longer knows the id.)"""
        with self.loading.lock:
            with self._lock:
                gone = [i for i in self._brand_of if i not in expected]
            if gone:
                self.remove_references(gone)
            for i, (brand, sha) in expected.items():
                if i in self.locator:
                    continue
                image = pixels(sha)
                if image is not None:
                    self.add_references([(i, brand, image)])
            self.loading.done = True
        return len(self.locator)


__all__ = ["LOGO_TEMPLATE_VERSION", "TEMPLATE", "LogoTemplateMatcher"]
