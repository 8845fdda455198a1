"""Builders of domain objects for the storage tests (listings, matches, score results)."""

from __future__ import annotations

import hashlib

from service.domain.model import (
    Listing,
    Match,
    Money,
    ReferenceInfo,
    ScoreResult,
    SellerInfo,
    Signal,
    SignalName,
    Verdict,
)
from service.storage import ReferenceRecord


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def listing(listing_id: str, *, price: float | None = 10.0, currency: str = "EUR", seller: str | None = "s1",
            title: str = "a listing", images: int = 2) -> tuple[Listing, list[str]]:
    """A listing without pixels and the sha256s of its (imaginary) photos."""
    lst = Listing(listing_id=listing_id, title=title, description=f"description of {listing_id}",
                  price=Money(price, currency) if price is not None else None,
                  seller=SellerInfo(seller, account_age_days=12, units_sold_30d=300, stock=5000)
                  if seller else None)
    return lst, [sha(f"{listing_id}/{i}") for i in range(images)]


def match(ref: ReferenceRecord, similarity: float = 0.9, signal: SignalName = SignalName.COPY,
          image_index: int = 0) -> Match:
    info = ReferenceInfo(image_id=ref.id, brand=ref.brand, kind=ref.kind, sku=ref.sku, ref_id=ref.ref_id)
    return Match(reference=info, signal=signal, similarity=similarity, image_index=image_index)


def result(listing_id: str, verdict: Verdict, brand: str | None, matches: list[Match],
           risk: float | None = None) -> ScoreResult:
    risk = risk if risk is not None else {Verdict.CLEAR: 0.1, Verdict.REVIEW: 0.6,
                                          Verdict.LIKELY_COUNTERFEIT: 0.9}[verdict]
    signals = [Signal(SignalName.COPY, score=risk, reasons=["copied photo"],
                      evidence={"best": matches[0].similarity if matches else None}),
               Signal(SignalName.TEXT, ran=False, score=0.0, skipped_because="no candidate")]
    return ScoreResult(listing_id=listing_id, risk=risk, verdict=verdict, brand=brand, matches=matches,
                       signals=signals, reasons=[f"{verdict.value} because of {len(matches)} matches"],
                       model_versions={"copy": "sscd@test"})
