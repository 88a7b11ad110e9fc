"""The engine: an admission queue and a scheduler thread that runs the model for every running sequence.

With a BatchRunner it batches continuously: each step is one forward pass that runs a decode token for every
running sequence together with one prompt chunk (so a long prompt never stalls the others for long, and the
chunk shares the pass over the weights); new requests join between steps and finished ones leave. Other
runners (transformers' models for other architectures, MLX) step each running sequence in turn. Model compute
never runs on the event loop (the engine schedules on its own thread; forward passes run on the process's
compute thread, shared.generation.compute), so health checks and new connections are answered while the model
works. Callers consume an async iterator of StepOutput; closing it cancels the sequence,
which leaves the running set before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from shared.backends import BatchRunner, Chunk, ModelRunner
from shared.errors import FnserveError, OverloadedError
from shared.generation.compute import on_calling_thread, on_compute_thread
from shared.generation.prefix_cache import PrefixCache
from shared.generation.sequence import Sequence, StepOutput
from shared.settings import MAX_QUEUE, MAX_RUNNING, PREFILL_CHUNK

log = logging.getLogger(__name__)

Emit = Callable[[StepOutput | BaseException], None]
Outcome = Literal["completed", "cancelled", "failed"]


@dataclass
class EngineStats:
    queued: int
    running: int
    completed: int
    cancelled: int
    prompt_tokens: int  # prompt tokens run through the model (prefix-cache hits excluded)
    generated_tokens: int
    prefix_hits: int = 0
    prefix_tokens: int = 0  # prompt tokens taken from the prefix cache instead
    failed: int = 0  # sequences that ended with an error (forward pass, sampling or detokenizing)


@dataclass
class _Slot:
    seq: Sequence
    emit: Emit
    cache: Any = None  # per-sequence runners: the sequence's own KV cache
    prefilled: int = 0  # batch runners: prompt tokens in the cache so far
    length: int = 0  # batch runners: positions in the cache so far


class Engine:
    """Runs sequences for one model. One scheduler thread; requests join and leave between steps."""

    def __init__(
        self,
        load: Callable[[], ModelRunner | BatchRunner],
        *,
        max_running: int = MAX_RUNNING,
        max_queue: int = MAX_QUEUE,
        prefill_chunk: int = PREFILL_CHUNK,
        prefix_tokens: int | None = None,
        name: str = "",
        compute_thread: bool = True,
    ) -> None:
        """Start the engine's thread, which loads the model with `load` and then serves; blocks until loaded.

        prefix_tokens: the positions the prefix cache's entries may hold together (None: as its slots allow).

        The load and every call on the runner run on the process's compute thread (shared.generation.compute),
        one for all models: OpenMP's worker pools stay warm only while a single thread drives them. With
        compute_thread=False (MLX) they run on the engine's own thread.
        """
        self.name = name
        self._compute = on_compute_thread if compute_thread else on_calling_thread
        self.prefill_chunk = prefill_chunk
        self.runner: ModelRunner | BatchRunner
        self.batch_runner: BatchRunner | None = None
        self.seq_runner: ModelRunner | None = None
        self.max_running = max_running
        self.prefixes = PrefixCache([])
        self._queue: queue.Queue[_Slot] = queue.Queue(maxsize=max_queue)
        self._running: list[_Slot] = []
        # Outputs of the current step, handed to their event loops together when it ends: one wake-up of
        # a loop per step rather than one per sequence, since every wake-up contends for the GIL and the
        # cores the model runs on.
        self._outbox: list[
            tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any], StepOutput | BaseException, Sequence]
        ] = []
        self._wake = threading.Event()
        self._closed = False
        self._stats = EngineStats(0, 0, 0, 0, 0, 0)
        loaded = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                runner = self.runner = self._compute(load)
                self.batch_runner = runner if hasattr(runner, "decode") else None  # type: ignore[assignment]
                self.seq_runner = None if self.batch_runner else runner  # type: ignore[assignment]
                if (batch := self.batch_runner) is not None:
                    # Slots past the running ones hold cached prompt prefixes.
                    self.max_running = min(max_running, batch.slots)
                    self.prefixes = PrefixCache(
                        list(range(self.max_running, batch.slots)),
                        prefix_tokens,
                        lambda slot: self._compute(batch.release_slot, slot),
                    )
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                loaded.set()
            self._loop()

        self._thread = threading.Thread(target=run, name=f"engine-{name}", daemon=True)
        self._thread.start()
        loaded.wait()
        if failure:
            raise failure[0]

    @property
    def stats(self) -> EngineStats:
        return EngineStats(
            queued=self._queue.qsize(),
            running=len(self._running),
            completed=self._stats.completed,
            cancelled=self._stats.cancelled,
            prompt_tokens=self._stats.prompt_tokens,
            generated_tokens=self._stats.generated_tokens,
            prefix_hits=self._stats.prefix_hits,
            prefix_tokens=self._stats.prefix_tokens,
            failed=self._stats.failed,
        )

    def generate(self, seq: Sequence) -> Stream:
        """Queue the sequence now, raising OverloadedError at once when the queue is full; its steps to come.

        Queueing happens here, not when the stream is first read, so a handler learns of a full queue before
        it starts a response (a streamed one included) and can answer 503.
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()

        def emit(item: StepOutput | BaseException) -> None:  # on the engine's thread, which flushes each step
            self._outbox.append((loop, outputs, item, seq))

        self.submit(seq, emit)
        return Stream(seq, outputs, self._wake)

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
        """Stop after the current step; running and queued requests end with a 503 (shutting down)."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._drain()  # a request that joined the queue as the engine's thread was leaving

    def _admit(self) -> None:
        while len(self._running) < self.max_running:
            try:
                slot = self._queue.get_nowait()
            except queue.Empty:
                return
            if slot.seq.cancelled:  # its client left while it waited
                self._stats.cancelled += 1
                continue
            slot.seq.admitted_at = time.perf_counter()
            self._running.append(slot)

    def _drain(self) -> None:
        """The engine is closing: every sequence it runs or has queued ends with an error, none waits forever."""
        error = OverloadedError("the engine is shutting down", headers={"Retry-After": "1"})
        while True:
            try:
                self._running.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for slot in self._running:
            slot.emit(error)
        self._running.clear()
        self._flush()

    def _loop(self) -> None:
        while not self._closed:
            self._admit()
            if not self._running:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                if self.batch_runner is not None:
                    self._batch_step(self.batch_runner)
                    self._flush()
                else:
                    assert self.seq_runner is not None
                    for slot in list(self._running):
                        self._step(self.seq_runner, slot)
                        self._flush()
            except Exception as exc:  # a bug in the engine itself: what it ran gets the error, the queue is served
                self._fail(list(range(len(self._running))), exc)
                self._flush()
        self._drain()

    def _flush(self) -> None:
        """Deliver this step's outputs: one call per event loop that has readers waiting."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any, Sequence]]] = {}
        for loop, outputs, item, seq in self._outbox:
            by_loop.setdefault(loop, []).append((outputs, item, seq))
        self._outbox.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is gone: nobody will read these sequences
                for _, _, seq in items:
                    seq.cancelled = True

    def _batch_step(self, runner: BatchRunner) -> None:
        """One forward pass: a decode token for every sequence that has one, and one prompt chunk."""
        running = self._running
        self._remove({i: "cancelled" for i, s in enumerate(running) if s.seq.cancelled})
        if not running:  # every sequence it had was cancelled: no step to run
            return
        done: dict[int, Outcome] = {}
        chunk: Chunk | None = None
        pending = next((i for i, s in enumerate(running) if s.prefilled < len(s.seq.prompt_ids)), None)
        if pending is not None:
            slot = running[pending]
            prompt = slot.seq.prompt_ids
            if slot.prefilled == 0 and (hit := self.prefixes.lookup(prompt, slot.seq.scope)) is not None:
                reuse = min(hit[1], len(prompt) - 1)  # the last prompt token still runs, for its logits
                self._compute(runner.move_slot, hit[0], pending, reuse)
                slot.prefilled = slot.length = reuse
                self._stats.prefix_hits += 1
                self._stats.prefix_tokens += reuse
            chunk = Chunk(pending, prompt[slot.prefilled : slot.prefilled + self.prefill_chunk], slot.prefilled)
        ready = [i for i, s in enumerate(running) if s.seq.output_ids]
        n = ready[-1] + 1 if ready else 0
        # Rows of sequences still in prefill are placeholders: their logits are ignored, and the cache entry
        # they write, just past what their prompt has filled (this step's chunk included), is written again
        # by their next chunk.
        tokens = [s.seq.output_ids[-1] if s.seq.output_ids else 0 for s in running[:n]]
        positions = [s.length for s in running[:n]]
        if chunk is not None and chunk.slot < n:
            positions[chunk.slot] += len(chunk.token_ids)
        try:
            logits, chunk_logits = self._compute(runner.step, tokens, positions, chunk)
        except Exception as exc:
            self._fail(ready + ([chunk.slot] if chunk else []), exc)
            return
        if chunk is not None:
            slot = running[chunk.slot]
            slot.prefilled = slot.length = chunk.start + len(chunk.token_ids)
            self._stats.prompt_tokens += len(chunk.token_ids)
            if slot.prefilled == len(slot.seq.prompt_ids):
                self._store(runner, chunk.slot, slot.seq.prompt_ids)
                self._emit(slot, chunk_logits, chunk.slot, done)
        for i in ready:
            running[i].length += 1
            self._emit(running[i], logits[i], i, done)
        self._remove(done)

    def _emit(self, slot: _Slot, logits: Any, index: int, done: dict[int, Outcome]) -> None:
        try:
            out = slot.seq.step(logits)
        except Exception as exc:  # a bug in sampling or detokenizing: this sequence ends, the others go on
            self._log_failure(exc)
            slot.seq.finished = True
            done[index] = "failed"
            slot.emit(_as_error(exc))
            return
        self._stats.generated_tokens += 1
        if slot.seq.finished:
            done[index] = "completed"
        slot.emit(out)

    def _log_failure(self, exc: Exception) -> None:
        """A client's error (a 4xx: a schema whose grammar reaches a dead end mid-reply) is logged as one line;
        anything else is a bug in the engine, logged with its traceback."""
        if isinstance(exc, FnserveError) and exc.status_code < 500:
            log.info("a request ended in model %r with a %d: %s", self.name, exc.status_code, exc)
        else:
            log.exception("generation failed in model %r", self.name, exc_info=exc)

    def _fail(self, indices: list[int], exc: Exception) -> None:
        self._log_failure(exc)
        error = _as_error(exc)
        for i in indices:
            self._running[i].emit(error)
            self._running[i].seq.finished = True
        self._remove(dict.fromkeys(indices, "failed"))

    def _remove(self, outcomes: dict[int, Outcome]) -> None:
        """Drop these running sequences, moving the last one into each hole so slots stay 0..n-1; count each."""
        running = self._running
        for i in sorted(outcomes, reverse=True):
            if outcomes[i] == "completed" and self.batch_runner is not None:
                self._keep(self.batch_runner, i)
            end = len(running) - 1
            if i < end and self.batch_runner is not None:  # before the list changes, in case the copy fails
                self._compute(self.batch_runner.move_slot, end, i, running[end].length)
            last = running.pop()
            if i < end:
                running[i] = last
            outcome = outcomes[i]
            if outcome == "cancelled":
                self._stats.cancelled += 1
            elif outcome == "failed":
                self._stats.failed += 1
            else:
                self._stats.completed += 1

    def _store(self, runner: BatchRunner, index: int, tokens: list[int]) -> None:
        """Copy the cache of running slot `index`, which holds these tokens' positions, into the prefix cache."""
        if (keep := self.prefixes.store(tokens, self._running[index].seq.scope)) is None:
            return
        try:
            self._compute(runner.move_slot, index, keep.slot, len(tokens), keep.start)
        except Exception:
            self.prefixes.forget(keep.slot)  # else a later prompt would reuse what was never copied
            raise

    def _keep(self, runner: BatchRunner, index: int) -> None:
        """Keep a finished sequence's prompt and reply (the positions its cache holds) for prefix reuse: the next
        turn of its conversation sends them back. A failed copy only costs that reuse."""
        slot = self._running[index]
        try:
            self._store(runner, index, (slot.seq.prompt_ids + slot.seq.output_ids)[: slot.length])
        except Exception:
            log.exception("could not keep a finished sequence for prefix reuse in model %r", self.name)

    def _step(self, runner: ModelRunner, slot: _Slot) -> None:
        seq = slot.seq
        if seq.cancelled:
            self._running.remove(slot)
            self._stats.cancelled += 1
            return
        try:
            if slot.cache is None:
                slot.cache = self._compute(runner.new_cache)
                logits = self._compute(runner.forward, slot.cache, seq.prompt_ids)
                self._stats.prompt_tokens += len(seq.prompt_ids)
            else:
                logits = self._compute(runner.forward, slot.cache, seq.output_ids[-1:])
            out = seq.step(logits)
        except Exception as exc:
            self._log_failure(exc)
            self._running.remove(slot)
            self._stats.failed += 1
            slot.emit(_as_error(exc))
            return
        self._stats.generated_tokens += 1
        if seq.finished:
            self._running.remove(slot)
            self._stats.completed += 1
        slot.emit(out)


