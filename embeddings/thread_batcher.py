"""Dynamic micro-batching for callers on plain threads.

The scoring path is synchronous and runs on worker threads (the API's thread pool, the rescan's
workers), so concurrent listings meet here: each caller's images wait in a queue, a model thread takes
everything waiting (up to ``max_batch`` images, or until the oldest has waited ``max_wait_ms``), runs it
as one batch (in model calls of ``run_batch`` images, where set) and hands each caller its rows. One
model thread means one ONNX Runtime call at a time, which is what its intra-op thread pool wants on a
small machine.

Several batchers may share their model threads instead (:class:`ModelThreads`, the service's default on
the CPU): each shared thread runs whichever model has the request that has waited longest, and takes
its share of that model's queue (ONNX Runtime sessions run calls from several threads at once), so no
core idles while one model has work and another has none. (With a thread of its own each, the copy model,
twice the lookalike model's cost a photo, set the pace while the lookalike model's core idled half the
time.) A request is never split: one request of many photos (a catalog import's, a rescan chunk's) runs
on one thread; the service hands each listing photo over as a request of its own.

A request may also hand over photos not decoded yet (:meth:`ThreadBatcher.submit_sources`: anything
with a ``model_pixels`` property, such as a :class:`~service.domain.model.ListingImage`): the model thread
decodes them when it takes the request, outside the timed model call, and a photo that fails to decode
fails its own request only. A request whose future was cancelled before the model thread took it is
dropped unrun.

(:class:`embeddings.batcher.MicroBatcher` is the same idea for callers on an event loop.)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from service.domain.model import RGBImage, Vectors
from service.domain.ports import ImageEmbedder


class PixelSource(Protocol):
    """A photo whose pixels may not be decoded yet (``model_pixels`` decodes what a model embeds, or
    raises why it cannot)."""

    @property
    def model_pixels(self) -> RGBImage: ...


_Request = tuple[list[RGBImage | PixelSource], Future[Vectors], float]


class ThreadBatcher:
    """An :class:`ImageEmbedder` that coalesces concurrent ``embed`` calls into shared batches."""

    def __init__(self, embedder: ImageEmbedder, *, max_batch: int = 16, max_wait_ms: float = 2.0,
                 run_batch: int | None = None, pool: ModelThreads | None = None) -> None:
        """``pool``: run on these shared model threads instead of a thread of its own. Shared threads do
        not wait for company (``max_wait_ms`` must be 0): they are for the CPU, where a batch costs no less
        a photo."""
        if max_batch < 1 or max_wait_ms < 0 or (run_batch is not None and run_batch < 1):
            raise ValueError("max_batch and run_batch must be >= 1 and max_wait_ms >= 0")
        if pool is not None and max_wait_ms > 0:
            raise ValueError("a batcher on shared model threads does not wait for company: max_wait_ms must be 0")
        self.inner = embedder
        self.max_batch = max_batch
        # Images per model call: a batch taken is run this many at a time (None: all at once). The
        # batch is still one take (its callers answered together, one scoring batch downstream); only
        # the model's own batch shrinks, for processors on which a photo costs less in a small batch
        # (docs/performance.md, session 34).
        self.run_batch = run_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: deque[_Request] = deque()
        self._pool = pool
        self._cv = pool.cv if pool is not None else threading.Condition()
        self._closed = False
        self.batches_run = 0
        self.images_run = 0
        # Time inside this model's calls, summed over the threads that ran them (under the lock): wall
        # seconds (how busy the model is; on two shared threads up to 2 a second) and those threads' CPU
        # seconds in the calls (the model's own work, preprocessing included; exact when ONNX Runtime runs
        # on the calling thread, i.e. one intra-op thread, the default on two cores).
        # /metrics exports both; scripts/bench_score.py weighs the server's CPU against the second.
        self.busy_s = 0.0
        self.cpu_s = 0.0
        self._thread: threading.Thread | None = None
        if pool is not None:
            pool.add(self)
        else:
            self._thread = threading.Thread(target=self._run, name=f"batch-{embedder.name}", daemon=True)
            self._thread.start()

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def provider(self) -> str:
        return self.inner.provider

    def embed(self, images: Sequence[RGBImage]) -> Vectors:
        return self.submit(images).result()

    def submit(self, images: Sequence[RGBImage]) -> Future[Vectors]:
        """Queue the images and return at once; the future gets their vectors (row i: images[i]). Lets
        one caller keep two models busy at the same time."""
        return self.submit_sources(images)

    def submit_sources(self, images: Sequence[RGBImage | PixelSource]) -> Future[Vectors]:
        """:meth:`submit` of photos that may still have to be decoded (a ``model_pixels`` property): the model
        thread decodes them when it takes the request. A photo that cannot be decoded fails this
        request's future with its error, and no other request. Cancelling the future before the model
        thread takes the request (``Future.cancel``) withdraws it."""
        fut: Future[Vectors] = Future()
        if not images:
            fut.set_result(np.zeros((0, self.dim), np.float32))
            return fut
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append((list(images), fut, time.monotonic()))
            self._cv.notify()
        return fut

    def _take(self) -> list[_Request] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed and not self._queue:
                return None
            # Wait for company only while the batch is not full and the oldest request is young.
            deadline = self._queue[0][2] + self.max_wait
            while sum(len(r[0]) for r in self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            return self._take_share()

    def _take_share(self) -> list[_Request]:
        """Take what a model thread runs next (the lock held, the queue not empty)."""
        # The oldest request always goes (however many images it has), then what fits beside it. A
        # cancelled one is dropped; the rest are marked running, so they can no longer be cancelled.
        # On shared threads a thread takes its share of what waits (1/threads of it), and leaves the
        # rest to whichever thread is free next, even while the others are busy: a thread that took
        # everything would run it photo by photo while another finished its call and idled. (Taking
        # all when the others were busy read no faster than one thread, c=8, session 37.)
        sharers = self._pool.size if self._pool is not None else 1
        limit = self.max_batch
        if sharers > 1:
            limit = min(limit, -(-sum(len(r[0]) for r in self._queue) // sharers))
        taken: list[_Request] = []
        n = 0
        while self._queue:
            images, fut, _ = self._queue[0]
            if not fut.cancelled() and taken and n + len(images) > limit:
                break
            req = self._queue.popleft()
            if fut.set_running_or_notify_cancel():
                n += len(images)
                taken.append(req)
        if self._queue and sharers > 1:
            self._cv.notify()  # the shares left to the other model threads
        return taken

    def _run(self) -> None:
        while (got := self._take()) is not None:
            self._run_taken(got)

    def _run_taken(self, got: list[_Request]) -> None:
        """Run what a model thread took and answer its callers."""
        taken = self._decoded(got)
        if not taken:
            return
        images = [im for req in taken for im in req[1]]
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            vectors = self._embed(images)
        except BaseException as exc:  # every waiting caller gets the error, the thread lives on
            for fut, _ in taken:
                fut.set_exception(exc)
            return
        finally:
            with self._cv:  # (two model threads would lose each other's += without it)
                self.busy_s += time.perf_counter() - wall
                self.cpu_s += time.thread_time() - cpu
        with self._cv:
            self.batches_run += 1
            self.images_run += len(images)
        start = 0
        for fut, req_images in taken:
            fut.set_result(vectors[start:start + len(req_images)])
            start += len(req_images)

    def _embed(self, images: list[RGBImage]) -> Vectors:
        step = self.run_batch or len(images)
        if step >= len(images):
            return self.inner.embed(images)
        return np.concatenate([self.inner.embed(images[k:k + step]) for k in range(0, len(images), step)])

    @staticmethod
    def _decoded(taken: list[_Request]) -> list[tuple[Future[Vectors], list[RGBImage]]]:
        """Each request with its photos' pixels (decoded here where they were not yet); a request whose
        photo fails to decode is answered with that error and left out of the batch."""
        out: list[tuple[Future[Vectors], list[RGBImage]]] = []
        for images, fut, _ in taken:
            try:
                out.append((fut, [im if isinstance(im, np.ndarray) else im.model_pixels for im in images]))
            except BaseException as exc:  # the caller hears it; the model thread lives on
                fut.set_exception(exc)
        return out

    def close(self) -> None:
        """Run what is queued, then stop (a shared pool's threads stop with the last of its batchers)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        elif self._pool is not None:
            self._pool.join_when_closed(timeout=10)


class ModelThreads:
    """Model threads shared by the :class:`ThreadBatcher` s built with ``pool=`` this (see the module
    docstring): each thread runs whichever model has the request that has waited longest. The threads
    stop once every batcher is closed and nothing is queued."""

    def __init__(self, threads: int, *, name: str = "models") -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.cv = threading.Condition()
        self.size = threads
        self._batchers: list[ThreadBatcher] = []
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def add(self, batcher: ThreadBatcher) -> None:
        with self.cv:
            self._batchers.append(batcher)

    def _next(self) -> tuple[ThreadBatcher, list[_Request]] | None:
        with self.cv:
            while True:
                ready = [b for b in self._batchers if b._queue]
                if ready:
                    break
                if self._batchers and all(b._closed for b in self._batchers):
                    return None
                self.cv.wait()
            batcher = min(ready, key=lambda b: b._queue[0][2])  # the longest waiting request first
            return batcher, batcher._take_share()

    def _run(self) -> None:
        while (got := self._next()) is not None:
            batcher, taken = got
            batcher._run_taken(taken)

    def join_when_closed(self, timeout: float) -> None:
        """Wait for the threads, where every batcher is closed (otherwise they serve the others)."""
        with self.cv:
            if not all(b._closed for b in self._batchers):
                return
            self.cv.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
