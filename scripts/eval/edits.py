"""The image edits of the detection benchmark: what a counterfeiter (or a reseller) does to an official
product photo before re-using it, and how a small logo ends up on another product.

Every edit is a pure function ``(image, rng) -> image`` of a PIL RGB image and a seeded numpy generator,
so a benchmark built with the same seed is the same benchmark, byte for byte.
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps
from scipy import ndimage

Edit = Callable[[Image.Image, np.random.Generator], Image.Image]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow >= 10.1 bundles a scalable default font; no font file is needed.
    return ImageFont.load_default(size=max(8, size))


def crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A window of 55-80 % of each side at a random place (a seller cutting the photo down)."""
    w, h = img.size
    fw, fh = rng.uniform(0.55, 0.80), rng.uniform(0.55, 0.80)
    cw, ch = max(16, int(w * fw)), max(16, int(h * fh))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """10-25 degrees either way, the corners filled white (as a studio background)."""
    angle = float(rng.uniform(10, 25) * rng.choice([-1.0, 1.0]))
    return img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(255, 255, 255))


def jpeg(img: Image.Image, rng: np.random.Generator, quality: int = 30) -> Image.Image:
    """Re-encoded as JPEG at quality 30 (heavy block artefacts)."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def colour_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation each scaled by 0.6-1.4."""
    out = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.6, 1.4))
    return ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))


