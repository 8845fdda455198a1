"""Concurrent score requests scored together.

Each ``POST /v1/score`` hands its decoded listing to :class:`ScoringQueue` and awaits a future. Worker
threads (one by default) each take everything waiting (up to ``max_batch`` listings) and prepare it
with one :meth:`~service.usecases.scoring.ListingScorer.prepare_many` call: one model batch per model,
one search per index. A worker never waits for company: under light load a listing is scored alone at
once, under heavy load the queue fills while the workers are busy and the batches grow by themselves.
The service runs one worker (``server.scoring_threads``): the models start on each request as it is
queued (below), without a worker, and a second worker only matched and stored beside the first in the
same GIL, in batches half as large (docs/performance.md, session 35).

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

A listing_id is scored by one request at a time, in the order its requests reached the queue (their
photos checked): a request for a listing whose earlier request is still being scored waits in the queue
until that one is stored. Without this, a re-submitted listing (a new price, say) answered by the cheap
path could be stored before its earlier request that went on to the slow pool, which would then land
last and pass for the listing's latest score. (Worker processes each have their own queue: two processes
scoring the same listing_id at the same moment still store in the order they finish.)

The models start on a request's new photos as it is queued (``prefetch``: see
:meth:`~service.usecases.scoring.ListingScorer.prefetch`), not when a worker takes its batch: at 8
concurrent requests the workers were often both busy matching and storing while the models stood idle
with requests waiting.

The queue is bounded too (``max_waiting``): a request that finds that many listings already waiting is
refused at once with :class:`QueueFullError` (the API answers 503 with a Retry-After), so an overload
costs the callers a retry instead of every request a growing wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from service.domain.model import Listing
from service.usecases.scoring import ListingScorer, PreparedListing, ScoreOutcome

log = logging.getLogger("counterlens.score_queue")


class QueueClosedError(RuntimeError):
    """The queue was closed (the service is stopping)."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counters since the queue started, and its state now (for ``/metrics``)."""

    batches: int  # batches the workers prepared
    listings: int  # listings in them
    refused: int  # requests refused because the queue was full
    waiting: int  # listings in the queue now
    slow_backlog: int  # listings in the slow pool now (running or waiting for a thread)


