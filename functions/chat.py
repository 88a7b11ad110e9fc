"""POST /v1/chat/completions: chat with a model, as JSON or as a stream of server-sent events."""

from __future__ import annotations

from fastapi import APIRouter, Request, WebSocket
from sse_starlette import EventSourceResponse

from shared.asgi import create_app, lambda_handler
from shared.http import CatalogDep
from shared.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from shared.serving import chat, websocket

router = APIRouter(tags=["chat"])
socket_router = APIRouter(tags=["chat"])  # checks keys and limits per request itself (see shared.serving.websocket)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    request: ChatCompletionRequest, catalog: CatalogDep, http: Request
) -> ChatCompletionResponse | EventSourceResponse:
    """Create a model response for the given chat conversation."""
    return await chat.create(request, catalog, http)


@socket_router.websocket("/v1/chat/ws")
@socket_router.websocket("/chat/ws")
async def chat_websocket(socket: WebSocket, catalog: CatalogDep) -> None:
    """Chat over a WebSocket: JSON requests in, delta frames and a done frame out, stop frames to cancel."""
    await websocket.serve(socket, catalog)


app = create_app(router, title="fnserve chat", unguarded=(socket_router,))
handler = lambda_handler(app)
