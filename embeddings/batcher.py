"""Dynamic micro-batching: concurrent requests on the event loop share model batches.

Callers ``await batcher.embed(images)``.  A dispatcher task collects waiting requests until they hold
``max_batch`` images or the oldest has waited ``max_wait_ms``, runs the combined batch on one worker
thread (off the event loop, so the loop keeps serving), and hands each caller back its own rows.  While a
batch runs, new requests queue up and go together in the next one -- under load batches fill by
themselves and the wait costs nothing.  One worker thread means one model call at a time, which is what
the ONNX session's own thread pool wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from embeddings.preprocess import validate_batch
from service.domain.model import RGBImage, Vectors
from service.domain.ports import ImageEmbedder

log = logging.getLogger(__name__)


class BatcherClosedError(RuntimeError):
    """The micro-batcher was closed; no new requests are taken."""


@dataclass(slots=True)
class _Request:
    images: list[RGBImage]
    future: asyncio.Future[Vectors]
    arrived: float = field(default=0.0)


class MicroBatcher:
    """Coalesces concurrent ``embed`` calls into batches of at most ``max_batch`` images.

    Bound to the event loop it is first used on.  ``batches_run`` / ``images_run`` count the model calls
    made and the images they carried (so ``images_run / batches_run`` is the mean batch size).
    """

    def __init__(self, embedder: ImageEmbedder, *, max_batch: int = 16, max_wait_ms: float = 2.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self._embedder = embedder
        self._max_batch = max_batch
        self._max_wait = max_wait_ms / 1000.0
        self._pending: deque[_Request] = deque()
        self._pending_images = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{embedder.name}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches_run = 0
        self.images_run = 0

    @property
    def embedder(self) -> ImageEmbedder:
        return self._embedder

    @property
    def name(self) -> str:
        return self._embedder.name

    @property
    def model_id(self) -> str:
        return self._embedder.model_id

    @property
    def dim(self) -> int:
        return self._embedder.dim

    @property
    def provider(self) -> str:
        return self._embedder.provider

    @property
    def closed(self) -> bool:
        return self._closed

    async def embed(self, images: Sequence[RGBImage]) -> Vectors:
        """The embeddings of ``images`` (rows in order), computed in a batch shared with other callers."""
        if self._closed:
            raise BatcherClosedError(f"micro-batcher for {self.name} is closed")
        # Bad input fails here, for this caller only, instead of failing a whole shared batch.
        batch = validate_batch(images)
        if not batch:
            return np.zeros((0, self.dim), dtype=np.float32)
        loop = asyncio.get_running_loop()
        wakeup = self._bind(loop)
        future: asyncio.Future[Vectors] = loop.create_future()
        self._pending.append(_Request(batch, future, loop.time()))
        self._pending_images += len(batch)
        wakeup.set()
        return await future

    def _bind(self, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        """Start the dispatcher on this loop (or again on a new loop once the old one's has ended)."""
        if self._loop is not loop:
            if self._task is not None and not self._task.done() and not _loop_closed(self._loop):
                raise RuntimeError("MicroBatcher is already serving another event loop")
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._task = None
        assert self._wakeup is not None
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._dispatch(), name=f"microbatcher-{self.name}")
        return self._wakeup

    async def _dispatch(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        wakeup, loop = self._wakeup, self._loop
        try:
            while True:
                if not self._pending:
                    if self._closed:
                        return
                    await wakeup.wait()
                    wakeup.clear()
                    continue
                # Wait for more company until the batch is full or the oldest request's time is up.
                deadline = self._pending[0].arrived + self._max_wait
                while self._pending_images < self._max_batch and not self._closed:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wakeup.wait(), remaining)
                await self._run_one_batch(loop)
        except asyncio.CancelledError:
            self._fail_pending(BatcherClosedError(f"micro-batcher for {self.name} was cancelled"))
            raise

    def _take_batch(self) -> list[_Request]:
        taken: list[_Request] = []
        count = 0
        while self._pending:
            req = self._pending[0]
            if taken and count + len(req.images) > self._max_batch:
                break
            self._pending.popleft()
            self._pending_images -= len(req.images)
            if req.future.done():  # its caller was cancelled while waiting
                continue
            taken.append(req)
            count += len(req.images)
        return taken

    async def _run_one_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        taken = self._take_batch()
        if not taken:
            return
        images = [img for req in taken for img in req.images]
        try:
            vectors = await loop.run_in_executor(self._executor, self._embedder.embed, images)
        except Exception as exc:  # the model failed: every caller in this batch gets the error
            for req in taken:
                if not req.future.done():
                    req.future.set_exception(exc)
            return
        self.batches_run += 1
        self.images_run += len(images)
        start = 0
        for req in taken:
            rows = vectors[start : start + len(req.images)]
            start += len(req.images)
            if not req.future.done():
                req.future.set_result(rows)

    def _fail_pending(self, exc: Exception) -> None:
        while self._pending:
            req = self._pending.popleft()
            if not req.future.done():
                req.future.set_exception(exc)
        self._pending_images = 0

    async def aclose(self) -> None:
        """Stop taking requests, finish those already queued, and stop the worker thread."""
        self._closed = True
        task = self._task
        if task is not None and not task.done() and self._wakeup is not None:
            if self._loop is asyncio.get_running_loop():
                self._wakeup.set()
                await task
            else:
                task.cancel()
        self._executor.shutdown(wait=True)

    def close(self) -> None:
        """Synchronous close for code outside the event loop: queued requests are failed, not run."""
        self._closed = True
        if self._task is not None and not self._task.done() and not _loop_closed(self._loop):
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._fail_pending_threadsafe()
        self._executor.shutdown(wait=False)

    def _fail_pending_threadsafe(self) -> None:
        loop = self._loop
        if loop is None or _loop_closed(loop):
            self._pending.clear()
            self._pending_images = 0
            return
        error = BatcherClosedError(f"micro-batcher for {self.name} closed")
        loop.call_soon_threadsafe(self._fail_pending, error)

    async def __aenter__(self) -> MicroBatcher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _loop_closed(loop: asyncio.AbstractEventLoop | None) -> bool:
    return loop is None or loop.is_closed()
