"""FaissKeypointIndex on real product photos: a catalogue photo cut onto a new scene, another photo of the
same packaging and unrelated photos; HNSW against the exact search and a numpy brute-force oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embeddings.keypoints import SiftExtractor
from index.keypoint_index import FaissKeypointIndex, root_sift
from service.domain.model import KeypointSet
from tests.index.oracle import exact_search

PRODUCTS = ["Alpro-Shelf-Soy-Milk", "Alpro-Vanilla-Soyghurt", "Arla-Ecological-Sour-Cream", "Arla-Natural-Yoghurt",
            "Arla-Sour-Milk", "Arla-Standard-Milk", "Bravo-Orange-Juice", "Garant-Ecological-Medium-Fat-Milk"]
UNRELATED = ["Asparagus", "Aubergine", "Avocado", "Cabbage", "Brown-Cap-Mushroom", "Cantaloupe"]


def load(path: Path, side: int | None = None) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    if side:
        img = img.resize((side, side * img.height // img.width))
    return np.asarray(img)


def instore(grocery: Path, cls: str, n: int) -> list[np.ndarray]:
    return [load(p) for p in sorted((grocery / "instore" / cls).glob("*.jpg"))[:n]]


@pytest.fixture(scope="module")
def refs(grocery_dir: Path) -> dict[int, np.ndarray]:
    return {i: load(grocery_dir / "catalogue" / f"{name}.jpg") for i, name in enumerate(PRODUCTS)}


@pytest.fixture(scope="module")
def extractor() -> SiftExtractor:
    return SiftExtractor()


def build(refs: dict[int, np.ndarray], extractor: SiftExtractor, **kw: int) -> FaissKeypointIndex:
    index = FaissKeypointIndex(**kw)  # type: ignore[arg-type]
    for i, px in refs.items():
        index.add(i + 100, extractor.extract(px))
    return index


def pasted(product: np.ndarray, scene: np.ndarray, frac: float, angle: float) -> tuple[np.ndarray, tuple[int, ...]]:
    """``product`` rotated by ``angle`` and scaled to ``frac`` of the scene's width, pasted at (x, y)."""
    canvas = Image.fromarray(scene).resize((480, 480))
    item = Image.fromarray(product).rotate(angle, expand=True, fillcolor=(255, 255, 255))
    w = int(480 * frac)
    item = item.resize((w, w * item.height // item.width))
    x, y = 90, 60
    canvas.paste(item, (x, y))
    return np.asarray(canvas), (x, y, x + item.width, y + item.height)


def iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_a_product_pasted_on_a_new_scene_is_verified_where_it_was_pasted(
        refs: dict[int, np.ndarray], extractor: SiftExtractor, grocery_dir: Path) -> None:
    index = build(refs, extractor)
    scene = instore(grocery_dir, "Avocado", 1)[0]
    for k, (frac, angle) in enumerate([(0.6, 12.0), (0.45, -20.0), (0.7, 0.0)]):
        photo, where = pasted(refs[k], scene, frac, angle)
        hits = index.verify(extractor.extract(photo))
        assert hits, (k, frac, angle)
        assert hits[0].image_id == k + 100 and hits[0].inliers >= 20
        assert hits[0].box is not None and iou(hits[0].box, where) > 0.6, (hits[0].box, where)


def test_unrelated_photos_verify_nothing(refs: dict[int, np.ndarray], extractor: SiftExtractor,
                                         grocery_dir: Path) -> None:
    index = build(refs, extractor)
    photos = [p for cls in UNRELATED for p in instore(grocery_dir, cls, 2)]
    found = [h for p in photos for h in index.verify(extractor.extract(p), min_inliers=8)]
    assert found == []


def test_other_photos_of_the_packaging_are_verified(refs: dict[int, np.ndarray], extractor: SiftExtractor,
                                                    grocery_dir: Path) -> None:
    """In-store smartphone photos (shelf, hand, another angle): most verify their own product, none another
    brand's. (Sibling products share a maker's design: an Alpro yoghurt's shelf photo verifies the Alpro
    soy milk carton too, sometimes first.)"""
    index = build(refs, extractor)
    right = wrong_brand = total = 0

    def maker(image_id: int) -> str:
        return PRODUCTS[image_id - 100].split("-")[0]

    for i, name in enumerate(PRODUCTS):
        for photo in instore(grocery_dir, name, 3):
            total += 1
            hits = index.verify(extractor.extract(photo), min_inliers=12)
            right += any(h.image_id == i + 100 for h in hits)
            wrong_brand += sum(maker(h.image_id) != maker(i + 100) for h in hits)
    assert wrong_brand == 0
    assert right >= total // 2, (right, total)


def test_hnsw_agrees_with_the_exact_search(refs: dict[int, np.ndarray], extractor: SiftExtractor,
                                           grocery_dir: Path) -> None:
    exact = build(refs, extractor, exact_max=10**9)
    approx = build(refs, extractor, exact_max=1)
    scene = instore(grocery_dir, "Cabbage", 1)[0]
    for k in range(4):
        f = extractor.extract(pasted(refs[k], scene, 0.55, 8.0 * k)[0])
        a, b = exact.verify(f), approx.verify(f)
        assert a and b and a[0].image_id == b[0].image_id == k + 100
        assert abs(a[0].inliers - b[0].inliers) <= 0.2 * a[0].inliers


def test_descriptor_neighbours_equal_the_numpy_oracle(refs: dict[int, np.ndarray], extractor: SiftExtractor,
                                                      grocery_dir: Path) -> None:
    """The exact index's two nearest reference descriptors are the brute-force float64 ones."""
    import faiss

    sets = [extractor.extract(px) for px in refs.values()]
    base = np.concatenate([root_sift(s.descriptors) for s in sets])
    ids = np.arange(len(base), dtype=np.int64)
    queries = root_sift(extractor.extract(instore(grocery_dir, "Arla-Sour-Milk", 1)[0]).descriptors)
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    _, got = flat.search(queries, 2)
    want_sims, want = exact_search(base, ids, queries, 2)
    # Equal up to exact ties in similarity (repeated descriptors within a design).
    assert np.mean(got[:, 0] == want[:, 0]) > 0.99
    np.testing.assert_allclose(np.linalg.norm(base, axis=1), 1.0, atol=1e-5)
    assert want_sims.shape == (len(queries), 2)


def test_removed_references_are_not_verified_and_can_come_back(
        refs: dict[int, np.ndarray], extractor: SiftExtractor, grocery_dir: Path) -> None:
    index = build(refs, extractor)
    photo = extractor.extract(pasted(refs[2], instore(grocery_dir, "Aubergine", 1)[0], 0.6, 5.0)[0])
    assert index.verify(photo)[0].image_id == 102
    assert index.remove([102, 999]) == 1 and 102 not in index
    assert all(h.image_id != 102 for h in index.verify(photo))
    index.add(102, extractor.extract(refs[2]))
    assert index.verify(photo)[0].image_id == 102 and index.references == len(refs)


def test_an_empty_index_and_a_featureless_photo_verify_nothing(extractor: SiftExtractor) -> None:
    flat = np.full((200, 300, 3), 128, np.uint8)
    empty = extractor.extract(flat)
    assert len(empty) == 0
    assert FaissKeypointIndex().verify(empty) == []
    index = FaissKeypointIndex()
    index.add(1, empty)  # a reference without keypoints is remembered, never matched
    assert 1 in index and index.ntotal == 0
    some = KeypointSet(np.zeros((5, 2), np.float32), np.ones((5, 128), np.uint8), 10, 10)
    assert index.verify(some) == []


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="ratio"):
        FaissKeypointIndex(ratio=0.0)
    with pytest.raises(ValueError, match="min_votes"):
        FaissKeypointIndex(min_votes=2)
