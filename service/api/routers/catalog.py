"""``/v1/brands/...``: brands, reference images (upload, by URL, bulk zip/CSV), products, sellers.

Every path is scoped by the brand in it; the brand portal's access control will sit in front of these.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from service.api.errors import ApiError
from service.api.schemas import (
    BrandIn,
    BrandOut,
    BrandPatch,
    ByUrlIn,
    ImportOut,
    PriceIn,
    ProductIn,
    ProductOut,
    ReferenceOut,
    SellerAuthIn,
    SellerAuthOut,
)
from service.domain.model import Money, ReferenceKind
from service.storage.errors import NotFoundError
from service.storage.records import KEEP, BrandRecord, ProductRecord, ReferenceRecord, SellerRecord
from service.usecases.catalog import ReferenceUpload

router = APIRouter(prefix="/v1/brands", tags=["catalog"])

MAX_BULK_BYTES = 512 * 1024 * 1024
MAX_BULK_FILES = 20_000


def _c(request: Request) -> Any:
    return request.app.state.cl.require_container()


def _brand_out(b: BrandRecord) -> BrandOut:
    return BrandOut(slug=b.slug, name=b.name, aliases=list(b.aliases), review_threshold=b.review_threshold,
                    likely_threshold=b.likely_threshold, created_at=b.created_at)


def _ref_out(r: ReferenceRecord, created: bool | None = None) -> ReferenceOut:
    return ReferenceOut(id=r.id, brand=r.brand, kind=r.kind.value, sku=r.sku, ref_id=r.ref_id, sha256=r.sha256,
                        phash=r.phash, width=r.width, height=r.height, source=r.source,
                        created_at=r.created_at, created=created)


def _product_out(p: ProductRecord) -> ProductOut:
    price = (PriceIn(amount=p.reference_price.amount, currency=p.reference_price.currency)
             if p.reference_price else None)
    return ProductOut(brand=p.brand, sku=p.sku, title=p.title, reference_price=price, created_at=p.created_at,
                      updated_at=p.updated_at)


def _seller_out(s: SellerRecord) -> SellerAuthOut:
    return SellerAuthOut(brand=s.brand, seller_id=s.seller_id, note=s.note, created_at=s.created_at)


async def _brand(c: Any, brand: str) -> BrandRecord:
    b = await anyio.to_thread.run_sync(c.catalog_repo.get_brand, brand)
    if b is None:
        raise ApiError(404, "not_found", f"no brand {brand!r}", "brand")
    return b  # type: ignore[no-any-return]


# ------------------------------------------------------------------ brands


@router.post("", status_code=201, response_model=BrandOut, summary="Create a brand")
async def create_brand(request: Request, body: BrandIn) -> BrandOut:
    c = _c(request)
    b = await anyio.to_thread.run_sync(
        lambda: c.catalog.create_brand(body.slug, body.name, body.aliases, review_threshold=body.review_threshold,
                                       likely_threshold=body.likely_threshold))
    return _brand_out(b)


@router.get("", response_model=list[BrandOut], summary="List brands")
async def list_brands(request: Request) -> list[BrandOut]:
    c = _c(request)
    return [_brand_out(b) for b in await anyio.to_thread.run_sync(c.catalog_repo.list_brands)]


@router.get("/{brand}", response_model=BrandOut)
async def get_brand(request: Request, brand: str) -> BrandOut:
    return _brand_out(await _brand(_c(request), brand))


@router.patch("/{brand}", response_model=BrandOut, summary="Change a brand's name, aliases or thresholds")
async def update_brand(request: Request, brand: str, body: BrandPatch) -> BrandOut:
    """Fields left out are kept; a threshold set to null falls back to the service-wide one. New
    thresholds re-read the brand's stored listings in the background (their verdicts and review items
    follow), a new name or alias every stored listing (any title may name the brand)."""
    c = _c(request)
    given = body.model_fields_set
    if "name" in given and body.name is None:
        raise ApiError(422, "invalid_input", "name must not be null", "name")
    if "aliases" in given and body.aliases is None:
        raise ApiError(422, "invalid_input", "aliases must be a list (empty: no aliases), not null", "aliases")
    b = await anyio.to_thread.run_sync(lambda: c.catalog.update_brand(
        brand, name=body.name, aliases=body.aliases,
        review_threshold=body.review_threshold if "review_threshold" in given else KEEP,
        likely_threshold=body.likely_threshold if "likely_threshold" in given else KEEP))
    return _brand_out(b)


# ------------------------------------------------------------------ references


def _price(price: float | None, currency: str | None, field: str = "price") -> Money | None:
    if price is None:
        return None
    if not (price >= 0 and price != float("inf")):
        raise ApiError(422, "invalid_input", "price must be a finite number >= 0", field)
    cur = (currency or "USD").upper()
    if len(cur) != 3 or not cur.isalpha():
        raise ApiError(422, "invalid_input", "currency must be a 3-letter ISO code", "currency")
    return Money(price, cur)


@router.post("/{brand}/references", status_code=201, response_model=list[ReferenceOut],
             summary="Upload reference images (multipart)")
async def upload_references(
    request: Request,
    brand: str,
    files: Annotated[list[UploadFile], File(description="one or more images")],
    kind: Annotated[Literal["product", "logo"], Form()] = "product",
    sku: Annotated[str | None, Form(max_length=200)] = None,
    ref_id: Annotated[str | None, Form(max_length=200)] = None,
    title: Annotated[str | None, Form(max_length=1000)] = None,
    price: Annotated[float | None, Form()] = None,
    currency: Annotated[str | None, Form()] = None,
) -> list[ReferenceOut]:
    """Re-uploading the same bytes returns the existing reference with ``created: false``."""
    c = _c(request)
    await _brand(c, brand)
    limits = c.settings.intake
    if len(files) > 100:
        raise ApiError(422, "too_many_images", "at most 100 files per upload", "files")
    if kind == "product" and not sku:
        raise ApiError(422, "invalid_input", "a product reference needs a sku", "sku")
    money = _price(price, currency)
    uploads = []
    for i, f in enumerate(files):
        data = await f.read(limits.max_image_bytes + 1)
        if len(data) > limits.max_image_bytes:
            raise ApiError(413, "too_large", f"larger than {limits.max_image_bytes} bytes", f"files[{i}]")
        uploads.append(ReferenceUpload(brand=brand, kind=ReferenceKind(kind), data=data,
                                       source=f"upload:{(f.filename or '')[:200]}", sku=sku,
                                       ref_id=ref_id if len(files) == 1 else (f"{ref_id}-{i + 1}" if ref_id else None),
                                       title=title, price=money, field=f"files[{i}]"))
    added = await anyio.to_thread.run_sync(c.catalog.add, uploads)
    return [_ref_out(a.reference, a.created) for a in added]


@router.post("/{brand}/references/by-url", status_code=201, response_model=list[ReferenceOut],
             summary="Add reference images fetched from URLs")
async def add_by_url(request: Request, brand: str, body: ByUrlIn) -> list[ReferenceOut]:
    c = _c(request)
    await _brand(c, brand)
    if body.kind == "product" and not body.sku:
        raise ApiError(422, "invalid_input", "a product reference needs a sku", "sku")
    money = Money(body.price.amount, body.price.currency.upper()) if body.price else None
    uploads = []
    for i, url in enumerate(body.urls):
        data = (await c.fetcher.fetch(url, f"urls[{i}]")).content
        uploads.append(ReferenceUpload(brand=brand, kind=ReferenceKind(body.kind), data=data,
                                       source=f"url:{url}"[:500], sku=body.sku, ref_id=body.ref_id,
                                       title=body.title, price=money, field=f"urls[{i}]"))
    added = await anyio.to_thread.run_sync(c.catalog.add, uploads)
    return [_ref_out(a.reference, a.created) for a in added]


@router.post("/{brand}/references/bulk", response_model=ImportOut,
             summary="Bulk import: a zip with catalog.csv and images, or a CSV manifest of image URLs")
async def bulk_import(request: Request, brand: str,
                      file: Annotated[UploadFile, File(description="a .zip or a .csv manifest")]) -> ImportOut:
    """The manifest has the ``catalog import`` columns; its ``brand`` column must name this brand (or be
    empty). Bad rows are reported with their line number and skipped."""
    c = _c(request)
    await _brand(c, brand)
    data = await file.read(MAX_BULK_BYTES + 1)
    if len(data) > MAX_BULK_BYTES:
        raise ApiError(413, "too_large", f"larger than {MAX_BULK_BYTES} bytes", "file")
    with tempfile.TemporaryDirectory(prefix="counterlens-bulk-") as tmp:
        root = Path(tmp)
        if data[:4] == b"PK\x03\x04":
            manifest = _unzip(data, root)
        else:
            manifest = root / "catalog.csv"
            manifest.write_bytes(data)
        _force_brand(manifest, brand)
        report = await anyio.to_thread.run_sync(c.catalog.import_manifest, manifest)
    return ImportOut(rows=report.rows, added=report.added, duplicates=report.duplicates,
                     brands_created=report.brands_created,
                     errors=[{"line": line, "reason": reason} for line, reason in report.errors])


def _unzip(data: bytes, root: Path) -> Path:
    """Extract a catalog zip safely: no absolute or ``..`` paths, bounded count and total size."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ApiError(422, "invalid_input", "not a valid zip file", "file") from None
    infos = zf.infolist()
    if len(infos) > MAX_BULK_FILES:
        raise ApiError(422, "invalid_input", f"more than {MAX_BULK_FILES} files in the zip", "file")
    if sum(i.file_size for i in infos) > MAX_BULK_BYTES * 2:
        raise ApiError(422, "invalid_input", "the zip expands to too many bytes", "file")
    manifest: Path | None = None
    for info in infos:
        name = PurePosixPath(info.filename)
        if info.is_dir():
            continue
        if name.is_absolute() or ".." in name.parts:
            raise ApiError(422, "invalid_input", f"unsafe path in zip: {info.filename!r}", "file")
        target = root.joinpath(*name.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, target.open("wb") as dst:
            dst.write(src.read(MAX_BULK_BYTES))
        if name.name.lower().endswith(".csv") and (manifest is None or len(name.parts) < len(manifest.parts)):
            manifest = target
    if manifest is None:
        raise ApiError(422, "invalid_input", "the zip holds no .csv manifest", "file")
    return manifest


def _force_brand(manifest: Path, brand: str) -> None:
    import csv

    with manifest.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
        fields = list(rows[0].keys()) if rows else ["brand"]
    for i, row in enumerate(rows):
        if (row.get("brand") or "").strip().lower() not in ("", brand):
            raise ApiError(422, "invalid_input", f"line {i + 2} names brand {row.get('brand')!r}, not {brand!r}",
                           "file")
        row["brand"] = brand
    if "brand" not in fields:
        fields.insert(0, "brand")
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


@router.get("/{brand}/references", response_model=list[ReferenceOut])
async def list_references(request: Request, brand: str, kind: Literal["product", "logo"] | None = None,
                          limit: int = 100, offset: int = 0) -> list[ReferenceOut]:
    c = _c(request)
    await _brand(c, brand)
    if not (1 <= limit <= 1000) or offset < 0:
        raise ApiError(422, "invalid_input", "limit must be 1..1000 and offset >= 0", "limit")
    refs = await anyio.to_thread.run_sync(lambda: c.catalog_repo.list_references(brand, kind))
    return [_ref_out(r) for r in refs[offset:offset + limit]]


@router.get("/{brand}/references/{image_id}", response_model=ReferenceOut)
async def get_reference(request: Request, brand: str, image_id: int) -> ReferenceOut:
    c = _c(request)
    r = await anyio.to_thread.run_sync(c.catalog_repo.get_reference, brand, image_id)
    if r is None:
        raise ApiError(404, "not_found", f"brand {brand!r} has no reference {image_id}", "image_id")
    return _ref_out(r)


@router.delete("/{brand}/references/{image_id}", status_code=204)
async def delete_reference(request: Request, brand: str, image_id: int) -> Response:
    c = _c(request)
    removed = await anyio.to_thread.run_sync(c.catalog.delete_references, brand, [image_id])
    if not removed.ids:
        raise ApiError(404, "not_found", f"brand {brand!r} has no reference {image_id}", "image_id")
    return Response(status_code=204)


# ------------------------------------------------------------------ products


@router.get("/{brand}/products", response_model=list[ProductOut])
async def list_products(request: Request, brand: str) -> list[ProductOut]:
    c = _c(request)
    await _brand(c, brand)
    return [_product_out(p) for p in await anyio.to_thread.run_sync(c.catalog_repo.list_products, brand)]


@router.get("/{brand}/products/{sku}", response_model=ProductOut)
async def get_product(request: Request, brand: str, sku: str) -> ProductOut:
    c = _c(request)
    p = await anyio.to_thread.run_sync(c.catalog_repo.get_product, brand, sku)
    if p is None:
        raise ApiError(404, "not_found", f"brand {brand!r} has no product {sku!r}", "sku")
    return _product_out(p)


@router.put("/{brand}/products/{sku}", response_model=ProductOut)
async def put_product(request: Request, brand: str, sku: str, body: ProductIn) -> ProductOut:
    c = _c(request)
    await _brand(c, brand)
    money = Money(body.price.amount, body.price.currency.upper()) if body.price else None
    p, _ = await anyio.to_thread.run_sync(c.catalog.put_product, brand, sku, body.title, money)
    return _product_out(p)


@router.delete("/{brand}/products/{sku}", status_code=204)
async def delete_product(request: Request, brand: str, sku: str) -> Response:
    c = _c(request)
    if await anyio.to_thread.run_sync(c.catalog_repo.get_product, brand, sku) is None:
        raise ApiError(404, "not_found", f"brand {brand!r} has no product {sku!r}", "sku")
    await anyio.to_thread.run_sync(c.catalog.delete_product, brand, sku)
    return Response(status_code=204)


# ------------------------------------------------------------------ authorized sellers


@router.get("/{brand}/sellers", response_model=list[SellerAuthOut])
async def list_sellers(request: Request, brand: str) -> list[SellerAuthOut]:
    c = _c(request)
    await _brand(c, brand)
    return [_seller_out(s) for s in await anyio.to_thread.run_sync(c.catalog_repo.list_authorized_sellers, brand)]


@router.post("/{brand}/sellers", status_code=201, response_model=SellerAuthOut)
async def add_seller(request: Request, brand: str, body: SellerAuthIn) -> SellerAuthOut:
    c = _c(request)
    await _brand(c, brand)
    s, _ = await anyio.to_thread.run_sync(c.catalog.authorize_seller, brand, body.seller_id, body.note)
    return _seller_out(s)


@router.delete("/{brand}/sellers/{seller_id}", status_code=204)
async def remove_seller(request: Request, brand: str, seller_id: str) -> Response:
    c = _c(request)
    if not await anyio.to_thread.run_sync(c.catalog.revoke_seller, brand, seller_id):
        raise NotFoundError(f"brand {brand!r} has no authorized seller {seller_id!r}", "seller_id")
    return Response(status_code=204)
