"""`fnserve serve`: uvicorn with fnserve's logging, TLS, key reloads on SIGHUP, and a drain on SIGTERM.

On SIGTERM readiness turns 503 at once and new requests get 503 + Retry-After, while the requests in flight
(streams included) get `drain_seconds` to finish; what still runs then ends with an error frame, and the
process exits 0. A second SIGTERM, or Ctrl-C, stops at once as uvicorn does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from shared.guards.access import Guards
from shared.guards.middleware import Lifecycle
from shared.settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float) -> None:
        super().__init__(config)
        self.lifecycle: Lifecycle = app.state.lifecycle
        self.fastapi = app
        self.grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.lifecycle.draining and self._loop is not None:
            self.lifecycle.draining = True  # readiness and new requests see it at once
            self._loop.call_soon_threadsafe(self._start_drain)
            return  # not recorded as a captured signal: uvicorn would raise it again on the way out (exit 143)
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        log.info("SIGTERM: draining %d requests for up to %.0f s", self.lifecycle.in_flight, self.grace)
        if not await self.lifecycle.drained(self.grace):
            log.warning("%d requests still running after %.0f s: ending them", self.lifecycle.in_flight, self.grace)
            self.fastapi.state.catalog.close()  # running sequences end with a 503 "shutting down" error frame
            await self.lifecycle.drained(5.0)
        self.should_exit = True


def serve(settings: Settings, app: FastAPI) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # fnserve's own logging (shared.logs), already configured
        access_log=False,  # the request middleware writes one line per request
        # uvicorn would believe X-Forwarded-For from 127.0.0.1 (its default) and rewrite the client's address,
        # so a local client could spoof its way out of its rate limit; settings.trusted_proxies decides instead.
        proxy_headers=False,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        timeout_graceful_shutdown=10,
    )
    server = DrainingServer(config, app, settings.drain_seconds)
    guards: Guards = app.state.guards

    def reload_keys(sig: int, frame: FrameType | None) -> None:
        if server._loop is not None:  # on the loop, not inside the handler: the reload takes a lock
            server._loop.call_soon_threadsafe(guards.keys.reload, True)

    signal.signal(signal.SIGHUP, reload_keys)
    server.run()
