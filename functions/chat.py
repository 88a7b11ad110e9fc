"""POST /v1/chat/completions: chat with a model, as JSON or as a stream of server-sent events."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from shared.asgi import create_app, lambda_handler
from shared.http import CatalogDep
from shared.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from shared.serving import chat

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    request: ChatCompletionRequest, catalog: CatalogDep, http: Request
) -> ChatCompletionResponse | EventSourceResponse:
    """Create a model response for the given chat conversation."""
    return await chat.create(request, catalog, http)


app = create_app(router, title="fnserve chat")
handler = lambda_handler(app)