class Stream:
    """One queued sequence's steps, as an async iterator. Closing it cancels the sequence (a no-op once it has
    finished), which frees its place before the engine's next step; whoever submits a stream closes it.

    A stream dropped unread is still cancelled when it is collected, but only by raising the sequence's flag:
    the collector may run on any thread (the engine's included), where taking the wake event's lock could
    deadlock, so the engine notices the flag at its next step instead.
    """

    def __init__(
        self, seq: Sequence, outputs: asyncio.Queue[StepOutput | BaseException], wake: threading.Event
    ) -> None:
        self.seq = seq
        self._outputs = outputs
        self._wake = wake  # the engine's: a cancelled sequence leaves before its next step
        self._ended = False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> StepOutput:
        if self._ended:
            raise StopAsyncIteration
        try:
            item = await self._outputs.get()
        except BaseException:  # the reader was cancelled while it waited
            self.close()
            raise
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finish_reason is not None:
            self.close()
        return item

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the sequence and wake the engine; on the event loop's thread."""
        if not self._ended:
            self._ended = True
            self.seq.cancelled = True
            self._wake.set()

    def __del__(self) -> None:
        if not self._ended:
            self.seq.cancelled = True  # a plain attribute: no lock, safe from the collector's thread


def _deliver(items: list[tuple[asyncio.Queue[Any], Any, Sequence]]) -> None:
    for outputs, item, _ in items:
        outputs.put_nowait(item)


def _as_error(exc: Exception) -> FnserveError:
    """What a sequence's reader gets when its step failed: the error itself if it is an API error."""
    return exc if isinstance(exc, FnserveError) else FnserveError(f"generation failed: {exc}")
