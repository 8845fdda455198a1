"""SiftExtractor on real photos: sizes, determinism, the id that keys stored features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embeddings.keypoints import SiftExtractor


@pytest.fixture(scope="module")
def photo(grocery_dir: Path) -> np.ndarray:
    return np.asarray(Image.open(grocery_dir / "catalogue" / "Arla-Sour-Milk.jpg").convert("RGB"))


def test_features_are_bounded_deterministic_and_inside_the_described_image(photo: np.ndarray) -> None:
    ex = SiftExtractor(max_side=480, min_side=320, max_features=150)
    a, b = ex.extract(photo), ex.extract(photo)
    assert 50 <= len(a) <= 150
    assert a.points.tobytes() == b.points.tobytes() and a.descriptors.tobytes() == b.descriptors.tobytes()
    assert a.descriptors.dtype == np.uint8 and a.descriptors.shape[1] == 128
    assert (a.points >= 0).all() and (a.points[:, 0] < a.width).all() and (a.points[:, 1] < a.height).all()


def test_small_photos_are_upscaled_and_large_ones_downscaled(photo: np.ndarray) -> None:
    ex = SiftExtractor(max_side=480, min_side=320)
    h, w = photo.shape[:2]
    small = ex.extract(photo)  # the catalogue photos are ~200 px
    assert max(small.width, small.height) == 320 and small.scale == pytest.approx(320 / max(h, w))
    big = np.asarray(Image.fromarray(photo).resize((w * 5, h * 5)))
    large = ex.extract(big)
    assert max(large.width, large.height) == 480 and large.scale == pytest.approx(480 / (5 * max(h, w)))


def test_the_extractor_id_names_the_parameters() -> None:
    assert SiftExtractor().extractor_id == SiftExtractor().extractor_id
    assert SiftExtractor(max_features=100).extractor_id != SiftExtractor().extractor_id
    assert SiftExtractor().extractor_id.startswith("sift@")
    with pytest.raises(ValueError, match="min_side"):
        SiftExtractor(max_side=100, min_side=200)
    with pytest.raises(ValueError, match="max_features"):
        SiftExtractor(max_features=2)
