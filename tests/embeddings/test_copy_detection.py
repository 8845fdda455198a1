"""Every backend ranks a re-shared copy of a product photo (downscaled, JPEG q40) closer than another
product's photo.  Products are chosen so that no two are variants of one package design (two Garant milk
cartons differing only in colour are copies as far as SSCD is concerned)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embeddings.onnx_embedder import OnnxEmbedder
from tests.embeddings.conftest import jpeg_copy, load_rgb

PRODUCTS = [
    "Alpro-Shelf-Soy-Milk",
    "Arla-Natural-Yoghurt",
    "Bravo-Orange-Juice",
    "Yoggi-Strawberry-Yoghurt",
    "Avocado",
    "Watermelon",
    "Yellow-Bell-Pepper",
    "Garlic",
]


@pytest.mark.parametrize("backend", ["sscd", "effnet", "tiny_clip"])
def test_a_copy_is_closer_than_any_other_product(
    backend: str, grocery_dir: Path, request: pytest.FixtureRequest
) -> None:
    embedder: OnnxEmbedder = request.getfixturevalue(backend)
    originals = [load_rgb(grocery_dir / "catalogue" / f"{name}.jpg") for name in PRODUCTS]
    copies = [jpeg_copy(img, quality=40, scale=0.7) for img in originals]
    a = embedder.embed(originals)
    b = embedder.embed(copies)
    to_copy = (a * b).sum(axis=1)
    between = a @ a.T
    np.fill_diagonal(between, -np.inf)
    nearest_other = between.max(axis=1)
    for name, copy_sim, other_sim in zip(PRODUCTS, to_copy, nearest_other, strict=True):
        assert copy_sim > other_sim, f"{backend}: {name} copy {copy_sim:.4f} <= other product {other_sim:.4f}"
