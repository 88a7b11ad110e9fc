"""Running n choices of one request on a model, collected or streamed; what chat and completions share."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from starlette.requests import HTTPConnection

from shared.generation.engine import Stream
from shared.generation.model import GenerationModel
from shared.generation.params import SamplingParams
from shared.generation.sequence import FinishReason, Sequence, StepOutput
from shared.guards.access import RequestContext, request_context
from shared.metrics import Metrics
from shared.protocol.common import TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from llguidance import LLMatcher


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of a seeded request uses seed + i: reproducible, yet the choices differ."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


def expand(
    model: GenerationModel,
    prompts: list[list[int]],
    params: SamplingParams,
    n: int,
    param: str = "messages",
    grammar: LLMatcher | None = None,
    scope: str | None = None,
) -> list[Sequence]:
    """One checked sequence per choice: prompt i's choice j is sequence i * n + j, OpenAI's choice index; each
    with its own copy of the grammar's state where the reply is constrained. `scope`: the request's API key's
    name, so that cached prefixes are shared only among one key's requests.

    Built before anything is queued or streamed, so a bad request fails with its status code.
    """
    return [
        model.sequence(prompt, choice_params(params, j), param, grammar, scope) for prompt in prompts for j in range(n)
    ]


def submit(model: GenerationModel, sequences: list[Sequence]) -> list[Stream]:
    """Queue every sequence now, or none: a full queue raises OverloadedError (503) before a response starts."""
    streams: list[Stream] = []
    try:
        for seq in sequences:
            streams.append(model.engine.generate(seq))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


@dataclass
class Tracker:
    """One request's timings and counts, for the per-model metrics, its log line and its token charge."""

    model: str
    metrics: Metrics
    ctx: RequestContext
    log_content: bool = False
    _last: dict[int, float] = field(default_factory=dict)
    _texts: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Observed on every token: the labelled child once, not a labels() look-up (and its lock) a token.
        self._inter_token = self.metrics.inter_token_latency.labels(self.model)

    @classmethod
    def of(cls, connection: HTTPConnection, model: GenerationModel) -> Tracker:
        ctx = request_context(connection)
        ctx.model = model.id
        state = connection.app.state
        return cls(model.id, state.metrics, ctx, state.settings.log_content)

    def started(self, streams: list[Stream]) -> None:
        prompts = {id(s.seq.prompt_ids): len(s.seq.prompt_ids) for s in streams}  # n choices share a prompt
        self.ctx.prompt_tokens = sum(prompts.values())

    def step(self, index: int, step: StepOutput, seq: Sequence) -> None:
        now = time.perf_counter()
        if index not in self._last and seq.admitted_at is not None:
            self.metrics.queue_wait.labels(self.model).observe(max(seq.admitted_at - self.ctx.started, 0.0))
            if self.ctx.admitted is None:
                self.ctx.admitted = seq.admitted_at
        if step.token_id is not None:
            self.ctx.completion_tokens += 1
            if self.ctx.first_token is None:
                self.ctx.first_token = now
                self.metrics.time_to_first_token.labels(self.model).observe(now - self.ctx.started)
            elif index in self._last:
                self._inter_token.observe(now - self._last[index])
            self._last[index] = now
        if self.log_content:
            self._texts[index] = self._texts.get(index, "") + step.text

    def ended(self) -> None:
        if self.ctx.first_token is None:
            return  # nothing was generated: failed or cancelled before its first token
        self.ctx.finished = time.perf_counter()
        self.metrics.e2e_latency.labels(self.model).observe(self.ctx.finished - self.ctx.started)
        self.metrics.request_prompt_tokens.labels(self.model).inc(self.ctx.prompt_tokens)
        self.metrics.request_generation_tokens.labels(self.model).inc(self.ctx.completion_tokens)
        if self.log_content:
            self.ctx.content["completion"] = [self._texts[i] for i in sorted(self._texts)]


