"""A small real world for the rescan tests, built once per test session and shared by tests/usecases and
tests/e2e: the configured models exported once, a catalog of four brands imported from grocery-dev
catalogue photos, and a folder of listing photos (edited copies of catalogue photos, in-store photos).

Every test gets its own data dir (:func:`fresh_data_dir`: a copy of the seeded database and indexes, the
models linked) and its own listings folder (:func:`listings_dir`), so tests never see each other's scores.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageEnhance

from service.container import build_container
from service.domain.ports import ImageEmbedder
from service.settings import Settings

# Brands and the grocery-dev catalogue photos they own. Yoggi's vanilla yoghurt is NOT in the seeded
# catalog: the stored-rescan test adds it later.
CATALOG = {
    "arla": ["Arla-Natural-Yoghurt", "Arla-Sour-Milk", "Arla-Standard-Milk"],
    "alpro": ["Alpro-Shelf-Soy-Milk", "Alpro-Vanilla-Soyghurt"],
    "tropicana": ["Tropicana-Apple-Juice", "Tropicana-Mandarin-Morning"],
    "garant": ["Garant-Ecological-Standard-Milk"],
}
LATE_REFERENCE = ("yoggi", "Yoggi-Vanilla-Yoghurt")
REFERENCE_PRICE = 20.0
INSTORE_PHOTOS = 60

# Fast, deterministic scoring for tests: the logo crop search and OCR are not what rescans test.
ENV = {"COUNTERLENS_SCORING__LOGO_SEARCH": "never", "COUNTERLENS_MODELS__OCR": "never"}


def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, scoring={"logo_search": "never"}, models={"ocr": "never"})


def env(data_dir: Path) -> dict[str, str]:
    """The environment a CLI run (in-process or a subprocess) needs to use ``data_dir``."""
    return {**ENV, "COUNTERLENS_DATA_DIR": str(data_dir)}


@dataclass(frozen=True)
class World:
    root: Path
    models: Path  # the session's exported models, linked into every data dir
    seed: Path  # data dir with the catalog imported
    photos: Path  # listing photos
    embedders: dict[str, ImageEmbedder]  # the models, loaded once for in-process containers
    copies: dict[str, str]  # sku -> photo file name of an edited copy of its catalogue photo
    instore: list[tuple[str, str]]  # (class, photo file name)
    late_photo: Path  # the catalogue photo of LATE_REFERENCE


_lock = threading.Lock()
_world: World | None = None


def _edited_copy(src: Path, dst: Path) -> None:
    """What a counterfeiter posts: the official photo cropped, scaled, brightened and recompressed."""
    with Image.open(src) as opened:
        im = opened.convert("RGB")
    w, h = im.size
    im = im.crop((w // 20, h // 20, w - w // 20, h - h // 20)).resize((int(w * 0.8), int(h * 0.8)))
    ImageEnhance.Brightness(im).enhance(1.1).save(dst, "JPEG", quality=70)


def world(root: Path, grocery: Path, shared_models: tuple[Path, dict[str, Any]]) -> World:
    """The session's world (built on the first call, under ``root``), on the session's exported models
    (the ``shared_models`` fixture of tests/conftest.py)."""
    global _world
    with _lock:
        if _world is None:
            _world = _build(root, grocery, *shared_models)
        return _world


def _build(root: Path, grocery: Path, models: Path, embedders: dict[str, ImageEmbedder]) -> World:

    seed = root / "seed"
    seed.mkdir()
    os.symlink(models, seed / "models")
    cat = root / "catalog"
    cat.mkdir()
    with (cat / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["brand", "sku", "kind", "image", "ref_id", "title", "price", "currency"])
        for brand, skus in CATALOG.items():
            for sku in skus:
                shutil.copy(grocery / "catalogue" / f"{sku}.jpg", cat / f"{sku}.jpg")
                w.writerow([brand, sku, "product", f"{sku}.jpg", f"ref-{sku}", sku.replace("-", " "),
                            f"{REFERENCE_PRICE:.2f}", "USD"])
    c = build_container(settings(seed), embedders=embedders)
    try:
        report = c.catalog.import_manifest(cat / "manifest.csv")
        assert report.errors == [] and report.added == sum(len(v) for v in CATALOG.values()), report
    finally:
        c.close()

    photos = root / "photos"
    photos.mkdir()
    copies: dict[str, str] = {}
    for sku in [s for skus in CATALOG.values() for s in skus] + [LATE_REFERENCE[1]]:
        name = f"copy-{sku}.jpg"
        _edited_copy(grocery / "catalogue" / f"{sku}.jpg", photos / name)
        copies[sku] = name
    with (grocery / "labels.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["is_catalogue"] == "0"]
    by_class: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_class.setdefault(r["class"], []).append(r)
    instore: list[tuple[str, str]] = []
    depth = 0
    while len(instore) < INSTORE_PHOTOS:  # round robin over classes: every kind of product shows up
        for cls in sorted(by_class):
            if depth < len(by_class[cls]) and len(instore) < INSTORE_PHOTOS:
                name = f"store-{len(instore):03d}.jpg"
                shutil.copy(grocery / by_class[cls][depth]["path"], photos / name)
                instore.append((cls, name))
        depth += 1
    return World(root=root, models=models, seed=seed, photos=photos, embedders=embedders, copies=copies,
                 instore=instore, late_photo=grocery / "catalogue" / f"{LATE_REFERENCE[1]}.jpg")


def fresh_data_dir(w: World, dst: Path) -> Path:
    """A data dir of its own holding the seeded catalog (the models are linked, not copied)."""
    shutil.copytree(w.seed, dst, symlinks=True)
    return dst


def listings_dir(w: World, dst: Path) -> Path:
    """A folder with ``photos/`` beside which a test writes its listings file."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(w.photos, dst / "photos")
    return dst


