"""``POST /v1/score`` and ``POST /v1/score/batch``: the platform's main calls; ``GET /v1/listings/{id}``."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, NoReturn

import anyio
from fastapi import APIRouter, Request
from pydantic import ValidationError

from service.api.errors import ApiError
from service.api.schemas import BatchIn, BatchItemOut, BatchOut, ListingIn, ScoreOut, score_out
from service.domain.model import Listing, Money, SellerInfo
from service.domain.pricing import UnknownCurrencyError
from service.intake.errors import IntakeError
from service.usecases.listing_input import ImageSource, ListingImageLoader
from service.usecases.score_queue import QueueFullError

router = APIRouter(prefix="/v1", tags=["score"])
log = logging.getLogger("counterlens.api.score")


def _loader(request: Request) -> ListingImageLoader:
    return request.app.state.cl.require_container().images  # type: ignore[no-any-return]


def _sources(body: ListingIn, prefix: str = "") -> list[ImageSource]:
    return [ImageSource(field=f"{prefix}images[{i}]" + (".url" if im.url is not None else ".base64"),
                        url=im.url, base64=im.base64) for i, im in enumerate(body.images)]


def _listing(body: ListingIn, images: list[Any]) -> Listing:
    return Listing(
        listing_id=body.listing_id, title=body.title, description=body.description,
        price=Money(body.price.amount, body.price.currency.upper()) if body.price else None,
        seller=SellerInfo(body.seller.id, body.seller.account_age_days, body.seller.units_sold_30d,
                          body.seller.stock) if body.seller else None,
        images=tuple(images),
    )


async def _score_one(request: Request, body: ListingIn, sources: list[ImageSource]) -> ScoreOut:
    state = request.app.state.cl
    c = state.require_container()
    try:
        images = await _loader(request).load_async(sources)
    except IntakeError as exc:
        raise ApiError(exc.http_status, str(exc.code), exc.message, exc.field) from None
    listing = _listing(body, images)
    try:
        # Scored together with the requests arriving meanwhile (service.usecases.score_queue).
        outcome = await asyncio.wrap_future(c.score_queue().submit(listing))
    except QueueFullError as exc:  # overloaded: refused at once, nothing stored; the caller retries
        raise ApiError(503, "overloaded", f"the service is overloaded ({exc}); retry later", None,
                       headers={"Retry-After": "1"}) from None
    except UnknownCurrencyError as exc:
        raise ApiError(422, "unknown_currency", str(exc), "price.currency") from None
    except IntakeError as exc:  # a photo whose header passed but whose body does not decode
        raise ApiError(exc.http_status, str(exc.code), exc.message, exc.field) from None
    r = outcome.result
    m = state.metrics
    m.verdicts.labels(r.verdict.value).inc()
    for model, n in outcome.embedded.items():
        m.embedded_images.labels(model).inc(n)
    for model, n in outcome.cache_hits.items():
        m.cache_hits.labels(model).inc(n)
    for signal, ran in outcome.ran.items():
        if ran:
            m.signals_run.labels(signal).inc()
    return score_out(r, outcome.ran, outcome.ms)


@router.post("/score", response_model=ScoreOut, summary="Score one listing",
             openapi_extra={"requestBody": {"content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/ListingIn"}},
                 "multipart/form-data": {"schema": {"type": "object", "properties": {
                     "listing": {"type": "string", "description": "the listing as JSON (images optional)"},
                     "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
async def score(request: Request) -> ScoreOut:
    """Score one listing. JSON (images as ``url`` or ``base64``) or multipart/form-data with a
    ``listing`` JSON field and image files in ``images``."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        c = request.app.state.cl.require_container()
        limits = c.settings.intake
        async with request.form(max_files=limits.max_images, max_fields=10,
                                max_part_size=limits.max_image_bytes + 1) as form:
            raw = form.get("listing")
            if not isinstance(raw, str):
                raise ApiError(422, "invalid_request", "the form needs a 'listing' JSON field", "listing")
            body = _parse_listing(raw)
            files = form.getlist("images")
            sources = _sources(body)
            for i, f in enumerate(files):
                if isinstance(f, str):
                    raise ApiError(422, "invalid_request", "images must be files", f"images[{i}]")
                data = await f.read(limits.max_image_bytes + 1)
                sources.append(ImageSource(field=f"images[{len(sources)}].file", data=data))
            return await _score_one(request, body, sources)
    # Parsed and validated in one pass from the bytes (pydantic-core), not json.loads and then a walk of
    # the dict: the body is mostly a base64 photo, and this is the hottest call of the service.
    body = _validate_json(ListingIn, await request.body(), "the body")
    return await _score_one(request, body, _sources(body))


def _validate_json(model: Any, raw: str | bytes, what: str, field: str | None = None) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if not any(e["type"] == "json_invalid" for e in exc.errors()):
            _raise_invalid(exc)
    # What pydantic's parser refuses, Python's may still read: a UTF-8 BOM or a UTF-16 body, a lone
    # surrogate escape (a string cut inside an emoji), deep nesting. Those bodies get the answers they
    # always got: validated as a dict (a 422 naming the field), or a 400 where no parser reads them.
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, an integer too long
        raise ApiError(400, "invalid_json", f"{what} is not valid JSON", field) from None
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        _raise_invalid(exc)


def _raise_invalid(exc: ValidationError) -> NoReturn:
    from fastapi.exceptions import RequestValidationError

    raise RequestValidationError(exc.errors()) from None


def _parse_listing(raw: str) -> ListingIn:
    return _validate_json(ListingIn, raw, "the 'listing' field", "listing")  # type: ignore[no-any-return]


@router.post("/score/batch", response_model=BatchOut, summary="Score up to 100 listings")
async def score_batch(request: Request, body: BatchIn) -> BatchOut:
    """Each listing is scored independently; one listing's bad image is reported in its own item."""
    results: list[BatchItemOut | None] = [None] * len(body.listings)

    async def one(i: int, item: ListingIn) -> None:
        try:
            out = await _score_one(request, item, _sources(item, f"listings[{i}]."))
            results[i] = BatchItemOut(listing_id=item.listing_id, result=out)
        except ApiError as exc:
            if exc.code == "not_ready":
                raise
            error: dict[str, Any] = {"code": exc.code, "message": exc.message, "field": exc.field}
            retry = (exc.headers or {}).get("Retry-After")
            if retry is not None:  # overloaded: the item says when to send it again, as a 503 would
                error["retry_after_s"] = int(retry)
            results[i] = BatchItemOut(listing_id=item.listing_id, error=error)
        except Exception:  # a bug of ours with this listing: its own item says so, the others are answered
            log.exception("scoring item %d of a batch failed", i)
            results[i] = BatchItemOut(listing_id=item.listing_id, error={
                "code": "internal_error", "message": "internal server error", "field": f"listings[{i}]"})

    async with anyio.create_task_group() as tg:
        for i, item in enumerate(body.listings):
            tg.start_soon(one, i, item)
    return BatchOut(results=[r for r in results if r is not None])


@router.get("/listings/{listing_id}", summary="A listing's latest score and its history")
async def get_listing(request: Request, listing_id: str) -> dict[str, Any]:
    c = request.app.state.cl.require_container()
    rec = await anyio.to_thread.run_sync(c.listings.get_listing, listing_id)
    if rec is None:
        raise ApiError(404, "not_found", f"no listing {listing_id!r}", "listing_id")
    history = await anyio.to_thread.run_sync(c.listings.history, listing_id)
    return {"listing": _plain(rec), "history": [_plain(h) for h in history]}


def _plain(obj: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj
