"""Keeps a long-running process's reference indexes in step with catalog changes made by other processes.

Every API worker holds its own in-memory indexes (FAISS, keypoints, logo templates). A change made
through one worker, or by ``counterlens catalog import`` beside the server, is in the database at once,
but the other processes' indexes only learn of it here: :class:`CatalogWatcher` calls
:meth:`CatalogService.sync` every ``interval_s`` seconds on a background thread (one cheap query when
nothing changed).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger("counterlens.catalog")


class Syncable(Protocol):
    def sync(self) -> bool: ...


class CatalogWatcher:
    def __init__(self, catalog: Syncable, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.catalog = catalog
        self.interval_s = interval_s
        self.syncs = 0  # how many times it patched the indexes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="catalog-watch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.catalog.sync():
                    self.syncs += 1
            except Exception:  # a failed check is retried at the next tick; the service keeps scoring
                log.exception("catching up with catalog changes failed")

    def close(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
