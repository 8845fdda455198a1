"""The keypoints signal through the real scorer (models, FAISS, SQLite): a catalogue product cut onto a new
scene is verified, named with its box and flagged when cheap; a stored rescan verifies it again without
pixels; the cascade skips photos nothing resembles; deleted references stop matching; a process that
skips the catalog's reconciliation (a Ray actor) loads the stored reference keypoints."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from index.keypoint_index import FaissKeypointIndex
from service.container import Container, build_container
from service.domain.model import KeypointSet, Listing, ListingImage, Money, ReferenceKind, SignalName, Verdict
from service.usecases.catalog import ReferenceUpload
from service.usecases.keypoints import KeypointMatcher
from service.usecases.score_queue import QueueFullError, ScoringQueue
from service.usecases.scoring import StoredListing
from tests.conftest import jpeg_bytes
from tests.usecases.rescan_world import REFERENCE_PRICE, World, fresh_data_dir, settings

pytestmark = pytest.mark.slow

SKU = "Arla-Sour-Milk"


def _image(pixels: np.ndarray) -> ListingImage:
    data = jpeg_bytes(pixels, quality=88)
    with Image.open(io.BytesIO(data)) as im:
        decoded = np.asarray(im.convert("RGB"))
    return ListingImage(hashlib.sha256(data).hexdigest(), decoded)


def _on_new_scene(grocery: Path, sku: str = SKU) -> np.ndarray:
    """The catalogue photo, rotated and shrunk to half the width, pasted onto an in-store avocado photo."""
    scene = Image.open(sorted((grocery / "instore" / "Avocado").glob("*.jpg"))[0]).convert("RGB").resize((480, 480))
    product = Image.open(grocery / "catalogue" / f"{sku}.jpg").convert("RGB")
    product = product.rotate(10, expand=True, fillcolor=(255, 255, 255)).resize((240, 240))
    scene.paste(product, (150, 130))
    return np.asarray(scene)


def _listing(lid: str, pixels: np.ndarray, fraction: float) -> Listing:
    return Listing(lid, "Fresh stock", price=Money(REFERENCE_PRICE * fraction, "USD"), images=(_image(pixels),))


def test_a_product_on_a_new_scene_is_verified_and_flagged_when_cheap(
        rescan_world: World, container: Container, grocery_dir: Path, tmp_path: Path) -> None:
    photo = _on_new_scene(grocery_dir)
    cheap = container.scorer.score(_listing("scene-cheap", photo, 0.25))
    r = cheap.result
    assert cheap.ran["keypoints"] is True
    kp = [m for m in r.matches if m.signal is SignalName.KEYPOINTS]
    assert kp and kp[0].reference.sku == SKU and kp[0].reference.brand == "arla"
    assert kp[0].box is not None
    x0, y0, x1, y1 = kp[0].box
    assert 100 <= x0 <= 200 and 80 <= y0 <= 180 and 330 <= x1 <= 430 and 310 <= y1 <= 410  # pasted at 150,130
    assert r.brand == "arla" and r.verdict is not Verdict.CLEAR
    assert any("keypoints agree on one geometric transform" in reason for reason in r.reasons)
    sig = r.signal(SignalName.KEYPOINTS)
    assert sig is not None and sig.ran and sig.score > 0.5 and sig.evidence["best"]["sku"] == SKU

    # At its normal price from an ordinary seller even a verified product stays clear: the cascade does
    # not spend the verification on it.
    normal = container.scorer.score(_listing("scene-normal", photo, 1.0))
    assert normal.result.verdict is Verdict.CLEAR and normal.result.risk < r.risk - 0.4
    assert normal.ran["keypoints"] is False

    # The same listing without the signal: the whole-photo models alone do not flag it.
    off = build_container(settings(fresh_data_dir(rescan_world, tmp_path / "off")).model_copy(
        update={"keypoints": container.settings.keypoints.model_copy(update={"mode": "never"})}),
        embedders=rescan_world.embedders)
    try:
        blind = off.scorer.score(_listing("scene-cheap", photo, 0.25)).result
        assert blind.risk < r.risk - 0.3
        skipped = blind.signal(SignalName.KEYPOINTS)
        assert skipped is not None and not skipped.ran and skipped.skipped_because == "keypoint verification is off"
        assert "keypoints" not in blind.model_versions
    finally:
        off.close()


def test_a_stored_rescan_verifies_again_without_pixels(container: Container, grocery_dir: Path) -> None:
    listing = _listing("scene-stored", _on_new_scene(grocery_dir), 0.25)
    first = container.scorer.score(listing).result
    bare = Listing(listing.listing_id, listing.title, price=listing.price)  # no photos: nothing to decode
    again = container.scorer.rescore_stored(bare, [listing.images[0].sha256], persist=False)
    assert again is not None and again.ran["keypoints"] is True
    got = again.result
    assert (got.verdict, got.brand, got.reasons) == (first.verdict, first.brand, first.reasons)
    assert [(m.reference.image_id, m.signal, m.box) for m in got.matches] == \
        [(m.reference.image_id, m.signal, m.box) for m in first.matches]


def test_a_stored_rescan_of_photos_never_described_does_not_ask_whether_to_verify(
        container: Container, grocery_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At its normal price the product on a new scene is not verified, so its photo is never described: a
    stored rescan has nothing to verify it with, says so, and skips the cascade's hypothetical reading
    (which is most of a stored listing's fusion). A described photo is still verified."""
    photo = _on_new_scene(grocery_dir)
    normal = _listing("scene-normal-stored", photo, 1.0)
    brighter = np.clip(photo.astype(np.int16) + 4, 0, 255).astype(np.uint8)  # other bytes, same keypoints
    cheap = _listing("scene-cheap-stored", brighter, 0.25)
    first = {lst.listing_id: container.scorer.score(lst) for lst in (normal, cheap)}
    assert first[normal.listing_id].ran["keypoints"] is False and first[cheap.listing_id].ran["keypoints"] is True
    km = container.scorer.keypoints
    assert km is not None
    shas = {lst.listing_id: lst.images[0].sha256 for lst in (normal, cheap)}
    assert km.verifiable([*shas.values(), "0" * 64]) == {shas[cheap.listing_id]}

    asked: list[str] = []
    real = container.scorer._wants_keypoints

    def spy(facts: Any, *args: Any) -> bool:
        asked.append(facts.listing_id)
        return real(facts, *args)

    monkeypatch.setattr(container.scorer, "_wants_keypoints", spy)
    got = container.scorer.rescore_stored_many(
        [StoredListing(Listing(lst.listing_id, lst.title, price=lst.price), (shas[lst.listing_id],))
         for lst in (normal, cheap)], persist=False)
    plain, verified = (g for g in got if g is not None and not isinstance(g, Exception))
    assert asked == [cheap.listing_id]
    assert plain.ran["keypoints"] is False
    sig = plain.result.signal(SignalName.KEYPOINTS)
    assert sig is not None and not sig.ran
    assert sig.skipped_because == "the photos' keypoints were not stored: not verified"
    was = first[normal.listing_id].result
    assert (plain.result.verdict, plain.result.brand) == (was.verdict, was.brand)
    assert verified.ran["keypoints"] is True
    assert any(m.signal is SignalName.KEYPOINTS for m in verified.result.matches)


