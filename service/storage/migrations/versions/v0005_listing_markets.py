"""The skus whose market each listing is in, with the listing's last_seen_at: the market-price sample
becomes a walk of one index that stops at its limit, instead of a correlated subquery per match of the sku.

Filled from the latest matches already stored, by the rule scoring applies to new ones: a listing is in
the market of each sku that one of its photos shows best (its top copy or lookalike match).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

# Spelled here, not imported from models.py (see 0001).
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_BACKFILL = """
INSERT INTO listing_markets (listing_pk, brand_id, sku, last_seen_at)
SELECT DISTINCT m.listing_pk, m.brand_id, m.sku, l.last_seen_at
FROM listing_matches m JOIN listings l ON l.id = m.listing_pk
WHERE m.sku IS NOT NULL AND m.signal IN ('copy', 'lookalike')
  AND m.similarity >= (SELECT max(r.similarity) FROM listing_matches r
                       WHERE r.listing_pk = m.listing_pk AND r.signal = m.signal
                         AND r.image_index = m.image_index)
"""


def upgrade() -> None:
    op.create_table(
        "listing_markets",
        sa.Column("listing_pk", BIG_ID, nullable=False),
        sa.Column("brand_id", sa.Integer(), nullable=False),
        sa.Column("sku", sa.String(128), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["listing_pk"], ["listings.id"], name=op.f("fk_listing_markets_listing_pk"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["brand_id"], ["brands.id"], name=op.f("fk_listing_markets_brand_id"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("listing_pk", "brand_id", "sku", name=op.f("pk_listing_markets")),
    )
    op.create_index("ix_listing_markets_brand_id_sku_last_seen_at_listing_pk", "listing_markets",
                    ["brand_id", "sku", "last_seen_at", "listing_pk"])
    op.execute(_BACKFILL)


def downgrade() -> None:
    op.drop_index("ix_listing_markets_brand_id_sku_last_seen_at_listing_pk", table_name="listing_markets")
    op.drop_table("listing_markets")
