"""Concurrent score requests scored together.

Each ``POST /v1/score`` hands its decoded listing to :class:`ScoringQueue` and awaits a future. A few
worker threads each take everything waiting (up to ``max_batch`` listings) and score it with one
:meth:`~service.usecases.scoring.ListingScorer.score_many` call: one model batch per model, one search
per index, one database transaction for the lot. A worker never waits for company: under light load a
listing is scored alone at once, under heavy load the queue fills while the workers are busy and the
batches grow by themselves. With two or more workers one batch is in the models while another is matched
and written.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future

from service.domain.model import Listing
from service.usecases.scoring import ListingScorer, ScoreOutcome

log = logging.getLogger("counterlens.score_queue")


class QueueClosedError(RuntimeError):
    """The queue was closed (the service is stopping)."""


class ScoringQueue:
    def __init__(self, scorer: ListingScorer, *, workers: int = 2, max_batch: int = 32,
                 source: str = "api") -> None:
        if workers < 1 or max_batch < 1:
            raise ValueError("workers and max_batch must be >= 1")
        self.scorer = scorer
        self.max_batch = max_batch
        self.source = source
        self._queue: deque[tuple[Listing, Future[ScoreOutcome]]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.batches = 0
        self.listings = 0
        self._threads = [threading.Thread(target=self._run, name=f"score-queue-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, listing: Listing) -> Future[ScoreOutcome]:
        """Queue a listing (photos decoded); the future gets its outcome or its exception."""
        fut: Future[ScoreOutcome] = Future()
        with self._cv:
            if self._closed:
                raise QueueClosedError("the scoring queue is closed")
            self._queue.append((listing, fut))
            self._cv.notify()
        return fut

    def _take(self) -> list[tuple[Listing, Future[ScoreOutcome]]] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            taken: list[tuple[Listing, Future[ScoreOutcome]]] = []
            while self._queue and len(taken) < self.max_batch:
                taken.append(self._queue.popleft())
            return taken

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            live = [(lst, fut) for lst, fut in taken if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                outcomes = self.scorer.score_many([lst for lst, _ in live], source=self.source)
            except BaseException as exc:  # the batch as a whole failed: every caller hears why
                log.exception("scoring a batch failed")
                for _, fut in live:
                    fut.set_exception(exc)
                continue
            with self._cv:
                self.batches += 1
                self.listings += len(live)
            for (_, fut), out in zip(live, outcomes, strict=True):
                if isinstance(out, Exception):
                    fut.set_exception(out)
                else:
                    fut.set_result(out)

    def close(self, timeout: float = 30.0) -> None:
        """Score what is queued, then stop the workers."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)
