"""Score a listing: the one scoring path shared by ``POST /v1/score``, ``counterlens rescan`` (local and
Ray) and ``rescan --stored``.

Order of work, cheapest first (see architecture.md, "One listing, from request to verdict"):
embeddings from the content-hash cache or the models -> search the indexes (copy, lookalike, logo on the
whole photo) -> title/description scan -> candidate brands -> the expensive signals (logo search in crops,
OCR) only where the cascade asks for them -> per-candidate context from storage -> :func:`assess` ->
stored (listing, hashes, signals, result; review queue) -> answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from service.domain.assessment import BrandContext, ListingFacts, ScoringParams, assess, wants_closer_look
from service.domain.candidates import BrandCandidate, candidate_brands, one_product_per_photo
from service.domain.model import Listing, ListingImage, Match, Money, ScoreResult, SignalName, Vectors
from service.domain.policy import VerdictPolicy
from service.domain.ports import CatalogReader, ListingHistory, OcrLine, TextReader
from service.domain.textmatch import BrandNames, PhotoText, TextScan, scan_text
from service.usecases.embedding import CachedEmbedder
from service.usecases.matching import CropGrid, ListingVectors, ReferenceMatcher, derived_key

log = logging.getLogger("counterlens.scoring")

Mode = Literal["cascade", "always", "never"]


class BrandPolicies(Protocol):
    def brand_policy(self, brand: str) -> VerdictPolicy | None: ...


class ScoreRecorder(Protocol):
    def record_score(self, listing: Listing, result: ScoreResult, source: str = ..., *,
                     image_sha256s: Sequence[str] | None = ...) -> object: ...


@dataclass(frozen=True, slots=True)
class ScorerOptions:
    logo_search: Mode = "cascade"
    ocr: Mode = "cascade"
    # Below this preliminary risk a listing with a candidate brand is not worth the expensive signals.
    cascade_floor: float = 0.15
    market_ttl_s: float = 10.0
    crop_grid: CropGrid = field(default_factory=CropGrid)


@dataclass(slots=True)
class ScoreOutcome:
    """A result plus how it was made (which signals ran, cache use, timings) for logs and metrics."""

    result: ScoreResult
    embedded: dict[str, int] = field(default_factory=dict)  # model -> images run through the model
    cache_hits: dict[str, int] = field(default_factory=dict)
    ran: dict[str, bool] = field(default_factory=dict)
    ms: dict[str, float] = field(default_factory=dict)


class ListingScorer:
    def __init__(
        self,
        *,
        copy: CachedEmbedder,
        semantic: CachedEmbedder | None,
        logo: CachedEmbedder,
        matcher: ReferenceMatcher,
        catalog: CatalogReader,
        history: ListingHistory,
        policies: BrandPolicies,
        ocr: TextReader | None,
        params: ScoringParams,
        options: ScorerOptions | None = None,
        recorder: ScoreRecorder | None = None,
    ) -> None:
        self.copy = copy
        self.semantic = semantic
        self.logo = logo
        self.matcher = matcher
        self.catalog = catalog
        self.history = history
        self.policies = policies
        self.ocr = ocr
        self.params = params
        self.options = options or ScorerOptions()
        self.recorder = recorder
        self._names: BrandNames | None = None
        self._names_lock = threading.Lock()
        self._ocr_cache: OrderedDict[str, list[OcrLine]] = OrderedDict()
        self._market: dict[tuple[str, str], tuple[float, list[Money]]] = {}

    # ------------------------------------------------------------------ catalog snapshot

    def catalog_changed(self) -> None:
        """Forget cached catalog facts; called by the catalog use cases after every change."""
        with self._names_lock:
            self._names = None
        invalidate = getattr(self.catalog, "invalidate", None)
        if invalidate is not None:
            invalidate()

    def _brand_names(self) -> BrandNames:
        with self._names_lock:
            if self._names is None:
                self._names = BrandNames(self.catalog.brand_aliases())
            return self._names

    def model_versions(self) -> dict[str, str]:
        out = {"copy": self.copy.model_id, "logo": self.logo.model_id}
        if self.semantic is not None:
            out["semantic"] = self.semantic.model_id
        return out

    # ------------------------------------------------------------------ entry points

    def score(self, listing: Listing, *, source: str = "api", persist: bool = True) -> ScoreOutcome:
        """Score a listing whose photos are decoded (pixels present)."""
        t0 = time.perf_counter()
        out = ScoreOutcome(result=None)  # type: ignore[arg-type]  # filled below
        images = list(listing.images)
        cv = self.copy.embed(images)
        out.embedded[self.copy.model_id] = cv.misses
        out.cache_hits[self.copy.model_id] = cv.hits
        vectors = ListingVectors(copy=cv.vectors)
        if self.semantic is not None:
            sv = self.semantic.embed(images)
            out.embedded[self.semantic.model_id] = sv.misses
            out.cache_hits[self.semantic.model_id] = sv.hits
            vectors.semantic = sv.vectors
        if self.logo is not self.copy and self.logo is not self.semantic:
            vectors.logo = self.logo.embed(images).vectors
        elif self.logo is self.semantic:
            vectors.logo = vectors.semantic
        out.ms["embed"] = (time.perf_counter() - t0) * 1000
        self._assess_into(out, listing, vectors, images=images, source=source, persist=persist)
        out.ms["total"] = (time.perf_counter() - t0) * 1000
        return out

    def rescore_stored(self, listing: Listing, sha256s: Sequence[str], *, persist: bool = True,
                       source: str = "stored-rescan") -> ScoreOutcome | None:
        """Re-match a stored listing with its stored embeddings (no pixels, no model run).

        Returns None when an embedding of one of its photos is not stored for the current models.
        """
        t0 = time.perf_counter()
        out = ScoreOutcome(result=None)  # type: ignore[arg-type]
        copy = self.copy.lookup(sha256s)
        if any(s not in copy for s in sha256s):
            return None
        vectors = ListingVectors(copy=_stack(copy, sha256s, self.copy))
        if self.semantic is not None:
            sem = self.semantic.lookup(sha256s)
            if any(s not in sem for s in sha256s):
                return None
            vectors.semantic = _stack(sem, sha256s, self.semantic)
        if self.logo is self.semantic:
            vectors.logo = vectors.semantic
        elif self.logo is not self.copy:
            lg = self.logo.lookup(sha256s)
            if any(s not in lg for s in sha256s):
                return None
            vectors.logo = _stack(lg, sha256s, self.logo)
        self._assess_into(out, listing, vectors, images=None, sha256s=sha256s, source=source,
                          persist=persist)
        out.ms["total"] = (time.perf_counter() - t0) * 1000
        return out

    # ------------------------------------------------------------------ the shared second half

    def _assess_into(self, out: ScoreOutcome, listing: Listing, vectors: ListingVectors, *,
                     images: list[ListingImage] | None, source: str, persist: bool,
                     sha256s: Sequence[str] | None = None) -> None:
        t1 = time.perf_counter()
        p = self.params
        names = self._brand_names()
        found = self.matcher.match(vectors)
        matches = one_product_per_photo(found)  # the evidence; ``found`` is what the answer lists
        scan = scan_text(listing.title, listing.description, brands=names, weights=p.text)
        candidates = candidate_brands(matches, scan.mentions, p.visual, p.brand_evidence)
        confirmed = (self.history.confirmed_counterfeits(listing.seller.seller_id)
                     if listing.seller is not None else None)
        facts = ListingFacts.of(listing, confirmed)
        cascaded = "cascade" in (self.options.logo_search, self.options.ocr if self.ocr is not None else "never")
        # Brand contexts (sellers, market prices, policy) are read once per listing, for the preliminary
        # and the final assessment alike.
        known: dict[tuple[str, str | None], BrandContext] = {}
        closer = self._worth_a_closer_look(facts, matches, scan, candidates, known) if cascaded else False
        skipped: dict[SignalName, str] = {}
        hashes = list(sha256s) if sha256s is not None else [im.sha256 for im in images or []]

        # Logo search inside crops: a logo printed small on a product never fills the whole photo.
        if self._should_run(self.options.logo_search, closer):
            crops = self._crop_vectors(images, hashes)
            if crops:
                vectors.crops = crops
                found = self.matcher.match(vectors)
                matches = one_product_per_photo(found)
                candidates = candidate_brands(matches, scan.mentions, p.visual, p.brand_evidence)
            out.ran["logo_crops"] = True
        else:
            out.ran["logo_crops"] = False
            if self.options.logo_search == "cascade":
                skipped_reason = "no candidate brand or counterfeit wording: logo search in crops skipped"
                if not any(m.signal is SignalName.LOGO for m in matches):
                    skipped[SignalName.LOGO] = skipped_reason

        # OCR: text printed in the photos ("REPLICA", a brand name) — ~0.5 s a photo, so cascaded.
        if images and self.ocr is not None and self._should_run(self.options.ocr, closer):
            photo_texts = [PhotoText(i, line.text, line.confidence)
                           for i, im in enumerate(images) for line in self._read_text(im)]
            if photo_texts:
                scan = scan_text(listing.title, listing.description, photo_texts, brands=names,
                                 weights=p.text)
                candidates = candidate_brands(matches, scan.mentions, p.visual, p.brand_evidence)
            out.ran["ocr"] = True
        else:
            out.ran["ocr"] = False
        out.ms["match"] = (time.perf_counter() - t1) * 1000

        contexts = self._contexts(candidates, listing.listing_id, known)
        assessment = assess(facts, matches, scan, contexts, p, skipped)
        result = assessment.to_result(_ordered(found), self.model_versions())
        out.result = result
        if persist and self.recorder is not None:
            self.recorder.record_score(listing, result, source, image_sha256s=hashes)

    def _worth_a_closer_look(self, facts: ListingFacts, matches: list[Match], scan: TextScan,
                             candidates: list[BrandCandidate], known: dict[tuple[str, str | None], BrandContext],
                             ) -> bool:
        """The cascade's rule: spend OCR and crop search where they can change the verdict.

        That is where the cheap signals leave the listing undecided (a preliminary risk between
        ``cascade_floor`` and the likely threshold: a clear listing stays clear without a brand, an already
        likely one needs no more evidence), or where the text uses counterfeit wording but no brand is a
        candidate yet (the brand may be printed in the photos)."""
        if not candidates:
            return wants_closer_look(candidates, scan)
        p = self.params
        contexts = self._contexts(candidates, facts.listing_id, known)
        prelim = assess(facts, matches, scan, contexts, p)
        return self.options.cascade_floor <= prelim.risk < prelim.policy.likely_threshold

    def _read_text(self, image: ListingImage) -> list[OcrLine]:
        """OCR through a content-hash LRU: a photo re-used across listings is read once."""
        assert self.ocr is not None
        with self._names_lock:
            hit = self._ocr_cache.get(image.sha256)
            if hit is not None:
                self._ocr_cache.move_to_end(image.sha256)
                return hit
        lines = self.ocr.read(image.pixels)
        with self._names_lock:
            self._ocr_cache[image.sha256] = lines
            while len(self._ocr_cache) > 10_000:
                self._ocr_cache.popitem(last=False)
        return lines

    def _should_run(self, mode: Mode, closer: bool) -> bool:
        return mode == "always" or (mode == "cascade" and closer)

    def _market_prices(self, brand: str, sku: str, listing_id: str) -> list[Money]:
        """Other listings' prices of the sku, through a short-lived cache: market statistics move slowly,
        and a rescan asks for the same few skus thousands of times. (The listing itself may be in a cached
        sample; one price among the many a robust median needs does not move it.)"""
        key = (brand, sku)
        now = time.monotonic()
        with self._names_lock:
            hit = self._market.get(key)
            if hit is not None and now - hit[0] < self.options.market_ttl_s:
                return hit[1]
        prices = self.history.market_prices(brand, sku, listing_id)
        with self._names_lock:
            self._market[key] = (now, prices)
            if len(self._market) > 50_000:
                self._market.clear()
        return prices

    def _contexts(self, candidates: Sequence[BrandCandidate], listing_id: str,
                  known: dict[tuple[str, str | None], BrandContext]) -> dict[str, BrandContext]:
        out = {}
        for c in candidates[: self.params.max_candidates]:
            key = (c.brand, c.sku)
            if key not in known:
                known[key] = self._context(c.brand, c.sku, listing_id)
            out[c.brand] = known[key]
        return out

    def _context(self, brand: str, sku: str | None, listing_id: str) -> BrandContext:
        market = {sku: self._market_prices(brand, sku, listing_id)} if sku else {}
        return BrandContext(brand=brand, authorized_sellers=self.catalog.authorized_sellers(brand),
                            market_prices=market, policy=self.policies.brand_policy(brand))

    def _crop_vectors(self, images: list[ListingImage] | None,
                      hashes: Sequence[str]) -> list[tuple[int, tuple[int, int, int, int], np.ndarray]]:
        """Crop embeddings in the logo model's space, from the cache (keyed by hashes derived from the
        photo's sha256 and the crop box) or the model. Without pixels (stored rescans) the photo's size
        comes from its stored geometry entry and only cached crops are used: no model runs."""
        grid = self.options.crop_grid
        wanted: list[tuple[int, tuple[int, int, int, int], str]] = []
        if images is not None:
            todo: dict[str, ListingImage] = {}
            for i, im in enumerate(images):
                for box, crop in grid.crops(im.pixels):
                    key = derived_key(im.sha256, grid.tag(box))
                    wanted.append((i, box, key))
                    todo[key] = ListingImage(key, np.ascontiguousarray(crop))
            got = self.logo.embed(list(todo.values()))
            if got.misses:  # first time these crops were embedded: keep the photo's size for stored rescans
                for im in images:
                    h, w = im.pixels.shape[:2]
                    self.logo.remember_geometry(im.sha256, w, h)
            vecs = {k: got.vectors[j] for j, k in enumerate(todo)}
        else:
            sizes = self.logo.geometry(hashes)
            for i, sha in enumerate(hashes):
                if sha in sizes:
                    w, h = sizes[sha]
                    wanted += [(i, box, derived_key(sha, grid.tag(box))) for box in grid.boxes(w, h)]
            vecs = self.logo.lookup([k for _, _, k in wanted])
        return [(i, box, vecs[k]) for i, box, k in wanted if k in vecs]


def _stack(found: dict[str, np.ndarray], order: Sequence[str], emb: CachedEmbedder) -> Vectors:
    if not order:
        return np.zeros((0, emb.embedder.dim), np.float32)
    return np.stack([found[s] for s in order]).astype(np.float32, copy=False)


def _ordered(matches: Sequence[Match]) -> list[Match]:
    return sorted(matches, key=lambda m: -m.similarity)
