"""Currency conversion, the robust market statistic and the price signal."""

from __future__ import annotations

import itertools
import math

import pytest

from service.domain.model import Money, SignalName
from service.domain.pricing import (
    CurrencyTable,
    MarketSample,
    PriceThresholds,
    UnknownCurrencyError,
    market_stats,
    price_signal,
)

RATES = CurrencyTable({"USD": 1.0, "EUR": 0.92, "JPY": 150.0, "cny": 7.2})


def usd(x: float) -> Money:
    return Money(x, "USD")


# --- currencies --------------------------------------------------------------------------------------

def test_conversion_goes_through_usd_both_ways() -> None:
    assert RATES.to_usd(Money(92.0, "EUR")) == pytest.approx(100.0)
    assert RATES.convert(Money(100.0, "USD"), "jpy") == Money(pytest.approx(15000.0), "JPY")  # type: ignore[arg-type]
    eur_in_jpy = RATES.convert(Money(9.2, "EUR"), "JPY")
    assert eur_in_jpy.amount == pytest.approx(1500.0) and eur_in_jpy.currency == "JPY"
    assert RATES.to_usd(Money(72.0, "CNY")) == pytest.approx(10.0)  # codes are upper-cased
    assert "eur" in RATES and "XYZ" not in RATES


def test_usd_is_implicit_and_must_be_one() -> None:
    assert CurrencyTable({"EUR": 0.9}).rate("USD") == 1.0
    with pytest.raises(ValueError, match=r"currency_rates\[USD\] must be 1"):
        CurrencyTable({"USD": 2.0})


@pytest.mark.parametrize(("rates", "message"), [
    ({"EUR": 0.0}, r"currency_rates\[EUR\] must be a positive number"),
    ({"EUR": -1.0}, r"currency_rates\[EUR\]"),
    ({"EUR": math.inf}, r"currency_rates\[EUR\]"),
    ({"EURO": 1.0}, "not an ISO 4217 code"),
])
def test_bad_rates_are_rejected(rates: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CurrencyTable(rates)


def test_unknown_currency_is_a_clear_error_naming_the_field() -> None:
    expected = r"price\.currency: unknown currency 'XYZ' \(known: CNY, EUR, JPY, USD\)"
    with pytest.raises(UnknownCurrencyError, match=expected):
        RATES.to_usd(Money(1.0, "XYZ"))
    with pytest.raises(UnknownCurrencyError, match=r"reference_price\.currency"):
        price_signal(usd(10), Money(1.0, "XYZ"), [], RATES)
    assert issubclass(UnknownCurrencyError, ValueError)


@pytest.mark.parametrize("amount", [-1.0, math.nan, math.inf])
def test_bad_amounts_are_rejected_naming_the_field(amount: float) -> None:
    with pytest.raises(ValueError, match=r"price\.amount must be a finite number >= 0"):
        price_signal(Money(amount, "USD"), usd(100), [], RATES)


# --- market statistic --------------------------------------------------------------------------------

MARKET = [usd(x) for x in (95, 100, 105, 98, 102, 110, 90, 100, 97, 103)]


def test_market_median_ignores_outliers() -> None:
    polluted = [*MARKET, usd(1.0), usd(99_999.0), usd(0.5)]
    stats = market_stats(polluted, RATES)
    clean = market_stats(MARKET, RATES)
    assert stats is not None and clean is not None
    assert stats.outliers == 3 and stats.count == 10
    assert stats.median_usd == pytest.approx(clean.median_usd)
    assert stats.median_usd == pytest.approx(100.0, rel=0.02)
    # Spread of log prices of a ±10 % market, floored at 0.1.
    assert 0.1 <= stats.log_scale < 0.2


def test_market_mixes_currencies_and_skips_unknown_or_empty_prices() -> None:
    prices = [usd(100), Money(92.0, "EUR"), Money(15000.0, "JPY"), usd(101), Money(720.0, "CNY"),
              Money(100.0, "XYZ"), usd(0.0)]
    stats = market_stats(prices, RATES)
    assert stats is not None
    assert stats.count == 5 and stats.skipped == 2
    assert stats.median_usd == pytest.approx(100.0)


def test_market_needs_a_minimum_count() -> None:
    assert market_stats(MARKET[:4], RATES) is None
    assert market_stats(MARKET[:4], RATES, min_count=4) is not None
    # Enough prices, but too few left once the outliers are gone.
    assert market_stats([usd(100), usd(100), usd(100), usd(1), usd(10_000)], RATES, min_count=4) is None
    with pytest.raises(ValueError, match="min_count"):
        market_stats(MARKET, RATES, min_count=0)


def test_identical_market_prices_use_the_floored_spread() -> None:
    stats = market_stats([usd(100)] * 6 + [usd(96)], RATES)
    assert stats is not None
    assert stats.log_mad == 0.0 and stats.log_scale == pytest.approx(0.1)
    assert stats.count == 7  # 4 % away is not an outlier in a market with zero spread
    assert stats.robust_z(95.0) == pytest.approx(math.log(0.95) / 0.1)


# --- price signal ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("price", "score"), [
    (150.0, 0.0), (100.0, 0.0), (70.0, 0.0), (50.0, 0.5), (30.0, 1.0), (10.0, 1.0),
])
def test_reference_ratio_ramp(price: float, score: float) -> None:
    sig = price_signal(usd(price), usd(100), [], RATES)
    assert sig.name is SignalName.PRICE and sig.ran
    assert sig.score == pytest.approx(score)
    assert sig.evidence["ratio"] == pytest.approx(price / 100)


