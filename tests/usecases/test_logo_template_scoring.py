"""Logo search by template through the real scorer and catalog (models, FAISS, SQLite): a brand's logo
pasted small on another product is a ``logo`` match with method "template", its box and its reason; the
cascade looks only for the candidate brands' logos and skips listings nothing ties to a brand; deleted
logos stop matching; a process that skips the catalog's reconciliation makes the templates from the
stored logo images; a stored rescan, having no photos, says why it did not search."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from PIL import Image

from index.logo_templates import TemplateLogoLocator
from service.container import Container, build_container
from service.demo import logo_on_white, render_logo
from service.domain.model import (
    Listing,
    ListingImage,
    Match,
    Money,
    ReferenceKind,
    ScoreResult,
    SellerInfo,
    SignalName,
)
from service.domain.ports import LocatedLogo
from service.settings import LogoTemplateSettings, Settings
from service.usecases.catalog import ReferenceUpload
from service.usecases.logo_templates import LogoTemplateMatcher
from tests.conftest import jpeg_bytes, png_bytes
from tests.usecases.rescan_world import World, fresh_data_dir, settings

pytestmark = pytest.mark.slow

LOGOS = ("spotify", "visa", "mastercard")


def _settings(data_dir: Path, mode: Literal["cascade", "always", "never"], every_up_to: int = 16) -> Settings:
    return settings(data_dir).model_copy(update={"logo_templates": LogoTemplateSettings(
        mode=mode, cascade_every_logo_up_to=every_up_to)})


def _with_logos(c: Container) -> Container:
    c.catalog.add([ReferenceUpload(slug, ReferenceKind.LOGO, png_bytes(np.asarray(logo_on_white(slug, 256))),
                                   "test", ref_id=f"logo-{slug}") for slug in LOGOS])
    return c


def _container(world: World, data_dir: Path, mode: Literal["cascade", "always", "never"],
               every_up_to: int = 16) -> Container:
    return _with_logos(build_container(_settings(fresh_data_dir(world, data_dir), mode, every_up_to),
                                       embedders=world.embedders))


@pytest.fixture
def always(rescan_world: World, tmp_path: Path) -> Iterator[Container]:
    c = _container(rescan_world, tmp_path / "always", "always")
    yield c
    c.close()


@pytest.fixture
def cascade(rescan_world: World, tmp_path: Path) -> Iterator[Container]:
    """The cascade as for a large logo catalog: only the candidate brands' logos are looked for."""
    c = _container(rescan_world, tmp_path / "cascade", "cascade", every_up_to=0)
    yield c
    c.close()


def _photo(grocery: Path, marks: dict[str, tuple[int, int]]) -> np.ndarray:
    """An in-store orange photo (320 px) with each logo pasted at 22 % of the width, top-left as given."""
    path = sorted((grocery / "instore" / "Orange").glob("*.jpg"))[1]
    img = Image.open(path).convert("RGB")
    s = min(img.size)
    img = img.crop((0, 0, s, s)).resize((320, 320))
    for slug, at in marks.items():
        mark = render_logo(slug, 256).resize((70, 70), Image.Resampling.LANCZOS)
        img.paste(mark, at, mark.split()[3])
    return np.asarray(img)


def _image(pixels: np.ndarray) -> ListingImage:
    data = jpeg_bytes(pixels, quality=85)
    with Image.open(io.BytesIO(data)) as im:
        decoded = np.asarray(im.convert("RGB"))
    return ListingImage(hashlib.sha256(data).hexdigest(), decoded)


def _listing(lid: str, pixels: np.ndarray, title: str = "Fresh stock") -> Listing:
    seller = SellerInfo("new-shop", account_age_days=3, units_sold_30d=900, stock=2000)
    return Listing(lid, title, price=Money(4.0, "USD"), seller=seller, images=(_image(pixels),))


def _template_matches(result: ScoreResult) -> dict[str, Match]:
    return {m.reference.brand: m for m in result.matches if m.signal is SignalName.LOGO and m.method == "template"}


