"""The browser chat page: static files (no build step), served at /ui/ by `fnserve serve`, or from any static host.

Its libraries are vendored from pinned npm packages by `python -m shared.ui.vendor` (versions, checksums and
licences in static/vendor/VERSIONS.json).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount(app: FastAPI) -> None:
    """The page at /ui/, and / sending browsers there. The files are public; the API behind them is not."""
    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/ui/")
