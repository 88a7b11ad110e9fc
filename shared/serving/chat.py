"""Chat completions: the conversation through the model's chat template, then JSON or a stream of chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import HTTPConnection, Request

from shared.catalog import ModelCatalog
from shared.generation.engine import Stream
from shared.generation.model import GenerationModel
from shared.generation.params import SamplingParams
from shared.guards.access import request_context
from shared.http import generation_model, sse_frames
from shared.protocol.chat import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    DeltaMessage,
    ResponseMessage,
)
from shared.protocol.common import SYSTEM_FINGERPRINT, UsageInfo, now, random_id
from shared.protocol.structured import ToolPlan
from shared.serving.jobs import Deltas, Tracker, collect_jobs, expand, finish_reason, submit, token_logprob
from shared.serving.sessions import Turn, begin_turn, trimmed
from shared.serving.tools import StreamedCalls, finish, reply, template_messages


@dataclass
class Started:
    """A chat request queued on its model: what answering it needs."""

    model: GenerationModel
    params: SamplingParams
    plan: ToolPlan | None
    prompt_ids: list[int]
    streams: list[Stream]
    tracker: Tracker
    turn: Turn | None


async def start(request: ChatCompletionRequest, catalog: ModelCatalog, connection: HTTPConnection) -> Started:
    """Check the request, build its prompt (a session's history first) and queue its choices (503 when full)."""
    settings = catalog.settings
    params = request.to_sampling_params(settings)
    plan, grammar_text, param = request.grammar(settings)
    model = await generation_model(catalog, request.model)
    grammar = await model.grammars.compile(grammar_text, param, settings.grammar_timeout) if grammar_text else None
    native = model.template_renders_tools
    n = request.n or 1
    turn = await begin_turn(connection, request.session_id, request.messages, n) if request.session_id else None
    if turn is None:
        messages, tools = template_messages(request.messages, plan, native)
        prompt_ids = await asyncio.to_thread(model.encode_chat, messages, tools)  # off the event loop
    else:
        messages, tools, prompt_ids = await asyncio.to_thread(_session_prompt, model, turn, plan, native, params)
    scope = request_context(connection).key_name
    streams = submit(model, expand(model, [prompt_ids], params, n, grammar=grammar, scope=scope))  # full: 503
    tracker = Tracker.of(connection, model)
    if tracker.log_content:
        tracker.ctx.content["prompt"] = messages
    return Started(model, params, plan, prompt_ids, streams, tracker, turn)


async def create(
    request: ChatCompletionRequest, catalog: ModelCatalog, http: Request
) -> ChatCompletionResponse | EventSourceResponse:
    started = await start(request, catalog, http)
    model, params, plan, turn = started.model, started.params, started.plan, started.turn
    prompt_ids = started.prompt_ids
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        steps = Deltas(started.streams, started.tracker, params.logprobs)
        return EventSourceResponse(sse_frames(_chunks(model, steps, len(prompt_ids), include_usage, plan, turn)))

    choices = await collect_jobs(model, started.streams, http.is_disconnected, started.tracker)
    replies = [reply(c.text, plan) for c in choices]
    if turn is not None and choices[0].finish_reason in ("stop", "length"):  # cancelled: nothing is kept
        await turn.commit(*replies[0], len(prompt_ids), len(choices[0].token_ids))
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


def _session_prompt(
    model: GenerationModel, turn: Turn, plan: ToolPlan | None, native: bool, params: SamplingParams
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, list[int]]:
    """The session's history and this turn through the template, the oldest turns left out until it fits the
    context with room for the reply (max_tokens, else a quarter of the context up to 512 tokens)."""
    room = params.max_tokens or min(model.context_length // 4, 512)
    encoded: dict[int, tuple[list[dict[str, Any]], list[dict[str, Any]] | None, list[int]]] = {}

    def encode(conversation: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, list[int]]:
        if len(conversation) not in encoded:
            messages, tools = template_messages(conversation, plan, native)
            encoded[len(conversation)] = (messages, tools, model.encode_chat(messages, tools))
        return encoded[len(conversation)]

    def fits(conversation: list[ChatMessage]) -> bool:
        return len(encode(conversation)[2]) + room <= model.context_length

    return encode(trimmed(turn.history(), turn.new, fits))


async def _chunks(
    model: GenerationModel,
    steps: Deltas,
    prompt_tokens: int,
    include_usage: bool,
    plan: ToolPlan | None,
    turn: Turn | None = None,
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
    text, finished = "", None  # a session turn's reply, kept when it is whole
    async for delta in steps:
        if turn is not None:
            text += delta.text
            finished = delta.finish_reason or finished
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
    if turn is not None and finished is not None:  # the reply is whole: the turn is kept (409 frame if not)
        await turn.commit(*reply(text, plan), prompt_tokens, steps.completion_tokens)
    if include_usage:
        yield chunk([], UsageInfo.of(prompt_tokens, steps.completion_tokens))
