"""Batched scoring on real models, photos, FAISS and SQLite: ``score_many`` answers each listing as
``score`` would, keeps one listing's failure to itself and stores the batch; ``rescore_stored_many``
leaves unchanged listings unwritten; :class:`ScoringQueue` scores concurrent requests together."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from PIL import Image

from embeddings.thread_batcher import ThreadBatcher
from service.container import Container, build_container
from service.domain.model import Listing, ListingImage, Money, SellerInfo
from service.domain.pricing import UnknownCurrencyError
from service.intake.errors import IntakeError
from service.storage.listings import result_json
from service.usecases.score_queue import QueueClosedError, QueueStats, ScoringQueue
from service.usecases.scoring import ScoreOutcome, StoredListing
from tests.usecases.rescan_world import CATALOG, World, settings

pytestmark = pytest.mark.slow


def _photo(w: World, name: str) -> ListingImage:
    import hashlib

    path = w.photos / name
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    return ListingImage(hashlib.sha256(path.read_bytes()).hexdigest(), pixels)


def _listings(w: World) -> list[Listing]:
    """Edited copies of catalog photos (cheap and full price) and in-store photos, one a listing."""
    out = []
    for i, sku in enumerate(s for skus in CATALOG.values() for s in skus):
        price = Money(4.0 if i % 2 else 20.0, "USD")
        out.append(Listing(f"copy-{i}", f"{sku} offer", price=price, seller=SellerInfo(f"s{i % 3}"),
                           images=(_photo(w, w.copies[sku]),)))
    for i, (_, name) in enumerate(w.instore[:8]):
        out.append(Listing(f"store-{i}", "grocery", price=Money(10.0, "USD"), images=(_photo(w, name),)))
    return out


def _same(a: ScoreOutcome, b: ScoreOutcome) -> None:
    ra, rb = a.result, b.result
    assert (ra.verdict, ra.brand, ra.reasons) == (rb.verdict, rb.brand, rb.reasons)
    assert ra.risk == pytest.approx(rb.risk, abs=1e-6)
    assert [(m.reference.image_id, m.signal) for m in ra.matches] == \
        [(m.reference.image_id, m.signal) for m in rb.matches]


def test_score_many_answers_each_listing_as_score_does(rescan_world: World, container: Container) -> None:
    listings = _listings(rescan_world)
    alone = [container.scorer.score(lst, persist=False) for lst in listings]
    together = container.scorer.score_many(listings, persist=False)
    assert len(together) == len(listings)
    for a, b in zip(alone, together, strict=True):
        assert isinstance(b, ScoreOutcome)
        _same(a, b)
    # The cheap copies are flagged, so the batch is not trivially all clear.
    assert {o.result.verdict.value for o in alone} >= {"clear", "likely_counterfeit"}


def test_one_failing_listing_keeps_its_failure_and_the_batch_is_stored(rescan_world: World,
                                                                       container: Container) -> None:
    listings = _listings(rescan_world)[:4]
    bad = Listing("bad-currency", "x", price=Money(5.0, "XXX"), images=listings[0].images)
    batch = [listings[0], bad, *listings[1:]]
    got = container.scorer.score_many(batch)
    assert isinstance(got[1], UnknownCurrencyError)
    assert all(isinstance(g, ScoreOutcome) and g.written for i, g in enumerate(got) if i != 1)
    for lst in listings:  # every other listing stored, once
        assert len(container.listings.history(lst.listing_id)) == 1
    assert container.listings.get_listing("bad-currency") is None
    # Every photo was new to this data dir: each model ran once per distinct photo, the run counted for
    # the first listing that has the photo (the failing listing shares listing 0's photo).
    first = got[0]
    assert isinstance(first, ScoreOutcome)
    assert set(first.embedded.values()) == {1} and set(first.cache_hits.values()) == {0}
    assert sum(sum(g.embedded.values()) for g in got if isinstance(g, ScoreOutcome)) == \
        len(listings) * len(first.embedded)


def test_a_stored_rescan_writes_only_changed_results(rescan_world: World, container: Container) -> None:
    listings = _listings(rescan_world)
    for g in container.scorer.score_many(listings):
        assert isinstance(g, ScoreOutcome)

    def stored() -> list[StoredListing]:
        recs = list(container.listings.iter_stored())
        return [StoredListing(r.to_listing(), r.image_sha256s, r.latest_digest) for r in recs]

    # The first re-match may differ (market statistics now include every listing); the second cannot.
    container.scorer.rescore_stored_many(stored(), skip_unchanged=True)
    again = container.scorer.rescore_stored_many(stored(), skip_unchanged=True)
    assert all(isinstance(g, ScoreOutcome) and not g.written for g in again)
    histories = {lst.listing_id: len(container.listings.history(lst.listing_id)) for lst in listings}
    container.scorer.rescore_stored_many(stored(), skip_unchanged=True)
    assert {lid: len(container.listings.history(lid)) for lid in histories} == histories
    # Without skipping every listing gets a history row.
    container.scorer.rescore_stored_many(stored(), skip_unchanged=False)
    assert all(len(container.listings.history(lid)) == n + 1 for lid, n in histories.items())


def test_market_statistics_leave_out_the_listing_itself_whatever_the_order(rescan_world: World,
                                                                           container: Container) -> None:
    """Eight listings of one product make its market. Each is compared with the other seven's prices
    only, whichever listing loaded the cached sample: two fresh scorers re-matching the stored listings
    in opposite orders give identical results (before, the listing that loaded the sample was left out
    and the others were not, and ~10 % of an unchanged catalog's stored rescan was rewritten)."""
    w = rescan_world
    sku = next(iter(CATALOG.values()))[0]
    photo = _photo(w, w.copies[sku])
    prices = [17.0, 18.5, 19.0, 20.0, 20.5, 21.0, 22.0, 12.0]
    listings = [Listing(f"market-{i}", f"{sku} offer", price=Money(p, "USD"), images=(photo,))
                for i, p in enumerate(prices)]
    for g in container.scorer.score_many(listings):
        assert isinstance(g, ScoreOutcome)
    recs = [r for r in container.listings.iter_stored() if r.listing_id.startswith("market-")]
    stored = [StoredListing(r.to_listing(), r.image_sha256s, r.latest_digest) for r in recs]
    results = []
    for order in (stored, stored[::-1]):
        fresh = build_container(settings(container.settings.data_dir), embedders=w.embedders, reconcile=False)
        try:
            got = fresh.scorer.rescore_stored_many(order, persist=False)
        finally:
            fresh.close()
        results.append({o.result.listing_id: o.result for o in got if isinstance(o, ScoreOutcome)})
    forward, backward = results
    assert len(forward) == len(backward) == len(prices)
    for lid, r in forward.items():
        assert result_json(r) == result_json(backward[lid]), lid
    # The market was read: the price signal of the cheap one compares it with the other seven.
    cheap = forward["market-7"].signals
    price = next(s for s in cheap if s.name.value == "price")
    assert price.ran and price.evidence["market_listings"] == len(prices) - 1, price.evidence


def test_the_queue_scores_concurrent_requests_together(rescan_world: World, container: Container) -> None:
    listings = _listings(rescan_world)
    expected = {lst.listing_id: container.scorer.score(lst, persist=False) for lst in listings}
    queue = ScoringQueue(container.scorer, workers=1, max_batch=8)
    results: dict[str, ScoreOutcome] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(listings))

    def client(lst: Listing) -> None:
        try:
            start.wait()
            results[lst.listing_id] = queue.submit(lst).result(timeout=120)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(lst,)) for lst in listings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for lid, out in results.items():
        _same(expected[lid], out)
    assert queue.listings == len(listings)
    assert queue.batches < len(listings)  # requests that arrived together were scored together
    # A failing listing fails its own future only.
    bad = queue.submit(Listing("bad", "x", price=Money(1.0, "XXX"), images=listings[0].images))
    with pytest.raises(UnknownCurrencyError):
        bad.result(timeout=60)
    queue.close()
    with pytest.raises(QueueClosedError):
        queue.submit(listings[0])


