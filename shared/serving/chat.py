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
from shared.protocol.structured import ToolPlan
from shared.serving.jobs import Deltas, Tracker, collect_jobs, expand, finish_reason, submit, token_logprob
from shared.serving.tools import StreamedCalls, finish, reply, template_messages


async def create(
    request: ChatCompletionRequest, catalog: ModelCatalog, http: Request
) -> ChatCompletionResponse | EventSourceResponse:
    settings = catalog.settings
    params = request.to_sampling_params(settings)
    plan, grammar_text, param = request.grammar(settings)
    model = await generation_model(catalog, request.model)
    grammar = await model.grammars.compile(grammar_text, param, settings.grammar_timeout) if grammar_text else None
    native = model.template_renders_tools
    messages, tools = template_messages(request.messages, plan, native)
    prompt_ids = await asyncio.to_thread(model.encode_chat, messages, tools)  # off the event loop
    streams = submit(model, expand(model, [prompt_ids], params, request.n or 1, grammar=grammar))  # full: 503
    tracker = Tracker.of(http, model)
    if tracker.log_content:
        tracker.ctx.content["prompt"] = messages
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        chunks = _chunks(model, Deltas(streams, tracker, params.logprobs), len(prompt_ids), include_usage, plan)
        return EventSourceResponse(sse_frames(chunks))

    choices = await collect_jobs(model, streams, http.is_disconnected, tracker)
    replies = [reply(c.text, plan) for c in choices]
    return ChatCompletionResponse(
        id=random_id("chatcmpl"),
        created=now(),
        model=model.id,
        choices=[
            ChatCompletionChoice(
                index=i,
                message=ResponseMessage(content=content, tool_calls=calls),
                logprobs=ChoiceLogprobs(content=c.logprobs) if params.logprobs else None,
                finish_reason=finish(finish_reason(c), plan, calls is not None),
            )
            for i, (c, (content, calls)) in enumerate(zip(choices, replies, strict=True))
        ],
        usage=UsageInfo.of(len(prompt_ids), sum(len(c.token_ids) for c in choices)),
        system_fingerprint=SYSTEM_FINGERPRINT,
    )


async def _chunks(
    model: GenerationModel, steps: Deltas, prompt_tokens: int, include_usage: bool, plan: ToolPlan | None
) -> AsyncIterator[ChatCompletionChunk]:
    completion_id, created = random_id("chatcmpl"), now()
    calls = [StreamedCalls(plan) for _ in steps.streams] if plan is not None and plan.calls_allowed else None

    def chunk(choices: list[ChatCompletionChunkChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model.id,
            choices=choices,
            usage=usage,
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

    opening = None if calls is not None else ""  # a reply that may be calls has content null until it is text
    for i in range(len(steps.streams)):
        yield chunk([ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=opening))])
    async for delta in steps:
        logprobs = None
        if delta.step.logprob is not None:
            logprobs = ChoiceLogprobs(content=[token_logprob(model, delta.step)])
        content: str | None = delta.text
        tool_calls = None
        reason = finish(delta.finish_reason, plan, False)
        if calls is not None:
            state = calls[delta.index]
            content, tool_calls = state.add(delta.text, last=delta.finish_reason is not None)
            reason = finish(delta.finish_reason, plan, state.has_calls)
            if content is None and tool_calls is None and reason is None and logprobs is None:
                continue
        choice = ChatCompletionChunkChoice(
            index=delta.index,
            delta=DeltaMessage(content=content, tool_calls=tool_calls),
            logprobs=logprobs,
            finish_reason=reason,
        )
        yield chunk([choice])  # with include_usage, OpenAI sends "usage": null on every chunk but the last
    if include_usage:
        yield chunk([], UsageInfo.of(prompt_tokens, steps.completion_tokens))
