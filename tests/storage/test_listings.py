"""The listing repository on SQLite and PostgreSQL: score history, latest matches, review-queue
semantics and brand scoping, market prices, sellers' records, stored rescans and concurrent writers."""

from __future__ import annotations

import multiprocessing
import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from service.domain.model import Money, SignalName, Verdict
from service.storage import (
    InvalidInputError,
    NotFoundError,
    ReferenceRecord,
    ReviewStatus,
    ScoreSource,
    Storage,
)
from service.storage.listings import ScoreWrite
from tests.storage.factories import listing, match, result

Refs = dict[str, ReferenceRecord]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _score(st: Storage, lid: str, verdict: Verdict, brand: str | None, refs: list[ReferenceRecord], *,
           price: float | None = 10.0, seller: str | None = "s1", at: datetime | None = None,
           source: ScoreSource = ScoreSource.API):
    lst, shas = listing(lid, price=price, seller=seller)
    matches = [match(r, 0.9 - 0.1 * i, image_index=i % 2) for i, r in enumerate(refs)]
    res = result(lid, verdict, brand, matches)
    return st.listings.record_score(lst, res, source, image_sha256s=shas, scored_at=at)


def test_history_and_latest_matches(storage: Storage, two_brands: Refs) -> None:
    a1, alogo = two_brands["a1"], two_brands["alogo"]
    lst, shas = listing("L1", price=1.5)
    res = result("L1", Verdict.REVIEW, "alpro", [match(a1, 0.91), match(alogo, 0.7, SignalName.LOGO, 1)])
    res.signals[0].evidence["similarities"] = np.array([0.91, 0.5], dtype=np.float32)  # numpy in evidence
    first = storage.listings.record_score(lst, res, "api", image_sha256s=shas, scored_at=T0)
    stored = storage.listings.get_listing("L1")
    assert stored is not None and stored.id == first.listing_pk
    assert (stored.title, stored.price, stored.image_sha256s, stored.latest_verdict, stored.latest_brand) == \
        ("a listing", Money(1.5, "EUR"), tuple(shas), Verdict.REVIEW, "alpro")
    assert stored.seller is not None and (stored.seller.seller_id, stored.seller.stock) == ("s1", 5000)
    assert stored.first_seen == stored.last_scored_at == T0
    latest = storage.listings.latest_matches("L1")
    assert [(m.brand, m.sku, m.reference_image_id, m.signal) for m in latest] == \
        [("alpro", "soy-milk", a1.id, "copy"), ("alpro", None, alogo.id, "logo")]

    later = T0 + timedelta(hours=1)
    second = _score(storage, "L1", Verdict.LIKELY_COUNTERFEIT, "alpro", [a1], at=later)
    assert second.listing_pk == first.listing_pk and second.score_id != first.score_id
    history = storage.listings.history("L1")
    assert [h.verdict for h in history] == [Verdict.LIKELY_COUNTERFEIT, Verdict.REVIEW]  # newest first
    assert history[1].result["matches"][0] == match(a1, 0.91).as_contract()
    assert history[1].result["signals"][0]["evidence"]["similarities"] == pytest.approx([0.91, 0.5])
    assert history[1].model_versions == {"copy": "sscd@test"} and history[1].source is ScoreSource.API
    # The latest matches are replaced, not appended to.
    assert [m.reference_image_id for m in storage.listings.latest_matches("L1")] == [a1.id]
    again = storage.listings.get_listing("L1")
    assert again is not None and (again.first_seen, again.last_scored_at) == (T0, later)
    assert storage.listings.get_listing("nope") is None and storage.listings.history("nope") == []


