"""Embeddings: each input's vector, as floats or base64, within the server's limits and backpressure."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from starlette.requests import Request

from shared.catalog import ModelCatalog
from shared.errors import InvalidRequestError
from shared.guards.access import request_context
from shared.guards.gate import Gate
from shared.http import embedding_model
from shared.protocol.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage


async def create(request: EmbeddingRequest, catalog: ModelCatalog, http: Request) -> EmbeddingResponse:
    settings = catalog.settings
    items = request.inputs(settings.max_embedding_inputs)
    model = await embedding_model(catalog, request.model)
    if request.dimensions is not None and request.dimensions != model.dimensions:
        raise InvalidRequestError(
            f"model {model.id!r} gives {model.dimensions}-dimensional vectors and cannot shorten them; "
            f"omit dimensions or set it to {model.dimensions}",
            param="dimensions",
        )
    limit = settings.max_embedding_input_tokens
    if any(not isinstance(item, str) and len(item) > limit for item in items):
        raise InvalidRequestError(f"an input has more than {limit} tokens (max_embedding_input_tokens)", param="input")
    vocab = model.vocab_size
    if any(not 0 <= t < vocab for item in items if not isinstance(item, str) for t in item):
        raise InvalidRequestError(f"input token ids must be between 0 and {vocab - 1}", param="input")
    texts = [item if isinstance(item, str) else model.decode(item) for item in items]
    gate: Gate = http.app.state.embedding_gate
    async with gate.hold():  # 503 at once when too many wait
        counts = await asyncio.to_thread(model.token_counts, texts)
        if (longest := max(counts)) > limit:
            raise InvalidRequestError(
                f"input[{counts.index(longest)}] has {longest} tokens; the limit is {limit} "
                "(max_embedding_input_tokens)",
                param="input",
            )
        vectors = await asyncio.to_thread(model.embed, texts)
    tokens = sum(min(c, model.max_tokens) for c in counts)  # what the model read: it truncates longer inputs
    ctx = request_context(http)
    ctx.model, ctx.prompt_tokens = model.id, tokens
    http.app.state.metrics.embedding_inputs.labels(model.id).inc(len(texts))
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
