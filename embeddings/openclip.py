"""open_clip models exported to ONNX: the image tower (a lookalike embedder) and the text tower (titles
and queries in the same space), under ``models_dir/openclip/<arch>-<weights>/``.

The model is built by open_clip itself (``open_clip.create_model_and_transforms``) from an architecture
name -- or a JSON model config file, registered with ``open_clip.add_model_config`` -- and either a hub
tag (``settings.models.openclip_pretrained``) or a local checkpoint (``openclip_checkpoint``).  The image
preprocessing written to ``preprocess.json`` is derived from the model's own ``preprocess_cfg``; the
text tower gets ``text.json`` and a copy of the BPE vocabulary so tokenisation at serve time needs no
torch (:mod:`embeddings.clip_tokenizer`).  Models whose tokenizer is not CLIP's BPE (Hugging Face or
SigLIP tokenizers) get an image tower only and a ``text_unsupported.json`` saying why.

torch and open_clip are imported only inside the export functions.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embeddings.clip_tokenizer import TOKENIZER_FILE, TokenizerConfig
from embeddings.exporting import (
    ONNX_OPSET,
    SourceDigests,
    ensure_exported,
    export_torch_module,
    package_version,
    require_packages,
)
from embeddings.preprocess import PREPROCESS_FILE, PreprocessConfig
from service.settings import ModelSettings

if TYPE_CHECKING:
    import torch

OPENCLIP_DIR = "openclip"
IMAGE_MODEL_FILE = "image.onnx"
TEXT_MODEL_FILE = "text.onnx"
VOCAB_FILE = "bpe_vocab.txt.gz"
TEXT_UNSUPPORTED_FILE = "text_unsupported.json"
OPENCLIP_EXPORTER_VERSION = 1


@dataclass(frozen=True, slots=True)
class OpenClipSource:
    """Which open_clip model to export: an architecture (or its JSON config) plus where the weights are."""

    arch: str
    config_file: Path | None = None
    pretrained: str | None = None
    checkpoint: Path | None = None

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> OpenClipSource:
        arch = settings.openclip_arch.strip()
        if not arch:
            raise ValueError("models.openclip_arch is empty")
        config_file: Path | None = None
        if arch.endswith(".json"):
            config_file = Path(arch).expanduser()
            if not config_file.is_file():
                raise FileNotFoundError(f"models.openclip_arch: model config file not found: {config_file}")
            arch = config_file.stem
        tag = settings.openclip_pretrained.strip() or None
        checkpoint = settings.openclip_checkpoint
        if tag and checkpoint:
            raise ValueError("set models.openclip_pretrained or models.openclip_checkpoint, not both")
        if not tag and checkpoint is None:
            raise ValueError(
                "open_clip needs weights: set models.openclip_pretrained (a hub tag such as "
                "'laion2b_s34b_b79k') or models.openclip_checkpoint (a local file)"
            )
        if checkpoint is not None and not checkpoint.is_file():
            raise FileNotFoundError(f"models.openclip_checkpoint not found: {checkpoint}")
        return cls(arch=arch, config_file=config_file, pretrained=tag, checkpoint=checkpoint)

    @property
    def pretrained_arg(self) -> str:
        """What open_clip's ``pretrained=`` takes: the tag, or the checkpoint's path."""
        return self.pretrained if self.pretrained else str(self.checkpoint)

    def dir_name(self) -> str:
        stem = self.checkpoint.stem if self.checkpoint else ""
        weights = self.pretrained or f"ckpt-{stem}"
        return _slug(f"{self.arch}-{weights}")

    def fingerprint(self, digests: SourceDigests) -> Mapping[str, Any]:
        return {
            "arch": self.arch,
            "config_sha256": digests.sha256(self.config_file) if self.config_file else None,
            "pretrained": self.pretrained,
            "checkpoint_sha256": digests.sha256(self.checkpoint) if self.checkpoint else None,
            "exporter_version": OPENCLIP_EXPORTER_VERSION,
            "open_clip": package_version("open_clip_torch"),
            "torch": package_version("torch"),
            "opset": ONNX_OPSET,
        }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def preprocess_from_open_clip(
    cfg: Mapping[str, Any], dim: int, input_name: str, output_name: str
) -> PreprocessConfig:
    """open_clip's inference preprocessing (``model.visual.preprocess_cfg``) as a PreprocessConfig."""
    size = cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation == "random":  # open_clip itself uses bicubic at inference for 'random'
        interpolation = "bicubic"
    if interpolation not in ("bicubic", "bilinear"):
        raise NotImplementedError(f"open_clip interpolation {interpolation!r} is not supported")

    def triple(v: Any) -> tuple[float, float, float]:
        vals = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
        if len(vals) != 3:
            raise ValueError(f"expected 3 channel values, got {v!r}")
        return (vals[0], vals[1], vals[2])

    mode = cfg.get("resize_mode", "shortest")
    common: dict[str, Any] = {
        "input_name": input_name,
        "output_name": output_name,
        "dim": dim,
        "size": (h, w),
        "interpolation": interpolation,
        "mean": triple(cfg["mean"]),
        "std": triple(cfg["std"]),
    }
    if mode == "squash":
        return PreprocessConfig(resize_mode="squash", **common)
    if mode == "shortest":
        if h != w:
            raise NotImplementedError(f"open_clip 'shortest' resize to a non-square {h}x{w} is not supported")
        return PreprocessConfig(resize_mode="shortest_crop", resize_shortest=h, **common)
    raise NotImplementedError(f"open_clip resize_mode {mode!r} (letterbox padding) is not supported")