def test_review_item_semantics(storage: Storage, two_brands: Refs) -> None:
    a1, o1 = two_brands["a1"], two_brands["o1"]
    repo = storage.listings
    first = _score(storage, "L1", Verdict.REVIEW, "alpro", [a1])
    assert first.review_item_id is not None
    [item] = repo.review_queue("alpro")
    assert (item.id, item.listing_id, item.status, item.verdict) == (first.review_item_id, "L1",
                                                                     ReviewStatus.OPEN, Verdict.REVIEW)
    # A re-score updates the open item instead of adding one.
    second = _score(storage, "L1", Verdict.LIKELY_COUNTERFEIT, "alpro", [a1])
    [item] = repo.review_queue("alpro")
    assert item.id == first.review_item_id == second.review_item_id
    assert (item.verdict, item.risk, item.score_id) == (Verdict.LIKELY_COUNTERFEIT, 0.9, second.score_id)
    # Now the listing is flagged for oatly: alpro's undecided item is cleared, oatly's opened.
    third = _score(storage, "L1", Verdict.REVIEW, "oatly", [o1])
    assert repo.review_queue("alpro") == []
    assert [i.status for i in repo.review_queue("alpro", status="cleared")] == [ReviewStatus.CLEARED]
    assert [i.id for i in repo.review_queue("oatly")] == [third.review_item_id]
    # Clear: every open item is cleared.
    _score(storage, "L1", Verdict.CLEAR, None, [])
    assert repo.review_queue("oatly") == [] and repo.review_counts("oatly")[ReviewStatus.CLEARED] == 1
    # Flagged for alpro again: the same item re-opens.
    reopened = _score(storage, "L1", Verdict.REVIEW, "alpro", [a1])
    assert reopened.review_item_id == first.review_item_id
    # A decision is kept, whatever later scores say.
    decided = repo.decide("alpro", first.review_item_id, "confirmed", decided_by="alice@alpro")
    assert (decided.status, decided.decided_by) == (ReviewStatus.CONFIRMED, "alice@alpro")
    assert decided.decided_at is not None
    assert _score(storage, "L1", Verdict.REVIEW, "alpro", [a1]).review_item_id is None
    _score(storage, "L1", Verdict.CLEAR, None, [])
    [kept] = repo.review_queue("alpro", status=None)
    assert (kept.status, kept.decided_by, kept.verdict) == (ReviewStatus.CONFIRMED, "alice@alpro",
                                                            Verdict.REVIEW)
    # A flagged score with no brand opens nothing.
    assert _score(storage, "L2", Verdict.REVIEW, None, []).review_item_id is None
    assert repo.review_counts("alpro") == {ReviewStatus.OPEN: 0, ReviewStatus.CONFIRMED: 1,
                                           ReviewStatus.REJECTED: 0, ReviewStatus.CLEARED: 0}


def test_review_queues_are_brand_scoped(storage: Storage, two_brands: Refs) -> None:
    repo = storage.listings
    ids = {lid: _score(storage, lid, v, "alpro", [two_brands["a1"]]).review_item_id
           for lid, v in (("L1", Verdict.REVIEW), ("L2", Verdict.LIKELY_COUNTERFEIT), ("L3", Verdict.REVIEW))}
    theirs = _score(storage, "L9", Verdict.REVIEW, "oatly", [two_brands["o1"]]).review_item_id
    assert theirs is not None
    queue = repo.review_queue("alpro")
    assert [i.listing_id for i in queue] == ["L2", "L1", "L3"]  # riskiest first, then oldest
    assert [i.listing_id for i in repo.review_queue("alpro", limit=1, offset=1)] == ["L1"]
    assert all(i.brand == "alpro" for i in queue)
    assert [i.listing_id for i in repo.review_queue("oatly")] == ["L9"]
    # oatly can neither see nor decide alpro's items.
    assert repo.review_item("oatly", ids["L2"]) is None  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        repo.decide("oatly", ids["L2"], "rejected", decided_by="mallory")  # type: ignore[arg-type]
    item = repo.review_item("alpro", ids["L2"])  # type: ignore[arg-type]
    assert item is not None and item.status is ReviewStatus.OPEN and item.decided_by is None
    assert item.result is not None and item.result["verdict"] == "likely_counterfeit"
    # Decisions can be changed; only confirmed/rejected are decisions.
    repo.decide("alpro", ids["L2"], ReviewStatus.REJECTED)  # type: ignore[arg-type]
    assert repo.decide("alpro", ids["L2"], "confirmed", "bob").status is ReviewStatus.CONFIRMED  # type: ignore[arg-type]
    for bad in ("open", "cleared", "maybe"):
        with pytest.raises(InvalidInputError) as err:
            repo.decide("alpro", ids["L1"], bad)  # type: ignore[arg-type]
        assert err.value.field == "status"
    with pytest.raises(NotFoundError):
        repo.review_queue("nobody")
    with pytest.raises(InvalidInputError):
        repo.review_queue("alpro", limit=0)


