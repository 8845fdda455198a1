"""Fixtures for the model adapters: real grocery photos, and the models exported once per test session
into a temporary models_dir (sscd, effnet, and a tiny open_clip model with random weights)."""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embeddings.onnx_embedder import OnnxEmbedder
from embeddings.registry import build_image_embedder, build_text_embedder
from embeddings.text_embedder import OnnxTextEmbedder
from service.domain.model import RGBImage, Vectors
from service.domain.ports import ImageEmbedder
from service.settings import ModelSettings

# A tiny ViT CLIP: real open_clip architecture code, small enough to export in about a second.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_CLIP_ARCH = "CounterlensTest-Tiny-ViT"


@dataclass(frozen=True)
class Photo:
    path: Path
    label: str
    pixels: np.ndarray


class Gated:
    """A real model whose calls wait until the test opens the gate: a model busy with earlier work, so
    that what is submitted meanwhile queues in its batcher."""

    def __init__(self, inner: ImageEmbedder) -> None:
        self.inner, self.gate, self.entered = inner, threading.Event(), threading.Event()
        self.name, self.model_id, self.dim, self.provider = inner.name, inner.model_id, inner.dim, inner.provider

    def embed(self, images: Sequence[RGBImage]) -> Vectors:
        self.entered.set()
        assert self.gate.wait(10)
        return self.inner.embed(images)


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def jpeg_copy(pixels: np.ndarray, quality: int = 40, scale: float = 0.7) -> np.ndarray:
    """A re-shared copy: downscaled and recompressed as a low-quality JPEG."""
    im = Image.fromarray(pixels)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    im = im.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return np.asarray(out.convert("RGB"))


@pytest.fixture(scope="session")
def photos(grocery_dir: Path) -> list[Photo]:
    """16 real photos: 8 catalogue shots of packaged products and 8 in-store photos of other classes."""
    with (grocery_dir / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    catalogue = [r for r in rows if r["is_catalogue"] == "1" and r["top_class"] == "Packages"][:8]
    used = {r["class"] for r in catalogue}
    instore: list[dict[str, str]] = []
    for r in rows:
        if r["is_catalogue"] == "0" and r["class"] not in used:
            instore.append(r)
            used.add(r["class"])
        if len(instore) == 8:
            break
    chosen = catalogue + instore
    return [Photo(grocery_dir / r["path"], r["class"], load_rgb(grocery_dir / r["path"])) for r in chosen]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def model_settings() -> ModelSettings:
    return ModelSettings()


@pytest.fixture(scope="session")
def sscd(models_dir: Path, model_settings: ModelSettings) -> OnnxEmbedder:
    return build_image_embedder("sscd", models_dir, model_settings)


@pytest.fixture(scope="session")
def effnet(models_dir: Path, model_settings: ModelSettings) -> OnnxEmbedder:
    return build_image_embedder("effnet", models_dir, model_settings)


@pytest.fixture(scope="session")
def effnet_int8(models_dir: Path, model_settings: ModelSettings) -> OnnxEmbedder:
    return build_image_embedder("effnet_int8", models_dir, model_settings)


@pytest.fixture(scope="session")
def tiny_clip_settings(tmp_path_factory: pytest.TempPathFactory) -> ModelSettings:
    """Settings naming the tiny CLIP by its JSON config file and a random-weights local checkpoint."""
    import open_clip
    import torch

    src = tmp_path_factory.mktemp("tiny_clip")
    config = src / f"{TINY_CLIP_ARCH}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(1234)
    model = open_clip.create_model(TINY_CLIP_ARCH, pretrained=None)
    checkpoint = src / "tiny_clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return ModelSettings(openclip_arch=str(config), openclip_checkpoint=checkpoint)


@pytest.fixture(scope="session")
def tiny_clip(models_dir: Path, tiny_clip_settings: ModelSettings) -> OnnxEmbedder:
    return build_image_embedder("openclip", models_dir, tiny_clip_settings)


@pytest.fixture(scope="session")
def tiny_clip_text(
    models_dir: Path, tiny_clip_settings: ModelSettings, tiny_clip: OnnxEmbedder
) -> OnnxTextEmbedder:
    return build_text_embedder(models_dir, tiny_clip_settings)
