"""Benchmark of the reference index (index.FaissReferenceIndex): build time, memory, single-threaded
queries per second and recall@10 against exact search, for the exact and the approximate structures.

Two synthetic 512-d sets of L2-normalised float32 vectors per size:

``uniform``
    uniformly random points on the sphere.  They have no structure at all, which makes them the worst
    case for every approximate index (no neighbourhood is much closer than the rest).
``clustered``
    a Gaussian mixture (one centre per 200 vectors, cosine to the centre about 0.7); queries are new
    draws from the same mixture.  Closer to real image embeddings, where near-duplicates exist.

Ground truth is the exact flat index (batched, all threads).  Queries are timed with
``faiss.omp_set_num_threads(1)``, through the public ``FaissReferenceIndex.search`` (validation and
locking included), both one query per call (the serving path) and as one batch.  Builds use every core.

    .venv/bin/python scripts/bench_index.py                    # 10k, 100k, 1M
    .venv/bin/python scripts/bench_index.py --quick            # 10k only, fewer queries and settings
    .venv/bin/python scripts/bench_index.py --sizes 1m --datasets clustered --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index import FaissReferenceIndex, IndexTuning, IndexType
from service.settings import IndexSettings

# isort: split
# (After ``index``, which loads faiss with the BLAS kernels of this CPU: index/runtime.py.)
import faiss

DIM = 512
K = 10
F32 = npt.NDArray[np.float32]


@dataclass
class Row:
    size: int
    dataset: str
    index: str
    params: str
    build_s: float | None = None
    index_mb: float | None = None
    rss_delta_mb: float | None = None
    qps_single: float | None = None
    qps_batch: float | None = None
    recall_at_10: float | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ data


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_size(text: str) -> int:
    t = text.strip().lower().replace("_", "")
    for suffix, mult in (("k", 1_000), ("m", 1_000_000)):
        if t.endswith(suffix):
            return int(float(t[:-1]) * mult)
    return int(t)


def normalise(x: npt.NDArray[np.floating]) -> F32:
    x = np.asarray(x, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def uniform(n: int, rng: np.random.Generator, chunk: int = 100_000) -> F32:
    out = np.empty((n, DIM), dtype=np.float32)
    for lo in range(0, n, chunk):
        out[lo : lo + chunk] = normalise(rng.standard_normal((min(chunk, n - lo), DIM), dtype=np.float32))
    return out


class Mixture:
    """Isotropic Gaussian clusters on the sphere; `spread` 1.0 puts points at cosine ~0.71 from centre."""

    def __init__(self, clusters: int, rng: np.random.Generator, spread: float = 1.0) -> None:
        self.centres = normalise(rng.standard_normal((clusters, DIM), dtype=np.float32))
        self.rng = rng
        self.scale = np.float32(spread / np.sqrt(DIM))

    def draw(self, n: int, chunk: int = 100_000) -> F32:
        out = np.empty((n, DIM), dtype=np.float32)
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            which = self.rng.integers(0, len(self.centres), size=m)
            noise = self.rng.standard_normal((m, DIM), dtype=np.float32) * self.scale
            out[lo : lo + m] = normalise(self.centres[which] + noise)
        return out


def dataset(name: str, n: int, nq: int, seed: int) -> tuple[F32, F32]:
    rng = np.random.default_rng(seed)
    if name == "uniform":
        return uniform(n, rng), uniform(nq, rng)
    mix = Mixture(max(1, n // 200), rng)
    return mix.draw(n), mix.draw(nq)


# ---------------------------------------------------------------------------------------------- probes


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def saved_bytes(index: FaissReferenceIndex) -> tuple[int, float]:
    """Size of the saved index file and the time an atomic save took (written under the temp dir)."""
    directory = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        t0 = time.perf_counter()
        manifest = json.loads(index.save(directory).read_text())
        return int(manifest["index_bytes"]), time.perf_counter() - t0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def recall(found: npt.NDArray[np.int64], truth: npt.NDArray[np.int64]) -> float:
    hits = sum(np.intersect1d(f, t).size for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def time_single(index: FaissReferenceIndex, queries: F32, budget_s: float, **kw: int) -> tuple[float, Any]:
    """Queries/s one query per call (stops early after budget_s), and the ids of those answered."""
    faiss.omp_set_num_threads(1)
    out = []
    t0 = time.perf_counter()
    for i in range(len(queries)):
        out.append(index.search(queries[i : i + 1], K, **kw)[1])
        if time.perf_counter() - t0 > budget_s:
            break
    elapsed = time.perf_counter() - t0
    return len(out) / elapsed, np.concatenate(out)


def time_batch(index: FaissReferenceIndex, queries: F32, **kw: int) -> tuple[float, Any]:
    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    _, ids = index.search(queries, K, **kw)
    return len(queries) / (time.perf_counter() - t0), ids


@dataclass
class Plan:
    sizes: list[int]
    datasets: list[str]
    types: list[str]
    queries: int
    ef: list[int]
    nprobe: list[int]
    refine: list[int]
    hnsw_m: int
    ef_construction: int
    single_budget_s: float
    threads: int
    seed: int


def build_index(
    plan: Plan, index_type: IndexType, ids: npt.NDArray[np.int64], data: F32, tuning: IndexTuning
) -> tuple[FaissReferenceIndex, float, int]:
    faiss.omp_set_num_threads(plan.threads)
    settings = IndexSettings(
        exact_max=1, hnsw_m=plan.hnsw_m, hnsw_ef_construction=plan.ef_construction, hnsw_ef_search=64
    )
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index = FaissReferenceIndex.build(
        DIM,
        settings,
        model_id="bench@0",
        kind="product",
        ids=ids,
        vectors=data,
        index_type=index_type,
        tuning=tuning,
    )
    return index, time.perf_counter() - t0, rss_bytes() - rss0


def run_one(plan: Plan, n: int, name: str, console: Console) -> Iterator[Row]:
    nq = plan.queries
    t0 = time.perf_counter()
    data, queries = dataset(name, n, nq, plan.seed)
    ids = np.arange(n, dtype=np.int64)
    console.log(f"{name} {n:,}: data generated in {time.perf_counter() - t0:.1f}s")
    # Flat search of one query costs n*d multiply-adds: keep its timing budget proportionate.
    budget = plan.single_budget_s

    flat, build_s, rss = build_index(plan, "flat", ids, data, IndexTuning())
    faiss.omp_set_num_threads(plan.threads)
    t0 = time.perf_counter()
    _, truth = flat.search(queries, K)
    gt_s = time.perf_counter() - t0
    size, save_s = saved_bytes(flat)
    qs, _ = time_single(flat, queries, budget)
    # Batched flat search costs nq*n*d multiply-adds on one thread: cap it near 2e11 (~10 s).
    flat_batch = queries[: max(50, min(nq, 200_000_000_000 // (n * DIM)))]
    qb, _ = time_batch(flat, flat_batch)
    yield Row(
        n,
        name,
        "flat",
        "IndexFlatIP",
        build_s,
        size / 2**20,
        rss / 2**20,
        qs,
        qb,
        1.0,
        f"ground truth {nq} queries in {gt_s:.1f}s ({plan.threads} threads); batch of {len(flat_batch)}",
        {"save_s": save_s},
    )
    del flat
    gc.collect()

    if "hnsw" in plan.types:
        index, build_s, rss = build_index(plan, "hnsw", ids, data, IndexTuning())
        size, save_s = saved_bytes(index)
        console.log(f"{name} {n:,}: hnsw built in {build_s:.1f}s")
        for i, ef in enumerate(plan.ef):
            qs, single_ids = time_single(index, queries, budget, ef_search=ef)
            qb, batch_ids = time_batch(index, queries, ef_search=ef)
            first = i == 0  # build figures shown once per build
            yield Row(
                n,
                name,
                "hnsw",
                f"M={plan.hnsw_m} efC={plan.ef_construction} efSearch={ef}",
                build_s if first else None,
                size / 2**20 if first else None,
                rss / 2**20 if first else None,
                qs,
                qb,
                recall(batch_ids, truth),
                extra={
                    "ef_search": ef,
                    "save_s": save_s,
                    "build_s": build_s,
                    "index_bytes": size,
                    "recall_single": recall(single_ids, truth[: len(single_ids)]),
                },
            )
        del index
        gc.collect()

    if "ivfpq" in plan.types:
        # refine_factor and nprobe are search-time parameters: one build, swept at search.
        index, build_s, rss = build_index(plan, "ivfpq", ids, data, IndexTuning())
        size, save_s = saved_bytes(index)
        p = index.build_params
        console.log(f"{name} {n:,}: ivfpq built in {build_s:.1f}s")
        first = True
        for rf in plan.refine:
            for nprobe in [x for x in plan.nprobe if x <= p["nlist"]]:
                qs, _ = time_single(index, queries, budget, nprobe=nprobe, refine_factor=rf)
                qb, batch_ids = time_batch(index, queries, nprobe=nprobe, refine_factor=rf)
                yield Row(
                    n, name, "ivfpq",
                    f"IVF{p['nlist']},PQ{p['pq_m']}x{p['pq_nbits']} refine x{rf} nprobe={nprobe}",
                    build_s if first else None, size / 2**20 if first else None,
                    rss / 2**20 if first else None, qs, qb, recall(batch_ids, truth),
                    extra={"nprobe": nprobe, "refine_factor": rf, "save_s": save_s, "build_s": build_s,
                           "index_bytes": size, **p},
                )  # fmt: skip
                first = False
        del index
        gc.collect()
    del data, queries


# ---------------------------------------------------------------------------------------------- output


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(rows: list[Row]) -> Table:
    t = Table(
        title=f"reference index, {DIM}-d: recall@{K} vs exact, queries/s on ONE thread "
        "(1/call: one query per search call; batch: all queries in one call)",
        caption="target: >= 1,000 queries/s one per call at recall@10 >= 0.95",
    )
    left = ("data", "index", "parameters", "target")
    for col in ("vectors", "data", "index", "parameters", "build s", "index MiB", "RSS Δ MiB",
                "QPS 1/call", "QPS batch", "recall@10", "target"):  # fmt: skip
        t.add_column(col, justify="left" if col in left else "right")
    for r in rows:
        ok = r.recall_at_10 is not None and r.recall_at_10 >= 0.95 and (r.qps_single or 0) >= 1000
        t.add_row(
            f"{r.size:,}", r.dataset, r.index, r.params, fmt(r.build_s, ".1f"), fmt(r.index_mb, ".0f"),
            fmt(r.rss_delta_mb, ".0f"), fmt(r.qps_single, ",.0f"), fmt(r.qps_batch, ",.0f"),
            fmt(r.recall_at_10, ".3f"), "met" if ok else "",
        )  # fmt: skip
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="comma-separated, e.g. 10k,100k,1m (default all three)")
    ap.add_argument("--quick", action="store_true", help="10k only, 200 queries, fewer settings")
    ap.add_argument("--datasets", default="uniform,clustered")
    ap.add_argument("--types", default="hnsw,ivfpq", help="approximate types besides flat")
    ap.add_argument("--queries", type=int, default=None, help="queries per run (default 1000, quick 200)")
    ap.add_argument("--ef", default=None, help="efSearch values (default 16,32,64,128,256)")
    ap.add_argument("--nprobe", default=None, help="IVF nprobe values (default 8,16,32,64)")
    ap.add_argument("--refine", default="4,16", help="IVF-PQ exact re-rank factors")
    ap.add_argument("--hnsw-m", type=int, default=IndexSettings().hnsw_m)
    ap.add_argument("--ef-construction", type=int, default=IndexSettings().hnsw_ef_construction)
    ap.add_argument("--single-budget", type=float, default=10.0, help="seconds per one-query-per-call timing")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for builds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)

    plan = Plan(
        sizes=[parse_size(s) for s in (args.sizes or ("10k" if args.quick else "10k,100k,1m")).split(",")],
        datasets=[d for d in args.datasets.split(",") if d],
        types=[t for t in args.types.split(",") if t],
        queries=args.queries or (200 if args.quick else 1000),
        ef=ints(args.ef or ("32,64,128" if args.quick else "16,32,64,128,256")),
        nprobe=ints(args.nprobe or ("16,32" if args.quick else "8,16,32,64")),
        refine=ints(args.refine if not args.quick else "16"),
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        single_budget_s=args.single_budget if not args.quick else min(args.single_budget, 3.0),
        threads=args.threads,
        seed=args.seed,
    )
    bad = [d for d in plan.datasets if d not in ("uniform", "clustered")]
    bad += [t for t in plan.types if t not in ("hnsw", "ivfpq")]
    if bad:
        ap.error(f"unknown dataset/type {bad}")

    console = Console(width=None if sys.stdout.isatty() else 180)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    meta = {
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "build_threads": plan.threads,
        "query_threads": 1,
        "loadavg_start": load,
        "plan": asdict(plan),
    }
    console.print(
        f"faiss {faiss.__version__}, {os.cpu_count()} cores, load average {load[0]:.2f} at start; "
        f"builds on {plan.threads} threads, queries on 1 thread"
    )
    rows: list[Row] = []
    started = time.perf_counter()
    try:
        for n in plan.sizes:
            for name in plan.datasets:
                for row in run_one(plan, n, name, console):
                    rows.append(row)
                    if args.json:  # after every row: a long run killed half-way keeps its figures
                        write_json(args.json, meta, rows, time.perf_counter() - started)
                    console.log(
                        f"{row.size:,} {row.dataset} {row.index} {row.params}: "
                        f"{fmt(row.qps_single, ',.0f')} q/s single, {fmt(row.qps_batch, ',.0f')} q/s batch, "
                        f"recall {fmt(row.recall_at_10, '.3f')}"
                    )
    finally:
        console.print(table(rows))
        for r in rows:
            if r.notes:
                console.print(f"{r.size:,} {r.dataset} {r.index}: {r.notes}")
        meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        if args.json:
            write_json(args.json, meta, rows, time.perf_counter() - started)
            console.print(f"figures written to {args.json}")
    return 0


def write_json(path: Path, meta: dict[str, Any], rows: list[Row], elapsed: float) -> None:
    path.write_text(json.dumps({"meta": {**meta, "elapsed_s": elapsed}, "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