def test_reason_names_the_numbers_in_their_currencies() -> None:
    sig = price_signal(usd(30), usd(100), [], RATES)
    assert sig.reasons == ["price 30.00 USD is 30% of the reference price 100.00 USD"]
    assert sig.evidence["price"] == "30.00 USD" and sig.evidence["reference_price"] == "100.00 USD"
    eur = price_signal(Money(27.6, "EUR"), usd(100), [], RATES)
    assert eur.score == pytest.approx(1.0)
    assert eur.reasons == ["price 27.60 EUR is 30% of the reference price 100.00 USD"]


def test_market_only_signal() -> None:
    sig = price_signal(usd(40), None, MARKET, RATES)
    assert sig.ran and sig.score == pytest.approx(1.0)
    assert sig.evidence["market_count"] == 10 and sig.evidence["robust_z"] < -5
    assert sig.reasons[0].startswith("price 40.00 USD is ")
    assert sig.reasons[0].endswith("below the market median 100.00 USD (10 other listings)")
    normal = price_signal(usd(97), None, MARKET, RATES)
    assert normal.score == 0.0 and normal.reasons == []


def test_market_median_is_shown_in_the_listing_currency() -> None:
    sig = price_signal(Money(36.8, "EUR"), None, MARKET, RATES)
    assert sig.evidence["market_median"] == "92.00 EUR"


def test_score_is_the_stronger_of_reference_and_market() -> None:
    # The market is flooded with cheap copies (median 35): the reference price still tells.
    cheap_market = [usd(x) for x in (33, 35, 36, 34, 35, 37)]
    sig = price_signal(usd(35), usd(100), cheap_market, RATES)
    assert sig.evidence["market_score"] == 0.0 and sig.evidence["reference_score"] > 0.9
    assert sig.score == pytest.approx(sig.evidence["reference_score"], abs=1e-4)
    # No reference anomaly (price at 90 %), but far below a market of 300 (reference out of date).
    sig = price_signal(usd(90), usd(100), [usd(x) for x in (300, 310, 290, 305, 295)], RATES)
    assert sig.evidence["reference_score"] == 0.0 and sig.score == pytest.approx(1.0)


def test_no_price_or_no_baseline_means_unknown_not_suspicious() -> None:
    for sig in (price_signal(None, usd(100), MARKET, RATES), price_signal(usd(0), usd(100), [], RATES)):
        assert not sig.ran and sig.score == 0.0 and "no positive price" in (sig.skipped_because or "")
    sig = price_signal(usd(5), None, MARKET[:3], RATES)
    assert not sig.ran and sig.score == 0.0
    assert sig.skipped_because == "no reference price and fewer than 5 market prices to compare with"


def test_score_falls_monotonically_as_price_rises() -> None:
    scores = [price_signal(usd(p), usd(100), MARKET, RATES).score for p in range(5, 160, 5)]
    assert all(a >= b for a, b in itertools.pairwise(scores))
    assert scores[0] == 1.0 and scores[-1] == 0.0


def test_thresholds_validate() -> None:
    with pytest.raises(ValueError, match="ratio_certain < ratio_start"):
        PriceThresholds(ratio_start=0.3, ratio_certain=0.7)
    with pytest.raises(ValueError, match="z_certain < z_start"):
        PriceThresholds(z_start=-5.0, z_certain=-2.0)
    with pytest.raises(ValueError, match="min_market_count"):
        PriceThresholds(min_market_count=0)


def test_a_market_sample_leaves_each_listing_its_others() -> None:
    usd = CurrencyTable({"USD": 1.0})
    prices = [Money(p, "USD") for p in (10.0, 11.0, 12.0, 11.0, 30.0)]
    full = MarketSample(prices, ["a", "b", "c", "d", "e"])
    # Its own price left out; a listing not in the sample sees the first ``limit``.
    assert sorted(m.amount for m in full.others("c", 10)) == [10.0, 11.0, 11.0, 30.0]
    assert list(full.others("zz", 3)) == prices[:3]
    # ``limit`` others: a listing among the first limit + 1 is replaced by the next price.
    assert sorted(m.amount for m in full.others("a", 3)) == [11.0, 11.0, 12.0]
    assert list(full.others("e", 3)) == prices[:3]  # beyond the first limit + 1: not in its others
    # Equal prices give one answer (and one set of statistics), whichever listing asks.
    assert full.others("b", 10) is full.others("d", 10)
    assert full.others("b", 10).stats(usd, min_count=3) == MarketSample(prices[:1] + prices[2:]).stats(
        usd, min_count=3)
    with pytest.raises(ValueError, match="listing ids"):
        MarketSample(prices, ["a"])
    with pytest.raises(ValueError, match="limit"):
        full.others("a", -1)
