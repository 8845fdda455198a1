"""The registry: names from the settings to ready embedders, without torch on the serving path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from embeddings.ocr import RapidOcrReader
from embeddings.onnx_embedder import OnnxEmbedder
from embeddings.registry import IMAGE_BACKENDS, build_image_embedder, build_text_embedder, build_text_reader
from embeddings.text_embedder import OnnxTextEmbedder
from service.domain.ports import ImageEmbedder, TextEmbedder, TextReader
from service.settings import IMAGE_MODEL_NAMES, ModelSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_documented_backend_is_registered() -> None:
    assert set(IMAGE_BACKENDS) == {"sscd", "sscd_distilled", "effnet", "effnet_int8", "openclip"}
    # The settings refuse any name outside their own list: it must be the registry's.
    assert sorted(IMAGE_MODEL_NAMES) == sorted(IMAGE_BACKENDS)


def test_unknown_names_list_the_known_ones(models_dir: Path, model_settings: ModelSettings) -> None:
    with pytest.raises(ValueError, match=r"unknown image embedder 'clip'.*'effnet'"):
        build_image_embedder("clip", models_dir, model_settings)


def test_embedders_implement_the_domain_ports(
    sscd: OnnxEmbedder, effnet: OnnxEmbedder, tiny_clip: OnnxEmbedder, tiny_clip_text: OnnxTextEmbedder
) -> None:
    for embedder in (sscd, effnet, tiny_clip):
        assert isinstance(embedder, ImageEmbedder)
    assert isinstance(tiny_clip_text, TextEmbedder)


def test_the_ocr_reader_is_built_without_loading_its_models() -> None:
    reader = build_text_reader(ModelSettings(ocr_max_lines=3, ocr_detect_side=320))
    assert isinstance(reader, RapidOcrReader)
    assert not reader.loaded
    assert (reader.max_lines, reader.detect_side, reader.threads) == (3, 320, 1)  # one ONNX Runtime thread
    reader_port: TextReader = reader  # structurally a TextReader (the Protocol is not runtime-checkable)
    assert callable(reader_port.read)


def test_a_model_without_a_text_tower_is_reported(
    tiny_clip: OnnxEmbedder, models_dir: Path, tiny_clip_settings: ModelSettings
) -> None:
    folder = tiny_clip.model_path.parent
    marker = folder / "text_unsupported.json"
    marker.write_text(json.dumps({"reason": "tokenizer HFTokenizer is not CLIP's BPE tokenizer"}))
    try:
        with pytest.raises(ValueError, match="no torch-free text tower: tokenizer HFTokenizer"):
            build_text_embedder(models_dir, tiny_clip_settings)
    finally:
        marker.unlink()


@pytest.mark.slow
def test_serving_already_exported_models_never_imports_torch(
    sscd: OnnxEmbedder,
    effnet: OnnxEmbedder,
    tiny_clip: OnnxEmbedder,
    tiny_clip_text: OnnxTextEmbedder,
    models_dir: Path,
    tiny_clip_settings: ModelSettings,
    grocery_dir: Path,
) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import numpy as np
        from PIL import Image
        from embeddings.registry import build_image_embedder, build_text_embedder
        from service.settings import ModelSettings

        models = Path({str(models_dir)!r})
        clip = ModelSettings.model_validate_json({tiny_clip_settings.model_dump_json()!r})
        photo = np.asarray(Image.open({str(grocery_dir / "catalogue" / "Avocado.jpg")!r}).convert("RGB"))
        ids = []
        for name in ("sscd", "effnet"):
            e = build_image_embedder(name, models, ModelSettings(intra_op_threads=1))
            assert e.embed([photo]).shape == (1, e.dim)
            ids.append(e.model_id)
        image = build_image_embedder("openclip", models, clip)
        text = build_text_embedder(models, clip)
        assert text.embed_text(["avocado"]).shape == (1, 64)
        ids += [image.model_id, text.model_id]
        print(" ".join(ids))
        print("torch loaded:", "torch" in sys.modules, "open_clip loaded:", "open_clip" in sys.modules)
        """
    )
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    ids, loaded = done.stdout.strip().splitlines()
    # Same models as the exporting process: nothing was exported again.
    assert ids.split() == [sscd.model_id, effnet.model_id, tiny_clip.model_id, tiny_clip_text.model_id]
    assert loaded == "torch loaded: False open_clip loaded: False"
