"""The matcher's search memo on real models, photos and FAISS: a photo searched again is answered from
the memo with the same matches, and a change of the index (a reference added) is seen at once."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from service.container import Container
from service.domain.model import Listing, ListingImage, Money, ReferenceKind, ScoreResult, SellerInfo
from service.usecases.catalog import ReferenceUpload
from service.usecases.matching import SearchMemo
from tests.usecases.rescan_world import LATE_REFERENCE, World

pytestmark = pytest.mark.slow


def _listing(w: World, lid: str, name: str) -> Listing:
    path = w.photos / name
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    image = ListingImage(hashlib.sha256(path.read_bytes()).hexdigest(), pixels)
    return Listing(lid, "yoghurt", price=Money(3.0, "USD"), seller=SellerInfo("s-1"), images=(image,))


def _matches(result: ScoreResult) -> list[tuple[int, str, float]]:
    return [(m.reference.image_id, m.signal.value, round(m.similarity, 6)) for m in result.matches]


def test_a_photo_searched_again_is_answered_from_the_memo_until_the_index_changes(
        rescan_world: World, container: Container) -> None:
    w = rescan_world
    brand, sku = LATE_REFERENCE
    matcher = container.scorer.matcher
    first = container.scorer.score(_listing(w, "memo-1", w.copies[sku]), persist=False).result
    sha = hashlib.sha256((w.photos / w.copies[sku]).read_bytes()).hexdigest()
    remembered = [key for key in matcher.memo._entries if key[2] == sha]
    assert remembered, "the photo's hits were not remembered"

    # Searched again: the memo answers, with the same matches (a forgotten memo answers the same too:
    # it is the index's answer).
    again = container.scorer.score(_listing(w, "memo-2", w.copies[sku]), persist=False).result
    assert _matches(again) == _matches(first)
    matcher.memo._entries.clear()
    fresh = container.scorer.score(_listing(w, "memo-3", w.copies[sku]), persist=False).result
    assert _matches(fresh) == _matches(first)
    assert all(m.reference.brand != brand for m in first.matches)

    # The brand adds the photo's product: the index moved, so the remembered hits are not used and the
    # new reference is found as a copy.
    container.catalog.add([ReferenceUpload(
        brand=brand, kind=ReferenceKind.PRODUCT, data=w.late_photo.read_bytes(), source="test", sku=sku,
        ref_id=f"ref-{sku}", price=Money(20.0, "USD"))])
    after = container.scorer.score(_listing(w, "memo-4", w.copies[sku]), persist=False).result
    assert any(m.reference.brand == brand and m.reference.sku == sku and m.signal.value == "copy"
               for m in after.matches)
    assert after.verdict.value != "clear"


def test_the_memo_keeps_the_most_recent_photos_and_checks_index_and_version() -> None:
    memo = SearchMemo(2)
    index, other = object(), object()
    memo.put(("m", "product", "a"), index, 1, 0.2, [(7, 0.9)])
    memo.put(("m", "product", "b"), index, 1, 0.2, [])
    assert memo.get(("m", "product", "a"), index, 1, 0.2) == [(7, 0.9)]  # "a" is now the most recent
    memo.put(("m", "product", "c"), index, 1, 0.2, [(8, 0.5)])
    assert memo.get(("m", "product", "b"), index, 1, 0.2) is None  # the least recent went
    assert memo.get(("m", "product", "a"), index, 2, 0.2) is None  # the index changed since
    assert memo.get(("m", "product", "a"), other, 1, 0.2) is None  # another index object (reloaded)
    assert memo.get(("m", "product", "a"), index, 1, 0.4) is None  # another floor
    assert memo.get(("m", "product", "c"), index, 1, 0.2) == [(8, 0.5)]
    off = SearchMemo(0)
    off.put(("m", "product", "a"), index, 1, 0.2, [(7, 0.9)])
    assert off.get(("m", "product", "a"), index, 1, 0.2) is None
