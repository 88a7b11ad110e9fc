"""Builds the ASGI app a function (or the composition root) serves: routers, error handling, the catalog."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from mangum import Mangum
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import metrics
from shared.catalog import ModelCatalog
from shared.http import BodySizeLimit, CatalogDep, install_error_handlers
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

health = APIRouter(tags=["health"])


@health.get("/health")
async def get_health(catalog: CatalogDep) -> dict[str, Any]:
    """Liveness, and what each loaded model's engine is doing."""
    models = {}
    for model_id, model in catalog.loaded_generation().items():
        stats = model.engine.stats
        models[model_id] = {
            "running": stats.running,
            "queued": stats.queued,
            "completed": stats.completed,
            "cancelled": stats.cancelled,
            "prefix_cache_hits": stats.prefix_hits,
            "prefix_cache_tokens": stats.prefix_tokens,
        }
    return {"status": "ok", "backend": catalog.backend_name, "models": models}


@health.get("/metrics", response_class=Response)
async def get_metrics(request: Request) -> Response:
    """Prometheus text format: each loaded model's engine counters (prefix-cache hits among them)."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


def create_app(*routers: APIRouter, settings: Settings | None = None, title: str = "fnserve") -> FastAPI:
    """An app serving the given routers. The catalog is made here, empty: models load on first use.

    The lifespan only pre-warms and closes, so the same app works where no lifespan runs (Mangum with
    lifespan="off", where a container's models then load on its first invocation and stay for the next).
    """
    settings = settings or get_settings()
    catalog = ModelCatalog(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(catalog.preload)
        yield
        catalog.close()

    app = FastAPI(
        title=title,
        version="0.1.0",
        description="Language models behind the OpenAI HTTP API, served as stateless functions.",
        lifespan=lifespan,
    )
    app.state.catalog = catalog
    app.state.metrics = metrics.registry(catalog)
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    for router in (*routers, health):
        app.include_router(router)
    return app


LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]


def lambda_handler(app: FastAPI) -> LambdaHandler:
    """A Lambda entry point for the app: API Gateway (v1, v2), ALB and Function URL events through Mangum.

    lifespan="off": Mangum would run start-up and shut-down around every invocation; models instead load on a
    container's first invocation and stay loaded for the next ones.
    """
    mangum = Mangum(app, lifespan="off")

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        # Mangum runs the app on the thread's current event loop; make sure there is an open one.
        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop.is_closed():
            asyncio.set_event_loop(asyncio.new_event_loop())
        return dict(mangum(event, context))

    return handler
