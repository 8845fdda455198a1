"""Alembic environment: runs the revisions on the connection :func:`service.storage.db.migrate_engine`
passes in ``config.attributes["connection"]`` (online only; there is no offline SQL generation)."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from service.storage.models import Base

config = context.config
connection = config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations through service.storage.db.migrate(), which passes a connection")

# render_as_batch: SQLite can only change a table by copying it; autogenerate then writes batch ops.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
