"""Detection quality of counterlens on a labelled benchmark: builds it with a fixed seed, runs the real
``counterlens catalog import`` and ``counterlens rescan`` on a fresh data dir, prints per track and per
edit recall@1, TPR at 1 % FPR of the relevant similarity and of ``risk``, a reliability table of risk,
and the rescan's listings/s. The benchmark and the metrics are described in docs/quality.md.

    .venv/bin/python scripts/eval_detection.py                          # default size, seed 0 (~5 min)
    .venv/bin/python scripts/eval_detection.py --size small --json /tmp/q.json     # smoke size (<1 min)
    .venv/bin/python scripts/eval_detection.py --work /tmp/eval --models-from /tmp/eval/models \\
        --env COUNTERLENS_MODELS__COPY_MODEL=sscd --json /tmp/sscd.json --plot /tmp/sscd.png
    .venv/bin/python scripts/eval_detection.py --fit      # + fusion weights / ramps fitted on the tune split
    .venv/bin/python scripts/eval_detection.py --work /tmp/eval --probe crop-copy   # a proposal, on that run

Settings of the system under test come from the environment as for any counterlens command
(``COUNTERLENS_SCORING__LOGO_FLOOR=0.35``) or from ``--env KEY=VALUE``. With
``scoring.logo_search`` other than ``always`` (default ``never``) the logo listings and the negatives are
rescanned twice more, with that mode and with ``always`` (``--no-logo-compare`` skips it), to measure what
the crop search finds when it runs on every photo and what it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts/ is not a package on sys.path when run as a file
    sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402

from scripts.eval.benchmark import SIZES, SPLITS, Benchmark, build  # noqa: E402
from scripts.eval.metrics import evaluate, ramp_order  # noqa: E402
from scripts.eval.report import markdown, plot, print_comparison, print_split  # noqa: E402
from scripts.eval.runner import DataDir, RescanRun  # noqa: E402

console = Console(width=150)


def parse_env(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.startswith("COUNTERLENS_"):
            raise SystemExit(f"--env {p!r}: expected COUNTERLENS_NAME=VALUE")
        out[key] = value
    return out


def settings_for(env: dict[str, str]) -> Any:
    """The Settings the subprocesses see (the environment plus the overrides), built here too."""
    from service.settings import Settings

    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def ramps(settings: Any) -> dict[str, tuple[float, float]]:
    s = settings.scoring
    return {"copy": (s.copy_floor, s.copy_certain), "lookalike": (s.lookalike_floor, s.lookalike_certain),
            "logo": (s.logo_floor, s.logo_certain)}


def models_source(args: argparse.Namespace, work: Path) -> Path | None:
    if args.models_from is not None:
        return Path(args.models_from)
    cache = work / "models"
    return cache if cache.is_dir() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--work", type=Path, default=None, help="output folder (default: a new temp dir)")
    ap.add_argument("--models-from", type=Path, default=None,
                    help="exported models to copy (a data dir or its models/); default WORK/models if present")
    ap.add_argument("--env", action="append", default=[], metavar="COUNTERLENS_X=V",
                    help="a setting of the system under test (repeatable)")
    ap.add_argument("--split", choices=["tune", "report", "both"], default="both", help="splits to print")
    ap.add_argument("--workers", type=int, default=None, help="rescan --workers (default: the CLI's)")
    ap.add_argument("--logo-compare", action=argparse.BooleanOptionalAction, default=True,
                    help="also rescan logos + negatives with logo_search=always (and the configured mode, for speed)")
    ap.add_argument("--fit", action="store_true",
                    help="fit fusion weights and pick ramps on the tune split (in-process), report both splits")
    ap.add_argument("--probe", choices=["crop-copy", "logo"], default=None,
                    help="instead of a run: probe a proposal on the benchmark of an earlier run in --work")
    ap.add_argument("--probe-model", default=None, help="--probe logo: the model (default: the logo model)")
    ap.add_argument("--grid", default="0.35,0.55", help="--probe: crop grid fractions (comma-separated)")
    ap.add_argument("--json", type=Path, default=None, help="write every metric to this JSON file")
    ap.add_argument("--plot", type=Path, default=None, help="write ROC curves and histograms to this PNG")
    ap.add_argument("--markdown", type=Path, default=None, help="write the main tables as Markdown")
    args = ap.parse_args(argv)

    env = parse_env(args.env)
    settings = settings_for(env)
    if args.probe is not None:
        return _probe(args, settings)
    work = args.work or Path(tempfile.mkdtemp(prefix="counterlens-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    bench_dir = work / f"bench-{args.size}-seed{args.seed}"
    if bench_dir.exists():
        shutil.rmtree(bench_dir)
    bench = build(bench_dir, seed=args.seed, size=args.size)
    build_s = time.perf_counter() - t0
    console.print(f"benchmark: {len(bench.queries)} listings ({bench.counts}), {len(bench.products)} products, "
                  f"{len(bench.logos)} logo brands, built in {build_s:.1f} s under {bench_dir}")

    runs = work / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    base = DataDir(runs / "main" / "data", env)
    models = models_source(args, work)
    base.seed_models(models)
    imp = base.import_catalog(bench.manifest)
    console.print(f"catalog import: {imp.stdout.strip().splitlines()[-1]} in {imp.seconds:.1f} s")
    if models is None and (base.path / "models").is_dir() and not (work / "models").exists():
        shutil.copytree(base.path / "models", work / "models", symlinks=True)  # the next run skips the export

    logo_mode = settings.scoring.logo_search
    compare = args.logo_compare and logo_mode != "always"
    snapshots: dict[str, DataDir] = {}
    if compare:
        for mode in (logo_mode, "always"):
            snapshots[mode] = base.snapshot(runs / f"logo-{mode}" / "data")

    main_run = base.rescan("main", bench.listings, runs / "main", workers=args.workers)
    _check_errors(main_run)
    order = ramp_order(ramps(settings))
    metrics = evaluate(bench.queries, main_run.results, ranked=order)
    console.print(f"rescan: {main_run.listings} listings in {main_run.wall_s:.1f} s "
                  f"({main_run.listings_per_s:.2f} listings/s as reported by rescan; "
                  f"{main_run.listings / main_run.wall_s:.2f}/s with model loading)")

    out: dict[str, Any] = {
        "config": {"seed": args.seed, "size": args.size, "env": env, "logo_search": logo_mode,
                   "copy_model": settings.models.copy_model, "logo_model": settings.models.logo_model or
                   settings.models.copy_model, "semantic_model": settings.models.semantic_model,
                   "ramps": ramps(settings), "counts": bench.counts, "work": str(work)},
        "timing": {"build_s": round(build_s, 2), "import_s": round(imp.seconds, 2),
                   "rescan_wall_s": round(main_run.wall_s, 2), "listings": main_run.listings,
                   "listings_per_s": round(main_run.listings_per_s, 3)},
        "splits": metrics,
    }

    if compare:
        out["logo_search"] = _logo_compare(bench, snapshots, args.workers, order)

    if args.fit:
        from scripts.eval.tuning import tune

        out["tuning"] = tune(bench, base, main_run, settings, console)

    out["timing"]["total_s"] = round(time.perf_counter() - t_start, 2)
    _print(out, args.split)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=float))
        console.print(f"metrics written to {args.json}")
    if args.markdown:
        args.markdown.write_text(markdown(out))
    if args.plot:
        plot(args.plot, metrics)
        console.print(f"plot written to {args.plot}")
    return 0


def _probe(args: argparse.Namespace, settings: Any) -> int:
    from scripts.eval import probes
    from service.usecases.matching import CropGrid

    if args.work is None or not (args.work / "runs" / "main" / "data").is_dir():
        raise SystemExit("--probe needs --work DIR of an earlier run (its benchmark and data dir)")
    grid = CropGrid(tuple(float(x) for x in args.grid.split(",")))
    name = f"bench-{args.size}-seed{args.seed}"
    t0 = time.perf_counter()
    if args.probe == "crop-copy":
        out = probes.crop_copy(args.work, name, settings, grid)
    else:
        model = args.probe_model or settings.models.logo_model or settings.models.copy_model
        out = probes.logo(args.work, name, settings, model, grid)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    console.print_json(json.dumps(out, default=float))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))
    return 0


def _check_errors(run: RescanRun) -> None:
    if run.errors:
        console.print(f"[yellow]{len(run.errors)} listings failed in {run.name}[/yellow]: {run.errors[:3]}")
    if not run.results:
        raise SystemExit(f"rescan {run.name} scored nothing")


def _logo_compare(bench: Benchmark, snapshots: dict[str, DataDir], workers: int | None,
                  order: Any) -> dict[str, Any]:
    """The logo listings and the negatives rescanned with the configured logo_search and always, each from the
    same freshly imported catalog, so both the quality and the speed compare like for like."""
    subset = [q for q in bench.queries if q.track in ("logo", "negative")]
    path = bench.subset("logo-compare", subset)
    out: dict[str, Any] = {}
    for mode, data in snapshots.items():
        run = data.rescan(f"logo-{mode}", path, data.path.parent, workers=workers,
                          extra_env={"COUNTERLENS_SCORING__LOGO_SEARCH": mode})
        _check_errors(run)
        out[mode] = {"listings": run.listings, "wall_s": round(run.wall_s, 2),
                     "listings_per_s": round(run.listings_per_s, 3),
                     "splits": evaluate(subset, run.results, ranked=order, tracks=("logo",))}
    return out


def _print(out: dict[str, Any], which: str) -> None:
    splits = SPLITS if which == "both" else (which,)
    cfg = out["config"]
    for split in splits:
        if split in out["splits"]:
            print_split(console, f"{split} split [{cfg['copy_model']}, logo {cfg['logo_model']}, "
                                 f"logo_search {cfg['logo_search']}]", out["splits"][split])
    if "logo_search" in out:
        rows = [(f"logo_search={mode}", {s: v for s, v in r["splits"].items() if s in splits},
                 r["listings_per_s"]) for mode, r in out["logo_search"].items()]
        title = "logo track: " + " vs ".join(out["logo_search"]) + " (logos + negatives rescanned)"
        print_comparison(console, title, rows, "logo")
    if "tuning" in out:
        from scripts.eval.tuning import print_tuning

        print_tuning(console, out["tuning"], splits)
    t = out["timing"]
    console.print(f"time: build {t['build_s']} s, import {t['import_s']} s, rescan {t['rescan_wall_s']} s "
                  f"({t['listings']} listings, {t['listings_per_s']} listings/s), total {t['total_s']} s")


if __name__ == "__main__":
    raise SystemExit(main())
