"""Saving and loading FaissReferenceIndex: round trips of every type (tombstones included), the manifest,
atomicity when a write fails half-way, and refusal of indexes of another model/kind/dim or corrupt ones."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from index import (
    FaissReferenceIndex,
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexTuning,
    IndexType,
    ids_checksum,
)
from index import faiss_index as faiss_index_module
from service.settings import IndexSettings
from tests.index.oracle import Embeddings

MODEL = "sscd@1a2b3c"


def build(e: Embeddings, settings: IndexSettings, index_type: IndexType | None = None, n: int = 2000):
    return FaissReferenceIndex.build(
        e.dim,
        settings,
        model_id=MODEL,
        kind="product",
        ids=e.ids[:n],
        vectors=e.vectors[:n],
        index_type=index_type,
    )


def load(directory: Path, settings: IndexSettings, *, model_id: str = MODEL, dim: int = 64, kind: str = "product"):
    return FaissReferenceIndex.load(directory, model_id=model_id, kind=kind, dim=dim, settings=settings)


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_round_trip_gives_the_same_results(
    tmp_path: Path, clustered: Embeddings, approx_settings: IndexSettings, index_type: IndexType
) -> None:
    index = build(clustered, approx_settings, index_type)
    index.remove(clustered.ids[:30])  # tombstones (approximate types) must survive the round trip
    assert index.dirty
    manifest_path = index.save(tmp_path)
    assert not index.dirty

    loaded = load(tmp_path, approx_settings)
    assert not loaded.dirty
    assert loaded.index_type == index_type and loaded.ntotal == index.ntotal == 1970
    assert loaded.tombstones == index.tombstones
    assert loaded.build_params == index.build_params
    assert loaded.ids_checksum() == index.ids_checksum()
    before = index.search(clustered.queries, 10)
    after = loaded.search(clustered.queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    assert not np.isin(after[1], clustered.ids[:30]).any()

    manifest = json.loads(manifest_path.read_text())
    assert manifest["model_id"] == MODEL and manifest["kind"] == "product" and manifest["dim"] == 64
    assert manifest["count"] == 1970 and manifest["index_type"] == index_type
    assert manifest["ids_sha256"] == ids_checksum(clustered.ids[30:2000])
    assert manifest["params"] == index.build_params
    assert manifest["created_at"].endswith("+00:00")
    assert (tmp_path / manifest["index_file"]).stat().st_size == manifest["index_bytes"]


def test_saving_again_replaces_the_file_and_leaves_nothing_else(tmp_path: Path, clustered: Embeddings) -> None:
    index = build(clustered, IndexSettings(), n=100)
    index.save(tmp_path)
    index.add(clustered.ids[100:200], clustered.vectors[100:200])
    index.save(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[1] == "manifest.json" and names[0].startswith("index-")
    assert load(tmp_path, IndexSettings()).ntotal == 200


def test_a_failed_index_write_leaves_the_old_index_intact(
    tmp_path: Path, clustered: Embeddings, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = build(clustered, IndexSettings(), n=100)
    index.save(tmp_path)
    before = listing(tmp_path)
    index.add(clustered.ids[100:200], clustered.vectors[100:200])

    def disk_full(faiss_index: object, path: Path) -> None:
        path.write_bytes(b"\x00" * 1000)  # a partial file, as a crash or ENOSPC leaves
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss_index_module, "_write_index_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        index.save(tmp_path)
    assert listing(tmp_path) == before  # same files, same bytes, no temporary left behind
    assert index.dirty
    assert load(tmp_path, IndexSettings()).ntotal == 100


def test_a_failed_manifest_write_leaves_the_old_pair_intact(
    tmp_path: Path, clustered: Embeddings, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = build(clustered, IndexSettings(), n=100)
    index.save(tmp_path)
    before = listing(tmp_path)
    index.remove(clustered.ids[:10])

    def crash(path: Path, data: bytes) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(faiss_index_module, "_atomic_write_bytes", crash)
    with pytest.raises(OSError, match="I/O error"):
        index.save(tmp_path)
    assert listing(tmp_path) == before
    assert load(tmp_path, IndexSettings()).ids_checksum() == ids_checksum(clustered.ids[:100])


def test_an_index_of_another_model_kind_or_dim_is_refused(tmp_path: Path, clustered: Embeddings) -> None:
    build(clustered, IndexSettings(), n=50).save(tmp_path)
    with pytest.raises(IndexMismatchError, match="model_id 'sscd@1a2b3c', expected 'sscd@ffff'") as info:
        load(tmp_path, IndexSettings(), model_id="sscd@ffff")
    assert "sscd@ffff" in info.value.reason
    with pytest.raises(IndexMismatchError, match="dim 64, expected 128"):
        load(tmp_path, IndexSettings(), dim=128)
    with pytest.raises(IndexMismatchError, match="kind 'product', expected logo"):
        load(tmp_path, IndexSettings(), kind="logo")
    with pytest.raises(IndexNotFoundError):
        load(tmp_path / "nothing-here", IndexSettings())


def _manifest(directory: Path) -> dict[str, object]:
    return dict(json.loads((directory / "manifest.json").read_text()))


def test_corrupt_files_are_refused(tmp_path: Path, clustered: Embeddings) -> None:
    build(clustered, IndexSettings(), n=50).save(tmp_path)
    manifest = _manifest(tmp_path)
    index_file = tmp_path / str(manifest["index_file"])
    good = index_file.read_bytes()

    # A flipped byte in the FAISS file.
    index_file.write_bytes(good[:-5] + bytes([good[-5] ^ 0xFF]) + good[-4:])
    with pytest.raises(IndexCorruptError, match="does not match its sha256"):
        load(tmp_path, IndexSettings())
    index_file.write_bytes(good)

    # A manifest whose id checksum disagrees with the ids in the file.
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "ids_sha256": "0" * 64}))
    with pytest.raises(IndexCorruptError, match="ids in the index file disagree"):
        load(tmp_path, IndexSettings())

    # A manifest naming a file outside the directory.
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "index_file": "../../etc/passwd"}))
    with pytest.raises(IndexCorruptError, match="invalid index_file"):
        load(tmp_path, IndexSettings())

    # A truncated manifest.
    (tmp_path / "manifest.json").write_text(json.dumps(manifest)[:40])
    with pytest.raises(IndexCorruptError, match="unreadable manifest"):
        load(tmp_path, IndexSettings())

    # A file that is not a FAISS index at all, with a manifest that vouches for it.
    junk = b"not a faiss index"
    index_file.write_bytes(junk)
    fake = {**manifest, "index_sha256": hashlib.sha256(junk).hexdigest()}
    (tmp_path / "manifest.json").write_text(json.dumps(fake))
    with pytest.raises(IndexCorruptError, match="FAISS cannot read"):
        load(tmp_path, IndexSettings())


def test_loaded_index_uses_current_search_settings(tmp_path: Path, clustered: Embeddings) -> None:
    settings = IndexSettings(exact_max=1000, hnsw_m=16, hnsw_ef_search=64)
    build(clustered, settings).save(tmp_path)
    loaded = FaissReferenceIndex.load(
        tmp_path,
        model_id=MODEL,
        kind="product",
        dim=64,
        settings=IndexSettings(exact_max=1000, hnsw_m=16, hnsw_ef_search=200),
        tuning=IndexTuning(),
    )
    assert loaded.index_type == "hnsw" and loaded.build_params == {"m": 16, "ef_construction": 80}
    assert loaded.policy_mismatch() is None
    other = load(tmp_path, IndexSettings(exact_max=1000, hnsw_m=32))
    assert other.policy_mismatch() is not None and "m" in str(other.policy_mismatch())