def test_the_cascade_skips_photos_nothing_resembles(container: Container) -> None:
    """Noise resembles no product: no verified product could make it suspicious, however cheap."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    out = container.scorer.score(_listing("noise", noise, 0.25))
    assert out.ran["keypoints"] is False
    sig = out.result.signal(SignalName.KEYPOINTS)
    assert sig is not None and not sig.ran
    assert sig.skipped_because == "keypoint verification could not change the verdict: skipped"


def test_deleted_references_stop_matching(container: Container, grocery_dir: Path) -> None:
    photo = _on_new_scene(grocery_dir)
    container.catalog.delete_product("arla", SKU)
    r = container.scorer.score(_listing("after-delete", photo, 0.25)).result
    assert all(m.reference.sku != SKU for m in r.matches)


def test_a_process_without_reconciliation_loads_the_stored_reference_keypoints(
        rescan_world: World, grocery_dir: Path, tmp_path: Path) -> None:
    c = build_container(settings(fresh_data_dir(rescan_world, tmp_path / "data")), reconcile=False,
                        embedders=rescan_world.embedders)
    try:
        r = c.scorer.score(_listing("no-reconcile", _on_new_scene(grocery_dir), 0.25), persist=False).result
        assert any(m.signal is SignalName.KEYPOINTS and m.reference.sku == SKU for m in r.matches)
    finally:
        c.close()


def test_a_warmed_container_has_its_keypoint_index_built_before_any_listing(
        rescan_world: World, tmp_path: Path) -> None:
    """``warm`` (the API's start-up) loads the references and builds the search structure; without it
    the first verification would (a request waiting ~0.4 s for an HNSW build)."""
    data = fresh_data_dir(rescan_world, tmp_path / "data")
    cold = build_container(settings(data), reconcile=False, embedders=rescan_world.embedders)
    warm = build_container(settings(data), reconcile=False, embedders=rescan_world.embedders, warm=True)
    try:
        for c, built in ((cold, False), (warm, True)):
            kp = c.scorer.keypoints
            assert kp is not None and isinstance(kp.index, FaissKeypointIndex)
            assert kp.loading.done is built
            assert (kp.index._built is not None) is built  # (what build() is for)
        index = warm.scorer.keypoints.index if warm.scorer.keypoints is not None else None
        assert isinstance(index, FaissKeypointIndex) and index.references > 0
    finally:
        cold.close()
        warm.close()


class _CountingCache:
    """The real keypoint store, with its reads counted."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads: list[list[str]] = []

    def get_many(self, extractor_id: str, sha256s: Any) -> Any:
        keys = list(sha256s)
        self.reads.append(keys)
        return self.inner.get_many(extractor_id, keys)

    def put_many(self, extractor_id: str, features: Any) -> None:
        self.inner.put_many(extractor_id, features)

    def described(self, extractor_id: str, sha256s: Any) -> Any:
        return self.inner.described(extractor_id, sha256s)

    def get_verified(self, extractor_id: str, references: str, sha256s: Any) -> Any:
        keys = list(sha256s)
        self.reads.append(keys)
        return self.inner.get_verified(extractor_id, references, keys)

    def put_verified(self, extractor_id: str, references: str, verified: Any) -> None:
        self.inner.put_verified(extractor_id, references, verified)

    def recall(self, extractor_id: str, references: str | None, sha256s: Any) -> Any:
        keys = list(sha256s)
        self.reads.append(keys)
        return self.inner.recall(extractor_id, references, keys)

    def put_verified_with(self, extractor_id: str, references: str | None, features: Any, verified: Any) -> None:
        self.inner.put_verified_with(extractor_id, references, features, verified)


def test_a_verified_photo_is_remembered_until_the_references_change(
        rescan_world: World, container: Container, grocery_dir: Path) -> None:
    km = container.scorer.keypoints
    assert km is not None
    counting = _CountingCache(km.cache)
    km.cache = counting
    photo = _on_new_scene(grocery_dir)
    first = container.scorer.score(_listing("again-1", photo, 0.25)).result
    sha = _image(photo).sha256
    assert [sha] in counting.reads
    n = len(counting.reads)
    second = container.scorer.score(_listing("again-2", photo, 0.25)).result
    assert len(counting.reads) == n  # neither features nor a search: the answer was remembered
    assert [(m.reference.image_id, m.similarity, m.box) for m in second.matches if m.signal is SignalName.KEYPOINTS] \
        == [(m.reference.image_id, m.similarity, m.box) for m in first.matches if m.signal is SignalName.KEYPOINTS]
    # A new reference may be in the photo: the next verification searches again.
    late = (grocery_dir / "catalogue" / "Yoggi-Vanilla-Yoghurt.jpg").read_bytes()
    container.catalog.add([ReferenceUpload("yoggi", ReferenceKind.PRODUCT, late, "test", sku="Yoggi-Vanilla",
                                           price=Money(20.0, "USD"))])
    container.scorer.score(_listing("again-3", photo, 0.25))
    assert len(counting.reads) > n


def test_a_new_photo_is_verified_with_one_read_and_one_write_of_the_keypoint_cache(
        container: Container, grocery_dir: Path) -> None:
    """A listing photo's stored state (a verification, else features) is read in one statement, and its
    new features and verification are written in one transaction (they were two reads and two writes)."""
    km = container.scorer.keypoints
    assert km is not None
    km.warm()
    photo = _image(_on_new_scene(grocery_dir))
    seen: list[tuple[str, int]] = []  # (statement, the transaction it ran in)

    def note(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "photo_keypoints" in statement:
            seen.append((statement.split()[0].upper(), id(conn.get_transaction())))

    engine = container.db.engine
    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        matches, missing = km.verify([photo], [photo.sha256])
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)
    assert missing == 0 and any(m.reference.sku == SKU for m in matches)
    assert [kind for kind, _ in seen] == ["SELECT", "INSERT", "UPDATE"]
    assert seen[1][1] == seen[2][1]  # features and verification in the same transaction
    assert km.references_id is not None
    assert km.cache.get_verified(km.extractor_id, km.references_id, [photo.sha256])


def test_a_photo_without_keypoints_is_described_once_and_verified_as_such(container: Container) -> None:
    """A flat photo has no keypoints: stored as such, it is read back as verified with nothing found (not
    as 'not stored'), and a reference of the same bytes is indexed from that stored, empty description."""
    km = container.scorer.keypoints
    assert km is not None
    flat = np.full((200, 300, 3), 200, np.uint8)
    img = _image(flat)
    assert km.verify([img], [img.sha256]) == ([], 0)
    km.add_references([(999_001, img.sha256, flat)])  # described from the cache; the memory is reset
    assert 999_001 in km.index
    assert km.verify(None, [img.sha256]) == ([], 0)  # from the stored description, no pixels


def test_a_verification_is_reused_by_the_next_process_until_the_references_change(
        rescan_world: World, container: Container, grocery_dir: Path) -> None:
    """A restarted server or a ``--stored`` rescan reads back what an earlier process verified against
    the same references (no descriptor search), and verifies again once the references changed."""
    listing = _listing("next-process", _on_new_scene(grocery_dir), 0.25)
    first = container.scorer.score(listing).result
    sha = listing.images[0].sha256
    bare = Listing(listing.listing_id, listing.title, price=listing.price)
    later = build_container(container.settings, embedders=rescan_world.embedders)  # same database and catalog
    try:
        km = later.scorer.keypoints
        assert km is not None and container.scorer.keypoints is not None
        assert km.references_id == container.scorer.keypoints.references_id
        searches: list[int] = []
        verify = km.index.verify

        def counted(query: Any, **kw: Any) -> Any:
            searches.append(len(query))
            return verify(query, **kw)

        km.index.verify = counted  # type: ignore[method-assign]
        again = later.scorer.rescore_stored(bare, [sha], persist=False)
        assert again is not None and again.ran["keypoints"] is True and searches == []
        assert [(m.reference.image_id, m.signal, m.similarity, m.box) for m in again.result.matches] == \
            [(m.reference.image_id, m.signal, m.similarity, m.box) for m in first.matches]
        assert again.result.verdict is first.verdict

        before = km.references_id
        late = (grocery_dir / "catalogue" / "Yoggi-Vanilla-Yoghurt.jpg").read_bytes()
        later.catalog.add([ReferenceUpload("yoggi", ReferenceKind.PRODUCT, late, "test", sku="Yoggi-Vanilla",
                                           price=Money(20.0, "USD"))])
        assert km.references_id != before
        later.scorer.rescore_stored(bare, [sha], persist=False)
        assert len(searches) == 1  # new references: verified again, and that is stored under the new set
        km2 = build_container(container.settings, embedders=rescan_world.embedders)
        try:
            assert km2.scorer.keypoints is not None and km2.scorer.keypoints.references_id == km.references_id
            assert km.references_id is not None
            assert km2.scorer.keypoints.cache.get_verified(km.extractor_id, km.references_id, [sha])
        finally:
            km2.close()
    finally:
        later.close()


def test_a_stored_rescan_reads_a_pages_verifications_in_one_query(
        rescan_world: World, container: Container, grocery_dir: Path) -> None:
    """A ``--stored`` rescan in a fresh process recalls the stored verifications of a whole page at once
    (one read of the keypoint cache, not one per listing verified), and the listings read them as before."""
    photo = _on_new_scene(grocery_dir)
    listings = [_listing(f"page-{k}", np.clip(photo.astype(np.int16) + k, 0, 255).astype(np.uint8), 0.25)
                for k in range(3)]  # other bytes, the same keypoints: three photos, each verified
    first = [container.scorer.score(lst) for lst in listings]
    assert all(f.ran["keypoints"] for f in first)
    later = build_container(container.settings, embedders=rescan_world.embedders)
    try:
        km = later.scorer.keypoints
        assert km is not None
        reads: list[list[str]] = []
        get_verified = km.cache.get_verified

        def counted(extractor_id: str, references: str, sha256s: Any) -> Any:
            shas = list(sha256s)
            reads.append(shas)
            return get_verified(extractor_id, references, shas)

        km.cache.get_verified = counted  # type: ignore[method-assign]
        got = later.scorer.rescore_stored_many(
            [StoredListing(Listing(lst.listing_id, lst.title, price=lst.price), (lst.images[0].sha256,))
             for lst in listings], persist=False)
        assert [sorted(r) for r in reads] == [sorted(lst.images[0].sha256 for lst in listings)]
        for g, f in zip(got, first, strict=True):
            assert g is not None and not isinstance(g, Exception) and g.ran["keypoints"] is True
            assert [(m.reference.image_id, m.signal, m.box) for m in g.result.matches] == \
                [(m.reference.image_id, m.signal, m.box) for m in f.result.matches]
            assert g.result.verdict is f.result.verdict
    finally:
        later.close()


def test_a_reference_image_that_cannot_be_read_is_left_out_at_start_up(
        rescan_world: World, container: Container) -> None:
    """Its stored keypoints and embeddings gone (a new extractor or model) and its blob unreadable: the
    start-up reconciliation leaves that reference out of the keypoint index and the product index, and
    indexes the rest, instead of failing."""
    km = container.scorer.keypoints
    assert km is not None
    ref = next(r for r in container.catalog_repo.list_references("arla") if r.sku == SKU)
    copy_model = container.scorer.copy.model_id
    container.close()
    with container.db.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM photo_keypoints WHERE sha256 = :s"), {"s": ref.sha256})
        conn.execute(sa.text("DELETE FROM embeddings WHERE sha256 = :s AND model_id = :m"),
                     {"s": ref.sha256, "m": copy_model})
    container.blobs.path_for(ref.sha256).write_bytes(b"not an image any more")
    again = build_container(container.settings, embedders=rescan_world.embedders)
    try:
        kp = again.scorer.keypoints
        assert kp is not None and ref.id not in kp.index
        hits = again.scorer.copy.lookup([ref.sha256])
        assert ref.sha256 not in hits
        others = [r for r in again.catalog_repo.list_references("arla") if r.id != ref.id]
        assert others and all(r.id in kp.index for r in others)
        copy_index = again.indexes.get(again.roles.copy, ReferenceKind.PRODUCT)
        assert ref.id not in copy_index and all(r.id in copy_index for r in others if r.kind is ReferenceKind.PRODUCT)
    finally:
        again.close()


class _VerifiesDuringAdd(FaissKeypointIndex):
    """A real keypoint index that, while a reference is being added, lets a verification run (as a
    concurrent request would)."""

    def __init__(self) -> None:
        super().__init__()
        self.during_add: Callable[[], None] | None = None

    def add(self, image_id: int, features: KeypointSet) -> None:
        super().add(image_id, features)
        if self.during_add is not None:
            hook, self.during_add = self.during_add, None
            hook()


def test_a_verification_made_while_the_references_change_is_not_stored(
        container: Container, grocery_dir: Path) -> None:
    km = container.scorer.keypoints
    assert km is not None
    index = _VerifiesDuringAdd()
    matcher = KeypointMatcher(km.extractor, km.cache, index, km.catalog, min_inliers=km.min_inliers)
    expected = {r.id: r.sha256 for r in container.catalog_repo.list_references("arla")}
    matcher.reconcile(expected, None)
    before = matcher.references_id
    assert before is not None
    photo = _image(_on_new_scene(grocery_dir))
    km.cache.put_many(km.extractor_id, {photo.sha256: km.extractor.extract(photo.pixels)})
    during: list[str | None] = []

    def verify_now() -> None:
        during.append(matcher.references_id)
        matcher.verify(None, [photo.sha256])

    index.during_add = verify_now
    late = np.asarray(Image.open(grocery_dir / "catalogue" / "Yoggi-Vanilla-Yoghurt.jpg").convert("RGB"))
    matcher.add_references([(999_002, hashlib.sha256(late.tobytes()).hexdigest(), late)])
    after = matcher.references_id
    assert during == [None] and after not in (None, before)
    # The verification ran against a half-changed index: stored under neither fingerprint.
    assert km.cache.get_verified(km.extractor_id, before, [photo.sha256]) == {}
    assert km.cache.get_verified(km.extractor_id, after, [photo.sha256]) == {}
    matcher.verify(None, [photo.sha256])  # now, against the changed index: stored under the new one
    assert photo.sha256 in km.cache.get_verified(km.extractor_id, after, [photo.sha256])


def test_reconcile_removes_references_deleted_by_another_process(container: Container) -> None:
    km = container.scorer.keypoints
    assert km is not None
    expected = {r.id: r.sha256 for r in container.catalog_repo.list_references("arla")}
    gone = next(iter(expected))
    assert gone in km.index
    before = km.references_id
    km.reconcile({i: s for i, s in expected.items() if i != gone}, None)
    assert gone not in km.index and km.references_id != before


def test_a_listing_the_verification_makes_likely_is_not_read_further(
        rescan_world: World, grocery_dir: Path, tmp_path: Path) -> None:
    """"Inspired by" in the title and a product like Arla's leave the cheap reading undecided: without
    keypoints the cascade searches the photo's crops for logos and reads its text. Verified, the product
    at half its price is already likely_counterfeit, which no more evidence can change: neither runs."""
    def scored(keypoints: str) -> Any:
        s = settings(fresh_data_dir(rescan_world, tmp_path / keypoints))
        s = s.model_copy(update={"scoring": s.scoring.model_copy(update={"logo_search": "cascade"}),
                                 "models": s.models.model_copy(update={"ocr": "cascade"}),
                                 "keypoints": s.keypoints.model_copy(update={"mode": keypoints})})
        c = build_container(s, embedders=rescan_world.embedders)
        try:
            listing = _listing("inspired", _on_new_scene(grocery_dir), 0.5)
            return c.scorer.score(Listing(listing.listing_id, "Arla sour milk, inspired by", price=listing.price,
                                          images=listing.images))
        finally:
            c.close()

    unverified = scored("never")
    assert unverified.ran["ocr"] is True and unverified.ran["logo_crops"] is True  # undecided: a closer look
    verified = scored("cascade")
    assert verified.ran["keypoints"] is True
    assert any(m.signal is SignalName.KEYPOINTS and m.reference.sku == SKU for m in verified.result.matches)
    assert verified.result.verdict is Verdict.LIKELY_COUNTERFEIT
    assert verified.ran["ocr"] is False and verified.ran["logo_crops"] is False


class _HeldIndex(FaissKeypointIndex):
    """The real index, whose verifications wait until the test lets them go."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = threading.Event()
        self.entered = threading.Event()

    def verify(self, query: KeypointSet, *, min_inliers: int = 8) -> Any:
        self.entered.set()
        assert self.release.wait(30)
        return super().verify(query, min_inliers=min_inliers)


def _hold_verifications(container: Container) -> _HeldIndex:
    """The container's keypoint index swapped for a held one with the same references."""
    kp = container.scorer.keypoints
    assert kp is not None and isinstance(kp.index, FaissKeypointIndex)
    held = _HeldIndex()
    for image_id, ref in kp.index._refs.items():  # the same references, copied into the held index
        held._refs[image_id] = ref
    kp.index = held
    return held


def test_the_queue_answers_a_listing_without_expensive_signals_before_a_slow_one(
        container: Container, grocery_dir: Path) -> None:
    """A listing the cascade sends on to keypoint verification is finished apart: one queued with it
    that needs nothing expensive is answered while the verification still runs (one queue worker, so
    without the split the second listing would wait for the first's verification)."""
    held = _hold_verifications(container)
    queue = ScoringQueue(container.scorer, workers=1, max_batch=8)
    try:
        slow = queue.submit(_listing("queue-slow", _on_new_scene(grocery_dir), 0.25))
        assert held.entered.wait(30)
        rng = np.random.default_rng(1)
        quick = queue.submit(_listing("queue-quick", rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), 0.25))
        out = quick.result(timeout=30)
        assert out.ran["keypoints"] is False and not slow.done()
        held.release.set()
        verified = slow.result(timeout=30)
        assert verified.ran["keypoints"] is True
        assert any(m.signal is SignalName.KEYPOINTS and m.reference.sku == SKU for m in verified.result.matches)
        assert verified.written and out.written  # each stored, in its own transaction
        assert {h.listing_id for h in container.listings.history("queue-slow")} == {"queue-slow"}
    finally:
        held.release.set()
        queue.close()


