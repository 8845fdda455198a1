"""What OCR costs and what it reads, per detection setting: the numbers behind ``models.ocr_*``.

Listing photos with one word printed on them: grocery in-store photos (256 px, as the bench listings)
and the same photos enlarged 3x (768 px, a typical marketplace photo), each with a word of the
counterfeit vocabulary or a brand name drawn at 3-14 % of the photo's height, half on a sticker (a
plate of colour behind the text), half straight on the photo with a thin outline. For each setting of
the text detector (input size, min/max side, angle classifier on or off) and of the shipped reader
(detection size, lines recognised) the script prints the share of words read back and the milliseconds
per photo (median: detection, classifier, recognition; and the 95th percentile), on one thread. The
photos' own packaging text competes with the printed word when the reader recognises only the lines
with the largest lettering (``models.ocr_max_lines``).

    .venv/bin/python scripts/bench_ocr.py --n 60
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts/ is not a package on sys.path when run as a file
    sys.path.insert(0, str(REPO))

from embeddings.ocr import RapidOcrReader  # noqa: E402

GROCERY = REPO.parent / "shared" / "data" / "grocery-dev"
WORDS = ("REPLICA", "1:1", "AAA", "Nachbildung", "COUNTERFEIT", "Fake", "Arla", "Tropicana", "Garant",
         "Alpro", "Kopie", "mirror quality")
console = Console(width=140)


@dataclass(frozen=True)
class Case:
    pixels: np.ndarray
    word: str
    size: str  # "256" or "768"
    small: bool  # the text is under 6 % of the photo's height


def _normal(text: str) -> str:
    return "".join(text.lower().split())


def _cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    paths = sorted((GROCERY / "instore").glob("*/*.jpg"))
    rng.shuffle(paths)
    out: list[Case] = []
    for i in range(n):
        with Image.open(paths[i % len(paths)]) as im:
            base = im.convert("RGB")
        for scale in (1, 3):
            img = base.resize((base.width * scale, base.height * scale), Image.Resampling.BICUBIC)
            word = rng.choice(WORDS)
            frac = rng.uniform(0.03, 0.14)
            height = max(8, int(img.height * frac))
            font = ImageFont.load_default(size=height)
            draw = ImageDraw.Draw(img)
            x0, y0, x1, y1 = (int(v) for v in draw.textbbox((0, 0), word, font=font))
            w, h = x1 - x0, y1 - y0
            if w >= img.width - 4:  # too long for the photo at this size: shrink to fit
                font = ImageFont.load_default(size=max(8, int(height * (img.width - 8) / w)))
                x0, y0, x1, y1 = (int(v) for v in draw.textbbox((0, 0), word, font=font))
                w, h = x1 - x0, y1 - y0
            x = rng.randint(2, max(2, img.width - w - 2)) - x0
            y = rng.randint(2, max(2, img.height - h - 2)) - y0
            if i % 2 == 0:  # a sticker
                pad = max(2, h // 4)
                plate = rng.choice([(255, 255, 255), (230, 30, 30), (250, 220, 0)])
                draw.rectangle((x + x0 - pad, y + y0 - pad, x + x1 + pad, y + y1 + pad), fill=plate)
                draw.text((x, y), word, font=font, fill=(0, 0, 0) if plate != (230, 30, 30) else (255, 255, 255))
            else:
                fill, stroke = rng.choice([((255, 255, 255), (0, 0, 0)), ((0, 0, 0), (255, 255, 255))])
                draw.text((x, y), word, font=font, fill=fill, stroke_width=max(1, height // 16), stroke_fill=stroke)
            out.append(Case(np.asarray(img), word, "256" if scale == 1 else "768", frac < 0.06))
    return out


def _engine(limit_type: str, side: int, use_cls: bool) -> Any:
    from rapidocr_onnxruntime import RapidOCR

    # "fit" resizes the photo here (below); rapidocr then runs at that size ("min" below 32 px: never
    # enlarged). Its own "max" ignores the side given and picks 960, 1500 or 2000.
    if limit_type == "fit":
        limit_type, side = "min", 32
    return RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1, det_limit_type=limit_type,
                    det_limit_side_len=side, use_cls=use_cls)


def _fit(pixels: np.ndarray, side: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))


def _run(setting: str, cases: list[Case]) -> tuple[dict[str, list[bool]], dict[str, list[tuple[float, ...]]]]:
    """Each case read once with ``setting``: whether its word came back, and (total, det, cls, rec) ms."""
    limit_type, side, *rest = setting.split(":")
    read: dict[str, list[bool]] = {"256": [], "768": [], "small": []}
    ms: dict[str, list[tuple[float, ...]]] = {"256": [], "768": []}
    if limit_type == "reader":  # the shipped path: embeddings.ocr.RapidOcrReader
        reader = RapidOcrReader(intra_op_threads=1, detect_side=int(side), max_lines=int(rest[0]) if rest else 6)
        reader.read(cases[0].pixels)  # loads the models
    else:
        engine = _engine(limit_type, int(side), bool(rest and rest[0] == "cls"))
        engine(np.ascontiguousarray(cases[0].pixels[:, :, ::-1]))  # warm-up: the first call allocates
    for case in cases:
        t = time.perf_counter()
        if limit_type == "reader":
            texts = _normal(" ".join(line.text for line in reader.read(case.pixels)))
            parts: tuple[float, ...] = (math.nan, math.nan, math.nan)
        else:
            pixels = _fit(case.pixels, int(side)) if limit_type == "fit" else case.pixels
            result, elapse = engine(np.ascontiguousarray(pixels[:, :, ::-1]))
            texts = _normal(" ".join(str(r[1]) for r in result or []))
            parts = tuple(float(e) * 1000 for e in (elapse or [0.0, 0.0, 0.0]))
        total = (time.perf_counter() - t) * 1000
        found = _normal(case.word) in texts
        read[case.size].append(found)
        if case.small:
            read["small"].append(found)
        ms[case.size].append((total, *parts))
    return read, ms


def _cell(rows: list[tuple[float, ...]]) -> str:
    total, det, cls, rec = (statistics.median(r[k] for r in rows) for k in range(4))
    p95 = float(np.percentile([r[0] for r in rows], 95))
    parts = "" if math.isnan(det) else f" ({det:.0f}/{cls:.0f}/{rec:.0f})"
    return f"{total:.0f}{parts}, p95 {p95:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60, help="photos (each used at 256 and 768 px)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default="min:736:cls,fit:480,reader:480:0,reader:480:4,reader:480:6,reader:480:8",
                    help="comma-separated limit_type:side[:cls] (min, max: rapidocr's own resizing; fit: the "
                         "photo resized to that longer side first) or reader:side[:max_lines] "
                         "(embeddings.ocr.RapidOcrReader, with its angle classifier; max_lines 0: every line, "
                         "default 6)")
    args = ap.parse_args()
    cases = _cases(args.n, args.seed)
    table = Table(title=f"OCR on {len(cases)} photos with a printed word (one thread)")
    for col in ("setting", "read 256 px", "read 768 px", "read, text < 6 %", "ms 256 px (det/cls/rec), p95",
                "ms 768 px (det/cls/rec), p95"):
        table.add_column(col, justify="right")
    for setting in args.settings.split(","):
        read, ms = _run(setting, cases)
        table.add_row(setting, f"{np.mean(read['256']):.2f}", f"{np.mean(read['768']):.2f}",
                      f"{np.mean(read['small']):.2f} of {len(read['small'])}", _cell(ms["256"]), _cell(ms["768"]))
    console.print(table)
    console.print("ms: median total per photo (median detection / angle classifier / recognition), and the "
                  "95th percentile of the total")


if __name__ == "__main__":
    main()
