"""The Alembic migrations: from an empty database to head, idempotent, concurrent, equal to the models."""

from __future__ import annotations

import threading
from collections.abc import Callable

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from service.storage import Database, head_revision, migrate
from service.storage.models import Base
from tests.storage.conftest import TABLES, Target


def test_migrate_from_empty_creates_every_table_and_is_idempotent(fresh_db: Callable[[], Target]) -> None:
    target = fresh_db()
    db = Database(target.url)
    try:
        assert set(TABLES).isdisjoint(sa.inspect(db.engine).get_table_names())
        assert migrate(target.url) == head_revision()
        assert set(TABLES) <= set(sa.inspect(db.engine).get_table_names())
        assert migrate(target.url) == head_revision()  # second run: nothing to do, no error
        with db.engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                     Base.metadata)
        assert diffs == [], f"models and migrations disagree: {diffs}"
    finally:
        db.dispose()


def test_concurrent_migrations_all_succeed(fresh_db: Callable[[], Target]) -> None:
    target = fresh_db()
    results: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(target.url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [head_revision()] * 4


def test_connection_settings(migrated: Target) -> None:
    db = Database(migrated.url)
    try:
        with db.engine.connect() as conn:
            if migrated.kind == "sqlite":
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
                assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
            else:
                assert conn.dialect.name == "postgresql"
            # Foreign keys are enforced on both: a product of a brand that does not exist is refused.
            try:
                with db.write() as s:
                    s.execute(sa.text("INSERT INTO products (brand_id, sku, title, created_at, updated_at) "
                                      "VALUES (999999, 'x', 'x', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            except sa.exc.IntegrityError:
                pass
            else:
                raise AssertionError("a row referencing a missing brand was accepted")
    finally:
        db.dispose()


def test_upgrade_from_0001_keeps_scored_listings(fresh_db: Callable[[], Target]) -> None:
    """0002 adds listings.latest_digest to a database that already holds listings (nullable: the next
    rescan of each fills it)."""
    from alembic import command

    from service.storage.db import alembic_config

    target = fresh_db()
    db = Database(target.url)
    try:
        cfg = alembic_config()
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
            conn.execute(sa.text(
                "INSERT INTO listings (listing_id, title, description, image_sha256s, first_seen, last_seen_at, "
                "last_scored_at, latest_risk, latest_verdict) VALUES ('old', 't', '', '[]', :t, :t, :t, 0.1, "
                "'clear')"), {"t": "2026-01-01 00:00:00+00:00"})
        assert migrate(target.url) == head_revision() == "0005"
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT listing_id, latest_digest FROM listings")).all() == [("old", None)]
    finally:
        db.dispose()


def test_upgrade_to_0005_fills_the_markets_by_the_rule_scoring_applies(fresh_db: Callable[[], Target]) -> None:
    """0005's backfill (SQL over the stored matches) and new scores (``_market_of`` in Python) must put
    a listing in the same markets: random matches, ties included, compared listing by listing. Then the
    market sample reads the backfilled table."""
    import random

    from alembic import command

    from service.storage.db import alembic_config
    from service.storage.listings import ListingRepository, _market_of

    target = fresh_db()
    db = Database(target.url)
    rng = random.Random(5)
    expected: set[tuple[int, int, str]] = set()
    try:
        cfg = alembic_config()
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0004")
            for bid, slug in ((1, "alpro"), (2, "oatly")):
                conn.execute(sa.text("INSERT INTO brands (id, slug, name, aliases, created_at) "
                                     "VALUES (:id, :slug, :slug, '[]', :t)"),
                             {"id": bid, "slug": slug, "t": "2026-01-01 00:00:00+00:00"})
            for pk in range(1, 41):
                conn.execute(sa.text(
                    "INSERT INTO listings (id, listing_id, title, description, price, currency, image_sha256s, "
                    "first_seen, last_seen_at, last_scored_at, latest_risk, latest_verdict) VALUES (:pk, :lid, "
                    "'t', '', :price, 'EUR', '[]', :t, :t, :t, 0.1, 'clear')"),
                    {"pk": pk, "lid": f"L{pk}", "price": float(pk), "t": f"2026-01-01 00:{pk:02d}:00+00:00"})
                matches = []
                for _ in range(rng.randint(0, 6)):
                    brand = rng.choice(("alpro", "oatly"))
                    m = {"signal": rng.choice(("copy", "lookalike", "logo", "keypoints")),
                         "similarity": rng.choice((0.5, 0.7, 0.9)),  # few values: ties happen
                         "image_index": rng.randint(0, 1), "sku": rng.choice(("a", "b", "c", None))}
                    matches.append((brand, m))
                    conn.execute(sa.text(
                        "INSERT INTO listing_matches (listing_pk, brand_id, sku, kind, signal, similarity, "
                        "image_index) VALUES (:pk, :bid, :sku, 'product', :signal, :similarity, :image_index)"),
                        {"pk": pk, "bid": 1 if brand == "alpro" else 2, **m})
                expected |= {(pk, 1 if brand == "alpro" else 2, sku) for brand, sku in _market_of(matches)}
        assert migrate(target.url) == head_revision() == "0005"
        with db.engine.connect() as conn:
            got = set(conn.execute(sa.text("SELECT listing_pk, brand_id, sku FROM listing_markets")).tuples())
        assert got == expected and len(expected) > 20
        # Newest first, by the listings' last_seen_at carried over.
        sample = ListingRepository(db).market_sample("alpro", "a")
        pks = sorted((pk for pk, bid, sku in expected if (bid, sku) == (1, "a")), reverse=True)
        assert [lid for lid, _ in sample] == [f"L{pk}" for pk in pks]
    finally:
        db.dispose()
