"""Who may call, and how often: the dependency every function's router is included with.

API keys (`Authorization: Bearer <key>`, or `api-key: <key>` as Azure clients send it) when any are configured,
then the requests- and tokens-per-minute limits of the key, or of the client's address when keys are off.
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends
from limits import RateLimitItem
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection

from shared.errors import AuthenticationError, PermissionDeniedError, RateLimitError
from shared.guards.keys import ApiKey, KeyRing, SecretKeys
from shared.guards.ratelimit import RateLimiter
from shared.metrics import Metrics
from shared.settings import Settings


@dataclass
class RequestContext:
    """What the request path learns about one request, for its log line, its metrics and its token charge."""

    request_id: str
    started: float
    key_name: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # added to the response (rate-limit state)
    token_budget: tuple[RateLimiter, str, RateLimitItem] | None = None  # charged the request's tokens at its end
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    admitted: float | None = None  # perf_counter() when its first sequence entered the running batch
    first_token: float | None = None  # perf_counter() of the first streamed token
    finished: float | None = None  # perf_counter() of the last token
    content: dict[str, Any] = field(default_factory=dict)  # prompt/completion, only when log_content is on

    async def charge(self) -> None:
        """Charge the request's tokens to its budget, once it has ended (a stream's included)."""
        if self.token_budget is not None:
            limiter, identity, item = self.token_budget
            await limiter.charge(identity, item, self.prompt_tokens + self.completion_tokens)


def request_context(connection: HTTPConnection) -> RequestContext:
    ctx: RequestContext | None = getattr(connection.state, "fnserve", None)
    if ctx is None:  # a request that did not pass the middleware (a test calling a route directly)
        ctx = RequestContext(uuid.uuid4().hex, time.perf_counter())
        connection.state.fnserve = ctx
    return ctx


class Guards:
    """The keys and limiter of one app, built once from the settings."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        secret = SecretKeys(settings.api_keys_secret) if settings.api_keys_secret else None
        self.keys = KeyRing([k.get_secret_value() for k in settings.api_keys], settings.api_keys_file, secret)
        self.limiter = RateLimiter(settings.rate_limit_storage)
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies]

    def authenticate(self, headers: Headers, presented: str | None = None) -> ApiKey | None:
        """The caller's key entry (from the headers, else `presented`); None when authentication is off."""
        if not self.keys.enabled:
            return None
        presented = presented_key(headers) or presented
        if presented is None:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or an 'api-key' header."
            )
        key = self.keys.lookup(presented)
        if key is None:
            raise AuthenticationError("Incorrect API key provided.")
        if not key.enabled:
            raise PermissionDeniedError(f"The API key {key.name!r} is disabled.", code="api_key_disabled")
        return key

    async def admit(self, connection: HTTPConnection, presented: str | None = None) -> None:
        """Authenticate and rate-limit one request. `presented`: a key sent in the body, where no header can carry
        one (a browser's WebSocket)."""
        ctx = request_context(connection)
        key = self.authenticate(connection.headers, presented)
        ctx.key_name = key.name if key else None
        requests = (key.requests_per_minute if key else None) or self.settings.rate_limit_requests
        tokens = (key.tokens_per_minute if key else None) or self.settings.rate_limit_tokens
        if requests is None and tokens is None:
            return
        identity = f"key:{key.name}" if key else f"addr:{self.client_address(connection)}"
        try:
            allowance = await self.limiter.admit(identity, requests, tokens)
        except RateLimitError:
            self.metrics.rate_limit_decisions.labels(decision="limited").inc()
            raise
        self.metrics.rate_limit_decisions.labels(decision="allowed").inc()
        ctx.headers.update(allowance.headers)
        if allowance.tokens is not None:
            ctx.token_budget = (self.limiter, identity, allowance.tokens)

    def client_address(self, connection: HTTPConnection) -> str:
        """The peer's address; behind a trusted proxy, the nearest untrusted address in X-Forwarded-For."""
        peer = connection.client.host if connection.client else "unknown"
        if not self._trusted(peer):
            return peer
        hops = [h.strip() for value in connection.headers.getlist("x-forwarded-for") for h in value.split(",")]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False  # not an address: never a proxy of ours
        return any(ip in network for network in self.trusted)


def presented_key(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("api-key") or None


async def guard(connection: HTTPConnection) -> None:
    """Authenticate and rate-limit a request (401/403/429 in OpenAI's envelope)."""
    guards: Guards = connection.app.state.guards
    await guards.admit(connection)


GUARDED = [Depends(guard)]
