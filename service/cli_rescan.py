"""``counterlens rescan``: score a file of listings (locally or on Ray), or re-match stored listings.

Parses and checks every argument before models load (bad arguments exit 2 with a message), calls the
rescan use cases of :mod:`service.usecases.rescan`, draws a progress bar with rate and ETA on stderr and
prints a summary on stdout. Exit 0 on success (bad lines are reported, not fatal), 1 when not one
listing could be processed, 2 on bad arguments, 130 when interrupted (continue with ``--resume``).
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text


def _helpers() -> Any:
    """service.cli, imported when a command runs: service.cli imports this module to register the command,
    and under ``python -m service.cli`` an import back at module level would be circular."""
    import service.cli

    return service.cli


def fail(message: str, code: int = 2) -> NoReturn:
    _helpers().fail(message, code)
    raise AssertionError("unreachable: fail raises typer.Exit")


class Engine(StrEnum):
    LOCAL = "local"
    RAY = "ray"


class RateColumn(ProgressColumn):
    """Listings per second, over rich's recent window."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- /s" if speed is None else f"{speed:,.1f}/s", style="progress.data.speed")


def _bar() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), RateColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=_helpers().console)


@contextmanager
def _ctrl_c_stops() -> Iterator[threading.Event]:
    """While inside: the first Ctrl-C sets the event (the run ends after the listings in flight, with
    everything finished saved), a second one raises KeyboardInterrupt as usual."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        _helpers().console.print("[yellow]stopping after the listings in flight "
                                 "(Ctrl-C again to abort at once)...[/yellow]")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``2024-05-01``, ``2024-05-01T12:00:00+02:00`` (no zone: UTC) or an age: ``90m``, ``24h``, ``7d``."""
    v = value.strip()
    m = _RELATIVE.match(v.lower())
    if m:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        raise ValueError(f"--since {value!r} is neither an ISO date/time nor an age like 24h or 7d") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table("", "", title=title, show_header=False, title_justify="left")
    for k, v in rows:
        t.add_row(k, v)
    return t


def rescan(
    listings: Annotated[Path | None, typer.Argument(
        help="Listings file: .jsonl, .csv or .parquet, one listing a line (not with --stored).",
        show_default=False)] = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="RESULTS.jsonl: one result a line (required for a file; optional with --stored).",
        show_default=False)] = None,
    errors: Annotated[Path | None, typer.Option(
        help="ERRORS.jsonl for bad lines and unreadable images (default RESULTS.errors.jsonl).",
        show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue an interrupted run: listings already in RESULTS/ERRORS are skipped.")]
        = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start again even if RESULTS/ERRORS hold results.")] = False,
    workers: Annotated[int | None, typer.Option(
        min=1, max=256,
        help="Local: scoring threads (default 4; stored: 2 per process, 1 with --processes > 1). "
             "Ray: scoring actors (default CPUs / actor CPUs - 1).",
        show_default=False)] = None,
    processes: Annotated[int | None, typer.Option(
        min=1, max=64, show_default=False,
        help="Local engine and --stored: worker processes (default one per CPU, at most 8). A file's workers "
             "each load the models and score the chunks they are sent; --stored forks workers that each "
             "re-match a share of the listings. Scoring a seen photo and re-matching are Python, so the "
             "threads of one process use one core (1: no worker processes).")] = None,
    chunk: Annotated[int | None, typer.Option(
        min=1, max=1024, show_default=False,
        help="Local: listings a scoring thread takes at a time (one model batch, one transaction; default 32 "
             "with worker processes, 16 without). Larger chunks share each batch's fixed cost over more "
             "cached photos (docs/performance.md) but hold more listings in flight when Ctrl-C drains the "
             "run.")] \
        = None,
    engine: Annotated[Engine, typer.Option(help="Where to score: this process or a Ray cluster.")] \
        = Engine.LOCAL,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster: ray://host:10001 or auto (default: the running or a new local one).",
        show_default=False)] = None,
    actor_cpus: Annotated[float, typer.Option(min=0.1, help="Ray: CPUs reserved per scoring actor.")] = 1.0,
    actor_gpus: Annotated[float, typer.Option(
        min=0.0, help="Ray: GPUs per actor (>0 runs models on CUDA).")] = 0.0,
    checkpoint_every: Annotated[int, typer.Option(
        min=1, help="Commit (write + fsync) the journals after this many listings (and every second).")]
        = 64,
    stored: Annotated[bool, typer.Option(
        "--stored", help="Re-match stored listings (stored embeddings) against the current catalog.")]
        = False,
    brand: Annotated[str | None, typer.Option(
        help="--stored: only listings whose latest matches or review items involve this brand.",
        show_default=False)] = None,
    since: Annotated[str | None, typer.Option(
        help="--stored: only listings seen since this ISO date/time or age (24h, 7d).",
        show_default=False)] = None,
) -> None:
    """Score a file of listings (resumable; locally or on Ray), or re-match stored listings (--stored)."""
    if stored:
        if listings is not None:
            fail("--stored re-matches stored listings: give no LISTINGS file")
        for flag, given in (("--resume", resume), ("--errors", errors is not None),
                            ("--engine ray", engine is Engine.RAY), ("--address", address is not None)):
            if given:
                fail(f"{flag} is not available with --stored")
        if chunk is not None:
            fail("--chunk is not available with --stored (it re-matches pages of stored listings)")
        _stored(out_path, overwrite, workers, processes, brand, since)
        return
    if brand is not None or since is not None:
        fail("--brand and --since select stored listings: use them with --stored")
    if processes is not None and engine is Engine.RAY:
        fail("--processes is for the local engine (Ray runs --workers actors)")
    if listings is None:
        fail("give a LISTINGS file (.jsonl, .csv, .parquet) or --stored")
    if out_path is None:
        fail("--out RESULTS.jsonl is required")
    if engine is Engine.LOCAL and address is not None:
        fail("--address needs --engine ray")
    if engine is Engine.RAY and chunk is not None:
        fail("--chunk is for the local engine")
    _file(listings, out_path, errors, resume, overwrite, workers, engine, address, actor_cpus, actor_gpus,
          checkpoint_every, chunk, processes)


def _file(listings: Path, out_path: Path, errors: Path | None, resume: bool, overwrite: bool,
          workers: int | None, engine: Engine, address: str | None, actor_cpus: float, actor_gpus: float,
          checkpoint_every: int, chunk: int | None = None, processes: int | None = None) -> None:
    from service.usecases.rescan import (
        FileRescan,
        ListingRescanner,
        RescanEngine,
        RescanWorkerError,
        ThreadedEngine,
        default_chunk,
        default_processes,
    )
    from service.usecases.rescan_io import RescanInputError, count_rows
    from service.usecases.rescan_processes import ProcessEngine

    cli = _helpers()

    try:
        job = FileRescan(listings, out_path, errors, resume=resume, overwrite=overwrite,
                         checkpoint_every=checkpoint_every)
        point = job.prepare()
        total = count_rows(listings)
    except RescanInputError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot read {listings}: {exc.strerror}")
    if engine is Engine.RAY:
        try:
            import ray  # noqa: F401
        except ImportError:
            fail("--engine ray needs Ray: pip install 'counterlens[ray]'")
    settings = cli.load_settings()
    if processes is None:
        processes = default_processes() if engine is Engine.LOCAL else 1
    chunk = chunk or default_chunk(processes)
    # Ray actors and worker processes load their own models (worker 0 reconciles the catalog); only the
    # threaded engine scores in this process.
    c = cli._container(settings) if engine is Engine.RAY or processes == 1 else None
    runner: RescanEngine
    closer: Any = None
    try:
        if engine is Engine.RAY:
            from service.usecases.rescan_ray import RayEngine

            ray_engine = closer = RayEngine(settings, job.base, address=address, actors=workers,
                                            actor_cpus=actor_cpus, actor_gpus=actor_gpus)
            with cli.console.status("connecting to Ray..."):
                actors = ray_engine.start()
            cli.console.print(f"Ray: {actors} scoring actor(s) of {actor_cpus:g} CPU, {actor_gpus:g} GPU")
            runner = ray_engine
        elif processes > 1:
            procs = closer = ProcessEngine(settings, job.base, processes=processes, threads=workers or 4,
                                           chunk=chunk)
            with cli.console.status(f"starting {processes} worker processes (each loads the models)..."):
                procs.start()
            runner = procs
        else:
            assert c is not None
            runner = ThreadedEngine(ListingRescanner(c.scorer, c.images, job.base), workers=workers or 4,
                                    chunk=chunk)
        if point.count:
            cli.console.print(f"resuming: {len(point.done_ids)} results and {len(point.handled_lines)} "
                              "errors already written")
        with _bar() as bar:
            task = bar.add_task("rescanning", total=total, completed=min(total, point.count))
            with _ctrl_c_stops() as stop:
                summary = job.run(runner, progress=lambda n: bar.advance(task, n), stop=stop)
    except RescanWorkerError as exc:  # starting the workers, or one died: the journals keep what finished
        cli.console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    finally:
        if closer is not None:
            closer.close()
        if c is not None:
            c.close()

    rows = [(v, str(summary.verdicts.get(v, 0))) for v in ("clear", "review", "likely_counterfeit")]
    rows += [("unchanged (as stored)", str(summary.unchanged)),
             ("errors", f"{summary.errors}" + (f"  (see {job.errors})" if summary.errors else "")),
             ("skipped (done before)", str(summary.skipped)),
             ("listings/s", f"{summary.rate:,.1f}  ({summary.processed} in {summary.elapsed_s:,.1f} s)")]
    for model, n in sorted(summary.embedded.items()):
        rows.append((f"embedded {model}", f"{n} photos, {summary.cache_hits.get(model, 0)} from cache"))
    cli.out.print(_summary_table(f"rescan of {listings} -> {out_path}", rows))
    if summary.unknown_fields:
        names = ", ".join(sorted(summary.unknown_fields))
        cli.console.print(f"[yellow]ignored unknown field(s):[/yellow] {names}")
    if summary.interrupted:
        cli.console.print("[yellow]interrupted[/yellow]: finished listings are saved; continue with --resume")
        raise typer.Exit(130)
    if summary.scored == 0 and (summary.errors > 0 or summary.skipped == 0):
        cli.console.print("[red]error:[/red] not one listing could be processed")
        raise typer.Exit(1)


