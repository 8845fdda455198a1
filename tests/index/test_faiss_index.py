"""FaissReferenceIndex on real FAISS: exactness against a brute-force oracle, approximate recall,
add/remove/replace semantics (including HNSW tombstones and their compaction), promotion past exact_max,
input validation and concurrent searches while adding."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from index import FaissReferenceIndex, IndexTuning, IndexType
from service.domain.ports import VectorIndex
from service.settings import IndexSettings
from tests.index.oracle import Embeddings, exact_search, mixture, recall_at_k, unit_rows

K = 10


def build(
    e: Embeddings,
    settings: IndexSettings,
    index_type: IndexType | None = None,
    tuning: IndexTuning | None = None,
    n: int | None = None,
) -> FaissReferenceIndex:
    n = len(e.ids) if n is None else n
    return FaissReferenceIndex.build(
        e.dim,
        settings,
        model_id="test@1",
        kind="product",
        ids=e.ids[:n],
        vectors=e.vectors[:n],
        index_type=index_type,
        tuning=tuning,
    )


def assert_matches_oracle(sims: np.ndarray, ids: np.ndarray, oracle_sims: np.ndarray, oracle_ids: np.ndarray) -> None:
    """Scores equal within 1e-5; ids equal wherever the oracle has no near-tie (float32 vs float64)."""
    np.testing.assert_allclose(sims, oracle_sims, atol=1e-5)
    gaps = np.abs(np.diff(oracle_sims, axis=1))
    tied = np.zeros_like(oracle_ids, dtype=bool)
    tied[:, 1:] |= gaps < 1e-5
    tied[:, :-1] |= gaps < 1e-5
    assert (ids[~tied] == oracle_ids[~tied]).all()
    for row_ids in ids:
        assert len(set(row_ids.tolist())) == len(row_ids)


def test_satisfies_the_vector_index_port(clustered: Embeddings) -> None:
    index: VectorIndex = build(clustered, IndexSettings(), n=10)
    assert index.dim == clustered.dim
    assert index.ntotal == 10


def test_flat_search_equals_the_bruteforce_oracle(clustered: Embeddings) -> None:
    index = build(clustered, IndexSettings())
    assert index.index_type == "flat"
    sims, ids = index.search(clustered.queries, K)
    assert sims.shape == ids.shape == (len(clustered.queries), K)
    assert sims.dtype == np.float32 and ids.dtype == np.int64
    oracle_sims, oracle_ids = exact_search(clustered.vectors, clustered.ids, clustered.queries, K)
    assert_matches_oracle(sims, ids, oracle_sims, oracle_ids)


def test_missing_neighbours_are_minus_one(clustered: Embeddings) -> None:
    index = build(clustered, IndexSettings(), n=3)
    sims, ids = index.search(clustered.queries[:4], 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()
    assert set(ids[:, :3].ravel().tolist()) == set(clustered.ids[:3].tolist())
    empty = FaissReferenceIndex(clustered.dim, IndexSettings(), model_id="test@1", kind="logo")
    e_sims, e_ids = empty.search(clustered.queries[:2], 3)
    assert (e_ids == -1).all() and np.isneginf(e_sims).all()


@pytest.mark.parametrize(
    ("approximate", "tuning", "bound"),
    [
        # Measured on this data: HNSW(m=16, ef=64) 1.000 (0.975+ at ef=16); IVF-PQ with refine x8 0.99.
        ("hnsw", IndexTuning(), 0.98),
        ("ivfpq", IndexTuning(refine_factor=8), 0.95),
    ],
)
def test_approximate_recall_against_the_oracle(
    clustered: Embeddings, approximate: str, tuning: IndexTuning, bound: float
) -> None:
    settings = IndexSettings(exact_max=1000, approximate=approximate, hnsw_m=16)  # type: ignore[arg-type]
    index = build(clustered, settings, tuning=tuning)
    assert index.index_type == approximate
    sims, ids = index.search(clustered.queries, K)
    _, oracle_ids = exact_search(clustered.vectors, clustered.ids, clustered.queries, K)
    assert recall_at_k(ids, oracle_ids) >= bound
    # Similarities are exact inner products of the ids returned (the raw vectors are kept).
    by_id = dict(zip(clustered.ids.tolist(), clustered.vectors, strict=True))
    for q, row_sims, row_ids in zip(clustered.queries[:20], sims[:20], ids[:20], strict=True):
        expected = [float(by_id[i] @ q) for i in row_ids.tolist()]
        np.testing.assert_allclose(row_sims, expected, atol=1e-5)
        assert (np.diff(row_sims) <= 1e-6).all()


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_add_remove_and_replace(clustered: Embeddings, approx_settings: IndexSettings, index_type: IndexType) -> None:
    index = build(clustered, approx_settings, index_type=index_type, tuning=IndexTuning(refine_factor=8))
    n = index.ntotal
    victims = clustered.ids[:50]

    # Remove: the removed ids never come back, even for their own vectors as queries.
    assert index.remove(np.concatenate([victims, [999_999_999]])) == 50
    assert index.ntotal == n - 50
    assert index.remove(victims) == 0
    _, ids = index.search(clustered.vectors[:50], K)
    assert not np.isin(ids, victims).any()
    assert set(index.ids().tolist()) == set(clustered.ids[50:].tolist())

    # Replace: re-adding an existing id swaps its vector, never duplicates it.
    target = int(clustered.ids[100])
    fresh = unit_rows(np.random.default_rng(1).standard_normal((1, clustered.dim)))
    index.add(np.array([target]), fresh)
    assert index.ntotal == n - 50
    sims, ids = index.search(fresh, K)
    assert ids[0, 0] == target and sims[0, 0] == pytest.approx(1.0, abs=1e-5)
    sims, ids = index.search(clustered.vectors[100:101], K)
    assert ids[0, 0] != target and sims[0, 0] < 0.999, "the old vector of a replaced id is still found"
    assert (ids == target).sum() <= 1
    np.testing.assert_allclose(index.vectors(np.array([target])), fresh, atol=1e-6)

    # Add back the removed ones: found again, each exactly once.
    index.add(victims, clustered.vectors[:50])
    assert index.ntotal == n
    _, ids = index.search(clustered.vectors[:50], K)
    assert (ids[:, 0] == victims).all()
    for row in ids:
        valid = row[row >= 0]
        assert len(set(valid.tolist())) == len(valid)


def test_hnsw_tombstones_then_compaction(clustered: Embeddings, approx_settings: IndexSettings) -> None:
    tuning = IndexTuning(tombstone_rebuild_fraction=0.25)
    index = build(clustered, approx_settings, tuning=tuning)
    assert index.index_type == "hnsw"
    index.remove(clustered.ids[:800])  # 20% of 4000: tombstoned, not yet rebuilt
    assert index.tombstones == 800 and index.ntotal == 3200
    sims, ids = index.search(clustered.vectors[:800], K)
    assert not np.isin(ids, clustered.ids[:800]).any()
    assert (ids >= 0).all(), "tombstones must not leave holes in the results"

    index.remove(clustered.ids[800:1400])  # now 1400 / 4000 = 35% dead: rebuilt from stored vectors
    assert index.tombstones == 0 and index.ntotal == 2600 and index.index_type == "hnsw"
    _, ids = index.search(clustered.queries, K)
    _, oracle_ids = exact_search(clustered.vectors[1400:], clustered.ids[1400:], clustered.queries, K)
    assert recall_at_k(ids, oracle_ids) >= 0.98

    # Shrinking below exact_max makes the rebuilt index exact again.
    index.remove(clustered.ids[1400:3200])
    assert str(index.index_type) == "flat" and index.ntotal == 800
    sims, ids = index.search(clustered.queries, K)
    assert_matches_oracle(
        sims, ids, *exact_search(clustered.vectors[3200:], clustered.ids[3200:], clustered.queries, K)
    )


def test_crossing_exact_max_promotes_to_approximate(clustered: Embeddings, approx_settings: IndexSettings) -> None:
    index = build(clustered, approx_settings, n=900)
    assert index.index_type == "flat"
    # One of the added ids replaces an existing one, so the result holds 900 + 299 vectors.
    added = np.concatenate([clustered.ids[899:900], clustered.ids[900:1199]])
    index.add(added, clustered.vectors[899:1199])
    assert str(index.index_type) == "hnsw" and index.ntotal == 1199
    assert set(index.ids().tolist()) == set(clustered.ids[:1199].tolist())
    _, ids = index.search(clustered.vectors[:1199], 1)
    assert (ids[:, 0] == clustered.ids[:1199]).mean() >= 0.99


def test_bad_input_is_refused_with_the_field_named(clustered: Embeddings) -> None:
    index = build(clustered, IndexSettings(), n=10)
    v = clustered.vectors[:2]
    with pytest.raises(ValueError, match="vectors must have shape"):
        index.add(np.array([1, 2]), v[:, :10])
    with pytest.raises(ValueError, match="L2-normalised"):
        index.add(np.array([1, 2]), v * 2)
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.array([1, 2]), np.full_like(v, np.nan))
    with pytest.raises(ValueError, match="duplicates"):
        index.add(np.array([1, 1]), v)
    with pytest.raises(ValueError, match=">= 0"):
        index.add(np.array([1, -5]), v)
    with pytest.raises(ValueError, match="2 rows for 3 ids"):
        index.add(np.array([1, 2, 3]), v)
    with pytest.raises(ValueError, match="ids must be integers"):
        index.remove(np.array([1.5]))
    with pytest.raises(ValueError, match="queries must have shape"):
        index.search(v[0], 3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(v, 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        FaissReferenceIndex(8, IndexSettings(), model_id="m", kind="banner")
    with pytest.raises(ValueError, match="model_id"):
        FaissReferenceIndex(8, IndexSettings(), model_id=" ", kind="logo")
    with pytest.raises(ValueError, match="ivfpq index needs at least 1000 vectors"):
        build(clustered, IndexSettings(), index_type="ivfpq", n=999)
    assert index.ntotal == 10  # nothing half-applied


@pytest.mark.parametrize("start", [600, 1500])
def test_concurrent_searches_while_adding(approx_settings: IndexSettings, start: int) -> None:
    """Four threads search while the main thread adds, replaces and removes (from 600 the adds cross
    exact_max=1000 and promote the index to HNSW mid-way)."""
    e = mixture(3000, 32, clusters=20, queries=64, seed=3)
    index = build(e, approx_settings, n=start)
    ever_added = set(e.ids.tolist())
    stop = threading.Event()
    errors: list[BaseException] = []
    searches = [0]

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                q = e.queries[rng.integers(0, len(e.queries), size=int(rng.integers(1, 9)))]
                sims, ids = index.search(q, K)
                valid = ids[ids >= 0]
                assert set(valid.tolist()) <= ever_added
                assert np.isfinite(sims[ids >= 0]).all()
                for row in ids:
                    live = row[row >= 0]
                    assert len(set(live.tolist())) == len(live)
                searches[0] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    try:
        for lo in range(start, 3000, 150):
            index.add(e.ids[lo : lo + 150], e.vectors[lo : lo + 150])
            index.add(e.ids[lo - 10 : lo], e.vectors[lo - 10 : lo])  # replacements
        index.remove(e.ids[:100])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert searches[0] > 0
    assert index.ntotal == 2900 and index.index_type == "hnsw"
    _, ids = index.search(e.vectors[100:], 1)
    assert (ids[:, 0] == e.ids[100:]).mean() >= 0.99
