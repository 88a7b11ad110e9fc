"""Types several endpoints share: usage, logprobs, errors, model cards."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SYSTEM_FINGERPRINT = "fnserve-0.1"


class OpenAIModel(BaseModel):
    # Clients send fields newer than this server knows: accept them, never act on them.
    model_config = ConfigDict(extra="allow")


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ModelCard(BaseModel):
    """https://platform.openai.com/docs/api-reference/models/object"""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # fnserve extras
    kind: Literal["chat", "completion", "embedding"] = Field(
        description="chat: chat and completions; completion: completions only (no chat template); embedding"
    )
    loaded: bool = Field(description="whether the weights are in memory in this process")
    context_length: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
