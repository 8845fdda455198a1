"""Alembic migrations of the counterlens schema, applied by :func:`service.storage.db.migrate`."""
