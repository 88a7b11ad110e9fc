"""Builds the ASGI app a function (or the composition root) serves: routers, error handling, the catalog."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from shared.catalog import ModelCatalog
from shared.http import install_error_handlers
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)


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
    app.state.settings = settings
    install_error_handlers(app)
    for router in routers:
        app.include_router(router)
    return app
