"""What repositories return: frozen dataclasses detached from any session (no lazy loads, safe to hand
to another thread), plus the small enums of storage (review status, score source)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, StrEnum
from typing import Any

from service.domain.model import Listing, Money, ReferenceKind, SellerInfo, Verdict


class ReviewStatus(StrEnum):
    OPEN = "open"
    CONFIRMED = "confirmed"  # the brand says: counterfeit (counts against the seller)
    REJECTED = "rejected"  # the brand says: genuine / not ours
    CLEARED = "cleared"  # set by the system only: a later score no longer flags it for this brand


DECISIONS = frozenset({ReviewStatus.CONFIRMED, ReviewStatus.REJECTED})


class ScoreSource(StrEnum):
    API = "api"
    RESCAN = "rescan"  # a file of listings: fresh data from the platform
    STORED_RESCAN = "stored-rescan"  # re-matching stored listings and embeddings: no fresh data


class Keep(Enum):
    """The value of an update's field that leaves the stored value as it is (where None is a value:
    a brand's threshold set to None falls back to the service-wide one)."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True, slots=True)
class BrandRecord:
    id: int
    slug: str
    name: str
    aliases: tuple[str, ...]
    review_threshold: float | None
    likely_threshold: float | None
    created_at: datetime

    @property
    def names(self) -> list[str]:
        """The display name and the aliases: what a listing title may call the brand."""
        return [self.name, *(a for a in self.aliases if a.casefold() != self.name.casefold())]


@dataclass(frozen=True, slots=True)
class ProductRecord:
    id: int
    brand: str
    sku: str
    title: str
    reference_price: Money | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ReferenceRecord:
    id: int  # also the id in the FAISS indexes
    brand: str
    kind: ReferenceKind
    sku: str | None
    ref_id: str | None
    sha256: str
    phash: str | None  # 16 hex digits
    width: int
    height: int
    source: str
    blob_path: str | None  # relative to the blob store root
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SellerRecord:
    brand: str
    seller_id: str
    note: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RemovedReferences:
    """What a delete removed: the ids to drop from the indexes, and the content hashes no reference
    row uses any more (their blobs may be deleted)."""

    ids: tuple[int, ...] = ()
    unreferenced_sha256s: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BrandStats:
    brand: str
    products: int
    product_references: int
    logo_references: int
    authorized_sellers: int
    open_review_items: int


@dataclass(frozen=True, slots=True)
class CatalogExport:
    brand: BrandRecord
    products: list[ProductRecord]
    references: list[ReferenceRecord]
    sellers: list[SellerRecord]


@dataclass(frozen=True, slots=True)
class ListingRecord:
    id: int
    listing_id: str
    title: str
    description: str
    price: Money | None
    seller: SellerInfo | None
    image_sha256s: tuple[str, ...]
    first_seen: datetime
    last_seen_at: datetime
    last_scored_at: datetime
    latest_risk: float
    latest_verdict: Verdict
    latest_brand: str | None
    latest_digest: str | None = None  # see ListingRepository.record_scores(skip_unchanged=True)

    def to_listing(self) -> Listing:
        """The domain listing without pixels (for a --stored rescan, which starts from embeddings)."""
        return Listing(listing_id=self.listing_id, title=self.title, description=self.description,
                       price=self.price, seller=self.seller)


@dataclass(frozen=True, slots=True)
class ScoreRecord:
    id: int
    listing_id: str
    scored_at: datetime
    risk: float
    verdict: Verdict
    brand: str | None
    source: ScoreSource
    result: dict[str, Any]
    model_versions: dict[str, str]


@dataclass(frozen=True, slots=True)
class MatchRecord:
    brand: str
    sku: str | None
    reference_image_id: int | None  # None once the reference was deleted
    ref_id: str | None
    kind: ReferenceKind
    signal: str
    similarity: float
    image_index: int


@dataclass(frozen=True, slots=True)
class RecordedScore:
    score_id: int
    listing_pk: int
    review_item_id: int | None  # the open item of the result's brand; None if none or already decided


@dataclass(frozen=True, slots=True)
class ReviewItemRecord:
    id: int
    brand: str
    listing_id: str
    status: ReviewStatus
    risk: float
    verdict: Verdict
    reasons: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    score_id: int | None
    title: str
    price: Money | None
    seller_id: str | None
    # The full result of the score that last updated the item; only filled by ``review_item``.
    result: dict[str, Any] | None = field(default=None)
