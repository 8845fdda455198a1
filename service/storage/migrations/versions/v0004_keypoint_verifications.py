"""Each described photo's latest keypoint verification, so a process that starts (a ``--stored`` rescan,
a restarted server) does not verify again what an earlier one verified against the same references.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable: a photo described but never verified, or described before this revision, has none.
    with op.batch_alter_table("photo_keypoints") as batch:
        batch.add_column(sa.Column("verified_refs", sa.String(64), nullable=True))
        batch.add_column(sa.Column("verified", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("photo_keypoints") as batch:
        batch.drop_column("verified")
        batch.drop_column("verified_refs")