def test_the_queue_takes_no_new_batch_while_every_slow_thread_is_busy(
        container: Container, grocery_dir: Path) -> None:
    """With one slow thread and none waiting for it, a listing queued while a verification runs is held
    back until that listing is answered; with one allowed to wait, it is answered meanwhile."""
    held = _hold_verifications(container)
    rng = np.random.default_rng(2)
    quick_photo = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    scene = _on_new_scene(grocery_dir)
    for waiting in (0, 1):
        photo = np.clip(scene.astype(np.int16) + 4 * waiting, 0, 255).astype(np.uint8)  # not verified before
        held.release.clear()
        held.entered.clear()
        queue = ScoringQueue(container.scorer, workers=1, max_batch=8, slow_workers=1, slow_waiting=waiting)
        try:
            slow = queue.submit(_listing(f"held-slow-{waiting}", photo, 0.25))
            assert held.entered.wait(30)
            assert queue.slow_backlog == 1
            quick = queue.submit(_listing(f"held-quick-{waiting}", quick_photo, 0.25))
            if waiting == 0:
                with pytest.raises(TimeoutError):
                    quick.result(timeout=1.0)  # held in the queue, not scored
                assert not slow.done()
                held.release.set()
                assert slow.result(timeout=30).ran["keypoints"] is True
                assert quick.result(timeout=30).ran["keypoints"] is False
            else:
                assert quick.result(timeout=30).ran["keypoints"] is False and not slow.done()
                held.release.set()
                assert slow.result(timeout=30).ran["keypoints"] is True
            assert queue.slow_backlog == 0
        finally:
            held.release.set()
            queue.close()


