"""Visual signals: similarity ramps, best match as evidence, reasons a reviewer can check."""

from __future__ import annotations

import itertools

import pytest

from service.domain.model import ReferenceKind, SignalName
from service.domain.visual import (
    KEYPOINT_HALF,
    SimilarityRamp,
    VisualThresholds,
    keypoint_inliers,
    keypoint_similarity,
    visual_signal,
)
from service.settings import ScoringSettings
from tests.domain.builders import copy_of, match


def test_defaults_follow_the_settings_defaults() -> None:
    s = ScoringSettings()
    th = VisualThresholds()
    assert (th.copy.floor, th.copy.certain) == (s.copy_floor, s.copy_certain)
    assert (th.lookalike.floor, th.lookalike.certain) == (s.lookalike_floor, s.lookalike_certain)
    assert (th.logo.floor, th.logo.certain) == (s.logo_floor, s.logo_certain)
    assert (th.keypoints.floor, th.keypoints.certain) == (s.keypoints_floor, s.keypoints_certain)


def test_keypoint_similarity_maps_inliers_onto_the_unit_interval_and_back() -> None:
    assert keypoint_similarity(0) == 0.0
    assert keypoint_similarity(KEYPOINT_HALF) == 0.5
    sims = [keypoint_similarity(n) for n in range(0, 500, 7)]
    assert sims == sorted(sims) and sims[-1] < 1.0
    assert all(keypoint_inliers(keypoint_similarity(n)) == n for n in range(0, 300))
    with pytest.raises(ValueError, match="inliers"):
        keypoint_similarity(-1)
    # The default ramp starts at 10 inliers and is certain at 20.
    th = VisualThresholds()
    assert th.keypoints.score(keypoint_similarity(9)) == 0.0 < th.keypoints.score(keypoint_similarity(10))
    assert th.keypoints.score(keypoint_similarity(20)) == 1.0 > th.keypoints.score(keypoint_similarity(19))


def test_keypoint_reasons_name_the_reference_kind_the_box_and_the_inliers() -> None:
    product = match(SignalName.KEYPOINTS, keypoint_similarity(40), box=(5, 6, 70, 90), ref_id="r-3")
    sig = visual_signal(SignalName.KEYPOINTS, [product], VisualThresholds())
    assert sig.score == 1.0
    assert sig.reasons == ["photo 1 shows acme's official photo SKU-1 (ref r-3) at [5, 6, 70, 90]: 40 keypoints "
                           "agree on one geometric transform, similarity 0.67"]
    logo = match(SignalName.KEYPOINTS, keypoint_similarity(15), kind=ReferenceKind.LOGO, sku=None, price=None,
                 ref_id="L-1", title="acme mark")
    assert visual_signal(SignalName.KEYPOINTS, [logo], VisualThresholds()).reasons == [
        "photo 1 shows acme's logo acme mark (ref L-1): 15 keypoints agree on one geometric transform, "
        "similarity 0.43"]


def test_ramp_is_zero_at_the_floor_one_when_certain_and_monotone() -> None:
    ramp = SimilarityRamp(0.35, 0.75)
    assert ramp.score(0.0) == 0.0 and ramp.score(0.35) == 0.0
    assert ramp.score(0.55) == pytest.approx(0.5)
    assert ramp.score(0.75) == 1.0 and ramp.score(1.0) == 1.0
    scores = [ramp.score(x / 100) for x in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(scores))
    with pytest.raises(ValueError, match="floor < certain"):
        SimilarityRamp(0.8, 0.5)


def test_copy_signal_takes_the_best_match_as_evidence() -> None:
    matches = [
        copy_of(0.5, image_index=0),
        copy_of(0.91, image_index=1, sku="SKU-2", ref_id="r-13", image_id=13),
        copy_of(0.99, brand="beta", image_index=2),
        match(SignalName.LOOKALIKE, 0.99, image_index=0),
    ]
    sig = visual_signal(SignalName.COPY, matches, VisualThresholds(), brand="acme")
    assert sig.name is SignalName.COPY and sig.ran
    assert sig.score == 1.0
    assert sig.reasons == ["photo 2 is a copy of acme's official photo SKU-2 (ref r-13), similarity 0.91"]
    assert sig.evidence["best"] == {
        "brand": "acme", "sku": "SKU-2", "ref_id": "r-13", "kind": "product", "signal": "copy",
        "similarity": 0.91, "image_index": 1,
    }
    assert sig.evidence["matches"] == 2 and sig.evidence["images"] == [0, 1]
    # Without a brand, every brand's matches count.
    assert visual_signal(SignalName.COPY, matches, VisualThresholds()).evidence["best"]["brand"] == "beta"


def test_below_the_floor_is_no_evidence() -> None:
    sig = visual_signal(SignalName.COPY, [copy_of(0.2)], VisualThresholds())
    assert sig.score == 0.0 and sig.reasons == [] and sig.evidence["best"]["similarity"] == 0.2
    empty = visual_signal(SignalName.LOGO, [], VisualThresholds())
    assert empty.score == 0.0 and empty.evidence["matches"] == 0 and "best" not in empty.evidence


def test_lookalike_and_logo_reasons() -> None:
    look_match = match(SignalName.LOOKALIKE, 0.8, image_index=1, ref_id="r-3")
    look = visual_signal(SignalName.LOOKALIKE, [look_match], VisualThresholds())
    assert look.reasons == ["photo 2 shows a product like acme's SKU-1 (ref r-3), similarity 0.80"]
    assert 0.0 < look.score < 1.0
    logo = visual_signal(SignalName.LOGO, [match(SignalName.LOGO, 0.81, box=(10, 20, 110, 60), ref_id="L-1",
                                                 title="acme wordmark")], VisualThresholds())
    assert logo.reasons == ["acme's logo acme wordmark (ref L-1) found in photo 1 at [10, 20, 110, 60], "
                            "similarity 0.81"]
    assert logo.evidence["best"]["box"] == [10, 20, 110, 60]


def test_reference_without_names_falls_back_to_the_image_id() -> None:
    unnamed = copy_of(0.9, sku=None, ref_id=None, image_id=77)
    sig = visual_signal(SignalName.COPY, [unnamed], VisualThresholds())
    assert sig.reasons == ["photo 1 is a copy of acme's official photo image 77, similarity 0.90"]


def test_only_visual_signals() -> None:
    with pytest.raises(ValueError, match="not a visual signal"):
        visual_signal(SignalName.PRICE, [], VisualThresholds())