def test_a_pasted_logo_is_a_logo_match_with_its_box_and_reason(always: Container, grocery_dir: Path) -> None:
    out = always.scorer.score(_listing("logo-on-oranges", _photo(grocery_dir, {"spotify": (180, 60)})))
    r = out.result
    assert out.ran["logo_templates"] is True
    found = _template_matches(r)
    assert set(found) == {"spotify"}
    m = found["spotify"]
    assert m.similarity >= 0.4  # on the logo ramp (0.30 counts, 0.50 certain)
    assert m.box is not None
    x0, y0, x1, y1 = m.box
    assert 175 <= x0 <= 190 and 55 <= y0 <= 70 and 240 <= x1 <= 255 and 120 <= y1 <= 135  # pasted at 180,60, 70 px
    assert m.as_contract()["method"] == "template" and m.as_contract()["ref_id"] == "logo-spotify"
    assert any("spotify's logo" in reason and "by its shape and colour" in reason for reason in r.reasons)
    sig = r.signal(SignalName.LOGO)
    assert sig is not None and sig.ran and sig.score >= 0.5
    assert r.brand == "spotify"
    assert r.model_versions["logo_templates"]

    # The same photo without any logo pasted: nothing.
    plain = always.scorer.score(_listing("plain-oranges", _photo(grocery_dir, {}))).result
    assert _template_matches(plain) == {}


def test_the_cascade_looks_only_for_candidate_brands_logos(cascade: Container, grocery_dir: Path) -> None:
    photo = _photo(grocery_dir, {"spotify": (30, 40), "visa": (200, 200)})
    # Named in the title, sold in bulk by a new account: undecided, so worth the closer look.
    named = cascade.scorer.score(_listing("named", photo, title="Spotify speaker"))
    assert named.ran["logo_templates"] is True
    assert set(_template_matches(named.result)) == {"spotify"}  # Visa's logo was not looked for

    quiet = cascade.scorer.score(_listing("quiet", photo, title="Fresh stock"))
    assert quiet.ran["logo_templates"] is False
    assert _template_matches(quiet.result) == {}
    sig = quiet.result.signal(SignalName.LOGO)
    assert sig is not None and not sig.ran and "skipped" in (sig.skipped_because or "")


def test_the_cascade_looks_for_every_logo_of_a_small_catalog(rescan_world: World, grocery_dir: Path,
                                                             tmp_path: Path) -> None:
    c = _container(rescan_world, tmp_path / "small", "cascade")  # 3 logos, within the default 16
    try:
        photo = _photo(grocery_dir, {"spotify": (30, 40), "visa": (200, 200)})
        named = c.scorer.score(_listing("named", photo, title="Spotify speaker"))
        assert named.ran["logo_templates"] is True
        assert set(_template_matches(named.result)) == {"spotify", "visa"}  # another brand's logo too
    finally:
        c.close()


def test_deleted_logos_stop_matching_and_added_ones_start(always: Container, grocery_dir: Path) -> None:
    photo = _photo(grocery_dir, {"mastercard": (100, 120)})
    assert set(_template_matches(always.scorer.score(_listing("mc-1", photo)).result)) == {"mastercard"}
    ref = next(r for r in always.catalog_repo.list_references("mastercard") if r.kind is ReferenceKind.LOGO)
    always.catalog.delete_references("mastercard", [ref.id])
    assert _template_matches(always.scorer.score(_listing("mc-2", photo)).result) == {}  # not remembered
    _with_logos(always)  # mastercard's logo again (the others are already present)
    assert set(_template_matches(always.scorer.score(_listing("mc-3", photo)).result)) == {"mastercard"}


def test_a_process_without_reconciliation_makes_templates_from_stored_logos(
        rescan_world: World, always: Container, grocery_dir: Path, tmp_path: Path) -> None:
    data_dir = always.settings.data_dir
    always.close()
    c = build_container(_settings(data_dir, "always"), reconcile=False, embedders=rescan_world.embedders)
    try:
        assert c.scorer.logo_templates is not None
        assert c.scorer.logo_templates.brands() == frozenset(LOGOS)
        got = c.scorer.score(_listing("late", _photo(grocery_dir, {"spotify": (40, 200)}))).result
        assert set(_template_matches(got)) == {"spotify"}
    finally:
        c.close()