def listing(listing_id: str, photo: str | None, *, price: float = REFERENCE_PRICE, title: str = "dairy",
            **extra: Any) -> dict[str, Any]:
    return {"listing_id": listing_id, "title": title, "price": price, "currency": "USD", "seller_id": "s-1",
            "images": [f"photos/{photo}"] if photo else [], **extra}


def engine_rows(w: World, instore: int) -> list[dict[str, Any] | str]:
    """The rows the engine comparisons score: four cheap edited copies of catalog photos (flagged), then
    ``instore`` in-store photos at the reference price."""
    rows: list[dict[str, Any] | str] = [
        listing(f"copy-{sku}", name, price=4.0) for sku, name in list(w.copies.items())[:4]]
    rows += [listing(f"store-{i}", name) for i, (_, name) in enumerate(w.instore[:instore])]
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any] | str]) -> Path:
    with path.open("w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [json.loads(line) for line in fh]


def assert_same_results(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Equal results up to float noise: same ids, verdicts, brands, reasons, matches; risks within 1e-6."""
    ia = {r["listing_id"]: r for r in a}
    ib = {r["listing_id"]: r for r in b}
    assert len(ia) == len(a) and len(ib) == len(b), "duplicate listing ids"
    assert ia.keys() == ib.keys()
    for lid, ra in ia.items():
        rb = ib[lid]
        assert ra["verdict"] == rb["verdict"], lid
        assert abs(ra["risk"] - rb["risk"]) <= 1e-6, lid
        assert ra["brand"] == rb["brand"], lid
        assert ra["reasons"] == rb["reasons"], lid
        assert len(ra["matches"]) == len(rb["matches"]), lid
        for ma, mb in zip(ra["matches"], rb["matches"], strict=True):
            assert {k: v for k, v in ma.items() if k != "similarity"} == \
                   {k: v for k, v in mb.items() if k != "similarity"}, lid
            assert abs(ma["similarity"] - mb["similarity"]) <= 1e-4, lid
