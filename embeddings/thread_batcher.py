"""Dynamic micro-batching for callers on plain threads.

The scoring path is synchronous and runs on worker threads (the API's thread pool, the rescan's
workers), so concurrent listings meet here: each caller's images wait in a queue, a model thread takes
everything waiting (up to ``max_batch`` images, or until the oldest has waited ``max_wait_ms``), runs it
as one batch (in model calls of ``run_batch`` images, where set) and hands each caller its rows. One
model thread means one ONNX Runtime call at a time, which is what its intra-op thread pool wants on a
small machine.

A model that costs more than the others a photo may get ``threads`` model threads on its one queue
(ONNX Runtime sessions run calls from several threads at once): each then takes its share of what is
waiting, so that a core the other models leave idle runs this one too. A request is never split: one
request of many photos (a catalog import's, a rescan chunk's) runs on one thread; the service hands each
listing photo over as a request of its own.

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
                 run_batch: int | None = None, threads: int = 1) -> None:
        if max_batch < 1 or max_wait_ms < 0 or (run_batch is not None and run_batch < 1) or threads < 1:
            raise ValueError("max_batch, run_batch and threads must be >= 1 and max_wait_ms >= 0")
        self.inner = embedder
        self.max_batch = max_batch
        # Images per model call: a batch taken is run this many at a time (None: all at once). The
        # batch is still one take (its callers answered together, one scoring batch downstream); only
        # the model's own batch shrinks, for processors on which a photo costs less in a small batch
        # (docs/performance.md, session 34).
        self.run_batch = run_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self.images_run = 0
        # Time inside the model calls, summed over the model threads (under the lock): wall seconds (how
        # busy the model is; with two threads up to 2 a second) and those threads' CPU seconds (the model's
        # own work, preprocessing included; exact when ONNX Runtime runs on the calling thread, i.e. one
        # intra-op thread, the default on two cores).
        # /metrics exports both; scripts/bench_score.py weighs the server's CPU against the second.
        self.busy_s = 0.0
        self.cpu_s = 0.0
        self._threads = [threading.Thread(target=self._run, name=f"batch-{embedder.name}" + (f"-{i}" if i else ""),
                                          daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

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
            # The oldest request always goes (however many images it has), then what fits beside it. A
            # cancelled one is dropped; the rest are marked running, so they can no longer be cancelled.
            # With several model threads a thread takes its share of what waits (1/threads of it), and
            # leaves the rest to whichever thread is free next, even while the others are busy: a thread
            # that took everything would run it photo by photo while another finished its call and idled.
            # (Taking all when the others were busy read no faster than one thread, c=8; this +2.6 %.)
            limit = self.max_batch
            if len(self._threads) > 1:
                limit = min(limit, -(-sum(len(r[0]) for r in self._queue) // len(self._threads)))
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
            if self._queue and len(self._threads) > 1:
                self._cv.notify()  # the shares left to the other model threads
            return taken

    def _run(self) -> None:
        while True:
            got = self._take()
            if got is None:
                return
            taken = self._decoded(got)
            if not taken:
                continue
            images = [im for req in taken for im in req[1]]
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                vectors = self._embed(images)
            except BaseException as exc:  # every waiting caller gets the error, the thread lives on
                for fut, _ in taken:
                    fut.set_exception(exc)
                continue
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
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        deadline = time.monotonic() + 10
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
