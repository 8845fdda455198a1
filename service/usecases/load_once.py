"""Filling an in-memory reference side once per process: by the catalog's start-up reconciliation, or, in
a process that skips it (a Ray actor, a CLI command), by a loader on first use. Shared by the keypoint and
logo-template use cases."""

from __future__ import annotations

import threading
from collections.abc import Callable


class LoadOnce:
    def __init__(self) -> None:
        self.loader: Callable[[], None] | None = None
        self.done = False
        # Re-entrant: a reconciliation takes it, also when the loader is what called it.
        self.lock = threading.RLock()

    def ensure(self) -> None:
        """Run the loader if nothing has filled the reference side yet; later calls cost one attribute read."""
        if self.done:
            return
        with self.lock:
            if not self.done and self.loader is not None:
                self.loader()
            self.done = True
