"""The seller signal: authorized, confirmed counterfeits, anomalous selling; unknown is no penalty."""

from __future__ import annotations

import itertools

import pytest

from service.domain.model import SellerInfo, SignalName
from service.domain.seller import SellerThresholds, seller_signal, seller_status
from tests.domain.builders import ordinary_seller

AUTHORIZED = frozenset({"acme-store", "big-retail"})


def test_no_seller_is_not_run() -> None:
    sig = seller_signal(None, "acme", AUTHORIZED)
    assert sig.name is SignalName.SELLER and not sig.ran and sig.score == 0.0


def test_unknown_fields_are_no_penalty() -> None:
    sig = seller_signal(SellerInfo("s-1"), "acme")
    assert sig.ran and sig.score == 0.0 and sig.reasons == []
    assert sig.evidence["authorized"] is None and sig.evidence["account_age_days"] is None


def test_ordinary_seller_of_a_brand_without_a_list_scores_nothing() -> None:
    sig = seller_signal(ordinary_seller(), "acme", frozenset(), 0)
    assert sig.score == 0.0 and sig.evidence["authorized"] is None


def test_authorized_seller_scores_nothing_and_says_so() -> None:
    sig = seller_signal(ordinary_seller("acme-store"), "acme", AUTHORIZED)
    assert sig.score == 0.0
    assert sig.evidence["authorized"] is True
    assert sig.reasons == ["seller acme-store is an authorized seller of acme"]
    assert seller_status(ordinary_seller("acme-store"), AUTHORIZED) is True


def test_seller_missing_from_the_list_scores_a_little() -> None:
    sig = seller_signal(ordinary_seller(), "acme", AUTHORIZED)
    assert sig.evidence["authorized"] is False
    assert sig.score == pytest.approx(SellerThresholds().unlisted)
    assert sig.reasons == ["seller shop-7 is not an authorized seller of acme"]
    assert seller_status(None, AUTHORIZED) is None and seller_status(ordinary_seller(), set()) is None


def test_confirmed_counterfeits_raise_the_score_monotonically() -> None:
    scores = [seller_signal(ordinary_seller(), "acme", None, n).score for n in range(6)]
    assert scores[0] == 0.0
    assert scores[1] == pytest.approx(0.6) and scores[3] == pytest.approx(1 - 0.4**3)
    assert all(a < b for a, b in itertools.pairwise(scores))
    reasons = seller_signal(ordinary_seller(), "acme", None, 3).reasons
    assert reasons == ["seller shop-7 has 3 confirmed counterfeits"]


def test_new_account_with_large_volume_is_anomalous() -> None:
    sig = seller_signal(SellerInfo("s-new", account_age_days=5, units_sold_30d=500, stock=10), "acme")
    assert sig.score > 0.9
    assert sig.reasons == ["seller s-new's account is 5 days old and sold 500 units in 30 days"]
    stock = seller_signal(SellerInfo("s-new", account_age_days=2, stock=2000), "acme")
    assert stock.score > 0.9 and "holds 2000 in stock" in stock.reasons[0]


def test_old_account_with_large_volume_is_not() -> None:
    assert seller_signal(SellerInfo("s-old", account_age_days=400, units_sold_30d=5000), "acme").score == 0.0
    # Volume without an age is unknown, not anomalous.
    assert seller_signal(SellerInfo("s", units_sold_30d=5000, stock=9000), "acme").score == 0.0


def test_new_account_alone_scores_little() -> None:
    sig = seller_signal(SellerInfo("s-new", account_age_days=0, units_sold_30d=0), "acme")
    assert sig.score == pytest.approx(SellerThresholds().new_account_alone)
    assert sig.reasons == ["seller s-new's account is 0 days old"]


@pytest.mark.parametrize("field", ["account_age_days", "units_sold_30d", "stock"])
def test_risk_rises_monotonically_with_each_anomaly(field: str) -> None:
    base = {"account_age_days": 10, "units_sold_30d": 50, "stock": 50}

    def score(value: int) -> float:
        info = SellerInfo("s", **{**base, field: value})
        return seller_signal(info, "acme").score

    values = range(0, 1000, 7)
    scores = [score(v) for v in values]
    pairs = list(itertools.pairwise(scores))
    if field == "account_age_days":  # older is less suspicious
        assert all(a >= b for a, b in pairs) and scores[0] > scores[-1] == 0.0
    else:
        assert all(a <= b for a, b in pairs) and scores[-1] > scores[0]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"account_age_days": -1}, "seller.account_age_days"),
    ({"units_sold_30d": -5}, "seller.units_sold_30d"),
    ({"stock": -1}, "seller.stock"),
])
def test_bad_counts_are_rejected_naming_the_field(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        seller_signal(SellerInfo("s", **kwargs), "acme")


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="confirmed_counterfeits"):
        seller_signal(ordinary_seller(), "acme", None, -1)
    with pytest.raises(ValueError, match="seller_id"):
        seller_signal(SellerInfo(""), "acme")
    with pytest.raises(ValueError, match="unlisted"):
        SellerThresholds(unlisted=2.0)
    with pytest.raises(ValueError, match=r"0 <= \*_start < \*_certain"):
        SellerThresholds(volume_start=100, volume_certain=10)
