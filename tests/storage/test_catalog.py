"""The catalog repository on real SQLite and PostgreSQL: brands, products, references, sellers, brand
scoping, deletes, index feeds, the CatalogReader port and a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.domain.model import Money, ReferenceKind
from service.domain.ports import CatalogReader
from service.storage import (
    CatalogRepository,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    ReferenceRecord,
    Storage,
)
from tests.storage.conftest import Photo, Target


def _add(cat: CatalogRepository, brand: str, photo: Photo, kind: ReferenceKind = ReferenceKind.PRODUCT,
         sku: str | None = None, **kw: object) -> tuple[ReferenceRecord, bool]:
    return cat.add_reference(brand, sha256=photo.sha256, kind=kind, width=photo.width, height=photo.height,
                             source=f"upload:{photo.path.name}", sku=sku, **kw)  # type: ignore[arg-type]


def test_brand_lifecycle_and_validation(storage: Storage) -> None:
    cat = storage.catalog
    b = cat.create_brand("acme-co", "ACME", ["Acme", "acme", " ACME Corp "], review_threshold=0.4)
    assert (b.slug, b.name, b.aliases, b.review_threshold, b.likely_threshold) == \
        ("acme-co", "ACME", ("Acme", "ACME Corp"), 0.4, None)
    assert b.created_at.tzinfo is not None
    with pytest.raises(ConflictError):
        cat.create_brand("acme-co", "Other")
    again, created = cat.get_or_create_brand("acme-co", "ignored")
    assert (again.id, again.name, created) == (b.id, "ACME", False)
    new, created = cat.get_or_create_brand("zeta")
    assert (new.name, created) == ("zeta", True)
    assert [x.slug for x in cat.list_brands()] == ["acme-co", "zeta"]
    before, after = cat.update_brand("zeta", aliases=["Zeta", "ZT"])
    assert (before.aliases, after.aliases, after.name) == ((), ("Zeta", "ZT"), "zeta")
    assert cat.update_brand("zeta", review_threshold=0.3, likely_threshold=0.7)[1].likely_threshold == 0.7
    assert cat.get_brand("zeta") is not None and cat.get_brand("zeta").review_threshold == 0.3  # type: ignore[union-attr]
    # Aliases equal to the display name but for case are not repeated.
    assert cat.brand_aliases() == {"acme-co": ["ACME", "ACME Corp"], "zeta": ["zeta", "ZT"]}
    for bad in ("Upper", "-x", "a b", "x" * 65, "", "a/b"):
        with pytest.raises(InvalidInputError) as err:
            cat.create_brand(bad, "n")
        assert err.value.field == "slug"
    with pytest.raises(NotFoundError):
        cat.update_brand("nobody", aliases=[])


def test_brand_update_changes_only_what_is_given(storage: Storage) -> None:
    cat = storage.catalog
    cat.create_brand("zeta", "Zeta", ["ZT"], review_threshold=0.3, likely_threshold=0.7)
    # One threshold given: the other is kept, and the pair is checked as it will be stored.
    before, after = cat.update_brand("zeta", likely_threshold=0.6)
    assert (before.likely_threshold, after.review_threshold, after.likely_threshold) == (0.7, 0.3, 0.6)
    with pytest.raises(InvalidInputError, match="review_threshold") as err:
        cat.update_brand("zeta", review_threshold=0.9)  # above the kept likely threshold
    assert err.value.field == "review_threshold"
    with pytest.raises(InvalidInputError, match="likely_threshold"):
        cat.update_brand("zeta", likely_threshold=1.5)
    with pytest.raises(InvalidInputError) as err:
        cat.update_brand("zeta", name="  ", review_threshold=0.1)
    assert err.value.field == "name"
    # A refused update changes nothing, not even its valid fields.
    kept = cat.get_brand("zeta")
    assert kept is not None and (kept.name, kept.aliases, kept.review_threshold, kept.likely_threshold) == \
        ("Zeta", ("ZT",), 0.3, 0.6)
    # None sets a threshold back to the service-wide one; the name and aliases are replaced.
    _, after = cat.update_brand("zeta", name="Zeta Corp", aliases=[], review_threshold=None)
    assert (after.name, after.aliases, after.review_threshold, after.likely_threshold) == \
        ("Zeta Corp", (), None, 0.6)


def test_products_upsert(storage: Storage) -> None:
    cat = storage.catalog
    cat.create_brand("alpro", "Alpro")
    p, created = cat.upsert_product("alpro", "soy-milk", "Soy", Money(2.49, "EUR"))
    assert created and p.reference_price == Money(2.49, "EUR")
    p2, created = cat.upsert_product("alpro", "soy-milk", "Soy Milk 1l", Money(2.99, "EUR"))
    assert not created and p2.id == p.id and p2.title == "Soy Milk 1l"
    assert cat.get_product("alpro", "soy-milk").reference_price == Money(2.99, "EUR")  # type: ignore[union-attr]
    p3, _ = cat.upsert_product("alpro", "soy-milk", "Soy Milk 1l")  # the price can be removed
    assert p3.reference_price is None
    with pytest.raises(InvalidInputError) as err:
        cat.upsert_product("alpro", "x", "x", Money(1.0, "eur"))
    assert err.value.field == "reference_price.currency"
    with pytest.raises(InvalidInputError):
        cat.upsert_product("alpro", "x", "x", Money(float("nan"), "EUR"))
    with pytest.raises(NotFoundError):
        cat.upsert_product("nobody", "x", "x")


def test_duplicate_upload_is_a_noop_returning_the_existing_row(storage: Storage,
                                                              catalogue_photos: list[Photo]) -> None:
    cat = storage.catalog
    cat.create_brand("alpro", "Alpro")
    cat.create_brand("oatly", "Oatly")
    cat.upsert_product("alpro", "soy-milk", "Soy")
    photo = catalogue_photos[0]
    first, created = _add(cat, "alpro", photo, sku="soy-milk", ref_id="R1", phash="00FF00FF00FF00FF")
    assert created and first.sku == "soy-milk" and first.phash == "00ff00ff00ff00ff"
    assert (first.width, first.height) == (photo.width, photo.height)
    again, created = _add(cat, "alpro", photo, ref_id="other")
    assert not created and again == first  # unchanged: still the first product and ref_id
    # The same bytes are a new row as a logo, and in another brand's catalog.
    logo, created = _add(cat, "alpro", photo, kind=ReferenceKind.LOGO)
    assert created and logo.id != first.id
    theirs, created = _add(cat, "oatly", photo)
    assert created and theirs.id not in (first.id, logo.id)
    assert len(cat.list_references("alpro")) == 2
    with pytest.raises(NotFoundError) as missing:
        _add(cat, "alpro", catalogue_photos[1], sku="no-such-sku")
    assert missing.value.field == "sku"
    for bad, field in ((dict(sha256="ABC"), "sha256"), (dict(width=0), "width"),
                       (dict(kind="banner"), "kind"), (dict(phash=1 << 64), "phash"),
                       (dict(blob_path="../etc/passwd"), "blob_path")):
        args = dict(sha256=catalogue_photos[2].sha256, kind="product", width=10, height=10, source="x")
        args.update(bad)
        with pytest.raises(InvalidInputError) as err:
            cat.add_reference("alpro", **args)  # type: ignore[arg-type]
        assert err.value.field == field


def test_brand_scoping_of_references_and_sellers(storage: Storage, two_brands) -> None:
    cat = storage.catalog
    a1, o1 = two_brands["a1"], two_brands["o1"]
    assert {r.id for r in cat.list_references("oatly")} == {o1.id}
    assert cat.get_reference("oatly", a1.id) is None  # alpro's row is invisible to oatly
    assert cat.get_reference("alpro", a1.id) == a1
    assert cat.list_references("alpro", kind="logo") == [two_brands["alogo"]]
    assert [r.id for r in cat.list_references("alpro", sku="soy-milk")] == [a1.id]
    all_alpro = [r.id for r in cat.list_references("alpro")]
    assert [r.id for r in cat.list_references("alpro", limit=2, offset=1)] == all_alpro[1:3]
    assert cat.get_product("oatly", "soy-milk") is None
    assert cat.delete_references("oatly", [a1.id]).ids == ()  # cannot delete another brand's rows
    assert cat.get_reference("alpro", a1.id) is not None
    with pytest.raises(NotFoundError):
        cat.delete_product("oatly", "soy-milk")
    assert [s.seller_id for s in cat.list_authorized_sellers("oatly")] == ["official-oatly"]
    assert cat.authorized_sellers("alpro") == frozenset({"official-alpro"})
    assert cat.authorized_sellers("unknown-brand") == frozenset()
    assert not cat.remove_authorized_seller("oatly", "official-alpro")
    assert cat.authorized_sellers("alpro") == frozenset({"official-alpro"})
    seller, created = cat.add_authorized_seller("alpro", "official-alpro", "again")
    assert not created and seller.note == "the brand's own shop"
    assert cat.remove_authorized_seller("alpro", "official-alpro")
    assert cat.authorized_sellers("alpro") == frozenset()


def test_delete_returns_ids_and_unreferenced_hashes(storage: Storage, two_brands,
                                                    catalogue_photos: list[Photo]) -> None:
    cat = storage.catalog
    a1, a2, o1 = two_brands["a1"], two_brands["a2"], two_brands["o1"]
    # oatly also uses alpro's soyghurt photo: deleting alpro's row must not report the hash as unused.
    shared, _ = _add(cat, "oatly", catalogue_photos[1])
    removed = cat.delete_references("alpro", [a1.id, a2.id, o1.id, 10**12])
    assert removed.ids == (a1.id, a2.id)
    assert removed.unreferenced_sha256s == (a1.sha256,)
    assert {r.id for r in cat.list_references("alpro")} == {two_brands["alogo"].id}
    assert {r.id for r in cat.list_references("oatly")} == {o1.id, shared.id}
    # Deleting a product deletes its references with it.
    removed = cat.delete_product("oatly", "oat-milk")
    assert removed.ids == (o1.id,) and removed.unreferenced_sha256s == (o1.sha256,)
    assert cat.get_product("oatly", "oat-milk") is None
    assert [r.id for r in cat.list_references("oatly")] == [shared.id]


def test_reference_ids_are_never_reused(storage: Storage, two_brands, catalogue_photos: list[Photo]) -> None:
    cat = storage.catalog
    last = max(r.id for r in two_brands.values())
    cat.delete_references("oatly", [two_brands["o1"].id])
    cat.delete_references("alpro", [r.id for r in two_brands.values()])
    new, _ = _add(cat, "alpro", catalogue_photos[5])
    assert new.id > last  # an index that still holds a deleted id must never point at a new photo


def test_index_feeds_stats_and_export(storage: Storage, two_brands) -> None:
    cat = storage.catalog
    product_ids = sorted(r.id for k, r in two_brands.items() if k != "alogo")
    assert cat.ids_for_kind("product") == product_ids
    assert cat.ids_for_kind(ReferenceKind.LOGO) == [two_brands["alogo"].id]
    pairs = list(cat.iter_reference_hashes("product", batch_size=2))  # several pages
    assert pairs == [(r.id, r.sha256) for r in sorted(
        (r for k, r in two_brands.items() if k != "alogo"), key=lambda r: r.id)]
    stats = {s.brand: s for s in cat.stats()}
    assert (stats["alpro"].products, stats["alpro"].product_references, stats["alpro"].logo_references,
            stats["alpro"].authorized_sellers) == (2, 2, 1, 1)
    assert (stats["oatly"].products, stats["oatly"].product_references, stats["oatly"].logo_references) == \
        (1, 1, 0)
    export = cat.export_brand("alpro")
    assert export.brand.aliases == ("ALPRO", "Alpro Soya")
    assert [p.sku for p in export.products] == ["soy-milk", "soyghurt"]
    assert {r.id for r in export.references} == {two_brands["a1"].id, two_brands["a2"].id,
                                                 two_brands["alogo"].id}
    assert all(r.brand == "alpro" for r in export.references)
    assert [s.seller_id for s in export.sellers] == ["official-alpro"]
    with pytest.raises(NotFoundError):
        cat.export_brand("nobody")


def test_catalog_reader_port(storage: Storage, two_brands) -> None:
    reader: CatalogReader = storage.catalog
    a1, alogo, o1 = two_brands["a1"], two_brands["alogo"], two_brands["o1"]
    infos = reader.references([a1.id, alogo.id, o1.id, a1.id, 10**12])
    assert set(infos) == {a1.id, alogo.id, o1.id}
    assert (infos[a1.id].brand, infos[a1.id].sku, infos[a1.id].ref_id, infos[a1.id].title,
            infos[a1.id].reference_price) == ("alpro", "soy-milk", "A-1", "Alpro Soy Milk 1l",
                                              Money(2.49, "EUR"))
    assert infos[alogo.id].kind is ReferenceKind.LOGO and infos[alogo.id].sku is None
    assert infos[o1.id].brand == "oatly"
    assert reader.references([]) == {}
    assert reader.brand_aliases()["alpro"] == ["Alpro", "Alpro Soya"]  # ALPRO equals the name, dropped


def test_restart_keeps_the_catalog(migrated: Target, storage: Storage, two_brands, tmp_path: Path) -> None:
    a1 = two_brands["a1"]
    storage.close()
    reopened = Storage.open(migrated.url, tmp_path / "blobs")  # new engine, migrations run again
    try:
        assert reopened.catalog.get_reference("alpro", a1.id) == a1
        assert [p.sku for p in reopened.catalog.list_products("alpro")] == ["soy-milk", "soyghurt"]
        assert reopened.catalog.authorized_sellers("alpro") == frozenset({"official-alpro"})
    finally:
        reopened.close()
