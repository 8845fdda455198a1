"""Fusion and verdict policy: the logistic model's guarantees, checked over grids of features."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from service.domain.fusion import FEATURE_NAMES, FusionFeatures, FusionWeights, fuse, sigmoid
from service.domain.model import Verdict
from service.domain.policy import VerdictPolicy
from service.settings import ScoringSettings

GRID = [i / 10 for i in range(11)]
POLICY = VerdictPolicy()


def risk(**features: float | bool) -> float:
    return fuse(FusionFeatures(**features)).risk  # type: ignore[arg-type]


def test_no_brand_evidence_is_clear_whatever_else() -> None:
    for p, t, s in itertools.product(GRID, GRID, GRID):
        assert POLICY.verdict(risk(brand=0.0, price=p, text=t, seller=s)) is Verdict.CLEAR


def test_brand_evidence_alone_is_clear() -> None:
    for b in GRID:
        assert POLICY.verdict(risk(brand=b)) is Verdict.CLEAR


def test_risk_is_monotone_in_every_anomaly_and_in_brand_evidence() -> None:
    for b, p, t, s, a in itertools.product(GRID[::2], GRID[::2], GRID[::2], GRID[::2], (False, True)):
        here = risk(brand=b, price=p, text=t, seller=s, authorized=a)
        for name in ("brand", "price", "text", "seller"):
            bumped = {"brand": b, "price": p, "text": t, "seller": s, "authorized": a}
            bumped[name] = min(1.0, bumped[name] + 0.2)  # type: ignore[operator]
            assert risk(**bumped) >= here, (name, b, p, t, s, a)
        assert risk(brand=b, price=p, text=t, seller=s, authorized=True) <= risk(
            brand=b, price=p, text=t, seller=s, authorized=False)


def test_documented_operating_points() -> None:
    assert risk(brand=1.0) == pytest.approx(0.076, abs=0.005)
    assert risk(brand=1.0, seller=0.2) == pytest.approx(0.17, abs=0.01)
    assert risk(brand=1.0, authorized=True) < 0.01
    assert risk(brand=1.0, price=1.0) > 0.95
    assert risk(brand=1.0, price=0.5) == pytest.approx(0.56, abs=0.01)
    assert risk(brand=0.7, text=0.6) == pytest.approx(0.57, abs=0.01)
    assert risk(brand=0.7, text=0.85) == pytest.approx(0.84, abs=0.01)


def test_contributions_are_shapley_shares_that_add_up_to_the_logit() -> None:
    w = FusionWeights()
    out = fuse(FusionFeatures(brand=0.8, price=0.6, text=0.3, seller=0.5, authorized=True), w)
    assert sum(out.contributions.values()) + w.bias == pytest.approx(out.logit)
    assert out.risk == pytest.approx(sigmoid(out.logit))
    assert out.contributions["price"] == pytest.approx(w.price * 0.6 + w.brand_x_price * 0.8 * 0.6 / 2)
    assert out.contributions["authorized"] == pytest.approx(w.authorized)
    assert set(out.contributions) == {"brand", "price", "text", "seller", "authorized"}


def test_weights_round_trip_as_vectors_for_calibration() -> None:
    w = FusionWeights()
    again = FusionWeights.from_vector(w.bias, list(w.vector()))
    assert again == w
    f = FusionFeatures(brand=0.5, price=0.4, text=0.2, seller=0.1, authorized=True)
    assert f.vector().shape == (len(FEATURE_NAMES),)
    # The logit is exactly bias + weights . features: what a logistic regression fits.
    assert fuse(f, w).logit == pytest.approx(w.bias + float(np.dot(w.vector(), f.vector())))
    with pytest.raises(ValueError, match="coefficients"):
        FusionWeights.from_vector(0.0, [1.0])


def test_weights_that_would_break_the_guarantees_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\['brand_x_price'\] must be >= 0"):
        FusionWeights(brand_x_price=-1.0)
    with pytest.raises(ValueError, match="authorized must be <= 0"):
        FusionWeights(authorized=1.0)
    with pytest.raises(ValueError, match="finite"):
        FusionWeights(bias=math.nan)
    with pytest.raises(ValueError, match="fusion feature price"):
        FusionFeatures(price=1.5)


def test_sigmoid_is_stable_at_the_extremes() -> None:
    assert sigmoid(1000.0) == 1.0 and sigmoid(-1000.0) == 0.0 and sigmoid(0.0) == 0.5


# --- verdict policy ----------------------------------------------------------------------------------

def test_policy_defaults_follow_the_settings() -> None:
    s = ScoringSettings()
    assert (POLICY.review_threshold, POLICY.likely_threshold) == (s.review_threshold, s.likely_threshold)


@pytest.mark.parametrize(("review", "likely"), [(0.5, 0.8), (0.2, 0.3), (0.0, 1.0), (0.6, 0.6)])
def test_verdict_thresholds_are_respected(review: float, likely: float) -> None:
    policy = VerdictPolicy(review, likely)
    for r in [i / 100 for i in range(101)] + [review, likely]:
        v = policy.verdict(r)
        expected = (Verdict.LIKELY_COUNTERFEIT if r >= likely else Verdict.REVIEW if r >= review
                    else Verdict.CLEAR)
        assert v is expected, (r, review, likely)


def test_policy_validates() -> None:
    with pytest.raises(ValueError, match="review_threshold <= likely_threshold"):
        VerdictPolicy(0.9, 0.5)
    with pytest.raises(ValueError, match="<= 1"):
        VerdictPolicy(0.5, 1.5)
    with pytest.raises(ValueError, match="finite"):
        POLICY.verdict(math.nan)
