"""The seller signal: who sells, and how. A seller with confirmed counterfeits, a new account moving
large volumes, or a seller missing from the brand's list of authorized sellers raises risk; unknown
fields are unknown, never a penalty.

Authorization is kept *out* of the score: ``Signal.score`` stays evidence of counterfeit in [0, 1] as
for every other signal, and the authorized status (True / False / None = unknown) is reported in
``evidence["authorized"]`` and by :func:`seller_status`, which fusion reads as a separate term that
lowers risk. A negative score would break the meaning every consumer of ``Signal.score`` relies on.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from service.domain.curves import noisy_or, ramp, require_fraction
from service.domain.model import SellerInfo, Signal, SignalName


@dataclass(frozen=True, slots=True)
class SellerThresholds:
    """What counts as anomalous selling.

    An account younger than ``new_account_days`` is new (fully new at 0 days). Volume (units sold in
    30 days) and stock count from ``*_start`` and are certain at ``*_certain``; anomalous selling is
    newness x the larger of the two. A new account on its own scores ``new_account_alone`` x newness.
    Each confirmed counterfeit leaves ``counterfeit_decay`` of the remaining doubt: 1 - 0.4**n, so one
    confirmed counterfeit scores 0.6, three 0.94. A seller missing from the brand's authorized list
    (when the brand keeps one) scores ``unlisted``: most honest resellers are not on it.
    """

    new_account_days: int = 30
    volume_start: int = 10
    volume_certain: int = 200
    stock_start: int = 20
    stock_certain: int = 500
    new_account_alone: float = 0.25
    unlisted: float = 0.2
    counterfeit_decay: float = 0.4

    def __post_init__(self) -> None:
        if self.new_account_days < 1:
            raise ValueError("seller thresholds: new_account_days must be >= 1")
        if not (0 <= self.volume_start < self.volume_certain and 0 <= self.stock_start < self.stock_certain):
            raise ValueError("seller thresholds need 0 <= *_start < *_certain for volume and stock")
        for name in ("new_account_alone", "unlisted", "counterfeit_decay"):
            require_fraction(f"seller thresholds {name}", getattr(self, name))


def _check_count(field: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{field} must be an integer >= 0, got {value!r}")


def seller_status(seller: SellerInfo | None, authorized_sellers: Collection[str] | None) -> bool | None:
    """True: on the brand's authorized list; False: the brand keeps a list and the seller is not on it;
    None: no seller, or the brand keeps no list (an empty list is no list)."""
    if seller is None or not authorized_sellers:
        return None
    return seller.seller_id in authorized_sellers


@dataclass(frozen=True, slots=True)
class SellerReading:
    """The numbers of the seller signal, before any sentence is written: what fusion needs of a seller.

    ``record`` is the confirmed-counterfeit part (None: none confirmed); ``newness`` and the rest are
    set for a new account; ``unlisted`` is the part for a seller missing from the brand's list.
    """

    seller: SellerInfo
    authorized: bool | None
    confirmed_counterfeits: int | None
    score: float
    record: float | None = None
    newness: float | None = None
    volume: float = 0.0
    stock: float = 0.0
    anomaly: float = 0.0
    alone: float = 0.0
    unlisted: float = 0.0


def read_seller(
    seller: SellerInfo | None,
    authorized_sellers: Collection[str] | None = None,
    confirmed_counterfeits: int | None = None,
    thresholds: SellerThresholds | None = None,
) -> SellerReading | None:
    """The seller signal's numbers (None: the listing names no seller). Score: noisy-OR of the
    confirmed-counterfeit record, the new-account part (the larger of newness x volume-or-stock and
    ``new_account_alone`` x newness) and not being on the brand's list. Raises ValueError naming the
    field for a negative or non-integer count."""
    th = thresholds or SellerThresholds()
    _check_count("confirmed_counterfeits", confirmed_counterfeits)
    if seller is None:
        return None
    if not seller.seller_id:
        raise ValueError("seller.seller_id must not be empty")
    _check_count("seller.account_age_days", seller.account_age_days)
    _check_count("seller.units_sold_30d", seller.units_sold_30d)
    _check_count("seller.stock", seller.stock)
    authorized = seller_status(seller, authorized_sellers)
    parts: list[float] = []
    record = None
    if confirmed_counterfeits:
        record = 1.0 - th.counterfeit_decay**confirmed_counterfeits
        parts.append(record)
    newness = None
    volume = stock = anomaly = alone = 0.0
    if seller.account_age_days is not None and seller.account_age_days < th.new_account_days:
        newness = ramp(seller.account_age_days, th.new_account_days, 0)
        sold, stocked = seller.units_sold_30d or 0, seller.stock or 0
        volume = ramp(sold, th.volume_start, th.volume_certain) if sold else 0.0
        stock = ramp(stocked, th.stock_start, th.stock_certain) if stocked else 0.0
        anomaly = newness * max(volume, stock)
        alone = th.new_account_alone * newness
        # One part, the larger of the two readings of a new account, so risk never drops as volume grows.
        if anomaly > 0.0 and anomaly >= alone:
            parts.append(anomaly)
        elif alone > 0.0:
            parts.append(alone)
    unlisted = th.unlisted if authorized is False and th.unlisted > 0.0 else 0.0
    if unlisted:
        parts.append(unlisted)
    return SellerReading(seller, authorized, confirmed_counterfeits, noisy_or(parts), record, newness, volume,
                         stock, anomaly, alone, unlisted)


def seller_signal(
    seller: SellerInfo | None,
    brand: str | None = None,
    authorized_sellers: Collection[str] | None = None,
    confirmed_counterfeits: int | None = None,
    thresholds: SellerThresholds | None = None,
) -> Signal:
    """The seller signal for the candidate ``brand`` (whose ``authorized_sellers`` are given).

    The score is :func:`read_seller`'s. Low prices make anomalous selling worse; that interaction lives
    in fusion (brand x price and brand x seller terms add up), so the signal itself stays about the
    seller.
    """
    reading = read_seller(seller, authorized_sellers, confirmed_counterfeits, thresholds)
    return explain_seller(reading, brand)


def explain_seller(r: SellerReading | None, brand: str | None) -> Signal:
    """The seller signal of a :class:`SellerReading`: its score, evidence and the sentences people read."""
    sig = Signal(name=SignalName.SELLER)
    if r is None:
        sig.ran, sig.skipped_because = False, "the listing names no seller"
        return sig
    seller = r.seller
    who = f"seller {seller.seller_id}"
    ev: dict[str, Any] = {
        "seller_id": seller.seller_id,
        "brand": brand,
        "authorized": r.authorized,
        "confirmed_counterfeits": r.confirmed_counterfeits,
        "account_age_days": seller.account_age_days,
        "units_sold_30d": seller.units_sold_30d,
        "stock": seller.stock,
    }
    parts: list[tuple[float, str]] = []
    if r.record is not None:
        n = r.confirmed_counterfeits
        plural = "s" if n != 1 else ""
        parts.append((r.record, f"{who} has {n} confirmed counterfeit{plural}"))
        ev["record_score"] = round(r.record, 4)
    if r.newness is not None:
        ev.update(newness=round(r.newness, 4), anomaly_score=round(r.anomaly, 4))
        age = f"{who}'s account is {seller.account_age_days} days old"
        if r.anomaly > 0.0 and r.anomaly >= r.alone:
            how = []
            if r.volume > 0.0:
                how.append(f"sold {seller.units_sold_30d} units in 30 days")
            if r.stock > 0.0:
                how.append(f"holds {seller.stock} in stock")
            parts.append((r.anomaly, f"{age} and {' and '.join(how)}"))
        elif r.alone > 0.0:
            parts.append((r.alone, age))
    if r.unlisted:
        parts.append((r.unlisted, f"{who} is not an authorized seller of {brand}"))
    sig.score = r.score
    sig.reasons = [t for s, t in sorted(parts, key=lambda p: -p[0]) if s > 0.0]
    if r.authorized:
        sig.reasons.append(authorized_reason(seller.seller_id, brand))
    sig.evidence = ev
    return sig


def authorized_reason(seller_id: str, brand: str | None) -> str:
    return f"seller {seller_id} is an authorized seller of {brand}"
