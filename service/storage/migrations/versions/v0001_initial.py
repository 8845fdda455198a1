"""Initial schema: brands, products, reference images, authorized sellers, embeddings, listings, their
score history and latest matches, and the brands' review queues.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Types spelled here, not imported from models.py: a revision must keep meaning what it meant when it
# was written, whatever the models become.
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
AMOUNT = sa.Numeric(16, 4, asdecimal=False)


def _ts(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _fk(table: str, column: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [target], name=op.f(f"fk_{table}_{column}"), ondelete=ondelete)


def upgrade() -> None:
    op.create_table(
        "brands",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("slug", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("aliases", JSON, nullable=False),
        sa.Column("review_threshold", sa.Float(), nullable=True),
        sa.Column("likely_threshold", sa.Float(), nullable=True),
        _ts("created_at"),
        sa.CheckConstraint("likely_threshold IS NULL OR (likely_threshold >= 0 AND likely_threshold <= 1)",
                           name=op.f("ck_brands_likely_threshold_range")),
        sa.CheckConstraint("review_threshold IS NULL OR (review_threshold >= 0 AND review_threshold <= 1)",
                           name=op.f("ck_brands_review_threshold_range")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_brands")),
        sa.UniqueConstraint("slug", name=op.f("uq_brands_slug")),
    )
    op.create_table(
        "embeddings",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", "model_id", name=op.f("pk_embeddings")),
    )
    op.create_table(
        "authorized_sellers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("brand_id", sa.Integer(), nullable=False),
        sa.Column("seller_id", sa.String(255), nullable=False),
        sa.Column("note", sa.String(1000), nullable=True),
        _ts("created_at"),
        _fk("authorized_sellers", "brand_id", "brands.id", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_authorized_sellers")),
        sa.UniqueConstraint("brand_id", "seller_id", name=op.f("uq_authorized_sellers_brand_id_seller_id")),
    )
    op.create_table(
        "listings",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("listing_id", sa.String(255), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("price", AMOUNT, nullable=True),
        sa.Column("currency", sa.String(3), nullable=True),
        sa.Column("seller_id", sa.String(255), nullable=True),
        sa.Column("seller_account_age_days", sa.BigInteger(), nullable=True),
        sa.Column("seller_units_sold_30d", sa.BigInteger(), nullable=True),
        sa.Column("seller_stock", sa.BigInteger(), nullable=True),
        sa.Column("image_sha256s", JSON, nullable=False),
        _ts("first_seen"),
        _ts("last_seen_at"),
        _ts("last_scored_at"),
        sa.Column("latest_risk", sa.Float(), nullable=False),
        sa.Column("latest_verdict", sa.String(32), nullable=False),
        sa.Column("latest_brand_id", sa.Integer(), nullable=True),
        sa.CheckConstraint("(price IS NULL) = (currency IS NULL)",
                           name=op.f("ck_listings_price_has_currency")),
        _fk("listings", "latest_brand_id", "brands.id", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_listings")),
        sa.UniqueConstraint("listing_id", name=op.f("uq_listings_listing_id")),
    )
    op.create_index(op.f("ix_listings_last_seen_at"), "listings", ["last_seen_at"])
    op.create_index(op.f("ix_listings_seller_id"), "listings", ["seller_id"])
    op.create_table(
        "products",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("brand_id", sa.Integer(), nullable=False),
        sa.Column("sku", sa.String(128), nullable=False),
        sa.Column("title", sa.String(1000), nullable=False),
        sa.Column("reference_price", AMOUNT, nullable=True),
        sa.Column("currency", sa.String(3), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.CheckConstraint("(reference_price IS NULL) = (currency IS NULL)",
                           name=op.f("ck_products_price_has_currency")),
        _fk("products", "brand_id", "brands.id", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_products")),
        sa.UniqueConstraint("brand_id", "sku", name=op.f("uq_products_brand_id_sku")),
    )
    op.create_table(
        "listing_scores",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("listing_pk", BIG_ID, nullable=False),
        _ts("scored_at"),
        sa.Column("risk", sa.Float(), nullable=False),
        sa.Column("verdict", sa.String(32), nullable=False),
        sa.Column("brand_id", sa.Integer(), nullable=True),
        sa.Column("result", JSON, nullable=False),
        sa.Column("model_versions", JSON, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.CheckConstraint("source IN ('api', 'rescan', 'stored-rescan')",
                           name=op.f("ck_listing_scores_source")),
        _fk("listing_scores", "brand_id", "brands.id", "SET NULL"),
        _fk("listing_scores", "listing_pk", "listings.id", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_listing_scores")),
    )
    op.create_index("ix_listing_scores_listing_pk_scored_at", "listing_scores", ["listing_pk", "scored_at"])
    op.create_table(
        "reference_images",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("brand_id", sa.Integer(), nullable=False),
        sa.Column("product_id", BIG_ID, nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref_id", sa.String(255), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("phash", sa.String(16), nullable=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(2048), nullable=False),
        sa.Column("blob_path", sa.String(255), nullable=True),
        _ts("created_at"),
        sa.CheckConstraint("kind IN ('product', 'logo')", name=op.f("ck_reference_images_kind")),
        sa.CheckConstraint("width > 0 AND height > 0", name=op.f("ck_reference_images_size")),
        _fk("reference_images", "brand_id", "brands.id", "CASCADE"),
        _fk("reference_images", "product_id", "products.id", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reference_images")),
        sa.UniqueConstraint("brand_id", "sha256", "kind",
                            name=op.f("uq_reference_images_brand_id_sha256_kind")),
        # Ids are FAISS ids: never hand out the id of a deleted row again.
        sqlite_autoincrement=True,
    )
    op.create_index("ix_reference_images_brand_id_kind", "reference_images", ["brand_id", "kind"])
    op.create_index(op.f("ix_reference_images_kind"), "reference_images", ["kind"])
    op.create_index(op.f("ix_reference_images_product_id"), "reference_images", ["product_id"])
    op.create_index(op.f("ix_reference_images_sha256"), "reference_images", ["sha256"])
    op.create_table(
        "listing_matches",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("listing_pk", BIG_ID, nullable=False),
        sa.Column("brand_id", sa.Integer(), nullable=False),
        sa.Column("sku", sa.String(128), nullable=True),
        sa.Column("reference_image_id", BIG_ID, nullable=True),
        sa.Column("ref_id", sa.String(255), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("signal", sa.String(16), nullable=False),
        sa.Column("similarity", sa.Float(), nullable=False),
        sa.Column("image_index", sa.Integer(), nullable=False),
        _fk("listing_matches", "brand_id", "brands.id", "CASCADE"),
        _fk("listing_matches", "listing_pk", "listings.id", "CASCADE"),
        _fk("listing_matches", "reference_image_id", "reference_images.id", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_listing_matches")),
    )
    op.create_index("ix_listing_matches_brand_id_sku", "listing_matches", ["brand_id", "sku"])
    op.create_index(op.f("ix_listing_matches_listing_pk"), "listing_matches", ["listing_pk"])
    op.create_index(op.f("ix_listing_matches_reference_image_id"), "listing_matches", ["reference_image_id"])
    op.create_table(
        "review_items",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("brand_id", sa.Integer(), nullable=False),
        sa.Column("listing_pk", BIG_ID, nullable=False),
        sa.Column("score_id", BIG_ID, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("risk", sa.Float(), nullable=False),
        sa.Column("verdict", sa.String(32), nullable=False),
        sa.Column("reasons", JSON, nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("decided_at", nullable=True),
        sa.Column("decided_by", sa.String(255), nullable=True),
        sa.CheckConstraint("status IN ('open', 'confirmed', 'rejected', 'cleared')",
                           name=op.f("ck_review_items_status")),
        _fk("review_items", "brand_id", "brands.id", "CASCADE"),
        _fk("review_items", "listing_pk", "listings.id", "CASCADE"),
        _fk("review_items", "score_id", "listing_scores.id", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_items")),
        sa.UniqueConstraint("brand_id", "listing_pk", name=op.f("uq_review_items_brand_id_listing_pk")),
    )
    op.create_index("ix_review_items_brand_id_status_risk", "review_items", ["brand_id", "status", "risk"])
    op.create_index(op.f("ix_review_items_listing_pk"), "review_items", ["listing_pk"])


def downgrade() -> None:
    for table in ("review_items", "listing_matches", "reference_images", "listing_scores", "products",
                  "listings", "authorized_sellers", "embeddings", "brands"):
        op.drop_table(table)