def hue_shift(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The hue turned by 30-90 degrees either way (a recoloured package)."""
    shift = float(rng.uniform(30, 90) * rng.choice([-1.0, 1.0])) / 360.0
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(shift * 255)) % 256).astype(np.uint8)
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _ui_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.0, 0.35), rng.uniform(0.15, 0.97)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def screenshot_border(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The photo as a screenshot of a shop page: status bar, address bar with text, a frame and a
    bottom navigation bar around it; the photo takes 55-75 % of the screenshot's area."""
    w, h = img.size
    top = int(h * rng.uniform(0.12, 0.22))
    bottom = int(h * rng.uniform(0.08, 0.16))
    side = int(w * rng.uniform(0.03, 0.10))
    canvas = Image.new("RGB", (w + 2 * side, h + top + bottom), _ui_colour(rng))
    draw = ImageDraw.Draw(canvas)
    bar = _ui_colour(rng)
    draw.rectangle((0, 0, canvas.width, top // 3), fill=bar)
    ink = (20, 20, 20) if sum(bar) > 380 else (235, 235, 235)
    draw.text((4, 1), "9:41", fill=ink, font=_font(max(8, top // 4)))
    draw.rounded_rectangle((side, top // 3 + 3, canvas.width - side, top - 4), radius=6,
                           fill=(245, 245, 245), outline=(180, 180, 180))
    draw.text((side + 6, top // 3 + 5), "shop.example/item/" + str(int(rng.integers(1000, 99999))),
              fill=(60, 60, 60), font=_font(max(8, top // 4)))
    canvas.paste(img, (side, top))
    y0 = top + h
    draw.rectangle((0, y0, canvas.width, canvas.height), fill=_ui_colour(rng))
    for i in range(4):
        cx = int((i + 0.5) * canvas.width / 4)
        draw.ellipse((cx - 5, y0 + bottom // 2 - 5, cx + 5, y0 + bottom // 2 + 5), fill=(128, 128, 128))
    return canvas


def text_overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A price sticker and a "SALE" banner drawn over the photo."""
    out = img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    bh = int(h * rng.uniform(0.12, 0.2))
    y = int(rng.choice([0, h - bh]))
    draw.rectangle((0, y, w, y + bh), fill=(200 + int(rng.integers(0, 55)), 20, 30))
    draw.text((w // 10, y + bh // 8), str(rng.choice(["SALE -50%", "SALE", "HOT DEAL", "-70% TODAY"])),
              fill=(255, 255, 255), font=_font(int(bh * 0.7)))
    price = f"${rng.uniform(0.5, 9.9):.2f}"
    fs = int(h * rng.uniform(0.1, 0.16))
    px = int(rng.integers(0, max(1, w - fs * 3)))
    py = int(rng.integers(bh if y == 0 else 0, max(bh + 1, h - fs - (bh if y != 0 else 0))))
    draw.rectangle((px, py, px + int(fs * 2.8), py + int(fs * 1.2)), fill=(255, 230, 0))
    draw.text((px + 3, py + 1), price, fill=(0, 0, 0), font=_font(fs))
    return out


def rescale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Down to 25-45 % of the size and back up (a thumbnail blown up again)."""
    w, h = img.size
    f = rng.uniform(0.25, 0.45)
    small = img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BILINEAR)
    return small.resize((w, h), Image.Resampling.BICUBIC)


def mirror(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Flipped left to right."""
    return ImageOps.mirror(img)


def product_mask(img: Image.Image, white: int = 232) -> np.ndarray:
    """The product in a studio photo on white: pixels not near white, holes filled, specks removed."""
    px = np.asarray(img.convert("RGB")).astype(np.int16)
    fg = px.min(axis=2) < white
    fg = ndimage.binary_closing(fg, iterations=2)
    fg = ndimage.binary_fill_holes(fg)
    fg = ndimage.binary_opening(fg, iterations=2)
    labels, n = ndimage.label(fg)
    if n > 1:  # keep the components that make up most of the product, drop dust
        sizes = ndimage.sum(fg, labels, range(1, n + 1))
        keep = [i + 1 for i, s in enumerate(sizes) if s >= 0.05 * sizes.max()]
        fg = np.isin(labels, keep)
    return np.asarray(fg, dtype=bool)


def new_background(backgrounds: list[Path]) -> Edit:
    """The product cut from its white studio background (threshold mask) and pasted onto another photo
    or texture, at 55-85 % of the new picture's shorter side."""

    def edit(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        mask = product_mask(img)
        if mask.sum() < 0.02 * mask.size:  # nothing to cut out: not a studio photo
            mask = np.ones_like(mask)
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        product = img.crop(box)
        alpha = Image.fromarray((mask[box[1]:box[3], box[0]:box[2]] * 255).astype(np.uint8))
        alpha = alpha.filter(ImageFilter.GaussianBlur(0.8))
        with Image.open(backgrounds[int(rng.integers(0, len(backgrounds)))]) as bg_file:
            bg = bg_file.convert("RGB")
        side = int(rng.integers(256, 320))
        bg = random_square(bg, rng, side)
        scale = rng.uniform(0.55, 0.85) * side / max(product.size)
        size = (max(8, int(product.width * scale)), max(8, int(product.height * scale)))
        product = product.resize(size, Image.Resampling.BICUBIC)
        alpha = alpha.resize(size, Image.Resampling.BILINEAR)
        x = int(rng.integers(0, side - size[0] + 1))
        y = int(rng.integers(0, side - size[1] + 1))
        bg.paste(product, (x, y), alpha)
        return bg

    return edit


def random_square(img: Image.Image, rng: np.random.Generator, side: int) -> Image.Image:
    """A random square window of 60-100 % of the shorter side, resized to ``side``."""
    w, h = img.size
    s = int(min(w, h) * rng.uniform(0.6, 1.0))
    x = int(rng.integers(0, w - s + 1))
    y = int(rng.integers(0, h - s + 1))
    return img.crop((x, y, x + s, y + s)).resize((side, side), Image.Resampling.BICUBIC)


def paste_logo(photo: Image.Image, logo: Image.Image, rng: np.random.Generator,
               width: tuple[float, float] = (0.15, 0.30)) -> Image.Image:
    """``logo`` (RGBA, transparent around the mark) pasted at 15-30 % of the photo's width somewhere
    inside it, sometimes on a light label as printed marks often are."""
    out = photo.copy()
    w, h = out.size
    lw = max(12, int(w * rng.uniform(*width)))
    lh = max(6, int(logo.height * lw / logo.width))
    mark = logo.resize((lw, lh), Image.Resampling.LANCZOS)
    x = int(rng.integers(int(w * 0.05), max(int(w * 0.05) + 1, int(w * 0.95) - lw)))
    y = int(rng.integers(int(h * 0.05), max(int(h * 0.05) + 1, int(h * 0.95) - lh)))
    if rng.uniform() < 0.35:
        pad = max(2, lw // 10)
        ImageDraw.Draw(out).rectangle((x - pad, y - pad, x + lw + pad, y + lh + pad), fill=(250, 250, 250))
    out.paste(mark, (x, y), mark.split()[3])
    return out


def edits_for(backgrounds: list[Path]) -> dict[str, Edit]:
    """Every edit of the copy track, by name (the order is the order of the tables)."""
    return {
        "crop": crop,
        "rotate": rotate,
        "jpeg30": jpeg,
        "colour_jitter": colour_jitter,
        "hue_shift": hue_shift,
        "screenshot": screenshot_border,
        "text_overlay": text_overlay,
        "rescale": rescale,
        "mirror": mirror,
        "background": new_background(backgrounds),
    }


EDIT_NAMES: tuple[str, ...] = ("crop", "rotate", "jpeg30", "colour_jitter", "hue_shift", "screenshot",
                               "text_overlay", "rescale", "mirror", "background")
