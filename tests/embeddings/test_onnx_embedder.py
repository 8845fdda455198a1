"""OnnxEmbedder on the real exported models: providers, batching, normalisation, identity, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from embeddings.onnx_embedder import (
    CPU_EP,
    CUDA_EP,
    OnnxEmbedder,
    ProviderUnavailableError,
    make_session_options,
    select_providers,
)
from embeddings.preprocess import PreprocessConfig, PreprocessError
from tests.embeddings.conftest import Photo

BACKENDS = ["sscd", "effnet", "tiny_clip"]


@pytest.fixture(params=BACKENDS)
def embedder(request: pytest.FixtureRequest) -> OnnxEmbedder:
    emb: OnnxEmbedder = request.getfixturevalue(request.param)
    return emb


def test_cpu_is_always_available() -> None:
    assert select_providers("cpu") == [CPU_EP]


def test_cuda_is_used_when_asked_for_and_refused_clearly_when_absent() -> None:
    if CUDA_EP in ort.get_available_providers():
        assert select_providers("cuda") == [CUDA_EP, CPU_EP]
        assert select_providers("auto") == [CUDA_EP, CPU_EP]
    else:
        with pytest.raises(ProviderUnavailableError, match=r"provider is 'cuda'.*onnxruntime-gpu"):
            select_providers("cuda")
        assert select_providers("auto") == [CPU_EP]


def test_the_cuda_libraries_of_the_pip_packages_are_preloaded_once(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # What onnxruntime.preload_dlls does with real libraries was checked on a GPU (docs/performance.md,
    # "On a GPU"); here: called once a process, before the first CUDA session, and never fatal.
    import embeddings.onnx_embedder as module

    calls: list[dict[str, bool]] = []

    def preload(**kwargs: bool) -> None:
        calls.append(kwargs)
        raise OSError("libcublasLt.so.13: cannot open shared object file")

    monkeypatch.setattr(ort, "preload_dlls", preload, raising=False)
    monkeypatch.setattr(module, "_cuda_libraries_loaded", False)
    with caplog.at_level("WARNING", logger=module.__name__):
        module.load_cuda_libraries()
        module.load_cuda_libraries()
    assert calls == [{"cuda": True, "cudnn": True, "msvc": False}]
    assert "could not preload the CUDA libraries" in caplog.text
    # An onnxruntime without preload_dlls (before 1.21) is left to find system libraries.
    monkeypatch.delattr(ort, "preload_dlls")
    monkeypatch.setattr(module, "_cuda_libraries_loaded", False)
    module.load_cuda_libraries()
    assert len(calls) == 1


def test_unknown_provider_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="'cpu', 'cuda' or 'auto'"):
        select_providers("tpu")


def test_session_options_use_full_optimisation_and_the_thread_setting() -> None:
    options = make_session_options(intra_op_threads=1)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == 1
    with pytest.raises(ValueError, match="intra_op_threads"):
        make_session_options(intra_op_threads=-1)


def test_the_provider_actually_running_is_reported(embedder: OnnxEmbedder) -> None:
    assert embedder.provider == "cpu"


def test_output_is_l2_normalised_float32_rows(embedder: OnnxEmbedder, photos: list[Photo]) -> None:
    vectors = embedder.embed([p.pixels for p in photos[:3]])
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, embedder.dim)
    assert vectors.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, embedder.dim)


def test_a_batch_of_16_equals_16_single_calls(embedder: OnnxEmbedder, photos: list[Photo]) -> None:
    images = [p.pixels for p in photos]
    assert len(images) == 16
    batched = embedder.embed(images)
    singles = np.concatenate([embedder.embed([img]) for img in images])
    np.testing.assert_allclose(batched, singles, atol=2e-5)
    # Different photos really give different rows (the rows are not all the same vector).
    assert len({tuple(np.round(row, 4)) for row in batched}) == 16


def test_model_id_names_the_model_and_a_short_content_hash(embedder: OnnxEmbedder) -> None:
    assert re.fullmatch(rf"{embedder.name}@[0-9a-f]{{12}}", embedder.model_id)


def test_model_id_changes_with_the_preprocessing(effnet: OnnxEmbedder) -> None:
    other = effnet.config.model_copy(update={"interpolation": "bilinear"})
    twin = OnnxEmbedder("effnet", effnet.model_path, other)
    same = OnnxEmbedder("effnet", effnet.model_path, effnet.config)
    assert same.model_id == effnet.model_id
    assert twin.model_id != effnet.model_id


def test_requests_larger_than_max_batch_are_split(effnet: OnnxEmbedder, photos: list[Photo]) -> None:
    small = OnnxEmbedder("effnet", effnet.model_path, effnet.config, max_batch=3)
    images = [p.pixels for p in photos[:7]]
    np.testing.assert_allclose(small.embed(images), effnet.embed(images), atol=2e-5)


def test_a_model_with_a_fixed_batch_of_one_is_fed_one_image_at_a_time(
    tiny_clip: OnnxEmbedder, photos: list[Photo], tmp_path: Path
) -> None:
    model = onnx.load(str(tiny_clip.model_path))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    fixed_path = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed_path))
    fixed = OnnxEmbedder("openclip", fixed_path, tiny_clip.config, max_batch=16)
    assert fixed.fixed_batch == 1
    images = [p.pixels for p in photos[:5]]
    np.testing.assert_allclose(fixed.embed(images), tiny_clip.embed(images), atol=2e-5)


def test_a_config_that_does_not_fit_the_graph_is_refused(effnet: OnnxEmbedder) -> None:
    cfg = effnet.config
    with pytest.raises(ValueError, match="output has 1280 dimensions, config says 512"):
        OnnxEmbedder("effnet", effnet.model_path, cfg.model_copy(update={"dim": 512}))
    with pytest.raises(ValueError, match="input 'image' not in model inputs"):
        OnnxEmbedder("effnet", effnet.model_path, cfg.model_copy(update={"input_name": "image"}))
    wrong_size = PreprocessConfig(**{**cfg.model_dump(), "size": (256, 256), "resize_shortest": 256})
    with pytest.raises(ValueError, match="input axis 2 is 224 in the model, 256 in the config"):
        OnnxEmbedder("effnet", effnet.model_path, wrong_size)


def test_a_missing_model_file_is_reported(effnet: OnnxEmbedder, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        OnnxEmbedder("effnet", tmp_path / "absent.onnx", effnet.config)


def test_bad_input_gives_a_clear_error(embedder: OnnxEmbedder, photos: list[Photo]) -> None:
    good = photos[0].pixels
    with pytest.raises(PreprocessError, match=r"images\[1\]: expected dtype uint8"):
        embedder.embed([good, good.astype(np.float32)])
    with pytest.raises(PreprocessError, match=r"images\[0\]: expected shape \(H, W, 3\)"):
        embedder.embed([good[:, :, 0]])
    with pytest.raises(PreprocessError, match="expected a sequence of RGB arrays, got str"):
        embedder.embed("photo.jpg")  # type: ignore[arg-type]
