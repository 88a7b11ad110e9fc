"""POST /v1/chat/completions: chat with a model, as JSON or as a stream of server-sent events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from shared.asgi import create_app, lambda_handler
from shared.generation.engine import Stream
from shared.generation.model import GenerationModel
from shared.generation.params import SamplingParams
from shared.http import CatalogDep, generation_model, sse_frames
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
from shared.serving import Tracker, collect_jobs, expand, stream_jobs, submit, token_logprob

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    request: ChatCompletionRequest, catalog: CatalogDep, http: Request
) -> ChatCompletionResponse | EventSourceResponse:
    """Create a model response for the given chat conversation."""
    params = request.to_sampling_params(catalog.settings)
    model = await generation_model(catalog, request.model)
    prompt_ids = await asyncio.to_thread(model.encode_chat, request.template_messages())  # off the event loop
    streams = submit(model, expand(model, [prompt_ids], params, request.n or 1))  # a full queue: 503 here
    tracker = Tracker.of(http, model)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return EventSourceResponse(sse_frames(_chunks(model, streams, params, include_usage, tracker)))

    choices = await collect_jobs(model, streams, http.is_disconnected, tracker)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return ChatCompletionResponse(
        id=random_id("chatcmpl"),
        created=now(),
        model=model.id,
        choices=[
            ChatCompletionChoice(
                index=i,
                message=ResponseMessage(content=c.text),
                logprobs=ChoiceLogprobs(content=c.logprobs) if params.logprobs else None,
                finish_reason=c.finish_reason if c.finish_reason != "cancelled" else None,
            )
            for i, c in enumerate(choices)
        ],
        usage=UsageInfo.of(len(prompt_ids), completion_tokens),
        system_fingerprint=SYSTEM_FINGERPRINT,
    )


async def _chunks(
    model: GenerationModel, streams: list[Stream], params: SamplingParams, include_usage: bool, tracker: Tracker
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

    completion_tokens = 0
    for i in range(len(streams)):
        choice = ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
        yield chunk([choice])
    async for index, step in stream_jobs(streams, tracker):
        completion_tokens += step.token_id is not None
        finish = step.finish_reason if step.finish_reason in ("stop", "length") else None
        if not step.text and finish is None and not params.logprobs:
            continue
        logprobs = ChoiceLogprobs(content=[token_logprob(model, step)]) if params.logprobs else None
        choice = ChatCompletionChunkChoice(
            index=index, delta=DeltaMessage(content=step.text), logprobs=logprobs, finish_reason=finish
        )
        # With include_usage, OpenAI sends "usage": null on every chunk but the last.
        yield chunk([choice])
    if include_usage:
        yield chunk([], UsageInfo.of(len(streams[0].seq.prompt_ids), completion_tokens))


app = create_app(router, title="fnserve chat")
handler = lambda_handler(app)
