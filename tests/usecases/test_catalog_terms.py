"""A brand's terms (its products' reference prices, its authorized sellers) are catalog changes: the
scorer sees them at once and listeners (the API's background stored rescans) hear of them, while a
repeat that changes nothing is not announced."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.container import Container
from service.domain.model import Money, ReferenceKind
from service.usecases.catalog import CatalogChange, ReferenceUpload
from service.usecases.catalog_cache import CachedCatalog

pytestmark = pytest.mark.slow

TERMS = CatalogChange("arla", terms=True)


def test_prices_and_sellers_are_announced_once_changed(container: Container, grocery_dir: Path) -> None:
    heard: list[CatalogChange] = []
    container.catalog.listeners.append(heard.append)
    catalog, scorer_view = container.catalog, container.scorer.catalog

    # The seeded price (20 USD) again, under a new title: no score reads a title, nothing announced.
    product, created = catalog.put_product("arla", "Arla-Sour-Milk", "Sour milk", Money(20.0, "USD"))
    assert not created and product.title == "Sour milk" and heard == []
    catalog.put_product("arla", "Arla-Sour-Milk", "Sour milk", Money(12.0, "EUR"))
    assert heard == [TERMS]
    # A new product: no reference shows it yet, so no stored listing can have matched it.
    catalog.put_product("arla", "Arla-Butter", "Butter", Money(5.0, "USD"))
    assert heard == [TERMS]

    assert "s1" not in scorer_view.authorized_sellers("arla")  # (read into the scorer's cache)
    _, created = catalog.authorize_seller("arla", "s1", "their shop")
    assert created and heard == [TERMS] * 2
    assert "s1" in scorer_view.authorized_sellers("arla")  # the cache forgot at once
    _, created = catalog.authorize_seller("arla", "s1")
    assert not created and heard == [TERMS] * 2
    assert catalog.revoke_seller("arla", "s1") and heard == [TERMS] * 3
    assert "s1" not in scorer_view.authorized_sellers("arla")
    assert not catalog.revoke_seller("arla", "s1") and heard == [TERMS] * 3

    # Uploading a product's photo again with a new price re-prices the product: the brand's terms.
    photo = (grocery_dir / "catalogue" / "Alpro-Shelf-Soy-Milk.jpg").read_bytes()
    added = catalog.add([ReferenceUpload("alpro", ReferenceKind.PRODUCT, photo, "test", sku="Alpro-Shelf-Soy-Milk",
                                         price=Money(9.0, "USD"))])
    assert not added[0].created  # the same bytes: the existing reference
    assert heard[-1] == CatalogChange("alpro", terms=True) and len(heard) == 4
    got = container.catalog_repo.get_product("alpro", "Alpro-Shelf-Soy-Milk")
    assert got is not None and got.reference_price == Money(9.0, "USD")
    catalog.add([ReferenceUpload("alpro", ReferenceKind.PRODUCT, photo, "test", sku="Alpro-Shelf-Soy-Milk",
                                 price=Money(9.0, "USD"))])
    assert len(heard) == 4  # the same price again


def test_a_brands_thresholds_and_names_are_announced_once_changed(container: Container) -> None:
    heard: list[CatalogChange] = []
    container.catalog.listeners.append(heard.append)
    catalog, scorer_view = container.catalog, container.scorer.catalog
    assert isinstance(scorer_view, CachedCatalog)
    assert scorer_view.brand_policy("arla") is None  # (read into the scorer's cache: the default policy)

    b = catalog.update_brand("arla", likely_threshold=0.3)
    assert (b.review_threshold, b.likely_threshold) == (None, 0.3) and heard == [TERMS]
    # The cache forgot at once; the unset review threshold follows the likely one down (0.5 > 0.3).
    policy = scorer_view.brand_policy("arla")
    assert policy is not None and (policy.review_threshold, policy.likely_threshold) == (0.3, 0.3)
    catalog.update_brand("arla", likely_threshold=0.3)
    assert heard == [TERMS]  # the same threshold again

    # A new alias: any stored title may name the brand now.
    catalog.update_brand("arla", aliases=["Arla Foods"])
    assert heard == [TERMS, CatalogChange("arla", names=True)]
    assert "Arla Foods" in scorer_view.brand_aliases()["arla"]
    catalog.update_brand("arla", name="Arla", aliases=["arla foods"], review_threshold=0.2)
    assert heard[-1] == CatalogChange("arla", terms=True, names=True)  # (the alias's case is a new name too)
    catalog.update_brand("arla", aliases=["arla foods"], likely_threshold=0.3)
    assert len(heard) == 3

    # A new brand: stored titles may name it already.
    catalog.create_brand("zebrax", "Zebrax")
    assert heard[-1] == CatalogChange("zebrax", names=True) and "zebrax" in scorer_view.brand_aliases()
