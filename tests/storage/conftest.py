"""Fixtures of the storage tests: every test runs on SQLite (a file under tmp) and on the real
PostgreSQL named by COUNTERLENS_TEST_POSTGRES_URL (a database created per test module and dropped
after it). Without that variable the PostgreSQL cases fail, saying how to start the server."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.engine import make_url

from service.domain.model import Money, ReferenceKind
from service.storage import CatalogRepository, ReferenceRecord, Storage, migrate

PG_ENV = "COUNTERLENS_TEST_POSTGRES_URL"
# Deleting in this order respects every foreign key; faster than a fresh schema per test.
TABLES = ("review_items", "listing_matches", "listing_markets", "listing_scores", "listings", "embeddings",
          "photo_keypoints", "reference_images", "authorized_sellers", "products", "brands")


def _admin_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.fail(f"{PG_ENV} is not set: start the throw-away PostgreSQL with "
                    f"`export {PG_ENV}=$(bash scripts/pg_test_server.sh)` (or run scripts/test.sh)")
    return url


class PgDatabases:
    """Creates and drops uniquely named databases on the test server."""

    def __init__(self) -> None:
        self.admin = make_url(_admin_url())
        self.engine = sa.create_engine(self.admin, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)

    def create(self) -> str:
        name = f"cl_test_{uuid.uuid4().hex[:12]}"
        with self.engine.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
        return self.admin.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        with self.engine.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Target:
    kind: str  # "sqlite" | "postgres"
    url: str


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Callable[[], Target]]:
    """A factory of empty databases of this module's backend; all are removed at the end."""
    kind: str = request.param
    made: list[str] = []
    pg = PgDatabases() if kind == "postgres" else None

    def make() -> Target:
        if pg is not None:
            url = pg.create()
        else:
            url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'sub' / 'counterlens.sqlite3'}"
        made.append(url)
        return Target(kind, url)

    yield make
    if pg is not None:
        for url in made:
            pg.drop(url)
        pg.engine.dispose()


@pytest.fixture(scope="module")
def migrated(fresh_db: Callable[[], Target]) -> Target:
    """One migrated database shared by a module's tests (emptied before each test)."""
    target = fresh_db()
    migrate(target.url)
    return target


@pytest.fixture
def storage(migrated: Target, tmp_path: Path) -> Iterator[Storage]:
    st = Storage.open(migrated.url, tmp_path / "blobs", run_migrations=False)
    with st.db.engine.begin() as c:
        for t in TABLES:
            c.exec_driver_sql(f"DELETE FROM {t}")  # noqa: S608 (fixed table names)
    yield st
    st.close()


@dataclass(frozen=True)
class Photo:
    path: Path
    data: bytes
    sha256: str
    width: int
    height: int
    label: str


@pytest.fixture(scope="session")
def catalogue_photos(grocery_dir: Path) -> list[Photo]:
    """The real catalogue photos (bytes, sha256, size), sorted by name."""
    out = []
    for p in sorted((grocery_dir / "catalogue").glob("*.jpg")):
        data = p.read_bytes()
        with Image.open(p) as im:
            w, h = im.size
        out.append(Photo(p, data, hashlib.sha256(data).hexdigest(), w, h, p.stem))
    assert len(out) >= 10
    return out


def add_photo(cat: CatalogRepository, brand: str, photo: Photo, kind: ReferenceKind = ReferenceKind.PRODUCT,
              sku: str | None = None, **kw: object) -> ReferenceRecord:
    """Adds a real catalogue photo as a reference of the brand; returns the row (new or existing)."""
    ref, _ = cat.add_reference(brand, sha256=photo.sha256, kind=kind, width=photo.width, height=photo.height,
                               source=f"upload:{photo.path.name}", sku=sku, **kw)  # type: ignore[arg-type]
    return ref


@pytest.fixture
def two_brands(storage: Storage, catalogue_photos: list[Photo]) -> dict[str, ReferenceRecord]:
    """Brand alpro (two products with photos, a logo, a seller) and brand oatly (one product)."""
    cat = storage.catalog
    cat.create_brand("alpro", "Alpro", ["ALPRO", "Alpro Soya"])
    cat.create_brand("oatly", "Oatly")
    cat.upsert_product("alpro", "soy-milk", "Alpro Soy Milk 1l", Money(2.49, "EUR"))
    cat.upsert_product("alpro", "soyghurt", "Alpro Soyghurt")
    cat.upsert_product("oatly", "oat-milk", "Oatly Oat Drink", Money(2.2, "EUR"))
    refs = {
        "a1": add_photo(cat, "alpro", catalogue_photos[0], sku="soy-milk", ref_id="A-1", phash=0xF0F0),
        "a2": add_photo(cat, "alpro", catalogue_photos[1], sku="soyghurt"),
        "alogo": add_photo(cat, "alpro", catalogue_photos[2], kind=ReferenceKind.LOGO),
        "o1": add_photo(cat, "oatly", catalogue_photos[3], sku="oat-milk"),
    }
    cat.add_authorized_seller("alpro", "official-alpro", "the brand's own shop")
    cat.add_authorized_seller("oatly", "official-oatly")
    return refs
