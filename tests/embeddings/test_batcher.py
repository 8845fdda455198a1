"""MicroBatcher with a real ONNX embedder: concurrent callers share batches and get exactly their rows."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from embeddings.batcher import BatcherClosedError, MicroBatcher
from embeddings.onnx_embedder import OnnxEmbedder
from embeddings.preprocess import PreprocessError
from service.domain.model import RGBImage, Vectors
from tests.embeddings.conftest import Photo


def _requests(photos: list[Photo], sizes: list[int]) -> list[list[np.ndarray]]:
    out, at = [], 0
    for n in sizes:
        out.append([photos[(at + i) % len(photos)].pixels for i in range(n)])
        at += n
    return out


def test_concurrent_callers_share_batches_and_get_their_own_rows(
    effnet: OnnxEmbedder, photos: list[Photo]
) -> None:
    requests = _requests(photos, [2, 1, 3, 2, 1, 2, 3, 2])  # 16 images in 8 requests
    direct = [effnet.embed(r) for r in requests]

    async def main() -> tuple[list[np.ndarray], int, int]:
        async with MicroBatcher(effnet, max_batch=16, max_wait_ms=200) as batcher:
            results = await asyncio.gather(*(batcher.embed(r) for r in requests))
            return list(results), batcher.batches_run, batcher.images_run

    results, batches, images = asyncio.run(main())
    for got, want in zip(results, direct, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-5)
    assert images == 16
    assert batches < len(requests)  # requests really were combined
    assert batches == 1  # all 16 arrived within the window and fit one batch


def test_batches_never_exceed_max_batch(tiny_clip: OnnxEmbedder, photos: list[Photo]) -> None:
    requests = _requests(photos, [2] * 6)
    seen: list[int] = []

    class Recording:
        """The real embedder, remembering the size of each batch it is given."""

        name, model_id, dim, provider = tiny_clip.name, tiny_clip.model_id, tiny_clip.dim, tiny_clip.provider

        def embed(self, images: Sequence[RGBImage]) -> Vectors:
            seen.append(len(images))
            return tiny_clip.embed(images)

    async def main() -> list[np.ndarray]:
        async with MicroBatcher(Recording(), max_batch=5, max_wait_ms=100) as batcher:
            return list(await asyncio.gather(*(batcher.embed(r) for r in requests)))

    results = asyncio.run(main())
    assert max(seen) <= 5
    assert sum(seen) == 12
    for got, req in zip(results, requests, strict=True):
        np.testing.assert_allclose(got, tiny_clip.embed(req), atol=2e-5)


def test_a_lone_request_is_answered_after_the_wait(tiny_clip: OnnxEmbedder, photos: list[Photo]) -> None:
    async def main() -> np.ndarray:
        async with MicroBatcher(tiny_clip, max_batch=16, max_wait_ms=5) as batcher:
            return await asyncio.wait_for(batcher.embed([photos[0].pixels]), timeout=30)

    np.testing.assert_allclose(asyncio.run(main()), tiny_clip.embed([photos[0].pixels]), atol=2e-5)


def test_bad_input_fails_only_its_own_caller(tiny_clip: OnnxEmbedder, photos: list[Photo]) -> None:
    good = [photos[0].pixels]
    bad = [photos[1].pixels.astype(np.float32)]

    async def main() -> list[object]:
        async with MicroBatcher(tiny_clip, max_batch=16, max_wait_ms=50) as batcher:
            calls = (batcher.embed(good), batcher.embed(bad))  # type: ignore[arg-type]
            return list(await asyncio.gather(*calls, return_exceptions=True))

    ok, failed = asyncio.run(main())
    assert isinstance(ok, np.ndarray) and ok.shape == (1, tiny_clip.dim)
    assert isinstance(failed, PreprocessError) and "images[0]: expected dtype uint8" in str(failed)


def test_a_model_error_reaches_every_caller_of_that_batch(
    tiny_clip: OnnxEmbedder, photos: list[Photo]
) -> None:
    class Broken:
        name, model_id, dim, provider = "broken", "broken@0", tiny_clip.dim, "cpu"

        def embed(self, images: Sequence[RGBImage]) -> Vectors:
            raise RuntimeError("session died")

    async def main() -> list[object]:
        async with MicroBatcher(Broken(), max_wait_ms=20) as batcher:
            calls = (batcher.embed([p.pixels]) for p in photos[:3])
            return list(await asyncio.gather(*calls, return_exceptions=True))

    errors = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and str(e) == "session died" for e in errors)


def test_a_cancelled_caller_does_not_disturb_the_others(tiny_clip: OnnxEmbedder, photos: list[Photo]) -> None:
    async def main() -> np.ndarray:
        async with MicroBatcher(tiny_clip, max_batch=16, max_wait_ms=100) as batcher:
            doomed = asyncio.ensure_future(batcher.embed([photos[0].pixels]))
            kept = asyncio.ensure_future(batcher.embed([photos[1].pixels]))
            await asyncio.sleep(0)
            doomed.cancel()
            return await kept

    np.testing.assert_allclose(asyncio.run(main()), tiny_clip.embed([photos[1].pixels]), atol=2e-5)


def test_a_closed_batcher_refuses_new_work_but_finishes_queued_work(
    tiny_clip: OnnxEmbedder, photos: list[Photo]
) -> None:
    async def main() -> np.ndarray:
        # A wait far longer than the test: closing must flush the queue instead of waiting it out.
        batcher = MicroBatcher(tiny_clip, max_wait_ms=100)
        batcher._max_wait = 3600.0
        queued = asyncio.ensure_future(batcher.embed([photos[0].pixels]))
        await asyncio.sleep(0)
        await asyncio.wait_for(batcher.aclose(), timeout=60)
        assert batcher.closed
        with pytest.raises(BatcherClosedError):
            await batcher.embed([photos[0].pixels])
        return await queued

    np.testing.assert_allclose(asyncio.run(main()), tiny_clip.embed([photos[0].pixels]), atol=2e-5)


def test_the_batcher_can_serve_a_later_event_loop(tiny_clip: OnnxEmbedder, photos: list[Photo]) -> None:
    batcher = MicroBatcher(tiny_clip, max_wait_ms=1)
    first = asyncio.run(batcher.embed([photos[0].pixels]))
    second = asyncio.run(batcher.embed([photos[0].pixels]))
    np.testing.assert_array_equal(first, second)
    assert batcher.batches_run == 2
    batcher.close()
    with pytest.raises(BatcherClosedError):
        asyncio.run(batcher.embed([photos[0].pixels]))


def test_settings_are_validated(tiny_clip: OnnxEmbedder) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(tiny_clip, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        MicroBatcher(tiny_clip, max_wait_ms=-1)
