"""Checks of caller input before it reaches SQL: slugs, content hashes, currencies, perceptual hashes.

Every check raises :class:`~service.storage.errors.InvalidInputError` naming the field, so the API can
tell a platform or a brand exactly which value was wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from service.domain.model import Money, ReferenceKind
from service.storage.errors import InvalidInputError

_SLUG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_PHASH = re.compile(r"[0-9a-f]{16}")
_KINDS = tuple(k.value for k in ReferenceKind)


def slug(value: object, field: str = "brand") -> str:
    """A brand slug: 1-64 characters of ``[a-z0-9-]``, not starting or ending with ``-``."""
    if not isinstance(value, str) or not _SLUG.fullmatch(value):
        raise InvalidInputError(
            f"{field} must be a slug of 1-64 characters [a-z0-9-] not starting or ending with '-', "
            f"got {value!r}",
            field,
        )
    return value


def sha256(value: object, field: str = "sha256") -> str:
    """A lower-case hex sha256. Also what keeps a blob path inside its store (no ``/`` or ``..``)."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise InvalidInputError(f"{field} must be 64 lower-case hex characters, got {value!r}", field)
    return value


def text(value: object, field: str, max_len: int, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{field} must be a string, got {type(value).__name__}", field)
    if not allow_empty and not value.strip():
        raise InvalidInputError(f"{field} must not be empty", field)
    if len(value) > max_len:
        raise InvalidInputError(f"{field} must be at most {max_len} characters, got {len(value)}", field)
    return value


def optional_text(value: object, field: str, max_len: int) -> str | None:
    return None if value is None else text(value, field, max_len)


def currency(value: object, field: str = "currency") -> str:
    if not isinstance(value, str) or not _CURRENCY.fullmatch(value):
        raise InvalidInputError(f"{field} must be an ISO 4217 code of 3 upper-case letters, got {value!r}",
                                field)
    return value


def money(value: Money | None, field: str) -> tuple[float | None, str | None]:
    """(amount, currency) columns of an optional price; the amount must be finite and not negative."""
    if value is None:
        return None, None
    amount = value.amount
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount) \
            or amount < 0:
        raise InvalidInputError(f"{field}.amount must be a finite number >= 0, got {amount!r}",
                                f"{field}.amount")
    return float(amount), currency(value.currency, f"{field}.currency")


def phash(value: int | str | None, field: str = "phash") -> str | None:
    """A 64-bit perceptual hash, stored as 16 lower-case hex digits (portable: no unsigned BIGINT)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInputError(f"{field} must be a 64-bit integer or 16 hex digits", field)
    if isinstance(value, int):
        if not 0 <= value < 1 << 64:
            raise InvalidInputError(f"{field} must fit in 64 unsigned bits, got {value}", field)
        return f"{value:016x}"
    if isinstance(value, str) and _PHASH.fullmatch(value.lower()):
        return value.lower()
    raise InvalidInputError(f"{field} must be a 64-bit integer or 16 hex digits, got {value!r}", field)


def threshold(value: float | None, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise InvalidInputError(f"{field} must be a number in [0, 1], got {value!r}", field)
    return float(value)


def thresholds(review: float | None, likely: float | None) -> tuple[float | None, float | None]:
    r = threshold(review, "review_threshold")
    lk = threshold(likely, "likely_threshold")
    if r is not None and lk is not None and r > lk:
        raise InvalidInputError("review_threshold must not exceed likely_threshold", "review_threshold")
    return r, lk


def kind(value: object, field: str = "kind") -> ReferenceKind:
    if isinstance(value, str) and value in _KINDS:  # a ReferenceKind is a str too
        return ReferenceKind(value)
    raise InvalidInputError(f"{field} must be one of {', '.join(_KINDS)}, got {value!r}", field)


def aliases(values: Iterable[str], field: str = "aliases") -> list[str]:
    """Distinct, stripped alias names in their given order (case-insensitive duplicates dropped)."""
    if isinstance(values, str):
        raise InvalidInputError(f"{field} must be a list of names, not one string", field)
    out: list[str] = []
    seen: set[str] = set()
    for i, v in enumerate(values):
        name = text(v, f"{field}[{i}]", 255).strip()
        if name.casefold() not in seen:
            seen.add(name.casefold())
            out.append(name)
    if len(out) > 100:
        raise InvalidInputError(f"{field} may hold at most 100 names, got {len(out)}", field)
    return out


def positive_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInputError(f"{field} must be a positive integer, got {value!r}", field)
    return value


def optional_count(value: object, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"{field} must be an integer >= 0, got {value!r}", field)
    return value


def page(limit: int, offset: int, max_limit: int = 1000) -> tuple[int, int]:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= max_limit:
        raise InvalidInputError(f"limit must be an integer in [1, {max_limit}], got {limit!r}", "limit")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidInputError(f"offset must be an integer >= 0, got {offset!r}", "offset")
    return limit, offset
