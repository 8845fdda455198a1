"""The errors the storage layer raises, each naming the input field it concerns.

The API maps them onto HTTP answers (not found -> 404, conflict -> 409, invalid -> 422) and the CLI onto
messages; a database driver's own exception never leaves this package for a case a caller can cause.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error this package raises on purpose; ``field`` names the offending input."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInputError(StorageError, ValueError):
    """A value a caller passed is malformed (bad slug, hash, currency, threshold, ...)."""


class NotFoundError(StorageError, LookupError):
    """The brand, product, reference, listing or review item does not exist *for the brand asked*.

    A row owned by another brand is reported exactly like a missing one, so a brand cannot probe for
    another brand's ids.
    """


class ConflictError(StorageError):
    """The row already exists (for example a brand slug taken)."""


class WriteLockTimeoutError(StorageError, TimeoutError):
    """A SQLite writer waited longer than the busy timeout for another writer (a hung process?)."""
