"""What logo search by template costs: ms a photo to look for every logo of catalogs of several sizes
(``logo_templates.mode=always``) and for one brand's logo (what the cascade does for a listing tied to a
brand), beside the raw embedding throughput of the configured models measured in the same run.

    .venv/bin/python scripts/bench_logo_templates.py --models-from /tmp/cl-demo [--logos 12 50] [--photos 60]

Photos are in-store grocery-dev photos, half of them with a catalog logo pasted at 15-30 % of the width
(the search's cost hardly depends on whether a logo is there: the coarse search runs either way).
Logos are simple-icons marks rendered on white, as a brand would upload them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
GROCERY = REPO.parent / "shared" / "data" / "grocery-dev"

from benchlib import best_raw_model_rate  # noqa: E402

from index.logo_templates import TemplateLogoLocator  # noqa: E402
from service.container import build_embedders, build_logo_locator  # noqa: E402
from service.demo import logo_on_white, render_logo  # noqa: E402
from service.settings import Settings  # noqa: E402


def slugs(n: int, seed: int = 0) -> list[str]:
    """``n`` simple-icons slugs whose marks have a silhouette on white, in a seeded order."""
    import simple_icons_pack

    names = sorted(a[3:].lower() for a in dir(simple_icons_pack) if a.startswith("SI_"))
    rng = np.random.default_rng(seed)
    return [str(s) for s in rng.permutation(names)[: 3 * n]]


def photos(n: int, logos: list[str], seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    paths = sorted((GROCERY / "instore").glob("*/*.jpg"))
    out = []
    for k in range(n):
        img = Image.open(paths[int(rng.integers(len(paths)))]).convert("RGB")
        img.thumbnail((640, 640))
        if k % 2 == 0:
            w = int(img.width * rng.uniform(0.15, 0.30))
            mark = render_logo(logos[k % len(logos)], 256).resize((w, w))
            img.paste(mark, (int(rng.integers(0, img.width - w)), int(rng.integers(0, img.height - w))), mark)
        out.append(np.asarray(img))
    return out


def per_photo_ms(locator: TemplateLogoLocator, pixels: list[np.ndarray], only: list[int] | None) -> float:
    locator.locate(pixels[0], only=only)  # warm-up
    t = time.perf_counter()
    for p in pixels:
        locator.locate(p, only=only)
    return (time.perf_counter() - t) / len(pixels) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-from", type=Path, required=True, help="a data dir with exported models")
    ap.add_argument("--logos", type=int, nargs="+", default=[12, 50])
    ap.add_argument("--photos", type=int, default=60)
    args = ap.parse_args()
    if args.photos < 1 or min(args.logos) < 1:
        ap.error("--photos and every --logos count must be at least 1")
    console = Console()
    settings = Settings(data_dir=args.models_from)

    largest = max(args.logos)
    made: list[tuple[str, np.ndarray]] = []
    unrendered = []
    for slug in track(slugs(largest), description="rendering logos", console=console):
        if len(made) == largest:
            break
        try:
            made.append((slug, np.asarray(logo_on_white(slug, 256))))
        except (KeyError, ValueError) as exc:  # not an icon slug, or an SVG cairosvg cannot render
            unrendered.append(f"{slug} ({exc})")
    if unrendered:
        console.print(f"{len(unrendered)} names skipped, e.g. {unrendered[0]}")
    pixels = photos(args.photos, [s for s, _ in made])

    embedders, _ = build_embedders(settings)
    raw, raw_how = best_raw_model_rate(list(embedders.values()), pixels)

    table = Table(title=f"logo templates, {len(pixels)} photos (raw models: {raw:.1f} photos/s at their best, "
                        f"{raw_how})")
    for col in ("logos", "searched", "ms / photo", "photos / s", "ratio to raw"):
        table.add_column(col, justify="right")
    for n in sorted(args.logos):
        locator = build_logo_locator(settings)
        indexed = [i for i, (_, px) in enumerate(made[:n]) if locator.add(i, px)]
        for label, only in (("every logo", None), ("one brand's", indexed[:1])):
            ms = per_photo_ms(locator, pixels, only)
            table.add_row(str(len(indexed)), label, f"{ms:.1f}", f"{1000 / ms:.1f}", f"{1000 / ms / raw:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
