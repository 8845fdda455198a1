"""Plain domain objects for the domain tests: references, matches, listings facts (no models, no DB)."""

from __future__ import annotations

from service.domain.model import Box, Match, Money, ReferenceInfo, ReferenceKind, SellerInfo, SignalName

USD100 = Money(100.0, "USD")


def reference(
    brand: str = "acme",
    sku: str | None = "SKU-1",
    ref_id: str | None = "r-12",
    image_id: int = 12,
    kind: ReferenceKind = ReferenceKind.PRODUCT,
    price: Money | None = USD100,
    title: str | None = None,
) -> ReferenceInfo:
    return ReferenceInfo(image_id=image_id, brand=brand, kind=kind, sku=sku, ref_id=ref_id,
                         title=title, reference_price=price)


def match(
    signal: SignalName,
    similarity: float,
    brand: str = "acme",
    image_index: int = 0,
    box: Box | None = None,
    **ref_kw: object,
) -> Match:
    kind = ReferenceKind.LOGO if signal is SignalName.LOGO else ReferenceKind.PRODUCT
    ref_kw.setdefault("kind", kind)
    if kind is ReferenceKind.LOGO:
        ref_kw.setdefault("sku", None)
        ref_kw.setdefault("price", None)
    return Match(reference=reference(brand=brand, **ref_kw), signal=signal, similarity=similarity,  # type: ignore[arg-type]
                 image_index=image_index, box=box)


def copy_of(similarity: float = 0.95, brand: str = "acme", **kw: object) -> Match:
    return match(SignalName.COPY, similarity, brand=brand, **kw)  # type: ignore[arg-type]


def ordinary_seller(seller_id: str = "shop-7") -> SellerInfo:
    """An established seller with ordinary volume: nothing anomalous."""
    return SellerInfo(seller_id=seller_id, account_age_days=900, units_sold_30d=40, stock=25)