def test_a_later_request_for_the_same_listing_is_scored_and_stored_after_the_earlier_one(
        container: Container, grocery_dir: Path) -> None:
    """A re-submitted listing (here at its full price, with a photo the cascade does not look closer at)
    waits while its earlier request is still being verified, so the later request's score is stored last
    and is the listing's latest; another listing is answered meanwhile."""
    held = _hold_verifications(container)
    queue = ScoringQueue(container.scorer, workers=2, max_batch=8)
    rng = np.random.default_rng(3)
    try:
        first = queue.submit(_listing("resubmitted", _on_new_scene(grocery_dir), 0.25))
        assert held.entered.wait(30)
        again = queue.submit(_listing("resubmitted", rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), 1.0))
        other = queue.submit(_listing("someone-else", rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), 1.0))
        assert other.result(timeout=30).written
        with pytest.raises(TimeoutError):
            again.result(timeout=1.0)  # waits for the first, not scored yet
        assert not first.done()
        held.release.set()
        assert first.result(timeout=30).ran["keypoints"] is True
        later = again.result(timeout=30)
        assert later.ran["keypoints"] is False
        history = container.listings.history("resubmitted")  # newest first
        assert [h.verdict for h in history] == [later.result.verdict, Verdict.LIKELY_COUNTERFEIT]
        stored = container.listings.get_listing("resubmitted")
        assert stored is not None and stored.price == Money(REFERENCE_PRICE, "USD")
        assert stored.latest_verdict is later.result.verdict
    finally:
        held.release.set()
        queue.close()


def test_a_full_queue_refuses_at_once_and_keeps_what_it_holds(container: Container, grocery_dir: Path) -> None:
    """With the slow pool busy (one thread, none waiting) the workers take nothing; one listing may wait
    (``max_waiting=1``), the next is refused with QueueFullError, and the waiting one is scored once the
    slow one is answered."""
    held = _hold_verifications(container)
    rng = np.random.default_rng(4)
    queue = ScoringQueue(container.scorer, workers=1, max_batch=8, slow_workers=1, max_waiting=1)
    try:
        slow = queue.submit(_listing("full-slow", _on_new_scene(grocery_dir), 0.25))
        assert held.entered.wait(30)
        waiting = queue.submit(_listing("full-waiting", rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), 1.0))
        with pytest.raises(QueueFullError):
            queue.submit(_listing("full-refused", rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), 1.0))
        assert queue.refused == 1
        held.release.set()
        assert slow.result(timeout=30).written and waiting.result(timeout=30).written
        assert container.listings.get_listing("full-refused") is None
    finally:
        held.release.set()
        queue.close()
    with pytest.raises(ValueError, match="max_waiting"):
        ScoringQueue(container.scorer, max_waiting=0)
