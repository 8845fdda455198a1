"""The labelled detection benchmark: a catalog manifest, a listings file and the truth about every
listing, built from grocery-dev, simple-icons logos and scikit-image photos with one seed.

Catalog
    *Product brands* from grocery-dev's catalogue images: a packaged product's brand is its maker (the
    first word of the class: ``arla``, ``tropicana``, ``god-morgon``), so a brand has several products
    and the sku must be told apart; produce is grouped by coarse class into synthetic brands
    (``melon-growers``: cantaloupe, honeydew, watermelon), half of the coarse classes chosen by seed, the
    other half never in the catalog. Reference prices are random per product. *Logo brands*: simple-icons
    marks (rendered on white) as ``kind=logo`` references of brands that have no products.

Split
    Every catalog brand, non-catalog class, scikit-image photo and non-catalog logo is drawn into ``tune``
    or ``report``; a listing belongs to the split of what it shows. Choices are made on ``tune`` only.

Listings (one photo each, generic titles that name no brand, so the visual signals are what is measured)
    ``copy``      a catalog photo through one edit (crop, rotation, JPEG 30, ...; one track per edit);
    ``logo``      a catalog logo pasted at 15-30 % of the width onto a photo of a non-catalog product;
    ``natural``   another (in-store) photo of a catalog packaged product;
    ``negative``  photos of non-catalog produce and scikit-image photos through the same edits, and
                  non-catalog logos pasted the same way.
    Half the positives are cheap (15-45 % of the reference price), half normal (90-110 %); negatives
    get random prices in the catalog's range.
"""

from __future__ import annotations

import csv
import json
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from scripts.eval.edits import EDIT_NAMES, Edit, edits_for, jpeg, paste_logo, random_square
from service.demo import logo_on_white, render_logo

REPO = Path(__file__).resolve().parents[2]
GROCERY = REPO.parent / "shared" / "data" / "grocery-dev"

SPLITS: tuple[str, str] = ("tune", "report")
TRACKS: tuple[str, ...] = ("copy", "logo", "natural", "negative")
# The signal whose similarity says "found" on each positive track.
TRACK_SIGNAL: dict[str, str] = {"copy": "copy", "logo": "logo", "natural": "lookalike"}

# Well-known consumer brands in simple-icons (CC0 marks); the seed draws the catalog's and the
# non-catalog ones from this pool.
LOGO_POOL: tuple[str, ...] = (
    "nike", "adidas", "puma", "reebok", "underarmour", "fila", "thenorthface", "starbucks", "cocacola",
    "redbull", "burgerking", "mcdonalds", "kfc", "ferrari", "porsche", "volkswagen", "toyota", "bmw",
    "audi", "renault", "peugeot", "apple", "samsung", "sony", "nintendo", "playstation", "xbox", "lego",
    "ikea", "zara", "uniqlo", "hm", "chanel", "dior", "louisvuitton", "gucci", "rolex", "tesla", "shell",
    "spotify", "netflix", "airbnb", "uber", "visa", "mastercard", "paypal", "dhl", "fedex", "ups",
    "lacoste", "converse", "vans", "asics", "newbalance", "jordan", "skoda", "fiat", "ducati", "yamahamotorcorporation",
)

GENERIC_TITLES: tuple[str, ...] = (
    "Great value, ships today", "Item as pictured", "Brand new in original packaging", "Fresh stock",
    "Best price online", "Limited offer, while stocks last", "Quality product, fast delivery",
    "Household essentials", "Everyday pantry item", "Bundle deal available", "Top rated item",
    "Sealed, unopened", "Free shipping on this item", "Popular choice", "Weekly special",
)

PRODUCE_SUFFIX = "-growers"


@dataclass(frozen=True)
class Size:
    """How much of everything a benchmark has (totals over both splits)."""

    packaged: int  # packaged catalog products (of 16)
    produce_classes: int  # coarse produce classes in the catalog
    logos: int  # catalog logo brands
    negative_logos: int  # non-catalog logo brands
    per_edit: int  # copy-track listings per edit
    logo_pastes: int  # logo-track listings
    natural: int  # natural-track listings
    negatives: int  # negative photos (edited), besides the negative logo pastes
    negative_pastes: int  # non-catalog logos pasted onto photos


SIZES: dict[str, Size] = {
    "small": Size(packaged=4, produce_classes=2, logos=2, negative_logos=2, per_edit=2, logo_pastes=4,
                  natural=2, negatives=10, negative_pastes=4),
    "default": Size(packaged=16, produce_classes=8, logos=12, negative_logos=12, per_edit=12,
                    logo_pastes=30, natural=24, negatives=110, negative_pastes=40),
    "large": Size(packaged=16, produce_classes=10, logos=16, negative_logos=16, per_edit=30,
                  logo_pastes=100, natural=64, negatives=260, negative_pastes=120),
}


