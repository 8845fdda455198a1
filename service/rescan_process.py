"""The API's background stored rescans, run in a process of their own.

A stored rescan is Python from end to end (reading stored embeddings, fusion, writing the changed scores).
Run on a thread of a server worker it holds that worker's GIL most of the time, and every request the
worker serves waits for it. Measured (``counterlens serve``, 1 worker, the rescan bench's 2,000 stored
listings, cached single-photo ``/score`` at 8 concurrent requests): 249-292 listings/s with p99 50-60 ms
alone, 47-49 listings/s with p99 440-473 ms while one brand's ~1,000-1,300 listings were rescanned.

:class:`StoredRescanProcess` runs the jobs in one child process instead, started on the first job and
kept between jobs. It is spawned, not forked: a server worker's threads may hold any lock at the moment of a
fork. It runs at a lower CPU priority (``nice``), so on a busy machine the requests come first. The child
builds its own container from the server's settings (the models load with it, as in any container,
though a stored rescan only reads embeddings), and before each job catches up with the catalog the server
changed (``CatalogService.sync``) and forgets its cached catalog view (prices and sellers are not in the
reference set ``sync`` watches).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.synchronize import Event
from typing import TYPE_CHECKING

from service.settings import Settings
from service.usecases.rescan import CancelFlag, RescanRequest, StoredRescanReport, rescan_in_this_process

if TYPE_CHECKING:
    from service.container import Container

log = logging.getLogger("counterlens.rescan")

# The child's state (one container, one stop flag): set by _start, in the child only.
_container: Container | None = None
_stop: Event | None = None


def _start(settings: Settings, stop: Event, nice: int) -> None:
    global _container, _stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which closes the child
    if nice:
        os.nice(nice)
    # (Imported here: the composition root wires this module in, and the child is the one to build.)
    from service.container import build_container
    from service.logs import configure_logging

    configure_logging(settings.server.log_level)
    _stop = stop
    _container = build_container(settings, reconcile=False)


def _run(req: RescanRequest) -> StoredRescanReport:
    assert _container is not None and _stop is not None
    c = _container
    c.catalog.sync()  # references the server added or deleted since the last job
    c.scorer.catalog_changed()
    return rescan_in_this_process(c.scorer, c.listings)(req, _stop)


class StoredRescanProcess:
    """A :data:`~service.usecases.rescan.RunRescan` that runs each job in the one child process (see the
    module docstring). A child that dies (killed, out of memory) fails its job; the next job starts a new
    one. Not for the children's own use: call it from one thread (the scheduler's)."""

    def __init__(self, settings: Settings, nice: int = 10) -> None:
        self._settings = settings
        self._nice = nice
        self._ctx = multiprocessing.get_context("spawn")
        # Both made by the first job (a worker that never rescans holds no semaphores, which a worker
        # killed at shutdown would leak); _stop is set once, by cancel or close: the child stops between
        # pages, and a new child (after one died) gets a new flag.
        self._stop: Event | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.started = 0  # children started (a test can tell that jobs share one)

    def __call__(self, req: RescanRequest, cancel: CancelFlag) -> StoredRescanReport:
        with self._lock:
            if self._pool is None:
                self._stop = self._ctx.Event()
                self._pool = ProcessPoolExecutor(1, mp_context=self._ctx, initializer=_start,
                                                 initargs=(self._settings, self._stop, self._nice))
                self.started += 1
            pool, stop = self._pool, self._stop
        assert stop is not None
        future = pool.submit(_run, req)
        while True:
            try:
                return future.result(timeout=0.2)
            except FutureTimeout:
                if cancel.is_set():
                    stop.set()
            except BrokenProcessPool:
                log.error("the stored rescan process died; the next job starts a new one")
                with self._lock:
                    if self._pool is pool:
                        self._pool = None
                pool.shutdown(wait=False)
                raise

    def child_pid(self) -> int | None:
        """The child's process id, asked of the child (None before the first job; waits for a running one)."""
        with self._lock:
            pool = self._pool
        return None if pool is None else pool.submit(os.getpid).result()

    def close(self) -> None:
        """Stop a running job between pages and end the child."""
        with self._lock:
            pool, stop, self._pool, self._stop = self._pool, self._stop, None, None
        if stop is not None:
            stop.set()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
