"""Completions: each prompt of a batch as text or token ids, `n` choices each, as JSON or a stream of chunks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.requests import Request

from shared.catalog import ModelCatalog
from shared.errors import FnserveError, InvalidRequestError
from shared.generation.model import GenerationModel
from shared.guards.access import request_context
from shared.http import generation_model, sse_frames
from shared.protocol.common import SYSTEM_FINGERPRINT, TokenLogprob, UsageInfo, now, random_id
from shared.protocol.completions import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from shared.protocol.structured import response_format_grammar
from shared.serving.jobs import Deltas, Tracker, collect_jobs, expand, finish_reason, submit, token_logprob


async def create(
    request: CompletionRequest, catalog: ModelCatalog, http: Request
) -> CompletionResponse | EventSourceResponse:
    settings = catalog.settings
    params = request.to_sampling_params(settings)
    grammar_text = response_format_grammar(request.response_format, settings)
    model = await generation_model(catalog, request.model)
    grammar = None
    if grammar_text is not None:
        grammar = await model.grammars.compile(grammar_text, "response_format", settings.grammar_timeout)
    prompts = await asyncio.to_thread(prompt_ids, model, request)  # tokenizing off the event loop
    scope = request_context(http).key_name
    sequences = expand(model, prompts, params, request.n or 1, param="prompt", grammar=grammar, scope=scope)
    streams = submit(model, sequences)  # a full queue: 503
    tracker = Tracker.of(http, model)
    if tracker.log_content:
        tracker.ctx.content["prompt"] = request.prompts()
    n = request.n or 1
    echoed = [model.decode(p) if request.echo else "" for p in prompts]
    prompt_tokens = sum(len(p) for p in prompts)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        steps = Deltas(streams, tracker, params.logprobs)
        echoes = [e for e in echoed for _ in range(n)] if request.echo else []
        chunks = _chunks(model, steps, echoes, prompt_tokens, include_usage)
        return EventSourceResponse(sse_frames(chunks))

    choices = await collect_jobs(model, streams, http.is_disconnected, tracker)
    return CompletionResponse(
        id=random_id("cmpl"),
        created=now(),
        model=model.id,
        choices=[
            CompletionChoice(
                index=i,
                text=echoed[i // n] + c.text,
                logprobs=_logprobs(c.logprobs) if params.logprobs else None,
                finish_reason=finish_reason(c),
            )
            for i, c in enumerate(choices)
        ],
        usage=UsageInfo.of(prompt_tokens, sum(len(c.token_ids) for c in choices)),
        system_fingerprint=SYSTEM_FINGERPRINT,
    )


async def text_stream(request: CompletionRequest, catalog: ModelCatalog, http: Request) -> EventSourceResponse:
    """One prompt's continuation as SSE frames of {"text": delta}, a final frame with how it ended, then [DONE]."""
    params = request.to_sampling_params(catalog.settings)
    model = await generation_model(catalog, request.model)
    prompts = await asyncio.to_thread(prompt_ids, model, request)
    scope = request_context(http).key_name
    streams = submit(model, expand(model, prompts, params, 1, param="prompt", scope=scope))  # full queue: 503
    steps = Deltas(streams, Tracker.of(http, model), logprobs=False)

    async def frames() -> AsyncIterator[dict[str, str]]:
        try:
            async for delta in steps:
                if delta.text:
                    yield {"data": json.dumps({"text": delta.text})}
                if delta.finish_reason:
                    end = {
                        "text": "",
                        "finish_reason": delta.finish_reason,
                        "tokens_generated": steps.completion_tokens,
                    }
                    yield {"data": json.dumps(end)}
        except FnserveError as exc:
            yield {"data": json.dumps(exc.to_dict())}
            return
        yield {"data": "[DONE]"}

    return EventSourceResponse(frames())


def prompt_ids(model: GenerationModel, request: CompletionRequest) -> list[list[int]]:
    """Each prompt's token ids (a text is tokenized; given ids are checked against the vocabulary)."""
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


def _logprobs(entries: list[TokenLogprob]) -> CompletionLogprobs:
    result, offset = CompletionLogprobs(), 0
    for entry in entries:
        result.tokens.append(entry.token)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append({t.token: t.logprob for t in entry.top_logprobs})
        result.text_offset.append(offset)
        offset += len(entry.token)
    return result


async def _chunks(
    model: GenerationModel, steps: Deltas, echoed: list[str], prompt_tokens: int, include_usage: bool
) -> AsyncIterator[CompletionResponse]:
    """`echoed`: each choice's echoed prompt, sent first (none without echo)."""
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

    for i, text in enumerate(echoed):
        yield chunk([CompletionChoice(index=i, text=text)])
    async for delta in steps:
        logprobs = _logprobs([token_logprob(model, delta.step)]) if delta.step.logprob is not None else None
        choice = CompletionChoice(
            index=delta.index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason
        )
        yield chunk([choice])
    if include_usage:
        yield chunk([], UsageInfo.of(prompt_tokens, steps.completion_tokens))
