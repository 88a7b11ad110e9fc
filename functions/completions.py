"""POST /v1/completions: continue a prompt (or a batch of prompts), as JSON or server-sent events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from shared.asgi import create_app, lambda_handler
from shared.errors import InvalidRequestError
from shared.generation.engine import Stream
from shared.generation.model import GenerationModel
from shared.generation.params import SamplingParams
from shared.http import CatalogDep, generation_model, sse_frames
from shared.protocol.common import SYSTEM_FINGERPRINT, UsageInfo, now, random_id
from shared.protocol.completions import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from shared.serving import Choice, Tracker, collect_jobs, expand, stream_jobs, submit, token_logprob

router = APIRouter(tags=["completions"])


def _prompt_ids(model: GenerationModel, request: CompletionRequest) -> list[list[int]]:
    vocab = len(model.tokenizer)
    prompts = []
    for prompt in request.prompts():
        if isinstance(prompt, str):
            prompts.append(model.encode(prompt))
        elif any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be between 0 and {vocab - 1}", param="prompt")
        else:
            prompts.append(prompt)
    return prompts


def _logprobs(model: GenerationModel, choice: Choice) -> CompletionLogprobs:
    result, offset = CompletionLogprobs(), 0
    for entry in choice.logprobs:
        result.tokens.append(entry.token)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append({t.token: t.logprob for t in entry.top_logprobs})
        result.text_offset.append(offset)
        offset += len(entry.token)
    return result


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(
    request: CompletionRequest, catalog: CatalogDep, http: Request
) -> CompletionResponse | EventSourceResponse:
    """Create a completion for the given prompt, or for each prompt of a batch."""
    params = request.to_sampling_params(catalog.settings)
    model = await generation_model(catalog, request.model)
    prompts = await asyncio.to_thread(_prompt_ids, model, request)  # tokenizing off the event loop
    streams = submit(model, expand(model, prompts, params, request.n or 1, param="prompt"))  # a full queue: 503
    tracker = Tracker.of(http, model)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        chunks = _chunks(model, prompts, streams, params, request, include_usage, tracker)
        return EventSourceResponse(sse_frames(chunks))

    choices = await collect_jobs(model, streams, http.is_disconnected, tracker)
    n = request.n or 1
    echoed = [model.decode(p) if request.echo else "" for p in prompts]
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return CompletionResponse(
        id=random_id("cmpl"),
        created=now(),
        model=model.id,
        choices=[
            CompletionChoice(
                index=i,
                text=echoed[i // n] + c.text,
                logprobs=_logprobs(model, c) if params.logprobs else None,
                finish_reason=c.finish_reason if c.finish_reason != "cancelled" else None,
            )
            for i, c in enumerate(choices)
        ],
        usage=UsageInfo.of(prompt_tokens, completion_tokens),
        system_fingerprint=SYSTEM_FINGERPRINT,
    )


async def _chunks(
    model: GenerationModel,
    prompts: list[list[int]],
    streams: list[Stream],
    params: SamplingParams,
    request: CompletionRequest,
    include_usage: bool,
    tracker: Tracker,
) -> AsyncIterator[CompletionResponse]:
    n = request.n or 1
    completion_id, created = random_id("cmpl"), now()

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
        return CompletionResponse(
            id=completion_id,
            created=created,
            model=model.id,
            choices=choices,
            usage=usage,
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

    if request.echo:
        for i in range(len(prompts) * n):
            yield chunk([CompletionChoice(index=i, text=model.decode(prompts[i // n]))])
    completion_tokens = 0
    async for index, step in stream_jobs(streams, tracker):
        completion_tokens += step.token_id is not None
        finish = step.finish_reason if step.finish_reason in ("stop", "length") else None
        if not step.text and finish is None and not params.logprobs:
            continue
        logprobs = None
        if params.logprobs and step.token_id is not None:
            choice = Choice()
            choice.logprobs.append(token_logprob(model, step))
            logprobs = _logprobs(model, choice)
        yield chunk([CompletionChoice(index=index, text=step.text, logprobs=logprobs, finish_reason=finish)])
    if include_usage:
        prompt_tokens = sum(len(p) for p in prompts)
        usage = UsageInfo.of(prompt_tokens, completion_tokens)
        yield chunk([], usage)


app = create_app(router, title="fnserve completions")
handler = lambda_handler(app)
