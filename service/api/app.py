"""FastAPI app factory.

The lifespan builds the :class:`~service.container.Container` (models, indexes, storage) in a worker
thread *after* the server starts listening, so ``/livez`` answers at once and ``/readyz`` says 503 until
everything is loaded; routes that need the container answer 503 ``not_ready`` meanwhile.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.body_limit import ScoreBodyLimit
from service.api.errors import ApiError, install_error_handlers
from service.api.metrics import Metrics, ModelTimeCollector, ScoreQueueCollector
from service.settings import Settings

log = logging.getLogger("counterlens.api")

ContainerFactory = Callable[[Settings], Any]


class AppState:
    """What the routers reach through ``request.app.state.cl``."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.container: Any = None
        self.load_error: str | None = None
        self.loading: asyncio.Task[None] | None = None

    def require_container(self) -> Any:
        if self.container is None:
            raise ApiError(503, "not_ready", self.load_error or "models and indexes are still loading")
        return self.container


def _route_template(scope: Scope) -> str:
    """The matched route's template (``/v1/brands/{brand}``), so metrics do not explode per id."""
    return str(getattr(scope.get("route"), "path", "unmatched"))


class RequestLog:
    """One JSON log line, a count and a latency observation per HTTP request.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs each request
    in a task of its own and re-streams the response through a memory channel, which cost about as much
    as the rest of the HTTP stack on a cached ``/v1/score``."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - started
            method, route = scope["method"], _route_template(scope)
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(elapsed)
            log.info("request", extra={"method": method, "path": scope["path"], "status": status,
                                       "ms": round(elapsed * 1000, 2)})


def create_app(settings: Settings, container_factory: ContainerFactory | None = None, *,
               freeze_after_load: bool = False) -> FastAPI:
    """Build the app. ``container_factory`` defaults to :func:`service.container.build_container`.
    ``freeze_after_load`` (a process that serves only this app: ``main.app_factory``): once loaded,
    everything start-up made is frozen out of the garbage collector's generations (``gc.freeze``)."""
    if container_factory is None:
        from functools import partial

        from service.container import build_container

        container_factory = partial(build_container, background_rescans=True, watch_catalog=True, warm=True)
    factory = container_factory
    metrics = Metrics()
    state = AppState(settings, metrics)
    metrics.registry.register(ModelTimeCollector(lambda: None if state.container is None
                                                 else state.container.model_time()))
    metrics.registry.register(ScoreQueueCollector(lambda: None if state.container is None
                                                  else state.container.queue_stats()))

    def _build() -> Any:
        container = factory(settings)
        if freeze_after_load:
            # What start-up made (imports, models, indexes, the catalog view) lives as long as the
            # process. Frozen out of the collector's generations, it is not scanned again: a full
            # collection in a ready worker took 102-110 ms (every request in the worker waits) and now
            # scans only what requests made since (docs/performance.md, session 12).
            gc.collect()
            gc.freeze()
        return container

    async def _load() -> None:
        started = time.perf_counter()
        try:
            state.container = await asyncio.to_thread(_build)
        except Exception as exc:  # the service stays up and says why it is not ready
            state.load_error = f"start-up failed: {type(exc).__name__}: {exc}"
            log.exception("start-up failed")
            return
        metrics.ready.set(1)
        log.info("ready", extra={"seconds": round(time.perf_counter() - started, 2),
                                 **state.container.describe()})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loading = asyncio.create_task(_load())
        try:
            yield
        finally:
            if state.loading is not None and not state.loading.done():
                await asyncio.wait({state.loading}, timeout=120)
            if state.container is not None:
                await asyncio.to_thread(state.container.close)

    app = FastAPI(
        title="counterlens",
        version="0.1.0",
        description="Counterfeit detection for online marketplaces: score listings against brand catalogs.",
        lifespan=lifespan,
    )
    app.state.cl = state
    install_error_handlers(app)

    app.add_middleware(ScoreBodyLimit, limit=settings.intake.request_limit())
    app.add_middleware(RequestLog, metrics=metrics)

    @app.get("/livez", tags=["health"])
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        # ``pid``: with ``serve --workers N`` each worker answers for itself (a check that wants every
        # worker ready counts the pids that answered).
        if state.container is None:
            body = {"status": "error" if state.load_error else "loading", "detail": state.load_error,
                    "pid": os.getpid()}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ready", "pid": os.getpid(), **state.container.describe()})

    @app.get("/v1/jobs/stored-rescan", tags=["jobs"], summary="The background stored rescan's state")
    async def stored_rescan_status() -> dict[str, Any]:
        c = state.require_container()
        if getattr(c, "stored_rescans", None) is None:
            return {"enabled": False}
        return {"enabled": True, **c.stored_rescans.status()}

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    async def prometheus() -> Response:
        if state.container is not None:
            for name, size in state.container.index_sizes().items():
                metrics.index_size.labels(name).set(size)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from service.api.routers import register_routers

    register_routers(app)
    return app