def test_market_prices(storage: Storage, two_brands: Refs) -> None:
    a1, a2, o1 = two_brands["a1"], two_brands["a2"], two_brands["o1"]
    history = storage.listings  # (market_prices is the repository's; market_sample is ListingHistory's)
    for lid, price, refs, at in (("L1", 1.0, [a1], 0), ("L2", 2.0, [a1, a2], 1), ("L3", None, [a1], 2),
                                 ("L4", 4.0, [a2], 3), ("L5", 5.0, [o1], 4), ("L6", 6.0, [a1], 5)):
        _score(storage, lid, Verdict.REVIEW, refs[0].brand, refs, price=price, at=T0 + timedelta(minutes=at))
    assert history.market_prices("alpro", "soy-milk") == [Money(6.0, "EUR"), Money(2.0, "EUR"),
                                                          Money(1.0, "EUR")]  # most recent first
    assert history.market_prices("alpro", "soy-milk", exclude_listing_id="L6") == [Money(2.0, "EUR"),
                                                                                   Money(1.0, "EUR")]
    # The whole sample with each price's listing (a scorer leaves each listing's own price out).
    assert history.market_sample("alpro", "soy-milk") == [("L6", Money(6.0, "EUR")), ("L2", Money(2.0, "EUR")),
                                                          ("L1", Money(1.0, "EUR"))]
    assert history.market_sample("alpro", "soy-milk", limit=2) == [("L6", Money(6.0, "EUR")),
                                                                   ("L2", Money(2.0, "EUR"))]
    # A listing the brand confirmed as counterfeit leaves the price sample.
    [l6] = [i for i in storage.listings.review_queue("alpro") if i.listing_id == "L6"]
    storage.listings.decide("alpro", l6.id, "confirmed")
    assert history.market_prices("alpro", "soy-milk") == [Money(2.0, "EUR"), Money(1.0, "EUR")]
    # L2's first photo shows soy-milk, its second soyghurt: it is in both markets.
    assert history.market_prices("alpro", "soyghurt") == [Money(4.0, "EUR"), Money(2.0, "EUR")]
    assert history.market_prices("oatly", "oat-milk") == [Money(5.0, "EUR")]
    assert history.market_prices("oatly", "soy-milk") == []
    assert history.market_prices("nobody", "soy-milk") == []
    # Only what a photo shows best counts: L7's first photo is soy-milk (copy 0.9) and only weakly like
    # soyghurt (copy 0.6); a logo match names no product; its second photo looks most like oat milk.
    lst, shas = listing("L7", price=7.0)
    matches = [match(a1, 0.9, image_index=0), match(a2, 0.6, image_index=0),
               match(a2, 0.95, SignalName.LOGO, image_index=0), match(o1, 0.7, SignalName.LOOKALIKE, 1)]
    storage.listings.record_score(lst, result("L7", Verdict.REVIEW, "alpro", matches), image_sha256s=shas,
                                  scored_at=T0 + timedelta(minutes=9))
    assert history.market_prices("alpro", "soyghurt") == [Money(4.0, "EUR"), Money(2.0, "EUR")]
    assert history.market_prices("oatly", "oat-milk") == [Money(7.0, "EUR"), Money(5.0, "EUR")]
    # Only the latest matches count: L1 re-scored without a match of soy-milk drops out.
    _score(storage, "L1", Verdict.CLEAR, None, [], price=1.0)
    assert history.market_prices("alpro", "soy-milk") == [Money(7.0, "EUR"), Money(2.0, "EUR")]