def _stored(out_path: Path | None, overwrite: bool, workers: int | None, processes: int | None,
            brand: str | None, since: str | None) -> None:
    from service.storage.errors import NotFoundError
    from service.usecases.rescan import (
        RescanWorkerError,
        StoredRescanJob,
        default_stored_processes,
        default_stored_workers,
        fork_available,
    )
    from service.usecases.rescan_io import JsonlJournal

    cli = _helpers()

    try:
        since_at = parse_since(since) if since is not None else None
    except ValueError as exc:
        fail(str(exc))
    if brand is not None and not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?", brand):
        fail(f"--brand {brand!r} is not a brand slug")
    if processes is None:
        processes = default_stored_processes()
    elif processes > 1 and not fork_available():
        fail("--processes > 1 needs a platform that can fork processes (not Windows)")
    if out_path is not None:
        if out_path.exists() and out_path.stat().st_size > 0 and not overwrite:
            fail(f"--out {out_path} already holds results: pass --overwrite to replace it")
        if not out_path.parent.is_dir():
            fail(f"--out: the folder {out_path.parent} does not exist")
    settings = cli.load_settings()
    c = cli._container(settings)
    journal = JsonlJournal(out_path, append=False) if out_path is not None else None
    try:
        job = StoredRescanJob(c.scorer, c.listings, brand=brand, since=since_at,
                              workers=workers or default_stored_workers(processes), results=journal,
                              processes=processes, resources=c.db)
        try:
            total = job.count()
        except NotFoundError:
            fail(f"no brand {brand!r}")
        with _bar() as bar:
            task = bar.add_task("re-matching stored listings", total=total)
            try:
                with _ctrl_c_stops() as stop:
                    report = job.run(progress=lambda n: bar.advance(task, n), cancel=stop)
            except KeyboardInterrupt:
                report = None
            except RescanWorkerError as exc:
                cli.console.print(f"[red]error:[/red] {exc}\nthe listings re-matched before it are recorded")
                raise typer.Exit(1) from None
            if report is None or report.cancelled:
                cli.console.print("[yellow]interrupted[/yellow]: the listings re-matched so far "
                                         "are recorded")
                raise typer.Exit(130)
    finally:
        if journal is not None:
            journal.close()
        c.close()
    rows = [(v, str(report.verdicts.get(v, 0))) for v in ("clear", "review", "likely_counterfeit")]
    rows += [("verdict changed", str(report.changed)), ("newly flagged", str(report.newly_flagged)),
             ("no stored embeddings", str(report.missing_embeddings)), ("errors", str(report.errors)),
             ("listings/s", f"{report.rate:,.1f}  ({report.scanned} in {report.elapsed_s:,.1f} s)")]
    scope = f"brand {brand}" if brand else "all brands"
    cli.out.print(_summary_table(f"stored rescan ({scope}{', since ' + since if since else ''})", rows))
    if report.scanned and report.rescored == 0:
        cli.console.print("[red]error:[/red] not one stored listing could be re-matched")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Adds the ``rescan`` command to the ``counterlens`` app."""
    app.command("rescan")(rescan)
