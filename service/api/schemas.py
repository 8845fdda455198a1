"""Request and response bodies of the HTTP API (pydantic), and their mapping to domain objects."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.domain.model import Match, ScoreResult, Signal

_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}$"


class ImageIn(BaseModel):
    """One listing photo: exactly one of ``url`` (fetched server-side) or ``base64`` (or a data: URL)."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(default=None, max_length=4096)
    base64: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ImageIn:
        if (self.url is None) == (self.base64 is None):
            raise ValueError("give exactly one of url or base64")
        return self


class PriceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: float = Field(ge=0, allow_inf_nan=False)
    currency: str = Field(default="USD", pattern=r"^[A-Za-z]{3}$")


class SellerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=200)
    account_age_days: int | None = Field(default=None, ge=0)
    units_sold_30d: int | None = Field(default=None, ge=0)
    stock: int | None = Field(default=None, ge=0)


class ListingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    listing_id: str = Field(pattern=_ID)
    title: str = Field(default="", max_length=2000)
    description: str = Field(default="", max_length=20000)
    price: PriceIn | None = None
    seller: SellerIn | None = None
    images: list[ImageIn] = Field(default_factory=list)


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    listings: list[ListingIn] = Field(min_length=1, max_length=100)


class SignalOut(BaseModel):
    name: str
    score: float
    ran: bool
    skipped_because: str | None = None
    reasons: list[str]
    evidence: dict[str, Any]


class MatchOut(BaseModel):
    brand: str
    sku: str | None
    ref_id: str | None
    kind: str
    signal: str
    similarity: float
    image_index: int
    box: list[int] | None = None


class ScoreOut(BaseModel):
    listing_id: str
    risk: float
    verdict: Literal["clear", "review", "likely_counterfeit"]
    brand: str | None
    reasons: list[str]
    matches: list[MatchOut]
    signals: list[SignalOut]
    ran: dict[str, bool] = Field(default_factory=dict, description="which expensive signals ran")
    model_versions: dict[str, str]
    timing_ms: dict[str, float] = Field(default_factory=dict)


class BatchItemOut(BaseModel):
    listing_id: str
    result: ScoreOut | None = None
    error: dict[str, Any] | None = None


class BatchOut(BaseModel):
    results: list[BatchItemOut]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def signal_out(s: Signal) -> SignalOut:
    return SignalOut(name=s.name.value, score=round(float(s.score), 4), ran=s.ran,
                     skipped_because=s.skipped_because, reasons=list(s.reasons),
                     evidence=_jsonable(dict(s.evidence)))


def match_out(m: Match) -> MatchOut:
    return MatchOut(**m.as_contract())


def score_out(r: ScoreResult, ran: dict[str, bool] | None = None,
              timing: dict[str, float] | None = None) -> ScoreOut:
    return ScoreOut(
        listing_id=r.listing_id, risk=round(float(r.risk), 4), verdict=r.verdict.value, brand=r.brand,
        reasons=list(r.reasons), matches=[match_out(m) for m in r.matches],
        signals=[signal_out(s) for s in r.signals], ran=dict(ran or {}),
        model_versions=dict(r.model_versions), timing_ms={k: round(v, 2) for k, v in (timing or {}).items()},
    )


# ------------------------------------------------------------------ catalog


class BrandIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    name: str = Field(min_length=1, max_length=255)
    aliases: list[str] = Field(default_factory=list, max_length=50)
    review_threshold: float | None = Field(default=None, ge=0, le=1)
    likely_threshold: float | None = Field(default=None, ge=0, le=1)


class BrandPatch(BaseModel):
    """A brand's fields to change; a field left out is kept. A threshold given as null falls back to the
    service-wide one."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=255)
    aliases: list[str] | None = Field(default=None, max_length=50)
    review_threshold: float | None = Field(default=None, ge=0, le=1)
    likely_threshold: float | None = Field(default=None, ge=0, le=1)


class BrandOut(BaseModel):
    slug: str
    name: str
    aliases: list[str]
    review_threshold: float | None
    likely_threshold: float | None
    created_at: datetime


class ReferenceOut(BaseModel):
    id: int
    brand: str
    kind: str
    sku: str | None
    ref_id: str | None
    sha256: str
    phash: str | None
    width: int
    height: int
    source: str
    created_at: datetime
    created: bool | None = Field(default=None, description="on upload: false when the bytes were already there")


class ProductIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(default="", max_length=1000)
    price: PriceIn | None = None


class ProductOut(BaseModel):
    brand: str
    sku: str
    title: str
    reference_price: PriceIn | None
    created_at: datetime
    updated_at: datetime


class SellerAuthIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seller_id: str = Field(min_length=1, max_length=200)
    note: str | None = Field(default=None, max_length=1000)


class SellerAuthOut(BaseModel):
    brand: str
    seller_id: str
    note: str | None
    created_at: datetime


class ByUrlIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    urls: list[str] = Field(min_length=1, max_length=50)
    kind: Literal["product", "logo"] = "product"
    sku: str | None = Field(default=None, max_length=200)
    ref_id: str | None = Field(default=None, max_length=200)
    title: str | None = Field(default=None, max_length=1000)
    price: PriceIn | None = None


class ImportOut(BaseModel):
    rows: int
    added: int
    duplicates: int
    brands_created: int
    errors: list[dict[str, Any]]