def test_market_order_follows_when_the_platform_last_sent_each_listing(storage: Storage, two_brands: Refs) -> None:
    """The sample is the newest listings of the market by ``last_seen_at``, however the listing was last
    written: a new score, a file rescan that finds it unchanged (only marked seen), or a stored rescan
    (which rewrites its matches but did not hear from the platform, so leaves its place)."""
    a1 = two_brands["a1"]
    repo = storage.listings

    def write(lid: str, price: float, at: int, source: ScoreSource = ScoreSource.API, **kw: bool) -> None:
        lst, shas = listing(lid, price=price)
        res = result(lid, Verdict.REVIEW, "alpro", [match(a1, 0.9)])
        repo.record_scores([ScoreWrite(lst, res, source, shas)], scored_at=T0 + timedelta(minutes=at), **kw)

    for i, lid in enumerate(("L1", "L2", "L3")):
        write(lid, float(i + 1), i)
    assert [lid for lid, _ in repo.market_sample("alpro", "soy-milk")] == ["L3", "L2", "L1"]
    # A file rescan sends L1 again, unchanged: only marked seen, and now the newest of its market.
    write("L1", 1.0, 10, ScoreSource.RESCAN, same_as_stored=True)
    assert len(repo.history("L1")) == 1  # (no history row: it was only marked seen)
    assert [lid for lid, _ in repo.market_sample("alpro", "soy-milk")] == ["L1", "L3", "L2"]
    # A stored rescan of L2 rewrites its matches at minute 20 but leaves its place.
    write("L2", 2.0, 20, ScoreSource.STORED_RESCAN)
    assert [lid for lid, _ in repo.market_sample("alpro", "soy-milk")] == ["L1", "L3", "L2"]
    # A new score from the platform moves it.
    write("L2", 2.5, 30)
    assert repo.market_sample("alpro", "soy-milk", limit=2) == [("L2", Money(2.5, "EUR")), ("L1", Money(1.0, "EUR"))]


def test_confirmed_counterfeits(storage: Storage, two_brands: Refs) -> None:
    a1, o1 = two_brands["a1"], two_brands["o1"]
    repo = storage.listings
    i1 = _score(storage, "L1", Verdict.REVIEW, "alpro", [a1], seller="bad").review_item_id
    i2 = _score(storage, "L2", Verdict.REVIEW, "alpro", [a1], seller="bad").review_item_id
    i3 = _score(storage, "L3", Verdict.REVIEW, "oatly", [o1], seller="bad").review_item_id
    i4 = _score(storage, "L4", Verdict.REVIEW, "alpro", [a1], seller="good").review_item_id
    assert repo.confirmed_counterfeits("bad") == 0  # open items are not confirmations
    repo.decide("alpro", i1, "confirmed")  # type: ignore[arg-type]
    repo.decide("alpro", i2, "rejected")  # type: ignore[arg-type]
    repo.decide("oatly", i3, "confirmed")  # type: ignore[arg-type]
    repo.decide("alpro", i4, "rejected")  # type: ignore[arg-type]
    assert repo.confirmed_counterfeits("bad") == 2
    assert repo.confirmed_counterfeits("good") == 0
    assert repo.confirmed_counterfeits("unknown") == 0


def test_stored_listings_for_rescan(storage: Storage, two_brands: Refs) -> None:
    a1, o1 = two_brands["a1"], two_brands["o1"]
    repo = storage.listings
    for i in range(7):
        refs = [a1] if i % 3 == 0 else [o1] if i % 3 == 1 else []
        verdict = Verdict.REVIEW if refs else Verdict.CLEAR
        _score(storage, f"L{i}", verdict, refs[0].brand if refs else None, refs, at=T0 + timedelta(days=i))
    everything = list(repo.iter_stored(batch_size=2))  # several pages
    assert [x.listing_id for x in everything] == [f"L{i}" for i in range(7)]
    assert repo.count_stored() == 7
    assert [x.listing_id for x in repo.iter_stored(brand="alpro", batch_size=2)] == ["L0", "L3", "L6"]
    assert repo.count_stored(brand="oatly") == 2
    since = T0 + timedelta(days=4)
    assert [x.listing_id for x in repo.iter_stored(since=since)] == ["L4", "L5", "L6"]
    assert [x.listing_id for x in repo.iter_stored(brand="alpro", since=since)] == ["L6"]
    with pytest.raises(NotFoundError):
        list(repo.iter_stored(brand="nobody"))
    # Shards (worker processes of one rescan): disjoint, together everything, each in id order.
    shards = [[x.listing_id for x in repo.iter_stored(batch_size=2, shard=(k, 3))] for k in range(3)]
    assert sorted(i for ids in shards for i in ids) == [f"L{i}" for i in range(7)] and all(shards)
    assert all(ids == sorted(ids, key=lambda i: int(i[1:])) for ids in shards)
    assert [x.listing_id for x in repo.iter_stored(brand="alpro", shard=(0, 2))] == \
        [x.listing_id for x in repo.iter_stored(brand="alpro") if x.id % 2 == 0]
    with pytest.raises(ValueError, match="shard"):
        list(repo.iter_stored(shard=(2, 2)))
    # A stored rescan starts from the stored listing and leaves its content and last_seen_at alone.
    stored = repo.get_listing("L1")
    assert stored is not None
    rescan_at = T0 + timedelta(days=30)
    res = result("L1", Verdict.REVIEW, "alpro", [match(a1)])
    repo.record_score(stored.to_listing(), res, ScoreSource.STORED_RESCAN,
                      image_sha256s=stored.image_sha256s, scored_at=rescan_at)
    after = repo.get_listing("L1")
    assert after is not None
    assert (after.title, after.price, after.seller, after.image_sha256s, after.last_seen_at) == \
        (stored.title, stored.price, stored.seller, stored.image_sha256s, stored.last_seen_at)
    assert (after.last_scored_at, after.latest_brand) == (rescan_at, "alpro")
    assert repo.history("L1")[0].source is ScoreSource.STORED_RESCAN
    assert "L1" not in [x.listing_id for x in repo.iter_stored(since=since)]  # not seen again since


