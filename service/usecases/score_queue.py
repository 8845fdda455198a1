"""Concurrent score requests scored together.

Each ``POST /v1/score`` hands its decoded listing to :class:`ScoringQueue` and awaits a future. A few
worker threads each take everything waiting (up to ``max_batch`` listings) and prepare it with one
:meth:`~service.usecases.scoring.ListingScorer.prepare_many` call: one model batch per model, one search
per index. A worker never waits for company: under light load a listing is scored alone at once, under
heavy load the queue fills while the workers are busy and the batches grow by themselves. With two or
more workers one batch is in the models while another is matched and written.

The listings the cascade sends on to an expensive signal (keypoint verification, logo templates, OCR:
20-130 ms each on one core) are finished apart, each in a thread of a small pool; the rest of the batch
is finished, stored in one transaction and answered at once. Finished together, every listing of a
batch waited for the slowest one's OCR (bench_score, default settings: cold p50 140 ms, p99 925 ms at
8 concurrent requests), and the worker could not take the next batch meanwhile.

The pool is bounded: while each of its threads is busy (and ``slow_waiting`` more listings wait for
one), the workers take no new batch. The pool's listings arrived earlier and are nearer their answer;
left to share the two cores with new batches they took longer, and under overload the expensive work
queued up without limit. Held back, the requests wait in the queue instead and make a bigger batch
(bench_score, every listing verified, c=8: p99 221-236 ms against 282-296 unbounded).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from service.domain.model import Listing
from service.usecases.scoring import ListingScorer, PreparedListing, ScoreOutcome

log = logging.getLogger("counterlens.score_queue")


class QueueClosedError(RuntimeError):
    """The queue was closed (the service is stopping)."""


class ScoringQueue:
    def __init__(self, scorer: ListingScorer, *, workers: int = 2, max_batch: int = 32,
                 source: str = "api", slow_workers: int = 2, slow_waiting: int = 0) -> None:
        if workers < 1 or max_batch < 1 or slow_workers < 1:
            raise ValueError("workers, max_batch and slow_workers must be >= 1")
        if slow_waiting < 0:
            raise ValueError(f"slow_waiting must be >= 0, got {slow_waiting}")
        self.scorer = scorer
        self.max_batch = max_batch
        self.source = source
        # The slow pool's listings (running or waiting for a thread) at which the next batch waits.
        self.max_slow_backlog = slow_workers + slow_waiting
        self._queue: deque[tuple[Listing, Future[ScoreOutcome]]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._slow_backlog = 0  # listings handed to the slow pool and not finished yet
        self.batches = 0
        self.listings = 0
        self._slow = ThreadPoolExecutor(max_workers=slow_workers, thread_name_prefix="score-slow")
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
            # A full slow pool holds the next batch back: its listings are older and nearer their answer
            # than the queued ones, and the cores they would share are all there is (see the module doc).
            while not self._closed and (not self._queue or self._slow_backlog >= self.max_slow_backlog):
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
                prepared = self.scorer.prepare_many([lst for lst, _ in live], source=self.source)
            except BaseException as exc:  # the batch as a whole failed: every caller hears why
                log.exception("scoring a batch failed")
                for _, fut in live:
                    fut.set_exception(exc)
                continue
            with self._cv:
                self.batches += 1
                self.listings += len(live)
            quick: list[tuple[PreparedListing, Future[ScoreOutcome]]] = []
            for (_, fut), p in zip(live, prepared, strict=True):
                if isinstance(p, Exception):
                    fut.set_exception(p)
                elif p.slow:
                    with self._cv:
                        self._slow_backlog += 1
                    self._slow.submit(self._finish_slow, p, fut)
                else:
                    quick.append((p, fut))
            if quick:
                self._finish(quick)

    @property
    def slow_backlog(self) -> int:
        """Listings in the slow pool (running or waiting for a thread)."""
        with self._cv:
            return self._slow_backlog

    def _finish_slow(self, prepared: PreparedListing, fut: Future[ScoreOutcome]) -> None:
        try:
            self._finish([(prepared, fut)])
        finally:
            with self._cv:
                self._slow_backlog -= 1
                self._cv.notify_all()

    def _finish(self, pairs: Sequence[tuple[PreparedListing, Future[ScoreOutcome]]]) -> None:
        try:
            outcomes = self.scorer.finish_many([p for p, _ in pairs])
        except BaseException as exc:
            log.exception("finishing scores failed")
            for _, fut in pairs:
                fut.set_exception(exc)
            return
        for (_, fut), out in zip(pairs, outcomes, strict=True):
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
        self._slow.shutdown(wait=True)  # the listings already handed on are finished and answered
