"""Score a listing: the one scoring path shared by ``POST /v1/score``, ``counterlens rescan`` (local and
Ray) and ``rescan --stored``.

Order of work, cheapest first (see architecture.md, "One listing, from request to verdict"):
embeddings from the content-hash cache or the models (photos decoded only for a miss) -> search the
indexes (copy, lookalike, logo on the whole photo) -> title/description scan -> candidate brands -> the
expensive signals (logo search in crops, OCR) only where the cascade asks for them -> per-candidate
context from storage -> :func:`assess` -> stored (listing, hashes, signals, result; review queue) ->
answered.

Listings go through in batches (:meth:`ListingScorer.score_many`, :meth:`ListingScorer.rescore_stored_many`):
one model call per model with the models side by side, one search per index, one transaction to store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

import numpy as np

from service.domain.assessment import (
    BrandContext,
    ListingFacts,
    RiskReading,
    ScoringParams,
    assess,
    assess_risk,
    wants_closer_look,
)
from service.domain.candidates import BrandCandidate, candidate_brands, one_product_per_photo
from service.domain.model import (
    Listing,
    ListingImage,
    Match,
    ReferenceKind,
    ScoreResult,
    SignalName,
    Vectors,
    match_rank,
)
from service.domain.policy import VerdictPolicy
from service.domain.ports import CatalogReader, ListingHistory, OcrLine, TextReader
from service.domain.pricing import MarketSample
from service.domain.textmatch import BrandNames, PhotoText, TextScan, scan_text
from service.storage.errors import InvalidInputError
from service.storage.listings import ScoreWrite
from service.usecases.embedding import CachedEmbedder, finish_together, lookup_together
from service.usecases.keypoints import KeypointMatcher
from service.usecases.logo_templates import LOGO_TEMPLATE_VERSION, LogoTemplateMatcher
from service.usecases.matching import CropGrid, ListingVectors, ReferenceMatcher, derived_key

log = logging.getLogger("counterlens.scoring")

Mode = Literal["cascade", "always", "never"]


class BrandPolicies(Protocol):
    def brand_policy(self, brand: str) -> VerdictPolicy | None: ...


class ScoreRecorder(Protocol):
    def record_scores(self, writes: Sequence[ScoreWrite], *, skip_unchanged: bool = ...,
                      same_as_stored: bool = ...) -> Sequence[object | None]: ...


@dataclass(frozen=True, slots=True)
class StoredListing:
    """A stored listing to re-match: its data, its photos' hashes and its latest result's digest."""

    listing: Listing
    sha256s: tuple[str, ...]
    digest: str | None = None


_KEYPOINTS_NOT_STORED = "the photos' keypoints were not stored: not verified"
_SETTLED_BY_KEYPOINTS = "keypoint verification already made the listing likely_counterfeit: logo search skipped"


@dataclass(slots=True)
class _Item:
    """One listing on its way through :meth:`ListingScorer.prepare_many` and :meth:`ListingScorer.finish_many`."""

    listing: Listing
    vectors: ListingVectors
    images: list[ListingImage] | None  # None: a stored rescan (no pixels)
    hashes: list[str]
    digest: str | None = None
    ran: dict[str, bool] = field(default_factory=dict)
    # Keypoint verification can run: False only for a stored rescan's listing none of whose photos was
    # ever described (no pixels, no stored features).
    verifiable: bool = True


@dataclass(slots=True)
class _Triage:
    """What the cheap signals say of one listing, and what the cascade runs next (:meth:`ListingScorer._triage`)."""

    found: list[Match]  # every match of the whole-photo search (what the answer lists)
    scan: TextScan
    matches: list[Match]  # the evidence: one product per photo
    candidates: list[BrandCandidate]
    facts: ListingFacts
    closer: bool  # worth the closer look (crops, templates, OCR)
    prelim: RiskReading | None
    verify: bool  # keypoint verification runs
    skipped: dict[SignalName, str]


@dataclass(slots=True)
class _Batch:
    """What the listings prepared together share: the sellers' confirmed counterfeits and the brand
    contexts read for them, and how their scores are stored."""

    source: str
    persist: bool
    skip_unchanged: bool
    same_as_stored: bool
    confirmed: dict[str, int] = field(default_factory=dict)
    # (brand, sku) -> context, filled as listings ask (only ``get`` and ``set``: safe to share between the
    # threads that finish the batch's listings).
    known: dict[tuple[str, str | None], BrandContext] = field(default_factory=dict)
    matched_from: float = 0.0  # when the batch's search started (the ``match`` timing)


@dataclass(slots=True)
class PreparedListing:
    """A listing through the cheap half of scoring (:meth:`ListingScorer.prepare_many`): embedded,
    searched, and the cascade's decisions made. ``slow``: finishing it runs an expensive signal
    (keypoint verification, logo search, OCR)."""

    item: _Item
    triage: _Triage
    batch: _Batch
    started: float
    embed_ms: float | None = None
    slow: bool = False
    embedded: dict[str, int] = field(default_factory=dict)
    cache_hits: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ScorerOptions:
    logo_search: Mode = "cascade"
    ocr: Mode = "cascade"
    # Keypoint verification (needs a KeypointMatcher): "cascade" where it could change the verdict (see
    # ListingScorer._wants_keypoints); "always" on every photo.
    keypoints: Mode = "cascade"
    # Logo search by template (needs a LogoTemplateMatcher): "cascade" where the closer look is worth it,
    # for every logo while the catalog has at most ``logo_templates_every_up_to``, else only for the
    # logos of the brands already candidates (every logo when none is); "always": every logo, every photo.
    logo_templates: Mode = "cascade"
    logo_templates_every_up_to: int = 16
    # Below this preliminary risk a listing with a candidate brand is not worth the expensive signals.
    cascade_floor: float = 0.15
    market_ttl_s: float = 10.0
    # The most recently seen listings of a product whose prices make its market (the listing's own left out).
    market_size: int = 1000
    crop_grid: CropGrid = field(default_factory=CropGrid)


@dataclass(slots=True)
class ScoreOutcome:
    """A result plus how it was made (which signals ran, cache use, timings) for logs and metrics."""

    result: ScoreResult
    embedded: dict[str, int] = field(default_factory=dict)  # model -> images run through the model
    cache_hits: dict[str, int] = field(default_factory=dict)
    ran: dict[str, bool] = field(default_factory=dict)
    ms: dict[str, float] = field(default_factory=dict)
    written: bool = False  # stored (False: not persisted, or unchanged and skipped)


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
        keypoints: KeypointMatcher | None = None,
        logo_templates: LogoTemplateMatcher | None = None,
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
        self.keypoints = keypoints
        self.logo_templates = logo_templates
        self._names: BrandNames | None = None
        self._names_lock = threading.Lock()
        self._ocr_cache: OrderedDict[str, list[OcrLine]] = OrderedDict()
        self._market: dict[tuple[str, str], tuple[float, MarketSample]] = {}

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

    def warm_up(self) -> None:
        """Read the catalog facts that every listing's score reads (the brands' names, and each brand's
        verdict policy and authorized sellers) into this process's caches, open the indexes, and load the
        keypoint index and the logo templates. A stored rescan calls it before it forks its worker
        processes: they inherit these instead of each reading them on its first page. The API calls it
        at start-up, so that no request waits for them."""
        for brand in self.catalog.brand_aliases():
            self.catalog.authorized_sellers(brand)
            self.policies.brand_policy(brand)
        self._brand_names()
        self.matcher.open_indexes()
        if (kp := self._keypoint_verifier()) is not None:
            kp.warm()
        if self.logo_templates is not None and self.options.logo_templates != "never":
            self.logo_templates.loading.ensure()

    def _keypoint_verifier(self) -> KeypointMatcher | None:
        """The keypoint matcher where verification is on (a matcher, and a mode other than "never")."""
        return self.keypoints if self.options.keypoints != "never" else None

    def model_versions(self) -> dict[str, str]:
        out = {"copy": self.copy.model_id, "logo": self.logo.model_id}
        if self.semantic is not None:
            out["semantic"] = self.semantic.model_id
        if (kp := self._keypoint_verifier()) is not None:
            out["keypoints"] = kp.extractor_id
        if self.logo_templates is not None and self.options.logo_templates != "never":
            out["logo_templates"] = LOGO_TEMPLATE_VERSION
        return out

    # ------------------------------------------------------------------ entry points

    def score(self, listing: Listing, *, source: str = "api", persist: bool = True) -> ScoreOutcome:
        """Score a listing whose photos are decoded (pixels present)."""
        return _unwrap(self.score_many([listing], source=source, persist=persist)[0])

    def score_many(self, listings: Sequence[Listing], *, source: str = "api", persist: bool = True,
                   skip_unchanged: bool = False) -> list[ScoreOutcome | Exception]:
        """Score listings together: each model runs once over all their photos (the models side by side),
        each index is searched once, and the scores are stored in one transaction. Answers in the order
        of ``listings``; a listing that cannot be scored gets its exception, the others are unaffected.
        ``skip_unchanged``: a listing stored with the same content and latest result is only marked seen
        (``ListingRepository.record_scores``' ``same_as_stored``; its outcome says ``written=False``).

        :meth:`prepare_many` then :meth:`finish_many`, for callers that want every outcome at once."""
        return self._finish_prepared(self.prepare_many(listings, source=source, persist=persist,
                                                       skip_unchanged=skip_unchanged))

    def prepare_many(self, listings: Sequence[Listing], *, source: str = "api", persist: bool = True,
                     skip_unchanged: bool = False) -> list[PreparedListing | Exception]:
        """The cheap half of :meth:`score_many`: the listings embedded together, searched together, and
        the cascade's decisions made for each (``PreparedListing.slow``: an expensive signal is to run).

        Photos are decoded here, and only those some model has not embedded yet (a photo whose
        embeddings are all cached by its hash is never decoded); one that fails to decode fails its own
        listing."""
        roles = self._roles()
        shas = list(dict.fromkeys(im.sha256 for lst in listings for im in lst.images))
        cached = lookup_together(roles, shas)  # one lookup for every model, a batch
        failed = self._decode_misses(listings, cached)
        ok = [lst for k, lst in enumerate(listings) if k not in failed]
        prepared = iter(self._prepare_decoded(ok, roles, cached, source, persist, skip_unchanged) if ok else [])
        return [failed[k] if k in failed else next(prepared) for k in range(len(listings))]

    def prefetch(self, listing: Listing) -> None:
        """Start every model on the listing's photos that no model has cached or under way, without
        waiting (:meth:`CachedEmbedder.prefetch`): the scoring queue calls this as it queues the listing,
        so the models work while the listing waits for a scoring thread. Cheap: no store read, no
        decoding on the caller's thread."""
        for emb in self._roles().values():
            emb.prefetch(listing.images)

    def finish_many(self, prepared: Sequence[PreparedListing]) -> list[ScoreOutcome | Exception]:
        """The second half of :meth:`score_many`: the expensive signals the cascade chose, the final
        assessment, and the scores stored (one transaction per batch they were prepared in). Answers
        in the order given. Listings of one batch may be finished apart and in other threads (the
        scoring queue answers the listings that need no expensive signal before those that do)."""
        outcomes: list[ScoreOutcome | Exception] = []
        for p in prepared:
            try:
                out = ScoreOutcome(result=self._complete(p.item, p.triage, p.batch.known),
                                   embedded=p.embedded, cache_hits=p.cache_hits, ran=p.item.ran)
                out.ms["match"] = (time.perf_counter() - p.batch.matched_from) * 1000
                if p.embed_ms is not None:
                    out.ms["embed"] = p.embed_ms
                outcomes.append(out)
            except Exception as exc:  # one listing's failure is its own, not the batch's
                outcomes.append(exc)
        batches: dict[int, list[int]] = {}
        for k, p in enumerate(prepared):
            batches.setdefault(id(p.batch), []).append(k)
        for ks in batches.values():
            batch = prepared[ks[0]].batch
            if batch.persist and self.recorder is not None:
                self._record([prepared[k] for k in ks], outcomes, ks)
        now = time.perf_counter()
        for p, got in zip(prepared, outcomes, strict=True):
            if isinstance(got, ScoreOutcome):
                got.ms["total"] = (now - p.started) * 1000
        return outcomes

    def _finish_prepared(self, prepared: Sequence[PreparedListing | Exception]) -> list[ScoreOutcome | Exception]:
        """:meth:`finish_many` of the prepared listings together; a listing that failed to prepare keeps
        its exception in its place."""
        done = iter(self.finish_many([p for p in prepared if isinstance(p, PreparedListing)]))
        return [p if isinstance(p, Exception) else next(done) for p in prepared]

    @staticmethod
    def _decode_misses(listings: Sequence[Listing], cached: dict[str, dict[str, np.ndarray]]) -> dict[int, Exception]:
        """Decode the not yet decoded photos that some model still has to embed (absent from its part of
        ``cached``), listing by listing; answers the listings whose photos failed, with the error."""
        failed: dict[int, Exception] = {}
        for k, lst in enumerate(listings):
            try:
                for im in lst.images:
                    if not im.model_decoded and any(im.sha256 not in found for found in cached.values()):
                        im.model_pixels  # noqa: B018  (decodes once; raises the intake error of a bad photo)
            except Exception as exc:
                failed[k] = exc
        return failed

    def _prepare_decoded(self, listings: Sequence[Listing], roles: dict[str, CachedEmbedder],
                         cached: dict[str, dict[str, np.ndarray]], source: str,
                         persist: bool, same_as_stored: bool) -> list[PreparedListing | Exception]:
        t0 = time.perf_counter()
        images = [im for lst in listings for im in lst.images]
        pending = {name: emb.start(images, found=cached[name]) for name, emb in roles.items()}
        got = finish_together({name: (roles[name], pe) for name, pe in pending.items()})
        embed_ms = (time.perf_counter() - t0) * 1000
        outputs = {name: out.vectors for name, out in got.items()}
        items: list[_Item] = []
        offset = 0
        for lst in listings:
            n = len(lst.images)
            rows = slice(offset, offset + n)
            offset += n
            hashes = [im.sha256 for im in lst.images]
            items.append(_Item(lst, self._listing_vectors(outputs, rows, hashes), list(lst.images), hashes))
        # A photo the model ran on counts for the first listing that has it; the rest were hits.
        embedded: list[dict[str, int]] = [{} for _ in listings]
        hits: list[dict[str, int]] = [{} for _ in listings]
        for name, pe in pending.items():
            model, fresh = roles[name].model_id, set(pe.todo)
            for k, lst in enumerate(listings):
                misses = 0
                for im in lst.images:
                    if im.sha256 in fresh:
                        fresh.discard(im.sha256)
                        misses += 1
                embedded[k][model] = misses
                hits[k][model] = len(lst.images) - misses
        batch = _Batch(source=source, persist=persist, skip_unchanged=False, same_as_stored=same_as_stored)
        prepared = self._prepare_items(items, batch, started=t0, embed_ms=embed_ms)
        for k, one in enumerate(prepared):
            if isinstance(one, PreparedListing):
                one.embedded, one.cache_hits = embedded[k], hits[k]
        return prepared

    def rescore_stored(self, listing: Listing, sha256s: Sequence[str], *, persist: bool = True,
                       source: str = "stored-rescan") -> ScoreOutcome | None:
        """Re-match a stored listing with its stored embeddings (no pixels, no model run).

        Returns None when an embedding of one of its photos is not stored for the current models.
        """
        got = self.rescore_stored_many([StoredListing(listing, tuple(sha256s))], persist=persist,
                                       source=source)[0]
        return None if got is None else _unwrap(got)

    def rescore_stored_many(self, stored: Sequence[StoredListing], *, persist: bool = True,
                            source: str = "stored-rescan",
                            skip_unchanged: bool = False) -> list[ScoreOutcome | Exception | None]:
        """:meth:`rescore_stored` for many listings, batched like :meth:`score_many` (None: a photo's
        embedding is not stored for the current models). ``skip_unchanged``: a listing whose new result
        equals its stored latest one (``StoredListing.digest``) is not written again (its outcome says
        ``written=False``)."""
        t0 = time.perf_counter()
        roles = self._roles()
        shas = list(dict.fromkeys(sha for s in stored for sha in s.sha256s))
        found = lookup_together(roles, shas)
        complete = [all(sha in f for f in found.values() for sha in s.sha256s) for s in stored]
        # One matrix per model for the whole batch, each listing a slice of it (as score_many's model
        # outputs): stacking each listing's few vectors apart cost more than matching them.
        order = [sha for s, ok in zip(stored, complete, strict=True) if ok for sha in s.sha256s]
        matrices = {name: _stack(found[name], order, emb) for name, emb in roles.items()}
        items: list[_Item] = []
        where: list[int | None] = []
        offset = 0
        for s, ok in zip(stored, complete, strict=True):
            if not ok:
                where.append(None)
                continue
            rows = slice(offset, offset + len(s.sha256s))
            offset += len(s.sha256s)
            where.append(len(items))
            items.append(_Item(s.listing, self._listing_vectors(matrices, rows, s.sha256s), None,
                               list(s.sha256s), s.digest))
        batch = _Batch(source=source, persist=persist, skip_unchanged=skip_unchanged, same_as_stored=False)
        outcomes = self._finish_prepared(self._prepare_items(items, batch, started=t0))
        return [None if w is None else outcomes[w] for w in where]

    def _listing_vectors(self, matrices: Mapping[str, Vectors], rows: slice,
                         photos: Sequence[str]) -> ListingVectors:
        """One listing's rows of the batch's vectors by role (:meth:`_roles`); the logo role reads the
        semantic vectors where one model serves both."""
        vectors = ListingVectors(copy=matrices["copy"][rows], photos=photos)
        if "semantic" in matrices:
            vectors.semantic = matrices["semantic"][rows]
        if "logo" in matrices:
            vectors.logo = matrices["logo"][rows]
        elif self.logo is self.semantic:
            vectors.logo = vectors.semantic
        return vectors

    def _roles(self) -> dict[str, CachedEmbedder]:
        """The distinct models of a score by role (a role served by another role's model is left out)."""
        roles = {"copy": self.copy}
        if self.semantic is not None:
            roles["semantic"] = self.semantic
        if self.logo is not self.copy and self.logo is not self.semantic:
            roles["logo"] = self.logo
        return roles

    # ------------------------------------------------------------------ the shared second half

    def _prepare_items(self, items: Sequence[_Item], batch: _Batch, *, started: float,
                       embed_ms: float | None = None) -> list[PreparedListing | Exception]:
        """Search the indexes for a batch's vectors at once, read what the batch's listings share, and
        triage each listing (:meth:`_triage`)."""
        batch.matched_from = time.perf_counter()
        found_all = self.matcher.match_many([it.vectors for it in items])
        sellers = {it.listing.seller.seller_id for it in items if it.listing.seller is not None}
        batch.confirmed = self.history.confirmed_counterfeits_many(sellers) if sellers else {}
        pixelless = [it for it in items if it.images is None]
        if pixelless and (kp := self._keypoint_verifier()) is not None:
            described = kp.verifiable(sha for it in pixelless for sha in it.hashes)
            for it in pixelless:
                it.verifiable = any(sha in described for sha in it.hashes)
        prepared: list[PreparedListing | Exception] = []
        for it, found in zip(items, found_all, strict=True):
            try:
                triage = self._triage(it, found, batch.confirmed, batch.known)
                prepared.append(PreparedListing(it, triage, batch, started=started, embed_ms=embed_ms,
                                                slow=self._is_slow(it, triage)))
            except Exception as exc:  # one listing's failure is its own, not the batch's
                prepared.append(exc)
        return prepared

    def _record(self, prepared: Sequence[PreparedListing], outcomes: list[ScoreOutcome | Exception],
                where: Sequence[int]) -> None:
        """Store the scores of ``prepared`` (one batch's listings; their outcomes are ``outcomes[where]``)
        in one transaction."""
        assert self.recorder is not None
        batch = prepared[0].batch
        source, skip_unchanged, same_as_stored = batch.source, batch.skip_unchanged, batch.same_as_stored
        ok = [i for i in where if isinstance(outcomes[i], ScoreOutcome)]
        items = {i: p.item for i, p in zip(where, prepared, strict=True)}
        writes = [ScoreWrite(items[i].listing, cast(ScoreOutcome, outcomes[i]).result, source, items[i].hashes,
                             items[i].digest) for i in ok]
        if not writes:
            return
        try:
            written = self.recorder.record_scores(writes, skip_unchanged=skip_unchanged,
                                                  same_as_stored=same_as_stored)
        except InvalidInputError:
            if len(writes) == 1:
                raise
            # One listing's data is refused by storage (a title too long, say): store the others one by
            # one so the refusal stays with the listing it belongs to.
            written = []
            for i, one in zip(ok, writes, strict=True):
                try:
                    written += self.recorder.record_scores([one], skip_unchanged=skip_unchanged,
                                                           same_as_stored=same_as_stored)
                except InvalidInputError as exc:
                    outcomes[i] = exc
                    written.append(None)
        for i, stored in zip(ok, written, strict=True):
            out = outcomes[i]
            if isinstance(out, ScoreOutcome):
                out.written = stored is not None

    def _triage(self, it: _Item, found: list[Match], confirmed: dict[str, int],
                known: dict[tuple[str, str | None], BrandContext]) -> _Triage:
        """The cheap half of a listing's assessment: what its matches and text say (the candidate brands,
        a preliminary reading), and which expensive signals the cascade runs on it (:meth:`_complete`)."""
        p = self.params
        listing = it.listing
        names = self._brand_names()
        scan = scan_text(listing.title, listing.description, brands=names, weights=p.text)
        matches, candidates = self._evidence(found, scan)  # ``found`` is what the answer lists
        seller_confirmed = (confirmed.get(listing.seller.seller_id, 0) if listing.seller is not None else None)
        facts = ListingFacts.of(listing, seller_confirmed)
        cascaded = "cascade" in (self.options.logo_search, self.options.ocr if self.ocr is not None else "never",
                                 self._template_mode())
        closer, prelim = (self._worth_a_closer_look(facts, matches, scan, candidates, known) if cascaded
                          else (False, None))
        skipped: dict[SignalName, str] = {}
        kp = self._keypoint_verifier()
        verify = False
        if kp is None:
            it.ran["keypoints"] = False
            skipped[SignalName.KEYPOINTS] = "keypoint verification is off"
        elif not it.verifiable:  # (not worth the cascade's question: verify could only answer this)
            it.ran["keypoints"] = False
            skipped[SignalName.KEYPOINTS] = _KEYPOINTS_NOT_STORED
        elif self._wants_keypoints(facts, found, scan, closer, known):
            verify = True
        else:
            it.ran["keypoints"] = False
            skipped[SignalName.KEYPOINTS] = "keypoint verification could not change the verdict: skipped"
        return _Triage(found, scan, matches, candidates, facts, closer, prelim, verify, skipped)

    def _is_slow(self, it: _Item, t: _Triage) -> bool:
        """Whether :meth:`_complete` runs an expensive signal on the listing: keypoint verification of a
        photo not verified before, or (on its photos' pixels) logo search in crops, logo templates or
        OCR of a photo not read before."""
        kp = self._keypoint_verifier()
        if t.verify and kp is not None and not kp.remembers(it.hashes):
            return True
        if it.images is None or not it.images:
            return False
        if (self._should_run(self.options.logo_search, t.closer)
                or self._should_run(self._template_mode(), t.closer)):
            return True
        if self.ocr is None or not self._should_run(self.options.ocr, t.closer):
            return False
        with self._names_lock:
            return not all(im.sha256 in self._ocr_cache for im in it.images)

    def _template_mode(self) -> Mode:
        """The logo templates' mode where there are logos to look for; "never" without any (with none,
        deciding ``closer`` for them would only send more listings to keypoint verification)."""
        if self.logo_templates is None or not len(self.logo_templates):
            return "never"
        return self.options.logo_templates

    def _complete(self, it: _Item, t: _Triage, known: dict[tuple[str, str | None], BrandContext]) -> ScoreResult:
        """The second half of a listing's assessment: the expensive signals :meth:`_triage` chose, then
        the final reading of all the evidence."""
        p = self.params
        listing, vectors, images, hashes = it.listing, it.vectors, it.images, it.hashes
        found, scan, matches, candidates, closer = t.found, t.scan, t.matches, t.candidates, t.closer
        skipped = dict(t.skipped)
        settled: str | None = None  # why the closer look was called off after keypoint verification
        names = self._brand_names()
        # The latest reading and the evidence it read: where nothing the cascade runs below adds to it,
        # the final assessment reports that reading rather than making it again.
        read, prior = (matches, candidates, scan), t.prelim

        # Keypoint verification: a reference's printed design found in the photo under one geometric
        # transform (a product cut out onto a new scene, another photo of the same packaging).
        verified: list[Match] = []
        kp = self._keypoint_verifier()
        if t.verify and kp is not None:
            verified, unverified = kp.verify(images, hashes)
            if verified:
                found = found + verified
                matches, candidates = self._evidence(found, scan)
                # ``closer`` (crops, OCR) is not re-decided upwards on the verified product: that sent 1 s
                # of crop search and OCR after many verified listings (bench_score: cold p99 at 16
                # concurrent requests 8.4 s), where the verification is the closer look. Downwards it is:
                # a listing the verification made likely_counterfeit needs no more evidence for its
                # verdict, the rule the cheap signals' preliminary reading follows (OCR, crop search and
                # templates only add evidence, and the riskiest reading is reported).
                if closer and candidates:
                    prior = self._reading(t.facts, matches, scan, candidates, known)
                    read = (matches, candidates, scan)
                    if prior.risk >= prior.policy.likely_threshold:
                        closer, settled = False, _SETTLED_BY_KEYPOINTS
            it.ran["keypoints"] = True
            if unverified and unverified == len(hashes):
                skipped[SignalName.KEYPOINTS] = _KEYPOINTS_NOT_STORED

        # Logo search inside crops: a logo printed small on a product never fills the whole photo.
        if self._should_run(self.options.logo_search, closer):
            crops = self._crop_vectors(images, hashes)
            if crops:
                vectors.crops = crops
                found = self.matcher.match(vectors) + verified
                matches, candidates = self._evidence(found, scan)
            it.ran["logo_crops"] = True
        else:
            it.ran["logo_crops"] = False
            if not any(m.signal is SignalName.LOGO for m in matches):
                skipped[SignalName.LOGO] = (settled or "no candidate brand or counterfeit wording: logo search "
                                            "in crops skipped" if self.options.logo_search == "cascade"
                                            else "logo search in crops is off")

        # Logo search by template: a logo's silhouette in its colour, at any size (index/logo_templates.py).
        found, matches, candidates = self._logo_templates(it, found, matches, candidates, scan, closer, skipped,
                                                          settled)

        # OCR: text printed in the photos ("REPLICA", a brand name) — ~0.5 s a photo, so cascaded.
        if images and self.ocr is not None and self._should_run(self.options.ocr, closer):
            photo_texts = [PhotoText(i, line.text, line.confidence)
                           for i, im in enumerate(images) for line in self._read_text(im)]
            if photo_texts:
                scan = scan_text(listing.title, listing.description, photo_texts, brands=names,
                                 weights=p.text)
                candidates = candidate_brands(matches, scan.mentions, p.visual, p.brand_evidence)
            it.ran["ocr"] = True
        else:
            it.ran["ocr"] = False

        contexts = self._contexts(candidates, listing.listing_id, known)
        unchanged = all(a is b for a, b in zip(read, (matches, candidates, scan), strict=True))
        assessment = assess(t.facts, matches, scan, contexts, p, skipped, candidates=candidates,
                            prior=prior if unchanged else None)
        return assessment.to_result(_ordered(found), self.model_versions())

    def _evidence(self, found: Sequence[Match], scan: TextScan) -> tuple[list[Match], list[BrandCandidate]]:
        """What the matches found say: one product per photo (the evidence), and the candidate brands
        that evidence and the text's mentions make."""
        p = self.params
        matches = one_product_per_photo(found)
        return matches, candidate_brands(matches, scan.mentions, p.visual, p.brand_evidence)

    def _logo_templates(self, it: _Item, found: list[Match], matches: list[Match],
                        candidates: list[BrandCandidate], scan: TextScan, closer: bool,
                        skipped: dict[SignalName, str], settled: str | None = None,
                        ) -> tuple[list[Match], list[Match], list[BrandCandidate]]:
        """Template matches of the logos added to ``found`` (and the evidence re-read), where the mode
        says so: "always" every logo; "cascade", when the listing is worth a closer look, every logo of a
        small catalog, else the logos of its candidate brands (every logo when it has none: counterfeit
        wording without a brand)."""
        mode = self.options.logo_templates
        it.ran["logo_templates"] = False
        if self.logo_templates is None or mode == "never":
            return found, matches, candidates
        # The logo signal is "skipped" only where no logo search ran at all and nothing found a logo:
        # the crop search may have run, and a stored rescan keeps its embeddings' logo matches.
        unsearched = not it.ran.get("logo_crops") and not any(m.signal is SignalName.LOGO for m in matches)
        if not len(self.logo_templates):
            if unsearched:
                skipped[SignalName.LOGO] = "the catalog has no logo references that templates can find"
            return found, matches, candidates
        if not self._should_run(mode, closer):
            if unsearched:  # (the templates' reason wins over the crops': they are the search that counts)
                skipped[SignalName.LOGO] = settled or "no candidate brand or counterfeit wording: logo search skipped"
            return found, matches, candidates
        if it.images is None:
            if unsearched:
                skipped[SignalName.LOGO] = "a stored rescan has no photos: logo templates not searched"
            return found, matches, candidates
        every = (mode == "always" or not candidates
                 or len(self.logo_templates) <= self.options.logo_templates_every_up_to)
        brands = None if every else {c.brand for c in candidates}
        got = self.logo_templates.find(it.images, brands)
        it.ran["logo_templates"] = True
        skipped.pop(SignalName.LOGO, None)  # the crops may have been skipped, but logos were searched
        if not got:
            return found, matches, candidates
        found = found + got
        matches, candidates = self._evidence(found, scan)
        return found, matches, candidates

    def _worth_a_closer_look(self, facts: ListingFacts, matches: list[Match], scan: TextScan,
                             candidates: list[BrandCandidate], known: dict[tuple[str, str | None], BrandContext],
                             ) -> tuple[bool, RiskReading | None]:
        """The cascade's rule: spend OCR and crop search where they can change the verdict.

        That is where the cheap signals leave the listing undecided (a preliminary risk between
        ``cascade_floor`` and the likely threshold: a clear listing stays clear without a brand, an already
        likely one needs no more evidence), or where the text uses counterfeit wording but no brand is a
        candidate yet (the brand may be printed in the photos). Answers the decision and the preliminary
        reading it made (None without a candidate brand)."""
        if not candidates:
            return wants_closer_look(candidates, scan), None
        prelim = self._reading(facts, matches, scan, candidates, known)
        return self.options.cascade_floor <= prelim.risk < prelim.policy.likely_threshold, prelim

    def _reading(self, facts: ListingFacts, matches: list[Match], scan: TextScan,
                 candidates: list[BrandCandidate], known: dict[tuple[str, str | None], BrandContext]) -> RiskReading:
        """:func:`assess_risk` of this evidence, with the candidates' brand contexts (read once a batch,
        ``known``): the cascade's questions, and a reading ``assess`` may report as its ``prior``."""
        return assess_risk(facts, matches, scan, self._contexts(candidates, facts.listing_id, known), self.params,
                           candidates=candidates)

    def _wants_keypoints(self, facts: ListingFacts, found: Sequence[Match], scan: TextScan, closer: bool,
                         known: dict[tuple[str, str | None], BrandContext]) -> bool:
        """The cascade's rule for keypoint verification (~35 ms a photo): run it where its evidence could
        change the verdict. Keypoints can at most make a product the whole-photo search found certain,
        so the products found (the two best copies and lookalikes) are tried as if verified: if none would bring the
        listing to review (a normally priced listing from an ordinary seller), verification is skipped.
        (Tried together, one product per brand is read: of two found products of one brand, the price is
        compared with the stronger match's.)
        A certain copy names the catalog photo already; an undecided listing (``closer``) is verified."""
        mode = self.options.keypoints
        if mode != "cascade":
            return mode == "always"
        p = self.params
        if any(m.signal is SignalName.COPY and p.visual.copy.score(m.similarity) >= 1.0 for m in found):
            return False
        if closer:
            return True
        # The two best products of each whole-photo signal, each as if verified, in one assessment: it
        # reads every candidate brand and answers the riskiest reading. Per signal, because a weak copy
        # match (a product pasted on a new scene) ranks below the scene's lookalikes.
        verified: dict[int, Match] = {}
        for signal in (SignalName.COPY, SignalName.LOOKALIKE):
            ranked = sorted((m for m in found if m.signal is signal and m.reference.kind is ReferenceKind.PRODUCT),
                            key=lambda m: -m.similarity)
            for m in ranked[:2]:
                verified.setdefault(m.reference.image_id, Match(m.reference, SignalName.KEYPOINTS, 1.0,
                                                                m.image_index))
        if not verified:
            return False
        matches, candidates = self._evidence([*found, *verified.values()], scan)
        result = self._reading(facts, matches, scan, candidates, known)
        return result.risk >= result.policy.review_threshold

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

    def _market_sample(self, brand: str, sku: str) -> MarketSample:
        """Listings' prices of the sku with their listing_ids, through a short-lived cache: market
        statistics move slowly, and a rescan asks for the same few skus thousands of times. One more
        price than ``market_size`` is read, so that every listing has ``market_size`` others."""
        key = (brand, sku)
        now = time.monotonic()
        with self._names_lock:
            hit = self._market.get(key)
            if hit is not None and now - hit[0] < self.options.market_ttl_s:
                return hit[1]
        rows = self.history.market_sample(brand, sku, self.options.market_size + 1)
        prices = MarketSample((m for _, m in rows), (lid for lid, _ in rows))
        with self._names_lock:
            self._market[key] = (now, prices)
            if len(self._market) > 50_000:
                self._market.clear()
        return prices

    def _contexts(self, candidates: Sequence[BrandCandidate], listing_id: str,
                  known: dict[tuple[str, str | None], BrandContext]) -> dict[str, BrandContext]:
        """The candidates' contexts as ``listing_id`` sees them. ``known`` (one batch's) holds each
        (brand, sku)'s context with the whole market sample; each listing gets the other listings'
        prices only, so its result does not depend on which listing loaded the sample (a stored rescan
        of an unchanged catalog gives every listing the same result again, in any order)."""
        out = {}
        for c in candidates[: self.params.max_candidates]:
            key = (c.brand, c.sku)
            ctx = known.get(key)
            if ctx is None:
                ctx = known[key] = self._context(c.brand, c.sku)
            if c.sku:  # (as _context: a candidate without a sku has no market)
                full = ctx.market_prices[c.sku]
                assert isinstance(full, MarketSample)
                ctx = BrandContext(ctx.brand, ctx.authorized_sellers,
                                   {c.sku: full.others(listing_id, self.options.market_size)}, ctx.policy)
            out[c.brand] = ctx
        return out

    def _context(self, brand: str, sku: str | None) -> BrandContext:
        market = {sku: self._market_sample(brand, sku)} if sku else {}
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


def _unwrap(got: ScoreOutcome | Exception) -> ScoreOutcome:
    if isinstance(got, Exception):
        raise got
    return got


def _stack(found: dict[str, np.ndarray], order: Sequence[str], emb: CachedEmbedder) -> Vectors:
    if not order:
        return np.zeros((0, emb.embedder.dim), np.float32)
    return np.stack([found[s] for s in order]).astype(np.float32, copy=False)


def _ordered(matches: Sequence[Match]) -> list[Match]:
    return sorted(matches, key=match_rank)
