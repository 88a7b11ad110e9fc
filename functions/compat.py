"""Thin aliases for users of the servers fnserve replaces: the OpenAI routes without /v1, and /api/* shapes."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, StrictFloat, StrictInt, StrictStr
from sse_starlette import EventSourceResponse

from functions import chat, completions, embeddings, models
from shared.http import CatalogDep
from shared.protocol.chat import ChatCompletionRequest, ChatMessage
from shared.protocol.completions import CompletionRequest
from shared.serving import chat as chat_serving
from shared.serving import completions as completions_serving

router = APIRouter()

for route in (*chat.router.routes, *completions.router.routes, *embeddings.router.routes, *models.router.routes):
    if isinstance(route, APIRoute) and route.path.startswith("/v1/"):
        router.add_api_route(
            route.path.removeprefix("/v1"),
            route.endpoint,
            methods=list(route.methods or ()),
            response_model=route.response_model,
            tags=["compat"],
            summary=f"Alias of {route.path}",
        )


class GenerateRequest(BaseModel):
    prompt: StrictStr = Field(min_length=1)
    model: StrictStr = "default"
    max_tokens: StrictInt = Field(default=256, ge=1)
    temperature: StrictInt | StrictFloat = 0.7
    top_p: StrictInt | StrictFloat = 1.0
    top_k: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None


class ChatRequest(GenerateRequest):
    prompt: StrictStr = ""
    messages: list[ChatMessage] = Field(min_length=1)


class GenerateResponse(BaseModel):
    text: str
    model: str
    tokens_generated: int
    finish_reason: Literal["stop", "length"] | None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatResponse(BaseModel):
    message: ChatMessageOut
    model: str
    tokens_generated: int
    finish_reason: Literal["stop", "length", "tool_calls"] | None


def _sampling(request: GenerateRequest) -> dict[str, Any]:
    return request.model_dump(include={"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed"})


@router.post("/api/generate", response_model=GenerateResponse, tags=["compat"])
async def generate(request: GenerateRequest, catalog: CatalogDep, http: Request) -> GenerateResponse:
    """Continue a prompt; the whole text at once."""
    completion = CompletionRequest(prompt=request.prompt, **_sampling(request))
    result = await completions_serving.create(completion, catalog, http)
    assert not isinstance(result, EventSourceResponse)
    choice = result.choices[0]
    tokens = result.usage.completion_tokens if result.usage else 0
    return GenerateResponse(
        text=choice.text, model=result.model, tokens_generated=tokens, finish_reason=choice.finish_reason
    )


@router.post("/api/generate/stream", tags=["compat"])
async def generate_stream(request: GenerateRequest, catalog: CatalogDep, http: Request) -> EventSourceResponse:
    """Continue a prompt, streamed as server-sent events of {"text": delta}, then a final frame and [DONE]."""
    completion = CompletionRequest(prompt=request.prompt, **_sampling(request))
    return await completions_serving.text_stream(completion, catalog, http)


@router.post("/api/chat", response_model=ChatResponse, tags=["compat"])
async def chat_simple(request: ChatRequest, catalog: CatalogDep, http: Request) -> ChatResponse:
    """Answer a conversation; the whole reply at once."""
    openai = ChatCompletionRequest(messages=request.messages, **_sampling(request))
    result = await chat_serving.create(openai, catalog, http)
    assert not isinstance(result, EventSourceResponse)
    choice = result.choices[0]
    return ChatResponse(
        message=ChatMessageOut(content=choice.message.content or ""),
        model=result.model,
        tokens_generated=result.usage.completion_tokens,
        finish_reason=choice.finish_reason,
    )


@router.get("/api/models", tags=["compat"])
async def list_models_simple(catalog: CatalogDep) -> dict[str, Any]:
    """The model ids, their kinds, and which is the default."""
    cards = (await models.list_models(catalog)).data
    return {"models": [{"id": c.id, "kind": c.kind} for c in cards], "default": catalog.settings.default_model}
