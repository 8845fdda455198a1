"""Value types of the domain: what a listing, a reference, a match, a signal and a score are.

Images travel through the core as RGB ``uint8`` numpy arrays of shape (H, W, 3); decoding, limits and
hashing happen in :mod:`service.intake` before anything reaches the core.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

RGBImage = npt.NDArray[np.uint8]
"""An image as the core sees it: (H, W, 3) uint8, RGB, EXIF orientation already applied."""

Vectors = npt.NDArray[np.float32]
"""A (n, d) float32 matrix of L2-normalised embeddings."""


class ReferenceKind(StrEnum):
    PRODUCT = "product"
    LOGO = "logo"


class Verdict(StrEnum):
    CLEAR = "clear"
    REVIEW = "review"
    LIKELY_COUNTERFEIT = "likely_counterfeit"


class SignalName(StrEnum):
    COPY = "copy"
    LOOKALIKE = "lookalike"
    LOGO = "logo"
    KEYPOINTS = "keypoints"
    TEXT = "text"
    PRICE = "price"
    SELLER = "seller"


@dataclass(frozen=True, slots=True)
class Money:
    amount: float
    currency: str  # ISO 4217, upper case


@dataclass(frozen=True, slots=True)
class SellerInfo:
    seller_id: str
    account_age_days: int | None = None
    units_sold_30d: int | None = None
    stock: int | None = None


class _Decoded:
    """Pixels given, or decoded on first use: once, under a lock (two threads asking at once decode once)."""

    __slots__ = ("_decode", "_lock", "_pixels")

    def __init__(self, pixels: RGBImage | None, decode: Callable[[], RGBImage] | None) -> None:
        self._pixels = pixels
        self._decode = decode
        self._lock = threading.Lock()

    def get(self) -> RGBImage:
        if self._pixels is None:
            with self._lock:
                if self._pixels is None:
                    assert self._decode is not None
                    self._pixels = self._decode()
                    self._decode = None
        return self._pixels

    @property
    def done(self) -> bool:
        return self._pixels is not None


class ListingImage:
    """A listing photo: content hash (hex sha256 of the original bytes) and pixels.

    The pixels may be decoded on first use (``decode``): intake checks a photo's header and hashes its
    bytes up front, and a photo whose embeddings are all cached by that hash is never decoded at all.
    ``decode`` raises what decoding raises (intake's errors); it runs once, under a lock.

    ``model_decode`` (optional) decodes a smaller copy for the whole-photo models (:attr:`model_pixels`):
    a large JPEG at 1/2, 1/4 or 1/8 of its size, never below the side the models resize to. The rest
    (crops for logo search, keypoints, OCR, and every box reported) reads :attr:`pixels`, the full
    photo, which a listing the cascade lets go never decodes."""

    __slots__ = ("_full", "_small", "sha256")

    def __init__(self, sha256: str, pixels: RGBImage | None = None, *,
                 decode: Callable[[], RGBImage] | None = None,
                 model_decode: Callable[[], RGBImage] | None = None) -> None:
        if (pixels is None) == (decode is None):
            raise ValueError("give the pixels or a way to decode them, not both")
        self.sha256 = sha256
        self._full = _Decoded(pixels, decode)
        # Without a smaller decode the models read the photo itself.
        self._small = _Decoded(None, model_decode) if model_decode is not None else self._full

    @property
    def pixels(self) -> RGBImage:
        return self._full.get()

    @property
    def model_pixels(self) -> RGBImage:
        """What the whole-photo models embed: the smaller decode where there is one, else :attr:`pixels`.
        Always the same for a photo (never the full pixels because something else decoded them first),
        so its vectors do not depend on which signal ran before."""
        return self._small.get()

    @property
    def decoded(self) -> bool:
        """The full pixels are decoded."""
        return self._full.done

    @property
    def model_decoded(self) -> bool:
        """:attr:`model_pixels` are decoded."""
        return self._small.done

    def __repr__(self) -> str:
        return f"ListingImage({self.sha256[:12]}, {'decoded' if self.decoded else 'not decoded'})"


@dataclass(frozen=True, slots=True)
class Listing:
    listing_id: str
    title: str
    description: str = ""
    price: Money | None = None
    seller: SellerInfo | None = None
    images: tuple[ListingImage, ...] = ()


@dataclass(frozen=True, slots=True)
class ReferenceInfo:
    """What the scorer needs to know about one catalog reference image (resolved from an index id)."""

    image_id: int
    brand: str
    kind: ReferenceKind
    sku: str | None = None
    ref_id: str | None = None
    title: str | None = None
    reference_price: Money | None = None


@dataclass(frozen=True, slots=True)
class KeypointSet:
    """Local features of one image: keypoint positions (n, 2) float32 in pixels of the image as it was
    described (``width`` x ``height``, possibly resized from the photo: ``scale`` = described / original)
    and their descriptors (n, d) uint8 (SIFT: d = 128)."""

    points: npt.NDArray[np.float32]
    descriptors: npt.NDArray[np.uint8]
    width: int
    height: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.points.ndim != 2 or self.points.shape[1] != 2:
            raise ValueError(f"keypoint positions must be (n, 2), got {self.points.shape}")
        if self.descriptors.ndim != 2 or len(self.descriptors) != len(self.points):
            raise ValueError(f"need one descriptor row per keypoint, got {self.descriptors.shape} "
                             f"for {len(self.points)} keypoints")

    def __len__(self) -> int:
        return len(self.points)


Box = tuple[int, int, int, int]
"""(x0, y0, x1, y1) in pixels of the listing image as decoded."""


SIMILARITY_DECIMALS = 4
"""Similarities are reported to this many decimals. Below it they are floating-point noise: the same two
vectors searched in a batch of one and in a batch of 256 are summed in different orders."""


@dataclass(frozen=True, slots=True)
class Match:
    """One listing image matched to one catalog reference by one signal."""

    reference: ReferenceInfo
    signal: SignalName
    similarity: float
    image_index: int
    box: Box | None = None
    # How a ``logo`` match was found where there is more than one way: "template" (silhouette and
    # colour, index/logo_templates.py); None for the embedding search.
    method: str | None = None

    def as_contract(self) -> dict[str, Any]:
        """The stable JSON shape shared by /score, rescan output and the review queue."""
        out: dict[str, Any] = {
            "brand": self.reference.brand,
            "sku": self.reference.sku,
            "ref_id": self.reference.ref_id,
            "kind": self.reference.kind.value,
            "signal": self.signal.value,
            "similarity": round(float(self.similarity), SIMILARITY_DECIMALS),
            "image_index": self.image_index,
        }
        if self.box is not None:
            out["box"] = list(self.box)
        if self.method is not None:
            out["method"] = self.method
        return out


# Equally similar matches are listed in this order of signals: the exact catalog photo first, then a
# verified printed design, a logo, a semantic lookalike.
_TIE_ORDER = {SignalName.COPY: 0, SignalName.KEYPOINTS: 1, SignalName.LOGO: 2, SignalName.LOOKALIKE: 3}
_NO_BOX: Box = (-1, -1, -1, -1)


def match_rank(m: Match) -> tuple[float, int, int, int, Box, str]:
    """Sort key for matches, best first: similarity at the reported precision, then a fixed order
    (signal, reference, photo, box, method), so the same evidence is listed the same way in every run.
    Sorting by the raw similarity let noise between two searches of the same vectors swap a copy and a
    lookalike that both read 1.0 (a re-used official photo), which made a stored rescan of an unchanged
    catalog rewrite the listing."""
    return (-round(float(m.similarity), SIMILARITY_DECIMALS), _TIE_ORDER.get(m.signal, len(_TIE_ORDER)),
            m.reference.image_id, m.image_index, m.box or _NO_BOX, m.method or "")


@dataclass(slots=True)
class Signal:
    """One signal's outcome. ``score`` in [0, 1] is evidence of counterfeit; ``ran`` is False when the
    cascade skipped it (then score is 0 and ``skipped_because`` says why)."""

    name: SignalName
    score: float = 0.0
    ran: bool = True
    reasons: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    skipped_because: str | None = None


@dataclass(slots=True)
class ScoreResult:
    listing_id: str
    risk: float
    verdict: Verdict
    brand: str | None
    matches: list[Match]
    signals: list[Signal]
    reasons: list[str]
    model_versions: dict[str, str] = field(default_factory=dict)

    def signal(self, name: SignalName) -> Signal | None:
        return next((s for s in self.signals if s.name == name), None)
