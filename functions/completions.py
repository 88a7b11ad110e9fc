"""POST /v1/completions: continue a prompt (or a batch of prompts), as JSON or server-sent events."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from shared.asgi import create_app, lambda_handler
from shared.http import CatalogDep
from shared.protocol.completions import CompletionRequest, CompletionResponse
from shared.serving import completions

router = APIRouter(tags=["completions"])


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(
    request: CompletionRequest, catalog: CatalogDep, http: Request
) -> CompletionResponse | EventSourceResponse:
    """Create a completion for the given prompt, or for each prompt of a batch."""
    return await completions.create(request, catalog, http)


app = create_app(router, title="fnserve completions")
handler = lambda_handler(app)
