"""An in-process view of the catalog for the scoring hot path.

Scoring reads the same few catalog facts for every listing (which reference an index id is, a brand's
authorized sellers, its verdict thresholds, every brand's names). They change rarely, so they are kept
here and forgotten when this process changes the catalog (:meth:`invalidate`) or after ``ttl_s`` seconds
(changes made by another process: a second API worker, a CLI import).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from service.domain.model import ReferenceInfo
from service.domain.policy import VerdictPolicy
from service.domain.ports import CatalogReader

T = TypeVar("T")


class CachedCatalog:
    """A :class:`CatalogReader` (plus ``brand_policy``) answering from memory where it can."""

    def __init__(self, reader: CatalogReader, policies: Callable[[str], VerdictPolicy | None],
                 ttl_s: float = 5.0) -> None:
        self._reader = reader
        self._policies = policies
        self._ttl = ttl_s
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._born = time.monotonic()
        self._refs: dict[int, ReferenceInfo | None] = {}
        self._sellers: dict[str, frozenset[str]] = {}
        self._policy: dict[str, VerdictPolicy | None] = {}
        self._aliases: dict[str, list[str]] | None = None

    def invalidate(self) -> None:
        with self._lock:
            self._clear()

    def _fresh(self) -> None:
        if time.monotonic() - self._born > self._ttl:
            self._clear()

    def _memo(self, table: dict[Any, T], key: Any, load: Callable[[], T]) -> T:
        with self._lock:
            self._fresh()
            if key in table:
                return table[key]
        value = load()
        with self._lock:
            table[key] = value
        return value

    def references(self, image_ids: Iterable[int]) -> dict[int, ReferenceInfo]:
        wanted = list(dict.fromkeys(int(i) for i in image_ids))
        with self._lock:
            self._fresh()
            missing = [i for i in wanted if i not in self._refs]
        if missing:
            loaded = self._reader.references(missing)
            with self._lock:
                for i in missing:
                    self._refs[i] = loaded.get(i)  # None: deleted, remembered until invalidated
        with self._lock:
            return {i: r for i in wanted if (r := self._refs.get(i)) is not None}

    def authorized_sellers(self, brand: str) -> frozenset[str]:
        return self._memo(self._sellers, brand, lambda: self._reader.authorized_sellers(brand))

    def brand_policy(self, brand: str) -> VerdictPolicy | None:
        return self._memo(self._policy, brand, lambda: self._policies(brand))

    def brand_aliases(self) -> dict[str, list[str]]:
        with self._lock:
            self._fresh()
            if self._aliases is not None:
                return self._aliases
        aliases = self._reader.brand_aliases()
        with self._lock:
            self._aliases = aliases
        return aliases
