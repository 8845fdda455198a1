"""A tiny app factory for the worker supervisor's tests: answers which process served the request, and
how many workers it was told there are."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def _pid(_: Request) -> PlainTextResponse:
    return PlainTextResponse(str(os.getpid()))


async def _workers(_: Request) -> PlainTextResponse:
    return PlainTextResponse(os.environ.get("COUNTERLENS_SERVER__WORKERS", "0"))


def app_factory() -> Starlette:
    return Starlette(routes=[Route("/", _pid), Route("/workers", _workers)])