def test_a_match_of_a_reference_deleted_meanwhile_is_kept_without_its_id(storage: Storage,
                                                                         two_brands: Refs) -> None:
    a1, a2 = two_brands["a1"], two_brands["a2"]
    storage.catalog.delete_references("alpro", [a1.id])  # after the index returned it, before recording
    recorded = _score(storage, "L1", Verdict.REVIEW, "alpro", [a1, a2])
    assert recorded.review_item_id is not None
    assert [(m.sku, m.reference_image_id) for m in storage.listings.latest_matches("L1")] == \
        [("soy-milk", None), ("soyghurt", a2.id)]
    assert len(storage.listings.history("L1")) == 1


def test_bad_scores_are_refused(storage: Storage, two_brands: Refs) -> None:
    lst, shas = listing("L1")
    with pytest.raises(InvalidInputError) as err:
        storage.listings.record_score(lst, result("L2", Verdict.CLEAR, None, []), image_sha256s=shas)
    assert err.value.field == "result.listing_id"
    with pytest.raises(InvalidInputError) as err:
        storage.listings.record_score(lst, result("L1", Verdict.CLEAR, None, []), image_sha256s=["x"])
    assert err.value.field == "images[0].sha256"
    with pytest.raises(InvalidInputError) as err:
        storage.listings.record_score(lst, result("L1", Verdict.REVIEW, "ghost", []), image_sha256s=shas)
    assert err.value.field == "result.brand"
    with pytest.raises(InvalidInputError) as err:
        storage.listings.record_score(lst, result("L1", Verdict.CLEAR, None, []), "manual",
                                      image_sha256s=shas)
    assert err.value.field == "source"
    assert storage.listings.get_listing("L1") is None  # nothing half-written


def test_concurrent_writers(storage: Storage, two_brands: Refs) -> None:
    a1 = two_brands["a1"]
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(15):
                lid = f"L{(w * 15 + i) % 6}"
                _score(storage, lid, Verdict.REVIEW if i % 2 else Verdict.LIKELY_COUNTERFEIT, "alpro", [a1])
                storage.listings.market_prices("alpro", "soy-milk", exclude_listing_id=lid)
                storage.embeddings.put_many("m@1", {a1.sha256: np.full(4, w, dtype=np.float32)})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(len(storage.listings.history(f"L{i}")) for i in range(6)) == 60
    assert storage.listings.review_counts("alpro")[ReviewStatus.OPEN] == 6  # one item per listing
    assert all(len(storage.listings.latest_matches(f"L{i}")) == 1 for i in range(6))


def test_forked_processes_write_through_connections_of_their_own(storage: Storage, two_brands: Refs) -> None:
    """What a stored rescan's worker processes rely on: the parent empties its pool before forking, each
    child forgets what it inherited; the children's writes all land and the parent carries on."""
    a1 = two_brands["a1"]
    _score(storage, "P0", Verdict.REVIEW, "alpro", [a1])  # the parent's pool holds connections now
    storage.db.before_fork()
    ctx = multiprocessing.get_context("fork")

    def child(k: int) -> None:
        storage.db.after_fork()
        for i in range(5):
            _score(storage, f"C{k}", Verdict.CLEAR if i % 2 else Verdict.REVIEW, "alpro", [a1])

    children = [ctx.Process(target=child, args=(k,)) for k in range(2)]
    for c in children:
        c.start()
    _score(storage, "P0", Verdict.CLEAR, None, [])  # the parent writes meanwhile, reconnected
    for c in children:
        c.join(60)
    assert [c.exitcode for c in children] == [0, 0]
    assert [len(storage.listings.history(lid)) for lid in ("C0", "C1", "P0")] == [5, 5, 2]
    assert storage.listings.review_counts("alpro")[ReviewStatus.OPEN] == 2  # C0 and C1 (last REVIEW); P0 cleared