def test_a_stored_rescan_says_it_could_not_search(always: Container, grocery_dir: Path) -> None:
    listing = _listing("stored", _photo(grocery_dir, {"spotify": (180, 60)}))
    always.scorer.score(listing)
    bare = Listing(listing.listing_id, listing.title, price=listing.price, seller=listing.seller)
    again = always.scorer.rescore_stored(bare, [listing.images[0].sha256], persist=False)
    assert again is not None and again.ran["logo_templates"] is False
    sig = again.result.signal(SignalName.LOGO)
    assert sig is not None
    embedded = [m for m in again.result.matches if m.signal is SignalName.LOGO]
    # Skipped with its reason exactly when nothing else found a logo in the stored embeddings.
    assert (sig.skipped_because == "a stored rescan has no photos: logo templates not searched") == (not embedded)


def test_a_stored_rescan_keeps_the_embeddings_logo_evidence(always: Container) -> None:
    # The photo is the logo itself: the whole-photo search of the logo index finds it from stored
    # embeddings, and a rescan that cannot search templates must not throw that evidence away.
    photo = np.asarray(logo_on_white("spotify", 256))
    listing = _listing("logo-itself", photo, title="Speaker")
    first = always.scorer.score(listing).result
    assert any(m.signal is SignalName.LOGO and m.method is None for m in first.matches)
    bare = Listing(listing.listing_id, listing.title, price=listing.price, seller=listing.seller)
    again = always.scorer.rescore_stored(bare, [listing.images[0].sha256], persist=False)
    assert again is not None
    sig = again.result.signal(SignalName.LOGO)
    assert sig is not None and sig.ran and sig.skipped_because is None
    assert sig.score > 0 and again.result.brand == "spotify"


def test_an_unreadable_logo_image_is_left_out_not_fatal(rescan_world: World, always: Container,
                                                          grocery_dir: Path) -> None:
    data_dir = always.settings.data_dir
    visa = next(r for r in always.catalog_repo.list_references("visa") if r.kind is ReferenceKind.LOGO)
    always.close()
    always.blobs.path_for(visa.sha256).unlink()
    for reconcile in (True, False):  # at start-up, and lazily (a Ray actor, a CLI command)
        c = build_container(_settings(data_dir, "always"), reconcile=reconcile, embedders=rescan_world.embedders)
        try:
            got = c.scorer.score(_listing(f"after-{reconcile}", _photo(grocery_dir, {"spotify": (40, 200)})))
            assert set(_template_matches(got.result)) == {"spotify"}
            assert c.scorer.logo_templates is not None
            assert c.scorer.logo_templates.brands() == frozenset(LOGOS) - {"visa"}
        finally:
            c.close()


class _AddsALogoDuringTheFirstSearch(TemplateLogoLocator):
    """A real locator that, while searching its first photo, has a logo added (as a concurrent catalog
    write would)."""

    def __init__(self, on_first: Callable[[], object]) -> None:
        super().__init__()
        self.on_first: Callable[[], object] | None = on_first

    def locate(self, pixels: np.ndarray, only: Collection[int] | None = None) -> list[LocatedLogo]:
        if self.on_first is not None:
            hook, self.on_first = self.on_first, None
            hook()
        return super().locate(pixels, only)


def test_a_logo_added_during_a_search_is_not_cached_as_absent(always: Container, grocery_dir: Path) -> None:
    catalog = always.scorer.catalog
    refs = {r.brand: r for slug in ("spotify", "visa")
            for r in always.catalog_repo.list_references(slug) if r.kind is ReferenceKind.LOGO}
    matcher = LogoTemplateMatcher(_AddsALogoDuringTheFirstSearch(
        lambda: matcher.add_references([(refs["visa"].id, "visa", np.asarray(logo_on_white("visa", 256)))])),
        catalog)
    matcher.add_references([(refs["spotify"].id, "spotify", np.asarray(logo_on_white("spotify", 256)))])
    first, second = (_image(_photo(grocery_dir, {"spotify": (30, 40)})),
                     _image(_photo(grocery_dir, {"visa": (200, 200)})))
    matcher.find([first, second], {"spotify", "visa"})  # visa's logo is added while photo 1 is searched
    # Photo 2 was searched without visa's logo: that answer must not be remembered as current.
    assert {m.reference.brand for m in matcher.find([second], {"spotify", "visa"})} == {"visa"}