class QueueFullError(RuntimeError):
    """As many listings as the queue holds are already waiting: the service is overloaded right now."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} listings are already waiting to be scored")
        self.waiting = waiting


class ScoringQueue:
    def __init__(self, scorer: ListingScorer, *, workers: int = 1, max_batch: int = 32,
                 source: str = "api", slow_workers: int = 2, slow_waiting: int = 0,
                 max_waiting: int | None = None, prefetch: bool = True) -> None:
        if workers < 1 or max_batch < 1 or slow_workers < 1:
            raise ValueError("workers, max_batch and slow_workers must be >= 1")
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1 or None, got {max_waiting}")
        if slow_waiting < 0:
            raise ValueError(f"slow_waiting must be >= 0, got {slow_waiting}")
        self.scorer = scorer
        self.max_batch = max_batch
        self.source = source
        # The slow pool's listings (running or waiting for a thread) at which the next batch waits.
        self.max_slow_backlog = slow_workers + slow_waiting
        self.max_waiting = max_waiting
        self.prefetch = prefetch
        self._queue: deque[tuple[Listing, Future[ScoreOutcome]]] = deque()
        # listing_ids taken by a worker and not yet answered: a later request for one of them waits.
        self._in_flight: set[str] = set()
        self.refused = 0
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
            if self.max_waiting is not None and len(self._queue) >= self.max_waiting:
                self.refused += 1
                raise QueueFullError(len(self._queue))
            self._queue.append((listing, fut))
            self._cv.notify()
        if self.prefetch:
            try:
                self.scorer.prefetch(listing)
            except Exception:  # only a head start: the worker embeds what it did not start
                log.exception("starting the models early failed")
        return fut

    def _take(self) -> list[tuple[Listing, Future[ScoreOutcome]]] | None:
        with self._cv:
            while True:
                if self._closed and not self._queue:
                    return None
                # A full slow pool holds the next batch back (not once closing: what is queued is scored):
                # its listings are older and nearer their answer than the queued ones, and the cores they
                # would share are all there is (see the module doc).
                if self._takeable() and (self._closed or self._slow_backlog < self.max_slow_backlog):
                    break
                self._cv.wait()
            # Oldest first, one request per listing_id, none whose listing_id is still being scored: those
            # stay queued, in their order, until it is answered (see the module doc).
            taken: list[tuple[Listing, Future[ScoreOutcome]]] = []
            left: deque[tuple[Listing, Future[ScoreOutcome]]] = deque()
            while self._queue and len(taken) < self.max_batch:
                item = self._queue.popleft()
                lid = item[0].listing_id
                if lid in self._in_flight:
                    left.append(item)
                else:
                    self._in_flight.add(lid)
                    taken.append(item)
            self._queue.extendleft(reversed(left))
            return taken

    def _takeable(self) -> bool:
        """Some queued listing is not waiting for an earlier request of its listing_id (lock held)."""
        if not self._in_flight:
            return bool(self._queue)
        return any(lst.listing_id not in self._in_flight for lst, _ in self._queue)

    def _answered(self, listings: Sequence[Listing]) -> None:
        """These listings are answered (stored or failed): later requests for their listing_ids may go."""
        with self._cv:
            for lst in listings:
                self._in_flight.discard(lst.listing_id)
            if self._queue:
                self._cv.notify_all()

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            handed: set[int] = set()  # positions in ``taken`` handed to the slow pool, which releases them
            try:
                self._score(taken, handed)
            except BaseException as exc:  # the batch as a whole failed: every caller hears why
                log.exception("scoring a batch failed")
                for i, (_, fut) in enumerate(taken):
                    if i not in handed and not fut.done():
                        fut.set_exception(exc)
            finally:
                # Whatever happened, the worker lives on and no listing_id stays blocked.
                self._answered([lst for i, (lst, _) in enumerate(taken) if i not in handed])

    def _score(self, taken: Sequence[tuple[Listing, Future[ScoreOutcome]]], handed: set[int]) -> None:
        live = [(i, lst, fut) for i, (lst, fut) in enumerate(taken) if fut.set_running_or_notify_cancel()]
        if not live:  # all cancelled while queued
            return
        prepared = self.scorer.prepare_many([lst for _, lst, _ in live], source=self.source)
        with self._cv:
            self.batches += 1
            self.listings += len(live)
        quick: list[tuple[PreparedListing, Future[ScoreOutcome]]] = []
        for (i, lst, fut), p in zip(live, prepared, strict=True):
            if isinstance(p, Exception):
                fut.set_exception(p)
            elif p.slow:
                with self._cv:
                    self._slow_backlog += 1
                handed.add(i)
                try:
                    self._slow.submit(self._finish_slow, lst, p, fut)
                except RuntimeError:  # the pool is shut down (closing after a long wait): finish it here
                    self._finish_slow(lst, p, fut)
            else:
                quick.append((p, fut))
        if quick:
            self._finish(quick)

    def stats(self) -> QueueStats:
        with self._cv:
            return QueueStats(self.batches, self.listings, self.refused, len(self._queue), self._slow_backlog)

    @property
    def slow_backlog(self) -> int:
        """Listings in the slow pool (running or waiting for a thread)."""
        with self._cv:
            return self._slow_backlog

    def _finish_slow(self, listing: Listing, prepared: PreparedListing, fut: Future[ScoreOutcome]) -> None:
        try:
            self._finish([(prepared, fut)])
        except BaseException as exc:  # (the pool would keep it in a Future nobody reads)
            if not fut.done():
                fut.set_exception(exc)
        finally:
            with self._cv:
                self._slow_backlog -= 1
                self._in_flight.discard(listing.listing_id)
                self._cv.notify_all()

    def _finish(self, pairs: Sequence[tuple[PreparedListing, Future[ScoreOutcome]]]) -> None:
        try:
            outcomes = self.scorer.finish_many([p for p, _ in pairs])
            answers = list(zip(pairs, outcomes, strict=True))  # (an outcome short is the scorer's bug)
        except BaseException as exc:
            log.exception("finishing scores failed")
            for _, fut in pairs:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), out in answers:
            if isinstance(out, Exception):
                fut.set_exception(out)
            else:
                fut.set_result(out)

    def close(self, timeout: float = 30.0) -> None:
        """Score what is queued, within ``timeout`` seconds for all the workers together, then stop them.
        What is still queued then is answered with :class:`QueueClosedError` instead: the caller closes
        the models and the database next, under a worker that went on taking it."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._cv:
            left = list(self._queue)
            self._queue.clear()
        for lst, fut in left:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(QueueClosedError(
                    f"the service stopped before listing {lst.listing_id!r} was scored; send it again"))
        # The listings already handed on are finished and answered (each within its expensive signal's
        # own time: the pool holds a few at most, see max_slow_backlog).
        self._slow.shutdown(wait=True)
