"""Storage of counterlens: SQLAlchemy models, Alembic migrations, brand-scoped repositories, the
embedding cache and the blob store of reference image bytes.

The composition root builds one :class:`Storage` (``Storage.open(settings.database_url,
settings.data_dir / "blobs", echo=settings.storage.echo_sql)``) and hands its parts to the use cases:
``catalog`` is the domain's ``CatalogReader``, ``listings`` its ``ListingHistory``, ``embeddings`` its
``EmbeddingCache``, ``keypoints`` its ``KeypointCache``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.storage.blobs import BlobNotFoundError, BlobStore, CorruptBlobError
from service.storage.catalog import CatalogRepository
from service.storage.db import Database, create_engine, head_revision, migrate, migrate_engine
from service.storage.embeddings import EmbeddingStore
from service.storage.errors import ConflictError, InvalidInputError, NotFoundError, StorageError
from service.storage.keypoints import KeypointStore
from service.storage.listings import ListingRepository, result_json
from service.storage.records import (
    BrandRecord,
    BrandStats,
    CatalogExport,
    ListingRecord,
    MatchRecord,
    ProductRecord,
    RecordedScore,
    ReferenceRecord,
    RemovedReferences,
    ReviewItemRecord,
    ReviewStatus,
    ScoreRecord,
    ScoreSource,
    SellerRecord,
)


@dataclass(frozen=True, slots=True)
class Storage:
    """The database (migrated), its repositories and the blob store, built together."""

    db: Database
    catalog: CatalogRepository
    listings: ListingRepository
    embeddings: EmbeddingStore
    keypoints: KeypointStore
    blobs: BlobStore

    @classmethod
    def open(cls, database_url: str, blob_root: Path, *, echo: bool = False,
             pool_size: int = 8, run_migrations: bool = True) -> Storage:
        """Connects, upgrades the schema to head (unless ``run_migrations`` is False) and builds the
        repositories."""
        db = Database(database_url, echo=echo, pool_size=pool_size)
        try:
            if run_migrations:
                db.migrate()
        except BaseException:
            db.dispose()
            raise
        return cls(db=db, catalog=CatalogRepository(db), listings=ListingRepository(db),
                   embeddings=EmbeddingStore(db), keypoints=KeypointStore(db), blobs=BlobStore(blob_root))

    def close(self) -> None:
        self.db.dispose()


__all__ = [
    "BlobNotFoundError",
    "BlobStore",
    "BrandRecord",
    "BrandStats",
    "CatalogExport",
    "CatalogRepository",
    "ConflictError",
    "CorruptBlobError",
    "Database",
    "EmbeddingStore",
    "InvalidInputError",
    "KeypointStore",
    "ListingRecord",
    "ListingRepository",
    "MatchRecord",
    "NotFoundError",
    "ProductRecord",
    "RecordedScore",
    "ReferenceRecord",
    "RemovedReferences",
    "ReviewItemRecord",
    "ReviewStatus",
    "ScoreRecord",
    "ScoreSource",
    "SellerRecord",
    "Storage",
    "StorageError",
    "create_engine",
    "head_revision",
    "migrate",
    "migrate_engine",
    "result_json",
]