@dataclass(frozen=True)
class Product:
    brand: str
    sku: str
    cls: str
    image: Path  # the catalogue photo
    price: float
    split: str
    packaged: bool


@dataclass(frozen=True)
class LogoBrand:
    slug: str
    title: str
    split: str


@dataclass
class Query:
    """One listing of the benchmark and the truth about it."""

    listing_id: str
    split: str
    track: str
    variant: str  # the edit (copy, negative photos), "paste" (logos), "instore" (natural)
    positive: bool
    brand: str | None
    sku: str | None
    cheap: bool
    price: float
    title: str
    image: str  # relative to the listings file
    reference_price: float | None = None
    source: str = ""

    def listing(self) -> dict[str, Any]:
        """The line of the rescan input (the contract of ``counterlens rescan``)."""
        return {"listing_id": self.listing_id, "title": self.title, "price": round(self.price, 2),
                "currency": "USD", "seller_id": f"seller-{zlib.crc32(self.listing_id.encode()) % 97:02d}",
                "images": [self.image]}


@dataclass
class Benchmark:
    """Paths of a built benchmark and its truth."""

    root: Path
    manifest: Path
    listings: Path
    labels: Path
    queries: list[Query]
    products: list[Product]
    logos: list[LogoBrand]
    negative_logos: list[LogoBrand]
    seed: int
    size: str
    counts: dict[str, int] = field(default_factory=dict)

    def subset(self, name: str, keep: Iterable[Query], suffix: str = "") -> Path:
        """A listings file of some of the queries (ids suffixed so two runs never collide)."""
        path = self.root / "listings" / f"{name}.jsonl"
        with path.open("w") as fh:
            for q in keep:
                line = q.listing()
                line["listing_id"] += suffix
                fh.write(json.dumps(line) + "\n")
        return path


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _labels() -> list[dict[str, str]]:
    with (GROCERY / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _maker(cls: str) -> str:
    return "god-morgon" if cls.startswith("God-Morgon") else slug(cls.split("-")[0])


def skimage_photos() -> list[Path]:
    """Colour photos bundled with scikit-image (no download)."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    names = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
             "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "color.png",
             "brick.png", "grass.png", "gravel.png")
    return [folder / n for n in names if (folder / n).is_file()]


def _split_half(items: Sequence[Any], rng: np.random.Generator) -> dict[Any, str]:
    order = [items[i] for i in rng.permutation(len(items))]
    half = (len(order) + 1) // 2
    return {x: (SPLITS[0] if i < half else SPLITS[1]) for i, x in enumerate(order)}


def _balanced_split(brands_of_products: Sequence[str], rng: np.random.Generator) -> dict[str, str]:
    """Brands drawn into the splits, largest first (ties in random order), each into the split with fewer
    products so far, so that a brand with many products (arla has five) does not unbalance the splits."""
    count: dict[str, int] = {}
    for b in brands_of_products:
        count[b] = count.get(b, 0) + 1
    tiebreak = rng.permutation(len(count))
    # Largest brands first (then in random order), as in longest-processing-time scheduling.
    brands = sorted(sorted(count), key=lambda b: (-count[b], int(tiebreak[sorted(count).index(b)])))
    held = {s: 0 for s in SPLITS}
    out: dict[str, str] = {}
    for b in brands:
        s = min(SPLITS, key=lambda x: (held[x], SPLITS.index(x)))
        out[b] = s
        held[s] += count[b]
    return out


def _save(img: Image.Image, path: Path, quality: int = 92) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert("RGB").save(path, "JPEG", quality=quality)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def build(root: Path, seed: int = 0, size: str = "default") -> Benchmark:
    """Write the benchmark under ``root`` (catalog/, listings/) and return it."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    sz = SIZES[size]
    rng = np.random.default_rng(seed)
    rows = _labels()
    classes: dict[str, dict[str, str]] = {}
    instore: dict[str, list[Path]] = {}
    for r in rows:
        if r["is_catalogue"] == "1":
            classes[r["class"]] = r
        else:
            instore.setdefault(r["class"], []).append(GROCERY / r["path"])

    # ---------------------------------------------------------------- catalog products and the split
    packaged = sorted(c for c, r in classes.items() if r["top_class"] == "Packages")
    packaged = [packaged[i] for i in sorted(rng.choice(len(packaged), sz.packaged, replace=False))]
    coarse_produce = sorted({r["coarse_class"] for r in classes.values() if r["top_class"] != "Packages"})
    picked = rng.choice(len(coarse_produce), sz.produce_classes, replace=False)
    catalog_coarse = sorted(coarse_produce[i] for i in picked)
    outside_classes = sorted(c for c, r in classes.items()
                             if r["top_class"] != "Packages" and r["coarse_class"] not in catalog_coarse)
    produce = sorted(c for c, r in classes.items() if r["coarse_class"] in catalog_coarse
                     and r["top_class"] != "Packages")
    brand_of = {c: _maker(c) for c in packaged}
    brand_of |= {c: slug(classes[c]["coarse_class"]) + PRODUCE_SUFFIX for c in produce}
    brand_split = _balanced_split([brand_of[c] for c in packaged], rng)
    brand_split |= _balanced_split([brand_of[c] for c in produce], rng)
    products = [Product(brand=brand_of[c], sku=c, cls=c, image=GROCERY / classes[c]["path"],
                        price=round(float(np.exp(rng.uniform(np.log(1.2), np.log(12.0)))), 2),
                        split=brand_split[brand_of[c]], packaged=c in packaged)
                for c in sorted(brand_of)]

    pool = [s for s in LOGO_POOL if _has_icon(s)]
    chosen = [pool[i] for i in rng.choice(len(pool), sz.logos + sz.negative_logos, replace=False)]
    logo_split = _split_half(chosen[: sz.logos], rng)
    neg_logo_split = _split_half(chosen[sz.logos:], rng)
    logos = [LogoBrand(s, _icon_title(s), logo_split[s]) for s in chosen[: sz.logos]]
    negative_logos = [LogoBrand(s, _icon_title(s), neg_logo_split[s]) for s in chosen[sz.logos:]]

    outside_split = _split_half(outside_classes, rng)
    photos = skimage_photos()
    photo_split = _split_half(photos, rng)
    # Photos no listing of the catalog shows: backgrounds for pasted logos and the "background" edit.
    backgrounds: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for c in outside_classes:
        backgrounds[outside_split[c]] += instore[c]
    for photo in photos:
        backgrounds[photo_split[photo]].append(photo)

    root.mkdir(parents=True, exist_ok=True)
    manifest = _write_catalog(root / "catalog", products, logos)

    # ---------------------------------------------------------------- queries
    lst = root / "listings"
    (lst / "img").mkdir(parents=True, exist_ok=True)
    queries: list[Query] = []
    edits = {s: edits_for(backgrounds[s]) for s in SPLITS}

    def add(q: Query, img: Image.Image, quality: int = 92) -> None:
        _save(img, lst / q.image, quality)
        queries.append(q)

    def positive_price(p_ref: float, i: int) -> tuple[bool, float]:
        cheap = bool(i % 2 == 0)
        return cheap, p_ref * (rng.uniform(0.15, 0.45) if cheap else rng.uniform(0.9, 1.1))

    def title() -> str:
        return str(GENERIC_TITLES[int(rng.integers(0, len(GENERIC_TITLES)))])

    by_split = {s: [p for p in products if p.split == s] for s in SPLITS}
    for edit_name in EDIT_NAMES:
        for s in SPLITS:
            pool_s = by_split[s]
            n = min(len(pool_s), _share(sz.per_edit, s))
            for k, i in enumerate(rng.choice(len(pool_s), n, replace=False)):
                prod = pool_s[int(i)]
                cheap, price = positive_price(prod.price, k + int(rng.integers(0, 2)))
                lid = f"{s[0]}-copy-{edit_name}-{len(queries):05d}"
                img = edits[s][edit_name](_open(prod.image), rng)
                add(Query(lid, s, "copy", edit_name, True, prod.brand, prod.sku, cheap, price, title(),
                          f"img/{lid}.jpg", prod.price, str(prod.image.name)), img)

    for s in SPLITS:
        mine = [lg for lg in logos if lg.split == s]
        for k in range(_share(sz.logo_pastes, s)):
            lg = mine[k % len(mine)]
            lid = f"{s[0]}-logo-paste-{len(queries):05d}"
            img = _paste(lg.slug, backgrounds[s], rng)
            # No product match exists for a logo-only brand, so the price cannot make it risky.
            add(Query(lid, s, "logo", "paste", True, lg.slug, None, False,
                      float(np.exp(rng.uniform(np.log(1.0), np.log(15.0)))), title(), f"img/{lid}.jpg",
                      None, lg.slug), img)

    for s in SPLITS:
        mine_p = [p for p in by_split[s] if p.packaged]
        if not mine_p:
            continue
        n = _share(sz.natural, s)
        for k in range(n):
            prod = mine_p[k % len(mine_p)]
            photos_p = instore[prod.cls]
            src = photos_p[int(rng.integers(0, len(photos_p)))]
            cheap, price = positive_price(prod.price, k)
            lid = f"{s[0]}-natural-instore-{len(queries):05d}"
            add(Query(lid, s, "natural", "instore", True, prod.brand, prod.sku, cheap, price, title(),
                      f"img/{lid}.jpg", prod.price, str(src.name)), _open(src))

    for s in SPLITS:
        sources = [c for c in outside_classes if outside_split[c] == s]
        mine_photos = [ph for ph in photos if photo_split[ph] == s]
        n = _share(sz.negatives, s)
        names = ("none", *EDIT_NAMES)
        for k in range(n):
            # One in six negatives is a scikit-image photo (people, animals, vehicles, textures).
            if mine_photos and k % 6 == 5:
                src = mine_photos[int(rng.integers(0, len(mine_photos)))]
                base = random_square(_open(src), rng, int(rng.integers(224, 320)))
            else:
                cls = sources[int(rng.integers(0, len(sources)))]
                src = instore[cls][int(rng.integers(0, len(instore[cls])))]
                base = _open(src)
            edit_name = str(names[k % len(names)])
            edit: Edit | None = None if edit_name == "none" else edits[s][edit_name]
            lid = f"{s[0]}-negative-{edit_name}-{len(queries):05d}"
            add(Query(lid, s, "negative", edit_name, False, None, None, False, _random_price(rng), title(),
                      f"img/{lid}.jpg", None, str(src.name)), edit(base, rng) if edit else base)
        mine_l = [lg for lg in negative_logos if lg.split == s]
        for k in range(_share(sz.negative_pastes, s)):
            lg = mine_l[k % len(mine_l)]
            lid = f"{s[0]}-negative-logo-{len(queries):05d}"
            add(Query(lid, s, "negative", "logo", False, None, None, False, _random_price(rng), title(),
                      f"img/{lid}.jpg", None, lg.slug), _paste(lg.slug, backgrounds[s], rng))

    listings = lst / "listings.jsonl"
    with listings.open("w") as fh:
        for q in queries:
            fh.write(json.dumps(q.listing()) + "\n")
    labels = root / "labels.jsonl"
    with labels.open("w") as fh:
        for q in queries:
            fh.write(json.dumps(asdict(q)) + "\n")
    counts: dict[str, int] = {}
    for q in queries:
        counts[f"{q.split}/{q.track}"] = counts.get(f"{q.split}/{q.track}", 0) + 1
    return Benchmark(root, manifest, listings, labels, queries, products, logos, negative_logos, seed, size,
                     counts)


def _share(total: int, split: str) -> int:
    """The split's share of ``total`` (tune gets the odd one)."""
    return (total + 1) // 2 if split == SPLITS[0] else total // 2


def _random_price(rng: np.random.Generator) -> float:
    return float(np.exp(rng.uniform(np.log(0.3), np.log(15.0))))


def _has_icon(name: str) -> bool:
    import simple_icons_pack

    return simple_icons_pack.get_icon(name) is not None


def _icon_title(name: str) -> str:
    import simple_icons_pack

    icon = simple_icons_pack.get_icon(name)
    return str(icon.title) if icon is not None else name


def _paste(logo_slug: str, backgrounds: Sequence[Path], rng: np.random.Generator) -> Image.Image:
    src = backgrounds[int(rng.integers(0, len(backgrounds)))]
    photo = random_square(_open(src), rng, int(rng.integers(240, 320)))
    out = paste_logo(photo, render_logo(logo_slug, 256), rng)
    return jpeg(out, rng, quality=int(rng.integers(70, 92)))


def _write_catalog(folder: Path, products: Sequence[Product], logos: Sequence[LogoBrand]) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    manifest = folder / "catalog.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["brand", "sku", "kind", "image", "ref_id", "title", "price", "currency"])
        for p in products:
            name = f"images/{p.cls}.jpg"
            (folder / name).write_bytes(p.image.read_bytes())
            w.writerow([p.brand, p.sku, "product", name, f"ref-{p.cls}", p.cls.replace("-", " "),
                        f"{p.price:.2f}", "USD"])
        for lg in logos:
            name = f"images/logo-{lg.slug}.png"
            logo_on_white(lg.slug, 256).save(folder / name)
            w.writerow([lg.slug, "", "logo", name, f"logo-{lg.slug}", lg.title, "", ""])
    return manifest


def load_labels(path: Path) -> list[Query]:
    with path.open() as fh:
        return [Query(**json.loads(line)) for line in fh if line.strip()]


__all__ = ["SIZES", "SPLITS", "TRACKS", "TRACK_SIGNAL", "Benchmark", "Query", "build", "load_labels"]
