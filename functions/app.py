"""The composition root: every function's router in one app, for the dev server and single-container deploys."""

from __future__ import annotations

from fastapi import FastAPI

from functions import chat, compat, completions, embeddings, models, sessions
from shared import ui
from shared.asgi import create_app
from shared.settings import Settings


def build(settings: Settings | None = None) -> FastAPI:
    app = create_app(
        chat.router,
        completions.router,
        embeddings.router,
        models.router,
        sessions.router,
        compat.router,
        settings=settings,
        unguarded=(chat.socket_router,),
    )
    ui.mount(app)
    return app
