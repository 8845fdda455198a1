"""Brand catalogs: brands, products and their reference prices, authorized sellers, adding and deleting
reference images, importing manifests, reindexing.

Every change to the catalog updates the indexes before it returns (and saves them), so the next score
sees it. Reference bytes are kept in the content-addressed blob store so ``reindex`` can re-embed them
after a model change; embeddings are stored per (sha256, model_id), so nothing is embedded twice.

Every change that can move a stored listing's score is announced to ``listeners`` as a
:class:`CatalogChange` (the API's background stored rescans listen): new references, removed ones, and
a brand's terms (a product's reference price, its authorized sellers).
"""

from __future__ import annotations

import csv
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index.registry import Reconciliation, ReferenceIndexes
from service.domain.model import ListingImage, Money, ReferenceKind, RGBImage
from service.intake.errors import IntakeError
from service.intake.fetch import SafeFetcher
from service.intake.hashing import phash
from service.intake.images import DecodedImage, ImageLimits, decode_image
from service.storage.blobs import BlobStore
from service.storage.catalog import CatalogRepository
from service.storage.errors import StorageError
from service.storage.records import (
    KEEP,
    BrandRecord,
    Keep,
    ProductRecord,
    ReferenceRecord,
    RemovedReferences,
    SellerRecord,
)
from service.usecases.embedding import CachedEmbedder
from service.usecases.keypoints import KeypointMatcher
from service.usecases.logo_templates import LogoTemplateMatcher
from service.usecases.matching import LOGO_ID_STRIDE, ModelRoles, derived_key, logo_variants

log = logging.getLogger("counterlens.catalog")
_SYNC_TRIES = 3  # sync() calls on one reference-set version before it gives up waiting for stored data

MANIFEST_COLUMNS = ("brand", "sku", "kind", "image", "ref_id", "title", "price", "currency")
Progress = Callable[[int], None]


