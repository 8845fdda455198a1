"""Prices: currency conversion, a robust market statistic over other listings of the same product, and
the price signal (a listing priced far below the reference price or the market).

All comparisons happen in USD; reasons show the amounts in the currencies they were given in. Market
statistics are taken on log prices, where "half the price" and "twice the price" are equally far from
the median and a few absurd listings (1.00 or 99999.00) cannot move the median.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from service.domain.curves import ramp
from service.domain.model import Money, Signal, SignalName

# 1.4826 * MAD estimates the standard deviation of normally distributed data.
_MAD_TO_SIGMA = 1.4826


class UnknownCurrencyError(ValueError):
    """A price in a currency the rate table does not know."""

    def __init__(self, currency: str, known: Sequence[str], field: str = "currency") -> None:
        self.currency = currency
        super().__init__(f"{field}: unknown currency {currency!r} (known: {', '.join(sorted(known))})")


def check_money(money: Money, field: str = "price") -> None:
    """Raise a ValueError naming ``field`` unless the amount is finite and not negative."""
    if not isinstance(money.amount, (int, float)) or not math.isfinite(money.amount) or money.amount < 0:
        raise ValueError(f"{field}.amount must be a finite number >= 0, got {money.amount!r}")
    if not money.currency or not money.currency.isalpha():
        raise ValueError(f"{field}.currency must be an ISO 4217 code, got {money.currency!r}")


class CurrencyTable:
    """Exchange rates as units of each currency per 1 USD (as ``ScoringSettings.currency_rates``)."""

    def __init__(self, rates: Mapping[str, float]) -> None:
        table: dict[str, float] = {}
        for code, rate in rates.items():
            c = code.strip().upper()
            if not (len(c) == 3 and c.isalpha()):
                raise ValueError(f"currency_rates: {code!r} is not an ISO 4217 code")
            if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
                raise ValueError(f"currency_rates[{c}] must be a positive number, got {rate!r}")
            table[c] = float(rate)
        if abs(table.setdefault("USD", 1.0) - 1.0) > 1e-9:
            raise ValueError(f"currency_rates[USD] must be 1 (rates are units per USD), got {table['USD']}")
        self._rates = table  # never handed out mutable: see rates

    @property
    def rates(self) -> Mapping[str, float]:
        return MappingProxyType(self._rates)

    def __contains__(self, currency: object) -> bool:
        return isinstance(currency, str) and currency.upper() in self._rates

    def rate(self, currency: str, field: str = "currency") -> float:
        try:
            return self._rates[currency.upper()]
        except KeyError:
            raise UnknownCurrencyError(currency, list(self._rates), field) from None

    def to_usd(self, money: Money, field: str = "price") -> float:
        check_money(money, field)
        return money.amount / self.rate(money.currency, f"{field}.currency")

    def convert(self, money: Money, currency: str, field: str = "price") -> Money:
        """``money`` in ``currency`` (upper-cased)."""
        usd = self.to_usd(money, field)
        return Money(usd * self.rate(currency), currency.upper())

    def __repr__(self) -> str:
        return f"CurrencyTable({dict(self._rates)!r})"


def format_money(money: Money) -> str:
    return f"{money.amount:.2f} {money.currency.upper()}"


# --------------------------------------------------------------------------------------------------
# Market statistic


@dataclass(frozen=True, slots=True)
class MarketStats:
    """A robust summary of other listings' prices for one product, in USD.

    ``log_scale`` is the robust spread of log prices (1.4826 x MAD, floored), the unit of
    :meth:`robust_z`. ``outliers`` were dropped (further than the cut from the first median);
    ``skipped`` had a currency the table does not know or no positive amount.
    """

    median_usd: float
    log_median: float
    log_mad: float
    log_scale: float
    count: int
    outliers: int
    skipped: int

    def robust_z(self, price_usd: float) -> float:
        """How many robust deviations ``price_usd`` lies from the median on the log scale (< 0: cheaper)."""
        return (math.log(price_usd) - self.log_median) / self.log_scale


class MarketSample(tuple[Money, ...]):
    """Listings' prices of a product, remembering their :func:`market_stats`.

    A scorer reads one sample for many listings of the same product (scoring caches it briefly), so
    the robust statistics — a pass over up to a thousand prices — are computed once per sample and
    parameter set, not once per listing. Immutable like any tuple; the memos only ever add answers.

    ``listing_ids`` (parallel to the prices) lets :meth:`others` leave a listing's own price out, so one
    cached sample serves every listing of the product with exactly the other listings' prices.
    """

    _memo: dict[tuple[object, ...], MarketStats | None]
    _ids: dict[str, int]
    _without: dict[tuple[object, ...], MarketSample]

    def __new__(cls, prices: Iterable[Money] = (), listing_ids: Iterable[str] = ()) -> MarketSample:
        self = super().__new__(cls, prices)
        ids = list(listing_ids)
        if ids and len(ids) != len(self):
            raise ValueError(f"market sample has {len(self)} prices but {len(ids)} listing ids")
        self._memo = {}
        self._ids = {lid: i for i, lid in enumerate(ids)}
        self._without = {}
        return self

    def stats(self, currencies: CurrencyTable, min_count: int = 5, outlier_cut: float = 3.5,
              min_log_scale: float = 0.1) -> MarketStats | None:
        key = (tuple(sorted(currencies.rates.items())), min_count, outlier_cut, min_log_scale)
        if key not in self._memo:
            self._memo[key] = market_stats(self, currencies, min_count, outlier_cut, min_log_scale)
        return self._memo[key]

    def others(self, listing_id: str, limit: int) -> MarketSample:
        """The first ``limit`` prices of listings other than ``listing_id`` (it needs a sample of at
        least ``limit`` + 1 prices to have ``limit`` others). Which listing is left out does not matter,
        only its price: listings of equal price share one answer and its statistics, and the answer is
        the same whichever listing loaded the sample."""
        if limit < 0:
            raise ValueError(f"market sample limit must be >= 0, got {limit}")
        at = self._ids.get(listing_id)
        if at is None or at >= limit + 1:
            key: tuple[object, ...] = ("first", limit)
        else:
            own = self[at]
            key = ("without", own.amount, own.currency, limit)
        got = self._without.get(key)
        if got is None:
            kept = self[:limit + 1]
            if at is not None and at < limit + 1:
                kept = kept[:at] + kept[at + 1:]
            got = self._without.setdefault(key, MarketSample(kept[:limit]))
        return got


def market_stats(
    prices: Sequence[Money],
    currencies: CurrencyTable,
    min_count: int = 5,
    outlier_cut: float = 3.5,
    min_log_scale: float = 0.1,
) -> MarketStats | None:
    """Median and MAD of log USD prices after dropping outliers, or None with fewer than ``min_count``
    usable prices (before or after dropping).

    Outliers are points whose modified z-score |log p - median| / (1.4826 MAD) exceeds ``outlier_cut``
    (3.5, after Iglewicz and Hoaglin); the median and MAD are then taken again on the rest.
    ``min_log_scale`` (0.1, about ±10 %) keeps a market where everyone asks the same price from calling
    a 5 % discount anomalous.
    """
    if min_count < 1:
        raise ValueError("market min_count must be >= 1")
    logs: list[float] = []
    skipped = 0
    for p in prices:
        if p.currency.upper() not in currencies or not math.isfinite(p.amount) or p.amount <= 0:
            skipped += 1  # history may hold a currency no longer configured; it is not this listing's fault
            continue
        logs.append(math.log(currencies.to_usd(p, "market price")))
    if len(logs) < min_count:
        return None
    med = statistics.median(logs)
    # The same floored spread that measures the listing also cuts the outliers, so a market where most
    # sellers ask exactly the same price (MAD 0) still keeps prices a few percent away.
    scale = max(_MAD_TO_SIGMA * statistics.median(abs(v - med) for v in logs), min_log_scale)
    keep = [v for v in logs if abs(v - med) / scale <= outlier_cut]
    if len(keep) < min_count:
        return None
    med = statistics.median(keep)
    mad = statistics.median(abs(v - med) for v in keep)
    return MarketStats(
        median_usd=math.exp(med),
        log_median=med,
        log_mad=mad,
        log_scale=max(_MAD_TO_SIGMA * mad, min_log_scale),
        count=len(keep),
        outliers=len(logs) - len(keep),
        skipped=skipped,
    )


# --------------------------------------------------------------------------------------------------
# Price signal


@dataclass(frozen=True, slots=True)
class PriceThresholds:
    """Where a low price starts to count and where it is certain.

    Against the brand's reference price: from a ratio of 0.7 (30 % off happens in sales) to 0.3 (no
    genuine product is sold at 30 % of its price). Against the market: from 2 to 5 robust deviations
    below the median of at least ``min_market_count`` other listings of the product.
    """

    ratio_start: float = 0.7
    ratio_certain: float = 0.3
    z_start: float = -2.0
    z_certain: float = -5.0
    min_market_count: int = 5
    outlier_cut: float = 3.5
    min_log_scale: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio_certain < self.ratio_start:
            raise ValueError("price thresholds need 0 < ratio_certain < ratio_start")
        if not self.z_certain < self.z_start <= 0.0:
            raise ValueError("price thresholds need z_certain < z_start <= 0")
        if self.min_market_count < 1 or self.outlier_cut <= 0 or self.min_log_scale <= 0:
            raise ValueError(
                "price thresholds need min_market_count >= 1, outlier_cut > 0 and min_log_scale > 0"
            )


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.0f}%"


@dataclass(frozen=True, slots=True)
class PriceReading:
    """The numbers of the price signal, before any sentence is written: what fusion needs of a price.

    ``ran`` False (with ``skipped_because``) when the listing has no positive price or there is no
    baseline. ``ratio``/``reference_score`` are set when a positive reference price was compared,
    ``stats``/``z``/``market_score`` when enough market prices were.
    """

    price: Money | None
    reference_price: Money | None
    market_listings: int
    ran: bool
    score: float = 0.0
    skipped_because: str | None = None
    price_usd: float = 0.0
    reference_usd: float = 0.0
    ratio: float | None = None
    reference_score: float = 0.0
    stats: MarketStats | None = None
    z: float = 0.0
    market_score: float = 0.0


def read_price(
    price: Money | None,
    reference_price: Money | None,
    market_prices: Sequence[Money],
    currencies: CurrencyTable,
    thresholds: PriceThresholds | None = None,
) -> PriceReading:
    """How anomalously low the listing's price is, as numbers: the larger of the reference-price score
    and the market score (each in [0, 1]); prices above either baseline score 0.

    Not run when the listing has no positive price or there is no baseline (no reference price and
    too few market prices): a missing price is unknown, not suspicious. Raises
    :class:`UnknownCurrencyError` (a ValueError naming the field) for the listing's or the reference's
    currency; market prices in unknown currencies are skipped and counted.
    """
    th = thresholds or PriceThresholds()
    n = len(market_prices)
    if price is not None:
        check_money(price, "price")
    if price is None or price.amount == 0:
        return PriceReading(price, reference_price, n, ran=False,
                            skipped_because="the listing has no positive price")
    price_usd = currencies.to_usd(price, "price")
    ratio: float | None = None
    ref_usd = ref_score = market_score = z = 0.0
    if reference_price is not None:
        ref_usd = currencies.to_usd(reference_price, "reference_price")
        if ref_usd > 0:
            ratio = price_usd / ref_usd
            ref_score = ramp(ratio, th.ratio_start, th.ratio_certain)
    sample = market_prices if isinstance(market_prices, MarketSample) else MarketSample(market_prices)
    stats = sample.stats(currencies, th.min_market_count, th.outlier_cut, th.min_log_scale)
    if stats is not None:
        z = stats.robust_z(price_usd)
        market_score = ramp(z, th.z_start, th.z_certain)
    if ratio is None and stats is None:
        return PriceReading(price, reference_price, n, ran=False, price_usd=price_usd, reference_usd=ref_usd,
                            skipped_because=f"no reference price and fewer than {th.min_market_count} "
                                            "market prices to compare with")
    return PriceReading(price, reference_price, n, ran=True, score=max(ref_score, market_score),
                        price_usd=price_usd, reference_usd=ref_usd, ratio=ratio, reference_score=ref_score,
                        stats=stats, z=z, market_score=market_score)


def price_signal(
    price: Money | None,
    reference_price: Money | None,
    market_prices: Sequence[Money],
    currencies: CurrencyTable,
    thresholds: PriceThresholds | None = None,
) -> Signal:
    """:func:`read_price` as a signal, with its evidence and reasons (see there)."""
    return explain_price(read_price(price, reference_price, market_prices, currencies, thresholds), currencies)


def explain_price(r: PriceReading, currencies: CurrencyTable) -> Signal:
    """The price signal of a :class:`PriceReading`: its score, evidence and the sentences people read."""
    sig = Signal(name=SignalName.PRICE)
    if r.price is None or r.price.amount == 0:
        sig.ran, sig.skipped_because = False, r.skipped_because
        return sig
    price = r.price
    ev: dict[str, Any] = {"price": format_money(price), "price_usd": round(r.price_usd, 2)}
    reasons: list[tuple[float, str]] = []
    if r.ratio is not None:
        assert r.reference_price is not None
        ev.update(reference_price=format_money(r.reference_price), reference_price_usd=round(r.reference_usd, 2),
                  ratio=round(r.ratio, 4), reference_score=round(r.reference_score, 4))
        if r.ratio < 1.0:
            reasons.append((r.reference_score, f"price {format_money(price)} is {_pct(r.ratio)} of the "
                                               f"reference price {format_money(r.reference_price)}"))
    ev["market_listings"] = r.market_listings
    stats, z = r.stats, r.z
    if stats is not None:
        median = currencies.convert(Money(stats.median_usd, "USD"), price.currency, "market median")
        ev.update(market_median=format_money(median), market_median_usd=round(stats.median_usd, 2),
                  market_count=stats.count, market_outliers=stats.outliers, market_skipped=stats.skipped,
                  robust_z=round(z, 3), market_score=round(r.market_score, 4))
        if z < 0:
            reasons.append((r.market_score, f"price {format_money(price)} is {abs(z):.1f} robust deviations "
                                            f"below the market median {format_money(median)} "
                                            f"({stats.count} other listings)"))
    sig.evidence = ev
    if not r.ran:
        sig.ran, sig.skipped_because = False, r.skipped_because
        return sig
    sig.score = r.score
    sig.reasons = [t for s, t in sorted(reasons, key=lambda t: -t[0]) if s > 0.0]
    return sig
