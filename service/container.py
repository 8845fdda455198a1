"""The composition root: settings -> storage -> models -> indexes -> use cases.

Built once by the API lifespan and once by each CLI command; nothing else wires objects together.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from embeddings.keypoints import SiftExtractor, set_opencv_threads
from embeddings.registry import build_image_embedder, build_text_reader
from embeddings.thread_batcher import ModelThreads, ThreadBatcher
from index.keypoint_index import FaissKeypointIndex
from index.logo_templates import TemplateLogoLocator
from index.registry import ReferenceIndexes
from index.runtime import set_search_threads
from service.domain.assessment import ScoringParams
from service.domain.policy import VerdictPolicy
from service.domain.ports import CatalogReader, ImageEmbedder, TextReader
from service.domain.pricing import CurrencyTable
from service.domain.visual import SimilarityRamp, VisualThresholds
from service.intake.fetch import SafeFetcher
from service.intake.loader import ImageLoader
from service.rescan_process import StoredRescanProcess
from service.settings import Settings
from service.storage.blobs import BlobStore
from service.storage.catalog import CatalogRepository
from service.storage.db import Database
from service.storage.embeddings import EmbeddingStore
from service.storage.keypoints import KeypointStore
from service.storage.listings import ListingRepository
from service.usecases.catalog import CatalogChange, CatalogService
from service.usecases.catalog_cache import CachedCatalog
from service.usecases.catalog_watch import CatalogWatcher
from service.usecases.embedding import CachedEmbedder, ModelTime
from service.usecases.keypoints import KeypointMatcher
from service.usecases.listing_input import ListingImageLoader
from service.usecases.logo_templates import LogoTemplateMatcher
from service.usecases.matching import MatchingConfig, ModelRoles, ReferenceMatcher
from service.usecases.rescan import RunRescan, StoredRescanScheduler, rescan_in_this_process
from service.usecases.score_queue import QueueStats, ScoringQueue
from service.usecases.scoring import ListingScorer, ScorerOptions

log = logging.getLogger("counterlens.container")


def scoring_params(settings: Settings) -> ScoringParams:
    s = settings.scoring
    return ScoringParams(
        currencies=CurrencyTable(s.currency_rates),
        visual=VisualThresholds(SimilarityRamp(s.copy_floor, s.copy_certain),
                                SimilarityRamp(s.lookalike_floor, s.lookalike_certain),
                                SimilarityRamp(s.logo_floor, s.logo_certain),
                                SimilarityRamp(s.keypoints_floor, s.keypoints_certain)),
        policy=VerdictPolicy(s.review_threshold, s.likely_threshold),
    )


class BrandPolicyLookup:
    """Per-brand verdict thresholds from the catalog (None: the default policy applies)."""

    def __init__(self, repo: CatalogRepository, default: VerdictPolicy) -> None:
        self._repo = repo
        self._default = default  # the configured policy fills a threshold the brand left unset

    def brand_policy(self, brand: str) -> VerdictPolicy | None:
        b = self._repo.get_brand(brand)
        if b is None or (b.review_threshold is None and b.likely_threshold is None):
            return None
        # A threshold the brand left unset is the configured one, moved so that review <= likely holds:
        # a brand that only lowered its likely threshold below the default review one reviews from there.
        default = self._default
        likely = b.likely_threshold if b.likely_threshold is not None else max(default.likely_threshold,
                                                                               b.review_threshold or 0.0)
        review = b.review_threshold if b.review_threshold is not None else min(default.review_threshold, likely)
        return VerdictPolicy(review, likely)


@dataclass
class Container:
    settings: Settings
    db: Database
    catalog_repo: CatalogRepository
    listings: ListingRepository
    embedding_store: EmbeddingStore
    blobs: BlobStore
    embedders: dict[str, CachedEmbedder]
    roles: ModelRoles
    indexes: ReferenceIndexes
    fetcher: SafeFetcher
    images: ListingImageLoader
    catalog: CatalogService
    scorer: ListingScorer
    stored_rescans: StoredRescanScheduler | None = None
    rescan_process: StoredRescanProcess | None = field(default=None, repr=False)
    catalog_watch: CatalogWatcher | None = None
    _score_queue: ScoringQueue | None = field(default=None, repr=False)
    _score_queue_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def score_queue(self) -> ScoringQueue:
        """The queue the API scores requests through (concurrent requests scored together), started on
        first use: the CLI never starts its threads."""
        with self._score_queue_lock:
            if self._score_queue is None:
                server = self.settings.server
                self._score_queue = ScoringQueue(self.scorer, workers=server.scoring_threads,
                                                 max_batch=server.max_batch_listings,
                                                 slow_workers=server.slow_scoring_threads,
                                                 slow_waiting=server.slow_waiting_listings,
                                                 max_waiting=server.max_waiting_listings,
                                                 prefetch=server.prefetch_embeddings)
            return self._score_queue

    def describe(self) -> dict[str, Any]:
        return {
            "models": {name: {"model_id": e.model_id, "dim": e.embedder.dim, "provider": e.embedder.provider}
                       for name, e in self.embedders.items()},
            "roles": {"copy": self.roles.copy, "semantic": self.roles.semantic, "logo": self.roles.logo},
            "indexes": self.index_sizes(),
            "database": self.db.dialect,
        }

    def model_time(self) -> dict[str, ModelTime]:
        """Per image model: the time its batcher threads have spent in model calls since start (summed)."""
        return {name: ModelTime(b.busy_s, b.cpu_s, e.prefetched, e.withdrawn) for name, e in self.embedders.items()
                if isinstance(b := e.embedder, ThreadBatcher)}

    def queue_stats(self) -> QueueStats | None:
        """The API's scoring queue's counters and state; None before its first request."""
        # Not under _score_queue_lock, which close() holds while the queue drains: a scrape on the event
        # loop must not wait for that. (Reading the attribute is atomic.)
        queue = self._score_queue
        return None if queue is None else queue.stats()

    def index_sizes(self) -> dict[str, int]:
        return {f"{name}/{kind.value}": index.ntotal for name, kind, index in self.indexes}

    def close(self) -> None:
        with self._score_queue_lock:
            if self._score_queue is not None:
                self._score_queue.close()
        if self.catalog_watch is not None:
            self.catalog_watch.close()
        if self.stored_rescans is not None:
            self.stored_rescans.close()
        if self.rescan_process is not None:
            self.rescan_process.close()
        self.indexes.save_dirty()
        for e in self.embedders.values():
            if isinstance(e.embedder, ThreadBatcher):
                e.embedder.close()
        self.fetcher.close()
        self.db.dispose()


def process_share(settings: Settings, processes: int) -> Settings:
    """``settings`` for one of ``processes`` processes that share this machine's cores (API workers,
    rescan worker processes), or the ``models.process_cores`` set: its models sized by its share of
    them (``ModelSettings.for_cores``)."""
    cores = max(1, settings.models.cores() // max(1, processes))
    models = settings.models.for_cores(cores, len(image_model_names(settings)))
    return settings.model_copy(update={"models": models})


def model_source_side(embedders: Iterable[object]) -> int | None:
    """The shorter side a photo needs for every one of these models (the largest ``source_side``); None
    where a model does not say (it then embeds the whole photo)."""
    sides: list[int] = []
    for e in embedders:
        side = getattr(e, "source_side", None)
        if not isinstance(side, int):
            return None
        sides.append(side)
    return max(sides) if sides else None


def _model_pool(settings: Settings, embedders: dict[str, ImageEmbedder]) -> ModelThreads | None:
    """The model threads the image models share (``models.shared_threads``), or None where each keeps a
    thread of its own (on a GPU by default, and wherever a model waits for company)."""
    m = settings.models
    provider = "cpu" if all(e.provider == "cpu" for e in embedders.values()) else "cuda"
    shared = m.shared_threads_for(provider, m.cores(), m.intra_threads_for(len(embedders)))
    if shared is None or m.wait_ms_for(provider) > 0 or not embedders:
        return None
    return ModelThreads(shared)


def image_model_names(settings: Settings) -> list[str]:
    """The distinct image models the settings load (a role may share another role's model)."""
    roles = _roles(settings)
    return list(dict.fromkeys(n for n in (roles.copy, roles.semantic, roles.logo) if n))


def build_embedders(settings: Settings) -> tuple[dict[str, ImageEmbedder], ModelRoles]:
    m = settings.models
    roles = _roles(settings)
    names = image_model_names(settings)
    m = m.model_copy(update={"intra_op_threads": m.intra_threads_for(len(names))})
    built: dict[str, ImageEmbedder] = {}
    for name in names:
        built[name] = build_image_embedder(name, settings.models_dir, m)
        log.info("model loaded", extra={"model": name, "model_id": built[name].model_id,
                                        "provider": built[name].provider})
    return built, roles


def build_container(settings: Settings, *, reconcile: bool = True,
                    embedders: dict[str, ImageEmbedder] | None = None,
                    background_rescans: bool = False, watch_catalog: bool = False, warm: bool = False) -> Container:
    """Everything the API and the CLI need. ``embedders`` lets tests share already-built models.

    ``background_rescans`` (the API): catalog changes start stored rescans in the background
    (re-matching stored listings near new product references, or a brand's listings after a removal or a
    change of its prices or sellers), in a child process or a thread (``server.background_rescans``).
    A CLI import exits at once instead; docs/rescan.md shows the `rescan --stored` cron for it.
    ``watch_catalog`` (the API): catalog changes made by other processes (other workers, a CLI import) are
    patched into this process's indexes every ``server.catalog_sync_s`` seconds (CatalogWatcher).
    ``warm`` (the API): what scoring loads on first use (the keypoint index, the logo templates, the
    catalog facts) is loaded now, so that no request waits for it (``ListingScorer.warm_up``)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    set_search_threads(settings.index.search_threads)
    set_opencv_threads(settings.keypoints.opencv_threads)
    db = Database(settings.database_url, echo=settings.storage.echo_sql)
    db.migrate()
    catalog_repo = CatalogRepository(db)
    listings = ListingRepository(db)
    store = EmbeddingStore(db)
    blobs = BlobStore(settings.data_dir / "blobs")
    raw, roles = (embedders, _roles(settings)) if embedders is not None else build_embedders(settings)
    # Concurrent listings (API requests, rescan workers) share model batches, and the models share their
    # threads (models.shared_threads).
    m = settings.models
    pool = _model_pool(settings, raw)
    batchers = {name: ThreadBatcher(e, max_batch=m.max_batch, max_wait_ms=m.wait_ms_for(e.provider),
                                    run_batch=m.run_batch_for(e.provider, getattr(e, "fixed_batch", None)),
                                    pool=pool)
                for name, e in raw.items()}
    cached = {name: CachedEmbedder(b, store) for name, b in batchers.items()}
    indexes = ReferenceIndexes(settings.index_dir, settings.index)
    fetcher = SafeFetcher(settings.intake)
    params = scoring_params(settings)
    catalog_view = CachedCatalog(catalog_repo, BrandPolicyLookup(catalog_repo, params.policy).brand_policy)
    keypoints = build_keypoints(settings, KeypointStore(db), catalog_view)
    logo_templates = build_logo_templates(settings, catalog_view)
    matcher = ReferenceMatcher(
        lambda name, kind: _open_or_none(indexes, cached, name, kind), catalog_view, roles,
        MatchingConfig(top_k=settings.index.top_k))
    ocr: TextReader | None = None if settings.models.ocr == "never" else build_text_reader(settings.models)
    scorer = ListingScorer(
        copy=cached[roles.copy], semantic=cached[roles.semantic] if roles.semantic else None,
        logo=cached[roles.logo], matcher=matcher, catalog=catalog_view, history=listings,
        policies=catalog_view, ocr=ocr, params=params,
        options=ScorerOptions(logo_search=settings.scoring.logo_search, ocr=settings.models.ocr,
                              keypoints=settings.keypoints.mode, logo_templates=settings.logo_templates.mode,
                              logo_templates_every_up_to=settings.logo_templates.cascade_every_logo_up_to),
        recorder=listings, keypoints=keypoints, logo_templates=logo_templates)
    catalog = CatalogService(catalog_repo, blobs, indexes, cached, roles, settings.intake, fetcher,
                             on_change=scorer.catalog_changed, keypoints=keypoints, logo_templates=logo_templates)
    if reconcile:
        catalog.reconcile()
    if warm:
        scorer.warm_up()
    container = Container(settings=settings, db=db, catalog_repo=catalog_repo, listings=listings,
                          embedding_store=store, blobs=blobs, embedders=cached, roles=roles, indexes=indexes,
                          fetcher=fetcher, images=ListingImageLoader(
                              ImageLoader(settings.intake, fetcher),
                              model_side=model_source_side(raw.values()) if settings.models.reduced_decode else None),
                          catalog=catalog, scorer=scorer)
    if background_rescans:
        if settings.server.background_rescans == "process":
            container.rescan_process = StoredRescanProcess(settings, nice=settings.server.background_rescan_nice)
            run: RunRescan = container.rescan_process
        else:
            run = rescan_in_this_process(scorer, listings)
        scheduler = StoredRescanScheduler(run)
        container.stored_rescans = scheduler
        catalog.listeners.append(lambda ch: _request_rescan(scheduler, ch))
    if watch_catalog and settings.server.catalog_sync_s > 0:
        container.catalog_watch = CatalogWatcher(catalog, settings.server.catalog_sync_s)
    return container


def build_keypoints(settings: Settings, store: KeypointStore, catalog: CatalogReader) -> KeypointMatcher | None:
    """The keypoints signal's parts, or None when ``keypoints.mode`` is "never" (then no reference is
    described either)."""
    if settings.keypoints.mode == "never":
        return None
    extractor, index = build_keypoint_parts(settings)
    return KeypointMatcher(extractor, store, index, catalog, min_inliers=settings.keypoints.min_inliers)


def build_keypoint_parts(settings: Settings) -> tuple[SiftExtractor, FaissKeypointIndex]:
    """The keypoint extractor and an empty reference index, as ``keypoints`` configures them."""
    k = settings.keypoints
    extractor = SiftExtractor(max_side=k.max_side, min_side=k.min_side, max_features=k.max_features)
    return extractor, FaissKeypointIndex(ratio=k.ratio, exact_max=k.exact_max, hnsw_ef_search=k.hnsw_ef_search)


def build_logo_locator(settings: Settings) -> TemplateLogoLocator:
    t = settings.logo_templates
    return TemplateLogoLocator(work_side=t.work_side, min_width=t.min_width, max_width=t.max_width,
                               colour_sigma=t.colour_sigma, candidates=t.candidates)


def build_logo_templates(settings: Settings, catalog: CatalogReader) -> LogoTemplateMatcher | None:
    """Logo search by template, or None when ``logo_templates.mode`` is "never"."""
    if settings.logo_templates.mode == "never":
        return None
    return LogoTemplateMatcher(build_logo_locator(settings), catalog)


def _request_rescan(scheduler: StoredRescanScheduler, change: CatalogChange) -> None:
    if change.added_logos or change.names:
        scheduler.request()  # a logo may appear in any stored listing's crops, a brand's name in any title
    elif change.added_products:
        scheduler.request(near_references=change.added_products)
    if change.removed or change.terms:
        scheduler.request(brand=change.brand)


def _roles(settings: Settings) -> ModelRoles:
    m = settings.models
    return ModelRoles(copy=m.copy_model, semantic=m.semantic_model or None, logo=m.logo_model or m.copy_model)


def _open_or_none(indexes: ReferenceIndexes, cached: dict[str, CachedEmbedder], name: str,
                  kind: Any) -> Any:
    emb = cached.get(name)
    if emb is None:
        return None
    return indexes.open(name, kind, model_id=emb.model_id, dim=emb.embedder.dim)