def test_a_cached_photo_is_not_decoded_again(rescan_world: World, container: Container) -> None:
    """Photos come from intake checked and hashed, not decoded; the scorer decodes only photos some
    model has not embedded, and a photo whose body is broken fails its own listing."""
    data = (rescan_world.photos / rescan_world.copies["Arla-Sour-Milk"]).read_bytes()
    loader = container.images.loader

    def listing(lid: str, payload: bytes) -> Listing:
        return Listing(lid, "milk", price=Money(20.0, "USD"), images=(loader.probe_bytes(payload).listing_image(),))

    first = listing("lazy-1", data)
    assert not first.images[0].decoded
    [out] = container.scorer.score_many([first])
    assert isinstance(out, ScoreOutcome) and first.images[0].decoded  # new photo: decoded and embedded
    again = listing("lazy-2", data)
    broken = listing("lazy-3", data[: len(data) // 3])
    got = container.scorer.score_many([again, broken])
    assert isinstance(got[0], ScoreOutcome) and not again.images[0].decoded  # cached: never decoded
    _same(out, got[0])
    from service.intake.errors import IntakeError

    assert isinstance(got[1], IntakeError) and got[1].code.value == "decode_failed"
    assert container.listings.get_listing("lazy-3") is None


def test_a_batch_that_fails_as_a_whole_fails_its_callers_and_the_queue_goes_on(
        rescan_world: World, container: Container, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error out of the scorer itself (not a listing's own failure) reaches every caller of the batch;
    the worker lives on, and the listing_id is free again: the next request for it is scored."""
    listing = _listings(rescan_world)[0]
    real = container.scorer.prepare_many
    calls = 0

    def fails_once(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("scorer broke")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(container.scorer, "prepare_many", fails_once)
    stats = _fails_then_scores(container, listing, RuntimeError, "scorer broke")
    assert stats.batches == 1  # the failed batch is not counted


def _fails_then_scores(container: Container, listing: Listing, error: type[Exception], match: str) -> QueueStats:
    """A queued listing's caller gets ``error``; the same listing queued again is scored and stored (the
    worker lived on, the listing_id is free). Answers the queue's stats."""
    queue = ScoringQueue(container.scorer, workers=1, max_batch=8)
    try:
        with pytest.raises(error, match=match):
            queue.submit(listing).result(timeout=60)
        again = queue.submit(listing).result(timeout=60)
        assert again.result.verdict is not None and again.written
        return queue.stats()
    finally:
        queue.close()


def test_close_answers_what_it_leaves_queued_within_one_deadline(
        rescan_world: World, container: Container, monkeypatch: pytest.MonkeyPatch) -> None:
    """close(timeout) waits for the workers at most ``timeout``, and every request still queued then is
    answered with QueueClosedError: none is left waiting, none is scored on the models and database the
    container closes next."""
    real = container.scorer.prepare_many
    started = threading.Event()

    def slow(*args: object, **kwargs: object) -> object:
        started.set()
        time.sleep(1.0)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(container.scorer, "prepare_many", slow)
    queue = ScoringQueue(container.scorer, workers=2, max_batch=1)
    futures = [queue.submit(lst) for lst in _listings(rescan_world)[:6]]
    assert started.wait(30)
    t0 = time.monotonic()
    queue.close(timeout=0.3)
    assert time.monotonic() - t0 < 0.9  # not a batch's full second: close waited at most its timeout
    left = [f for f in futures if not f.running() and not f.done()]
    assert not left
    closed = [f for f in futures if f.done() and isinstance(f.exception(), QueueClosedError)]
    assert len(closed) >= 2 and "send it again" in str(closed[0].exception())
    for f in futures:  # the batches under way when close returned are answered too
        f.exception(timeout=30)


@pytest.mark.parametrize("slow", [False, True])
def test_a_scorer_that_answers_short_fails_its_callers_instead_of_leaving_them_waiting(
        rescan_world: World, container: Container, monkeypatch: pytest.MonkeyPatch, slow: bool) -> None:
    """finish_many answering fewer outcomes than listings (a scorer bug) reaches the callers as an error,
    on the quick path and on the slow pool's (where it was lost in the pool's own Future and the caller
    waited for ever), and the listing_id is free again."""
    listing = _listings(rescan_world)[0]
    real_prepare, real_finish = container.scorer.prepare_many, container.scorer.finish_many
    calls = 0

    def prepare(*args: object, **kwargs: object) -> object:
        got = real_prepare(*args, **kwargs)  # type: ignore[arg-type]
        for p in got:
            if not isinstance(p, Exception):
                p.slow = slow  # the slow pool finishes it (as it would one the cascade verifies)
        return got

    def short_once(prepared: object) -> object:
        nonlocal calls
        calls += 1
        return [] if calls == 1 else real_finish(prepared)  # type: ignore[arg-type]

    monkeypatch.setattr(container.scorer, "prepare_many", prepare)
    monkeypatch.setattr(container.scorer, "finish_many", short_once)
    _fails_then_scores(container, listing, ValueError, "shorter")


def test_the_queue_starts_the_models_on_a_listing_as_it_is_queued(
        rescan_world: World, container: Container, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``prefetch`` the models take a queued listing's new photos while the worker is still busy
    with an earlier batch; each photo runs through each model once, and its vectors, stored and
    cached, are the model's. A photo that cannot be decoded (now in a model thread) fails its own listing only."""
    loader = container.images.loader
    roles = container.scorer._roles()
    batchers = {name: emb.embedder for name, emb in roles.items() if isinstance(emb.embedder, ThreadBatcher)}
    assert set(batchers) == set(roles)

    def jpeg(pixels: np.ndarray, quality: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
        return buf.getvalue()

    # Six listings whose photos are new to the cache (re-encoded), decoded on first use.
    bodies = [jpeg(lst.images[0].pixels, 83 + k) for k, lst in enumerate(_listings(rescan_world)[:6])]
    early = [Listing(f"early-{k}", "grocery", price=Money(10.0, "USD"),
                     images=(loader.probe_bytes(body).listing_image(),)) for k, body in enumerate(bodies)]
    held = threading.Event()
    real = container.scorer.prepare_many
    taken: list[int] = []

    def slow_first(batch: list[Listing], **kwargs: object) -> object:
        taken.append(len(batch))
        if len(taken) == 1:
            assert held.wait(30)  # the worker is busy: the others queue behind this batch
        return real(batch, **kwargs)  # type: ignore[arg-type]

    def ran() -> dict[str, int]:
        return {n: b.images_run - before[n] for n, b in batchers.items()}

    monkeypatch.setattr(container.scorer, "prepare_many", slow_first)
    before = {n: b.images_run for n, b in batchers.items()}
    queue = ScoringQueue(container.scorer, workers=1, max_batch=8)
    try:
        first = queue.submit(early[0])
        deadline = time.monotonic() + 30
        while not taken:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rest = [queue.submit(lst) for lst in early[1:]]
        while ran() != {n: len(early) for n in batchers}:  # the models run them while the worker waits
            assert time.monotonic() < deadline, ran()
            time.sleep(0.01)
        assert taken == [1]
        held.set()
        outs = [first.result(60), *(f.result(60) for f in rest)]
        assert ran() == {n: len(early) for n in batchers}  # and the worker ran none of them again
        # A listing whose photo's body is broken fails alone; the queue goes on.
        broken = Listing("broken", "x", price=Money(5.0, "USD"),
                         images=(loader.probe_bytes(bodies[0][: len(bodies[0]) // 3]).listing_image(),))
        with pytest.raises(IntakeError, match="decode"):
            queue.submit(broken).result(60)
        assert queue.submit(early[1]).result(60).written
    finally:
        held.set()
        queue.close()
    assert all(o.written for o in outs)
    shas = [lst.images[0].sha256 for lst in early]
    for name, emb in roles.items():
        assert emb.store is not None and set(emb.store.get_many(emb.model_id, shas)) == set(shas)  # stored
        model = batchers[name].inner
        cached = emb.lookup(shas)
        direct = model.embed([lst.images[0].pixels for lst in early])
        np.testing.assert_allclose(np.stack([cached[lst.images[0].sha256] for lst in early]), direct, atol=1e-5)


def test_models_on_the_cpu_do_not_wait_for_company(container: Container) -> None:
    """``models.batch_wait_ms`` and ``models.run_batch`` "auto": each CPU model's batcher runs what is
    queued at once (a batch costs no less a photo than single photos there), a photo per model call;
    the wait and the call size are the provider's."""
    batchers = [e.embedder for e in container.embedders.values() if isinstance(e.embedder, ThreadBatcher)]
    assert batchers
    for b in batchers:
        assert b.inner.provider == "cpu"
        assert b.max_wait == 0.0
        assert b.run_batch == 1


def test_the_models_share_their_threads_on_the_cpu(
        rescan_world: World, container: Container, tmp_path: Path) -> None:
    """``models.shared_threads`` "auto" on the CPU: both models' batchers run on one pool of model
    threads, as many as the cores hold of a model's ONNX Runtime threads; a number set holds; a model that
    waits for company (``batch_wait_ms`` > 0) keeps a thread of its own."""
    batchers = [cast(ThreadBatcher, emb.embedder) for emb in container.scorer._roles().values()]
    assert len(batchers) == 2 and batchers[0]._pool is not None and batchers[0]._pool is batchers[1]._pool
    m = container.settings.models
    cores = os.cpu_count() or 1
    assert batchers[0]._pool.size == m.shared_threads_for("cpu", cores, m.intra_op_threads or cores // 2)
    assert all(b._thread is None for b in batchers)
    # provider "auto" found the CPU: "auto" is sized by the process's cores (one of several workers).
    for update, size in (({"shared_threads": 3}, 3), ({"batch_wait_ms": 2.0}, None),
                         ({"provider": "auto", "process_cores": 1}, 1)):
        s = settings(tmp_path / "other").model_copy(deep=True)
        s.models = s.models.model_copy(update=update)
        other = build_container(s, embedders=rescan_world.embedders)
        try:
            pools = {id(p): p for b in other.scorer._roles().values()
                     if (p := cast(ThreadBatcher, b.embedder)._pool) is not None}
            assert [p.size for p in pools.values()] == ([size] if size is not None else [])
        finally:
            other.close()
