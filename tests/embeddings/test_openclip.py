"""open_clip export: image and text towers agree with PyTorch, preprocessing comes from open_clip's own
config, and the export is redone exactly when its sources change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from embeddings.exporting import read_manifest
from embeddings.onnx_embedder import OnnxEmbedder
from embeddings.openclip import (
    OpenClipSource,
    ensure_openclip,
    load_openclip_torch,
    preprocess_from_open_clip,
)
from embeddings.preprocess import PreprocessConfig
from embeddings.registry import build_image_embedder, build_text_embedder
from embeddings.text_embedder import OnnxTextEmbedder
from service.settings import ModelSettings
from tests.embeddings.conftest import TINY_CLIP_ARCH, TINY_CLIP_CONFIG, Photo

TEXTS = ["Nike Air Max 90 genuine", "耐克 运动鞋 正品", "a photo of a milk carton, 1.5 L", "x"]


def _unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def test_image_tower_agrees_with_open_clip_in_pytorch(
    tiny_clip: OnnxEmbedder, tiny_clip_settings: ModelSettings, photos: list[Photo]
) -> None:
    model: Any
    model, preprocess, _ = load_openclip_torch(OpenClipSource.from_settings(tiny_clip_settings))
    with torch.inference_mode():
        ref = model.encode_image(torch.stack([preprocess(Image.fromarray(p.pixels)) for p in photos])).numpy()
    cosine = (tiny_clip.embed([p.pixels for p in photos]) * _unit(ref)).sum(axis=1)
    assert cosine.min() >= 0.999, cosine


def test_text_tower_agrees_with_open_clip_in_pytorch(
    tiny_clip_text: OnnxTextEmbedder, tiny_clip_settings: ModelSettings
) -> None:
    model: Any
    model, _, tokenizer = load_openclip_torch(OpenClipSource.from_settings(tiny_clip_settings))
    with torch.inference_mode():
        ref = model.encode_text(tokenizer(TEXTS)).numpy()
    got = tiny_clip_text.embed_text(TEXTS)
    assert got.shape == (len(TEXTS), 64)
    assert got.dtype == np.float32
    cosine = (got * _unit(ref)).sum(axis=1)
    assert cosine.min() >= 0.999, cosine
    assert tiny_clip_text.embed_text([]).shape == (0, 64)
    assert tiny_clip_text.model_id.startswith("openclip-text@")
    with pytest.raises(TypeError, match="single str"):
        tiny_clip_text.embed_text("one string")


def test_preprocess_json_is_derived_from_open_clips_config(tiny_clip: OnnxEmbedder) -> None:
    cfg = tiny_clip.config
    assert cfg == PreprocessConfig.read(tiny_clip.model_path.parent)
    assert cfg.size == (224, 224)
    assert cfg.resize_mode == "shortest_crop" and cfg.resize_shortest == 224
    assert cfg.interpolation == "bicubic"
    assert cfg.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert cfg.std == pytest.approx(open_clip.OPENAI_DATASET_STD)


def test_open_clip_resize_modes_map_to_ours_or_fail_clearly() -> None:
    base = {"size": 256, "mean": 0.5, "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}
    squash = preprocess_from_open_clip({**base, "resize_mode": "squash"}, 512, "pixels", "embedding")
    assert squash.resize_mode == "squash" and squash.size == (256, 256) and squash.mean == (0.5, 0.5, 0.5)
    with pytest.raises(NotImplementedError, match="letterbox"):
        preprocess_from_open_clip({**base, "resize_mode": "longest"}, 512, "pixels", "embedding")


def test_files_land_in_one_folder_per_model(tiny_clip: OnnxEmbedder, models_dir: Path) -> None:
    folder = tiny_clip.model_path.parent
    assert folder.parent == models_dir / "openclip"
    assert folder.name == f"{TINY_CLIP_ARCH}-ckpt-tiny_clip"
    names = {p.name for p in folder.iterdir()}
    expected = {"image.onnx", "text.onnx", "preprocess.json", "text.json", "bpe_vocab.txt.gz"}
    assert expected | {"manifest.json"} <= names


@pytest.mark.slow
def test_export_is_redone_when_the_checkpoint_changes_and_not_otherwise(tmp_path: Path) -> None:
    config = tmp_path / f"{TINY_CLIP_ARCH}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    checkpoint = tmp_path / "weights.pt"
    torch.manual_seed(1)
    torch.save(open_clip.create_model(TINY_CLIP_ARCH).state_dict(), checkpoint)
    settings = ModelSettings(openclip_arch=str(config), openclip_checkpoint=checkpoint)
    source = OpenClipSource.from_settings(settings)
    models = tmp_path / "models"

    folder, exported = ensure_openclip(models, source)
    assert exported
    first = build_image_embedder("openclip", models, settings)
    first_manifest = read_manifest(folder)
    assert first_manifest is not None

    _, exported = ensure_openclip(models, source)
    assert not exported
    assert build_image_embedder("openclip", models, settings).model_id == first.model_id

    torch.manual_seed(2)
    torch.save(open_clip.create_model(TINY_CLIP_ARCH).state_dict(), checkpoint)
    _, exported = ensure_openclip(models, source)
    assert exported
    second = build_image_embedder("openclip", models, settings)
    assert second.model_id != first.model_id
    second_manifest = read_manifest(folder)
    assert second_manifest is not None
    assert second_manifest.fingerprint["checkpoint_sha256"] != first_manifest.fingerprint["checkpoint_sha256"]
    # The text tower follows the same export.
    assert build_text_embedder(models, settings).embed_text(["x"]).shape == (1, 64)
    # No temporary or superseded folders are left behind.
    left = sorted(p.name for p in (models / "openclip").iterdir() if not p.name.endswith(".lock"))
    assert left == [folder.name]


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"openclip_pretrained": "tag", "openclip_checkpoint": Path(__file__)}, ValueError, "not both"),
        ({}, ValueError, "open_clip needs weights"),
        ({"openclip_checkpoint": Path("/nonexistent/ckpt.pt")}, FileNotFoundError, "checkpoint not found"),
        ({"openclip_arch": "/no/m.json", "openclip_pretrained": "x"}, FileNotFoundError, "config file"),
    ],
)
def test_bad_open_clip_settings_are_named(
    fields: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        OpenClipSource.from_settings(ModelSettings(**fields))  # type: ignore[arg-type]


def test_a_hub_tag_names_the_folder_and_fingerprint_without_downloading() -> None:
    settings = ModelSettings(openclip_arch="ViT-B-32", openclip_pretrained="laion2b_s34b_b79k")
    source = OpenClipSource.from_settings(settings)
    assert source.pretrained_arg == "laion2b_s34b_b79k"
    assert source.dir_name() == "ViT-B-32-laion2b_s34b_b79k"
