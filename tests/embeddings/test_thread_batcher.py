"""ThreadBatcher: concurrent callers on plain threads share model batches, and the batcher accounts for
the time its model calls take (wall and CPU), which /metrics exports."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from embeddings.onnx_embedder import OnnxEmbedder
from embeddings.preprocess import PreprocessError
from embeddings.thread_batcher import ModelThreads, ThreadBatcher
from service.domain.model import RGBImage, Vectors
from tests.embeddings.conftest import Gated, Photo


class Waiting:
    """A real model whose every call first waits ``wait_s`` without using the CPU, as a call to a
    GPU or another process does."""

    def __init__(self, inner: OnnxEmbedder, wait_s: float) -> None:
        self.inner, self.wait_s = inner, wait_s
        self.name, self.model_id, self.dim, self.provider = inner.name, inner.model_id, inner.dim, inner.provider

    def embed(self, images: Sequence[RGBImage]) -> Vectors:
        time.sleep(self.wait_s)
        return self.inner.embed(images)


def test_concurrent_callers_share_batches_and_get_their_own_rows(
    tiny_clip: OnnxEmbedder, photos: list[Photo]
) -> None:
    requests = [[photos[i % len(photos)].pixels, photos[(i + 1) % len(photos)].pixels] for i in range(6)]
    batcher = ThreadBatcher(tiny_clip, max_batch=16, max_wait_ms=200)
    try:
        results: dict[int, np.ndarray] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher.embed(requests[i])))
                   for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        batcher.close()
    for i, r in enumerate(requests):
        np.testing.assert_allclose(results[i], tiny_clip.embed(r), atol=2e-5)
    assert batcher.images_run == 12
    assert batcher.batches_run < len(requests)


class Counting:
    """A real model that records how many photos each of its calls got."""

    def __init__(self, inner: OnnxEmbedder) -> None:
        self.inner, self.calls = inner, list[int]()
        self.name, self.model_id, self.dim, self.provider = inner.name, inner.model_id, inner.dim, inner.provider

    def embed(self, images: Sequence[RGBImage]) -> Vectors:
        self.calls.append(len(images))
        return self.inner.embed(images)


@pytest.mark.parametrize(("run_batch", "calls"), [(None, [5]), (2, [2, 2, 1]), (1, [1] * 5)])
def test_a_batch_taken_together_runs_in_model_calls_of_run_batch(
    tiny_clip: OnnxEmbedder, photos: list[Photo], run_batch: int | None, calls: list[int]
) -> None:
    """Three waiting requests (1, 2 and 2 photos) are one take, answered together with their own rows,
    whatever the size of the model calls that ran it."""
    model = Counting(tiny_clip)
    requests = [[photos[0].pixels], [photos[1].pixels, photos[2].pixels], [photos[3].pixels, photos[0].pixels]]
    gated = Gated(model)
    batcher = ThreadBatcher(gated, max_batch=16, max_wait_ms=0, run_batch=run_batch)
    try:
        first = batcher.submit([photos[4].pixels])  # the model thread takes it and waits at the gate
        assert gated.entered.wait(5)
        futures = [batcher.submit(r) for r in requests]
        gated.gate.set()
        first.result(timeout=10)
        got = [f.result(timeout=10) for f in futures]
    finally:
        batcher.close()
    assert model.calls[1:] == calls
    assert (batcher.batches_run, batcher.images_run) == (2, 6)
    for r, vectors in zip(requests, got, strict=True):
        np.testing.assert_allclose(vectors, tiny_clip.embed(r), atol=2e-5)


def test_model_time_counts_wall_and_cpu_apart(tiny_clip: OnnxEmbedder, photos: list[Photo]) -> None:
    batcher = ThreadBatcher(Waiting(tiny_clip, wait_s=0.2), max_wait_ms=0)
    try:
        assert (batcher.busy_s, batcher.cpu_s) == (0.0, 0.0)
        started = time.perf_counter()
        batcher.embed([p.pixels for p in photos[:4]])
        took = time.perf_counter() - started
    finally:
        batcher.close()
    # The wall time covers the wait and the model; the CPU time only what the thread computed.
    assert 0.2 <= batcher.busy_s <= took
    assert 0.0 < batcher.cpu_s < batcher.busy_s - 0.15


def test_a_failed_model_call_still_counts_and_the_thread_lives_on(
    tiny_clip: OnnxEmbedder, photos: list[Photo]
) -> None:
    batcher = ThreadBatcher(Waiting(tiny_clip, wait_s=0.05), max_wait_ms=0)
    try:
        with pytest.raises(PreprocessError, match="expected dtype uint8"):
            batcher.embed([np.zeros((8, 8, 3), np.float32)])  # type: ignore[list-item]
        assert batcher.busy_s >= 0.05 and batcher.batches_run == 0
        assert batcher.embed([photos[0].pixels]).shape == (1, tiny_clip.dim)
        assert batcher.busy_s >= 0.1 and batcher.batches_run == 1
    finally:
        batcher.close()


class Lazy:
    """A photo decoded on first use, by whichever thread asks (as a listing photo from intake)."""

    def __init__(self, pixels: np.ndarray | None, error: str = "") -> None:
        self._pixels, self.error, self.decoded_in = pixels, error, ""

    @property
    def model_pixels(self) -> RGBImage:
        self.decoded_in = threading.current_thread().name
        if self._pixels is None:
            raise ValueError(self.error)
        return self._pixels


def test_sources_are_decoded_by_the_model_thread_and_a_bad_one_fails_alone(
    tiny_clip: OnnxEmbedder, photos: list[Photo]
) -> None:
    gated = Gated(tiny_clip)
    batcher = ThreadBatcher(gated, max_batch=16, max_wait_ms=0)
    try:
        first = batcher.submit([photos[0].pixels])  # keeps the model busy while the next ones queue
        assert gated.entered.wait(5)
        good, bad = Lazy(photos[1].pixels), Lazy(None, "cannot decode the JPEG image")
        ok = batcher.submit_sources([good, Lazy(photos[2].pixels)])
        failed = batcher.submit_sources([bad])
        gated.gate.set()
        first.result(10)
        rows = ok.result(10)
        with pytest.raises(ValueError, match="cannot decode the JPEG image"):
            failed.result(10)
    finally:
        batcher.close()
    np.testing.assert_allclose(rows, tiny_clip.embed([photos[1].pixels, photos[2].pixels]), atol=2e-5)
    assert good.decoded_in == bad.decoded_in == f"batch-{tiny_clip.name}"
    # The two good photos ran in one batch beside the bad request, which never reached the model.
    assert (batcher.batches_run, batcher.images_run) == (2, 3)


def test_a_request_cancelled_before_the_model_takes_it_is_dropped(
    tiny_clip: OnnxEmbedder, photos: list[Photo]
) -> None:
    gated = Gated(tiny_clip)
    batcher = ThreadBatcher(gated, max_wait_ms=0)
    try:
        first = batcher.submit([photos[0].pixels])
        assert gated.entered.wait(5)
        withdrawn = batcher.submit([photos[1].pixels])
        kept = batcher.submit([photos[2].pixels])
        assert withdrawn.cancel()
        gated.gate.set()
        first.result(10)
        assert kept.result(10).shape == (1, tiny_clip.dim)
        assert not first.cancel()  # done: too late
    finally:
        batcher.close()
    assert withdrawn.cancelled()
    assert batcher.images_run == 2


class Meeting:
    """A real model whose first ``parties`` calls each wait until all of them are inside at once (or time
    out), and that records the photos each call got: proof that several model threads run it side by
    side."""

    def __init__(self, inner: OnnxEmbedder, parties: int) -> None:
        self.inner, self.calls, self.parties = inner, list[int](), parties
        self.barrier = threading.Barrier(parties, timeout=5)
        self.name, self.model_id, self.dim, self.provider = inner.name, inner.model_id, inner.dim, inner.provider

    def embed(self, images: Sequence[RGBImage]) -> Vectors:
        self.calls.append(len(images))
        if len(self.calls) <= self.parties:
            self.barrier.wait()  # raises BrokenBarrierError if the other thread never comes
        return self.inner.embed(images)


def test_two_shared_threads_split_a_models_queue_and_run_side_by_side(
    tiny_clip: OnnxEmbedder, photos: list[Photo]
) -> None:
    """Four photos waiting for a model on two shared threads: a take is at most half of what waits (2,
    then 1 of the 2 left, then the last), the first two calls run at once (neither returns until the
    other has started), and every caller gets its own rows."""
    model = Meeting(tiny_clip, parties=2)
    pool = ModelThreads(2)
    batcher = ThreadBatcher(model, max_batch=16, max_wait_ms=0, pool=pool)
    requests = [[photos[i].pixels] for i in range(4)]
    try:
        with batcher._cv:  # queue all four before either thread can take one
            futures = [batcher.submit(r) for r in requests]
        got = [f.result(timeout=10) for f in futures]
    finally:
        batcher.close()
    assert sorted(model.calls) == [1, 1, 2]
    assert (batcher.batches_run, batcher.images_run) == (3, 4)
    for r, vectors in zip(requests, got, strict=True):
        np.testing.assert_allclose(vectors, tiny_clip.embed(r), atol=2e-5)
    assert not any(t.is_alive() for t in pool._threads)  # closing its only batcher stopped the pool


class Logged:
    """A real model that logs its calls (model name, photos) in a list shared with other models."""

    def __init__(self, inner: OnnxEmbedder, name: str, log: list[tuple[str, int]]) -> None:
        self.inner, self.log, self.name = inner, log, name
        self.model_id, self.dim, self.provider = inner.model_id, inner.dim, inner.provider

    def embed(self, images: Sequence[RGBImage]) -> Vectors:
        self.log.append((self.name, len(images)))
        return self.inner.embed(images)


def test_shared_threads_run_the_longest_waiting_request_of_any_model(
    tiny_clip: OnnxEmbedder, photos: list[Photo]
) -> None:
    """One shared thread, two models: while it is busy with model a, a request for b and then one for a
    queue; it runs b's next (older), then a's. Each model counts its own time and photos."""
    log: list[tuple[str, int]] = []
    gated = Gated(Logged(tiny_clip, "a", log))
    pool = ModelThreads(1)
    a = ThreadBatcher(gated, max_wait_ms=0, pool=pool)
    b = ThreadBatcher(Logged(tiny_clip, "b", log), max_wait_ms=0, pool=pool)
    try:
        first = a.submit([photos[0].pixels])
        assert gated.entered.wait(5)  # the one thread is inside a's call
        later_b = b.submit([photos[1].pixels, photos[2].pixels])
        later_a = a.submit([photos[3].pixels])
        gated.gate.set()
        for f in (first, later_b, later_a):
            f.result(timeout=10)
    finally:
        a.close()
        assert any(t.is_alive() for t in pool._threads)  # b still open: the pool serves it
        b.close()
    assert log == [("a", 1), ("b", 2), ("a", 1)]
    assert (a.images_run, b.images_run) == (2, 2) and a.busy_s > 0 and b.busy_s > 0
    assert not any(t.is_alive() for t in pool._threads)


def test_one_model_thread_takes_everything_waiting(tiny_clip: OnnxEmbedder, photos: list[Photo]) -> None:
    """The same four photos on a batcher's own thread are one take."""
    model = Counting(tiny_clip)
    batcher = ThreadBatcher(model, max_batch=16, max_wait_ms=0)
    try:
        with batcher._cv:
            futures = [batcher.submit([photos[i].pixels]) for i in range(4)]
        for f in futures:
            f.result(timeout=10)
    finally:
        batcher.close()
    assert model.calls == [4]


def test_shared_threads_are_at_least_one_and_never_wait_for_company(tiny_clip: OnnxEmbedder) -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ModelThreads(0)
    pool = ModelThreads(1)
    with pytest.raises(ValueError, match="max_wait_ms must be 0"):
        ThreadBatcher(tiny_clip, max_wait_ms=2, pool=pool)
