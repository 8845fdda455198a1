"""The demo catalog the README's start command loads: real images that package registries provide.

Product photos come from scikit-image's bundled data (``skimage.data``), logos from the PyPI package
``simple-icons-pack`` (CC0 SVGs of the simple-icons project) rendered with cairosvg. The files are
written into ``<data_dir>/demo/`` with a catalog manifest, plus sample listing photos for the README's
``curl`` examples, so the demo goes through the same ``catalog import`` path as any brand's catalog.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance


@dataclass(frozen=True)
class DemoProduct:
    brand: str
    sku: str
    title: str
    price: float
    skimage_name: str


# Brand slugs match simple-icons slugs so each demo brand gets its real logo.
DEMO_PRODUCTS = (
    DemoProduct("starbucks", "SB-ESPRESSO-CUP", "Starbucks espresso cup", 18.0, "coffee"),
    DemoProduct("ducati", "DU-MONSTER-821", "Ducati Monster 821 motorcycle", 11_500.0, "motorcycle_left"),
    DemoProduct("nasa", "NASA-ROCKET-POSTER", "NASA rocket launch poster", 35.0, "rocket"),
    DemoProduct("nasa", "NASA-ASTRONAUT-POSTER", "NASA astronaut poster", 35.0, "astronaut"),
)
AUTHORIZED_SELLERS = {"starbucks": ["starbucks-store"], "ducati": ["ducati-official"], "nasa": ["nasa-shop"]}


def _skimage_photo(name: str) -> Image.Image:
    """A photo shipped inside scikit-image's wheel (``skimage/data/<name>.png|jpg``), no download."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    for ext in (".png", ".jpg"):
        path = folder / f"{name}{ext}"
        if path.is_file():
            with Image.open(path) as img:
                return img.convert("RGB")
    raise FileNotFoundError(f"scikit-image ships no photo {name!r}")


def render_logo(slug: str, size: int = 256) -> Image.Image:
    """A simple-icons logo in its brand colour on a transparent background (RGBA)."""
    import cairosvg
    import simple_icons_pack

    icon = simple_icons_pack.get_icon(slug)
    if icon is None:
        raise KeyError(f"simple-icons has no icon {slug!r}")
    colour = icon.hex if icon.hex.upper() != "FFFFFF" else "000000"
    svg = icon.svg.replace("<svg ", f'<svg fill="#{colour}" ', 1)
    png = cairosvg.svg2png(bytestring=svg.encode(), output_width=size, output_height=size)
    return Image.open(io.BytesIO(png)).convert("RGBA")


def logo_on_white(slug: str, size: int = 256) -> Image.Image:
    logo = render_logo(slug, size)
    canvas = Image.new("RGB", logo.size, "white")
    canvas.paste(logo, mask=logo.split()[3])
    return canvas


def write_demo(directory: Path) -> Path:
    """Write the demo images, sample listings and ``catalog.csv``; returns the manifest path."""
    directory.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for p in DEMO_PRODUCTS:
        path = directory / f"{p.sku.lower()}.jpg"
        if not path.exists():
            _skimage_photo(p.skimage_name).save(path, quality=92)
        rows.append({"brand": p.brand, "sku": p.sku, "kind": "product", "image": path.name,
                     "ref_id": f"{p.sku.lower()}-1", "title": p.title, "price": f"{p.price:.2f}",
                     "currency": "USD"})
    for brand in sorted({p.brand for p in DEMO_PRODUCTS}):
        path = directory / f"logo-{brand}.png"
        if not path.exists():
            logo_on_white(brand).save(path)
        rows.append({"brand": brand, "sku": "", "kind": "logo", "image": path.name, "ref_id": f"logo-{brand}",
                     "title": "", "price": "", "currency": ""})
    manifest = directory / "catalog.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["brand", "sku", "kind", "image", "ref_id", "title", "price", "currency"])
        w.writeheader()
        w.writerows(rows)
    _write_sample_listings(directory)
    return manifest


def _write_sample_listings(directory: Path) -> None:
    """Photos a counterfeiter might post: an edited copy of an official photo, a logo on another product,
    and an unrelated photo."""
    coffee = _skimage_photo("coffee")
    w, h = coffee.size
    edited = coffee.crop((int(w * 0.1), int(h * 0.08), int(w * 0.92), int(h * 0.95)))
    edited = ImageEnhance.Color(edited).enhance(1.3)
    ImageDraw.Draw(edited).text((10, 10), "BEST PRICE", fill=(255, 255, 255))
    edited.save(directory / "listing-copy.jpg", quality=70)
    cat = _skimage_photo("chelsea")
    logo = render_logo("starbucks", int(cat.width * 0.25))
    cat.paste(logo, (int(cat.width * 0.6), int(cat.height * 0.1)), logo)
    cat.save(directory / "listing-logo.jpg", quality=85)
    _skimage_photo("chelsea").save(directory / "listing-unrelated.jpg", quality=85)
