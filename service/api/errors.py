"""Every error the API returns is JSON: ``{"error": {"code", "message", "field"}}`` (plus ``details``
for validation errors), so a platform can tell which field of its request was wrong."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("counterlens.api")


class ApiError(Exception):
    """An error with an HTTP status, a machine code, a message and the request field it concerns."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_body(code: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message, "field": field}
    err.update(extra)
    return {"error": err}


def _loc_to_field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path", "header", "form")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or ".".join(map(str, loc))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.field), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": _loc_to_field(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type")}
            for e in exc.errors()
        ]
        first = details[0] if details else {"field": None, "message": "invalid request"}
        return JSONResponse(
            error_body("invalid_request", f"{first['field']}: {first['message']}", first["field"],
                       details=details),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 503: "not_ready"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    # Errors the inner layers raise on purpose, each naming its field.
    from service.intake.errors import IntakeError
    from service.storage.errors import (
        ConflictError,
        InvalidInputError,
        NotFoundError,
        StorageError,
        WriteLockTimeoutError,
    )
    from service.usecases.catalog import CatalogInputError

    @app.exception_handler(IntakeError)
    async def _intake(_: Request, exc: IntakeError) -> JSONResponse:
        return JSONResponse(error_body(str(exc.code), exc.message, exc.field), status_code=exc.http_status)

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        if isinstance(exc, NotFoundError):
            status, code = 404, "not_found"
        elif isinstance(exc, ConflictError):
            status, code = 409, "conflict"
        elif isinstance(exc, InvalidInputError):
            status, code = 422, "invalid_input"
        elif isinstance(exc, WriteLockTimeoutError):
            status, code = 503, "busy"  # the database is held by a hung writer: try again later
        else:
            status, code = 500, "storage_error"
        return JSONResponse(error_body(code, exc.message, exc.field), status_code=status)

    @app.exception_handler(CatalogInputError)
    async def _catalog(_: Request, exc: CatalogInputError) -> JSONResponse:
        return JSONResponse(error_body("invalid_input", exc.message, exc.field), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
