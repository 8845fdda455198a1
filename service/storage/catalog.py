"""The brands' catalogs: brands, products, reference images, authorized sellers.

:class:`CatalogRepository` serves the catalog commands and the brand portal (every call names the brand
it acts for, and a row of another brand is "not found") and implements the domain port
:class:`~service.domain.ports.CatalogReader` that scoring reads through.

Each public method is one short transaction of its own, so one repository can be shared by threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import PurePosixPath

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.domain.model import Money, ReferenceInfo, ReferenceKind
from service.storage import validate
from service.storage._sql import chunked, dialect_insert
from service.storage.db import Database
from service.storage.errors import ConflictError, InvalidInputError, NotFoundError
from service.storage.models import (
    AuthorizedSeller,
    Brand,
    Product,
    ReferenceImage,
    ReviewItem,
    utcnow,
)
from service.storage.records import (
    KEEP,
    BrandRecord,
    BrandStats,
    CatalogExport,
    Keep,
    ProductRecord,
    ReferenceRecord,
    RemovedReferences,
    ReviewStatus,
    SellerRecord,
)


def _brand_record(b: Brand) -> BrandRecord:
    return BrandRecord(id=b.id, slug=b.slug, name=b.name, aliases=tuple(b.aliases or ()),
                       review_threshold=b.review_threshold, likely_threshold=b.likely_threshold,
                       created_at=b.created_at)


def _money(amount: float | None, currency: str | None) -> Money | None:
    return None if amount is None or currency is None else Money(float(amount), currency)


def _product_record(p: Product, brand: str) -> ProductRecord:
    return ProductRecord(id=p.id, brand=brand, sku=p.sku, title=p.title,
                         reference_price=_money(p.reference_price, p.currency),
                         created_at=p.created_at, updated_at=p.updated_at)


def _reference_record(r: ReferenceImage, brand: str, sku: str | None) -> ReferenceRecord:
    return ReferenceRecord(id=r.id, brand=brand, kind=ReferenceKind(r.kind), sku=sku, ref_id=r.ref_id,
                           sha256=r.sha256, phash=r.phash, width=r.width, height=r.height, source=r.source,
                           blob_path=r.blob_path, created_at=r.created_at)


def _reference_from_row(row: sa.Row[ReferenceImage, str, str]) -> ReferenceRecord:
    # (reference, brand slug, product sku or None: the product join is an outer join)
    return _reference_record(row[0], row[1], row[2])


def _seller_record(s: AuthorizedSeller, brand: str) -> SellerRecord:
    return SellerRecord(brand=brand, seller_id=s.seller_id, note=s.note, created_at=s.created_at)


def _blob_path(value: str | None) -> str | None:
    if value is None:
        return None
    validate.text(value, "blob_path", 255)
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or "\\" in value:
        raise InvalidInputError(f"blob_path must be relative to the blob store, got {value!r}", "blob_path")
    return value


def _sku(value: str) -> str:
    return validate.text(value, "sku", 128).strip()


def _reference_query() -> sa.Select[ReferenceImage, str, str]:
    return (sa.select(ReferenceImage, Brand.slug, Product.sku)
            .join(Brand, Brand.id == ReferenceImage.brand_id)
            .outerjoin(Product, Product.id == ReferenceImage.product_id))


class CatalogRepository:
    """Brands, products, reference images and authorized sellers; also the ``CatalogReader`` port."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # The scoring path's statements, built once (building costs more than running them on SQLite).
        self._references = (
            sa.select(ReferenceImage.id, ReferenceImage.kind, ReferenceImage.ref_id, Brand.slug, Product.sku,
                      Product.title, Product.reference_price, Product.currency)
            .join(Brand, Brand.id == ReferenceImage.brand_id)
            .outerjoin(Product, Product.id == ReferenceImage.product_id)
            .where(ReferenceImage.id.in_(sa.bindparam("p_ids", expanding=True))))
        self._sellers = (sa.select(AuthorizedSeller.seller_id)
                         .join(Brand, Brand.id == AuthorizedSeller.brand_id)
                         .where(Brand.slug == sa.bindparam("p_brand")))

    # ------------------------------------------------------------------ brands

    def create_brand(self, slug: str, name: str, aliases: Iterable[str] = (), *,
                     review_threshold: float | None = None,
                     likely_threshold: float | None = None) -> BrandRecord:
        """A new brand; :class:`ConflictError` if the slug is taken."""
        slug = validate.slug(slug, "slug")
        name = validate.text(name, "name", 255).strip()
        names = validate.aliases(aliases)
        review, likely = validate.thresholds(review_threshold, likely_threshold)
        with self._db.write() as s:
            stmt = (dialect_insert(s, Brand)
                    .values(slug=slug, name=name, aliases=names, review_threshold=review,
                            likely_threshold=likely, created_at=utcnow())
                    .on_conflict_do_nothing(index_elements=["slug"]).returning(Brand.id))
            if s.execute(stmt).scalar_one_or_none() is None:
                raise ConflictError(f"brand {slug!r} already exists", "slug")
            return _brand_record(self._brand(s, slug))

    def get_or_create_brand(self, slug: str, name: str | None = None,
                            aliases: Iterable[str] = ()) -> tuple[BrandRecord, bool]:
        """The brand, created with ``name`` (default: the slug) and ``aliases`` if it does not exist yet.
        An existing brand is returned unchanged. The bool says whether it was created."""
        slug = validate.slug(slug, "slug")
        display = validate.text(name, "name", 255).strip() if name is not None else slug
        names = validate.aliases(aliases)
        with self._db.write() as s:
            stmt = (dialect_insert(s, Brand)
                    .values(slug=slug, name=display, aliases=names, created_at=utcnow())
                    .on_conflict_do_nothing(index_elements=["slug"]).returning(Brand.id))
            created = s.execute(stmt).scalar_one_or_none() is not None
            return _brand_record(self._brand(s, slug)), created

    def get_brand(self, slug: str) -> BrandRecord | None:
        slug = validate.slug(slug)
        with self._db.read() as s:
            b = s.scalars(sa.select(Brand).where(Brand.slug == slug)).one_or_none()
            return None if b is None else _brand_record(b)

    def list_brands(self) -> list[BrandRecord]:
        with self._db.read() as s:
            return [_brand_record(b) for b in s.scalars(sa.select(Brand).order_by(Brand.slug))]

    def update_brand(self, slug: str, *, name: str | None = None, aliases: Iterable[str] | None = None,
                     review_threshold: float | Keep | None = KEEP,
                     likely_threshold: float | Keep | None = KEEP) -> tuple[BrandRecord, BrandRecord]:
        """Change what is given of a brand (None or ``KEEP``: left as it is; a threshold set to None falls
        back to the service-wide setting). The thresholds are checked as they will be stored, the one
        given with the one kept. Answers the brand before and after, read in the same transaction."""
        slug = validate.slug(slug)
        display = validate.text(name, "name", 255).strip() if name is not None else None
        names = validate.aliases(aliases) if aliases is not None else None
        with self._db.write() as s:
            b = self._brand(s, slug)
            before = _brand_record(b)
            review = before.review_threshold if review_threshold is KEEP else review_threshold
            likely = before.likely_threshold if likely_threshold is KEEP else likely_threshold
            b.review_threshold, b.likely_threshold = validate.thresholds(review, likely)
            if display is not None:
                b.name = display
            if names is not None:
                b.aliases = names
            s.flush()
            return before, _brand_record(b)

    # ------------------------------------------------------------------ products

    def upsert_product(self, brand: str, sku: str, title: str,
                       reference_price: Money | None = None) -> tuple[ProductRecord, bool]:
        """Creates the product or updates its title and reference price; the bool says "created"."""
        sku = _sku(sku)
        title = validate.text(title, "title", 1000, allow_empty=True).strip()
        amount, currency = validate.money(reference_price, "reference_price")
        now = utcnow()
        with self._db.write() as s:
            bid = self._brand_id(s, brand)
            stmt = (dialect_insert(s, Product)
                    .values(brand_id=bid, sku=sku, title=title, reference_price=amount, currency=currency,
                            created_at=now, updated_at=now)
                    .on_conflict_do_nothing(index_elements=["brand_id", "sku"]).returning(Product.id))
            created = s.execute(stmt).scalar_one_or_none() is not None
            p = s.scalars(sa.select(Product).where(Product.brand_id == bid, Product.sku == sku)).one()
            if not created and (p.title, p.reference_price, p.currency) != (title, amount, currency):
                p.title, p.reference_price, p.currency, p.updated_at = title, amount, currency, now
                s.flush()
            return _product_record(p, brand), created

    def get_product(self, brand: str, sku: str) -> ProductRecord | None:
        sku = _sku(sku)
        with self._db.read() as s:
            p = s.scalars(sa.select(Product).join(Brand, Brand.id == Product.brand_id)
                          .where(Brand.slug == validate.slug(brand), Product.sku == sku)).one_or_none()
            return None if p is None else _product_record(p, brand)

    def list_products(self, brand: str) -> list[ProductRecord]:
        with self._db.read() as s:
            bid = self._brand_id(s, brand)
            rows = s.scalars(sa.select(Product).where(Product.brand_id == bid).order_by(Product.sku))
            return [_product_record(p, brand) for p in rows]

    def delete_product(self, brand: str, sku: str) -> RemovedReferences:
        """Deletes the product and its reference images; :class:`NotFoundError` if the brand has no
        such product."""
        sku = _sku(sku)
        with self._db.write() as s:
            bid = self._brand_id(s, brand)
            pid = s.scalar(sa.select(Product.id).where(Product.brand_id == bid, Product.sku == sku))
            if pid is None:
                raise NotFoundError(f"brand {brand!r} has no product {sku!r}", "sku")
            rows = s.execute(sa.select(ReferenceImage.id, ReferenceImage.sha256)
                             .where(ReferenceImage.product_id == pid)).all()
            removed = self._delete_reference_rows(s, [(r[0], r[1]) for r in rows])
            s.execute(sa.delete(Product).where(Product.id == pid))
            return removed

    # ------------------------------------------------------------------ reference images

    def add_reference(self, brand: str, *, sha256: str, kind: ReferenceKind | str, width: int,
                      height: int, source: str, sku: str | None = None, ref_id: str | None = None,
                      phash: int | str | None = None,
                      blob_path: str | None = None) -> tuple[ReferenceRecord, bool]:
        """Adds a reference image of the brand (of product ``sku`` when given, which must exist).

        The same bytes (sha256) of the same kind already in the brand's catalog are a no-op: the
        existing row is returned with ``False``, and nothing about it changes.
        """
        sha = validate.sha256(sha256)
        kind_ = validate.kind(kind)
        w = validate.positive_int(width, "width")
        h = validate.positive_int(height, "height")
        src = validate.text(source, "source", 2048)
        rid = validate.optional_text(ref_id, "ref_id", 255)
        ph = validate.phash(phash)
        blob = _blob_path(blob_path)
        sku_ = _sku(sku) if sku is not None else None
        with self._db.write() as s:
            bid = self._brand_id(s, brand)
            pid: int | None = None
            if sku_ is not None:
                pid = s.scalar(sa.select(Product.id).where(Product.brand_id == bid, Product.sku == sku_))
                if pid is None:
                    raise NotFoundError(f"brand {brand!r} has no product {sku_!r}", "sku")
            stmt = (dialect_insert(s, ReferenceImage)
                    .values(brand_id=bid, product_id=pid, kind=kind_.value, ref_id=rid, sha256=sha,
                            phash=ph, width=w, height=h, source=src, blob_path=blob, created_at=utcnow())
                    .on_conflict_do_nothing(index_elements=["brand_id", "sha256", "kind"])
                    .returning(ReferenceImage.id))
            created = s.execute(stmt).scalar_one_or_none() is not None
            row = s.execute(_reference_query().where(
                ReferenceImage.brand_id == bid, ReferenceImage.sha256 == sha,
                ReferenceImage.kind == kind_.value)).one()
            return _reference_from_row(row), created

    def get_reference(self, brand: str, image_id: int) -> ReferenceRecord | None:
        with self._db.read() as s:
            row = s.execute(_reference_query().where(Brand.slug == validate.slug(brand),
                                                     ReferenceImage.id == int(image_id))).one_or_none()
            return None if row is None else _reference_from_row(row)

    def list_references(self, brand: str, kind: ReferenceKind | str | None = None, sku: str | None = None,
                        limit: int | None = None, offset: int = 0) -> list[ReferenceRecord]:
        """The brand's references in id order, optionally of one kind and/or one product, optionally
        one page of them."""
        if limit is not None:
            validate.page(limit, offset, max_limit=10_000)
        with self._db.read() as s:
            bid = self._brand_id(s, brand)
            q = _reference_query().where(ReferenceImage.brand_id == bid)
            if kind is not None:
                q = q.where(ReferenceImage.kind == validate.kind(kind).value)
            if sku is not None:
                q = q.where(Product.sku == _sku(sku))
            q = q.order_by(ReferenceImage.id)
            if limit is not None:
                q = q.limit(limit).offset(offset)
            return [_reference_from_row(row) for row in s.execute(q)]

    def delete_references(self, brand: str, image_ids: Iterable[int]) -> RemovedReferences:
        """Deletes those of ``image_ids`` that belong to the brand (others are ignored: another brand's
        id is indistinguishable from a missing one) and says which were removed."""
        wanted = sorted({int(i) for i in image_ids})
        with self._db.write() as s:
            bid = self._brand_id(s, brand)
            rows: list[tuple[int, str]] = []
            for chunk in chunked(wanted):
                rows += [(r[0], r[1]) for r in s.execute(
                    sa.select(ReferenceImage.id, ReferenceImage.sha256)
                    .where(ReferenceImage.brand_id == bid, ReferenceImage.id.in_(chunk)))]
            return self._delete_reference_rows(s, rows)

    def ids_for_kind(self, kind: ReferenceKind | str) -> list[int]:
        """Every reference id of the kind, all brands, ascending: what an index of that kind must hold."""
        k = validate.kind(kind).value
        with self._db.read() as s:
            return list(s.scalars(sa.select(ReferenceImage.id).where(ReferenceImage.kind == k)
                                  .order_by(ReferenceImage.id)))

    def reference_set_version(self) -> tuple[int, int, int]:
        """(count, max id, sum of ids) of the reference images: changes whenever a reference is added
        (ids only grow: AUTOINCREMENT) or deleted, so another process can tell cheaply that its indexes
        are behind the database."""
        with self._db.reading() as conn:
            row = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.max(ReferenceImage.id), 0),
                                         sa.func.coalesce(sa.func.sum(ReferenceImage.id), 0))).one()
        return int(row[0]), int(row[1]), int(row[2])

    def iter_reference_hashes(self, kind: ReferenceKind | str,
                              batch_size: int = 2000) -> Iterator[tuple[int, str]]:
        """(id, sha256) of every reference of the kind in id order, read in pages of short transactions
        (a reindex may embed for minutes between pages without holding the database)."""
        k = validate.kind(kind).value
        last = -1
        while True:
            with self._db.read() as s:
                page = [(r[0], r[1]) for r in s.execute(
                    sa.select(ReferenceImage.id, ReferenceImage.sha256)
                    .where(ReferenceImage.kind == k, ReferenceImage.id > last)
                    .order_by(ReferenceImage.id).limit(batch_size))]
            yield from page
            if len(page) < batch_size:
                return
            last = page[-1][0]

    # ------------------------------------------------------------------ authorized sellers

    def add_authorized_seller(self, brand: str, seller_id: str,
                              note: str | None = None) -> tuple[SellerRecord, bool]:
        """Authorizes the seller for the brand; an existing authorization is kept as it is (False)."""
        sid = validate.text(seller_id, "seller_id", 255).strip()
        note_ = validate.optional_text(note, "note", 1000)
        with self._db.write() as s:
            bid = self._brand_id(s, brand)
            stmt = (dialect_insert(s, AuthorizedSeller)
                    .values(brand_id=bid, seller_id=sid, note=note_, created_at=utcnow())
                    .on_conflict_do_nothing(index_elements=["brand_id", "seller_id"])
                    .returning(AuthorizedSeller.id))
            created = s.execute(stmt).scalar_one_or_none() is not None
            row = s.scalars(sa.select(AuthorizedSeller).where(AuthorizedSeller.brand_id == bid,
                                                              AuthorizedSeller.seller_id == sid)).one()
            return _seller_record(row, brand), created

    def list_authorized_sellers(self, brand: str) -> list[SellerRecord]:
        with self._db.read() as s:
            bid = self._brand_id(s, brand)
            rows = s.scalars(sa.select(AuthorizedSeller).where(AuthorizedSeller.brand_id == bid)
                             .order_by(AuthorizedSeller.seller_id))
            return [_seller_record(r, brand) for r in rows]

    def remove_authorized_seller(self, brand: str, seller_id: str) -> bool:
        sid = validate.text(seller_id, "seller_id", 255).strip()
        with self._db.write() as s:
            bid = self._brand_id(s, brand)
            res = s.execute(sa.delete(AuthorizedSeller).where(AuthorizedSeller.brand_id == bid,
                                                              AuthorizedSeller.seller_id == sid))
            return bool(res.rowcount)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ reports

    def stats(self) -> list[BrandStats]:
        """Counts per brand (products, references per kind, sellers, open review items), by slug."""
        with self._db.read() as s:
            brands = list(s.execute(sa.select(Brand.id, Brand.slug).order_by(Brand.slug)))

            def per_brand(q: sa.Select[int, int]) -> dict[int, int]:
                return {r[0]: r[1] for r in s.execute(q)}

            products = per_brand(sa.select(Product.brand_id, sa.func.count()).group_by(Product.brand_id))
            refs = {(r[0], r[1]): r[2] for r in s.execute(
                sa.select(ReferenceImage.brand_id, ReferenceImage.kind, sa.func.count())
                .group_by(ReferenceImage.brand_id, ReferenceImage.kind))}
            sellers = per_brand(sa.select(AuthorizedSeller.brand_id, sa.func.count())
                                .group_by(AuthorizedSeller.brand_id))
            open_items = per_brand(sa.select(ReviewItem.brand_id, sa.func.count())
                                   .where(ReviewItem.status == ReviewStatus.OPEN.value)
                                   .group_by(ReviewItem.brand_id))
            return [BrandStats(brand=slug, products=products.get(bid, 0),
                               product_references=refs.get((bid, ReferenceKind.PRODUCT.value), 0),
                               logo_references=refs.get((bid, ReferenceKind.LOGO.value), 0),
                               authorized_sellers=sellers.get(bid, 0),
                               open_review_items=open_items.get(bid, 0))
                    for bid, slug in brands]

    def export_brand(self, brand: str) -> CatalogExport:
        """Everything of one brand's catalog, read in one consistent snapshot (for ``catalog export``)."""
        slug = validate.slug(brand)
        with self._db.read() as s:
            b = self._brand(s, slug)
            products = [_product_record(p, slug) for p in s.scalars(
                sa.select(Product).where(Product.brand_id == b.id).order_by(Product.sku))]
            refs = [_reference_from_row(row) for row in s.execute(
                _reference_query().where(ReferenceImage.brand_id == b.id).order_by(ReferenceImage.id))]
            sellers = [_seller_record(r, slug) for r in s.scalars(
                sa.select(AuthorizedSeller).where(AuthorizedSeller.brand_id == b.id)
                .order_by(AuthorizedSeller.seller_id))]
            return CatalogExport(brand=_brand_record(b), products=products, references=refs,
                                 sellers=sellers)

    # ------------------------------------------------------------------ CatalogReader port

    def references(self, image_ids: Iterable[int]) -> dict[int, ReferenceInfo]:
        """What scoring needs of each reference id found in an index; unknown ids (deleted since the
        index was built) are absent."""
        ids = sorted({int(i) for i in image_ids})
        out: dict[int, ReferenceInfo] = {}
        if not ids:
            return out
        with self._db.reading() as conn:
            for chunk in chunked(ids):
                for rid, kind, ref_id, slug, sku, title, price, currency in conn.execute(
                        self._references, {"p_ids": chunk}):
                    out[rid] = ReferenceInfo(image_id=rid, brand=slug, kind=ReferenceKind(kind), sku=sku,
                                             ref_id=ref_id, title=title,
                                             reference_price=_money(price, currency))
        return out

    def authorized_sellers(self, brand: str) -> frozenset[str]:
        """The brand's authorized seller ids (empty for an unknown brand)."""
        with self._db.reading() as conn:
            return frozenset(conn.scalars(self._sellers, {"p_brand": brand}))

    def brand_aliases(self) -> dict[str, list[str]]:
        """brand slug -> [display name, *aliases]."""
        return {b.slug: b.names for b in self.list_brands()}

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _brand(s: Session, slug: str) -> Brand:
        b = s.scalars(sa.select(Brand).where(Brand.slug == slug)).one_or_none()
        if b is None:
            raise NotFoundError(f"brand {slug!r} not found", "brand")
        return b

    @staticmethod
    def _brand_id(s: Session, slug: str) -> int:
        bid = s.scalar(sa.select(Brand.id).where(Brand.slug == validate.slug(slug)))
        if bid is None:
            raise NotFoundError(f"brand {slug!r} not found", "brand")
        return bid

    @staticmethod
    def _delete_reference_rows(s: Session, rows: Sequence[tuple[int, str]]) -> RemovedReferences:
        ids = sorted(r[0] for r in rows)
        for chunk in chunked(ids):
            s.execute(sa.delete(ReferenceImage).where(ReferenceImage.id.in_(chunk)))
        shas = sorted({r[1] for r in rows})
        still_used: set[str] = set()
        for sha_chunk in chunked(shas):
            still_used.update(s.scalars(sa.select(ReferenceImage.sha256).distinct()
                                        .where(ReferenceImage.sha256.in_(sha_chunk))))
        return RemovedReferences(ids=tuple(ids),
                                 unreferenced_sha256s=tuple(x for x in shas if x not in still_used))
