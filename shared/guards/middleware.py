"""The request middleware: request id, drain, HTTP metrics, the token charge and the request log line.

Pure ASGI, so it sees a streamed response to its end (its log line and metrics cover the whole stream) and
adds its headers to whatever response the app starts.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import FnserveError, OverloadedError, RequestTooLargeError
from shared.guards.access import RequestContext
from shared.metrics import Metrics

access_log = logging.getLogger("fnserve.access")

# Probes answer even while the server drains, and are neither counted as work nor logged.
PROBES = frozenset({"/health", "/health/live", "/health/ready", "/readiness", "/metrics"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


@dataclass
class Lifecycle:
    """Where the server is in its life: loading its preloaded models, serving, or draining before it stops."""

    loading: bool = False
    load_error: str | None = None
    draining: bool = False
    in_flight: int = 0

    @property
    def ready(self) -> bool:
        return not (self.loading or self.draining or self.load_error)

    async def drained(self, grace: float) -> bool:
        """Wait up to `grace` seconds for the requests in flight to end; whether they all did."""
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight == 0


class RequestMiddleware:
    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, metrics: Metrics, tracer: Any = None) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.tracer = tracer  # an OpenTelemetry tracer, or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        ctx = RequestContext(given if _REQUEST_ID.match(given) else uuid.uuid4().hex, time.perf_counter())
        scope.setdefault("state", {})["fnserve"] = ctx
        probe = scope["path"] in PROBES
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = ctx.request_id
                for name, value in ctx.headers.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        if probe:
            await self.app(scope, receive, send_with_headers)
            return
        if self.lifecycle.draining:
            error = OverloadedError("the server is shutting down; try another instance", headers={"Retry-After": "5"})
            self.metrics.rejected.labels(reason="draining").inc()
            await _send_error(error, ctx, send)
            self._finish(scope, ctx, 503, counted=True)
            return
        declared = Headers(scope=scope).get("content-length", "")
        limit = scope["app"].max_body_size if "app" in scope else None
        if limit is not None and declared.isdigit() and int(declared) > limit:
            too_large = RequestTooLargeError(f"request body is larger than the limit of {limit} bytes (max_body_bytes)")
            await _send_error(too_large, ctx, send)
            self._finish(scope, ctx, 413)
            return
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.lifecycle.in_flight -= 1
            await ctx.charge()
            self._finish(scope, ctx, status)

    def _finish(self, scope: Scope, ctx: RequestContext, status: int, counted: bool = False) -> None:
        elapsed = time.perf_counter() - ctx.started
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope["method"]
        self.metrics.http_requests.labels(route=route, method=method, status=str(status)).inc()
        self.metrics.http_latency.labels(route=route, method=method).observe(elapsed)
        if status == 429 and not counted:
            self.metrics.rejected.labels(reason="rate_limit").inc()
        elif status == 503 and not counted:
            self.metrics.rejected.labels(reason="unavailable").inc()
        fields: dict[str, Any] = {
            "request_id": ctx.request_id,
            "method": method,
            "route": route,
            "path": scope["path"],
            "status": status,
            "latency_ms": round(elapsed * 1000, 1),
            "model": ctx.model,
            "key": ctx.key_name,
            "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": ctx.completion_tokens,
            "ttft_ms": round((ctx.first_token - ctx.started) * 1000, 1) if ctx.first_token else None,
            **ctx.content,
        }
        if self.tracer is not None:
            from shared.tracing import record_request

            attributes = {
                "http.request.method": method,
                "http.route": route,
                "http.response.status_code": status,
                "fnserve.request_id": ctx.request_id,
                "gen_ai.request.model": ctx.model or "",
                "gen_ai.usage.input_tokens": ctx.prompt_tokens,
                "gen_ai.usage.output_tokens": ctx.completion_tokens,
            }
            record_request(self.tracer, ctx, attributes)
        access_log.info("%s %s %s %.0fms", method, scope["path"], status, elapsed * 1000, extra={"fnserve": fields})


async def _send_error(error: FnserveError, ctx: RequestContext, send: Send) -> None:
    from shared.http import error_response

    response = error_response(error, ctx.request_id)
    response.headers["X-Request-ID"] = ctx.request_id

    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await response({"type": "http"}, no_body, send)
