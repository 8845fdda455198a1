"""The SQLAlchemy 2 tables of counterlens, portable between SQLite and PostgreSQL.

Every brand-owned row (products, reference images, authorized sellers, listing matches, review items)
carries ``brand_id``; repositories always filter on it, so a brand portal can sit on these tables as
they are.  Listings themselves belong to the platform that sent them, not to a brand.

The Alembic revisions in ``migrations/versions`` create exactly these tables; a test compares the two.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on PostgreSQL (indexable, compact), JSON text on SQLite.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

# Row ids that must be 64-bit on PostgreSQL and the rowid alias on SQLite (``INTEGER PRIMARY KEY``;
# SQLite only aliases the rowid for the exact type name INTEGER).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

Amount = sa.Numeric(16, 4, asdecimal=False)

REFERENCE_KINDS = ("product", "logo")
REVIEW_STATUSES = ("open", "confirmed", "rejected", "cleared")
SCORE_SOURCES = ("api", "rescan", "stored-rescan")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes on both databases.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so values are stored as naive UTC and
    given their zone back on load.  Naive input is refused: a local time silently taken as UTC is a bug.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(), dict[str, Any]: JSONType, list[str]: JSONType,
    }


class Brand(Base):
    __tablename__ = "brands"
    __table_args__ = (
        sa.CheckConstraint("review_threshold IS NULL OR (review_threshold >= 0 AND review_threshold <= 1)",
                           name="review_threshold_range"),
        sa.CheckConstraint("likely_threshold IS NULL OR (likely_threshold >= 0 AND likely_threshold <= 1)",
                           name="likely_threshold_range"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(sa.String(64), unique=True)
    name: Mapped[str] = mapped_column(sa.String(255))
    aliases: Mapped[list[str]] = mapped_column(JSONType)
    review_threshold: Mapped[float | None] = mapped_column(sa.Float)
    likely_threshold: Mapped[float | None] = mapped_column(sa.Float)
    created_at: Mapped[datetime]


class Product(Base):
    __tablename__ = "products"
    __table_args__ = (
        sa.UniqueConstraint("brand_id", "sku"),
        sa.CheckConstraint("(reference_price IS NULL) = (currency IS NULL)", name="price_has_currency"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    brand_id: Mapped[int] = mapped_column(sa.ForeignKey("brands.id", ondelete="CASCADE"))
    sku: Mapped[str] = mapped_column(sa.String(128))
    title: Mapped[str] = mapped_column(sa.String(1000))
    reference_price: Mapped[float | None] = mapped_column(Amount)
    currency: Mapped[str | None] = mapped_column(sa.String(3))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class ReferenceImage(Base):
    """One catalog photo; ``id`` is also its id in the FAISS indexes, so it must never be re-used
    (``sqlite_autoincrement``: SQLite would otherwise hand out the id of a deleted last row again)."""

    __tablename__ = "reference_images"
    __table_args__ = (
        sa.UniqueConstraint("brand_id", "sha256", "kind"),
        sa.Index("ix_reference_images_brand_id_kind", "brand_id", "kind"),
        sa.CheckConstraint("kind IN ('product', 'logo')", name="kind"),
        sa.CheckConstraint("width > 0 AND height > 0", name="size"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    brand_id: Mapped[int] = mapped_column(sa.ForeignKey("brands.id", ondelete="CASCADE"))
    product_id: Mapped[int | None] = mapped_column(sa.ForeignKey("products.id", ondelete="CASCADE"),
                                                   index=True)
    kind: Mapped[str] = mapped_column(sa.String(16), index=True)
    ref_id: Mapped[str | None] = mapped_column(sa.String(255))
    sha256: Mapped[str] = mapped_column(sa.String(64), index=True)
    phash: Mapped[str | None] = mapped_column(sa.String(16))
    width: Mapped[int] = mapped_column(sa.Integer)
    height: Mapped[int] = mapped_column(sa.Integer)
    source: Mapped[str] = mapped_column(sa.String(2048))
    blob_path: Mapped[str | None] = mapped_column(sa.String(255))
    created_at: Mapped[datetime]


class AuthorizedSeller(Base):
    __tablename__ = "authorized_sellers"
    __table_args__ = (sa.UniqueConstraint("brand_id", "seller_id"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    brand_id: Mapped[int] = mapped_column(sa.ForeignKey("brands.id", ondelete="CASCADE"))
    seller_id: Mapped[str] = mapped_column(sa.String(255))
    note: Mapped[str | None] = mapped_column(sa.String(1000))
    created_at: Mapped[datetime]


class Embedding(Base):
    """An embedding per (image content, model id + version); shared by references and listing photos."""

    __tablename__ = "embeddings"

    sha256: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    dim: Mapped[int] = mapped_column(sa.Integer)
    vector: Mapped[bytes] = mapped_column(sa.LargeBinary)  # little-endian float32, ``dim`` of them


class PhotoKeypoints(Base):
    """Local features (keypoints and descriptors) per (image content, extractor id + parameters); shared
    by references and listing photos like the embeddings, so a ``--stored`` rescan verifies without
    pixels. ``data``: ``count`` float32 (x, y) pairs, then ``count`` rows of ``dim`` uint8.

    ``verified`` is the photo's latest verification (JSON ``[[image_id, inliers, box or null], ...]``)
    against the reference set fingerprinted ``verified_refs``; reused only while that is the current one."""

    __tablename__ = "photo_keypoints"

    sha256: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    extractor_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    count: Mapped[int] = mapped_column(sa.Integer)
    dim: Mapped[int] = mapped_column(sa.Integer)
    width: Mapped[int] = mapped_column(sa.Integer)
    height: Mapped[int] = mapped_column(sa.Integer)
    scale: Mapped[float] = mapped_column(sa.Float)
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)
    verified_refs: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    verified: Mapped[str | None] = mapped_column(sa.Text, nullable=True)


class Listing(Base):
    __tablename__ = "listings"
    __table_args__ = (sa.CheckConstraint("(price IS NULL) = (currency IS NULL)", name="price_has_currency"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    listing_id: Mapped[str] = mapped_column(sa.String(255), unique=True)
    title: Mapped[str] = mapped_column(sa.Text)
    description: Mapped[str] = mapped_column(sa.Text)
    price: Mapped[float | None] = mapped_column(Amount)
    currency: Mapped[str | None] = mapped_column(sa.String(3))
    seller_id: Mapped[str | None] = mapped_column(sa.String(255), index=True)
    seller_account_age_days: Mapped[int | None] = mapped_column(sa.BigInteger)
    seller_units_sold_30d: Mapped[int | None] = mapped_column(sa.BigInteger)
    seller_stock: Mapped[int | None] = mapped_column(sa.BigInteger)
    image_sha256s: Mapped[list[str]] = mapped_column(JSONType)
    first_seen: Mapped[datetime]
    # When the platform last sent this listing (api or file rescan); a --stored rescan does not move it.
    last_seen_at: Mapped[datetime] = mapped_column(index=True)
    last_scored_at: Mapped[datetime]
    latest_risk: Mapped[float] = mapped_column(sa.Float)
    latest_verdict: Mapped[str] = mapped_column(sa.String(32))
    latest_brand_id: Mapped[int | None] = mapped_column(sa.ForeignKey("brands.id", ondelete="SET NULL"))
    # sha256 of the latest result's stored form: a re-match that gives the same digest changes nothing.
    latest_digest: Mapped[str | None] = mapped_column(sa.String(64))


class ListingScore(Base):
    """The history: one row per score of a listing, with the whole result as JSON."""

    __tablename__ = "listing_scores"
    __table_args__ = (
        sa.Index("ix_listing_scores_listing_pk_scored_at", "listing_pk", "scored_at"),
        sa.CheckConstraint("source IN ('api', 'rescan', 'stored-rescan')", name="source"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    listing_pk: Mapped[int] = mapped_column(sa.ForeignKey("listings.id", ondelete="CASCADE"))
    scored_at: Mapped[datetime]
    risk: Mapped[float] = mapped_column(sa.Float)
    verdict: Mapped[str] = mapped_column(sa.String(32))
    brand_id: Mapped[int | None] = mapped_column(sa.ForeignKey("brands.id", ondelete="SET NULL"))
    result: Mapped[dict[str, Any]]
    model_versions: Mapped[dict[str, Any]]
    source: Mapped[str] = mapped_column(sa.String(16))


class ListingMatch(Base):
    """The matches of a listing's latest score (replaced on every score): the market-price sample."""

    __tablename__ = "listing_matches"
    __table_args__ = (sa.Index("ix_listing_matches_brand_id_sku", "brand_id", "sku"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    listing_pk: Mapped[int] = mapped_column(sa.ForeignKey("listings.id", ondelete="CASCADE"), index=True)
    brand_id: Mapped[int] = mapped_column(sa.ForeignKey("brands.id", ondelete="CASCADE"))
    sku: Mapped[str | None] = mapped_column(sa.String(128))
    reference_image_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("reference_images.id", ondelete="SET NULL"), index=True)
    ref_id: Mapped[str | None] = mapped_column(sa.String(255))
    kind: Mapped[str] = mapped_column(sa.String(16))
    signal: Mapped[str] = mapped_column(sa.String(16))
    similarity: Mapped[float] = mapped_column(sa.Float)
    image_index: Mapped[int] = mapped_column(sa.Integer)


class ListingMarket(Base):
    """The skus whose market a listing's latest score puts it in (replaced with its matches): those a
    photo shows best, its top copy or lookalike match. ``last_seen_at`` mirrors the listing's, so the
    market-price sample (the newest listings of a sku) is a walk of one index that stops at its limit,
    however many listings the market has; derived from ``listing_matches`` at query time, it cost a
    correlated subquery per match of the sku (10 ms for a sku of 5,657 matches, 102 ms at 105,657)."""

    __tablename__ = "listing_markets"
    __table_args__ = (
        sa.Index("ix_listing_markets_brand_id_sku_last_seen_at_listing_pk", "brand_id", "sku", "last_seen_at",
                 "listing_pk"),
    )

    listing_pk: Mapped[int] = mapped_column(sa.ForeignKey("listings.id", ondelete="CASCADE"), primary_key=True)
    brand_id: Mapped[int] = mapped_column(sa.ForeignKey("brands.id", ondelete="CASCADE"), primary_key=True)
    sku: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    last_seen_at: Mapped[datetime]


class ReviewItem(Base):
    """A listing in one brand's review queue. ``cleared`` is set only by the system (a later score no
    longer flags the listing for this brand); ``confirmed``/``rejected`` only by a brand's decision."""

    __tablename__ = "review_items"
    __table_args__ = (
        sa.UniqueConstraint("brand_id", "listing_pk"),
        sa.Index("ix_review_items_brand_id_status_risk", "brand_id", "status", "risk"),
        sa.CheckConstraint("status IN ('open', 'confirmed', 'rejected', 'cleared')", name="status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    brand_id: Mapped[int] = mapped_column(sa.ForeignKey("brands.id", ondelete="CASCADE"))
    listing_pk: Mapped[int] = mapped_column(sa.ForeignKey("listings.id", ondelete="CASCADE"), index=True)
    score_id: Mapped[int | None] = mapped_column(sa.ForeignKey("listing_scores.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(sa.String(16))
    risk: Mapped[float] = mapped_column(sa.Float)
    verdict: Mapped[str] = mapped_column(sa.String(32))
    reasons: Mapped[list[str]] = mapped_column(JSONType)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    decided_at: Mapped[datetime | None]
    decided_by: Mapped[str | None] = mapped_column(sa.String(255))
