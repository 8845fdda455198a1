"""A large JPEG is embedded from a smaller decode (``models.reduced_decode``): the whole-photo models see
it at 1/2, 1/4 or 1/8 of its size, never below the side they resize to, and a listing that no expensive
signal reads is never decoded whole. Real models, photos, FAISS and SQLite."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.container import build_container
from service.domain.model import Listing, Money, SignalName
from service.intake.images import decode_image
from service.settings import Settings
from service.usecases.listing_input import ImageSource
from tests.usecases.rescan_world import World, fresh_data_dir

pytestmark = pytest.mark.slow


def _enlarged(path: Path, size: tuple[int, int]) -> bytes:
    """A real photo as a marketplace would send it: a JPEG of ``size`` (width, height)."""
    with Image.open(path) as im:
        big = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _settings(data_dir: Path, **models: object) -> Settings:
    # No expensive signal: what the cheap path decodes is all that is decoded.
    return Settings(data_dir=data_dir, scoring={"logo_search": "never"}, models={"ocr": "never", **models},
                    keypoints={"mode": "never"})


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_a_large_jpeg_is_scored_from_a_smaller_decode_and_never_decoded_whole(rescan_world: World,
                                                                               tmp_path: Path) -> None:
    c = build_container(_settings(fresh_data_dir(rescan_world, tmp_path / "data")),
                        embedders=rescan_world.embedders)
    try:
        # sscd_distilled squashes to 320 x 320, effnet resizes the shorter side to 256: 320 serves both.
        assert c.images.model_side == 320
        sku, name = next(iter(rescan_world.copies.items()))
        big = _enlarged(rescan_world.photos / name, (1400, 1050))
        [image] = c.images.load([ImageSource(field="images[0]", data=big)])
        [out] = c.scorer.score_many([Listing("big-1", f"{sku} offer", price=Money(5.0, "USD"), images=(image,))])
        assert not isinstance(out, Exception)
        # 1/2 keeps the shorter side at 525 >= 320; 1/4 (262) would not.
        assert image.model_pixels.shape == (525, 700, 3)
        assert not image.decoded  # the full 1400 x 1050 photo was never decoded
        best = out.result.matches[0]
        assert (best.signal, best.reference.sku) == (SignalName.COPY, sku)
        assert out.result.verdict.value == "likely_counterfeit"

        # What the models see of the smaller decode is what they saw of the whole photo, to resampling.
        full = decode_image(big, c.settings.intake).pixels
        assert full.shape == (1050, 1400, 3)
        for model in rescan_world.embedders.values():
            small_vec, full_vec = model.embed([image.model_pixels, full])
            assert _cosine(small_vec, full_vec) >= 0.99
        # Crops, keypoints and OCR read the whole photo.
        assert image.pixels.shape == (1050, 1400, 3)
    finally:
        c.close()


def test_small_photos_and_reduced_decode_off_embed_the_whole_photo(rescan_world: World, tmp_path: Path) -> None:
    name = next(iter(rescan_world.copies.values()))
    big = _enlarged(rescan_world.photos / name, (1400, 1050))
    small = (rescan_world.photos / name).read_bytes()
    c = build_container(_settings(fresh_data_dir(rescan_world, tmp_path / "on")), embedders=rescan_world.embedders)
    try:
        [photo] = c.images.load([ImageSource(field="images[0]", data=small)])
        assert photo.model_pixels is photo.pixels  # a 256 px photo: nothing to reduce
    finally:
        c.close()
    off = build_container(_settings(fresh_data_dir(rescan_world, tmp_path / "off"), reduced_decode=False),
                          embedders=rescan_world.embedders)
    try:
        assert off.images.model_side is None
        [photo] = off.images.load([ImageSource(field="images[0]", data=big)])
        assert photo.model_pixels.shape == (1050, 1400, 3)
        assert photo.decoded
    finally:
        off.close()
