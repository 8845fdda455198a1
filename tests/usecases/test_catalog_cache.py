"""The scoring path's in-process catalog view: answers from memory, forgets on change or after its TTL."""

from __future__ import annotations

import time
from pathlib import Path

from service.domain.model import ReferenceKind
from service.storage.catalog import CatalogRepository
from service.storage.db import Database
from service.usecases.catalog_cache import CachedCatalog


class CountingRepo(CatalogRepository):
    """The real repository, counting how often it is asked (to see what the cache saves)."""

    calls = 0

    def references(self, image_ids):  # type: ignore[no-untyped-def]
        type(self).calls += 1
        return super().references(image_ids)

    def authorized_sellers(self, brand: str) -> frozenset[str]:
        type(self).calls += 1
        return super().authorized_sellers(brand)


def test_cache_answers_from_memory_and_forgets(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    db.migrate()
    repo = CountingRepo(db)
    repo.create_brand("acme", "Acme")
    ref, _ = repo.add_reference("acme", sha256="a" * 64, kind=ReferenceKind.LOGO, width=10, height=10, source="t")
    repo.add_authorized_seller("acme", "s1")
    view = CachedCatalog(repo, lambda b: None, ttl_s=0.3)
    CountingRepo.calls = 0
    for _ in range(5):
        assert set(view.references([ref.id, 999])) == {ref.id}
        assert view.authorized_sellers("acme") == {"s1"}
    assert CountingRepo.calls == 2  # one load each, then memory (the unknown id 999 is remembered too)

    repo.add_authorized_seller("acme", "s2")
    assert view.authorized_sellers("acme") == {"s1"}  # stale until invalidated...
    view.invalidate()
    assert view.authorized_sellers("acme") == {"s1", "s2"}

    repo.delete_references("acme", [ref.id])
    time.sleep(0.35)  # ...or until the TTL passes (another process changed the catalog)
    assert view.references([ref.id]) == {}
    db.dispose()
