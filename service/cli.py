"""The ``counterlens`` command line. Each command parses its arguments, calls one use case, prints.

Bad arguments exit with code 2 and a message; the composition root is the same one the API uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from service.settings import Settings

app = typer.Typer(help="counterlens: counterfeit detection for online marketplaces.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
catalog_app = typer.Typer(help="Brand reference catalogs: import, export, stats.", no_args_is_help=True)
models_app = typer.Typer(help="Embedding models: export to ONNX, show what is configured.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")
app.add_typer(models_app, name="models")

console = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment; invalid values exit 2 naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        # A union setting (a number or "auto") fails once per member, each under a tag of the member's
        # type ("constrained-float", "literal['auto']"): one line per variable, its members' messages joined.
        found: dict[str, list[str]] = {}
        for e in exc.errors():
            loc = "__".join(str(p) for p in e["loc"] if not _union_tag(p)).upper()
            found.setdefault(loc, []).append(e["msg"])
        fail("invalid settings:\n  " + "\n  ".join(f"COUNTERLENS_{loc}: {' or '.join(msgs)}"
                                                     for loc, msgs in found.items()))


def _union_tag(part: object) -> bool:
    # (Settings' own names are identifiers: no tag is one, none of them has "-" or "[".)
    return isinstance(part, str) and (part in {"float", "int", "str", "bool"} or "[" in part or "-" in part)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default 8000).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help="Worker processes (default 1).")] = None,
) -> None:
    """Start the HTTP service."""
    import uvicorn

    # Overrides go through the environment so that every worker process builds identical Settings.
    for name, value in (("HOST", host), ("PORT", port), ("WORKERS", workers)):
        if value is not None:
            os.environ[f"COUNTERLENS_SERVER__{name}"] = str(value)
    settings = load_settings()
    from service.logs import configure_logging

    configure_logging(settings.server.log_level)
    console.print(f"counterlens listening on http://{settings.server.host}:{settings.server.port} "
                  f"(data dir {settings.data_dir}, {settings.server.workers} worker(s))")
    options: dict[str, Any] = {"log_config": None, "access_log": False, "timeout_graceful_shutdown": 10}
    from service.api.workers import APP, ReusePortSupervisor, reuse_port_supported

    if settings.server.workers > 1 and reuse_port_supported():
        # A listening socket per worker, so connections spread over the workers (service/api/workers.py).
        try:
            status = ReusePortSupervisor(settings.server.host, settings.server.port, settings.server.workers,
                                         **options).run()
        except OSError as exc:
            fail(f"cannot listen on {settings.server.host}:{settings.server.port}: {exc}", 1)
        raise typer.Exit(status)
    uvicorn.run(APP, factory=True, host=settings.server.host, port=settings.server.port,
                workers=settings.server.workers, **options)


@contextmanager
def _exported_models() -> Iterator[None]:
    """Around loading the models: a serving install (no torch) that holds no export exits 1 saying where
    to make one (embeddings.exporting.ExportSourcesUnavailableError)."""
    from embeddings.exporting import ExportSourcesUnavailableError

    try:
        yield
    except ExportSourcesUnavailableError as exc:
        fail(str(exc), 1)


def _container(settings: Settings, *, reconcile: bool = True) -> Any:
    from service.container import build_container

    with _exported_models(), console.status("loading models and indexes..."):
        return build_container(settings, reconcile=reconcile)


def _progress() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TaskProgressColumn(), TimeRemainingColumn(), console=console)


@catalog_app.command("import")
def catalog_import(
    manifest: Annotated[Path, typer.Argument(help="CSV: brand, sku, kind, image, ref_id, title, price, currency")],
) -> None:
    """Import reference images from a manifest (idempotent; bad rows are reported and skipped)."""
    if not manifest.is_file():
        fail(f"no such manifest: {manifest}")
    settings = load_settings()
    from service.usecases.catalog import CatalogInputError

    c = _container(settings)
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            total = max(0, sum(1 for _ in fh) - 1)
        with _progress() as bar:
            task = bar.add_task("importing", total=total)
            report = c.catalog.import_manifest(manifest, progress=lambda n: bar.advance(task, n))
    except CatalogInputError as exc:
        fail(str(exc))
    finally:
        c.close()
    for line, reason in report.errors:
        console.print(f"[yellow]line {line}:[/yellow] {reason}")
    out.print(f"{report.rows} rows: {report.added} added, {report.duplicates} already present, "
              f"{len(report.errors)} errors, {report.brands_created} new brands")
    if report.rows and report.added + report.duplicates == 0:
        raise typer.Exit(1)


@catalog_app.command("export")
def catalog_export(
    brand: Annotated[str, typer.Option(help="The brand to export.")],
    to: Annotated[Path, typer.Option(help="Folder to write catalog.csv and the images into.")],
) -> None:
    """Export a brand's catalog as a manifest plus images, importable with `catalog import`."""
    import csv

    settings = load_settings()
    c = _container(settings, reconcile=False)
    try:
        if c.catalog_repo.get_brand(brand) is None:
            fail(f"no brand {brand!r}")
        export = c.catalog_repo.export_brand(brand)
        to.mkdir(parents=True, exist_ok=True)
        products = {p.sku: p for p in export.products}
        with (to / "catalog.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["brand", "sku", "kind", "image", "ref_id", "title", "price", "currency"])
            for r in export.references:
                name = f"images/{r.sha256[:16]}.img"
                (to / "images").mkdir(exist_ok=True)
                (to / name).write_bytes(c.blobs.get(r.sha256))
                p = products.get(r.sku or "")
                price = p.reference_price if p else None
                w.writerow([brand, r.sku or "", r.kind.value, name, r.ref_id or "", p.title if p else "",
                            f"{price.amount:.2f}" if price else "", price.currency if price else ""])
        out.print(f"exported {len(export.references)} references of {brand} to {to}")
    finally:
        c.close()


@catalog_app.command("stats")
def catalog_stats() -> None:
    """Per brand: products, references by kind, authorized sellers, open review items; index sizes."""
    from rich.table import Table

    settings = load_settings()
    c = _container(settings)
    try:
        t = Table("brand", "products", "product refs", "logo refs", "sellers", "open reviews")
        for s in c.catalog_repo.stats():
            t.add_row(s.brand, str(s.products), str(s.product_references), str(s.logo_references),
                      str(s.authorized_sellers), str(s.open_review_items))
        out.print(t)
        for name, n in c.index_sizes().items():
            out.print(f"index {name}: {n} vectors")
    finally:
        c.close()


@app.command()
def reindex() -> None:
    """Embed every reference with the configured models (after a model change) and rebuild the indexes.
    Embeddings already stored for a model version are re-used, never recomputed."""
    settings = load_settings()
    c = _container(settings, reconcile=False)
    try:
        with _progress() as bar:
            task = bar.add_task("embedding references", total=None)
            done = c.catalog.reindex(progress=lambda n: bar.advance(task, n))
        for rec in done:
            out.print(rec.describe())
    finally:
        c.close()


@models_app.command("export")
def models_export() -> None:
    """Export (or verify) the configured models' ONNX files in the data dir; prints what is in use."""
    settings = load_settings()
    from service.container import build_embedders

    with _exported_models():
        built, roles = build_embedders(settings)
    for name, e in built.items():
        out.print(f"{name}: {e.model_id} dim={e.dim} provider={e.provider}")
    out.print(f"roles: copy={roles.copy} semantic={roles.semantic} logo={roles.logo}")


@app.command()
def demo() -> None:
    """Load the demo catalog (scikit-image photos, simple-icons logos) into the data dir; idempotent."""
    from service.demo import AUTHORIZED_SELLERS, write_demo

    settings = load_settings()
    manifest = write_demo(settings.data_dir / "demo")
    c = _container(settings)
    try:
        report = c.catalog.import_manifest(manifest)
        for brand, sellers in AUTHORIZED_SELLERS.items():
            for seller in sellers:
                c.catalog.authorize_seller(brand, seller, "demo")
    finally:
        c.close()
    out.print(f"demo catalog: {report.added} added, {report.duplicates} already present, "
              f"{len(report.errors)} errors; sample listings in {manifest.parent}")
    for line, reason in report.errors:
        console.print(f"[yellow]line {line}:[/yellow] {reason}")


from service.cli_rescan import register as _register_rescan  # noqa: E402  (needs the helpers above)

_register_rescan(app)


def main() -> None:  # pragma: no cover - console-script shim
    app(prog_name="counterlens")


if __name__ == "__main__":  # pragma: no cover
    main()
