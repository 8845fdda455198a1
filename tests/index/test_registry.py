"""ReferenceIndexes: one index per (embedder, kind) under index_dir, and the start-up reconciliation
against the ids the database holds, rebuilt or patched from stored vectors only (never re-embedded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from index import IndexMismatchError, IndexTuning, ReferenceIndexes, ids_checksum
from service.domain.model import ReferenceKind
from service.settings import IndexSettings
from tests.index.oracle import Embeddings, exact_search, recall_at_k

MODEL = "sscd@v1"


class StoredEmbeddings:
    """Stands in for the embedding table: returns stored rows by id and records every request."""

    def __init__(self, e: Embeddings) -> None:
        self._rows = dict(zip(e.ids.tolist(), e.vectors, strict=True))
        self.requested: list[np.ndarray] = []

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        self.requested.append(ids.copy())
        return np.stack([self._rows[int(i)] for i in ids]) if len(ids) else np.empty((0, 64), np.float32)

    @property
    def ids_requested(self) -> set[int]:
        return {int(i) for chunk in self.requested for i in chunk}


@pytest.fixture
def stored(clustered: Embeddings) -> StoredEmbeddings:
    return StoredEmbeddings(clustered)


def registry(tmp_path: Path, settings: IndexSettings | None = None) -> ReferenceIndexes:
    return ReferenceIndexes(tmp_path / "indexes", settings or IndexSettings(), IndexTuning(build_batch=700))


def reconcile(reg: ReferenceIndexes, ids: np.ndarray, stored: StoredEmbeddings, model_id: str = MODEL):
    return reg.reconcile("sscd", "product", model_id=model_id, dim=64, ids=ids, stored_vectors=stored)


def test_first_start_creates_the_index_from_stored_vectors_in_batches(
    tmp_path: Path, clustered: Embeddings, stored: StoredEmbeddings
) -> None:
    reg = registry(tmp_path)
    report = reconcile(reg, clustered.ids[:3000], stored)
    assert (report.action, report.count, report.added, report.removed) == ("created", 3000, 3000, 0)
    assert report.kind is ReferenceKind.PRODUCT and report.index_type == "flat"
    assert "created" in report.describe() and "sscd/product" in report.describe()
    assert max(len(c) for c in stored.requested) <= 700
    assert stored.ids_requested == set(clustered.ids[:3000].tolist())

    manifest = json.loads((tmp_path / "indexes" / "sscd" / "product" / "manifest.json").read_text())
    assert manifest["count"] == 3000 and manifest["model_id"] == MODEL
    index = reg.get("sscd", ReferenceKind.PRODUCT)
    sims, ids = index.search(clustered.queries, 10)
    o_sims, o_ids = exact_search(clustered.vectors[:3000], clustered.ids[:3000], clustered.queries, 10)
    np.testing.assert_allclose(sims, o_sims, atol=1e-5)
    assert recall_at_k(ids, o_ids) == 1.0


def test_a_consistent_index_is_loaded_without_reading_stored_vectors(
    tmp_path: Path, clustered: Embeddings, stored: StoredEmbeddings
) -> None:
    reconcile(registry(tmp_path), clustered.ids[:3000], stored)
    manifest = tmp_path / "indexes" / "sscd" / "product" / "manifest.json"
    saved = manifest.read_bytes()
    stored.requested.clear()

    restarted = registry(tmp_path)  # a new process
    shuffled = np.random.default_rng(0).permutation(clustered.ids[:3000])
    report = reconcile(restarted, shuffled, stored)
    assert report.action == "loaded" and report.count == 3000 and report.added == report.removed == 0
    assert stored.requested == []
    assert manifest.read_bytes() == saved  # not even re-saved
    assert restarted.get("sscd", "product").ids_checksum() == ids_checksum(clustered.ids[:3000])


def test_a_few_missing_or_extra_ids_are_patched(
    tmp_path: Path, clustered: Embeddings, stored: StoredEmbeddings
) -> None:
    reconcile(registry(tmp_path), clustered.ids[:3000], stored)
    stored.requested.clear()
    # The database gained 40 images (crash before the index was saved) and lost 25.
    db_ids = np.concatenate([clustered.ids[25:3000], clustered.ids[3000:3040]])
    report = reconcile(registry(tmp_path), db_ids, stored)
    assert (report.action, report.added, report.removed, report.count) == ("patched", 40, 25, 3015)
    assert stored.ids_requested == set(clustered.ids[3000:3040].tolist())  # only what was missing
    reloaded = registry(tmp_path)
    assert reconcile(reloaded, db_ids, stored).action == "loaded"


def test_ids_that_disagree_too_much_trigger_a_rebuild(
    tmp_path: Path, clustered: Embeddings, stored: StoredEmbeddings
) -> None:
    reconcile(registry(tmp_path), clustered.ids[:2000], stored)
    db_ids = clustered.ids[1000:4000]
    report = reconcile(registry(tmp_path), db_ids, stored)
    assert report.action == "rebuilt" and "too many to patch" in report.reason
    assert report.count == 3000
    index = registry(tmp_path).open("sscd", "product", model_id=MODEL, dim=64)
    assert index.ids_checksum() == ids_checksum(db_ids)
    _, ids = index.search(clustered.queries, 10)
    _, o_ids = exact_search(clustered.vectors[1000:], clustered.ids[1000:], clustered.queries, 10)
    assert recall_at_k(ids, o_ids) == 1.0


def test_an_index_of_another_model_version_is_rebuilt(
    tmp_path: Path, clustered: Embeddings, stored: StoredEmbeddings
) -> None:
    reconcile(registry(tmp_path), clustered.ids[:500], stored)
    report = reconcile(registry(tmp_path), clustered.ids[:500], stored, model_id="sscd@v2")
    assert report.action == "rebuilt" and "sscd@v1" in report.reason and "sscd@v2" in report.reason
    manifest = json.loads((tmp_path / "indexes" / "sscd" / "product" / "manifest.json").read_text())
    assert manifest["model_id"] == "sscd@v2"
    with pytest.raises(IndexMismatchError):
        registry(tmp_path).open("sscd", "product", model_id="sscd@v1", dim=64)


def test_a_corrupt_index_is_rebuilt(tmp_path: Path, clustered: Embeddings, stored: StoredEmbeddings) -> None:
    reconcile(registry(tmp_path), clustered.ids[:500], stored)
    directory = tmp_path / "indexes" / "sscd" / "product"
    (next(directory.glob("index-*.faiss"))).write_bytes(b"garbage")
    report = reconcile(registry(tmp_path), clustered.ids[:500], stored)
    assert report.action == "rebuilt" and "sha256" in report.reason and report.count == 500


def test_an_index_no_longer_matching_the_settings_is_rebuilt(
    tmp_path: Path, clustered: Embeddings, stored: StoredEmbeddings
) -> None:
    reconcile(registry(tmp_path), clustered.ids[:3000], stored)
    lower = IndexSettings(exact_max=1000, hnsw_m=16)
    report = reconcile(registry(tmp_path, lower), clustered.ids[:3000], stored)
    assert report.action == "rebuilt" and report.index_type == "hnsw" and "settings choose hnsw" in report.reason
    assert reconcile(registry(tmp_path, lower), clustered.ids[:3000], stored).action == "loaded"


def test_stored_vectors_of_the_wrong_shape_are_refused(tmp_path: Path, clustered: Embeddings) -> None:
    def short(ids: np.ndarray) -> np.ndarray:
        return clustered.vectors[: len(ids) - 1]

    with pytest.raises(ValueError, match="stored vectors"):
        reconcile(registry(tmp_path), clustered.ids[:100], short)  # type: ignore[arg-type]
    assert not (tmp_path / "indexes" / "sscd" / "product" / "manifest.json").exists()


def test_indexes_per_embedder_and_kind_are_separate_and_saved_after_changes(
    tmp_path: Path, clustered: Embeddings
) -> None:
    reg = registry(tmp_path)
    product = reg.open("effnet", "product", model_id="effnet@1", dim=64)
    logo = reg.open("effnet", "logo", model_id="effnet@1", dim=64)
    assert product is not logo and product.ntotal == logo.ntotal == 0
    reg.add("effnet", "product", clustered.ids[:20], clustered.vectors[:20])
    reg.add("effnet", "logo", clustered.ids[20:25], clustered.vectors[20:25])
    assert reg.remove("effnet", "product", clustered.ids[:5]) == 5
    assert reg.remove("effnet", "product", clustered.ids[:5]) == 0

    again = registry(tmp_path)
    assert again.open("effnet", "product", model_id="effnet@1", dim=64).ntotal == 15
    assert again.open("effnet", "logo", model_id="effnet@1", dim=64).ntotal == 5
    assert sorted((n, k.value) for n, k, _ in again) == [("effnet", "logo"), ("effnet", "product")]

    # Changes made straight on an index are saved by save_dirty.
    again.get("effnet", "logo").add(clustered.ids[30:31], clustered.vectors[30:31])
    assert again.save_dirty() == [("effnet", ReferenceKind.LOGO)]
    assert again.save_dirty() == []
    assert registry(tmp_path).open("effnet", "logo", model_id="effnet@1", dim=64).ntotal == 6


def test_names_and_kinds_are_validated(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    for bad in ("../escape", "", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="embedder name"):
            reg.open(bad, "product", model_id="m", dim=8)
    with pytest.raises(ValueError, match="kind must be one of"):
        reg.open("sscd", "banner", model_id="m", dim=8)
    with pytest.raises(KeyError, match="not open"):
        reg.get("sscd", "logo")
    assert not (tmp_path / "indexes").exists()
