"""Drive a running counterlens service over loopback and print throughput and latency.

Starts its own server (``counterlens serve`` on a free port, fresh data dir, grocery-dev catalogue as
the catalog) unless ``--url`` names one. For each concurrency it sends a bounded number of single-photo
listings (bounded in time too) and prints listings/s, p50/p95/p99 latency and errors, for photos the
service has never seen (cold: every model runs) and for photos it has seen (cached: the embedding cache
answers). The raw embedding throughput of the same models is measured in this run, in this process, on
the same photos, so the ratio service/raw says what HTTP, storage, search and fusion cost. It is
measured at batches of 1, 4 and 16 photos, with the models side by side (a thread each) and with a
thread a core running every model in turn (scripts/benchlib.py), before the load and again after it,
and the highest figure is used (it moves by up to 10 % between minutes on a shared VM; on a small CPU
single photos go faster than batches; where one model costs twice another, only a thread a core keeps
every core busy; the highest makes the ratio the strictest).

The listings are grocery in-store photos of catalog products; ``--suspect-share`` of them are priced at a
quarter of their product's reference price (the rest at it). Those are the ones the cascade verifies by
keypoints and, where still undecided, reads by OCR: the default 1.0 is its worst case, every listing a
cheap lookalike. The server counts the expensive signals it runs (``/metrics``), and the raw rates of
keypoint verification and OCR are measured here on the same photos, so ``service/raw work`` compares
the service with the raw cost of the same work: the embeddings plus the expensive signals as often as
they ran.

The service/raw ratio is a ratio of rates: it counts against the service both the CPU it spends beyond
the models and the time the cores stand idle. ``CPU outside models`` isolates the first: the share of
the server's CPU over the phase that its model threads did not spend (``/metrics``,
``counterlens_model_cpu_seconds_total``), i.e. HTTP, storage, search and fusion, plus the expensive
signals where they ran. (One worker's model threads: shown with ``--workers 1`` only.) The last table,
where the cores went, splits the two for each cold phase: the cores the machine left idle over it
(/proc/stat), and the listings/s the server's and the client's CPU a listing would allow with no core
idle (the ceiling; its ratio to the raw work is the most service/raw work could read). With one worker,
a table of the model threads follows: the share of each cold phase each model spent in model calls and
on a core in them (``/metrics``; summed over the threads that ran a model: on the CPU the models share
their threads, so a model's shares can pass 1).

Each phase opens with every connection's first request at once, a burst that waits for one model batch
together; the figures start after ``--warmup`` answered requests (default twice the concurrency), so
they are of the steady state, like a load tester's warm-up. ``--warmup 0`` counts the burst too.

    .venv/bin/python scripts/bench_score.py --concurrency 1,4,8,16 --n 1000
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from benchlib import ServerCounters, server_counters  # the script's folder is on sys.path
from loadgen import (
    LoadResult,
    machine_cpu_s,
    post_load,
    post_request,
    process_tree_cpu_s,
)
from PIL import Image, ImageEnhance
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
GROCERY = REPO.parent / "shared" / "data" / "grocery-dev"
console = Console(width=140)


def _photos(n: int, seed: int, side: int | None = None) -> list[bytes]:
    """n distinct JPEGs: grocery in-store photos, each with a small random edit so none repeats.
    ``side``: enlarged so that the longer side has that many pixels (marketplace photos are larger than
    these 256 px ones)."""
    paths = sorted((GROCERY / "instore").glob("*/*.jpg"))
    rng = random.Random(seed)
    out = []
    for i in range(n):
        with Image.open(paths[i % len(paths)]) as im:
            img = im.convert("RGB")
        if side is not None:
            f = side / max(img.size)
            img = img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.LANCZOS)
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(80, 92))
        out.append(buf.getvalue())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(data_dir: Path, models_from: Path | None, extra_env: dict[str, str] | None = None,
                  workers: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    env = dict(os.environ, COUNTERLENS_DATA_DIR=str(data_dir), COUNTERLENS_SERVER__LOG_LEVEL="warning",
               **(extra_env or {}))
    if models_from is not None and not (data_dir / "models").exists():
        shutil.copytree(models_from, data_dir / "models")
    manifest = data_dir / "catalog" / "catalog.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    rows = ["brand,sku,kind,image,ref_id,title,price,currency"]
    for p in sorted((GROCERY / "catalogue").glob("*.jpg")):
        rows.append(f"{p.stem.split('-')[0].lower()},{p.stem},product,{p.name},{p.stem}-1,{p.stem},20.00,USD")
        shutil.copy(p, manifest.parent / p.name)
    manifest.write_text("\n".join(rows) + "\n")
    cl = str(REPO / ".venv" / "bin" / "counterlens")
    subprocess.run([cl, "catalog", "import", str(manifest)], env=env, check=True, capture_output=True)
    port = _free_port()
    proc = subprocess.Popen([cl, "serve", "--port", str(port), "--workers", str(workers)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    ready: set[int] = set()  # the workers that answered ready (each check is a new connection)
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            if r.status_code == 200:
                ready.add(int(r.json()["pid"]))
        except httpx.HTTPError:
            pass
        if len(ready) >= workers:
            return proc, url
        time.sleep(0.5 if not ready else 0.05)
    proc.kill()
    raise SystemExit("the server did not become ready")


def _raw_meter(photos: list[bytes], data_dir: Path) -> Callable[[], dict[str, float]]:
    """A measurement, to be taken now and again later, of the photos/s the models alone manage on these
    photos at each batch size of ``RAW_BATCHES`` in each arrangement of scripts/benchlib.py, every
    configured role. The models are loaded and the photos decoded once, here. The service is held to
    the best figure."""
    from benchlib import RAW_BATCHES, raw_model_rates

    from service.container import build_embedders
    from service.settings import Settings

    embedders, _ = build_embedders(Settings(data_dir=data_dir))
    pixels = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in photos]

    def measure() -> dict[str, float]:
        rates: dict[str, float] = raw_model_rates(list(embedders.values()), pixels, RAW_BATCHES, seconds=3.0)
        return rates
    return measure


def _rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{v:.1f} ({how})" for how, v in rates.items())


def _raw_signal_rates(photos: list[bytes], data_dir: Path) -> dict[str, float]:
    """Photos/s of the cascade's expensive signals alone on these photos, two threads at once (the
    service's pool): keypoint verification against the catalogue's photos, and OCR."""
    from benchlib import raw_work_rate

    from embeddings.keypoints import set_opencv_threads
    from embeddings.registry import build_text_reader
    from service.container import build_keypoint_parts
    from service.settings import Settings

    settings = Settings(data_dir=data_dir)
    set_opencv_threads(settings.keypoints.opencv_threads)  # as the service runs
    pixels = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in photos]
    extractor, index = build_keypoint_parts(settings)
    for i, path in enumerate(sorted((GROCERY / "catalogue").glob("*.jpg"))):
        with Image.open(path) as im:
            index.add(i, extractor.extract(np.asarray(im.convert("RGB"))))
    min_inliers = settings.keypoints.min_inliers

    def keypoints() -> Callable[[np.ndarray], object]:
        return lambda px: index.verify(extractor.extract(px), min_inliers=min_inliers)

    def ocr() -> Callable[[np.ndarray], object]:
        return build_text_reader(settings.models).read

    return {"keypoints": raw_work_rate(keypoints, pixels), "ocr": raw_work_rate(ocr, pixels[:32])}


def _server_counts(url: str) -> ServerCounters:
    """The server's counters from its /metrics (one worker's, with several): the expensive signals run,
    and each model thread's wall and CPU seconds in model calls."""
    return server_counters(httpx.get(f"{url}/metrics", timeout=10).text)


