"""Candidate brands: which brand a listing presents, and how strongly."""

from __future__ import annotations

import pytest

from service.domain.candidates import BrandEvidenceWeights, candidate_brands
from service.domain.curves import noisy_or
from service.domain.model import Money, SignalName
from service.domain.textmatch import BrandMention
from service.domain.visual import VisualThresholds
from tests.domain.builders import copy_of, match


def test_strongest_brand_first() -> None:
    cands = candidate_brands([
        match(SignalName.LOOKALIKE, 0.7, brand="beta"),
        copy_of(0.95, brand="acme"),
        match(SignalName.COPY, 0.1, brand="gamma"),  # below the floor: no evidence
    ])
    assert [c.brand for c in cands] == ["acme", "beta"]
    assert cands[0].evidence == pytest.approx(1.0) and cands[0].copy == 1.0
    assert 0.0 < cands[1].evidence < 0.8 and cands[1].lookalike > 0.0


def test_text_mentions_make_candidates_weighted_by_place() -> None:
    cands = candidate_brands([], [BrandMention("acme", "Acme", "description"),
                                  BrandMention("beta", "Beta", "title"),
                                  BrandMention("gamma", "GAMMA", "photo 2")])
    w = BrandEvidenceWeights()
    got = {c.brand: c.evidence for c in cands}
    assert got == {"acme": w.mention_description, "beta": w.mention_title, "gamma": w.mention_photo}
    assert cands[-1].brand == "acme" and cands[-1].product_match is None and cands[-1].sku is None


def test_more_evidence_is_stronger() -> None:
    look = match(SignalName.LOOKALIKE, 0.75)
    logo = match(SignalName.LOGO, 0.6)
    mention = BrandMention("acme", "Acme", "title")
    one = candidate_brands([look])[0].evidence
    two = candidate_brands([look, logo])[0].evidence
    three = candidate_brands([look, logo], [mention])[0].evidence
    assert 0.0 < one < two < three < 1.0


def test_product_and_reference_price_come_from_the_best_product_match() -> None:
    cands = candidate_brands([
        match(SignalName.LOOKALIKE, 0.99, sku="SKU-L", price=Money(50.0, "USD")),
        copy_of(0.95, sku="SKU-C", price=Money(120.0, "EUR")),
        match(SignalName.LOGO, 0.99),
    ])
    assert cands[0].sku == "SKU-C"  # a certain copy beats a certain lookalike
    assert cands[0].reference_price == Money(120.0, "EUR")
    weaker_copy = candidate_brands([match(SignalName.LOOKALIKE, 0.85, sku="SKU-L"),
                                    copy_of(0.5, sku="SKU-C")])
    assert weaker_copy[0].sku == "SKU-L"
    logo_only = candidate_brands([match(SignalName.LOGO, 0.99)])
    assert logo_only[0].product_match is None and logo_only[0].logo == 1.0


def test_thresholds_and_weights_are_used() -> None:
    strict = VisualThresholds()
    assert candidate_brands([copy_of(0.5)], thresholds=strict)[0].copy < 1.0
    assert candidate_brands([copy_of(0.5)], weights=BrandEvidenceWeights(copy=0.0)) == []


def test_only_visual_matches_are_accepted() -> None:
    with pytest.raises(ValueError, match="'copy', 'lookalike', 'logo', 'keypoints'"):
        candidate_brands([match(SignalName.TEXT, 0.9)])
    with pytest.raises(ValueError, match="mention_title"):
        BrandEvidenceWeights(mention_title=1.2)


def test_one_product_per_photo_keeps_each_photos_best_product_and_every_logo() -> None:
    from service.domain.candidates import one_product_per_photo
    from service.domain.model import Match, ReferenceInfo, ReferenceKind, SignalName

    def m(brand: str, signal: SignalName, sim: float, photo: int) -> Match:
        kind = ReferenceKind.LOGO if signal is SignalName.LOGO else ReferenceKind.PRODUCT
        return Match(ReferenceInfo(1, brand, kind, sku=f"{brand}-1"), signal, sim, photo)

    ms = [m("garant", SignalName.COPY, 0.9, 0), m("arla", SignalName.COPY, 0.5, 0),
          m("arla", SignalName.COPY, 0.6, 1), m("arla", SignalName.LOOKALIKE, 0.7, 0),
          m("nike", SignalName.LOGO, 0.4, 0), m("puma", SignalName.LOGO, 0.35, 0)]
    kept = one_product_per_photo(ms)
    assert [(k.reference.brand, k.signal.value, k.image_index) for k in kept] == [
        ("garant", "copy", 0), ("arla", "copy", 1), ("arla", "lookalike", 0), ("nike", "logo", 0),
        ("puma", "logo", 0)]
    assert len(one_product_per_photo(ms, margin=0.5)) == len(ms)


def test_a_keypoint_match_to_a_product_is_brand_evidence_and_tells_the_product() -> None:
    from service.domain.visual import keypoint_similarity

    verified = match(SignalName.KEYPOINTS, keypoint_similarity(60), sku="SKU-K", price=Money(9.0, "USD"))
    weak_lookalike = match(SignalName.LOOKALIKE, 0.6, sku="SKU-L")
    cands = candidate_brands([weak_lookalike, verified])
    assert cands[0].keypoints == 1.0 and cands[0].sku == "SKU-K"
    assert cands[0].reference_price == Money(9.0, "USD")
    assert cands[0].evidence == pytest.approx(BrandEvidenceWeights().keypoints, abs=0.05)
    # Below the ramp's floor (unrelated photos reach 4-9 inliers) it is no evidence.
    assert candidate_brands([match(SignalName.KEYPOINTS, keypoint_similarity(9))]) == []


def test_one_product_per_photo_applies_to_keypoint_matches_of_products_not_of_logos() -> None:
    from service.domain.candidates import one_product_per_photo
    from service.domain.model import ReferenceKind

    garant = match(SignalName.KEYPOINTS, 0.8, brand="garant")
    arla = match(SignalName.KEYPOINTS, 0.5, brand="arla")  # a sibling design, weaker: not evidence
    logo = match(SignalName.KEYPOINTS, 0.4, brand="nike", kind=ReferenceKind.LOGO, sku=None, price=None)
    assert one_product_per_photo([garant, arla, logo]) == [garant, logo]


def test_evidence_is_the_noisy_or_of_the_weighted_components() -> None:
    """``evidence`` and ``weighted_components`` (which the reasons split the brand's share by) agree for
    every mix of signals and mentions, with weights that tell the terms apart."""
    w = BrandEvidenceWeights(copy=0.91, logo=0.83, keypoints=0.77, lookalike=0.61, mention_title=0.53,
                             mention_photo=0.47, mention_description=0.31)
    cands = candidate_brands([
        copy_of(0.5), match(SignalName.LOOKALIKE, 0.7), match(SignalName.LOGO, 0.4, image_id=20),
        match(SignalName.KEYPOINTS, 0.45, image_id=21),
        match(SignalName.LOOKALIKE, 0.6, brand="beta", image_id=30),
    ], [BrandMention("acme", "Acme", "title"), BrandMention("gamma", "Gamma", "description")], weights=w)
    assert {c.brand for c in cands} == {"acme", "beta", "gamma"}
    for c in cands:
        assert c.evidence == noisy_or(c.weighted_components(w).values())
    acme = next(c for c in cands if c.brand == "acme")
    assert min(acme.copy, acme.lookalike, acme.logo, acme.keypoints) > 0.0 and acme.mention == 0.53
