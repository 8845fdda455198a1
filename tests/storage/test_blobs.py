"""The content-addressed blob store of reference image bytes (no database involved)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from service.storage import BlobNotFoundError, BlobStore, CorruptBlobError, InvalidInputError, StorageError
from tests.storage.conftest import Photo


def test_round_trip_layout_and_idempotence(tmp_path: Path, catalogue_photos: list[Photo]) -> None:
    store = BlobStore(tmp_path / "blobs")
    photo = catalogue_photos[0]
    digest = store.put(photo.data)
    assert digest == photo.sha256
    assert store.path_for(digest) == tmp_path / "blobs" / digest[:2] / digest
    assert BlobStore.relative_path(digest) == f"{digest[:2]}/{digest}"
    assert store.get(digest) == photo.data
    mtime = store.path_for(digest).stat().st_mtime_ns
    assert store.put(photo.data, sha256=photo.sha256) == digest  # already there: not written again
    assert store.path_for(digest).stat().st_mtime_ns == mtime
    for p in catalogue_photos[1:4]:
        store.put(p.data)
    assert sorted(store) == sorted(p.sha256 for p in catalogue_photos[:4])
    # A new store object on the same root (a restart) reads the same bytes.
    assert BlobStore(tmp_path / "blobs").get(catalogue_photos[2].sha256) == catalogue_photos[2].data
    assert store.delete(digest) and not store.exists(digest) and not store.delete(digest)
    with pytest.raises(BlobNotFoundError):
        store.get(digest)


def test_wrong_or_malicious_hashes_are_refused(tmp_path: Path, catalogue_photos: list[Photo]) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(StorageError, match="does not match"):
        store.put(catalogue_photos[0].data, sha256=catalogue_photos[1].sha256)
    for bad in ("../" * 10 + "etc/passwd", "/etc/passwd", "A" * 64, "ab"):
        with pytest.raises(InvalidInputError):
            store.get(bad)
    assert list(store) == []


def test_a_failed_write_leaves_nothing(tmp_path: Path, catalogue_photos: list[Photo],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path)
    photo = catalogue_photos[0]

    def crash(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.put(photo.data)
    assert not store.exists(photo.sha256)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no temporary file left behind
    monkeypatch.undo()
    assert store.put(photo.data) == photo.sha256 and store.get(photo.sha256) == photo.data


def test_unfinished_writes_are_never_read_and_corruption_is_detected(tmp_path: Path,
                                                                    catalogue_photos: list[Photo]) -> None:
    store = BlobStore(tmp_path)
    photo = catalogue_photos[0]
    # What a write killed before its rename leaves behind: a temporary file beside the blob's place.
    folder = tmp_path / photo.sha256[:2]
    folder.mkdir()
    (folder / f".tmp-{photo.sha256}").write_bytes(photo.data[:100])
    assert list(store) == [] and not store.exists(photo.sha256)
    assert store.remove_stale_temporaries() == 1
    store.put(photo.data)
    store.path_for(photo.sha256).write_bytes(photo.data[:-1] + b"\x00")
    with pytest.raises(CorruptBlobError):
        store.get(photo.sha256)
    assert hashlib.sha256(store.get(photo.sha256, verify=False)).hexdigest() != photo.sha256
    store.put(photo.data)  # uploading the photo again repairs the corrupt copy
    assert store.get(photo.sha256) == photo.data
