"""POST /v1/embeddings: vectors for texts (or token arrays), as floats or base64."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from fastapi import APIRouter

from shared.asgi import create_app, lambda_handler
from shared.errors import InvalidRequestError
from shared.http import CatalogDep, embedding_model
from shared.protocol.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage

router = APIRouter(tags=["embeddings"])


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(request: EmbeddingRequest, catalog: CatalogDep) -> EmbeddingResponse:
    """Create embedding vectors representing the input texts."""
    items = request.inputs()
    model = await embedding_model(catalog, request.model)
    if request.dimensions is not None and request.dimensions != model.dimensions:
        raise InvalidRequestError(
            f"model {model.id!r} gives {model.dimensions}-dimensional vectors and cannot shorten them; "
            f"omit dimensions or set it to {model.dimensions}",
            param="dimensions",
        )
    texts = [item if isinstance(item, str) else model.decode(item) for item in items]
    vectors = await asyncio.to_thread(model.embed, texts)
    tokens = model.count_tokens(texts)
    return EmbeddingResponse(
        data=[Embedding(index=i, embedding=_encode(v, request.encoding_format)) for i, v in enumerate(vectors)],
        model=model.id,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # What the openai client decodes: little-endian float32 bytes, base64.
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]


app = create_app(router, title="fnserve embeddings")
handler = lambda_handler(app)
