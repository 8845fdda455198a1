"""A digest of each listing's latest result, so a ``--stored`` rescan can leave unchanged listings alone.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable: rows scored before this revision have no digest, and their next rescan rewrites them.
    with op.batch_alter_table("listings") as batch:
        batch.add_column(sa.Column("latest_digest", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("listings") as batch:
        batch.drop_column("latest_digest")
