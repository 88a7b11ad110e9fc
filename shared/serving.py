"""Running n choices of one request on a model, collected or streamed; shared by chat and completions."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from shared.generation.engine import Stream
from shared.generation.model import GenerationModel
from shared.generation.params import SamplingParams
from shared.generation.sequence import FinishReason, Sequence, StepOutput
from shared.protocol.common import TokenLogprob, TopLogprob


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
    model: GenerationModel, prompts: list[list[int]], params: SamplingParams, n: int, param: str = "messages"
) -> list[Sequence]:
    """One checked sequence per choice: prompt i's choice j is sequence i * n + j, OpenAI's choice index.

    Built before anything is queued or streamed, so a bad request fails with its status code.
    """
    return [model.sequence(prompt, choice_params(params, j), param) for prompt in prompts for j in range(n)]


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


async def stream_jobs(streams: list[Stream]) -> AsyncIterator[tuple[int, StepOutput]]:
    """Steps of every stream as they come, tagged with its index. Closing it cancels every sequence."""
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


async def collect_jobs(
    model: GenerationModel, streams: list[Stream], disconnected: Callable[[], Awaitable[bool]] | None = None
) -> list[Choice]:
    """Every stream's whole output. When `disconnected` says the client has gone, they are cancelled."""
    choices = [Choice() for _ in streams]

    async def consume() -> None:
        async for index, step in stream_jobs(streams):
            add_step(model, choices[index], step)

    task = asyncio.create_task(consume())
    while disconnected is not None and not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await disconnected():
            task.cancel()  # closes the streams, which frees the engine's slots
            break
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
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