async def stream_jobs(streams: list[Stream], tracker: Tracker | None = None) -> AsyncIterator[tuple[int, StepOutput]]:
    """Steps of every stream as they come, tagged with its index. Closing it cancels every sequence."""
    if tracker is not None:
        tracker.started(streams)
    try:
        async for index, step in _merged(streams):
            if tracker is not None:
                tracker.step(index, step, streams[index].seq)
            yield index, step
    finally:
        if tracker is not None:
            tracker.ended()


async def _merged(streams: list[Stream]) -> AsyncIterator[tuple[int, StepOutput]]:
    if len(streams) == 1:
        try:
            async for step in streams[0]:
                yield 0, step
        finally:
            streams[0].close()
        return
    merged: asyncio.Queue[tuple[int, StepOutput] | BaseException | None] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for step in streams[index]:
                await merged.put((index, step))
        except Exception as exc:  # delivered to the consumer, which re-raises it
            await merged.put(exc)
        finally:
            await merged.put(None)

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        done = 0
        while done < len(tasks):
            item = await merged.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


@dataclass(frozen=True)
class Delta:
    """What a streamed chunk carries for one choice: new text, and how the choice ended once it has."""

    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    step: StepOutput


class Deltas:
    """The steps a streamed response shows: those that add text, end a choice, or carry a token's logprobs;
    counting every generated token on the way (a token may add no text yet)."""

    def __init__(self, streams: list[Stream], tracker: Tracker, logprobs: bool) -> None:
        self.streams = streams
        self.tracker = tracker
        self.logprobs = logprobs
        self.completion_tokens = 0

    async def __aiter__(self) -> AsyncIterator[Delta]:
        async for index, step in stream_jobs(self.streams, self.tracker):
            self.completion_tokens += step.token_id is not None
            finish = step.finish_reason if step.finish_reason in ("stop", "length") else None
            if not step.text and finish is None and not (self.logprobs and step.token_id is not None):
                continue
            yield Delta(index, step.text, finish, step)


def finish_reason(choice: Choice) -> Literal["stop", "length"] | None:
    """OpenAI's finish_reason of a collected choice (a cancelled one has none)."""
    return choice.finish_reason if choice.finish_reason in ("stop", "length") else None


async def collect_jobs(
    model: GenerationModel,
    streams: list[Stream],
    disconnected: Callable[[], Awaitable[bool]] | None = None,
    tracker: Tracker | None = None,
) -> list[Choice]:
    """Every stream's whole output. When `disconnected` says the client has gone, or this coroutine itself is
    cancelled (a Lambda timeout, a server shutting down), the sequences are cancelled too."""
    choices = [Choice() for _ in streams]

    async def consume() -> None:
        async for index, step in stream_jobs(streams, tracker):
            add_step(model, choices[index], step)

    task = asyncio.create_task(consume())
    client_left = False
    try:
        while disconnected is not None and not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await disconnected():
                client_left = True
                task.cancel()  # closes the streams, which frees the engine's slots
                break
        await task
    except asyncio.CancelledError:
        if not client_left:  # this coroutine itself was cancelled: the generation must not run on
            task.cancel()
            for stream in streams:
                stream.close()
            raise
    return choices


def add_step(model: GenerationModel, choice: Choice, step: StepOutput) -> None:
    choice.text += step.text
    choice.prompt_tokens = step.prompt_tokens
    if step.token_id is not None:
        choice.token_ids.append(step.token_id)
        if step.logprob is not None:
            choice.logprobs.append(token_logprob(model, step))
    if step.finish_reason is not None:
        choice.finish_reason = step.finish_reason


def token_logprob(model: GenerationModel, step: StepOutput) -> TokenLogprob:
    assert step.token_id is not None and step.logprob is not None

    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = str(model.tokenizer.decode([token_id]))
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    head = entry(step.token_id, step.logprob)
    top = [entry(t, lp) for t, lp in step.top_logprobs or []]
    return TokenLogprob(token=head.token, logprob=head.logprob, bytes=head.bytes, top_logprobs=top)