def _print_cores_went(cores_went: dict[int, tuple[float, float | None, float | None]],
                      rows: list[tuple[str, int, LoadResult, dict[str, float], str, str]],
                      work_ms: dict[int, float]) -> None:
    """Where the cores went in each cold phase, and the most the service could have done with none idle.

    With the load generator on the same cores as the server, listings/s is at most the cores' CPU a
    second over the CPU a listing costs (the server's and the client's): the ceiling at zero idle.
    service/raw work below the ceiling's ratio is the cores standing idle; the ceiling's ratio below 1
    is what a listing costs beyond the raw work (HTTP, storage, search, fusion, decoding, the client).
    ``listings a batch``: how many listings the scoring queue prepared and stored together (one worker's,
    over the phase): its storage and search cost ~3 ms of CPU a batch besides ~0.6 ms a listing (2-core
    VM, session 38), so fewer listings a batch cost more a listing."""
    cores = os.cpu_count() or 1
    table = Table("c", "listings/s", "server CPU ms", "client CPU ms", "idle cores", "listings a batch",
                  "at zero idle: listings/s", "ceiling/raw work", "service/raw work",
                  title="cold phases: where the cores went")
    for phase, c, got, _, _, _ in rows:
        if phase != "cold" or c not in cores_went or c not in work_ms:
            continue
        server_ms, idle, per_batch = cores_went[c]
        ceiling = cores * 1000 / (server_ms + got.client_cpu_ms)
        table.add_row(str(c), f"{got.rate:.1f}", f"{server_ms:.1f}", f"{got.client_cpu_ms:.2f}",
                      "-" if idle is None else f"{idle:.2f} of {cores}",
                      "-" if per_batch is None else f"{per_batch:.1f}", f"{ceiling:.1f}",
                      f"{ceiling * work_ms[c] / 1000:.2f}", f"{got.rate * work_ms[c] / 1000:.2f}")
    console.print(table)


