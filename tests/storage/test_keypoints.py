"""The database keypoint cache (the KeypointCache port) on SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from service.domain.model import KeypointSet
from service.domain.ports import KeypointCache, VerifiedReference
from service.storage import InvalidInputError, Storage
from tests.storage.factories import sha


def _features(n: int, seed: int) -> KeypointSet:
    rng = np.random.default_rng(seed)
    return KeypointSet(rng.uniform(0, 480, (n, 2)).astype(np.float32),
                       rng.integers(0, 256, (n, 128), dtype=np.uint8), 480, 360, 0.75)


def test_round_trip_is_exact_across_chunks(storage: Storage) -> None:
    cache: KeypointCache = storage.keypoints
    feats = {sha(f"photo-{i}"): _features(i % 7 * 40, seed=i) for i in range(510)}  # > one IN-list chunk
    cache.put_many("sift@1", feats)
    got = cache.get_many("sift@1", [*feats, sha("never-stored")])
    assert set(got) == set(feats)
    for key, f in feats.items():
        g = got[key]
        assert (g.width, g.height, g.scale) == (480, 360, 0.75)
        assert g.points.dtype == np.float32 and g.points.tobytes() == f.points.tobytes()
        assert g.descriptors.dtype == np.uint8 and g.descriptors.tobytes() == f.descriptors.tobytes()
    assert len(got[sha("photo-0")]) == 0  # a photo without keypoints is stored as such


def test_features_are_kept_per_extractor_and_overwritten_idempotently(storage: Storage) -> None:
    store = storage.keypoints
    store.put_many("sift@1", {sha("a"): _features(10, 1)})
    store.put_many("sift@1", {sha("a"): _features(12, 2)})
    store.put_many("sift@2", {sha("a"): _features(3, 3)})
    assert len(store.get_many("sift@1", [sha("a")])[sha("a")]) == 12
    assert len(store.get_many("sift@2", [sha("a")])[sha("a")]) == 3
    assert store.count() == 2 and store.count("sift@1") == 1


def test_described_names_the_photos_with_stored_features_per_extractor(storage: Storage) -> None:
    store = storage.keypoints
    feats = {sha(f"d-{i}"): _features(i % 3 * 5, seed=i) for i in range(505)}  # > one IN-list chunk
    store.put_many("sift@1", feats)
    store.put_many("sift@2", {sha("other-extractor"): _features(4, 9)})
    asked = [*feats, sha("never-stored"), sha("other-extractor"), sha("d-0")]  # a repeat is answered once
    assert store.described("sift@1", asked) == set(feats)  # a photo with no keypoints is described too
    assert store.described("sift@2", asked) == {sha("other-extractor")}
    assert store.described("sift@1", []) == set()


def test_a_torn_row_is_a_miss(storage: Storage) -> None:
    storage.keypoints.put_many("sift@1", {sha("torn"): _features(20, 4)})
    with storage.db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE photo_keypoints SET count = 21"))
    assert storage.keypoints.get_many("sift@1", [sha("torn")]) == {}


def test_bad_input_is_refused_and_stores_nothing(storage: Storage) -> None:
    good = _features(5, 5)
    nan = KeypointSet(np.full((2, 2), np.nan, np.float32), np.zeros((2, 128), np.uint8), 10, 10)
    with pytest.raises(InvalidInputError, match="NaN"):
        storage.keypoints.put_many("sift@1", {sha("ok"): good, sha("nan"): nan})
    with pytest.raises(InvalidInputError, match="sha256"):
        storage.keypoints.put_many("sift@1", {"not-a-hash": good})
    flat = KeypointSet(good.points, good.descriptors, 0, 10)
    with pytest.raises(InvalidInputError, match="positive size"):
        storage.keypoints.put_many("sift@1", {sha("flat"): flat})
    assert storage.keypoints.count() == 0


def test_a_verification_is_read_back_only_against_the_same_references(storage: Storage) -> None:
    cache: KeypointCache = storage.keypoints
    photos = [sha(f"v-{i}") for i in range(505)]  # > one chunk
    cache.put_many("sift@1", {s: _features(5, i) for i, s in enumerate(photos)})
    found = [VerifiedReference(7, 31, (10, 20, 110, 220)), VerifiedReference(9, 8, None)]
    cache.put_verified("sift@1", "refs-a", {s: (found if i % 2 else []) for i, s in enumerate(photos)})
    got = cache.get_verified("sift@1", "refs-a", [*photos, sha("never-described")])
    assert set(got) == set(photos)
    assert got[photos[1]] == found and got[photos[0]] == []  # "nothing matched" is an answer too
    assert cache.get_verified("sift@1", "refs-b", photos) == {}  # other references: verify again
    assert cache.get_verified("sift@2", "refs-a", photos) == {}  # another extractor's features
    # A newer verification replaces the older one; a photo never described is not stored.
    cache.put_verified("sift@1", "refs-b", {photos[1]: found[:1], sha("never-described"): found})
    assert cache.get_verified("sift@1", "refs-b", [photos[1], sha("never-described")]) == {photos[1]: found[:1]}
    assert photos[1] not in cache.get_verified("sift@1", "refs-a", [photos[1]])
    # Features stay readable beside it.
    assert len(cache.get_many("sift@1", [photos[1]])[photos[1]]) == 5


def test_an_unreadable_verification_is_a_miss_and_a_bad_hash_is_refused(storage: Storage) -> None:
    store = storage.keypoints
    store.put_many("sift@1", {sha("x"): _features(5, 1)})
    store.put_verified("sift@1", "refs-a", {sha("x"): [VerifiedReference(1, 9, None)]})
    with storage.db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE photo_keypoints SET verified = '[[1, \"nine\"'"))
    assert store.get_verified("sift@1", "refs-a", [sha("x")]) == {}
    with pytest.raises(InvalidInputError, match="sha256"):
        store.put_verified("sift@1", "refs-a", {"not-a-hash": []})


def test_recall_reads_the_current_verifications_and_the_features_of_the_rest(storage: Storage) -> None:
    cache: KeypointCache = storage.keypoints
    a, b, never = sha("r-a"), sha("r-b"), sha("r-never")
    cache.put_many("sift@1", {a: _features(6, 1), b: _features(7, 2)})
    found = [VerifiedReference(3, 12, (1, 2, 30, 40))]
    cache.put_verified("sift@1", "refs-a", {a: found})
    verified, features = cache.recall("sift@1", "refs-a", [a, b, never, b])
    assert verified == {a: found}
    assert set(features) == {b} and features[b].descriptors.tobytes() == _features(7, 2).descriptors.tobytes()
    # Other references, or none (the index is being changed): every photo's features, no verification.
    for refs in ("refs-b", None):
        verified, features = cache.recall("sift@1", refs, [a, b])
        assert verified == {} and {k: len(f) for k, f in features.items()} == {a: 6, b: 7}
    assert cache.recall("sift@2", "refs-a", [a, b]) == ({}, {})
    # A verification that does not read is a miss: its photo's features are answered instead.
    with storage.db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE photo_keypoints SET verified = 'not json'"))
    verified, features = cache.recall("sift@1", "refs-a", [a])
    assert verified == {} and set(features) == {a}


def test_put_verified_with_stores_features_and_verifications_together(storage: Storage) -> None:
    cache: KeypointCache = storage.keypoints
    old, new = sha("w-old"), sha("w-new")
    cache.put_many("sift@1", {old: _features(4, 1)})
    found = [VerifiedReference(5, 9, None)]
    cache.put_verified_with("sift@1", "refs-a", {new: _features(8, 2)}, {old: [], new: found})
    assert cache.get_verified("sift@1", "refs-a", [old, new]) == {old: [], new: found}
    assert len(cache.get_many("sift@1", [new])[new]) == 8
    # No references (they were changing): the features are stored, the verifications are not.
    other = sha("w-other")
    cache.put_verified_with("sift@1", None, {other: _features(3, 3)}, {other: found})
    assert set(cache.get_many("sift@1", [other])) == {other}
    assert cache.recall("sift@1", "refs-a", [other])[0] == {}
    # One bad part stores nothing of the other.
    nan = KeypointSet(np.full((2, 2), np.nan, np.float32), np.zeros((2, 128), np.uint8), 10, 10)
    with pytest.raises(InvalidInputError, match="NaN"):
        cache.put_verified_with("sift@1", "refs-b", {sha("w-nan"): nan}, {old: found})
    with pytest.raises(InvalidInputError, match="sha256"):
        cache.put_verified_with("sift@1", "refs-b", {sha("w-fine"): _features(2, 4)}, {"not-a-hash": found})
    assert cache.get_verified("sift@1", "refs-b", [old]) == {}
    assert cache.get_many("sift@1", [sha("w-nan"), sha("w-fine")]) == {}