class CatalogInputError(ValueError):
    """Bad catalog input, naming the field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class ReferenceUpload:
    brand: str
    kind: ReferenceKind
    data: bytes
    source: str
    sku: str | None = None
    ref_id: str | None = None
    title: str | None = None
    price: Money | None = None
    field: str = "image"


@dataclass(frozen=True, slots=True)
class AddedReference:
    reference: ReferenceRecord
    created: bool


@dataclass(frozen=True, slots=True)
class CatalogChange:
    """What a catalog change touched, for listeners (the background stored rescans)."""

    brand: str
    added_products: tuple[str, ...] = ()  # sha256s of new product references
    added_logos: bool = False
    removed: bool = False
    # A reference price, an authorized seller or a verdict threshold of the brand changed: the brand's
    # stored listings keep their matches, but their readings (and so their verdicts) may not hold any more.
    terms: bool = False
    # The brand's name or aliases changed: any stored listing's title may name it now, or no longer.
    names: bool = False


@dataclass(slots=True)
class ImportReport:
    rows: int = 0
    added: int = 0
    duplicates: int = 0
    brands_created: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def _logo_ids(image_ids: Iterable[int], variants: int) -> np.ndarray:
    return np.array([i * LOGO_ID_STRIDE + v for i in image_ids for v in range(variants)], np.int64)


class CatalogService:
    def __init__(self, repo: CatalogRepository, blobs: BlobStore, indexes: ReferenceIndexes,
                 embedders: dict[str, CachedEmbedder], roles: ModelRoles, limits: ImageLimits,
                 fetcher: SafeFetcher | None = None,
                 on_change: Callable[[], None] | None = None,
                 keypoints: KeypointMatcher | None = None,
                 logo_templates: LogoTemplateMatcher | None = None) -> None:
        self.repo = repo
        self.blobs = blobs
        self.indexes = indexes
        self.embedders = embedders  # by model name
        self.roles = roles
        self.limits = limits
        self.fetcher = fetcher
        self._on_change = on_change
        self.keypoints = keypoints  # None: the keypoints signal is off
        if keypoints is not None:
            keypoints.loading.loader = lambda: self._index_keypoints(describe=False)
        self.logo_templates = logo_templates  # None: no logo search by template
        if logo_templates is not None:
            logo_templates.loading.loader = self._index_logo_templates
        self.listeners: list[Callable[[CatalogChange], None]] = []
        # One writer at a time: the database row, the blob and the index entry change together.
        self._write = threading.Lock()
        # The reference set (repo.reference_set_version) the in-memory indexes were last made to agree
        # with; None: never (a lazily loading process). See sync().
        self._synced: tuple[int, int, int] | None = None
        self._sync_tries: tuple[tuple[int, int, int] | None, int] = (None, 0)
        n = len(logo_variants(np.zeros((4, 4, 3), np.uint8)))
        assert n <= LOGO_ID_STRIDE
        self.logo_variant_count = n

    # ------------------------------------------------------------------ which model serves which index

    def _product_models(self) -> list[str]:
        names = [self.roles.copy]
        if self.roles.semantic is not None and self.roles.semantic not in names:
            names.append(self.roles.semantic)
        return names

    def index_plan(self) -> list[tuple[str, ReferenceKind]]:
        return [(m, ReferenceKind.PRODUCT) for m in self._product_models()] + [
            (self.roles.logo, ReferenceKind.LOGO)]

    # ------------------------------------------------------------------ adding

    def fetch_url(self, url: str, field: str) -> bytes:
        if self.fetcher is None:
            raise CatalogInputError("fetching URLs is not configured", field)
        return self.fetcher.fetch_sync(url, field).content

    def decode(self, data: bytes, field: str) -> DecodedImage:
        return decode_image(data, self.limits, field)

    def add(self, uploads: Sequence[ReferenceUpload], *, save: bool = True) -> list[AddedReference]:
        """Add reference images (all or none are decoded first: bad bytes fail before anything is
        stored). Duplicates (same bytes, same brand and kind) return the existing row, created False."""
        decoded = [self.decode(u.data, u.field) for u in uploads]
        out: list[AddedReference] = []
        repriced: set[str] = set()  # brands an upload gave an existing product a new reference price
        with self._write:
            for u, img in zip(uploads, decoded, strict=True):
                added, price_changed = self._add_one(u, img)
                out.append(added)
                if price_changed:
                    repriced.add(added.reference.brand)
            if save:
                self.indexes.save_dirty()
        if any(a.created for a in out) or repriced:
            if self._on_change:
                self._on_change()
            for brand in dict.fromkeys([*(a.reference.brand for a in out if a.created), *sorted(repriced)]):
                new = [a.reference for a in out if a.created and a.reference.brand == brand]
                self._notify(CatalogChange(
                    brand, added_products=tuple(r.sha256 for r in new if r.kind is ReferenceKind.PRODUCT),
                    added_logos=any(r.kind is ReferenceKind.LOGO for r in new), terms=brand in repriced))
        return out

    # ------------------------------------------------------------------ brands, products, sellers

    def create_brand(self, slug: str, name: str, aliases: Iterable[str] = (), *,
                     review_threshold: float | None = None, likely_threshold: float | None = None) -> BrandRecord:
        """A new brand (:class:`ConflictError` if the slug is taken). Its names reach the text signal of
        the next score, and of stored listings whose titles already name it: announced as ``names``, like
        a new alias (a listing offering a "replica" of the brand before it joined belongs in its queue)."""
        brand = self.repo.create_brand(slug, name, aliases, review_threshold=review_threshold,
                                       likely_threshold=likely_threshold)
        self._announce(CatalogChange(brand.slug, names=True))
        return brand

    def update_brand(self, slug: str, *, name: str | None = None, aliases: Iterable[str] | None = None,
                     review_threshold: float | Keep | None = KEEP,
                     likely_threshold: float | Keep | None = KEEP) -> BrandRecord:
        """Change a brand's display name, aliases or verdict thresholds (what is not given is kept; a
        threshold set to None falls back to the service-wide one).

        New thresholds move the verdicts of the brand's stored listings: a terms change, so they are read
        again. A new name or alias reaches the text signal of any listing, so a changed name announces
        ``names`` (the API's listener then re-reads every stored listing)."""
        before, after = self.repo.update_brand(slug, name=name, aliases=aliases,
                                               review_threshold=review_threshold,
                                               likely_threshold=likely_threshold)
        thresholds = (before.review_threshold, before.likely_threshold) != (after.review_threshold,
                                                                            after.likely_threshold)
        names = before.names != after.names
        if thresholds or names:
            self._announce(CatalogChange(after.slug, terms=thresholds, names=names))
        return after

    def put_product(self, brand: str, sku: str, title: str, price: Money | None) -> tuple[ProductRecord, bool]:
        """Create or update a product (the bool says "created"). A new reference price of an existing
        product is a change of the brand's terms: its stored listings are read again."""
        with self._write:
            product, created, repriced = self._put_product(brand, sku, title, price,
                                                           self.repo.get_product(brand, sku))
        if repriced:
            self._announce(CatalogChange(brand, terms=True))
        elif self._on_change:
            self._on_change()  # (a title, or a product no reference shows yet: no stored score moves)
        return product, created

    def _put_product(self, brand: str, sku: str, title: str, price: Money | None,
                     before: ProductRecord | None) -> tuple[ProductRecord, bool, bool]:
        """Upsert the product; also answers whether ``before`` (the product as stored, read by the caller
        under the write lock) had another reference price."""
        product, created = self.repo.upsert_product(brand, sku, title, price)
        repriced = before is not None and before.reference_price != product.reference_price
        return product, created, repriced

    def authorize_seller(self, brand: str, seller_id: str, note: str | None = None) -> tuple[SellerRecord, bool]:
        """Authorize a seller for the brand (an existing authorization is kept: False). Its stored listings
        of the brand are read again: an authorized seller lowers their risk."""
        seller, created = self.repo.add_authorized_seller(brand, seller_id, note)
        if created:  # (an authorization repeated changes nothing a score reads)
            self._announce(CatalogChange(brand, terms=True))
        return seller, created

    def revoke_seller(self, brand: str, seller_id: str) -> bool:
        """Withdraw a seller's authorization; False where it had none."""
        removed = self.repo.remove_authorized_seller(brand, seller_id)
        if removed:
            self._announce(CatalogChange(brand, terms=True))
        return removed

    def _announce(self, change: CatalogChange) -> None:
        """One change of one brand: the scorer's catalog view is dropped, then the listeners hear of it."""
        if self._on_change:
            self._on_change()
        self._notify(change)

    def _notify(self, change: CatalogChange) -> None:
        for listener in self.listeners:
            try:
                listener(change)
            except Exception:  # a listener's failure must not undo or fail the catalog change
                log.exception("catalog listener failed", extra={"brand": change.brand})

    def _add_one(self, u: ReferenceUpload, img: DecodedImage) -> tuple[AddedReference, bool]:
        """The reference added (or found), and whether its upload gave an existing product a new reference
        price."""
        self.repo.get_or_create_brand(u.brand)
        repriced = False
        if u.sku:
            existing = self.repo.get_product(u.brand, u.sku)
            if existing is None or u.title or u.price is not None:
                _, _, repriced = self._put_product(u.brand, u.sku, u.title if u.title is not None else
                                                   (existing.title if existing else ""),
                                                   u.price if u.price is not None else
                                                   (existing.reference_price if existing else None), existing)
        blob = self.blobs.put(u.data, img.sha256)
        h, w = img.pixels.shape[:2]
        record, created = self.repo.add_reference(
            u.brand, sha256=img.sha256, kind=u.kind, width=w, height=h, source=u.source, sku=u.sku or None,
            ref_id=u.ref_id or None, phash=phash(img.pixels), blob_path=self.blobs.relative_path(blob))
        if created:
            self._index([record], [img.pixels])
        return AddedReference(record, created), repriced

    def _index(self, records: Sequence[ReferenceRecord], pixels: Sequence[RGBImage]) -> None:
        """Embed (through the cache) and add to the indexes; the caller saves."""
        products = [(r, p) for r, p in zip(records, pixels, strict=True) if r.kind is ReferenceKind.PRODUCT]
        logos = [(r, p) for r, p in zip(records, pixels, strict=True) if r.kind is ReferenceKind.LOGO]
        if products:
            ids = np.array([r.id for r, _ in products], np.int64)
            images = [ListingImage(r.sha256, p) for r, p in products]
            for model in self._product_models():
                emb = self.embedders[model]
                self._open(model, ReferenceKind.PRODUCT).add(ids, emb.embed(images).vectors)
        if logos:
            images, ids_list = [], []
            for r, p in logos:
                for v, variant in enumerate(logo_variants(p)):
                    images.append(ListingImage(derived_key(r.sha256, f"logo-variant:{v}"), variant))
                    ids_list.append(r.id * LOGO_ID_STRIDE + v)
            emb = self.embedders[self.roles.logo]
            self._open(self.roles.logo, ReferenceKind.LOGO).add(np.array(ids_list, np.int64),
                                                                emb.embed(images).vectors)
        if self.keypoints is not None:
            self.keypoints.add_references([(r.id, r.sha256, p) for r, p in zip(records, pixels, strict=True)])
        if self.logo_templates is not None and logos:
            self.logo_templates.add_references([(r.id, r.brand, p) for r, p in logos])

    def _open(self, model: str, kind: ReferenceKind):  # type: ignore[no-untyped-def]
        emb = self.embedders[model]
        return self.indexes.open(model, kind, model_id=emb.model_id, dim=emb.embedder.dim)

    # ------------------------------------------------------------------ deleting

    def _unindex(self, removed: RemovedReferences, kinds: dict[int, ReferenceKind]) -> None:
        product_ids = np.array([i for i in removed.ids if kinds.get(i) is ReferenceKind.PRODUCT], np.int64)
        logo_ids = [i for i in removed.ids if kinds.get(i) is ReferenceKind.LOGO]
        if product_ids.size:
            for model in self._product_models():
                self._open(model, ReferenceKind.PRODUCT).remove(product_ids)
        if logo_ids:
            self._open(self.roles.logo, ReferenceKind.LOGO).remove(_logo_ids(logo_ids, LOGO_ID_STRIDE))
        if self.keypoints is not None:
            self.keypoints.remove_references(removed.ids)
        if self.logo_templates is not None and logo_ids:
            self.logo_templates.remove_references(logo_ids)
        self.indexes.save_dirty()
        for sha in removed.unreferenced_sha256s:
            self.blobs.delete(sha)

    def delete_references(self, brand: str, image_ids: Iterable[int]) -> RemovedReferences:
        ids = list(image_ids)
        with self._write:
            kinds = {r.id: r.kind for r in (self.repo.get_reference(brand, i) for i in ids) if r is not None}
            removed = self.repo.delete_references(brand, ids)
            self._unindex(removed, kinds)
        if removed.ids:
            if self._on_change:
                self._on_change()
            self._notify(CatalogChange(brand, removed=True))
        return removed

    def delete_product(self, brand: str, sku: str) -> RemovedReferences:
        with self._write:
            kinds = {r.id: r.kind for r in self.repo.list_references(brand) if r.sku == sku}
            removed = self.repo.delete_product(brand, sku)
            self._unindex(removed, kinds)
        if self._on_change:
            self._on_change()
        self._notify(CatalogChange(brand, removed=True))
        return removed

    # ------------------------------------------------------------------ manifests

    def import_manifest(self, manifest: Path, progress: Progress | None = None) -> ImportReport:
        """Import ``brand, sku, kind, image, ref_id, title, price, currency`` rows. Bad rows are reported
        with their line number and skipped; re-running the same manifest adds nothing."""
        report = ImportReport()
        base = manifest.parent
        known_brands = {b.slug for b in self.repo.list_brands()}
        try:
            fh = manifest.open(newline="", encoding="utf-8-sig")
        except OSError as exc:
            raise CatalogInputError(f"cannot read manifest: {exc.strerror}", "manifest") from None
        with fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("brand", "kind", "image") if c not in (reader.fieldnames or [])]
            if missing:
                raise CatalogInputError(f"manifest lacks the column(s) {', '.join(missing)}", "manifest")
            for row in reader:
                line = reader.line_num
                report.rows += 1
                try:
                    upload = self._row_upload(row, base, line)
                    if upload.brand not in known_brands:
                        known_brands.add(upload.brand)
                        report.brands_created += 1
                    added = self.add([upload], save=False)[0]
                    if added.created:
                        report.added += 1
                    else:
                        report.duplicates += 1
                except (CatalogInputError, IntakeError, StorageError, ValueError) as exc:
                    report.errors.append((line, str(exc)))
                if progress:
                    progress(1)
        with self._write:
            self.indexes.save_dirty()
        return report

    def _row_upload(self, row: dict[str, str | None], base: Path, line: int) -> ReferenceUpload:
        def col(name: str) -> str:
            return (row.get(name) or "").strip()

        brand = col("brand").lower()
        if not brand:
            raise CatalogInputError("brand is empty", "brand")
        try:
            kind = ReferenceKind(col("kind").lower() or "product")
        except ValueError:
            raise CatalogInputError(f"kind must be product or logo, not {col('kind')!r}", "kind") from None
        image = col("image")
        if not image:
            raise CatalogInputError("image is empty", "image")
        if image.startswith(("http://", "https://")):
            data = self.fetch_url(image, "image")
        else:
            path = (base / image).resolve()
            # A manifest may only name files beside it or below: never /etc/passwd or ../../secrets.
            if not path.is_relative_to(base.resolve()):
                raise CatalogInputError(f"{image!r} is outside the manifest's folder", "image")
            if not path.is_file():
                raise CatalogInputError(f"no such file {image!r}", "image")
            if path.stat().st_size > self.limits.max_image_bytes:
                raise CatalogInputError(f"{image!r} is larger than {self.limits.max_image_bytes} bytes", "image")
            data = path.read_bytes()
        price: Money | None = None
        if col("price"):
            try:
                amount = float(col("price"))
            except ValueError:
                raise CatalogInputError(f"price {col('price')!r} is not a number", "price") from None
            if not amount >= 0 or amount != amount or amount == float("inf"):
                raise CatalogInputError(f"price {col('price')!r} must be a finite number >= 0", "price")
            price = Money(amount, (col("currency") or "USD").upper())
        sku = col("sku") or None
        if kind is ReferenceKind.PRODUCT and sku is None:
            raise CatalogInputError("a product reference needs a sku", "sku")
        return ReferenceUpload(brand=brand, kind=kind, data=data, source=f"manifest:{image}"[:500], sku=sku,
                               ref_id=col("ref_id") or None, title=col("title") or None, price=price)

    # ------------------------------------------------------------------ start-up and reindex

    def _expected(self, kind: ReferenceKind) -> tuple[list[int], dict[int, str], dict[int, str]]:
        """Vector ids the index of a kind must hold, the embedding key of each, and the sha256 of each
        reference image."""
        keys: dict[int, str] = {}
        shas = dict(self.repo.iter_reference_hashes(kind))
        for image_id, sha in shas.items():
            if kind is ReferenceKind.LOGO:
                for v in range(self.logo_variant_count):
                    keys[image_id * LOGO_ID_STRIDE + v] = derived_key(sha, f"logo-variant:{v}")
            else:
                keys[image_id] = sha
        return sorted(keys), keys, shas

    def reindex(self, progress: Progress | None = None) -> list[Reconciliation]:
        """After a model change: embed every reference the current models have no stored embedding of
        (from the stored blobs) and rebuild the indexes. Embeddings of earlier model versions stay in
        the store (a rollback re-uses them) until pruned."""
        return self.reconcile(progress)

    def reconcile(self, progress: Progress | None = None) -> list[Reconciliation]:
        """At start: make every index agree with the database, from stored embeddings. References whose
        embedding for the current model is not stored yet (a new model) are embedded from their blobs."""
        done = []
        with self._write:
            self._synced = self.repo.reference_set_version()  # read first: a later change is caught up later
            for model, kind in self.index_plan():
                emb = self.embedders[model]
                ids, keys, shas = self._expected(kind)
                left_out = self._embed_missing(model, kind, keys, shas, progress)
                if left_out:  # references whose image could not be read to embed (logged there)
                    keys = {i: k for i, k in keys.items() if k not in left_out}
                    ids = sorted(keys)

                def stored(wanted: np.ndarray, _emb: CachedEmbedder = emb,
                           _keys: dict[int, str] = keys) -> np.ndarray:
                    ks = [_keys[int(i)] for i in wanted]
                    got = _emb.lookup(ks)
                    return np.stack([got[k] for k in ks]).astype(np.float32)

                rec = self.indexes.reconcile(model, kind, model_id=emb.model_id, dim=emb.embedder.dim,
                                             ids=ids, stored_vectors=stored)
                log.info("index %s", rec.describe())
                done.append(rec)
            if self.keypoints is not None:
                self._index_keypoints(describe=True, progress=progress)
            if self.logo_templates is not None:
                self._index_logo_templates()
        return done

    # ------------------------------------------------------------------ other processes' changes

    def sync(self) -> bool:
        """Catch up with references other processes added or deleted (another API worker, a CLI import):
        the in-memory indexes, keypoints and logo templates are patched from what those processes stored
        (embeddings, features, blobs); nothing is embedded or saved here. One cheap query when nothing
        changed. Answers whether anything was patched.

        A reference whose embedding or keypoints are not stored yet (its process is still describing it)
        is left for the next call: the version is recorded once everything expected was found, or after
        ``_SYNC_TRIES`` calls on one version (a reference that can never be described, an unreadable
        image, must not make every call patch again)."""
        if self.repo.reference_set_version() == self._synced:
            return False
        with self._write:
            version = self.repo.reference_set_version()
            if version == self._synced:
                return False
            complete = self._catch_up()
            tries = self._sync_tries[1] + 1 if self._sync_tries[0] == version else 1
            self._sync_tries = (version, tries)
            if complete or tries >= _SYNC_TRIES:
                if not complete:
                    log.warning("some references have no stored embedding or keypoints; left out of this "
                                "process's indexes until the next catalog change or restart")
                self._synced = version
        if self._on_change:
            self._on_change()
        return True

    def _catch_up(self) -> bool:
        complete = True
        for model, kind in self.index_plan():
            emb = self.embedders[model]
            ids, keys, _ = self._expected(kind)
            new = {int(i) for i in np.setdiff1d(ids, self._open(model, kind).ids())}
            got = emb.lookup([keys[i] for i in new])  # only what this process has not indexed yet
            ready = [i for i in ids if i not in new or keys[i] in got]
            complete &= len(ready) == len(ids)

            def stored(wanted: np.ndarray, _got: dict[str, np.ndarray] = got,
                       _keys: dict[int, str] = keys) -> np.ndarray:
                return np.stack([_got[_keys[int(i)]] for i in wanted])

            added, removed = self.indexes.patch(model, kind, ready, stored)
            if added or removed:
                log.info("caught up with other processes", extra={"index": f"{model}/{kind.value}",
                                                                  "added": added, "removed": removed})
        if self.keypoints is not None:
            expected = self._reference_hashes()
            self.keypoints.reconcile(expected, None)
            complete &= all(i in self.keypoints.index for i in expected)
        if self.logo_templates is not None:
            self._index_logo_templates()
        return complete

    def _index_logo_templates(self) -> None:
        """Make templates of every logo reference from its stored image (they are not stored)."""
        assert self.logo_templates is not None
        shas = dict(self.repo.iter_reference_hashes(ReferenceKind.LOGO))
        refs = self.repo.references(shas) if shas else {}
        expected = {i: (refs[i].brand, sha) for i, sha in shas.items() if i in refs}
        n = self.logo_templates.reconcile(expected, self._stored_pixels)
        log.info("logo templates: %d of %d logos", n, len(expected))

    def _stored_pixels(self, sha256: str) -> RGBImage | None:
        """A stored reference image decoded, or None (logged) where its blob is missing, corrupt or no
        longer decodes under the current limits."""
        try:
            return self.decode(self.blobs.get(sha256), "blob").pixels
        except (StorageError, CatalogInputError, IntakeError) as exc:
            log.warning("reference image %s cannot be read: %s", sha256[:12], exc)
            return None

    def _reference_hashes(self) -> dict[int, str]:
        """image id -> sha256 of every reference, products and logos."""
        return {i: sha for kind in ReferenceKind for i, sha in self.repo.iter_reference_hashes(kind)}

    def _index_keypoints(self, *, describe: bool, progress: Progress | None = None) -> None:
        """Fill the keypoint index with every reference, describing those without stored keypoints from
        their blobs when ``describe``."""
        assert self.keypoints is not None
        expected = self._reference_hashes()
        pixels = self._stored_pixels if describe else None
        described = self.keypoints.reconcile(expected, pixels, progress)
        log.info("keypoint index: %d references, %d described now", len(expected), described)

    def _embed_missing(self, model: str, kind: ReferenceKind, keys: dict[int, str], shas: dict[int, str],
                       progress: Progress | None) -> set[str]:
        """Embed (from their blobs) the references of ``keys`` (vector id -> embedding key) without a
        stored embedding. Answers the keys still without one: references whose image cannot be read
        (logged), which the caller leaves out of the index."""
        emb = self.embedders[model]
        have = emb.lookup(list(keys.values()))

        def image_id(i: int) -> int:
            return i if kind is ReferenceKind.PRODUCT else i // LOGO_ID_STRIDE

        todo = sorted({image_id(i) for i, k in keys.items() if k not in have})
        if not todo:
            return set()
        log.info("embedding %d %s references for %s", len(todo), kind.value, emb.model_id)
        unreadable: set[int] = set()
        for start in range(0, len(todo), 32):
            chunk = todo[start:start + 32]
            images: list[ListingImage] = []
            for i in chunk:
                sha = shas[i]
                px = self._stored_pixels(sha)
                if px is None:
                    unreadable.add(i)  # left out of the index (logged), the others are indexed
                    continue
                if kind is ReferenceKind.LOGO:
                    images += [ListingImage(derived_key(sha, f"logo-variant:{v}"), variant)
                               for v, variant in enumerate(logo_variants(px))]
                else:
                    images.append(ListingImage(sha, px))
            emb.embed(images)
            if progress:
                progress(len(chunk))
        return {k for i, k in keys.items() if image_id(i) in unreadable}