def _print_models_went(models_went: dict[int, dict[str, tuple[float, float, float]]]) -> None:
    """How each model's threads spent a cold phase (summed over a model's threads): in a model call for
    ``in calls`` of the phase, on a core for ``on a core`` of it, and the difference is time inside its
    calls waiting for a core (taken by the other model, HTTP, storage, search) or for the GIL. Outside its
    calls a model thread waits for photos, or decodes and hands them out."""
    table = Table("c", "model", "in calls", "on a core in them", "waiting in them", "model CPU ms a listing",
                  title="cold phases: the model threads (shares of the phase's wall)")
    for c, models in models_went.items():
        for name, (busy, cpu, ms) in sorted(models.items()):
            table.add_row(str(c), name, f"{busy:.2f}", f"{cpu:.2f}", f"{max(0.0, busy - cpu):.2f}", f"{ms:.2f}")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an already running service (default: start one)")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--n", type=int, default=1000,
                    help="listings per concurrency level (bounded; p99 is about the n/100-th slowest, so a p99 of "
                         "fewer than ~1,000 rests on a handful of listings)")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per level at most")
    ap.add_argument("--models-from", type=Path, help="a models folder to copy instead of exporting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=None,
                    help="answered requests per phase left out of the figures before they start (default: "
                         "2 x the concurrency; 0 counts the opening burst, where every connection's first "
                         "request arrives at once)")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (with no --url)")
    ap.add_argument("--suspect-share", type=float, default=1.0,
                    help="share of listings priced at a quarter of the reference price, the rest at it "
                         "(default 1.0: every listing, the cascade's worst case)")
    ap.add_argument("--photo-side", type=int, default=None,
                    help="enlarge the photos to this many pixels on their longer side (default: as they are, "
                         "256 px); the server decodes large JPEGs smaller for its models unless started with "
                         "COUNTERLENS_MODELS__REDUCED_DECODE=false, which this process passes on")
    ap.add_argument("--no-cascade", action="store_true",
                    help="start the server with the expensive signals off (logo search in crops, OCR, "
                         "keypoint verification): "
                         "the cheap path alone, which the cascade adds to for undecided listings")
    args = ap.parse_args()
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency: comma-separated whole numbers, got {args.concurrency!r}")
    if args.photo_side is not None and not 64 <= args.photo_side <= 8000:
        ap.error("--photo-side must be within [64, 8000]")
    if min(levels) < 1 or args.n < 1 or args.workers < 1 or args.time_limit <= 0:
        ap.error("--concurrency, --n and --workers must be >= 1 and --time-limit > 0")
    if args.warmup is not None and args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if not 0.0 <= args.suspect_share <= 1.0:
        ap.error("--suspect-share must be within [0, 1]")
    tmp = Path(tempfile.mkdtemp(prefix="counterlens-bench-"))
    proc = None
    try:
        url = args.url
        if url is None:
            console.print(f"starting a server ({args.workers} worker process(es)) and importing the grocery-dev "
                          "catalogue...")
            extra = ({"COUNTERLENS_SCORING__LOGO_SEARCH": "never", "COUNTERLENS_MODELS__OCR": "never",
                      "COUNTERLENS_KEYPOINTS__MODE": "never"} if args.no_cascade else {})
            proc, url = _start_server(tmp / "data", args.models_from, extra, args.workers)
        parsed = urlsplit(url)
        if parsed.scheme != "http" or not parsed.hostname:
            ap.error(f"--url: an http://host:port URL, got {url!r}")
        host, port = parsed.hostname, parsed.port or 80
        def warmup(c: int) -> int:
            return 2 * c if args.warmup is None else args.warmup

        # Each level's photos: its warm-up's and its measured ones, all distinct (cold means unseen).
        sizes = [args.n + warmup(c) for c in levels]
        photos = _photos(sum(sizes), args.seed, args.photo_side)
        console.print("measuring raw model throughput (same photos, this process)...")
        raw_rates = _raw_meter(photos[: min(256, len(photos))], tmp / "data")
        raw_before = raw_rates()
        signal_rates = {} if args.no_cascade else _raw_signal_rates(photos[: min(64, len(photos))], tmp / "data")
        picker = random.Random(args.seed)
        suspect = [picker.random() < args.suspect_share for _ in photos]

        def request(i: int, photo: bytes) -> bytes:
            price = 5.0 if suspect[i % 10**6] else 20.0
            body = {"listing_id": f"bench-{args.seed}-{i}", "title": "grocery item", "price": {"amount": price},
                    "seller": {"id": f"seller-{i % 50}"}, "images": [{"base64": base64.b64encode(photo).decode()}]}
            req: bytes = post_request(host, port, "/v1/score", json.dumps(body).encode("ascii"))
            return req

        table = Table("phase", "c", "listings", "listings/s", "p50 ms", "p95 ms", "p99 ms", "errors",
                      "service/raw", "keypoints / OCR ran", "service/raw work", "server CPU ms",
                      "CPU outside models", "client CPU ms")
        unmeasured: set[str] = set()

        rows: list[tuple[str, int, LoadResult, dict[str, float], str, str]] = []
        # Per cold phase: the server's CPU ms a listing, the cores the machine left idle over it, and the
        # listings a scoring batch (one worker's).
        cores_went: dict[int, tuple[float, float | None, float | None]] = {}
        # Per cold phase (one worker), each model thread: its share of the phase's wall in model calls, its
        # share on a core in them, and its CPU ms a listing.
        models_went: dict[int, dict[str, tuple[float, float, float]]] = {}

        def run(phase: str, c: int, requests: list[bytes]) -> None:
            before = _server_counts(url)
            cpu0 = process_tree_cpu_s(proc.pid) if proc is not None else None
            machine0, t0 = machine_cpu_s(), time.perf_counter()
            got = post_load(host, port, requests, c, args.time_limit, warmup=warmup(c))
            machine1, wall = machine_cpu_s(), time.perf_counter() - t0
            cpu1 = process_tree_cpu_s(proc.pid) if proc is not None else None
            answered = got.n + got.warmed  # (the server's CPU and the signals are read over the whole phase)
            after = _server_counts(url)
            ran = {k: (v - before.signals.get(k, 0.0)) / max(1, answered) for k, v in after.signals.items()}
            server_ms = None if cpu0 is None or cpu1 is None or not got.n else (cpu1 - cpu0) / answered * 1000
            server = "-" if server_ms is None else f"{server_ms:.1f}"
            if phase == "cold" and server_ms is not None:
                idle = (machine1[1] - machine0[1]) / wall if machine0 and machine1 and wall > 0 else None
                batches = after.score_batches - before.score_batches
                per_batch = ((after.score_listings - before.score_listings) / batches
                             if batches > 0 and args.workers == 1 else None)
                cores_went[c] = (server_ms, idle, per_batch)
            if phase == "cold" and args.workers == 1 and wall > 0:
                went = {}
                for m, busy_s in after.model_busy_s.items():
                    busy = busy_s - before.model_busy_s.get(m, 0.0)
                    cpu = after.model_cpu_s.get(m, 0.0) - before.model_cpu_s.get(m, 0.0)
                    went[m] = (busy / wall, cpu / wall, cpu / max(1, answered) * 1000)
                models_went[c] = went
            # The share of the server's CPU spent outside its model threads: HTTP, storage, search,
            # fusion, and the cascade's expensive signals where they ran. One worker's models only.
            outside = "-"
            if cpu0 is not None and cpu1 is not None and cpu1 > cpu0 and args.workers == 1:
                outside = f"{1 - (after.model_cpu_total_s - before.model_cpu_total_s) / (cpu1 - cpu0):.2f}"
            rows.append((phase, c, got, ran, server, outside))

        for k, c in enumerate(levels):
            first = sum(sizes[:k])
            chunk = photos[first:first + sizes[k]]
            run("cold", c, [request(first + i, p) for i, p in enumerate(chunk)])
            # The same photos again, under new listing ids: every embedding comes from the cache.
            run("cached", c, [request(10**6 + first + i, p) for i, p in enumerate(chunk)])
        # The raw figure moves by up to 10 % between minutes on a shared VM: measured again after the load,
        # and the highest reading (of either time, any batch size) is the one the service is held to.
        console.print("measuring raw model throughput again...")
        raw_after = raw_rates()
        raw = max(*raw_before.values(), *raw_after.values())
        work_ms: dict[int, float] = {}  # cold phases: the raw cost of a listing's work, ms on the cores
        for phase, c, got, ran, server, outside in rows:
            # The raw cost of this phase's work per listing: a photo through the models, plus keypoint
            # verification and OCR as often as the server ran them (ms on the two cores).
            work = "-"
            if phase == "cold":
                ms = 1000 / raw + sum(ran.get(k, 0.0) * 1000 / r for k, r in signal_rates.items())
                work_ms[c] = ms
                work = f"{got.rate * ms / 1000:.2f}"
                unmeasured.update(k for k, v in ran.items() if v > 0 and k not in signal_rates)
            table.add_row(phase, str(c), str(got.n), f"{got.rate:.1f}", f"{got.percentile_ms(0.50):.0f}",
                          f"{got.percentile_ms(0.95):.0f}", f"{got.percentile_ms(0.99):.0f}", str(got.errors),
                          f"{got.rate / raw:.2f}" if phase == "cold" else "-",
                          f"{ran.get('keypoints', 0.0):.2f} / {ran.get('ocr', 0.0):.2f}", work, server,
                          outside, f"{got.client_cpu_ms:.2f}")
        console.print(table)
        console.print("expensive signals: " + ("off (--no-cascade)" if args.no_cascade else
                                               "the server's settings (default: cascade)"))
        console.print("server CPU: user + system time of the server's processes over the phase, per listing "
                      "(2 cores: 1,000 ms of CPU a second at most per core); CPU outside models: the share of "
                      "it that the model threads did not spend (HTTP, storage, search, fusion, and the "
                      "expensive signals where they ran)")
        console.print("warm-up: the first " + ", ".join(f"{warmup(c)} (c={c})" for c in levels) + " answered "
                      "requests of each phase are left out of listings/s and latencies (not of errors); "
                      "--warmup 0 counts them")
        # p99 of n latencies is about their n/100-th slowest: with the cascade the ~1 % of listings that
        # also go through OCR are about that many, so a p99 of a few hundred listings reads one of them.
        fewest = min((r[2] for r in rows if r[2].n), key=lambda got: got.n, default=None)
        if fewest is not None and fewest.n < 1000:
            console.print(f"[yellow]p99 of {fewest.n} listings is the number {fewest.slowest_rank(0.99)} from the "
                          "slowest: --n 1000 or more for a p99 that does not rest on a handful of listings[/yellow]")
        console.print(f"raw model throughput (every role, the models alone): {raw:.1f} photos/s, the highest of "
                      f"{_rates(raw_before)} before the load and {_rates(raw_after)} after it; machine: "
                      f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
        if args.photo_side is not None:
            console.print(f"photos enlarged to {args.photo_side} px on their longer side; the raw figure is the "
                          "models on the whole decoded photos (the server's smaller decode for its models is "
                          "work the raw figure does, so service/raw can exceed 1)")
        if signal_rates:
            console.print("raw expensive signals (2 threads): " + ", ".join(
                f"{k} {v:.1f} photos/s" for k, v in signal_rates.items()) + f"; suspect share {args.suspect_share}")
        if cores_went:
            _print_cores_went(cores_went, rows, work_ms)
        if models_went:
            _print_models_went(models_went)
        if unmeasured:
            console.print("[yellow]service/raw work leaves out " + ", ".join(sorted(unmeasured)) + " (ran, not "
                          "measured raw): the ratio is too high[/yellow]")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
