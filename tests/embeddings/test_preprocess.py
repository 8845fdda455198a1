"""The preprocessing config and transform: persistence, validation, and pixel-exact agreement with the
torchvision pipelines the models were trained with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torchvision import transforms

from embeddings.effnet import EFFNET_PREPROCESS
from embeddings.preprocess import PREPROCESS_FILE, PreprocessConfig, PreprocessError, preprocess_batch
from embeddings.sscd import SSCD_PREPROCESS
from tests.embeddings.conftest import Photo


def test_config_round_trips_through_preprocess_json(tmp_path: Path) -> None:
    path = EFFNET_PREPROCESS.write(tmp_path)
    assert path == tmp_path / PREPROCESS_FILE
    assert PreprocessConfig.read(tmp_path) == EFFNET_PREPROCESS
    # Canonical JSON: equal configs give equal bytes (they feed the model_id hash).
    assert path.read_text() == EFFNET_PREPROCESS.to_json()


def test_reading_a_missing_config_says_the_model_was_not_exported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"preprocess\.json.*not exported"):
        PreprocessConfig.read(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resize_shortest": None}, "resize_shortest is required"),
        ({"resize_shortest": 100}, "at least the crop"),
        ({"mean": None}, "mean and std are required"),
        ({"std": (0.5, 0.0, 0.5)}, "std must be positive"),
        ({"input_dtype": "uint8"}, "must be absent"),
        ({"resize_mode": "letterbox"}, "resize_mode"),
    ],
)
def test_inconsistent_configs_are_rejected(changes: dict[str, object], message: str) -> None:
    fields = EFFNET_PREPROCESS.model_dump()
    fields.update(changes)
    with pytest.raises(ValidationError, match=message):
        PreprocessConfig(**fields)


def test_shortest_crop_matches_torchvision_on_real_photos(photos: list[Photo]) -> None:
    cfg = EFFNET_PREPROCESS
    reference = transforms.Compose(
        [
            transforms.Resize(cfg.resize_shortest, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(cfg.size),
            transforms.ToTensor(),
            transforms.Normalize(cfg.mean, cfg.std),
        ]
    )
    ours = preprocess_batch(cfg, [p.pixels for p in photos])
    theirs = torch.stack([reference(Image.fromarray(p.pixels)) for p in photos]).numpy()
    assert ours.dtype == np.float32
    assert ours.shape == (len(photos), 3, 224, 224)
    np.testing.assert_allclose(ours.astype(np.float32), theirs, atol=1e-5)


def test_both_layouts_hold_the_same_normalised_values(photos: list[Photo]) -> None:
    # Per-channel statistics, so a channel written with another channel's scale would show.
    cfg = EFFNET_PREPROCESS.model_copy(update={"mean": (0.48, 0.46, 0.41), "std": (0.27, 0.26, 0.28)})
    pixels = [p.pixels for p in photos[:3]]
    nchw = preprocess_batch(cfg, pixels)
    nhwc = preprocess_batch(cfg.model_copy(update={"layout": "NHWC"}), pixels)
    assert nhwc.shape == (3, 224, 224, 3)
    np.testing.assert_array_equal(nhwc, nchw.transpose(0, 2, 3, 1))
    # The values are (pixel / 255 - mean) / std, channel by channel.
    crop = cfg.resize_one(pixels[0]).astype(np.float64) / 255.0
    expected = (crop - np.asarray(cfg.mean)) / np.asarray(cfg.std)
    np.testing.assert_allclose(nhwc[0], expected, atol=1e-5)


def test_squash_gives_raw_uint8_nhwc_for_models_that_normalise_in_graph(photos: list[Photo]) -> None:
    out = preprocess_batch(SSCD_PREPROCESS, [p.pixels for p in photos[:3]])
    assert out.dtype == np.uint8
    assert out.shape == (3, 320, 320, 3)
    expected = np.asarray(Image.fromarray(photos[0].pixels).resize((320, 320), Image.Resampling.BILINEAR))
    assert photos[0].pixels.shape[:2] < (320, 320)  # enlarged: OpenCV, Pillow's values to the rounding
    assert np.abs(out[0].astype(int) - expected).max() <= 1


@pytest.mark.parametrize(("shape", "enlarged"), [
    ((256, 256, 3), True), ((100, 300, 3), True), ((1, 1, 3), True), ((320, 200, 3), True),
    ((640, 480, 3), False), ((400, 200, 3), False), ((320, 320, 3), False),
])
def test_a_bilinear_resize_is_pillows_to_the_rounding_when_enlarging_and_exactly_when_not(
        photos: list[Photo], shape: tuple[int, int, int], enlarged: bool) -> None:
    """Enlarging takes OpenCV's bilinear resize (15x faster); shrinking, in either side, stays with
    Pillow, whose antialiasing OpenCV's bilinear lacks."""
    h, w, _ = shape
    image = np.asarray(Image.fromarray(photos[3].pixels).resize((w, h), Image.Resampling.LANCZOS))
    ours = SSCD_PREPROCESS.resize_one(image)
    pillow = np.asarray(Image.fromarray(image).resize((320, 320), Image.Resampling.BILINEAR))
    diff = np.abs(ours.astype(int) - pillow)
    if enlarged:
        assert diff.max() <= 1 and diff.mean() < 0.5
    else:
        np.testing.assert_array_equal(ours, pillow)
    # The centre-crop recipe with a bilinear filter enlarges the same way.
    crop = EFFNET_PREPROCESS.model_copy(update={"interpolation": "bilinear"})
    bilinear = transforms.InterpolationMode.BILINEAR
    ref = transforms.Compose([transforms.Resize(crop.resize_shortest, interpolation=bilinear),
                              transforms.CenterCrop(crop.size)])
    theirs = np.asarray(ref(Image.fromarray(image)))
    got = crop.resize_one(image).astype(int) - theirs
    assert crop.resize_shortest is not None
    assert np.abs(got).max() <= (1 if min(h, w) < crop.resize_shortest else 0)


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 900, 3), (900, 2, 3), (257, 255, 3)])
def test_extreme_aspect_ratios_and_tiny_images_still_fill_the_input(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    out = preprocess_batch(EFFNET_PREPROCESS, [image])
    assert out.shape == (1, 3, 224, 224)
    assert np.isfinite(out).all()


def test_a_non_contiguous_view_is_read_correctly(photos: list[Photo]) -> None:
    flipped = photos[0].pixels[:, ::-1]
    out = preprocess_batch(SSCD_PREPROCESS, [flipped])
    np.testing.assert_array_equal(out, preprocess_batch(SSCD_PREPROCESS, [np.ascontiguousarray(flipped)]))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((8, 8, 3), dtype=np.float32), r"images\[1\]: expected dtype uint8"),
        (np.zeros((8, 8), dtype=np.uint8), r"images\[1\]: expected shape \(H, W, 3\)"),
        (np.zeros((8, 8, 4), dtype=np.uint8), r"images\[1\]: expected shape \(H, W, 3\)"),
        (np.zeros((0, 8, 3), dtype=np.uint8), r"images\[1\]: empty image"),
        ([[0, 0, 0]], r"images\[1\]: expected a numpy array, got list"),
    ],
)
def test_bad_images_are_named_in_the_error(bad: object, message: str) -> None:
    good = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(PreprocessError, match=message):
        preprocess_batch(EFFNET_PREPROCESS, [good, bad])  # type: ignore[list-item]


def test_a_stacked_array_is_accepted_but_a_single_image_is_not() -> None:
    stacked = np.zeros((2, 10, 12, 3), dtype=np.uint8)
    assert preprocess_batch(SSCD_PREPROCESS, stacked).shape == (2, 320, 320, 3)
    with pytest.raises(PreprocessError, match=r"got an array of shape \(10, 12, 3\)"):
        preprocess_batch(SSCD_PREPROCESS, stacked[0])