def test_record_scores_in_one_batch(storage: Storage, two_brands: Refs) -> None:
    a1, o1 = two_brands["a1"], two_brands["o1"]
    repo = storage.listings
    writes = []
    for lid, verdict, brand, refs in (("B1", Verdict.REVIEW, "alpro", [a1]), ("B2", Verdict.CLEAR, None, []),
                                      ("B3", Verdict.LIKELY_COUNTERFEIT, "oatly", [o1])):
        lst, shas = listing(lid)
        writes.append(ScoreWrite(lst, result(lid, verdict, brand, [match(r) for r in refs]), "rescan", shas))
    got = repo.record_scores(writes, scored_at=T0)
    assert [g is not None for g in got] == [True, True, True]
    assert got[0] is not None and got[0].review_item_id is not None
    assert got[1] is not None and got[1].review_item_id is None
    assert [i.listing_id for i in repo.review_queue("alpro")] == ["B1"]
    assert [i.listing_id for i in repo.review_queue("oatly")] == ["B3"]
    assert [m.reference_image_id for m in repo.latest_matches("B3")] == [o1.id]
    for lid in ("B1", "B2", "B3"):
        assert [h.source for h in repo.history(lid)] == [ScoreSource.RESCAN]
    b1_item = got[0].review_item_id
    b3_item = got[2].review_item_id if got[2] is not None else None
    assert b3_item is not None and b3_item != b1_item

    # The next batch: B1 again after alpro confirmed it, B3 flagged again, B6 flagged for the first time.
    # The review items are written together: a brand's decision stays, the open item is refreshed in
    # place, a new one is opened, and each write is answered with its own item (or None).
    repo.decide("alpro", b1_item, "confirmed", decided_by="alice@alpro")
    later = []
    for lid, brand, refs in (("B1", "alpro", [a1]), ("B3", "oatly", [o1]), ("B6", "alpro", [a1])):
        lst, shas = listing(lid)
        later.append(ScoreWrite(lst, result(lid, Verdict.LIKELY_COUNTERFEIT, brand, [match(r) for r in refs]),
                                "rescan", shas))
    again = repo.record_scores(later, scored_at=T0 + timedelta(minutes=1))
    assert again[0] is not None and again[0].review_item_id is None
    assert again[1] is not None and again[1].review_item_id == b3_item
    assert again[2] is not None and again[2].review_item_id not in (None, b1_item, b3_item)
    [b3] = [i for i in repo.review_queue("oatly")]
    assert (b3.id, b3.verdict, b3.status) == (b3_item, Verdict.LIKELY_COUNTERFEIT, ReviewStatus.OPEN)
    assert [i.listing_id for i in repo.review_queue("alpro")] == ["B6"]
    [decided] = repo.review_queue("alpro", status=ReviewStatus.CONFIRMED)
    assert (decided.id, decided.listing_id, decided.verdict) == (b1_item, "B1", Verdict.REVIEW)

    # One invalid write refuses the whole batch, naming the write, and stores none of it.
    bad = [ScoreWrite(*listing("B4")[:1], result("B4", Verdict.CLEAR, None, []), "rescan", listing("B4")[1]),
           ScoreWrite(*listing("B5")[:1], result("B5", Verdict.CLEAR, None, []), "rescan", ["nope"])]
    with pytest.raises(InvalidInputError) as err:
        repo.record_scores(bad)
    assert err.value.field == "writes[1].images[0].sha256"
    assert repo.get_listing("B4") is None and repo.get_listing("B5") is None


