"""Builds the ASGI app a function (or the composition root) serves: routers, error handling, the catalog."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from mangum import Mangum
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp

from shared.catalog import ModelCatalog
from shared.errors import AuthenticationError
from shared.guards.access import GUARDED, Guards, presented_key
from shared.guards.gate import Gate
from shared.guards.middleware import Lifecycle, RequestMiddleware
from shared.http import CatalogDep, install_error_handlers
from shared.logs import configure_logging
from shared.metrics import Metrics
from shared.settings import Settings, get_settings
from shared.tracing import make_tracer

RATE_LIMIT_HEADERS = [f"X-RateLimit-{w}-{k}" for k in ("Requests", "Tokens") for w in ("Limit", "Remaining", "Reset")]

log = logging.getLogger(__name__)

health = APIRouter(tags=["health"])


@health.get("/health")
@health.get("/health/live", include_in_schema=False)
async def get_health(catalog: CatalogDep) -> dict[str, Any]:
    """Liveness (the process answers), and what each loaded model's engine is doing."""
    models = {}
    for model_id, model in catalog.loaded_generation().items():
        stats = model.engine.stats
        models[model_id] = {
            "running": stats.running,
            "queued": stats.queued,
            "completed": stats.completed,
            "cancelled": stats.cancelled,
            "failed": stats.failed,
            "prefix_cache_hits": stats.prefix_hits,
            "prefix_cache_tokens": stats.prefix_tokens,
        }
    return {"status": "ok", "backend": catalog.backend_name, "models": models}


@health.get("/readiness")
@health.get("/health/ready", include_in_schema=False)
async def get_readiness(request: Request) -> JSONResponse:
    """Readiness: 200 once the preloaded models are loaded, 503 while they load and while the server drains."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    if lifecycle.ready:
        return JSONResponse({"status": "ready"})
    status = "draining" if lifecycle.draining else "loading" if lifecycle.loading else "failed"
    body: dict[str, Any] = {"status": status}
    if lifecycle.load_error:
        body["error"] = lifecycle.load_error
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@health.get("/metrics", response_class=Response)
async def get_metrics(request: Request) -> Response:
    """Prometheus text format: HTTP requests, per-model latencies and tokens, rejections, engine counters."""
    token = request.app.state.settings.metrics_token
    if token is not None:
        presented = presented_key(request.headers) or ""
        if not hmac.compare_digest(presented.encode(), token.get_secret_value().encode()):
            raise AuthenticationError("/metrics needs its token: 'Authorization: Bearer <metrics_token>'.")
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(
    *routers: APIRouter,
    settings: Settings | None = None,
    title: str = "fnserve",
    unguarded: tuple[APIRouter, ...] = (),
) -> FastAPI:
    """An app serving the given routers behind the guards (`unguarded` ones call them themselves). The catalog is
    made here, empty.

    The lifespan preloads in the background (readiness says 503 until it is done) and closes, so the same app
    works where no lifespan runs (Mangum with lifespan="off", where a container's models then load on its first
    invocation and stay for the next).
    """
    settings = settings or get_settings()
    catalog = ModelCatalog(settings)
    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        preload = asyncio.create_task(_preload(catalog, lifecycle)) if settings.preload else None
        yield
        if preload is not None:
            preload.cancel()
        catalog.close()
        await guards.limiter.close()

    app = _App(
        title=title,
        version="0.1.0",
        description="Language models behind the OpenAI HTTP API, served as stateless functions.",
        lifespan=lifespan,
        max_body_size=settings.max_body_bytes,
    )
    metrics = Metrics()
    metrics.watch(catalog)
    guards = Guards(settings, metrics)
    app.state.catalog = catalog
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.guards = guards
    app.state.lifecycle = lifecycle
    app.state.tracer = make_tracer(settings)
    app.state.embedding_gate = Gate(settings.max_embedding_concurrency, settings.max_embedding_queue, "embedding")
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=settings.cors_methods,
            allow_headers=settings.cors_headers,
            expose_headers=["X-Request-ID", "Retry-After", *RATE_LIMIT_HEADERS],
        )
    install_error_handlers(app)
    for router in routers:
        app.include_router(router, dependencies=GUARDED)
    for router in unguarded:  # routes that run the guards themselves (a WebSocket's key may come in a message)
        app.include_router(router)
    app.include_router(health)
    return app


class _App(FastAPI):
    """FastAPI with the request middleware outermost: it logs and counts every response, the framework's own
    500s and 413s included, and answers a declared oversized body with the envelope before the framework's
    body limit (which would answer in plain text) sees it."""

    def build_middleware_stack(self) -> ASGIApp:
        state = self.state
        return RequestMiddleware(super().build_middleware_stack(), state.lifecycle, state.metrics, state.tracer)


async def _preload(catalog: ModelCatalog, lifecycle: Lifecycle) -> None:
    lifecycle.loading = True
    try:
        await asyncio.to_thread(catalog.preload)
    except Exception as exc:
        log.exception("preloading models failed; readiness stays 503")
        lifecycle.load_error = str(getattr(exc, "message", exc))
    finally:
        lifecycle.loading = False


LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]


def _lambda_logging(settings: Settings) -> None:
    """Lambda's runtime gives the root logger its own handler (CloudWatch, each line with its request id) and
    leaves its level at WARNING unless the function's log level is configured (AWS_LAMBDA_LOG_LEVEL): then
    the settings' level (FNSERVE_LOG_LEVEL), so each request's access line and a model's load are logged. Where
    no runtime installed a handler (the handler run by other means), fnserve's own, as `fnserve serve` has."""
    root = logging.getLogger()
    if not root.handlers:
        configure_logging(settings)
    elif not os.environ.get("AWS_LAMBDA_LOG_LEVEL"):
        root.setLevel(settings.log_level.upper())


def lambda_handler(app: FastAPI) -> LambdaHandler:
    """A Lambda entry point for the app: API Gateway (v1, v2), ALB and Function URL events through Mangum.

    lifespan="off": Mangum would run start-up and shut-down around every invocation; models instead load on a
    container's first invocation and stay loaded for the next ones.
    """
    mangum = Mangum(app, lifespan="off")
    logs: list[bool] = []  # set up on the first invocation, not at import (an ASGI server may import the module)

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        if not logs:
            _lambda_logging(app.state.settings)
            logs.append(True)
        # Mangum runs the app on the thread's current event loop; make sure there is an open one.
        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop.is_closed():
            asyncio.set_event_loop(asyncio.new_event_loop())
        return dict(mangum(event, context))

    return handler
