"""Embeddings: https://platform.openai.com/docs/api-reference/embeddings/create"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, StrictInt, StrictStr

from shared.errors import InvalidRequestError
from shared.protocol.common import OpenAIModel


class EmbeddingRequest(OpenAIModel):
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr = "default"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None

    def inputs(self, max_inputs: int) -> list[str | list[int]]:
        """The batch: each entry a text or a list of token ids. Empty entries are refused, as OpenAI does."""
        raw = self.input
        items: list[str | list[int]]
        if isinstance(raw, str):
            items = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            items = [list(raw)]  # type: ignore[arg-type]
        else:
            items = list(raw)  # type: ignore[arg-type]
        if not items:
            raise InvalidRequestError("input must not be empty", param="input")
        if len(items) > max_inputs:
            raise InvalidRequestError(
                f"input holds {len(items)} items; the limit is {max_inputs} (max_embedding_inputs)", param="input"
            )
        if any(len(item) == 0 for item in items):
            raise InvalidRequestError("input must not contain empty strings or empty token arrays", param="input")
        return items


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
