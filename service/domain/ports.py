"""The ports of the domain: small Protocols that adapters (embeddings/, index/, storage/, OCR) implement.

Use cases depend on these, never on an adapter class, so a test of fusion needs no model and a test of
the index needs no database.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from service.domain.model import Box, KeypointSet, Money, ReferenceInfo, RGBImage, Vectors

Ids = npt.NDArray[np.int64]


@runtime_checkable
class ImageEmbedder(Protocol):
    """Images in, L2-normalised float32 vectors out, in batches.

    ``model_id`` names the model *and its version* (e.g. ``sscd@3f2a9c1d``); embeddings are cached and
    indexed per model_id, so it must change whenever the weights or the preprocessing change.
    """

    @property
    def name(self) -> str: ...
    @property
    def model_id(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def provider(self) -> str: ...

    def embed(self, images: Sequence[RGBImage]) -> Vectors: ...


@runtime_checkable
class TextEmbedder(Protocol):
    """A CLIP text tower: strings in, vectors in the same space as its image tower."""

    @property
    def model_id(self) -> str: ...
    @property
    def dim(self) -> int: ...

    def embed_text(self, texts: Sequence[str]) -> Vectors: ...


@dataclass(frozen=True, slots=True)
class OcrLine:
    text: str
    confidence: float
    box: tuple[int, int, int, int]


class TextReader(Protocol):
    """OCR: the lines of text visible in a photo."""

    def read(self, image: RGBImage) -> list[OcrLine]: ...


class VectorIndex(Protocol):
    """Inner-product search over L2-normalised vectors keyed by the catalog's own int64 ids."""

    @property
    def dim(self) -> int: ...
    @property
    def ntotal(self) -> int: ...
    @property
    def version(self) -> int:
        """Moves with every change of the stored vectors (a search's answer is the same while it holds)."""
        ...

    def add(self, ids: Ids, vectors: Vectors) -> None: ...
    def remove(self, ids: Ids) -> int: ...
    def search(self, queries: Vectors, k: int) -> tuple[npt.NDArray[np.float32], Ids]:
        """(n, k) similarities and ids, best first; missing neighbours have id -1."""
        ...


class EmbeddingCache(Protocol):
    """Embeddings per (image content sha256, model_id): nothing seen before is embedded twice."""

    def get_many(self, model_id: str, sha256s: Iterable[str]) -> dict[str, npt.NDArray[np.float32]]: ...
    def put_many(self, model_id: str, vectors: Mapping[str, npt.NDArray[np.float32]]) -> None: ...
    # The same for several models at once (one read, one write transaction): keyed by model_id.
    def get_models(self, wanted: Mapping[str, Iterable[str]]) -> dict[str, dict[str, npt.NDArray[np.float32]]]: ...
    def put_models(self, vectors: Mapping[str, Mapping[str, npt.NDArray[np.float32]]]) -> None: ...


class KeypointExtractor(Protocol):
    """Local features of an image (keypoint positions and descriptors); ``extractor_id`` names the
    method and its parameters, as ``model_id`` does for embedders."""

    @property
    def extractor_id(self) -> str: ...

    def extract(self, image: RGBImage) -> KeypointSet: ...


class KeypointCache(Protocol):
    """Features per (image content sha256, extractor_id), and each photo's latest verification: what it
    matched (``VerifiedReference`` rows) against one reference set (``references``: a fingerprint of the
    indexed references and the verifier's parameters)."""

    def get_many(self, extractor_id: str, sha256s: Iterable[str]) -> dict[str, KeypointSet]: ...
    def put_many(self, extractor_id: str, features: Mapping[str, KeypointSet]) -> None: ...

    def described(self, extractor_id: str, sha256s: Iterable[str]) -> set[str]:
        """The photos among ``sha256s`` whose features are stored (without reading the features)."""
        ...

    def get_verified(self, extractor_id: str, references: str,
                     sha256s: Iterable[str]) -> dict[str, list[VerifiedReference]]:
        """The photos among ``sha256s`` last verified against exactly ``references`` (the others are
        absent)."""
        ...

    def put_verified(self, extractor_id: str, references: str,
                     verified: Mapping[str, Sequence[VerifiedReference]]) -> None:
        """Remember verifications of described photos (a photo without stored features is ignored)."""
        ...

    def recall(self, extractor_id: str, references: str | None,
               sha256s: Iterable[str]) -> tuple[dict[str, list[VerifiedReference]], dict[str, KeypointSet]]:
        """What a listing's verification needs, in one read: the photos verified against ``references``
        (none when it is None), and the stored features of the others."""
        ...

    def put_verified_with(self, extractor_id: str, references: str | None,
                          features: Mapping[str, KeypointSet],
                          verified: Mapping[str, Sequence[VerifiedReference]]) -> None:
        """New features and the verifications made with them (against ``references``; not stored when it
        is None), stored together: both or neither."""
        ...


@dataclass(frozen=True, slots=True)
class VerifiedReference:
    """A reference image whose keypoints reappear in a photo: ``inliers`` agree on one geometric
    transform, which places the reference at ``box`` in the photo."""

    image_id: int
    inliers: int
    box: Box | None


class KeypointIndex(Protocol):
    """Reference images' local features, searched and geometrically verified against a photo's."""

    def add(self, image_id: int, features: KeypointSet) -> None: ...
    def remove(self, image_ids: Iterable[int]) -> int: ...
    def __contains__(self, image_id: object) -> bool: ...
    def verify(self, query: KeypointSet, *, min_inliers: int = ...) -> Sequence[VerifiedReference]: ...
    def build(self) -> None:
        """Make the index ready to search now (a lazily built structure is built here)."""
        ...

    @property
    def params_id(self) -> str:
        """The parameters a verification depends on besides the references (a persisted verification
        made with others is not reused)."""
        ...


@dataclass(frozen=True, slots=True)
class LocatedLogo:
    """A catalog logo found in a photo by its shape and colour: ``score`` in [0, 1], where (``box``)."""

    image_id: int
    score: float
    box: Box


class LogoLocator(Protocol):
    """Logo references as templates, looked for inside photos (a mark printed small on a product)."""

    def add(self, image_id: int, pixels: RGBImage) -> bool:
        """Index a logo; False where the image is not a mark on a plain background (nothing indexed)."""
        ...

    def remove(self, image_ids: Iterable[int]) -> int: ...
    def __contains__(self, image_id: object) -> bool: ...
    def __len__(self) -> int: ...
    def locate(self, pixels: RGBImage, only: Collection[int] | None = None) -> list[LocatedLogo]:
        """The logos found in a photo, best first; ``only``: look for these image ids alone."""
        ...


class CatalogReader(Protocol):
    """What scoring reads from the catalog; every answer is already scoped to the brand it names."""

    def references(self, image_ids: Iterable[int]) -> dict[int, ReferenceInfo]: ...
    def authorized_sellers(self, brand: str) -> frozenset[str]: ...
    def brand_aliases(self) -> dict[str, list[str]]:
        """brand slug -> the names a listing may call it by (display name, aliases)."""
        ...


class ListingHistory(Protocol):
    """What scoring reads from earlier scores: market prices and sellers' records."""

    def market_sample(self, brand: str, sku: str, limit: int = ...) -> list[tuple[str, Money]]: ...
    def confirmed_counterfeits(self, seller_id: str) -> int: ...
    def confirmed_counterfeits_many(self, seller_ids: Iterable[str]) -> dict[str, int]: ...