def test_record_scores_skips_unchanged_results(storage: Storage, two_brands: Refs) -> None:
    a1 = two_brands["a1"]
    repo = storage.listings
    lst, shas = listing("S1")
    res = result("S1", Verdict.REVIEW, "alpro", [match(a1, 0.9)])
    repo.record_score(lst, res, "api", image_sha256s=shas, scored_at=T0)
    stored = repo.get_listing("S1")
    assert stored is not None and stored.latest_digest is not None
    # The same result again: nothing written, no history row.
    same = ScoreWrite(stored.to_listing(), result("S1", Verdict.REVIEW, "alpro", [match(a1, 0.9)]),
                      ScoreSource.STORED_RESCAN, stored.image_sha256s, previous_digest=stored.latest_digest)
    assert repo.record_scores([same], skip_unchanged=True) == [None]
    assert len(repo.history("S1")) == 1
    # A write left out is not validated (nothing of it is written); a changed one is.
    odd = ScoreWrite(stored.to_listing(), same.result, ScoreSource.STORED_RESCAN, ["nope"],
                     previous_digest=stored.latest_digest)
    assert repo.record_scores([odd], skip_unchanged=True) == [None]
    odd_changed = ScoreWrite(stored.to_listing(), result("S1", Verdict.CLEAR, None, []), ScoreSource.STORED_RESCAN,
                             ["nope"], previous_digest=stored.latest_digest)
    with pytest.raises(InvalidInputError) as err:
        repo.record_scores([odd_changed], skip_unchanged=True)
    assert err.value.field == "images[0].sha256" and len(repo.history("S1")) == 1
    # Without skip_unchanged it is written (history is the record of every score).
    assert repo.record_scores([same])[0] is not None and len(repo.history("S1")) == 2
    # Floating-point noise is no change (the same photo searched alone or in a page: ~1e-7 apart).
    noisy = ScoreWrite(stored.to_listing(), result("S1", Verdict.REVIEW, "alpro", [match(a1, 0.9000006)]),
                       ScoreSource.STORED_RESCAN, stored.image_sha256s, previous_digest=stored.latest_digest)
    assert repo.record_scores([noisy], skip_unchanged=True) == [None]
    assert len(repo.history("S1")) == 2
    # A changed similarity is a changed result: written, with a new digest.
    changed = ScoreWrite(stored.to_listing(), result("S1", Verdict.REVIEW, "alpro", [match(a1, 0.8)]),
                         ScoreSource.STORED_RESCAN, stored.image_sha256s, previous_digest=stored.latest_digest)
    [recorded] = repo.record_scores([changed], skip_unchanged=True)
    assert recorded is not None and len(repo.history("S1")) == 3
    after = repo.get_listing("S1")
    assert after is not None and after.latest_digest not in (None, stored.latest_digest)


def test_record_scores_marks_a_listing_stored_as_is_only_seen(storage: Storage, two_brands: Refs) -> None:
    """``same_as_stored`` (a file rescan): the same content and result as stored adds no history row and
    only moves ``last_seen_at``; any change of content or result is written; a listing new to the store,
    or twice in the batch, is written."""
    a1 = two_brands["a1"]
    repo = storage.listings
    t1, t2 = T0 + timedelta(hours=1), T0 + timedelta(hours=2)

    def write(lid: str, similarity: float = 0.9, **kw: object) -> ScoreWrite:
        lst, shas = listing(lid, **kw)  # type: ignore[arg-type]
        return ScoreWrite(lst, result(lid, Verdict.REVIEW, "alpro", [match(a1, similarity)]), ScoreSource.RESCAN,
                          shas)

    first = repo.record_scores([write("R1"), write("R2"), write("R3")], scored_at=T0, same_as_stored=True)
    assert all(r is not None for r in first)  # new to the store
    item = first[0].review_item_id if first[0] is not None else None
    got = repo.record_scores([write("R1"), write("R2", price=11.0), write("R3", 0.8), write("R4")], scored_at=t1,
                             same_as_stored=True)
    assert got[0] is None and all(r is not None for r in got[1:])
    assert [len(repo.history(lid)) for lid in ("R1", "R2", "R3", "R4")] == [1, 2, 2, 1]
    r1, r2 = repo.get_listing("R1"), repo.get_listing("R2")
    assert r1 is not None and (r1.first_seen, r1.last_seen_at, r1.last_scored_at) == (T0, t1, t1)
    assert r2 is not None and r2.price == Money(11.0, "EUR")
    [still] = [i for i in repo.review_queue("alpro") if i.listing_id == "R1"]
    assert (still.id, still.status) == (item, ReviewStatus.OPEN)
    # Twice in one batch: both written, in order (nothing compared against a state the batch changes).
    twice = repo.record_scores([write("R1"), write("R1")], scored_at=t2, same_as_stored=True)
    assert all(r is not None for r in twice) and len(repo.history("R1")) == 3


