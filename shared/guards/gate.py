"""Backpressure for work that runs beside the engine (embeddings): a bound on how much runs, and on the wait."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from shared.errors import OverloadedError


class Gate:
    """At most `concurrency` holders at once and `queue` waiting; past that, 503 with Retry-After at once."""

    def __init__(self, concurrency: int, queue: int, what: str) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self.what = what
        self.running = 0
        self.waiting = 0
        self._semaphore = asyncio.Semaphore(concurrency)

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        if self.running + self.waiting >= self.concurrency + self.queue:
            raise OverloadedError(
                f"{self.running} {self.what} requests are running and {self.waiting} waiting; try again shortly",
                headers={"Retry-After": "1"},
            )
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._semaphore.release()
