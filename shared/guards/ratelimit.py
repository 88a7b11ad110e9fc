"""Rate limits per key (or per client address): requests and tokens per minute, through the `limits` library.

Counters live in `limits` storage: this process's memory by default, Redis when several instances serve, so
that scaling out does not multiply a limit. Sliding-window counters: two counters per limit, any cost.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, cast

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

from shared.errors import OverloadedError, RateLimitError

log = logging.getLogger(__name__)


@dataclass
class Allowance:
    """What a request was allowed: the headers it carries back, and the token budget its usage is charged to."""

    headers: dict[str, str] = field(default_factory=dict)
    tokens: RateLimitItem | None = None


class RateLimiter:
    def __init__(self, storage_url: str) -> None:
        options: dict[str, Any] = {"wrap_exceptions": True}
        if storage_url.startswith(("redis://", "rediss://")):
            options["implementation"] = "redispy"  # redis-py's asyncio client, not coredis
        self.storage_url = storage_url
        self.storage = storage_from_string("async+" + storage_url, **options)
        self.strategy = SlidingWindowCounterRateLimiter(cast(Any, self.storage))

    async def admit(self, identity: str, requests: int | None, tokens: int | None) -> Allowance:
        """Count one request against `requests`/minute and check that `tokens`/minute has budget left.

        Raises RateLimitError (429, with Retry-After and the X-RateLimit headers) when either is spent.
        """
        allowance = Allowance()
        try:
            if requests is not None:
                await self._check(allowance, "requests", RateLimitItemPerMinute(requests), identity, consume=True)
            if tokens is not None:
                allowance.tokens = RateLimitItemPerMinute(tokens)
                await self._check(allowance, "tokens", allowance.tokens, identity, consume=False)
        except StorageError as exc:
            log.error("rate-limit storage %s failed: %s", self.storage_url, exc)
            raise OverloadedError(
                "the rate-limit store is unavailable; try again shortly", headers={"Retry-After": "1"}
            ) from exc
        return allowance

    async def charge(self, identity: str, item: RateLimitItem, tokens: int) -> None:
        """Charge a finished request's tokens. What overshoots the budget left empties it rather than failing."""
        if tokens <= 0:
            return
        try:
            stats = await self.strategy.get_window_stats(item, identity, "tokens")
            cost = min(tokens, stats.remaining)
            if cost > 0:
                await self.strategy.hit(item, identity, "tokens", cost=cost)
        except StorageError as exc:
            log.error("rate-limit storage %s failed while charging tokens: %s", self.storage_url, exc)

    async def _check(
        self, allowance: Allowance, what: str, item: RateLimitItem, identity: str, *, consume: bool
    ) -> None:
        """Count (or only test) one unit against the limit, note its headers; RateLimitError when it is spent.

        Requests are counted as they come; tokens are only tested here and charged when the request ends.
        """
        allowed = await (self.strategy.hit if consume else self.strategy.test)(item, identity, what)
        stats = await self.strategy.get_window_stats(item, identity, what)
        kind, reset = what.capitalize(), max(stats.reset_time - time.time(), 0.0)
        allowance.headers[f"X-RateLimit-Limit-{kind}"] = str(item.amount)
        allowance.headers[f"X-RateLimit-Remaining-{kind}"] = str(max(stats.remaining, 0))
        allowance.headers[f"X-RateLimit-Reset-{kind}"] = duration(reset)
        if not allowed:
            raise RateLimitError(
                f"Rate limit reached: {item.amount} {what} per minute. Try again in {duration(reset)}.",
                headers={**allowance.headers, "Retry-After": str(max(1, math.ceil(reset)))},
            )

    async def close(self) -> None:
        reset = getattr(self.storage, "close", None)
        if reset is not None:
            await reset()


def duration(seconds: float) -> str:
    """A duration as OpenAI writes its reset headers: 59ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    if minutes:
        return f"{int(minutes)}m{int(rest)}s"
    return f"{rest:.3g}s"


def parse_duration(text: str) -> float:
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    minutes, _, seconds = text.rstrip("s").rpartition("m")
    return float(minutes or 0) * 60 + float(seconds or 0)
