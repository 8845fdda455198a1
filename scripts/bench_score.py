"""Drive a running counterlens service over loopback and print throughput and latency.

Starts its own server (``counterlens serve`` on a free port, fresh data dir, grocery-dev catalogue as
the catalog) unless ``--url`` names one. For each concurrency it sends a bounded number of single-photo
listings (bounded in time too) and prints listings/s, p50/p95/p99 latency and errors, for photos the
service has never seen (cold: every model runs) and for photos it has seen (cached: the embedding cache
answers). The raw embedding throughput of the same models is measured in this run, in this process, on
the same photos, so the ratio service/raw says what HTTP, storage, search and fusion cost.

    .venv/bin/python scripts/bench_score.py --concurrency 1,4,8,16 --n 240
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageEnhance
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
GROCERY = REPO.parent / "shared" / "data" / "grocery-dev"
console = Console(width=140)


def _photos(n: int, seed: int) -> list[bytes]:
    """n distinct JPEGs: grocery in-store photos, each with a small random edit so none repeats."""
    paths = sorted((GROCERY / "instore").glob("*/*.jpg"))
    rng = random.Random(seed)
    out = []
    for i in range(n):
        with Image.open(paths[i % len(paths)]) as im:
            img = im.convert("RGB")
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(80, 92))
        out.append(buf.getvalue())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(data_dir: Path, models_from: Path | None,
                  extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
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
    proc = subprocess.Popen([cl, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become ready")


def _raw_throughput(photos: list[bytes], data_dir: Path, batch: int) -> float:
    """Photos/s the models alone manage on these photos: every configured role, side by side as the
    service runs them (scripts/benchlib.py), batches of ``batch``."""
    from benchlib import raw_model_rate

    from service.container import build_embedders
    from service.settings import Settings

    settings = Settings(data_dir=data_dir)
    embedders, _ = build_embedders(settings)
    pixels = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in photos]
    return float(raw_model_rate(list(embedders.values()), pixels, batch))


async def _drive(url: str, bodies: list[dict[str, Any]], concurrency: int, time_limit: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    queue = list(bodies)
    deadline = time.monotonic() + time_limit
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker() -> None:
            nonlocal errors
            while queue and time.monotonic() < deadline:
                body = queue.pop()
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/score", json=body)
                    if r.status_code != 200:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return {"n": len(lat), "rate": len(lat) / elapsed, "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99),
            "errors": errors, "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an already running service (default: start one)")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--n", type=int, default=240, help="listings per concurrency level (bounded)")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per level at most")
    ap.add_argument("--models-from", type=Path, help="a models folder to copy instead of exporting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cascade", action="store_true",
                    help="start the server with the expensive signals off (logo search in crops, OCR, "
                         "keypoint verification): "
                         "the cheap path alone, which the cascade adds to for undecided listings")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="counterlens-bench-"))
    proc = None
    try:
        url = args.url
        if url is None:
            console.print("starting a server and importing the grocery-dev catalogue...")
            extra = ({"COUNTERLENS_SCORING__LOGO_SEARCH": "never", "COUNTERLENS_MODELS__OCR": "never",
                      "COUNTERLENS_KEYPOINTS__MODE": "never"} if args.no_cascade else {})
            proc, url = _start_server(tmp / "data", args.models_from, extra)
        photos = _photos(args.n * len(levels), args.seed)
        console.print("measuring raw model throughput (same photos, this process)...")
        raw = _raw_throughput(photos[: min(256, len(photos))], tmp / "data", batch=16)

        def body(i: int, photo: bytes) -> dict[str, Any]:
            return {"listing_id": f"bench-{args.seed}-{i}", "title": "grocery item", "price": {"amount": 5.0},
                    "seller": {"id": f"seller-{i % 50}"}, "images": [{"base64": base64.b64encode(photo).decode()}]}

        table = Table("phase", "concurrency", "listings", "listings/s", "p50 ms", "p95 ms", "p99 ms", "errors",
                      "service/raw")
        for k, c in enumerate(levels):
            chunk = photos[k * args.n:(k + 1) * args.n]
            cold = asyncio.run(_drive(url, [body(k * args.n + i, p) for i, p in enumerate(chunk)], c,
                                      args.time_limit))
            table.add_row("cold", str(c), str(cold["n"]), f"{cold['rate']:.1f}", f"{cold['p50']:.0f}",
                          f"{cold['p95']:.0f}", f"{cold['p99']:.0f}", str(cold["errors"]), f"{cold['rate'] / raw:.2f}")
            # The same photos again, under new listing ids: every embedding comes from the cache.
            warm = asyncio.run(_drive(url, [body(10**6 + k * args.n + i, p) for i, p in enumerate(chunk)], c,
                                      args.time_limit))
            table.add_row("cached", str(c), str(warm["n"]), f"{warm['rate']:.1f}", f"{warm['p50']:.0f}",
                          f"{warm['p95']:.0f}", f"{warm['p99']:.0f}", str(warm["errors"]), "-")
        console.print(table)
        console.print("expensive signals: " + ("off (--no-cascade)" if args.no_cascade else
                                               "the server's settings (default: cascade)"))
        console.print(f"raw model throughput (all roles side by side, batch 16): {raw:.1f} photos/s; machine: "
                      f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