def test_confirmed_counterfeits_of_many_sellers(storage: Storage, two_brands: Refs) -> None:
    a1 = two_brands["a1"]
    repo = storage.listings
    for i, seller in enumerate(("bad", "bad", "worse", "good")):
        item = _score(storage, f"C{i}", Verdict.REVIEW, "alpro", [a1], seller=seller).review_item_id
        assert item is not None
        repo.decide("alpro", item, "rejected" if seller == "good" else "confirmed")  # type: ignore[arg-type]
    assert repo.confirmed_counterfeits_many(["bad", "worse", "good", "unknown", "bad"]) == {"bad": 2, "worse": 1}
    assert repo.confirmed_counterfeits_many([]) == {}


def test_each_write_of_a_batch_answers_its_own_score(storage: Storage, two_brands: Refs) -> None:
    """The score ids come back from one multi-row insert in no promised order: each write must still
    get its own listing's score (and its review item the same one)."""
    a1, o1 = two_brands["a1"], two_brands["o1"]
    repo = storage.listings
    repo.record_scores([ScoreWrite(*listing("B2")[:1], result("B2", Verdict.CLEAR, None, []), "api",
                                   listing("B2")[1])], scored_at=T0)  # B2 stored first: a lower listing_pk
    plan = [("B5", Verdict.REVIEW, "alpro", a1, 0.55), ("B2", Verdict.LIKELY_COUNTERFEIT, "oatly", o1, 0.95),
            ("B9", Verdict.CLEAR, None, None, 0.05), ("B1", Verdict.LIKELY_COUNTERFEIT, "alpro", a1, 0.85),
            ("B7", Verdict.REVIEW, "oatly", o1, 0.65)]
    writes = []
    for lid, verdict, brand, ref, risk in plan:
        lst, shas = listing(lid)
        writes.append(ScoreWrite(lst, result(lid, verdict, brand, [match(ref)] if ref else [], risk), "api", shas))
    got = repo.record_scores(writes, scored_at=T0 + timedelta(minutes=1))
    for (lid, verdict, brand, _, risk), rec in zip(plan, got, strict=True):
        assert rec is not None
        latest = repo.history(lid)[0]
        assert (latest.id, latest.verdict, latest.risk) == (rec.score_id, verdict, risk)
        if brand is not None:
            item = next(i for i in repo.review_queue(brand) if i.listing_id == lid)
            assert (item.id, item.score_id, item.risk) == (rec.review_item_id, rec.score_id, risk)
        else:
            assert rec.review_item_id is None


def test_a_listing_twice_in_one_batch_is_written_in_order(storage: Storage, two_brands: Refs) -> None:
    """Two scores of one listing in a batch (two requests at once): both in the history, in order; the
    latest matches and the review item are the second score's."""
    a1, o1 = two_brands["a1"], two_brands["o1"]
    repo = storage.listings
    lst, shas = listing("D1")
    first = ScoreWrite(lst, result("D1", Verdict.REVIEW, "alpro", [match(a1)]), "api", shas)
    second = ScoreWrite(lst, result("D1", Verdict.LIKELY_COUNTERFEIT, "oatly", [match(o1)]), "api", shas)
    other = ScoreWrite(*listing("D2")[:1], result("D2", Verdict.CLEAR, None, []), "api", listing("D2")[1])
    got = repo.record_scores([first, other, second], scored_at=T0)
    assert [g is not None for g in got] == [True, True, True]
    assert got[0] is not None and got[2] is not None and got[0].listing_pk == got[2].listing_pk
    assert got[0].score_id < got[2].score_id
    assert [h.verdict for h in repo.history("D1")] == [Verdict.LIKELY_COUNTERFEIT, Verdict.REVIEW]
    assert [m.reference_image_id for m in repo.latest_matches("D1")] == [o1.id]
    assert [i.listing_id for i in repo.review_queue("oatly")] == ["D1"]
    assert repo.review_queue("alpro") == []  # the first score's item was cleared by the second
    stored = repo.get_listing("D1")
    assert stored is not None and stored.latest_brand == "oatly"