def load_openclip_torch(source: OpenClipSource) -> tuple[torch.nn.Module, Any, Any]:
    """``(model, preprocess_val, tokenizer)`` from open_clip, in eval mode on the CPU."""
    import open_clip

    if source.config_file is not None:
        open_clip.add_model_config(source.config_file)
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        source.arch, pretrained=source.pretrained_arg, device="cpu"
    )
    model.eval()
    return model, preprocess_val, open_clip.get_tokenizer(source.arch)


def _text_support(source: OpenClipSource, tokenizer: Any) -> tuple[TokenizerConfig | None, Path | None, str]:
    """(tokenizer config, its vocabulary file, reason) -- config None when the text tower cannot be
    served without torch."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    if type(tokenizer) is not SimpleTokenizer:
        return None, None, f"tokenizer {type(tokenizer).__name__} is not CLIP's BPE tokenizer"
    model_cfg = open_clip.get_model_config(source.arch) or {}
    kwargs = dict(model_cfg.get("text_cfg", {}).get("tokenizer_kwargs", {}))
    clean = kwargs.pop("clean", "lower")
    bpe = Path(kwargs.pop("bpe_path", default_bpe()))
    if kwargs or tokenizer.reduction_fn is not None:
        return None, None, f"tokenizer options {sorted(kwargs) or ['reduction_mask']} are not supported"
    if clean not in ("lower", "whitespace"):
        return None, None, f"tokenizer clean mode {clean!r} is not supported"
    cfg = TokenizerConfig(
        input_name="tokens",
        output_name="embedding",
        dim=1,  # replaced once the tower's output size is known
        context_length=int(tokenizer.context_length),
        vocab_file=VOCAB_FILE,
        clean=clean,
    )
    return cfg, bpe, ""


def export_openclip(out_dir: Path, source: OpenClipSource) -> list[str]:
    """Export the image tower (and the text tower where its tokenizer allows) into ``out_dir``."""
    import torch

    loaded, _, tokenizer = load_openclip_torch(source)
    model: Any = loaded

    class ImageTower(torch.nn.Module):
        clip: Any

        def __init__(self, clip: torch.nn.Module) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.clip.encode_image(pixels)
            return out

    class TextTower(torch.nn.Module):
        clip: Any

        def __init__(self, clip: torch.nn.Module) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.clip.encode_text(tokens)
            return out

    pcfg = dict(model.visual.preprocess_cfg)
    size = pcfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    pixels = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        dim = int(model.encode_image(pixels[:1]).shape[-1])
    preprocess = preprocess_from_open_clip(pcfg, dim, "pixels", "embedding")
    export_torch_module(ImageTower(model), pixels, out_dir / IMAGE_MODEL_FILE, "pixels", "embedding")
    preprocess.write(out_dir)
    files = [IMAGE_MODEL_FILE, PREPROCESS_FILE]

    text_cfg, vocab, reason = _text_support(source, tokenizer)
    if text_cfg is None or vocab is None:
        unsupported = json.dumps({"reason": reason}) + "\n"
        (out_dir / TEXT_UNSUPPORTED_FILE).write_text(unsupported, encoding="utf-8")
        return [*files, TEXT_UNSUPPORTED_FILE]
    tokens = tokenizer(["a photo of a product", "x"])
    with torch.inference_mode():
        text_dim = int(model.encode_text(tokens).shape[-1])
    export_torch_module(
        TextTower(model), tokens, out_dir / TEXT_MODEL_FILE, text_cfg.input_name, text_cfg.output_name
    )
    shutil.copyfile(vocab, out_dir / VOCAB_FILE)
    text_cfg = text_cfg.model_copy(update={"dim": text_dim})
    (out_dir / TOKENIZER_FILE).write_text(text_cfg.to_json(), encoding="utf-8")
    return [*files, TEXT_MODEL_FILE, TOKENIZER_FILE, VOCAB_FILE]


def ensure_openclip(models_dir: Path, source: OpenClipSource) -> tuple[Path, bool]:
    """``models_dir/openclip/<arch>-<weights>`` matching ``source``; returns it and whether it was
    (re)exported now."""
    model_dir = models_dir / OPENCLIP_DIR / source.dir_name()

    def fingerprint(digests: SourceDigests) -> Mapping[str, Any]:
        require_packages("torch", "open_clip_torch")  # else a serving install: the export as it is
        return source.fingerprint(digests)

    exported = ensure_exported(model_dir, fingerprint, lambda tmp: export_openclip(tmp, source))
    return model_dir, exported


def text_unsupported_reason(model_dir: Path) -> str | None:
    path = model_dir / TEXT_UNSUPPORTED_FILE
    if not path.is_file():
        return None
    reason: str = json.loads(path.read_text(encoding="utf-8")).get("reason", "unknown")
    return reason
