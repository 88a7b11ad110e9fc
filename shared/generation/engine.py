"""The engine: an admission queue and a scheduler thread that steps every running sequence in turn.

Model compute runs on the engine's own thread, never on the event loop, so health checks and new connections
are answered while the model works. Callers consume an async iterator of StepOutput; closing it cancels the
sequence, which leaves the running set before its next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from shared.backends import ModelRunner
from shared.errors import FnserveError, OverloadedError
from shared.generation.sequence import Sequence, StepOutput

log = logging.getLogger(__name__)

Emit = Callable[[StepOutput | BaseException], None]


@dataclass
class EngineStats:
    queued: int
    running: int
    completed: int
    cancelled: int
    prompt_tokens: int
    generated_tokens: int


@dataclass
class _Slot:
    seq: Sequence
    emit: Emit
    cache: Any = None


class Engine:
    """Runs sequences for one model. One scheduler thread; requests join and leave between steps."""

    def __init__(self, runner: ModelRunner, *, max_running: int = 8, max_queue: int = 256, name: str = "") -> None:
        self.runner = runner
        self.max_running = max_running
        self.name = name
        self._queue: queue.Queue[_Slot] = queue.Queue(maxsize=max_queue)
        self._running: list[_Slot] = []
        self._wake = threading.Event()
        self._closed = False
        self._stats = EngineStats(0, 0, 0, 0, 0, 0)
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> EngineStats:
        return EngineStats(
            queued=self._queue.qsize(),
            running=len(self._running),
            completed=self._stats.completed,
            cancelled=self._stats.cancelled,
            prompt_tokens=self._stats.prompt_tokens,
            generated_tokens=self._stats.generated_tokens,
        )

    async def generate(self, seq: Sequence) -> AsyncIterator[StepOutput]:
        """Stream the sequence's steps. Raises OverloadedError at once when the queue is full."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()

        def emit(item: StepOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the caller's event loop is gone: nobody will read this sequence
                seq.cancelled.set()

        self.submit(seq, emit)
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancelled.set()  # no-op when finished; frees the slot when the caller went away
            self._wake.set()

    def submit(self, seq: Sequence, emit: Emit) -> None:
        if self._closed:
            raise OverloadedError("the engine is shutting down", headers={"Retry-After": "1"})
        try:
            self._queue.put_nowait(_Slot(seq, emit))
        except queue.Full:
            raise OverloadedError(
                f"model {self.name!r} has {self._queue.maxsize} requests waiting; try again shortly",
                headers={"Retry-After": "1"},
            ) from None
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _admit(self) -> None:
        while len(self._running) < self.max_running:
            try:
                slot = self._queue.get_nowait()
            except queue.Empty:
                return
            if slot.seq.cancelled.is_set():  # its client left while it waited
                self._stats.cancelled += 1
                continue
            self._running.append(slot)

    def _loop(self) -> None:
        while not self._closed:
            self._admit()
            if not self._running:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for slot in list(self._running):
                self._step(slot)

    def _step(self, slot: _Slot) -> None:
        seq = slot.seq
        if seq.cancelled.is_set():
            self._running.remove(slot)
            self._stats.cancelled += 1
            return
        try:
            if slot.cache is None:
                slot.cache = self.runner.new_cache()
                logits = self.runner.forward(slot.cache, seq.prompt_ids)
                self._stats.prompt_tokens += len(seq.prompt_ids)
            else:
                logits = self.runner.forward(slot.cache, seq.output_ids[-1:])
            out = seq.step(logits)
        except Exception as exc:
            log.exception("generation failed in model %r", self.name)
            self._running.remove(slot)
            slot.emit(exc if isinstance(exc, FnserveError) else FnserveError(f"generation failed: {exc}"))
            return
        self._stats.generated_tokens += 1
        if seq.finished:
            self._running.remove(slot)
            self._stats.completed += 1
        slot.emit(out)
