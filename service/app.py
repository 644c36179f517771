"""FastAPI app factory. The lifespan starts the runtime (backend or embedded engine,
cache) unless one is handed in, as tests and the CLI do."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import Depends, FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .api import health, routes
from .api.admission import Admission
from .api.auth import require_key_for_metrics
from .api.errors import install_error_handlers
from .api.limits import BodyLimitMiddleware
from .api.openai_serving import OpenAIServing
from .api.runs import RunManager
from .api.serving import StrategyRunner
from .config import Settings
from .runtime import Runtime

log = logging.getLogger("ponder")


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    settings = settings or (runtime.settings if runtime else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = runtime is None
        rt = runtime or await Runtime.start(settings)
        runner = StrategyRunner(rt)
        app.state.runtime = rt
        app.state.runner = runner
        app.state.admission = Admission(settings.max_concurrent_runs, settings.max_concurrent_runs_per_key,
                                        settings.admission_retry_after_s)
        app.state.openai = OpenAIServing(runner)
        app.state.runs = RunManager(runner, rt.cache)
        try:
            yield
        finally:
            await app.state.runs.aclose()
            if owned:
                await rt.stop()

    app = FastAPI(title="ponder", version="0.1.0", lifespan=lifespan,
                  description="Inference-time search and self-refinement in front of vLLM.")
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(routes.router)

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(require_key_for_metrics)])
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware)
    return app


class MetricsMiddleware:
    """Counts and times every HTTP request (streams until their last byte).

    Pure ASGI rather than ``BaseHTTPMiddleware``, so streaming and client-disconnect
    detection pass through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _route_template(scope)
        if route == "/metrics":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.IN_FLIGHT.labels(route).inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            metrics.IN_FLIGHT.labels(route).dec()
            strategy = metrics.strategy_label(scope.get("state", {}).get("strategy", ""))
            metrics.REQUESTS.labels(route, strategy, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route, strategy).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    """The matched route path (``/v1/runs/{run_id}``), so labels stay low-cardinality."""
    for route in scope["app"].router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "unmatched")
    return "unmatched"
