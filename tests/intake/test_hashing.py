"""The perceptual hash on real photos: copies stay close, different products stay far apart."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from service.intake.hashing import hamming, phash
from service.intake.images import decode_image
from service.settings import IntakeSettings

LIMITS = IntakeSettings()


@pytest.fixture(scope="module")
def one_photo_per_product(grocery_dir: Path) -> dict[str, np.ndarray]:
    """The first in-store photo of each of 20 products (sorted, so the set is fixed)."""
    photos: dict[str, np.ndarray] = {}
    for folder in sorted(p for p in (grocery_dir / "instore").iterdir() if p.is_dir())[:20]:
        first = sorted(folder.glob("*.jpg"))[0]
        photos[folder.name] = decode_image(first.read_bytes(), LIMITS).pixels
    return photos


def _jpeg_copy(rgb: np.ndarray, quality: int, scale: float = 1.0, brightness: float = 1.0) -> np.ndarray:
    img = Image.fromarray(rgb)
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    if brightness != 1.0:
        img = ImageEnhance.Brightness(img).enhance(brightness)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return decode_image(buf.getvalue(), LIMITS).pixels


def test_hash_is_16_hex_digits_and_deterministic(one_photo_per_product: dict[str, np.ndarray]) -> None:
    rgb = next(iter(one_photo_per_product.values()))
    h = phash(rgb)
    assert len(h) == 16 and int(h, 16) >= 0 and h == h.lower()
    assert phash(rgb.copy()) == h
    assert hamming(h, h) == 0


def test_recompressed_and_resized_copies_stay_close(one_photo_per_product: dict[str, np.ndarray]) -> None:
    for name, rgb in one_photo_per_product.items():
        h = phash(rgb)
        copies = (_jpeg_copy(rgb, 40), _jpeg_copy(rgb, 70, scale=0.6), _jpeg_copy(rgb, 85, brightness=1.15))
        for copy in copies:
            assert hamming(h, phash(copy)) <= 8, name


def test_different_products_are_far_apart(one_photo_per_product: dict[str, np.ndarray]) -> None:
    hashes = {name: phash(rgb) for name, rgb in one_photo_per_product.items()}
    names = sorted(hashes)
    distances = [hamming(hashes[a], hashes[b]) for i, a in enumerate(names) for b in names[i + 1 :]]
    assert min(distances) > 12
    assert 24 < float(np.mean(distances)) < 40  # unrelated 64-bit hashes differ in about half their bits


def test_hash_ignores_a_colour_shift_but_not_a_mirror(one_photo_per_product: dict[str, np.ndarray]) -> None:
    rgb = next(iter(one_photo_per_product.values()))
    h = phash(rgb)
    warmer = np.clip(rgb.astype(int) + np.array([20, 5, -15]), 0, 255).astype(np.uint8)
    assert hamming(h, phash(warmer)) <= 4
    assert hamming(h, phash(np.ascontiguousarray(rgb[:, ::-1]))) > 12


@pytest.mark.parametrize(("a", "b", "distance"), [
    ("0000000000000000", "ffffffffffffffff", 64),
    ("0000000000000000", "0000000000000001", 1),
    ("8000000000000000", "0000000000000000", 1),
    ("DEADBEEF00000000", "deadbeef00000000", 0),
    ("0f0f0f0f0f0f0f0f", "f0f0f0f0f0f0f0f0", 64),
])
def test_hamming_counts_differing_bits(a: str, b: str, distance: int) -> None:
    assert hamming(a, b) == distance


@pytest.mark.parametrize("bad", ["", "123", "g000000000000000", "00000000000000000", "0x00000000000000"])
def test_hamming_refuses_malformed_hashes(bad: str) -> None:
    with pytest.raises(ValueError):
        hamming(bad, "0000000000000000")


def test_phash_refuses_non_rgb_arrays() -> None:
    with pytest.raises(ValueError):
        phash(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError):
        phash(np.zeros((0, 8, 3), np.uint8))
