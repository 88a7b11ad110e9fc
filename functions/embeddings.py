"""POST /v1/embeddings: vectors for texts (or token arrays), as floats or base64."""

from __future__ import annotations

from fastapi import APIRouter, Request

from shared.asgi import create_app, lambda_handler
from shared.http import CatalogDep
from shared.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from shared.serving import embeddings

router = APIRouter(tags=["embeddings"])


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(request: EmbeddingRequest, catalog: CatalogDep, http: Request) -> EmbeddingResponse:
    """Create embedding vectors representing the input texts."""
    return await embeddings.create(request, catalog, http)


app = create_app(router, title="fnserve embeddings")
handler = lambda_handler(app)
