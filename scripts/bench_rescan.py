"""Rescan throughput on this machine: listings per second of ``counterlens rescan`` (the same use case and
engine as the CLI, in-process) for

``cold``    every photo new: decoded, embedded by every configured model, matched, stored;
``cached``  the same file again in a fresh container: every embedding comes from the database cache;
``stored``  ``rescan --stored``: every stored listing re-matched from its stored embeddings, the catalog
            unchanged (every result equals the stored one, so nothing is written);
``stored changed``  the same after a brand added a second photo of every product (most results change
            and are written);
``near``    the background job after a brand added one reference: listings near it re-matched, the
            others only read;

beside the raw embedding throughput of the configured models measured in the same run (photos per
second through all of them, preprocessing included, at the best of batches 1, 4 and 16), and the ratio
of the cold rate to it (1.0 would mean a rescan costs no more than the models do).

The input: ``--n`` listings (default 2000) with one photo each, all distinct: the grocery-dev photos
and re-encoded, cropped, brightened variants of them; the catalog: grocery-dev's 41 catalogue photos as
the references of 12 brands. Everything lives in a temporary data dir (``--keep`` keeps it).

    .venv/bin/python scripts/bench_rescan.py [--n 2000] [--workers 6] [--logo-search never|always]
                                             [--profile cold|cached|stored|stored_changed] [--json out.json]

``--profile PHASE`` runs that phase under cProfile (every thread, via ``threading.setprofile``) and
prints the top functions by cumulative and own time (a stored phase: with ``--stored-processes 1``).
The stored runs use ``rescan --stored``'s defaults: one worker process per CPU, one thread each
(``--stored-processes``, ``--stored-workers``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import csv
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GROCERY = REPO.parent / "shared" / "data" / "grocery-dev"
T = TypeVar("T")

from benchlib import best_raw_model_rate  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

from embeddings.thread_batcher import ThreadBatcher  # noqa: E402
from service.container import Container, build_container, build_embedders  # noqa: E402
from service.domain.model import ReferenceKind  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.usecases.catalog import ReferenceUpload  # noqa: E402
from service.usecases.rescan import (  # noqa: E402
    FileRescan,
    ListingRescanner,
    StoredRescanJob,
    ThreadedEngine,
    default_chunk,
    default_processes,
    default_stored_processes,
    default_stored_workers,
)
from service.usecases.rescan_io import JsonlJournal  # noqa: E402
from service.usecases.rescan_processes import ProcessEngine  # noqa: E402


def brand_of(cls: str) -> str:
    head = cls.split("-")[0].lower()
    return head if head in {"alpro", "arla", "bravo", "garant", "god", "tropicana", "yoggi"} else "fresh"


def write_catalog(folder: Path) -> Path:
    folder.mkdir(parents=True)
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["brand", "sku", "kind", "image", "ref_id", "title", "price", "currency"])
        for p in sorted((GROCERY / "catalogue").glob("*.jpg")):
            shutil.copy(p, folder / p.name)
            w.writerow([brand_of(p.stem), p.stem, "product", p.name, f"ref-{p.stem}", p.stem.replace("-", " "),
                        "20.00", "USD"])
    return manifest


def variant(src: Path, k: int) -> bytes:
    """The k-th distinct re-encoding of a photo (k = 0: the file as it is)."""
    if k == 0:
        return src.read_bytes()
    with Image.open(src) as opened:
        im = opened.convert("RGB")
    w, h = im.size
    d = 1 + k % 7
    im = im.crop((d, d, w - d, h - d))
    im = ImageEnhance.Brightness(im).enhance(1.0 + 0.03 * ((k % 5) - 2))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=70 + (k * 7) % 25)
    return buf.getvalue()


def write_listings(folder: Path, n: int) -> Path:
    """``n`` listings with one distinct photo each, one a line."""
    photos = folder / "photos"
    photos.mkdir(parents=True)
    with (GROCERY / "labels.csv").open(newline="") as fh:
        sources = [GROCERY / r["path"] for r in csv.DictReader(fh)]
    listings = folder / "listings.jsonl"
    with listings.open("w") as fh:
        for i in range(n):
            src = sources[i % len(sources)]
            name = f"p{i:06d}.jpg"
            (photos / name).write_bytes(variant(src, i // len(sources)))
            price = 20.0 if i % 10 else 4.0  # one listing in ten cheap
            fh.write(json.dumps({"listing_id": f"L{i:06d}", "title": src.parent.name.replace("-", " "),
                                 "price": price, "currency": "USD", "seller_id": f"seller-{i % 97}",
                                 "images": [f"photos/{name}"]}) + "\n")
    return listings


class ThreadProfile:
    """cProfile over every thread started while it is active (the engine's workers included)."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def _thread_hook(self, *_: Any) -> None:
        p = cProfile.Profile()
        with self._lock:
            self.profiles.append(p)
        sys.setprofile(None)  # this thread's hook has done its job; cProfile takes over
        p.enable()

    def __enter__(self) -> ThreadProfile:
        main = cProfile.Profile()
        self.profiles.append(main)
        threading.setprofile(self._thread_hook)
        main.enable()
        return self

    def __exit__(self, *_: Any) -> None:
        threading.setprofile(None)
        for p in self.profiles:
            p.disable()

    def report(self, top: int = 30) -> str:
        out = io.StringIO()
        stats = pstats.Stats(self.profiles[0], stream=out)
        for p in self.profiles[1:]:
            with contextlib.suppress(TypeError):  # a thread that never ran profiled code
                stats.add(p)
        stats.sort_stats("cumulative").print_stats(top)
        stats.sort_stats("tottime").print_stats(top)
        return out.getvalue()


def models_run(c: Container) -> int:
    return sum(e.embedder.images_run for e in c.embedders.values() if isinstance(e.embedder, ThreadBatcher))


def raw_embedding_rate(embedders: dict[str, Any], paths: list[Path]) -> tuple[float, str]:
    """Photos per second through every configured model at the best of batches 1, 4 and 16 and of the
    two arrangements of scripts/benchlib.py (and which gave it)."""
    pixels = []
    for p in paths:
        with Image.open(p) as im:
            pixels.append(np.asarray(im.convert("RGB")))
    rate, how = best_raw_model_rate(list(embedders.values()), pixels)
    return float(rate), how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="listings (one distinct photo each)")
    ap.add_argument("--workers", type=int, default=4, help="scoring threads of the local engine")
    ap.add_argument("--chunk", type=int, default=None,
                    help="listings a scoring thread takes at a time (default as rescan --chunk)")
    ap.add_argument("--processes", type=int, default=None,
                    help="worker processes of the file rescans (default as rescan: one per CPU; 1: threads of "
                         "this process)")
    ap.add_argument("--stored-processes", type=int, default=None,
                    help="worker processes of the stored rescans (default as rescan --stored: one per CPU)")
    ap.add_argument("--stored-workers", type=int, default=None,
                    help="threads of the stored rescans, per process (default as rescan --stored)")
    ap.add_argument("--logo-search", choices=["never", "cascade", "always"], default="never")
    ap.add_argument("--ocr", choices=["never", "cascade", "always"], default="never")
    ap.add_argument("--profile", choices=["cold", "cached", "stored", "stored_changed"], default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    args = ap.parse_args()
    if args.processes is None:
        args.processes = default_processes()
    if args.chunk is None:
        args.chunk = default_chunk(args.processes)
    if args.stored_processes is None:
        args.stored_processes = default_stored_processes()
    if args.stored_workers is None:
        args.stored_workers = default_stored_workers(args.stored_processes)
    if min(args.n, args.workers, args.chunk, args.processes, args.stored_workers, args.stored_processes) < 1:
        ap.error("--n, --workers, --chunk, --processes, --stored-processes and --stored-workers must be >= 1")
    if args.processes > 1 and args.profile in ("cold", "cached"):
        ap.error("--profile of a file run profiles this process's threads: give --processes 1")
    if args.stored_processes > 1 and args.profile in ("stored", "stored_changed"):
        ap.error("--profile of a stored run profiles this process's threads: give --stored-processes 1")

    root = Path(tempfile.mkdtemp(prefix="bench-rescan-"))
    try:
        data = root / "data"
        settings = Settings(data_dir=data, scoring={"logo_search": args.logo_search},
                            models={"ocr": args.ocr})
        print(f"preparing {args.n} listings and the catalog under {root} ...", flush=True)
        t = time.perf_counter()
        listings = write_listings(root / "in", args.n)
        manifest = write_catalog(root / "catalog")
        embedders, _ = build_embedders(settings)
        c = build_container(settings, embedders=embedders)
        report = c.catalog.import_manifest(manifest)
        assert not report.errors, report.errors
        c.close()
        print(f"  ready in {time.perf_counter() - t:.1f} s ({report.added} references)", flush=True)

        figures: dict[str, Any] = {"n": args.n, "workers": args.workers, "chunk": args.chunk,
                                   "processes": args.processes,
                                   "stored_processes": args.stored_processes, "stored_workers": args.stored_workers,
                                   "logo_search": args.logo_search, "ocr": args.ocr, "cpus": os.cpu_count(),
                                   "load_1m": os.getloadavg()[0],
                                   "models": {k: e.model_id for k, e in embedders.items()}}

        def profiled(name: str, run: Callable[[], T]) -> T:
            """``run()``, under cProfile when ``--profile`` names this phase (the report printed after)."""
            if args.profile != name:
                return run()
            prof = ThreadProfile()
            with prof:
                out = run()
            print(prof.report())
            return out

        def file_phase(name: str, out: str) -> None:
            job = FileRescan(listings, root / out, overwrite=True)
            job.prepare()
            if args.processes > 1:
                # As ``rescan --processes N``: the workers load their own models (not timed, as the
                # threads' container below is built before the clock starts).
                with ProcessEngine(settings, job.base, processes=args.processes, threads=args.workers,
                                   chunk=args.chunk) as engine:
                    engine.start()
                    s = job.run(engine)
            else:
                c = build_container(settings, embedders=embedders, reconcile=False)
                try:
                    threaded = ThreadedEngine(ListingRescanner(c.scorer, c.images, job.base), workers=args.workers,
                                              chunk=args.chunk)
                    s = profiled(name, lambda: job.run(threaded))
                finally:
                    c.close()
            embedded = sum(s.embedded.values())
            figures[name] = {"listings_per_s": s.rate, "seconds": s.elapsed_s, "scored": s.scored,
                             "written": s.scored - s.unchanged, "errors": s.errors, "photos_embedded": embedded,
                             "verdicts": dict(s.verdicts)}
            print(f"  {name}: {s.rate:,.1f} listings/s ({s.scored} in {s.elapsed_s:.1f} s, {s.scored - s.unchanged} "
                  f"written, {embedded} model runs)", flush=True)

        print("cold run (empty embedding cache) ...", flush=True)
        file_phase("cold", "cold.jsonl")
        print("cached run (a fresh container: embeddings from the database) ...", flush=True)
        file_phase("cached", "cached.jsonl")

        def stored_phase(name: str, **kw: Any) -> None:
            # A fresh container, as each ``rescan --stored`` is a fresh process: no embedding read by an
            # earlier phase is still in memory (a forked worker's reads would not be anyway).
            c = build_container(settings, embedders=embedders, reconcile=False)
            try:
                journal = JsonlJournal(root / f"{name}.jsonl", append=False)
                job = StoredRescanJob(c.scorer, c.listings, results=journal, workers=args.stored_workers,
                                      processes=args.stored_processes, resources=c.db, **kw)
                before = models_run(c)
                r = profiled(name, job.run)
                journal.close()
                figures[name] = {"listings_per_s": r.rate, "seconds": r.elapsed_s, "scanned": r.scanned,
                                 "rescored": r.rescored, "written": r.written, "changed": r.changed,
                                 "photos_embedded": models_run(c) - before}
                print(f"  {name}: {r.rate:,.1f} listings/s ({r.scanned} in {r.elapsed_s:.1f} s, {r.rescored} "
                      f"re-matched, {r.written} changed and written)", flush=True)
            finally:
                c.close()

        def add_references(uploads: list[ReferenceUpload]) -> list[Any]:
            c = build_container(settings, embedders=embedders, reconcile=False)
            try:
                return c.catalog.add(uploads)
            finally:
                c.close()

        print("stored run (rescan --stored, catalog unchanged) ...", flush=True)
        stored_phase("stored")

        # A brand adds a second photo of every product: most listings now match more references, so
        # their results change and are written (the write path at full load).
        print("stored run after a brand added 41 references ...", flush=True)
        cat = sorted((GROCERY / "catalogue").glob("*.jpg"))
        add_references([ReferenceUpload(brand="relabel", kind=ReferenceKind.PRODUCT, source="bench", sku=p.stem,
                                        data=variant(p, 5)) for p in cat])
        stored_phase("stored_changed")

        # What the API's background job does after a brand adds a reference: only the listings near it are
        # re-matched, the others only have their stored embeddings read.
        print("stored run near one new reference ...", flush=True)
        new = add_references([ReferenceUpload(
            brand="newbrand", kind=ReferenceKind.PRODUCT, source="bench", sku="NEW-1",
            data=variant(GROCERY / "catalogue" / "Alpro-Shelf-Soy-Milk.jpg", 3))])
        stored_phase("stored_near_new_reference", near_references=[new[0].reference.sha256])

        print("raw embedding throughput of the configured models ...", flush=True)
        paths = sorted((root / "in" / "photos").glob("*.jpg"))[:256]
        raw, raw_how = raw_embedding_rate(embedders, paths)
        figures["raw_embedding_photos_per_s"] = raw
        figures["raw_embedding_how"] = raw_how
        figures["cold_over_raw"] = figures["cold"]["listings_per_s"] / raw

        print()
        print(f"{'run':<56}{'listings/s':>12}{'seconds':>10}{'model runs':>12}")
        for name in ("cold", "cached", "stored", "stored_changed", "stored_near_new_reference"):
            f = figures[name]
            label = name.replace("_", " ")
            if name.startswith("stored"):
                label += f" ({f['rescored']} re-matched, {f['written']} written)"
            else:
                label += f" ({f['written']} written)"
            print(f"{label:<56}{f['listings_per_s']:>12,.1f}{f['seconds']:>10.1f}{f['photos_embedded']:>12}")
        models = "+".join(figures["models"])
        print(f"{'raw embedding, photos/s (' + models + f', best: {raw_how})':<56}"
              f"{raw:>12,.1f}")
        print(f"{'cold / raw embedding':<56}{figures['cold_over_raw']:>12.2f}")
        print(f"(load average at start {figures['load_1m']:.1f} on {figures['cpus']} CPUs; "
              f"logo search {args.logo_search}, OCR {args.ocr}; files: {args.processes} processes x {args.workers} "
              f"threads, chunks of {args.chunk}; "
              f"stored: {args.stored_processes} processes x {args.stored_workers} threads)")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
