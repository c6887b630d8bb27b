"""The FastAPI app factory: ``create_app(settings) -> FastAPI``.

The lifespan builds the registry, the broker (memory | redis, chosen in ``make_broker``) and, in embedded mode,
the in-process worker pool; nothing happens at import time. Routers, one per resource, live in server/api/.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api import health, identities, live, renders, stream
from server.api.deps import AppState
from server.broker.base import make_broker
from server.errors import install_error_handlers
from server.metrics import Metrics
from server.registry import Registry
from server.service import Service
from server.settings import Settings, get_settings
from server.worker import WorkerPool

log = logging.getLogger("aca.server")


class _RequestMetrics:
    """Pure ASGI middleware: requests by route template, method and status; latency by route."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # The template (/v1/renders/{render_id}), never the raw path: ids would explode the label space.
            path = getattr(route, "path", None) or "<unmatched>"
            self.metrics.inc("aca_http_requests_total",
                             {"route": path, "method": scope["method"], "status": str(status[0])})
            self.metrics.observe("aca_http_request_duration_seconds", time.perf_counter() - t0, {"route": path})


STATIC_DIR = Path(__file__).resolve().parent / "static"


def _mount_page(app: FastAPI) -> None:
    """The web page at / (plain HTML and JavaScript in server/static/, no build step)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API. ``settings`` defaults to the environment, read now (at start-up), never at import."""
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry(settings.data_dir)
        await run_in_threadpool(registry.ensure_dirs)
        broker = make_broker(settings)
        app.state.aca = AppState(settings=settings, registry=registry, broker=broker,
                                 service=Service(settings, registry, broker), metrics=metrics,
                                 key_hashes=settings.api_key_hashes())
        pool: WorkerPool | None = None
        if settings.embedded:
            requeued = await app.state.aca.service.recover()
            if requeued:
                log.info("embedded mode: queued %d unfinished job(s) again after the restart", requeued)
        if settings.embedded and settings.workers > 0:
            pool = WorkerPool(settings, broker, registry)
            pool.start()
            log.info("embedded mode: %d in-process worker(s)", settings.workers)
        try:
            yield
        finally:
            if pool is not None:
                await run_in_threadpool(pool.stop)
            await broker.aclose()
            broker.close()

    app = FastAPI(
        title="ACA Avatar Server",
        version="0.1.0",
        summary="Few-shot avatar synthesis with Adaptive Compact Attention: identities, batch renders",
        description="Errors share one body: {\"error\": {\"code\": ..., \"message\": ..., \"details\": {...}}}; "
                    "the code is stable. With API keys set, send 'Authorization: Bearer KEY'.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(identities.router)
    app.include_router(renders.router)
    app.include_router(live.router)
    app.include_router(stream.router)
    _mount_page(app)
    app.add_middleware(_RequestMetrics, metrics=metrics)
    return app
