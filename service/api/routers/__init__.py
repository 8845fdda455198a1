"""Thin routers: parse the request, call one use case, map the result."""

from __future__ import annotations

from fastapi import FastAPI


def register_routers(app: FastAPI) -> None:
    # Imported here so the app factory module stays importable while routers are being added.
    from service.api.routers import catalog, score

    app.include_router(catalog.router)
    app.include_router(score.router)
