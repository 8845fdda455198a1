"""The database embedding cache (the EmbeddingCache port) on SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest

from service.domain.ports import EmbeddingCache
from service.storage import InvalidInputError, Storage
from tests.storage.factories import sha


def _vectors(n: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, dim)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return {sha(f"img-{seed}-{i}"): m[i] for i in range(n)}


def test_round_trip_is_bit_exact_across_chunks(storage: Storage) -> None:
    cache: EmbeddingCache = storage.embeddings
    vecs = _vectors(1203, 64, seed=1)  # more than one IN-list chunk
    cache.put_many("sscd@1", vecs)
    wanted = [*vecs, sha("never-stored")]
    got = cache.get_many("sscd@1", wanted)
    assert set(got) == set(vecs)
    for key, v in vecs.items():
        assert got[key].dtype == np.float32 and got[key].shape == (64,)
        assert got[key].tobytes() == v.tobytes()
    # Special values survive exactly too (denormals, signed zero, extremes).
    odd = np.array([0.0, -0.0, 1e-45, -3.4028235e38, 3.4028235e38, 1 / 3], dtype=np.float32)
    cache.put_many("sscd@1", {sha("odd"): odd})
    assert cache.get_many("sscd@1", [sha("odd")])[sha("odd")].tobytes() == odd.tobytes()


def test_put_is_an_idempotent_upsert_per_model(storage: Storage) -> None:
    store = storage.embeddings
    a = _vectors(3, 8, seed=2)
    store.put_many("effnet@1", a)
    store.put_many("effnet@1", a)
    assert store.count("effnet@1") == 3
    key = next(iter(a))
    replacement = -a[key]
    store.put_many("effnet@1", {key: replacement})
    assert store.count("effnet@1") == 3
    assert store.get_many("effnet@1", [key])[key].tobytes() == replacement.tobytes()
    # Another model (or version) of the same photo is a separate row.
    assert store.get_many("effnet@2", list(a)) == {}
    store.put_many("effnet@2", {key: np.ones(16, dtype=np.float32)})
    assert store.get_many("effnet@2", [key])[key].shape == (16,)
    assert store.get_many("effnet@1", [key])[key].shape == (8,)
    assert store.count() == 4
    store.put_many("effnet@1", {})
    assert store.get_many("effnet@1", []) == {}


def test_several_models_are_read_and_written_together(storage: Storage) -> None:
    store = storage.embeddings
    a, b = _vectors(3, 8, seed=3), _vectors(2, 16, seed=4)
    shared = next(iter(a))  # one photo embedded by both models
    store.put_models({"effnet@1": a, "sscd@1": {**b, shared: np.ones(16, dtype=np.float32)}})
    assert store.count("effnet@1") == 3 and store.count("sscd@1") == 3
    got = store.get_models({"effnet@1": [*a, *b], "sscd@1": [shared], "clip@1": list(a)})
    assert set(got["effnet@1"]) == set(a)  # b's photos are stored for sscd only
    assert set(got["sscd@1"]) == {shared}  # what was asked of each model, not every row of the photos
    assert got["clip@1"] == {}
    assert got["sscd@1"][shared].tobytes() == np.ones(16, dtype=np.float32).tobytes()
    assert got["effnet@1"][shared].tobytes() == a[shared].tobytes()
    assert store.get_models({}) == {} and store.get_models({"effnet@1": []}) == {"effnet@1": {}}
    # One bad vector of either model and nothing of either is written.
    with pytest.raises(InvalidInputError) as err:
        store.put_models({"m@1": {sha("ok"): np.ones(4, dtype=np.float32)},
                          "m@2": {sha("bad"): np.array([1.0, np.inf], dtype=np.float32)}})
    assert err.value.field == "vectors"
    assert store.count("m@1") == 0 and store.count("m@2") == 0


def test_bad_vectors_are_refused(storage: Storage) -> None:
    store = storage.embeddings
    for bad in (np.ones((2, 4), dtype=np.float32), np.array([1.0, np.nan], dtype=np.float32),
                np.zeros(0, dtype=np.float32)):
        with pytest.raises(InvalidInputError) as err:
            store.put_many("m@1", {sha("x"): bad})
        assert err.value.field == "vectors"
    with pytest.raises(InvalidInputError) as err:
        store.put_many("m@1", {"../../etc": np.ones(4, dtype=np.float32)})
    assert err.value.field == "sha256"
    assert store.count() == 0
