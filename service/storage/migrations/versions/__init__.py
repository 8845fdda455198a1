"""Alembic revisions, oldest first; Alembic loads them by path and ignores this file."""
