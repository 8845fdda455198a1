"""Small SQL helpers shared by the repositories: the dialect's INSERT (for ON CONFLICT, which SQLite
and PostgreSQL both spell the same way) and chunking of long IN lists."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, TypeVar

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

T = TypeVar("T")

# Far below SQLite's bound-parameter limit (32766) and PostgreSQL's (65535), and small enough to keep
# statements cheap to compile.
IN_CHUNK = 500


def dialect_insert(where: Session | str, table: Any) -> sqlite.Insert | postgresql.Insert:
    """``INSERT`` with ``on_conflict_do_nothing`` / ``on_conflict_do_update`` for the database of a
    session, or of a dialect name."""
    name = where if isinstance(where, str) else where.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"unsupported database dialect {name!r}")


def chunked(items: Iterable[T], size: int = IN_CHUNK) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
