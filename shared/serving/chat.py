"""Chat completions: the conversation through the model's chat template, then JSON or a stream of chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.requests import Request

from shared.catalog import ModelCatalog
from shared.generation.model import GenerationModel
from shared.http import generation_model, sse_frames
from shared.protocol.chat import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaMessage,
    ResponseMessage,
)
from shared.protocol.common import SYSTEM_FINGERPRINT, UsageInfo, now, random_id
from shared.serving.jobs import Deltas, Tracker, collect_jobs, expand, finish_reason, submit, token_logprob


async def create(
    request: ChatCompletionRequest, catalog: ModelCatalog, http: Request
) -> ChatCompletionResponse | EventSourceResponse:
    params = request.to_sampling_params(catalog.settings)
    model = await generation_model(catalog, request.model)
    prompt_ids = await asyncio.to_thread(model.encode_chat, request.template_messages())  # off the event loop
    streams = submit(model, expand(model, [prompt_ids], params, request.n or 1))  # a full queue: 503 here
    tracker = Tracker.of(http, model)
    if tracker.log_content:
        tracker.ctx.content["prompt"] = request.template_messages()
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        chunks = _chunks(model, Deltas(streams, tracker, params.logprobs), len(prompt_ids), include_usage)
        return EventSourceResponse(sse_frames(chunks))

    choices = await collect_jobs(model, streams, http.is_disconnected, tracker)
    return ChatCompletionResponse(
        id=random_id("chatcmpl"),
        created=now(),
        model=model.id,
        choices=[
            ChatCompletionChoice(
                index=i,
                message=ResponseMessage(content=c.text),
                logprobs=ChoiceLogprobs(content=c.logprobs) if params.logprobs else None,
                finish_reason=finish_reason(c),
            )
            for i, c in enumerate(choices)
        ],
        usage=UsageInfo.of(len(prompt_ids), sum(len(c.token_ids) for c in choices)),
        system_fingerprint=SYSTEM_FINGERPRINT,
    )


async def _chunks(
    model: GenerationModel, steps: Deltas, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[ChatCompletionChunk]:
    completion_id, created = random_id("chatcmpl"), now()

    def chunk(choices: list[ChatCompletionChunkChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model.id,
            choices=choices,
            usage=usage,
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

    for i in range(len(steps.streams)):
        yield chunk([ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    async for delta in steps:
        logprobs = None
        if delta.step.logprob is not None:
            logprobs = ChoiceLogprobs(content=[token_logprob(model, delta.step)])
        choice = ChatCompletionChunkChoice(
            index=delta.index,
            delta=DeltaMessage(content=delta.text),
            logprobs=logprobs,
            finish_reason=delta.finish_reason,
        )
        yield chunk([choice])  # with include_usage, OpenAI sends "usage": null on every chunk but the last
    if include_usage:
        yield chunk([], UsageInfo.of(prompt_tokens, steps.completion_tokens))
